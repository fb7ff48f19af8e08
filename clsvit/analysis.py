"""The paper's [CLS]/patch token analysis, per block, via forward hooks (arXiv 2602.08626, §3).

Four sites per block ``blk`` of a timm VisionTransformer (a pre-norm block computes
``x1 = x + ls1(attn(norm1(x)))``, ``out = x1 + ls2(mlp(norm2(x1)))``):

  input      x, the block input (residual stream)          - forward pre-hook on ``blk``
  norm1      norm1(x), what attention sees                 - forward hook on ``blk.norm1``
  pre_norm2  x1, the residual stream after attention       - forward pre-hook on ``blk.norm2``
  norm2      norm2(x1), what the MLP sees                  - forward hook on ``blk.norm2``

At each site: the mean cosine similarity [CLS]–patch and patch–patch (the paper: after norm1 the
first drops to ~0 while the second stays positive, the norm separates token types), and the
dimension-separation statistic: per channel c, r_c = mean |[CLS]_c| / mean |patch_c| (means over
images, and over patches); the shares of channels with r_c > 10 ([CLS]-dominant) and r_c < 1/10
(patch-dominant). Comparing `input` with `norm1` (and `pre_norm2` with `norm2`) shows what the norm
does with them. Only [CLS] (token 0) is compared; register tokens are neither [CLS] nor patches.

Also PCA maps of the last-layer patch features (first 3 components as RGB) and the plots.
"""

from __future__ import annotations

from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or under accelerate launch
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import reduce  # noqa: E402
from torch import nn  # noqa: E402

from clsvit.errors import InputError  # noqa: E402

SITES = ("input", "norm1", "pre_norm2", "norm2")
SEPARATION_FACTOR = 10.0  # "beyond 10x in each direction"


