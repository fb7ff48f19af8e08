"""[CLS]/patch layer specialization for timm Vision Transformers.

In a ViT the [CLS] token (and register tokens: together the *global* tokens, timm's
`num_prefix_tokens` first tokens of the sequence) and the patch tokens share every weight.
Marouani et al. ("Revisiting [CLS] and Patch Token Interaction in Vision Transformers", ICLR 2026)
give the global tokens their own copy of selected token-wise modules — LayerNorms, LayerScale,
the QKV projection of early blocks — while attention stays one joint softmax over all tokens.

Which tokens get the copies (`tokens`): the global tokens (`"global"`, the paper's), the [CLS]
token alone (`"cls"`), the registers alone (`"registers"`), or one patch token (`[row, col]` in the
patch grid: the control that gives the same copies, at the same cost, to a token that is not
global). Each is one contiguous run of rows of timm's sequence ([CLS], registers, patches in
row-major order), `row_start:row_stop` (`token_rows`), so the split below is the same whichever
tokens get the copies. The copy keeps its name, `global_copy`, whichever tokens get it (the
state-dict names of the paper's setting).

How it is done here: a specialized module keeps its shared weights under its usual name
(`blocks.0.norm1.weight`, so vanilla timm / DeiT-III checkpoints still load) and gains a child
`global_copy` (`blocks.0.norm1.global_copy.weight`). Its class becomes a subclass of its own
(`GlobalTokenLayerNorm`, `GlobalTokenLinear`, ...; `split_class`) whose forward recomputes the
output rows of the chosen tokens with that copy:

    out = self.shared_forward(x)                   # the timm module's forward, every token
    rows = self.global_copy(x[:, start:stop])      # start:stop = 0:n, the n global tokens, by default
    return with_global_rows(out, rows, start)      # out[:, start:stop] overwritten in place

Because the split sits in token-wise modules only (norms, LayerScale, Linear, Mlp), timm's
`Block.forward` and `Attention.forward` run unchanged: attention is still one
`F.scaled_dot_product_attention` over the concatenated sequence, and every timm API
(`forward_features`, `forward_intermediates`, grad checkpointing, `no_weight_decay`,
`group_matcher`, `features_only`) keeps working. The shared op also runs on the n global rows and
is then overwritten: n/N of one op (1/197 for ViT-S/16 at 224) is cheaper than slicing the patch
rows out, which would copy the whole activation. Autograd routes the chosen rows' gradient to the
copy only (the overwritten rows contribute nothing to the shared weights).

The same code runs under TorchScript and torch.fx. `shared_forward` is the base class's own
`forward` under another name (TorchScript compiles no `super()` call, and compiles a called method
under its `__name__`, which must not clash with `forward`). `with_global_rows` and
`scale_global_rows` are registered with `torch.fx.wrap`: an fx Proxy takes no item assignment, so
symbolic tracing (torchvision's and timm's `create_feature_extractor`, timm's `FeatureGraphNet`)
records each as one call, run eagerly, and LayerScale's choice below is made when the traced
graph runs, not when it is traced. Neither changes the operations eager PyTorch runs.

A class per split, not a forward hook: torch.compile does not guard nn.Module hook dictionaries
(`torch._dynamo.config.skip_nnmodule_hook_guards`, on by default) but does guard module types, so
with hooks a graph traced for a block without a QKV copy would be reused for a block with one
(regional compilation, `block.compile()`, of the paper default: QKV copies in the first third
only), and a baseline compiled first in the same process would run in place of a specialized model.
With a class per split each structure gets its own graph (tests/test_performance_paths.py).

LayerScale is split differently: `GlobalTokenLayerScale` multiplies by a per-token gamma
(`cat([gamma] * start + [copy.gamma] * (stop - start) + [gamma] * (N - stop))`, shape (N, D))
instead of overwriting rows.

Why (one module's forward + backward at ViT-S/16 shapes, B=16 N=197 D=384, 1 CPU thread, as a
multiple of the timm module's time; the measurements are recorded in benchmarks/README.md): the in-place
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
Whole model (`python benchmarks/bench_model.py`): see benchmarks/README.md.

Components the architecture lacks are refused, never skipped: `specialize` checks every selected
module before it changes the first one, and a model it refuses is left exactly as it was.

A patch position counts patches from the top-left of the grid the model is built at
(`patch_embed.grid_size`): at another `img_size` it is the cell (row, col) of that grid (refused
outside it), not the same point of the image. Inputs whose grid changes per call (timm's
`dynamic_img_size`) or patches dropped at random (timm's `patch_drop_rate`, which reorders the
patch rows) would move the copy from patch to patch, so a patch position refuses them.
"""

