"""Specialized ViTs in timm's model registry, registered when clsvit is imported.

Every timm VisionTransformer architecture `NAME` (timm's `vision_transformer`, `deit` and
`vision_transformer_hybrid` modules) gets a specialized twin `NAME_clsvit`:

    import clsvit, timm
    timm.list_models("*_clsvit")                                    # the twins
    timm.create_model("deit3_small_patch16_224_clsvit")             # the paper default, clone init
    timm.create_model("deit3_small_patch16_224_clsvit", specialize={"norm": 1.0, "qkv": [0, 1]})
    timm.create_model("vit_small_patch14_reg4_dinov2_clsvit", specialize={**clsvit.PAPER_DEFAULT, "tokens": "cls"})
    timm.create_model("local-dir:exports/vit_s", pretrained=True)  # a `python -m clsvit.export` directory
    timm.create_model("hf-hub:USER/REPO", pretrained=True)          # the same, pushed to the hub

A twin takes the base architecture's arguments plus `specialize` (the keyword arguments of
`clsvit.specialize`; default: the paper's configuration, without LayerScale copies where the
architecture has no LayerScale). Its pretrained weights load with timm's `load_pretrained` and
timm's VisionTransformer `checkpoint_filter_fn` (timm's layout, as exports and timm's hub weights
are; `NAME_clsvit.TAG` retrofits timm's `NAME.TAG` weights); the global-token copies a checkpoint
lacks are cloned from its shared weights. The suffix keeps a twin in its family for timm's own
name patterns (`vit_*`, `deit*`), which is how timm's tests/test_models.py picks its tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import timm
from timm.models import get_pretrained_cfg, load_pretrained, model_entrypoint, register_model
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from clsvit.model.loading import feature_extractor
from clsvit.model.specialization import PAPER_DEFAULT, specialize as _specialize

SUFFIX = "_clsvit"
BASE_MODULES = ("vision_transformer", "deit", "vision_transformer_hybrid")

default_cfgs: dict[str, dict[str, Any]] = {}  # read by timm's register_model: each twin's pretrained cfg


def specialized_name(arch: str) -> str:
    """The registered twin of a timm architecture name (a pretrained tag is dropped)."""
    return timm.models.split_model_name_tag(arch)[0] + SUFFIX


def paper_default_for(model: nn.Module) -> dict[str, Any]:
    """The paper's configuration, without LayerScale copies if the architecture has no LayerScale."""
    has_layerscale = not isinstance(getattr(model.blocks[0], "ls1", nn.Identity()), nn.Identity)
    return {**PAPER_DEFAULT, "layerscale": PAPER_DEFAULT["layerscale"] if has_layerscale else 0.0}


def _twin(base: str, name: str) -> Callable[..., nn.Module]:
    base_entrypoint = model_entrypoint(base)

    def entrypoint(pretrained: bool = False, *, specialize: Mapping[str, Any] | None = None,
                   **kwargs: Any) -> nn.Module:
        features = {key: kwargs.pop(key) for key in ("features_only", "out_indices", "feature_cls") if key in kwargs}
        kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or get_pretrained_cfg(name)
        model = base_entrypoint(pretrained=False, **kwargs)
        _specialize(model, **(paper_default_for(model) if specialize is None else dict(specialize)))
        if pretrained:
            load_pretrained(model, pretrained_cfg=model.pretrained_cfg, num_classes=model.num_classes,
                            in_chans=kwargs.get("in_chans", 3), filter_fn=checkpoint_filter_fn,
                            cache_dir=kwargs.get("cache_dir"))
        if features.pop("features_only", False):
            return feature_extractor(model, **features)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"timm's {base}, specialized by clsvit (default: the paper's configuration)."
    return entrypoint


def _register() -> None:
    for base in timm.list_models(module=BASE_MODULES):
        name = base + SUFFIX
        cfg = get_pretrained_cfg(base)
        if cfg is not None:  # the base's default pretrained cfg (input size, mean/std, ...) without its weights
            default_cfgs[name] = dataclasses.asdict(dataclasses.replace(
                cfg, url="", file=None, state_dict=None, hf_hub_id=None, hf_hub_filename=None, source=None,
                architecture=None, tag=None, custom_load=False))
        entrypoint = _twin(base, name)
        globals()[name] = entrypoint
        register_model(entrypoint)


_register()