@contextmanager
def hooked_sites(model: nn.Module, callback):
    """Call ``callback(block_index, site, tokens [B, T, C])`` at every site while the context is open."""
    handles = []
    for index, block in enumerate(model.blocks):
        handles += [
            block.register_forward_pre_hook(lambda m, args, i=index: callback(i, "input", args[0])),
            block.norm1.register_forward_hook(lambda m, args, out, i=index: callback(i, "norm1", out)),
            block.norm2.register_forward_pre_hook(lambda m, args, i=index: callback(i, "pre_norm2", args[0])),
            block.norm2.register_forward_hook(lambda m, args, out, i=index: callback(i, "norm2", out)),
        ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def cls_patch_cosine(tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Per image: mean over patches of cos([CLS], patch). [B, T, C] -> [B]."""
    cls = F.normalize(tokens[:, 0].double(), dim=-1)
    patches = F.normalize(tokens[:, num_prefix_tokens:].double(), dim=-1)
    return torch.einsum("bc,bnc->bn", cls, patches).mean(1)


def patch_patch_cosine(tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Per image: mean of cos(patch_i, patch_j) over ordered pairs i != j. [B, T, C] -> [B].

    With unit vectors u_i, sum_{i != j} u_i·u_j = |sum_i u_i|^2 - N: linear in N, not quadratic.
    """
    patches = F.normalize(tokens[:, num_prefix_tokens:].double(), dim=-1)
    n = patches.shape[1]
    return (patches.sum(1).pow(2).sum(-1) - n) / (n * (n - 1))


class TokenStatistics:
    """Sums over images of the per-site statistics; ``result()`` sums them over processes and averages."""

    def __init__(self, depth: int, channels: int, num_prefix_tokens: int, device):
        shape = (depth, len(SITES))
        self.num_prefix_tokens = num_prefix_tokens
        self.cos_cls_patch = torch.zeros(shape, dtype=torch.float64, device=device)
        self.cos_patch_patch = torch.zeros(shape, dtype=torch.float64, device=device)
        self.cls_abs = torch.zeros(*shape, channels, dtype=torch.float64, device=device)
        self.patch_abs = torch.zeros(*shape, channels, dtype=torch.float64, device=device)
        self.images = torch.zeros(shape, dtype=torch.float64, device=device)

    def update(self, block: int, site: str, tokens: torch.Tensor) -> None:
        s, npt = SITES.index(site), self.num_prefix_tokens
        self.cos_cls_patch[block, s] += cls_patch_cosine(tokens, npt).sum()
        self.cos_patch_patch[block, s] += patch_patch_cosine(tokens, npt).sum()
        self.cls_abs[block, s] += tokens[:, 0].double().abs().sum(0)
        self.patch_abs[block, s] += tokens[:, npt:].double().abs().mean(1).sum(0)
        self.images[block, s] += tokens.shape[0]

    def result(self) -> dict[str, dict[str, list[float]]]:
        """{statistic: {site: [value per block]}}, over all processes' images."""
        sums = {name: getattr(self, name) for name in ("cos_cls_patch", "cos_patch_patch", "cls_abs",
                                                        "patch_abs", "images")}
        if PartialState().num_processes > 1:
            sums = {name: reduce(value, reduction="sum") for name, value in sums.items()}
        images = sums["images"].clamp_min(1)
        ratio = sums["cls_abs"] / sums["patch_abs"].clamp_min(1e-30)  # per channel, image counts cancel
        stats = {
            "cos_cls_patch": sums["cos_cls_patch"] / images,
            "cos_patch_patch": sums["cos_patch_patch"] / images,
            "cls_dominant_dims": (ratio > SEPARATION_FACTOR).double().mean(-1),
            "patch_dominant_dims": (ratio < 1 / SEPARATION_FACTOR).double().mean(-1),
        }
        return {name: {site: value[:, s].tolist() for s, site in enumerate(SITES)} for name, value in stats.items()}


def analyze_tokens(model: nn.Module, batches) -> dict[str, dict[str, list[float]]]:
    """Run `batches` (image tensors) through the frozen model and return the per-block statistics.

    Each process passes its own share of images; the result covers all of them.
    """
    device = PartialState().device
    npt = model.num_prefix_tokens
    if npt < 1 or getattr(model, "cls_token", None) is None:
        raise InputError("analysis needs a model with a [CLS] token (model.cls_token is None)")
    stats = TokenStatistics(len(model.blocks), model.embed_dim, npt, device)

    def record(block: int, site: str, tokens: torch.Tensor) -> None:
        if tokens.dim() != 3 or tokens.shape[1] <= npt:
            raise ValueError(f"analysis: block {block} {site} saw a tensor of shape {tuple(tokens.shape)}, "
                             "expected [batch, prefix + patch tokens, channels]")
        stats.update(block, site, tokens)

    model.eval()
    with torch.inference_mode(), hooked_sites(model, record):
        for images in batches:
            model.forward_features(images.to(device))
    return stats.result()


# ----------------------------------------------------------------------------- PCA maps


def pca_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """First 3 principal components of the final-norm'd patch features, as RGB in [0, 1].

    One PCA over the patches of all `images` together (so colours are comparable across images),
    each component min-max scaled. [n, 3, H, W] -> [n, 3, h, w] on the patch grid.
    """
    model.eval()
    with torch.inference_mode():
        (features,) = model.forward_intermediates(images, indices=1, norm=True, output_fmt="NCHW",
                                                  intermediates_only=True)
    n, channels, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, channels).double()
    flat = flat - flat.mean(0)
    _, _, components = torch.linalg.svd(flat, full_matrices=False)
    projected = flat @ components[:3].T
    if projected.shape[1] < 3:  # fewer than 3 non-trivial directions: pad with zeros
        projected = F.pad(projected, (0, 3 - projected.shape[1]))
    low, high = projected.min(0).values, projected.max(0).values
    projected = (projected - low) / (high - low).clamp_min(1e-12)
    return projected.reshape(n, h, w, 3).permute(0, 3, 1, 2).float()


def _display(image: torch.Tensor) -> np.ndarray:
    """A normalised image tensor [3, H, W] -> HWC in [0, 1] (per-image min-max; no mean/std needed)."""
    image = image.detach().float().cpu()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    return image.permute(1, 2, 0).numpy()


def pca_grid(images: torch.Tensor, maps: torch.Tensor, min_side: int = 128) -> np.ndarray:
    """Images on the top row, their PCA maps (nearest-upsampled to image size) below: uint8 HWC,
    enlarged by an integer factor so that each tile is at least `min_side` pixels high."""
    maps = F.interpolate(maps.cpu(), size=images.shape[-2:], mode="nearest")
    top = np.concatenate([_display(im) for im in images], axis=1)
    bottom = np.concatenate([m.permute(1, 2, 0).numpy() for m in maps], axis=1)
    grid = np.concatenate([top, bottom], axis=0)
    scale = max(1, min_side // images.shape[-2])  # small images (shapes: 64 px) are hard to see
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return (grid * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------- plots

_TITLES = {
    "cos_cls_patch": "cos([CLS], patch)",
    "cos_patch_patch": "cos(patch, patch)",
    "cls_dominant_dims": "share of dims |[CLS]| > 10x |patch|",
    "patch_dominant_dims": "share of dims |patch| > 10x |[CLS]|",
}


def plot_token_statistics(stats: dict[str, dict[str, list[float]]], title: str = "") -> plt.Figure:
    """One panel per statistic, one line per site across depth. Caller saves / logs and closes it."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), constrained_layout=True)
    axes = axes.ravel()
    for ax, (name, label) in zip(axes, _TITLES.items()):
        for site, values in stats[name].items():
            ax.plot(range(len(values)), values, marker="o", markersize=3, label=site)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
