"""The DeiT-III training ingredients, each built from the recipe with timm.

Nothing here is re-implemented: LAMB/AdamW, the per-step cosine schedule, Mixup/CutMix and the
losses are timm's. What lives here is the mapping from recipe keys to timm arguments, including
the two settings that silently break the reference recipe if left at timm's defaults:
Mixup's label smoothing (timm: 0.1; with BCE's `target > 0` binarisation every target would
become 1) and the schedule's min_lr (timm: 0; DeiT-III: 1e-5).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from torch import nn


def build_optimizer(model: nn.Module, optim_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """LAMB (DeiT-III) or AdamW (fine-tuning). timm puts 1-D parameters (norms, biases, LayerScale,
    every such global-token copy) and `model.no_weight_decay()` (pos_embed, cls/reg tokens) into a
    group without weight decay. timm's LAMB clips the global gradient norm at 1.0 internally."""
    return create_optimizer_v2(
        model,
        opt=optim_cfg["name"],
        lr=optim_cfg["lr"],
        weight_decay=optim_cfg["weight_decay"],
        betas=tuple(optim_cfg["betas"]),
        eps=optim_cfg["eps"],
    )


def build_scheduler(optimizer: torch.optim.Optimizer, schedule_cfg: Mapping[str, Any],
                    steps_per_epoch: int) -> Scheduler:
    """A per-optimizer-step schedule: linear warmup from `warmup_lr`, then cosine to `min_lr`
    (or constant: timm's step schedule with a decay rate of 1). Call `step_update(step)`."""
    constant = schedule_cfg["name"] == "constant"
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="step" if constant else "cosine",
        num_epochs=schedule_cfg["epochs"],
        decay_epochs=schedule_cfg["epochs"] + 1,  # only read by the step schedule: never decays
        decay_rate=1.0,
        min_lr=schedule_cfg["min_lr"],
        warmup_lr=schedule_cfg["warmup_lr"],
        warmup_epochs=schedule_cfg["warmup_epochs"],
        cooldown_epochs=0,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def build_mixup(aug_cfg: Mapping[str, Any], num_classes: int) -> Mixup | None:
    """Batch-wise Mixup/CutMix (needs drop_last). Returns None when both alphas are 0; then the
    labels are turned into one-hot targets by `one_hot_targets`."""
    if aug_cfg["mixup"] <= 0 and aug_cfg["cutmix"] <= 0:
        return None
    return Mixup(
        mixup_alpha=aug_cfg["mixup"],
        cutmix_alpha=aug_cfg["cutmix"],
        prob=aug_cfg["mix_prob"],
        switch_prob=aug_cfg["switch_prob"],
        mode="batch",
        label_smoothing=aug_cfg["label_smoothing"],
        num_classes=num_classes,
    )


def one_hot_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Targets when no mixing is applied, with the same smoothing convention as timm's Mixup."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def build_loss(train_cfg: Mapping[str, Any]) -> nn.Module:
    """DeiT-III: BCE on mixed targets binarised with `target > threshold` (no smoothing).
    Fine-tuning: soft-target cross-entropy on the (smoothed, mixed) targets."""
    if train_cfg["loss"] == "bce":
        return BinaryCrossEntropy(smoothing=0.0, target_threshold=train_cfg["bce_threshold"])
    return SoftTargetCrossEntropy()
