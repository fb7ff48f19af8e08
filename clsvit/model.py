"""[CLS]/patch layer specialization for timm Vision Transformers.

In a ViT the [CLS] token (and register tokens: together the *global* tokens, timm's
`num_prefix_tokens` first tokens of the sequence) and the patch tokens share every weight.
Marouani et al. ("Revisiting [CLS] and Patch Token Interaction in Vision Transformers", ICLR 2026)
give the global tokens their own copy of selected token-wise modules — LayerNorms, LayerScale,
the QKV projection of early blocks — while attention stays one joint softmax over all tokens.

How it is done here: a specialized module keeps its shared weights under its usual name
(`blocks.0.norm1.weight`, so vanilla timm / DeiT-III checkpoints still load) and gains a child
`global_copy` (`blocks.0.norm1.global_copy.weight`). Its class becomes a subclass of its own
(`GlobalTokenLayerNorm`, `GlobalTokenLinear`, ...; `split_class`) whose forward recomputes the
output rows of the global tokens with that copy:

    out = super().forward(x)                 # timm's own forward, every token
    out[:, :n] = self.global_copy(x[:, :n])  # global tokens: their own weights

Because the split sits in token-wise modules only (norms, LayerScale, Linear, Mlp), timm's
`Block.forward` and `Attention.forward` run unchanged: attention is still one
`F.scaled_dot_product_attention` over the concatenated sequence, and every timm API
(`forward_features`, `forward_intermediates`, grad checkpointing, `no_weight_decay`,
`group_matcher`) keeps working. The shared op also runs on the n global rows and is then
overwritten: n/N of one op (1/197 for ViT-S/16 at 224) is cheaper than slicing the patch rows
out, which would copy the whole activation. Autograd routes the prefix rows' gradient to the
copy only (the overwritten rows contribute nothing to the shared weights).

Why a class and not a forward hook (the design before issue #6): torch.compile does not guard
nn.Module hook dictionaries (`torch._dynamo.config.skip_nnmodule_hook_guards`, on by default), but
it does guard module types. With hooks, a graph traced for a block without a QKV copy was silently
reused for a block with one (regional compilation, `block.compile()`, of the paper default: QKV
copies in the first third only), and a baseline model compiled first in the same process made a
specialized model run the baseline graph. With a class per split, each structure gets its own graph
(tests/test_performance_paths.py).

LayerScale is split differently: `GlobalTokenLayerScale` multiplies by a per-token gamma
(`cat([copy.gamma] * n + [gamma] * (N - n))`, shape (N, D)) instead of overwriting rows.

Why (issue #6, `python benchmarks/bench_split.py`: one module's forward + backward at ViT-S/16
shapes, B=16 N=197 D=384, 1 CPU thread, as a multiple of the timm module's time): the in-place
overwrite costs little forward, but its backward makes three passes over full-size tensors:
autograd's CopySlices clones the output gradient to zero the global rows, the `x[:, :n]` slice
gives back a zero-filled input-size gradient, and that is added to the shared path's. For a
LayerScale or a LayerNorm that is as much as the module's own backward. The alternatives, all
computing the same function:
- LayerScale, per-token gamma: the same element-wise multiply, no overwrite; the gamma gradient
  is reduced per token and then split by rows, so a shared gamma whose patch rows get no gradient
  gets exactly 0. 1.02x instead of 1.7-2.2x with the overwrite: adopted (when autograd records;
  without a backward, e.g. under inference_mode, the overwrite is the cheaper one and is used).
- LayerNorm, `layer_norm` without affine + a per-token affine (`addcmul`): an extra full pass
  forward and three backward: 3.0x vs 1.8x with the overwrite. Rejected. (Compiled, both fuse to
  the same cost.)
- LayerNorm / Linear, a custom autograd.Function that runs the shared backward on every row and
  subtracts the global rows' share of the shared weight gradient: 1.33x for LayerNorm, but the
  subtraction leaves rounding noise where the true gradient is exactly 0 (the shared norm2, ls2
  and MLP of the last block of a [CLS]-pooled model: the patch rows never reach the loss), and
  Adam/LAMB normalise that noise into real updates; in bf16 the error grows with the [CLS] share
  of the gradient. Rejected: the shared weights must get exactly the patch rows' sum.
- One fused projection on the concatenated weight [W; W_copy] with a per-token select: doubles
  the projection's FLOPs to save the copies (QKV: 2x instead of 1.07x with the overwrite). Rejected.
Whole model (`python benchmarks/bench_model.py`): see README "Performance".
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import timm
import torch
from timm.layers import DropPath, LayerScale
from timm.models import VisionTransformer
from timm.models._manipulate import named_apply
from timm.models.vision_transformer import get_init_weights_vit
from torch import nn

# component name -> the modules it covers inside each timm `Block`
COMPONENTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "norm": ("norm1", "norm2"),
    "layerscale": ("ls1", "ls2"),
    "qkv": ("attn.qkv",),
    "proj": ("attn.proj",),
    "mlp": ("mlp",),
})

# The paper's configuration: norms + LayerScale in every block, QKV in the first third.
PAPER_DEFAULT: Mapping[str, float] = MappingProxyType(
    {"norm": 1.0, "layerscale": 1.0, "qkv": 1 / 3, "proj": 0.0, "mlp": 0.0})

INITS = ("clone", "fresh")


class GlobalTokenSplit(nn.Module):
    """Mixin of every specialized module but LayerScale: the module's own forward on every token,
    then the first `num_global_tokens` output rows overwritten by `global_copy`.

    `specialize()` changes the class of the module in place to `GlobalToken<Class>` (this mixin +
    the module's class, made once per class by `split_class`), so parameters, buffers, state-dict
    keys and `isinstance` checks stay those of the timm module."""

    num_global_tokens: int
    global_copy: nn.Module
    _split_base: type  # the class before specialization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        n = self.num_global_tokens
        out[:, :n] = self.global_copy(x[:, :n])
        return out

    def __reduce_ex__(self, protocol):
        # The class is made at run time, so pickle cannot find it by name: rebuild it from the base
        # class (deepcopy, torch.save of a whole model, multiprocessing).
        _, _, *state = super().__reduce_ex__(protocol)
        return (_new_split_module, (self._split_base,), *state)


class GlobalTokenLayerScale(LayerScale):
    """A specialized timm LayerScale: one multiply by a per-token gamma, the copy's for the global
    rows — element for element the multiplies of the shared and the copy's LayerScale, without the
    overwrite (whose backward clones the output gradient; see the module docstring)."""

    num_global_tokens: int
    global_copy: LayerScale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_global_tokens
        if not torch.is_grad_enabled():  # no backward: overwriting n rows is cheaper than an (N, D) gamma
            out = x * self.gamma
            out[:, :n] = x[:, :n] * self.global_copy.gamma
            return out
        gamma = torch.cat([self.global_copy.gamma.expand(n, -1), self.gamma.expand(x.shape[1] - n, -1)])
        return x * gamma  # (B, N, D) * (N, D)


_SPLIT_CLASSES: dict[type, type] = {LayerScale: GlobalTokenLayerScale}


def split_class(cls: type) -> type:
    """The specialized class of a token-wise module class (made once, then cached)."""
    if cls not in _SPLIT_CLASSES:
        name = f"GlobalToken{cls.__name__}"
        _SPLIT_CLASSES[cls] = type(name, (GlobalTokenSplit, cls),
                                   {"__module__": __name__, "__qualname__": name, "_split_base": cls})
    return _SPLIT_CLASSES[cls]


def _new_split_module(base: type) -> nn.Module:
    cls = split_class(base)
    return cls.__new__(cls)


def _fill_missing_global_copies(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: a checkpoint without `global_copy` weights (a vanilla timm or
    DeiT-III model) fills them from the shared weights, i.e. the "clone" initialisation."""
    for key in module.global_copy.state_dict():
        copy_key, shared_key = f"{prefix}global_copy.{key}", f"{prefix}{key}"
        if copy_key not in state_dict and shared_key in state_dict:
            state_dict[copy_key] = state_dict[shared_key]


def _add_global_copy(module: nn.Module, name: str, num_global_tokens: int, init: str,
                     init_mode: str) -> None:
    if hasattr(module, "global_copy"):
        return  # already specialized: specialize() is idempotent
    global_copy = copy.deepcopy(module)
    if init == "fresh":
        init_fn = get_init_weights_vit(init_mode, needs_reset=True)
        named_apply(init_fn, global_copy, name=f"{name}.global_copy", include_root=True)
    module.global_copy = global_copy
    module.num_global_tokens = num_global_tokens
    module.__class__ = split_class(type(module))
    module.register_load_state_dict_pre_hook(_fill_missing_global_copies)


def block_indices(value: float | Sequence[int], depth: int, name: str) -> list[int]:
    """Blocks a component value selects: a fraction f of the depth means the first round(f * depth)
    blocks (1/3 -> 4 of 12, 8 of 24); a list names the block indices."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a fraction in [0, 1] or a list of block indices, got {value!r}")
    if isinstance(value, (int, float)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: fraction {value!r} is outside [0, 1]")
        return list(range(round(value * depth)))
    if isinstance(value, (list, tuple)):
        for index in value:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < depth:
                raise ValueError(f"{name}: block index {index!r} is not in [0, {depth - 1}] (depth {depth})")
        return sorted(set(value))
    raise ValueError(f"{name}: expected a fraction in [0, 1] or a list of block indices, got {value!r}")


def specialize(model: nn.Module, *, norm: float | Sequence[int] = 0.0, layerscale: float | Sequence[int] = 0.0,
               qkv: float | Sequence[int] = 0.0, proj: float | Sequence[int] = 0.0,
               mlp: float | Sequence[int] = 0.0, final_norm: bool = False, init: str = "clone",
               **unknown: Any) -> nn.Module:
    """Give the global tokens ([CLS] + registers) their own copy of the selected modules, in place.

    Each component (`norm`: norm1+norm2, `layerscale`: ls1+ls2, `qkv`, `proj`, `mlp`: fc1+fc2) is a
    fraction of the depth counted from the input, or a list of block indices. `final_norm` unties the
    norm after the last block. `init="clone"` starts each copy equal to the shared weights (the model
    then computes exactly the function it computed before); `init="fresh"` re-initialises the copies
    the way timm initialises the model. Returns the same model.
    """
    if unknown:
        name = next(iter(unknown))
        close = difflib.get_close_matches(name, [*COMPONENTS, "final_norm", "init"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"specialize: unknown component {name!r}{hint}")
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"model: specialize() needs a timm VisionTransformer, got {type(model).__name__}")
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    selected = {"norm": norm, "layerscale": layerscale, "qkv": qkv, "proj": proj, "mlp": mlp}
    plan = {component: block_indices(value, len(model.blocks), component)
            for component, value in selected.items()}
    if not any(plan.values()) and not final_norm:
        return model
    num_global = model.num_prefix_tokens
    if num_global == 0:
        raise ValueError("model: it has no global tokens (no [CLS] and no registers) to specialize")

    for component, indices in plan.items():
        for i in indices:
            for path in COMPONENTS[component]:
                name = f"blocks.{i}.{path}"
                module = _token_wise_module(model, name, component)
                _add_global_copy(module, name, num_global, init, model.weight_init_mode)
    if final_norm:
        if isinstance(model.norm, nn.Identity):
            raise ValueError("final_norm: the model has no final norm (it uses fc_norm after pooling)")
        _add_global_copy(model.norm, "norm", num_global, init, model.weight_init_mode)
    return model


_specialize = specialize  # create_model's `specialize` argument shadows the function name


def _token_wise_module(model: nn.Module, name: str, component: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        block = type(model.get_submodule(".".join(name.split(".")[:2]))).__name__  # "blocks.<i>"
        raise ValueError(f"{component}: block type {block} has no module {name!r}") from None
    if isinstance(module, nn.Identity):
        why = " (build the model with LayerScale: layerscale_init/init_values)" if component == "layerscale" else ""
        raise ValueError(f"{component}: {name} is an Identity in this model{why}")
    if isinstance(module, LayerScale) and module.inplace:
        raise ValueError(f"{component}: {name} is an in-place LayerScale; build the model with inplace=False")
    return module


def set_uniform_drop_path(model: VisionTransformer, rate: float) -> None:
    """DeiT-III uses the same stochastic-depth rate in every block; timm's rises linearly with depth."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path: rate {rate!r} is outside [0, 1)")
    for block in model.blocks:
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()


def create_model(arch: str, *, specialize: Mapping[str, Any] | None = None, drop_path: float = 0.0,
                 layerscale_init: float | None = None, **timm_kwargs: Any) -> VisionTransformer:
    """`timm.create_model(arch, **timm_kwargs)`, then the DeiT-III settings and the specialization.

    `drop_path` is a uniform stochastic-depth rate (DeiT-III); `layerscale_init` is timm's
    `init_values` (DeiT-III: 1e-4 at every size; None keeps the architecture's default).
    `specialize` holds the keyword arguments of `specialize()`, e.g. `clsvit.PAPER_DEFAULT`.
    """
    if "drop_path_rate" in timm_kwargs:
        raise ValueError("drop_path_rate: timm's rate rises linearly with depth; pass drop_path (uniform)")
    if layerscale_init is not None:
        timm_kwargs["init_values"] = layerscale_init
    try:
        model = timm.create_model(arch, **timm_kwargs)
    except (RuntimeError, TypeError) as error:  # unknown name, or arguments this architecture does not take
        raise ValueError(f"arch: {arch!r}: {error}") from None
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"arch: {arch!r} is a {type(model).__name__}, not a timm VisionTransformer")
    set_uniform_drop_path(model, drop_path)
    if specialize:
        _specialize(model, **specialize)
    return model


