"""Tiny timm ViTs and runs with random weights of a realistic scale, shared by the model tests."""

from pathlib import Path

import timm
import torch
from torch import nn

from clsvit.checkpoint import save_weights
from clsvit.config import DEFAULT_RECIPE, load_config, save_config
from clsvit.model import build_model

TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2}


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights of a realistic scale, different in every module. timm's own init makes every
    LayerNorm 1/0 and DeiT-III's LayerScale 1e-6, which would hide a copy applied in the wrong place
    (and make every block nearly the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:  # Linear / conv weights, cls/reg tokens, pos_embed
                param.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("gamma"):  # LayerScale
                param.uniform_(0.2, 0.6, generator=generator)
            elif name.endswith("weight"):  # LayerNorm scale
                param.normal_(1.0, 0.1, generator=generator)
            else:  # biases
                param.normal_(0.0, 0.05, generator=generator)
    return model


def random_timm_model(arch: str, **kwargs) -> nn.Module:
    """A full-size timm model with random weights, built on the meta device (timm's trunc-normal
    init of ViT-L's 300M parameters alone takes ~15 s on two cores)."""
    with torch.device("meta"):
        model = timm.create_model(arch, **kwargs)
    assert not list(model.buffers())  # to_empty() would leave buffers uninitialised
    return randomize_(model.to_empty(device="cpu"))


def tiny_vit(arch: str = "deit3_small_patch16_224", seed: int = 0, **kwargs) -> nn.Module:
    kwargs = {"img_size": 32, "embed_dim": 64, "depth": 4, "num_heads": 2, "num_classes": 10,
              "init_values": 0.1, **kwargs}
    return randomize_(timm.create_model(arch, **kwargs), seed)


def images(size: int = 32, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def make_run(run_dir: Path, specialize: dict, seed: int, overrides: tuple[str, ...] = ()) -> tuple[torch.nn.Module, dict]:
    """A run directory as train.py leaves it (config.yaml + model.safetensors), random weights."""
    overrides = ["model.img_size=32", "model.num_classes=10", "model.timm_kwargs={embed_dim: 32, depth: 3, num_heads: 2}",
                 f"run.name={run_dir.name}", *(f"model.specialize.{key}={value}" for key, value in specialize.items()),
                 *overrides]
    cfg = load_config(DEFAULT_RECIPE, overrides)
    model = randomize_(build_model(cfg["model"]), seed).eval()  # the copies differ from the shared weights
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    save_weights(model, run_dir / "model.safetensors")
    return model, cfg
