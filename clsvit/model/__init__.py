"""Specialized timm Vision Transformers: the specialization itself (`specialization`), building
and loading models from recipes and from the weights of runs and public checkpoints (`loading`), and their twins in timm's
model registry (`registry`)."""

from clsvit.model.specialization import (
    COMPONENTS,
    INITS,
    NO_SPECIALIZATION,
    OPTIONS,
    PAPER_DEFAULT,
    TOKEN_GROUPS,
    GlobalTokenLayerScale,
    GlobalTokenSplit,
    block_indices,
    check_tokens,
    describe_specialization,
    describe_tokens,
    is_specialized,
    specialize,
    specialized_modules,
    specialized_tokens,
    split_class,
    token_rows,
)
from clsvit.model.loading import (  # noqa: I001 — after specialization, which it imports
    TOKENS_METADATA,
    baseline_model_config,
    build_model,
    check_pretrained,
    count_parameters,
    create_model,
    feature_extractor,
    locate_pretrained,
    normalisation_note,
    param_overhead_pct,
    pretrained_normalisation,
    read_pretrained,
    recorded_tokens,
    set_uniform_drop_path,
    timm_vit,
    tokens_metadata,
    weights_path,
)
from clsvit.model.registry import paper_default_for, specialized_name  # registers the twins in timm

__all__ = [
    "COMPONENTS", "INITS", "NO_SPECIALIZATION", "OPTIONS", "PAPER_DEFAULT", "TOKEN_GROUPS", "TOKENS_METADATA",
    "GlobalTokenLayerScale",
    "GlobalTokenSplit", "baseline_model_config", "block_indices", "build_model", "check_pretrained", "check_tokens",
    "count_parameters", "create_model",
    "describe_specialization", "describe_tokens", "feature_extractor", "is_specialized", "locate_pretrained",
    "normalisation_note", "paper_default_for", "param_overhead_pct", "pretrained_normalisation",
    "read_pretrained", "recorded_tokens", "set_uniform_drop_path", "specialize", "specialized_modules",
    "specialized_name", "specialized_tokens", "split_class", "timm_vit", "token_rows", "tokens_metadata",
    "weights_path",
]