from __future__ import annotations

import copy
import difflib
import types
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch
from timm.layers import LayerScale
from timm.models import VisionTransformer
from timm.models._manipulate import named_apply
from timm.models.vision_transformer import get_init_weights_vit
from torch import nn

from clsvit.errors import InputError

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

# The tokens that can get the copies, besides one patch position `[row, col]`.
TOKEN_GROUPS = ("global", "cls", "registers")

# Nothing specialized: the keyword arguments of `specialize` for a baseline model.
NO_SPECIALIZATION: Mapping[str, Any] = MappingProxyType(
    {"tokens": "global", **dict.fromkeys(COMPONENTS, 0.0), "final_norm": False, "init": "clone"})

INITS = ("clone", "fresh")
OPTIONS = ("tokens", *COMPONENTS, "final_norm", "init")  # every keyword argument of `specialize`


def is_specialized(selection: Mapping[str, Any] | None) -> bool:
    """Whether `specialize(model, **selection)` gives some tokens weights of their own (a non-zero
    fraction or a non-empty block list for some component, or `final_norm`)."""
    if not selection:
        return False
    return any(bool(selection.get(component)) for component in COMPONENTS) or bool(selection.get("final_norm"))


def describe_specialization(selection: Mapping[str, Any] | None) -> str:
    """'norm=1 layerscale=1 qkv=0.333', 'qkv=[0, 1] final_norm', 'norm=1 tokens=[7, 7]' (tokens
    other than the global ones), or 'none'."""
    selection = selection or {}
    parts = [f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
             for key, value in ((key, selection.get(key)) for key in COMPONENTS) if value]
    if selection.get("final_norm"):
        parts.append("final_norm")
    tokens = selection.get("tokens", "global")
    if parts and tokens != "global":
        parts.append(f"tokens={describe_tokens(tokens)}")
    return " ".join(parts) or "none"


