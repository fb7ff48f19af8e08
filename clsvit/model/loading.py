"""Building models: `create_model` (any timm ViT, DeiT-III settings, specialization, pretrained
weights of any public layout) and `build_model` (a recipe's `model:` section).

Pretrained weights (`pretrained=SOURCE`, recipe key `model.pretrained`) come from:
- a run directory or export directory (its `model.safetensors`), or any `.safetensors`, `.pth`,
  `.bin` file, read by timm's `load_state_dict` (`torch.load(..., weights_only=True)`; a
  `{"model": ...}` / `{"state_dict": ...}` wrapper is unwrapped, an EMA copy preferred);
- `hf-hub:ORG/NAME` or a timm pretrained name (`deit3_base_patch16_224.fb_in1k`, or just its tag
  `fb_in1k`), fetched by timm through `huggingface_hub`: downloaded once, read from the Hugging Face
  cache after that (also with HF_HUB_OFFLINE=1).

The weights are converted by timm itself: the model is built by
`timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(state_dict=...))`, so the
architecture's own `checkpoint_filter_fn` maps the layout (official DeiT-III `gamma_1`/`gamma_2`,
DINOv2 `mask_token`/`register_tokens` and its [CLS] position, timm's own), resizes the position
embeddings to this model's grid and loads strictly. This is the path of
`timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=SOURCE))` to the
tensor. Then the model is specialized, cloning every global-token copy from the loaded shared
weights, and the copies the checkpoint holds (a specialized run) are loaded over them. Copies are
for the tokens the checkpoint's metadata records (`TOKENS_METADATA`, written by clsvit into every
weights file it saves; a file that does not say is taken as the paper's, `global`): a checkpoint
whose copies are for other tokens than the model's (`model.specialize.tokens`) is refused before
anything is loaded. A classifier for another class count is left freshly initialised. One line says
what was loaded, converted, resized and left fresh. Any mismatch raises one line naming the first mismatched keys and shapes,
before a model is returned: nothing half-loaded is ever used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import timm
import torch
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from safetensors import safe_open
from timm.layers import DropPath
from timm.models import VisionTransformer
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet
from timm.models._manipulate import named_apply
from timm.models.vision_transformer import get_init_weights_vit
from torch import nn

from clsvit.errors import InputError
from clsvit.model.specialization import (NO_SPECIALIZATION, OPTIONS, check_tokens, describe_tokens, is_specialized,
                                         specialize as _specialize, specialized_modules)

COPY_MARK = ".global_copy."  # in every state-dict key of a global-token copy
TOKENS_METADATA = "clsvit.specialize.tokens"  # safetensors metadata: the tokens a file's copies are for (JSON)


def tokens_metadata(tokens: Any) -> dict[str, str] | None:
    """The safetensors metadata recording that a weights file's copies are for `tokens` (None: a
    model without copies, nothing to record)."""
    return None if tokens is None else {TOKENS_METADATA: json.dumps(check_tokens(tokens))}


def recorded_tokens(file: str | Path) -> str | list[int] | None:
    """The tokens a weights file's copies are for, as its metadata records them; None when it does not
    say (not a .safetensors file, or not written by clsvit)."""
    if Path(file).suffix != ".safetensors":
        return None
    with safe_open(str(file), "pt") as weights:
        value = (weights.metadata() or {}).get(TOKENS_METADATA)
    if value is None:
        return None
    try:
        return check_tokens(json.loads(value))
    except (ValueError, InputError):
        raise InputError(f"pretrained: {file} records {TOKENS_METADATA}={value!r}, which names no tokens") from None


def set_uniform_drop_path(model: VisionTransformer, rate: float) -> None:
    """DeiT-III uses the same stochastic-depth rate in every block; timm's rises linearly with depth."""
    if not 0.0 <= rate < 1.0:
        raise InputError(f"drop_path: rate {rate!r} is outside [0, 1)")
    for block in model.blocks:
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_overhead_pct(params: int, baseline_params: int) -> float:
    """The parameters specialization adds, in % of the unspecialized model's."""
    return 100.0 * (params - baseline_params) / baseline_params


