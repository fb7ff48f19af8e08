"""clsvit: DeiT-III training recipes for baseline and [CLS]/patch-specialized Vision Transformers.

Importing clsvit registers the specialized twins of timm's ViTs in timm's model registry
(`timm.list_models("*_clsvit")`; see clsvit.model.registry).
"""

from clsvit.model import COMPONENTS, PAPER_DEFAULT, create_model, specialize

__all__ = ["COMPONENTS", "PAPER_DEFAULT", "create_model", "specialize"]