def build_model(model_cfg: Mapping[str, Any], num_classes: int | None = None) -> VisionTransformer:
    """The model a recipe's `model:` section describes (weights freshly initialised)."""
    num_classes = model_cfg["num_classes"] if num_classes is None else num_classes
    if num_classes is None:
        raise ValueError("model.num_classes: unknown; set it or build the model with the dataset's class count")
    try:
        return create_model(
            model_cfg["arch"],
            specialize=model_cfg["specialize"],
            drop_path=model_cfg["drop_path"],
            layerscale_init=model_cfg["layerscale_init"],
            img_size=model_cfg["img_size"],
            num_classes=num_classes,
            reg_tokens=model_cfg["reg_tokens"],  # None keeps the architecture's default
            **model_cfg.get("timm_kwargs", {}),
        )
    except ValueError as error:  # name the recipe key: "qkv: ..." -> "model.specialize.qkv: ..."
        key, _, rest = str(error).partition(": ")
        if key in (*COMPONENTS, "final_norm", "init"):
            raise ValueError(f"model.specialize.{key}: {rest}") from None
        if key in ("arch", "drop_path"):
            raise ValueError(f"model.{key}: {rest}") from None
        raise


def is_specialized(specialization: Mapping[str, Any]) -> bool:
    """Whether a recipe's `model.specialize` section gives the global tokens any copy at all."""
    return any(specialization.get(component) for component in COMPONENTS) or bool(specialization.get("final_norm"))