def create_model(arch: str, *, specialize: Mapping[str, Any] | None = None, pretrained: str | Path | None = None,
                 drop_path: float = 0.0, layerscale_init: float | None = None,
                 report: Callable[[str], Any] | None = print, **timm_kwargs: Any) -> nn.Module:
    """`timm.create_model(arch, **timm_kwargs)`, then the DeiT-III settings and the specialization.

    `drop_path` is a uniform stochastic-depth rate (DeiT-III); `layerscale_init` is timm's
    `init_values` (DeiT-III: 1e-4 at every size; None keeps the architecture's default).
    `specialize` holds the keyword arguments of `specialize()`, e.g. `clsvit.PAPER_DEFAULT`.
    `pretrained` initialises the model from a checkpoint (see the module docstring); without
    `num_classes` the model takes the checkpoint's class count. `report` receives the one-line
    summary of what was loaded (None: no summary). `features_only=True` returns timm's
    `FeatureGetterNet` over the finished model, as timm does for its ViTs.
    """
    features = {key: timm_kwargs.pop(key) for key in ("features_only", "out_indices", "feature_cls")
                if key in timm_kwargs}
    if "drop_path_rate" in timm_kwargs:
        raise InputError("drop_path_rate: timm's rate rises linearly with depth; pass drop_path (uniform)")
    if layerscale_init is not None:
        timm_kwargs["init_values"] = layerscale_init
    if pretrained is None or pretrained == "":
        model, source = timm_vit(arch, **timm_kwargs), None
    else:
        source = read_pretrained(pretrained, arch)
        _check_same_tokens(source, specialize)
        model = _load_shared_weights(arch, source, timm_kwargs)
    set_uniform_drop_path(model, drop_path)
    if specialize:
        _specialize(model, **specialize)
    if source is not None:
        summary = _finish_pretrained(model, arch, source, timm_kwargs.get("num_classes"))
        if report is not None:
            report(summary)
    if features.pop("features_only", False):
        return feature_extractor(model, **features)
    return model


def timm_vit(arch: str, **timm_kwargs: Any) -> VisionTransformer:
    """`timm.create_model(arch, **timm_kwargs)`, which must be a VisionTransformer (one-line errors)."""
    try:
        model = timm.create_model(arch, **timm_kwargs)
    except (RuntimeError, TypeError) as error:  # unknown name, or arguments this architecture does not take
        raise InputError(f"arch: {arch!r}: {error}") from None
    if not isinstance(model, VisionTransformer):
        raise InputError(f"arch: {arch!r} is a {type(model).__name__}, not a timm VisionTransformer")
    return model


def feature_extractor(model: VisionTransformer, out_indices: int | tuple[int, ...] = 3,
                      feature_cls: str = "getter") -> nn.Module:
    """timm's `features_only` wrapper of a ViT (`FeatureGetterNet` over `forward_intermediates`,
    feature maps of the last `out_indices` blocks, or the blocks listed), as timm builds it."""
    if feature_cls != "getter":
        raise InputError(f"feature_cls: {feature_cls!r}; a ViT's features_only wrapper is 'getter' (FeatureGetterNet)")
    wrapper = FeatureGetterNet(model, out_indices=out_indices)
    wrapper.pretrained_cfg = wrapper.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return wrapper


# ---------------------------------------------------------------------------- reading a source


class PretrainedSource:
    """A checkpoint read into memory: its tensors, what to call it, its layout, and the tokens its
    copies are for (`tokens`: as recorded, else `global`)."""

    def __init__(self, label: str, state: dict[str, torch.Tensor], tokens: str | list[int] | None = None):
        self.label = label
        self.tokens = "global" if tokens is None else tokens
        self.copies = {k: v for k, v in state.items() if COPY_MARK in k}  # a specialized run's global-token copies
        self.shared = {k: v for k, v in state.items() if COPY_MARK not in k}
        head = self.shared.get("head.weight")
        self.num_classes = head.shape[0] if head is not None and head.ndim == 2 else 0
        if self.copies:
            self.layout = "clsvit, specialized"
        elif any(k.endswith((".gamma_1", ".gamma_2")) for k in self.shared):
            self.layout = "official DeiT-III"
        elif "mask_token" in self.shared:
            self.layout = "official DINOv2" + (" with registers" if "register_tokens" in self.shared else "")
        else:
            self.layout = "timm"


def read_pretrained(source: str | Path, arch: str) -> PretrainedSource:
    """The tensors of a pretrained source (file, run or export directory, hf-hub reference, timm
    pretrained name or tag of `arch`)."""
    where = locate_pretrained(source, arch)
    if isinstance(where, Path):
        return PretrainedSource(str(source), _file_state(where), recorded_tokens(where))
    hub_id, filename, label = where
    state = _hub_state(hub_id, filename, label)
    cached = try_to_load_from_cache(hub_id, filename or "model.safetensors")  # the file just read, if safetensors
    return PretrainedSource(label, state, recorded_tokens(cached) if isinstance(cached, str) else None)


