"""clsvit: DeiT-III training recipes for baseline and [CLS]/patch-specialized Vision Transformers.

The model API is imported lazily, so `clsvit.config` (recipe errors at launch) loads without torch/timm.
"""

__all__ = ["COMPONENTS", "PAPER_DEFAULT", "create_model", "specialize"]


def __getattr__(name):
    if name in __all__:
        from clsvit import model
        return getattr(model, name)
    raise AttributeError(f"module 'clsvit' has no attribute {name!r}")