def describe_specialization(specialization: Mapping[str, Any]) -> str:
    """'norm=1 layerscale=1 qkv=0.333', 'qkv=[0, 1, 2, 3] final_norm' or 'none'."""
    parts = [f"{component}={value:.3g}" if isinstance(value, float) else f"{component}={value}"
             for component in COMPONENTS if (value := specialization.get(component))]
    if specialization.get("final_norm"):
        parts.append("final_norm")
    return " ".join(parts) or "none"


def baseline_model_config(model_cfg: Mapping[str, Any]) -> dict:
    """The recipe's `model` section without specialization: the baseline a run's overhead is counted against."""
    unspecialized = {**model_cfg["specialize"], **dict.fromkeys(COMPONENTS, 0.0), "final_norm": False}
    return {**model_cfg, "specialize": unspecialized}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weights_path(path: str | Path) -> Path:
    """A run directory or a .safetensors file -> the .safetensors file (one-line error if missing)."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no model weights at {file}")
    return file


def load_pretrained(model: VisionTransformer, path: str | Path) -> list[str]:
    """Initialise `model` from another run's weights (fine-tuning): position embeddings are resized
    bicubically to this model's grid (192 -> 224), a classifier of another shape is left freshly
    initialised, and missing global-token copies are cloned from the shared weights.
    Returns the keys that were not loaded."""
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    state = load_file(weights_path(path))
    own = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix,
            interpolation="bicubic", antialias=True)
    skipped = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    for key in skipped:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: weights do not fit {type(model).__name__}: unexpected keys {unexpected[:5]}")
    return sorted(set(missing) | set(skipped))


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[VisionTransformer, dict]:
    """Rebuild a trained model from its run directory (config.yaml + model.safetensors)."""
    from safetensors.torch import load_file

    from clsvit.config import load_config

    run_dir = Path(run_dir)
    weights = weights_path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    model = build_model(cfg["model"])
    model.load_state_dict(load_file(weights))  # on the CPU, then moved: any torch device string works
    return model.to(device).eval(), cfg
