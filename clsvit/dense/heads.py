"""What the dense protocols train: their linear heads, losses and learning-rate schedules (sources in
protocols.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clsvit.dense.protocols import Settings
from clsvit.dense.transforms import IGNORE_INDEX
from clsvit.errors import InputError


def _init_conv(conv: nn.Conv2d, normal: bool) -> None:
    if normal:  # both references' linear heads: N(0, 0.01) weights, zero bias
        nn.init.normal_(conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(conv.bias)


class LinearSegHead(nn.Module):
    """[Dropout2d] -> BatchNorm2d -> 1x1 conv to class logits, bilinearly resized to the label size."""

    def __init__(self, in_channels: int, num_classes: int, settings: Settings):
        super().__init__()
        self.dropout = nn.Dropout2d(settings.dropout) if settings.dropout > 0 else nn.Identity()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        _init_conv(self.conv, settings.normal_init)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.conv(self.bn(self.dropout(features)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def depth_bin_centres(n_bins: int, min_depth: float, max_depth: float, spacing: str) -> torch.Tensor:
    """`n_bins` depths from min to max, evenly spaced in depth (linear, DINOv2's "UD") or in log-depth."""
    if spacing == "linear":
        return torch.linspace(min_depth, max_depth, n_bins)
    if spacing == "log":
        return torch.exp(torch.linspace(math.log(min_depth), math.log(max_depth), n_bins))
    raise InputError(f"eval.depth.bin_spacing must be linear or log, got {spacing!r}")


class LinearDepthHead(nn.Module):
    """[x`upsample` bilinear] -> [BatchNorm2d] -> 1x1 conv to depth-bin scores; depth = sum_k w_k c_k
    with w = (relu(scores) + 0.1) normalised to sum 1 (AdaBins' "linear" norm, both references), so the
    prediction is a convex combination of the bin centres; resized bilinearly to the target size.

    Without BatchNorm the conv runs before the upsampling: a 1x1 conv and a bilinear resize (whose
    weights sum to 1 at every output pixel) commute, so the scores are the reference's for
    upsample² times fewer multiply-adds."""

    def __init__(self, in_channels: int, bin_centres: torch.Tensor, settings: Settings):
        super().__init__()
        self.upsample = settings.upsample
        self.bn = nn.BatchNorm2d(in_channels) if settings.batchnorm else nn.Identity()
        self.conv = nn.Conv2d(in_channels, len(bin_centres), kernel_size=1)
        _init_conv(self.conv, settings.normal_init)
        self.register_buffer("bin_centres", bin_centres.float())
        self.min_depth, self.max_depth = settings.min_depth, settings.max_depth

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Bin scores at the upsampled resolution."""
        if self.upsample == 1:
            return self.conv(self.bn(features))
        if isinstance(self.bn, nn.Identity):
            return self._up(self.conv(features))
        return self.conv(self.bn(self._up(features)))  # BatchNorm's batch statistics see the upsampled map

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        weights = torch.relu(self.scores(features)) + 0.1
        depth = (weights * self.bin_centres[:, None, None]).sum(1, keepdim=True) / weights.sum(1, keepdim=True)
        if not self.training:
            depth = depth.clamp(self.min_depth, self.max_depth)
        return F.interpolate(depth, size=size, mode="bilinear", align_corners=False)


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over ALL pixels of the batch, ignored ones counting 0 (mmseg's and DINOv3's
    ``avg_non_ignore=False``: a crop that is mostly padding weighs less)."""
    return F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction="none").mean()


def sig_loss(pred: torch.Tensor, target: torch.Tensor, step: int = 0, warmup: int = 0, eps: float = 1e-3) -> torch.Tensor:
    """Scale-invariant log loss (SigLoss) over the pixels with target > 0 of the whole batch:
    g = log(pred + eps) - log(target + eps), loss = sqrt(Var(g) + 0.15 mean(g)^2) (unbiased variance);
    during the first `warmup` steps only sqrt(0.15 mean(g)^2) (DINOv3's SigLoss warm-up)."""
    valid = target > 0
    g = torch.log(pred[valid] + eps) - torch.log(target[valid] + eps)
    if g.numel() < 2:  # nothing (or a single pixel) to compare: no gradient signal
        return pred.sum() * 0.0
    mean_term = 0.15 * g.mean() ** 2
    if step < warmup:
        return torch.sqrt(mean_term)
    return torch.sqrt(torch.var(g) + mean_term)


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def lr_at(step: int, settings: Settings) -> tuple[float, float | None]:
    """(learning rate, Adam beta1 or None = unchanged) for optimizer step `step` (0-based).

    ``poly``: mmcv's poly(1.0) to 0 with linear warmup from warmup_ratio x lr. ``one_cycle``: mmcv's
    OneCycle, cosine from lr/25 up to lr over the first warmup_iters steps, then down to lr/25/final_div.
    ``warmup_one_cycle``: DINOv3's WarmupOneCycleLR (schedulers.py:92-124) as its training loops step it
    (the segmentation loop skips its first scheduler step, ``schedule_offset``), including its beta1
    cycling for depth (0 during warmup, then 0.85 -> 0.95).
    """
    T, W, lr = settings.iterations, settings.warmup_iters, settings.lr
    if settings.schedule == "poly":
        regular = lr * (1 - step / T)
        if step < W:
            return regular * (1 - (1 - step / W) * (1 - settings.warmup_ratio)), None
        return regular, None
    if settings.schedule == "one_cycle":
        initial = lr * settings.warmup_ratio
        peak = W - 1
        if step <= peak and peak > 0:
            return _cos(initial, lr, step / peak), None
        return _cos(lr, initial / settings.final_div, (step - peak) / max(T - 1 - peak, 1)), None
    n = max(step - settings.schedule_offset, 0)
    beta1 = 0.0
    if n < W:
        if settings.warmup_ratio:
            k = (1 - n / W) * (1 - settings.warmup_ratio)
            value = lr * (1 - k) * (1 - n / T)
        else:
            value = lr / settings.final_div + lr * (1 + math.cos(math.pi * n / T)) / 2 * n / W
    else:
        beta1 = _cos(0.85, 0.95, (n - W) / (T - W))
        value = _cos(lr, lr / 25 / settings.final_div, (n + 1) / T)
    return value, (beta1 if settings.cycle_beta1 else None)
