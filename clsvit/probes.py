"""Linear probes on frozen ViT patch features: semantic segmentation (mIoU) and depth (RMSE).

The paper's claim is about dense features, measured the DINOv2/DINOv3 way: the backbone is frozen,
only a linear head (BatchNorm2d + 1x1 conv) is trained on its patch tokens, so the score reflects what
the features already contain. Everything a dataset provides is a map-style dataset of dicts
``{"image": float [3, H, W] (normalised), "mask": int64 [H, W] (255 = ignore), "depth": float [H, W]
(metres, 0 = invalid)}`` (``clsvit.data.DenseDataset``); images may differ in size.

Two ways to feed the head (``cache_features``): online, as the ADE20k protocol does (every step
draws fresh random crops + flips and extracts their features; mmseg's random rescaling and
photometric distortion are not reproduced), or cached (features of a fixed train subset are
extracted once, without augmentation, and the head takes many cheap steps on them: the CPU default
for the embedded dataset, where the backbone forward dominates).

Multi-process (``accelerate launch``): every process draws the same global plan of training crops,
extracts features for its share only, and the shares are gathered (and put back into plan order), so
the head is trained on exactly the single-process batches, identically on every rank; the head of
rank 0 is then broadcast so all ranks evaluate the same weights. Validation images are sharded without
padding and the metric states (torchmetrics) are summed across processes, so the numbers are those of
a single process. Gathering features instead of wrapping the head in DDP keeps the loss the mean over
all valid pixels of the global batch (DDP would average per-rank means, which differ when ranks hold
different numbers of ignore pixels).
"""

from __future__ import annotations

import copy
import math
from dataclasses import MISSING, dataclass, fields

import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import broadcast, gather
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassJaccardIndex

IGNORE_INDEX = 255
PAD_VALUES = {"image": 0.0, "mask": IGNORE_INDEX, "depth": 0.0}  # padding never counts as a target


@dataclass
class ProbeSettings:
    """The probe hyper-parameters shared by ``eval.seg`` and ``eval.depth`` (see recipes/default.yaml)."""

    resolution: int  # training crop side and slide-window side, in pixels
    layers: int  # patch tokens of the last n blocks, concatenated (1 = DINOv2 "linear", 4 = "linear4")
    iterations: int  # optimizer steps of the head
    batch_size: int  # global crops per step, over all processes
    lr: float  # AdamW peak learning rate
    weight_decay: float  # AdamW weight decay
    warmup_iters: int  # linear warmup steps, then linear (poly 1.0) decay to 0
    slide_stride: int  # slide-window stride for validation images larger than `resolution`
    eval_batch_size: int  # images per forward pass per process (validation, feature cache)
    max_val_images: int  # validate on the first n images; 0 = whole split
    num_workers: int  # DataLoader workers per process
    cache_features: bool = False  # extract features of a fixed train subset once, no augmentation
    max_train_images: int = 0  # size of that subset; 0 = whole train split

    @classmethod
    def from_config(cls, section: dict, name: str) -> "ProbeSettings":
        """Pick this class's fields out of a config section; `name` (e.g. eval.seg) names it in errors."""
        missing = [f.name for f in fields(cls) if f.name not in section and f.default is MISSING]
        if missing:
            raise ValueError(f"{name}: missing probe key(s) {', '.join(missing)}")
        settings = cls(**{f.name: section[f.name] for f in fields(cls) if f.name in section})
        for key in ("resolution", "layers", "iterations", "batch_size", "slide_stride", "eval_batch_size"):
            if int(getattr(settings, key)) < 1:
                raise ValueError(f"{name}.{key} must be >= 1, got {getattr(settings, key)}")
        return settings


# ----------------------------------------------------------------------------- features


def patch_features(backbone: nn.Module, images: torch.Tensor, layers: int) -> torch.Tensor:
    """Final-norm'd patch tokens of the last `layers` blocks, concatenated on channels: [B, C*layers, h, w].

    ``no_grad`` rather than ``inference_mode``: inference tensors cannot be saved for the head's backward.
    """
    with torch.no_grad():
        maps = backbone.forward_intermediates(
            images, indices=layers, norm=True, output_fmt="NCHW", intermediates_only=True
        )
    return torch.cat(maps, dim=1)