def check_tokens(tokens: Any) -> str | list[int]:
    """A `tokens` value in its one spelling: "global", "cls", "registers", or a patch position
    [row, col] (a list or tuple of two ints >= 0); anything else is a one-line error."""
    if isinstance(tokens, str):
        if tokens in TOKEN_GROUPS:
            return tokens
        close = difflib.get_close_matches(tokens, TOKEN_GROUPS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(f"tokens: {tokens!r} is none of {', '.join(TOKEN_GROUPS)} or a patch position "
                         f"[row, col]{hint}")
    if (isinstance(tokens, (list, tuple)) and len(tokens) == 2
            and all(type(i) is int and i >= 0 for i in tokens)):  # `type is`: a bool is no index
        return list(tokens)
    raise InputError(f"tokens: expected global, cls, registers or a patch position [row, col] of two "
                     f"integers >= 0, got {tokens!r}")


def describe_tokens(tokens: Any) -> str:
    """"global", "cls", "registers" or "[7, 7]": a `tokens` value as a recipe writes it."""
    tokens = check_tokens(tokens)
    return tokens if isinstance(tokens, str) else f"[{tokens[0]}, {tokens[1]}]"


def token_rows(model: VisionTransformer, tokens: Any) -> tuple[int, int]:
    """(start, stop): the rows (dim 1 of the token sequence, [CLS], registers, then the patches
    row by row) of the tokens that `tokens` chooses in `model`. One line refuses a choice the
    model cannot give: `cls` without a [CLS] token, `registers` without registers, `cls` or
    `registers` where they are all the global tokens (that is `global`), a patch position outside
    the grid or on a model whose patch rows move (dynamic_img_size, patch dropout)."""
    tokens = check_tokens(tokens)
    num_global = model.num_prefix_tokens
    has_cls = model.cls_token is not None
    num_registers = getattr(model, "num_reg_tokens", 0)
    if tokens == "global":
        if num_global == 0:
            raise InputError("model: it has no global tokens (no [CLS] and no registers) to specialize; "
                             "a patch position (tokens: [row, col]) can be")
        return 0, num_global
    if tokens == "cls":
        if not has_cls:
            raise InputError(f"tokens: cls, but the model has no [CLS] token (class_token=False; "
                             f"{num_registers} registers, global_pool={model.global_pool!r})")
        rows = 0, 1
    elif tokens == "registers":
        if not num_registers:
            raise InputError("tokens: registers, but the model has no registers (build it with "
                             "model.reg_tokens / timm's reg_tokens, or a *_reg* architecture)")
        start = int(has_cls)
        rows = start, start + num_registers
    else:
        return _patch_row(model, tokens)
    if rows == (0, num_global):
        which = "[CLS] is its only global token" if tokens == "cls" else "it has no [CLS] token"
        raise InputError(f"tokens: {tokens} chooses every global token of this model ({which}): that is "
                         f"tokens global; write global")
    return rows


def _patch_row(model: VisionTransformer, position: list[int]) -> tuple[int, int]:
    if model.dynamic_img_size:
        raise InputError(f"tokens: patch position {describe_tokens(position)} on a model built with "
                         f"dynamic_img_size: its grid changes with each input, so no row is that patch")
    if not isinstance(model.patch_drop, nn.Identity):
        raise InputError(f"tokens: patch position {describe_tokens(position)} on a model with patch dropout "
                         f"(patch_drop_rate): it drops and reorders the patch rows; build it without")
    rows, cols = model.patch_embed.grid_size
    row, col = position
    if row >= rows or col >= cols:
        raise InputError(f"tokens: patch position {describe_tokens(position)} is outside the {rows}x{cols} "
                         f"patch grid (rows and columns count from 0)")
    index = model.num_prefix_tokens + row * cols + col
    return index, index + 1


def specialized_tokens(model: nn.Module) -> str | list[int] | None:
    """The `tokens` a specialized model gives its copies to (None: not specialized)."""
    return getattr(model, "specialized_tokens", None)


def with_global_rows(out: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
    """`out` with its rows (dim 1) from `start` on replaced, in place, by `rows`."""
    out[:, start:start + rows.shape[1]] = rows
    return out


def scale_global_rows(x: torch.Tensor, gamma: torch.Tensor, global_gamma: torch.Tensor, start: int,
                      stop: int) -> torch.Tensor:
    """LayerScale with `global_gamma` on the rows start:stop (dim 1) and `gamma` on the others."""
    if torch.is_grad_enabled():  # one multiply by a per-token gamma: a backward without an overwrite
        gammas = [global_gamma.expand(stop - start, -1)]
        if start > 0:
            gammas.insert(0, gamma.expand(start, -1))
        if stop < x.shape[1]:
            gammas.append(gamma.expand(x.shape[1] - stop, -1))
        return x * torch.cat(gammas)
    out = x * gamma  # no backward: overwriting the chosen rows is cheaper than building an (N, D) gamma
    out[:, start:stop] = x[:, start:stop] * global_gamma
    return out


torch.fx.wrap("with_global_rows")
torch.fx.wrap("scale_global_rows")


def _renamed(function: types.FunctionType, name: str) -> types.FunctionType:
    renamed = types.FunctionType(function.__code__, function.__globals__, name, function.__defaults__,
                                 function.__closure__)
    renamed.__kwdefaults__ = function.__kwdefaults__
    renamed.__annotations__ = function.__annotations__
    renamed.__qualname__ = f"{function.__qualname__.rpartition('.')[0]}.{name}"
    return renamed


class GlobalTokenSplit(nn.Module):
    """Mixin of every specialized module but LayerScale: the module's own forward on every token,
    then the output rows `row_start:row_stop` (the chosen tokens) overwritten by `global_copy`.

    `specialize()` changes the class of the module in place to `GlobalToken<Class>` (this mixin +
    the module's class, made once per class by `split_class`), so parameters, buffers, state-dict
    keys and `isinstance` checks stay those of the timm module. A subclass gets `shared_forward`,
    the forward of the first class after this mixin in its MRO, and `_split_base`, that class."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        base = next(klass for klass in cls.__mro__ if "forward" in vars(klass)
                    and not issubclass(klass, GlobalTokenSplit))
        cls._split_base = base
        cls.shared_forward = _renamed(vars(base)["forward"], "shared_forward")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return with_global_rows(self.shared_forward(x), self.global_copy(x[:, self.row_start:self.row_stop]),
                                self.row_start)

    def __reduce_ex__(self, protocol):
        # The class is made at run time, so pickle cannot find it by name: rebuild it from the base
        # class (deepcopy, torch.save of a whole model, multiprocessing).
        _, _, *state = super().__reduce_ex__(protocol)
        return (_new_split_module, (self._split_base,), *state)


class GlobalTokenLayerScale(LayerScale):
    """A specialized timm LayerScale: one multiply by a per-token gamma, the copy's for the rows
    `row_start:row_stop` — element for element the multiplies of the shared and the copy's
    LayerScale, without the overwrite (whose backward clones the output gradient; see the module
    docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_global_rows(x, self.gamma, self.global_copy.gamma, self.row_start, self.row_stop)


_SPLIT_CLASSES: dict[type, type] = {LayerScale: GlobalTokenLayerScale}


def split_class(cls: type) -> type:
    """The specialized class of a token-wise module class (made once, then cached)."""
    if cls not in _SPLIT_CLASSES:
        name = f"GlobalToken{cls.__name__}"
        _SPLIT_CLASSES[cls] = type(name, (GlobalTokenSplit, cls), {"__module__": __name__, "__qualname__": name})
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


def _add_global_copy(module: nn.Module, name: str, rows: tuple[int, int], init: str, init_mode: str) -> None:
    global_copy = copy.deepcopy(module)
    if init == "fresh":
        init_fn = get_init_weights_vit(init_mode, needs_reset=True)
        named_apply(init_fn, global_copy, name=f"{name}.global_copy", include_root=True)
    module.global_copy = global_copy
    module.row_start, module.row_stop = rows
    module.__class__ = split_class(type(module))
    module.register_load_state_dict_pre_hook(_fill_missing_global_copies)


def block_indices(value: float | Sequence[int], depth: int, name: str) -> list[int]:
    """Blocks a component value selects: a fraction f of the depth means the first round(f * depth)
    blocks (1/3 -> 4 of 12, 8 of 24); a list names the block indices."""
    if isinstance(value, bool):
        raise InputError(f"{name}: expected a fraction in [0, 1] or a list of block indices, got {value!r}")
    if isinstance(value, (int, float)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"{name}: fraction {value!r} is outside [0, 1]")
        return list(range(round(value * depth)))
    if isinstance(value, (list, tuple)):
        for index in value:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < depth:
                raise InputError(f"{name}: block index {index!r} is not in [0, {depth - 1}] (depth {depth})")
        return sorted(set(value))
    raise InputError(f"{name}: expected a fraction in [0, 1] or a list of block indices, got {value!r}")


def specialize(model: nn.Module, *, tokens: str | Sequence[int] = "global", norm: float | Sequence[int] = 0.0,
               layerscale: float | Sequence[int] = 0.0, qkv: float | Sequence[int] = 0.0,
               proj: float | Sequence[int] = 0.0, mlp: float | Sequence[int] = 0.0, final_norm: bool = False,
               init: str = "clone", **unknown: Any) -> nn.Module:
    """Give the global tokens ([CLS] + registers) their own copy of the selected modules, in place.

    `tokens` chooses other tokens to get the copies: "cls" ([CLS] alone), "registers" (the
    registers alone) or a patch position [row, col] in the patch grid (the module docstring; one
    row, at the cost of the paper's default on a model whose only global token is [CLS]).

    Each component (`norm`: norm1+norm2, `layerscale`: ls1+ls2, `qkv`, `proj`, `mlp`: the whole
    MLP) is a fraction of the depth counted from the input, or a list of block indices.
    `final_norm` unties `model.norm`, the norm over every token after the last block; global-pool
    models (timm's `fc_norm`) have none — their `fc_norm` normalises the pooled patch average,
    which no global token enters — and are refused. `init="clone"` starts each copy equal to the
    shared weights (the model then computes the function it computed before, up to float
    rounding); `init="fresh"` re-initialises the copies the way timm initialises the model.

    Atomic: every argument and every selected module is checked first; a component the
    architecture lacks (no LayerScale, no `attn.qkv`, no final norm), tokens it does not have
    (`token_rows`), `tokens` other than "global" with nothing selected, or copies for tokens other
    than those of the copies it already has, raise a ValueError naming the argument, and the model
    is left untouched. Modules already specialized are kept as they are. Returns the same model.
    """
    if unknown:
        name = next(iter(unknown))
        close = difflib.get_close_matches(name, OPTIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(f"specialize: unknown component {name!r}{hint}")
    if not isinstance(model, VisionTransformer):
        raise InputError(f"model: specialize() needs a timm VisionTransformer, got {type(model).__name__}")
    if init not in INITS:
        raise InputError(f"init: expected one of {INITS}, got {init!r}")
    tokens = check_tokens(tokens)
    selected = {"norm": norm, "layerscale": layerscale, "qkv": qkv, "proj": proj, "mlp": mlp}
    plan = {component: block_indices(value, len(model.blocks), component)
            for component, value in selected.items()}
    targets = [(f"blocks.{i}.{path}", component) for component, indices in plan.items()
               for i in indices for path in COMPONENTS[component]]
    if not targets and not final_norm:
        if tokens != "global":
            raise InputError(f"tokens: {describe_tokens(tokens)} chooses the tokens that get the copies, but no "
                             f"component is specialized; leave tokens global or select a component")
        return model
    rows = token_rows(model, tokens)
    already = specialized_tokens(model)
    if already is not None and already != tokens:
        raise InputError(f"tokens: the model's copies are for tokens {describe_tokens(already)}; it cannot also "
                         f"have copies for {describe_tokens(tokens)}")
    modules = [(name, _token_wise_module(model, name, component)) for name, component in targets]
    if final_norm:
        modules.append(("norm", _final_norm(model)))

    for name, module in modules:  # every check passed: nothing below raises on a bad argument
        if not hasattr(module, "global_copy"):
            _add_global_copy(module, name, rows, init, model.weight_init_mode)
    model.specialized_tokens = tokens
    return model


_specialize = specialize  # create_model's `specialize` argument shadows the function name


def _token_wise_module(model: nn.Module, name: str, component: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        block = type(model.get_submodule(".".join(name.split(".")[:2]))).__name__  # "blocks.<i>"
        raise InputError(f"{component}: block type {block} has no module {name!r}") from None
    if isinstance(module, nn.Identity):
        why = (" (the architecture has no LayerScale: build it with layerscale_init / timm's init_values, "
               "or set layerscale to 0)" if component == "layerscale" else "")
        raise InputError(f"{component}: {name} is an Identity in this model{why}")
    if isinstance(module, LayerScale) and module.inplace:
        raise InputError(f"{component}: {name} is an in-place LayerScale; build the model with inplace=False")
    return module


def _final_norm(model: VisionTransformer) -> nn.Module:
    if isinstance(model.norm, nn.Identity):
        why = ("it pools the patch tokens and normalises the pooled vector (fc_norm), which no global token "
               "enters" if not isinstance(model.fc_norm, nn.Identity) else "it was built without one")
        raise InputError(f"final_norm: the model has no final norm over the tokens ({why}); leave final_norm false")
    return model.norm


def specialized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module for every module that has a global-token copy."""
    return {name: module for name, module in model.named_modules() if hasattr(module, "global_copy")}