def locate_pretrained(source: str | Path, arch: str) -> Path | tuple[str, str | None, str]:
    """Where a pretrained source is, without reading it: a file, or (hub id, file name or None,
    label) on the Hugging Face hub. A source that is none of these is a one-line error."""
    text = str(source)
    if text.startswith("hf-hub:"):
        return text[len("hf-hub:"):], None, text
    path = Path(source)
    if path.is_dir():
        return weights_path(path)
    if path.is_file():
        return path
    name = _timm_pretrained_name(text, arch)
    if name:
        cfg = timm.models.get_pretrained_cfg(name)
        if not cfg.hf_hub_id:
            raise InputError(f"pretrained: timm's {name} weights are not on the Hugging Face hub; "
                             f"download them ({cfg.url}) and pass the file")
        return cfg.hf_hub_id, cfg.hf_hub_filename, f"timm {name}"
    raise InputError(f"pretrained: {text} is not a file, a run directory, an hf-hub: reference or a "
                            f"timm pretrained name/tag of {arch}")


def _timm_pretrained_name(text: str, arch: str) -> str | None:
    """The timm pretrained name `text` is (`NAME.TAG`) or stands for (a tag of `arch`), if timm has it."""
    if "/" in text:
        return None
    name = text if "." in text else f"{timm.models.split_model_name_tag(arch)[0]}.{text}"
    return name if name in timm.list_pretrained(name) else None


def weights_path(path: str | Path) -> Path:
    """A run or export directory or a .safetensors file -> the .safetensors file (one-line error if missing)."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"no model weights at {file}")
    return file


def _file_state(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = timm.models.load_state_dict(str(file), weights_only=True)
    except Exception as error:  # noqa: BLE001 — truncated, not a checkpoint, pickled objects: one line
        raise InputError(f"pretrained: {file} cannot be read as a checkpoint ({type(error).__name__}: "
                         f"{_first_sentence(error)})") from None
    return _tensors(state, str(file))


def _hub_state(hub_id: str, filename: str | None, label: str) -> dict[str, torch.Tensor]:
    try:
        if filename:
            state = timm.models.load_state_dict_from_hf(hub_id, filename)
        else:  # model.safetensors, else pytorch_model.bin
            state = timm.models.load_state_dict_from_hf(hub_id)
    except LocalEntryNotFoundError:
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise InputError(f"pretrained: {label} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                         f"{why}; fetch it once online") from None
    except (EntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise InputError(f"pretrained: {label} cannot be fetched from the Hugging Face hub "
                         f"({_first_sentence(error)})") from None
    return _tensors(state, label)


def _first_sentence(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text.split(". ")[0][:200]


def _tensors(state: Any, label: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not state:
        raise InputError(f"pretrained: {label} holds no state dict (got {type(state).__name__})")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"pretrained: {label} is not a state dict of tensors ({key!r} is a {type(value).__name__})")
    return dict(state)


# ---------------------------------------------------------------------------- loading


def _check_same_tokens(source: PretrainedSource, specialize: Mapping[str, Any] | None) -> None:
    """A checkpoint's copies go to the tokens they were trained for, or nowhere: one line refuses a
    model that gives them to other tokens."""
    if not source.copies or not is_specialized(specialize):
        return  # no copies to load (cloned from the shared weights), or a model without copies (refused later)
    ours = check_tokens(specialize.get("tokens", "global"))
    if source.tokens != ours:
        raise InputError(f"pretrained: {source.label} has copies for tokens {describe_tokens(source.tokens)}, this "
                         f"model for tokens {describe_tokens(ours)} (model.specialize.tokens); build it with tokens "
                         f"{describe_tokens(source.tokens)}, or start from unspecialized weights")


def _load_shared_weights(arch: str, source: PretrainedSource, timm_kwargs: dict) -> VisionTransformer:
    """The timm model with the checkpoint's shared weights, converted and loaded by timm itself
    (built with the checkpoint's class count, so timm loads strictly)."""
    kwargs = {**timm_kwargs, "num_classes": source.num_classes}
    with torch.device("meta"):  # the architecture and the arguments are checked before anything is loaded
        expected = {k: tuple(v.shape) for k, v in timm_vit(arch, **kwargs).state_dict().items()}
    overlay = {"state_dict": source.shared, "num_classes": source.num_classes}
    try:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, ValueError, KeyError) as error:
        raise InputError(f"pretrained: {source.label} does not fit {arch}: "
                         f"{_first_mismatches(source.shared, expected, error)}") from None
    # the weights came from `source`, not from where the architecture's default cfg points
    weights_location = ("state_dict", "url", "file", "hf_hub_id", "hf_hub_filename", "source", "tag")
    model.pretrained_cfg = model.default_cfg = {k: v for k, v in model.pretrained_cfg.items()
                                                if k not in weights_location}
    return model