def backbone_at_resolution(backbone: nn.Module, resolution: int) -> nn.Module:
    """The frozen backbone, eval mode, taking `resolution`² inputs (a resized copy if it differs).

    timm ViTs are built for one input size; the probe resolution (ADE20k: 512) usually differs from
    the training one, so a copy gets its position embeddings resampled (``set_input_size``) and the
    caller's weights stay untouched (without a copy, the model itself is frozen and moved).
    """
    patch_embed = getattr(backbone, "patch_embed", None)
    current = tuple(getattr(patch_embed, "img_size", None) or ())
    if current and current != (resolution, resolution) and not getattr(backbone, "dynamic_img_size", False):
        backbone = copy.deepcopy(backbone)
        backbone.set_input_size(img_size=(resolution, resolution))
    backbone.to(PartialState().device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


# ----------------------------------------------------------------------------- heads and loss


class LinearSegHead(nn.Module):
    """BatchNorm2d + 1x1 conv to class logits, bilinearly upsampled to the label size (DINOv2 "linear")."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.conv(self.bn(features))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def depth_bin_centres(n_bins: int, min_depth: float, max_depth: float, spacing: str) -> torch.Tensor:
    """`n_bins` depth values from min to max, evenly spaced in depth (linear) or in log-depth (log)."""
    if spacing == "linear":
        return torch.linspace(min_depth, max_depth, n_bins)
    if spacing == "log":
        return torch.exp(torch.linspace(math.log(min_depth), math.log(max_depth), n_bins))
    raise ValueError(f"eval.depth.bin_spacing must be linear or log, got {spacing!r}")


class LinearDepthHead(nn.Module):
    """BatchNorm2d + 1x1 conv to depth-bin scores; depth = sum_k w_k * centre_k, upsampled bilinearly.

    The weights are relu(scores) + eps normalised to sum 1 (DINOv2's softmax-free "linear" norm
    strategy, eps = 0.1), so the prediction always lies between the first and the last bin centre.
    """

    def __init__(self, in_channels: int, bin_centres: torch.Tensor, eps: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, len(bin_centres), kernel_size=1)
        self.register_buffer("bin_centres", bin_centres.float())
        self.eps = eps

    def forward(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        weights = torch.relu(self.conv(self.bn(features))) + self.eps
        weights = weights / weights.sum(dim=1, keepdim=True)
        depth = torch.einsum("bkhw,k->bhw", weights, self.bin_centres).unsqueeze(1)
        return F.interpolate(depth, size=size, mode="bilinear", align_corners=False).squeeze(1)


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels (255 ignored); 0, not nan, when there are none."""
    total = F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (mask != IGNORE_INDEX).sum().clamp_min(1)


def sig_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al. 2014) as DINOv2's depth heads compute it (SigLoss).

    Over the valid pixels (target > 0) of the whole batch, with g = log(pred + eps) - log(target + eps):
        loss = sqrt( Var(g) + 0.15 * mean(g)^2 )
    i.e. sqrt(mean(g^2) - 0.85 * mean(g)^2) up to Var's n/(n-1): lambda = 0.85 lets a global scale
    error cost only 15 % of its squared log, so the head spends its capacity on relative depth.
    """
    valid = target > 0
    g = torch.log(pred[valid] + eps) - torch.log(target[valid] + eps)
    if g.numel() < 2:  # nothing (or a single pixel) to compare: no gradient signal
        return pred.sum() * 0.0
    return torch.sqrt(torch.var(g) + 0.15 * g.mean() ** 2)


# ----------------------------------------------------------------------------- metrics


def miou_metric(num_classes: int) -> MulticlassJaccardIndex:
    """mIoU of the protocol: per-class intersection / union summed over the whole split, then the mean
    over classes present in prediction or target (torchmetrics drops classes whose confusion row and
    column are both empty, the nan-mean of mmseg; a class only predicted counts with IoU 0).
    Pixels labelled 255 are ignored. The confusion matrix is summed across processes on compute().
    """
    return MulticlassJaccardIndex(num_classes=num_classes, ignore_index=IGNORE_INDEX, average="macro")


def per_image_depth_errors(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """RMSE (metres), abs-rel and delta<1.25 of each image over its valid pixels (target > 0).

    Returns tensors of shape [n] for the n images that have at least one valid pixel.
    """
    valid = target > 0
    count = valid.flatten(1).sum(1)
    keep = count > 0
    safe_target = torch.where(valid, target, torch.ones_like(target))
    squared = torch.where(valid, (pred - target) ** 2, 0).flatten(1).sum(1)
    rel = torch.where(valid, (pred - target).abs() / safe_target, 0).flatten(1).sum(1)
    ratio = torch.maximum(pred / safe_target, safe_target / pred.clamp_min(1e-12))
    within = (valid & (ratio < 1.25)).flatten(1).sum(1)
    count = count.clamp_min(1)
    errors = {"rmse": torch.sqrt(squared / count), "abs_rel": rel / count, "delta1": within / count}
    return {k: v[keep].float() for k, v in errors.items()}


# ----------------------------------------------------------------------------- training data plan


def _crop_and_flip(item: dict, top_frac: float, left_frac: float, flip: bool, size: int) -> dict:
    """A `size`² crop of every image-like entry at the same place (padded with PAD_VALUES if smaller)."""
    height, width = item["image"].shape[-2:]
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    top = int(top_frac * (height + pad_h - size + 1))
    left = int(left_frac * (width + pad_w - size + 1))
    out = {}
    for key, value in item.items():
        if key not in PAD_VALUES:
            continue
        value = torch.as_tensor(value)
        if pad_h or pad_w:
            value = F.pad(value, (0, pad_w, 0, pad_h), value=PAD_VALUES[key])
        value = value[..., top : top + size, left : left + size]
        out[key] = value.flip(-1) if flip else value
    return out


class _PlannedCrops(Dataset):
    """This process's share of a plan: entry i = (dataset index, crop place, flip, global slot)."""

    def __init__(self, dataset, plan: dict[str, torch.Tensor], size: int):
        self.dataset, self.plan, self.size = dataset, plan, size

    def __len__(self) -> int:
        return len(self.plan["index"])

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[int(self.plan["index"][i])]
        out = _crop_and_flip(item, float(self.plan["top"][i]), float(self.plan["left"][i]),
                             bool(self.plan["flip"][i]), self.size)
        out["slot"] = self.plan["slot"][i]
        return out


def _epoch_order(num_items: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """`total` indices from consecutive random permutations of range(num_items)."""
    epochs = math.ceil(total / num_items)
    return torch.cat([torch.randperm(num_items, generator=generator) for _ in range(epochs)])[:total]


def _shard_plan(plan: dict[str, torch.Tensor], chunk: int, rank: int,
                world: int) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's entries of a global plan processed `chunk` entries at a time (one step each).

    Rank r takes every world-th entry of each chunk from r, padded to the same count per rank
    (padding has slot -1 and is dropped after the gather) so that ``gather`` sees equal shapes.
    Returns (plan entries with their global "slot", entries per rank and chunk).
    """
    total = len(plan["index"])
    per_rank = math.ceil(chunk / world)
    slots = []
    for start in range(0, total, chunk):
        mine = list(range(start + rank, min(start + chunk, total), world))
        slots += mine + [-1] * (per_rank - len(mine))
    slots = torch.tensor(slots, dtype=torch.long)
    return {**{k: v[slots.clamp_min(0)] for k, v in plan.items()}, "slot": slots}, per_rank


def _gather_in_plan_order(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """All processes' shares of one step, padding removed, sorted by global slot (= single-process order)."""
    if PartialState().num_processes > 1:
        batch = {k: gather(v.contiguous()) for k, v in batch.items()}
    keep = batch["slot"] >= 0
    order = torch.argsort(batch["slot"][keep])
    return {k: v[keep][order] for k, v in batch.items()}


def _poly_schedule(settings: ProbeSettings):
    """Linear warmup then linear decay to 0 (mmseg 'poly', power 1.0, as in the DINOv2 linear configs)."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / settings.warmup_iters) if settings.warmup_iters > 0 else 1.0
        return warm * max(0.0, 1.0 - step / settings.iterations)

    return factor


# ----------------------------------------------------------------------------- train + predict


def _planned_feature_batches(backbone, dataset, plan: dict, chunk: int, target_key: str,
                             settings: ProbeSettings):
    """Yield {"features", "target", "slot"} per `chunk` plan entries, gathered from all processes
    in plan order: each process extracts features for its share only."""
    state = PartialState()
    share, per_rank = _shard_plan(plan, chunk, state.process_index, state.num_processes)
    loader = DataLoader(_PlannedCrops(dataset, share, settings.resolution), batch_size=per_rank,
                        shuffle=False, num_workers=settings.num_workers)
    for batch in loader:
        images = batch["image"].to(state.device, non_blocking=True)
        yield _gather_in_plan_order({"features": patch_features(backbone, images, settings.layers),
                                     "target": batch[target_key].to(state.device, non_blocking=True),
                                     "slot": batch["slot"].to(state.device)})


def _online_batches(backbone, dataset, target_key: str, settings: ProbeSettings, generator):
    """Every step: fresh random crops + flips, features extracted for them (the ADE20k protocol)."""
    total = settings.iterations * settings.batch_size
    plan = {"index": _epoch_order(len(dataset), total, generator), "top": torch.rand(total, generator=generator),
            "left": torch.rand(total, generator=generator), "flip": torch.rand(total, generator=generator) < 0.5}
    for step in _planned_feature_batches(backbone, dataset, plan, settings.batch_size, target_key, settings):
        yield step["features"], step["target"]


def _cached_batches(backbone, dataset, target_key: str, settings: ProbeSettings, generator):
    """Features of a fixed subset (centre crops, no flips) extracted once, then batches drawn from
    them: many head steps for the price of one pass (the embedded dataset's CPU default)."""
    count = len(dataset) if settings.max_train_images <= 0 else min(settings.max_train_images, len(dataset))
    subset = torch.randperm(len(dataset), generator=generator)[:count].sort().values
    half = torch.full((count,), 0.5)
    plan = {"index": subset, "top": half, "left": half, "flip": torch.zeros(count, dtype=torch.bool)}
    chunk = settings.eval_batch_size * PartialState().num_processes
    parts = list(_planned_feature_batches(backbone, dataset, plan, chunk, target_key, settings))
    features = torch.cat([p["features"] for p in parts])
    targets = torch.cat([p["target"] for p in parts])
    order = _epoch_order(count, settings.iterations * settings.batch_size, generator)
    for step in range(settings.iterations):
        index = order[step * settings.batch_size : (step + 1) * settings.batch_size].to(features.device)
        yield features[index], targets[index]


def train_head(backbone: nn.Module, head: nn.Module, dataset, target_key: str, loss_fn,
               settings: ProbeSettings, seed: int = 0) -> nn.Module:
    """Train `head` on frozen `backbone` features of `dataset` (see the module docstring).

    `backbone` must already be at `settings.resolution` (``backbone_at_resolution``) and on the
    process's device. Returns the head in eval mode, identical on every process.
    """
    state = PartialState()
    head.to(state.device).train()
    generator = torch.Generator().manual_seed(seed)
    make_batches = _cached_batches if settings.cache_features else _online_batches
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _poly_schedule(settings))
    for features, target in make_batches(backbone, dataset, target_key, settings, generator):
        loss = loss_fn(head(features, target.shape[-2:]), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    head.eval()
    if state.num_processes > 1:  # guard against last-bit drift between devices
        for tensor in list(head.parameters()) + list(head.buffers()):
            tensor.data.copy_(broadcast(tensor.data.clone(), from_process=0))
    return head


def slide_predict(predict, images: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """Dense predictions for images of any size from `crop`² windows (mmseg slide inference).

    `predict` maps [B, 3, crop, crop] -> [B, K, crop, crop]; overlapping windows are averaged.
    Images smaller than `crop` are padded at the bottom/right and the padding is cut off again.
    """
    batch, _, height, width = images.shape
    pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
    if pad_h or pad_w:
        images = F.pad(images, (0, pad_w, 0, pad_h))
    full_h, full_w = images.shape[-2:]
    rows = max(full_h - crop + stride - 1, 0) // stride + 1
    cols = max(full_w - crop + stride - 1, 0) // stride + 1
    total, count = None, images.new_zeros((1, 1, full_h, full_w))
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride, full_h - crop), min(c * stride, full_w - crop)
            out = predict(images[:, :, y1 : y1 + crop, x1 : x1 + crop])
            if total is None:
                total = images.new_zeros((batch, out.shape[1], full_h, full_w))
            total[:, :, y1 : y1 + crop, x1 : x1 + crop] += out
            count[:, :, y1 : y1 + crop, x1 : x1 + crop] += 1
    return (total / count)[:, :, :height, :width]


def _validation_batches(dataset, settings: ProbeSettings):
    """This process's validation images (every world-th, no padding), same-size groups stacked."""
    state = PartialState()
    limit = len(dataset) if settings.max_val_images <= 0 else min(settings.max_val_images, len(dataset))
    shard = list(range(state.process_index, limit, state.num_processes))
    loader = DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=settings.eval_batch_size,
                        shuffle=False, num_workers=settings.num_workers, collate_fn=list)
    for items in loader:
        groups: dict[tuple, list] = {}
        for item in items:
            groups.setdefault(tuple(item["image"].shape), []).append(item)
        for group in groups.values():
            yield {k: torch.stack([torch.as_tensor(it[k]) for it in group]) for k in group[0] if k in PAD_VALUES}


def _predict(backbone, head, images: torch.Tensor, settings: ProbeSettings) -> torch.Tensor:
    def window(crops):
        out = head(patch_features(backbone, crops, settings.layers), crops.shape[-2:])
        return out if out.dim() == 4 else out.unsqueeze(1)

    with torch.no_grad():
        return slide_predict(window, images, settings.resolution, settings.slide_stride)


def evaluate_segmentation(backbone, head, dataset, num_classes: int, settings: ProbeSettings) -> float:
    """mIoU over the whole split (all processes), predictions compared at the label resolution."""
    device = PartialState().device
    metric = miou_metric(num_classes).to(device)
    for batch in _validation_batches(dataset, settings):
        logits = _predict(backbone, head, batch["image"].to(device), settings)
        metric.update(logits.argmax(1), batch["mask"].to(device))
    return float(metric.compute())


def evaluate_depth(backbone, head, dataset, settings: ProbeSettings, min_depth: float,
                   max_depth: float) -> dict[str, float]:
    """Per-image RMSE / abs-rel / delta1 over valid pixels, averaged over the images of the split."""
    device = PartialState().device
    means = {k: MeanMetric().to(device) for k in ("rmse", "abs_rel", "delta1")}
    for batch in _validation_batches(dataset, settings):
        pred = _predict(backbone, head, batch["image"].to(device), settings).squeeze(1)
        errors = per_image_depth_errors(pred.clamp(min_depth, max_depth), batch["depth"].to(device))
        for key, values in errors.items():
            if values.numel():
                means[key].update(values)
    return {key: float(metric.compute()) for key, metric in means.items()}


def _feature_channels(backbone, settings: ProbeSettings) -> int:
    device = PartialState().device
    probe = torch.zeros(1, 3, settings.resolution, settings.resolution, device=device)
    return patch_features(backbone, probe, settings.layers).shape[1]


def run_segmentation_probe(backbone, train_set, val_set, num_classes: int, settings: ProbeSettings,
                           seed: int = 0) -> dict:
    """Train a linear segmentation head on frozen features and return {"miou": float, "head": module}."""
    backbone = backbone_at_resolution(backbone, settings.resolution)
    with torch.random.fork_rng(devices=[]):  # the same head init on every process and every run
        torch.manual_seed(seed)
        head = LinearSegHead(_feature_channels(backbone, settings), num_classes)

    head = train_head(backbone, head, train_set, "mask", segmentation_loss, settings, seed)
    return {"miou": evaluate_segmentation(backbone, head, val_set, num_classes, settings), "head": head}


def run_depth_probe(backbone, train_set, val_set, settings: ProbeSettings, n_bins: int,
                    min_depth: float, max_depth: float, bin_spacing: str = "linear", seed: int = 0) -> dict:
    """Train a linear depth-bin head (SigLoss) and return {"rmse", "abs_rel", "delta1", "head"}."""
    if not 0 < min_depth < max_depth:
        raise ValueError(f"eval.depth: need 0 < min_depth < max_depth, got {min_depth} and {max_depth}")
    backbone = backbone_at_resolution(backbone, settings.resolution)
    centres = depth_bin_centres(n_bins, min_depth, max_depth, bin_spacing)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearDepthHead(_feature_channels(backbone, settings), centres)
    head = train_head(backbone, head, train_set, "depth", sig_loss, settings, seed)
    return {**evaluate_depth(backbone, head, val_set, settings, min_depth, max_depth), "head": head}