def _first_mismatches(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], error: Exception,
                      shown: int = 3) -> str:
    """The first keys whose shapes differ between the file and the model, else the first missing and
    unexpected keys (compared before timm's conversion; pos_embed is resizable)."""
    shapes = [f"{key} {tuple(value.shape)} in the file, {expected[key]} in the model" for key, value in state.items()
              if key in expected and key != "pos_embed" and tuple(value.shape) != expected[key]]
    if shapes:
        more = f" (and {len(shapes) - shown} more)" if len(shapes) > shown else ""
        return "; ".join(shapes[:shown]) + more
    depths = [len({key.split(".")[1] for key in keys if key.startswith("blocks.")}) for keys in (state, expected)]
    if depths[0] != depths[1]:
        return f"{depths[0]} blocks in the file, {depths[1]} in the model"
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = [f"{what} {', '.join(keys[:shown])}{' ...' if len(keys) > shown else ''} ({len(keys)})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        return "; ".join(parts)
    return _first_sentence(error)


def _finish_pretrained(model: VisionTransformer, arch: str, source: PretrainedSource, num_classes: int | None) -> str:
    """Load the checkpoint's global-token copies, reset a head of another class count; the summary line."""
    own = model.state_dict()
    stray = [key for key in source.copies if key not in own]
    if stray:
        raise InputError(f"pretrained: {source.label} has global-token copies this model does not "
                         f"({', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''}): its specialization differs "
                         f"from this model's")
    wrong = [f"{key} {tuple(value.shape)} in the file, {tuple(own[key].shape)} in the model"
             for key, value in source.copies.items() if value.shape != own[key].shape]
    if wrong:
        raise InputError(f"pretrained: {source.label} does not fit: {'; '.join(wrong[:3])}")
    if source.copies:
        model.load_state_dict(source.copies, strict=False)
    copies = sum(len(module.global_copy.state_dict()) for module in specialized_modules(model).values())

    fresh_head = num_classes is not None and num_classes != source.num_classes
    head_keys = {f"{name}.{p}" for name in ("head", "head_dist") for p in ("weight", "bias")} if fresh_head else set()
    notes = [f"{sum(key in own and key not in head_keys for key in source.shared)} tensors loaded"]
    converted = [key for key in source.shared if key not in own]
    if converted:
        notes.append(f"{len(converted)} converted by timm's checkpoint filter ({', '.join(converted[:2])}"
                     f"{', ...' if len(converted) > 2 else ''})")
    grid = tuple(model.patch_embed.grid_size)
    old = source.shared.get("pos_embed")
    if old is not None and math.isqrt(old.shape[1]) != grid[0]:
        side = math.isqrt(old.shape[1])
        notes.append(f"pos_embed resized {side}x{side} -> {grid[0]}x{grid[1]}")
    if fresh_head:
        _reset_head(model, num_classes)
        notes.append(f"head left fresh ({source.num_classes} -> {num_classes} classes)")
    loaded = len(source.copies)
    if loaded:
        notes.append(f"{loaded} global-token copies loaded")
    if copies > loaded:
        notes.append(f"{copies - loaded} global-token copies cloned from the shared weights")
    return f"pretrained {source.label} ({source.layout} layout) -> {arch}: " + ", ".join(notes)


def _reset_head(model: VisionTransformer, num_classes: int) -> None:
    """A classifier for `num_classes`, initialised the way timm initialises this model's head."""
    model.reset_classifier(num_classes)
    mode = model.weight_init_mode
    init = get_init_weights_vit(mode, head_bias=-math.log(num_classes) if "nlhb" in mode and num_classes else 0.0)
    heads = model.get_classifier()
    for head in heads if isinstance(heads, tuple) else (heads,):
        named_apply(init, head, name="head")


# ---------------------------------------------------------------------------- recipes and runs


def build_model(model_cfg: Mapping[str, Any], num_classes: int | None = None, *,
                pretrained: str | Path | None = None, report: Callable[[str], Any] | None = print) -> nn.Module:
    """The model a recipe's `model:` section describes, freshly initialised, or initialised from
    `pretrained` (callers pass `model_cfg["pretrained"]`, or a run's own weights)."""
    num_classes = model_cfg["num_classes"] if num_classes is None else num_classes
    if num_classes is None and pretrained is None:
        raise InputError("model.num_classes: unknown; set it or build the model with the dataset's class count")
    try:
        return create_model(
            model_cfg["arch"],
            specialize=model_cfg["specialize"],
            pretrained=pretrained,
            drop_path=model_cfg["drop_path"],
            layerscale_init=model_cfg["layerscale_init"],
            img_size=model_cfg["img_size"],
            num_classes=num_classes,  # None with pretrained weights: the checkpoint's
            reg_tokens=model_cfg["reg_tokens"],  # None keeps the architecture's default
            report=report,
            **model_cfg.get("timm_kwargs", {}),
        )
    except InputError as error:
        raise _naming_the_recipe_key(error) from None


def baseline_model_config(model_cfg: Mapping[str, Any]) -> dict:
    """The recipe's `model` section without specialization: the baseline a run's overhead is counted against."""
    return {**model_cfg, "specialize": dict(NO_SPECIALIZATION)}


def check_pretrained(model_cfg: Mapping[str, Any]) -> None:
    """A recipe's `model.pretrained` that names nothing (no such file or directory, an unknown timm
    tag) is a one-line error, without reading any weights."""
    if model_cfg["pretrained"]:
        try:
            locate_pretrained(model_cfg["pretrained"], model_cfg["arch"])
        except InputError as error:
            raise _naming_the_recipe_key(error) from None


def pretrained_normalisation(source: str | Path, arch: str) -> tuple[str, tuple, tuple] | None:
    """(label, mean, std) of the inputs the weights of a timm pretrained name or tag, or of an
    `hf-hub:timm/NAME` reference, were trained on: timm's pretrained_cfg, read from its registry
    (nothing is downloaded). None for files, run directories and other hub references, which do not
    say."""
    text = str(source)
    if text.startswith("hf-hub:timm/"):
        name = _timm_pretrained_name(text[len("hf-hub:timm/"):], arch)
    else:
        name = None if Path(text).exists() else _timm_pretrained_name(text, arch)
    if name is None:
        return None
    cfg = timm.models.get_pretrained_cfg(name)
    return f"timm {name}", tuple(cfg.mean), tuple(cfg.std)


def normalisation_note(cfg: Mapping[str, Any]) -> str | None:
    """A note when `model.pretrained` is known to have been trained on inputs normalised otherwise than
    the recipe's data.mean / data.std normalise them (timm's augreg ViTs: 0.5 for both)."""
    found = cfg["model"]["pretrained"] and pretrained_normalisation(cfg["model"]["pretrained"], cfg["model"]["arch"])
    if not found:
        return None
    label, mean, std = found
    recipe = tuple(cfg["data"]["mean"]), tuple(cfg["data"]["std"])
    if all(abs(a - b) < 1e-6 for a, b in zip(mean + std, recipe[0] + recipe[1])):
        return None
    return (f"note: {label} was trained on inputs normalised with mean {_override_list(mean)}, std "
            f"{_override_list(std)}, this recipe normalises with data.mean={_override_list(recipe[0])} "
            f"data.std={_override_list(recipe[1])}; set data.mean={_override_list(mean)} "
            f"data.std={_override_list(std)} to feed it as it was trained")


def _override_list(values) -> str:
    """(0.5, 0.5, 0.5) -> "[0.5,0.5,0.5]", as a command-line override takes it."""
    return "[" + ",".join(f"{v:g}" for v in values) + "]"


def _naming_the_recipe_key(error: Exception) -> Exception:
    """"qkv: ..." -> "model.specialize.qkv: ...", "pretrained: ..." -> "model.pretrained: ..."."""
    key, _, rest = str(error).partition(": ")
    if key in OPTIONS:
        return type(error)(f"model.specialize.{key}: {rest}")
    if key in ("arch", "drop_path", "pretrained"):
        return type(error)(f"model.{key}: {rest}")
    return error
