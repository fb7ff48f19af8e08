"""Training a linear head on frozen patch features and measuring it, the way the protocols do.

Training: every step draws ``batch_size`` augmented crops (the protocol's pipeline,
:mod:`clsvit.dense.transforms`), extracts their features with the frozen backbone and takes one
optimizer step on the head. With ``cache_features`` one augmented view per image of a subset is
extracted once and the head takes its steps on those (the CPU demo). Evaluation runs at each image's
own size: segmentation resizes the image as the protocol does (once per ``test_ratios`` scale), slides
``crop_size`` windows with ``slide_stride`` over it, resizes the logits back to the ORIGINAL label size,
averages the softmax over scales and flips, and accumulates the confusion matrix over the split
(mmseg's mIoU); depth predicts the whole (KITTI: benchmark-cropped)
image, averages it with its flipped prediction when ``flip_test``, and computes the toolbox's metrics
per image over the evaluated region (Eigen / Garg crop) and depth range, then averages over images.
Where nothing is trained (the feature cache, evaluation), consecutive images of one size share a
backbone forward of up to ``eval_batch_size`` crops (windows x scales x flips); the numbers are those of one
image at a time. DINOv3's segmentation also evaluates the head every ``eval_interval`` steps while it
trains and reports the best of these evaluations; :func:`run_probe` records them all.

Several processes (``accelerate launch``): every process draws the same global plan of augmented
views, extracts features for its share only, and the shares are gathered in plan order, so the head
is trained on exactly the single-process batches, identically on every rank (dropout draws included:
the head's RNG is seeded alike everywhere). Validation images are sharded and the metric states
(torchmetrics) summed, so the numbers are those of a single process.

Parquet datasets (``hub``, ``parquet``, ``shapes``) are read a row group at a time: the feature cache's
pass deals the plan's rows to the processes x loader workers by row group
(:class:`clsvit.data.sampler.EvalBatches`), so each group is read by one worker; the validation
images of a process are a contiguous run of rows, cut into one contiguous part per worker, so a group
is read twice only where it straddles two of them. The fresh views of the protocols (no cache) are
drawn in the protocols' uniform order, one row group read per view.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import broadcast, gather
from timm.layers import Format
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassJaccardIndex

from clsvit.data.loaders import row_groups
from clsvit.data.sampler import EvalBatches
from clsvit.dense import transforms as T
from clsvit.dense.heads import (LinearDepthHead, LinearSegHead, depth_bin_centres, lr_at, segmentation_loss,
                                sig_loss)
from clsvit.dense.protocols import DINOV2_FOUR_LAYERS, Settings
from clsvit.errors import InputError

DEPTH_METRICS = ("rmse", "abs_rel", "sq_rel", "rmse_log", "log10", "silog", "delta1", "delta2", "delta3")


# ----------------------------------------------------------------------------- backbone and features


def frozen_backbone(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of a timm ViT that takes inputs of any size (multiples of its patch):
    position embeddings are resampled to each input's grid, as DINOv2/DINOv3 interpolate theirs. The
    caller's model is left untouched."""
    if not hasattr(model, "patch_embed") or not hasattr(model, "forward_intermediates"):
        raise InputError(f"dense evaluation needs a timm VisionTransformer, got {type(model).__name__}")
    backbone = copy.deepcopy(model)
    backbone.dynamic_img_size = True
    backbone.patch_embed.strict_img_size = False
    backbone.patch_embed.flatten = False
    backbone.patch_embed.output_fmt = Format.NHWC
    backbone.to(PartialState().device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def layer_indices(depth: int, settings: Settings) -> list[int]:
    """Blocks whose tokens feed the head: the last `layers` (segmentation, DINOv2 "linear"/"+ms"), or
    for depth the last one / `layers` evenly spaced ones (DINOv2's {3,6,9,12}-style choice)."""
    layers = settings.layers
    if layers > depth:
        raise InputError(f"eval.{settings.task}.layers={layers} exceeds the model's {depth} blocks")
    if not TASKS[settings.task].spread_layers or layers == 1:
        return list(range(depth - layers, depth))
    if layers == 4 and depth in DINOV2_FOUR_LAYERS:
        return DINOV2_FOUR_LAYERS[depth]
    return [(k + 1) * depth // layers - 1 for k in range(layers)]


def center_pad(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad height and width to multiples of the patch, half on each side (DINOv2's CenterPadding)."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not (pad_h or pad_w):
        return images
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def feature_maps(backbone: nn.Module, images: torch.Tensor, settings: Settings) -> torch.Tensor:
    """[B, C', h, w] patch features of the protocol: the chosen blocks' patch tokens (through the final
    norm or not), each optionally concatenated with its [CLS] token, stacked on channels."""
    images = center_pad(images, backbone.patch_embed.patch_size[0])
    with torch.no_grad():  # not inference_mode: the head's backward needs to save these tensors
        maps = backbone.forward_intermediates(images, indices=layer_indices(len(backbone.blocks), settings),
                                              norm=settings.final_norm, output_fmt="NCHW", intermediates_only=True,
                                              return_prefix_tokens=settings.cls_token)
        if settings.cls_token:
            maps = [torch.cat([patches, prefix[:, 0, :, None, None].expand_as(patches)], dim=1)
                    for patches, prefix in maps]
    return torch.cat(maps, dim=1)


def build_head(backbone: nn.Module, settings: Settings, seed: int) -> nn.Module:
    """The protocol's head, initialised identically on every process."""
    probe = torch.zeros(1, 3, *settings.crop_size, device=PartialState().device)
    channels = feature_maps(backbone, probe, settings).shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TASKS[settings.task].head(channels, settings)


def _seg_head(channels: int, settings: Settings) -> nn.Module:
    return LinearSegHead(channels, settings.num_classes, settings)


def _depth_head(channels: int, settings: Settings) -> nn.Module:
    centres = depth_bin_centres(settings.n_bins, settings.min_depth, settings.max_depth, settings.bin_spacing)
    return LinearDepthHead(channels, centres, settings)


# ----------------------------------------------------------------------------- training plan


class _PlannedViews(Dataset):
    """This process's share of a plan: entry i = (dataset index, view seed, global slot)."""

    def __init__(self, dataset, plan: dict[str, torch.Tensor], settings: Settings):
        self.dataset, self.plan, self.settings = dataset, plan, settings

    def __len__(self) -> int:
        return len(self.plan["index"])

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[int(self.plan["index"][i])]
        task = TASKS[self.settings.task]
        view = task.train_view(item, self.settings, np.random.default_rng(int(self.plan["seed"][i])))
        return {"image": view["image"], "target": view[task.target], "slot": self.plan["slot"][i]}


def _epoch_order(num_items: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """`total` indices from consecutive random permutations of range(num_items)."""
    epochs = math.ceil(total / num_items)
    return torch.cat([torch.randperm(num_items, generator=generator) for _ in range(epochs)])[:total]


def _shard_plan(plan: dict[str, torch.Tensor], chunk: int, rank: int, world: int):
    """This rank's entries of a global plan processed `chunk` entries at a time (one step each): rank r
    takes every world-th entry of each chunk from r, padded to equal counts per rank (slot -1, dropped
    after the gather) so that ``gather`` sees equal shapes. Returns (entries with their slot, per rank)."""
    total = len(plan["index"])
    per_rank = math.ceil(chunk / world)
    slots = []
    for start in range(0, total, chunk):
        mine = list(range(start + rank, min(start + chunk, total), world))
        slots += mine + [-1] * (per_rank - len(mine))
    slots = torch.tensor(slots, dtype=torch.long)
    return {**{k: v[slots.clamp_min(0)] for k, v in plan.items()}, "slot": slots}, per_rank


def _grouped_share(dataset, plan: dict[str, torch.Tensor], per_rank: int, workers: int):
    """This rank's entries of a plan whose rows ascend, dealt by row group (:class:`EvalBatches`: each
    group's entries to one loader worker of one process, every process as many batches), each batch
    padded to ``per_rank`` entries with slot -1 (repeating its first entry: no further read)."""
    state = PartialState()
    index = plan["index"].numpy()
    groups = row_groups(dataset)
    if groups is None:
        counts = [1] * len(index)
    else:
        starts = np.cumsum(groups) - groups
        counts = np.unique(np.searchsorted(starts, index, side="right"), return_counts=True)[1].tolist()
    batches = EvalBatches(counts, per_rank, num_replicas=state.num_processes, rank=state.process_index,
                          workers=workers)
    positions, slots = [], []
    for batch, valid in zip(batches.batches, batches.valid):
        positions += batch + [batch[0]] * (per_rank - len(batch))
        slots += batch[:valid] + [-1] * (per_rank - valid)
    positions = torch.tensor(positions, dtype=torch.long)
    return {**{k: v[positions] for k, v in plan.items()}, "slot": torch.tensor(slots, dtype=torch.long)}


def _gather_in_plan_order(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if PartialState().num_processes > 1:
        batch = {k: gather(v.contiguous()) for k, v in batch.items()}
    keep = batch["slot"] >= 0
    order = torch.argsort(batch["slot"][keep])
    return {k: v[keep][order] for k, v in batch.items()}


def _feature_batches(backbone, dataset, plan: dict, chunk: int, settings: Settings, by_group: bool = False):
    """{"features", "target", "slot"} per `chunk` plan entries, gathered from all processes, in plan
    order (`by_group`: the entries of a plan whose rows ascend, dealt by row group; each step's entries
    in plan order, the steps not)."""
    state = PartialState()
    if by_group:
        per_rank = math.ceil(chunk / state.num_processes)
        share = _grouped_share(dataset, plan, per_rank, settings.num_workers)
    else:
        share, per_rank = _shard_plan(plan, chunk, state.process_index, state.num_processes)
    loader = DataLoader(_PlannedViews(dataset, share, settings), batch_size=per_rank, shuffle=False,
                        num_workers=settings.num_workers)
    for batch in loader:
        features = feature_maps(backbone, batch["image"].to(state.device, non_blocking=True), settings)
        yield _gather_in_plan_order({"features": features, "target": batch["target"].to(state.device),
                                     "slot": batch["slot"].to(state.device)})


def _training_batches(backbone, dataset, settings: Settings, generator: torch.Generator):
    seeds = lambda n: torch.randint(0, 2**62, (n,), generator=generator)  # noqa: E731
    batch_size = settings.batch_size
    if not settings.cache_features:
        total = settings.iterations * batch_size
        plan = {"index": _epoch_order(len(dataset), total, generator), "seed": seeds(total)}
        for step in _feature_batches(backbone, dataset, plan, batch_size, settings):
            yield step["features"], step["target"]
        return
    limit = settings.max_train_images
    count = len(dataset) if limit <= 0 else min(limit, len(dataset))
    plan = {"index": torch.randperm(len(dataset), generator=generator)[:count].sort().values, "seed": seeds(count)}
    chunk = settings.eval_batch_size * PartialState().num_processes
    parts = list(_feature_batches(backbone, dataset, plan, chunk, settings, by_group=True))
    order = torch.argsort(torch.cat([p["slot"] for p in parts]))  # back to plan order
    features, targets = torch.cat([p["features"] for p in parts])[order], torch.cat([p["target"] for p in parts])[order]
    order = _epoch_order(count, settings.iterations * batch_size, generator)
    for step in range(settings.iterations):
        index = order[step * batch_size : (step + 1) * batch_size].to(features.device)
        yield features[index], targets[index]


def _rng_devices() -> list:
    device = PartialState().device
    return [device] if device.type == "cuda" else []


def train_head(backbone: nn.Module, head: nn.Module, dataset, settings: Settings, seed: int = 0,
               validate: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Train `head` on frozen `backbone` features of `dataset` with the protocol's loss, AdamW and
    schedule; every ``eval_interval`` steps before the last, ``validate(steps done, head)``. Returns the
    head in eval mode, identical on every process."""
    state = PartialState()
    head.to(state.device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, betas=settings.betas,
                                  weight_decay=settings.weight_decay)
    loss_of = TASKS[settings.task].loss
    every = settings.eval_interval
    with torch.random.fork_rng(devices=_rng_devices()):  # dropout draws: the same on every process and run
        torch.manual_seed(seed)
        batches = _training_batches(backbone, dataset, settings, torch.Generator().manual_seed(seed))
        for step, (features, target) in enumerate(batches):
            lr, beta1 = lr_at(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
                if beta1 is not None:
                    group["betas"] = (beta1, group["betas"][1])
            loss = loss_of(head(features, target.shape[-2:]), target, step, settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(head.parameters(), settings.grad_clip)
            optimizer.step()
            done = step + 1
            if validate is not None and every and done % every == 0 and done < settings.iterations:
                validate(done, head)
    head.eval()
    if state.num_processes > 1:  # guard against last-bit drift between devices
        for tensor in list(head.parameters()) + list(head.buffers()):
            tensor.data.copy_(broadcast(tensor.data.clone(), from_process=0))
    return head


# ----------------------------------------------------------------------------- inference


def slide_windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int],
                  square_small: bool = False) -> list[tuple]:
    """(y1, y2, x1, x2) of mmseg's slide inference: ceil((H - crop) / stride) + 1 rows of windows, the
    last one flush with the border; a side shorter than the crop is taken whole (no padding), so an
    image smaller than the crop in both sides is one smaller window. With `square_small` such an image
    is slid over with square windows of side min(H, W) instead (DINOv3, dinov3/eval/segmentation/
    inference.py:118-119: its test ratios below 1 make images smaller than the crop)."""
    if square_small and crop[0] > height and crop[1] > width:
        crop = (min(height, width),) * 2
    rows = max(height - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    windows = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride[0] + crop[0], height), min(c * stride[1] + crop[1], width)
            windows.append((max(y2 - crop[0], 0), y2, max(x2 - crop[1], 0), x2))
    return windows


def slide_logits(predict, images: torch.Tensor, crop, stride, square_small: bool = False) -> torch.Tensor:
    """[B, K, H, W] logits of [B, 3, H, W] images of one size: every window of every image predicted in
    one batch, overlaps averaged (windows as :func:`slide_windows`)."""
    windows = slide_windows(*images.shape[-2:], crop, stride, square_small)
    crops = torch.cat([images[..., y1:y2, x1:x2] for y1, y2, x1, x2 in windows])
    out = predict(crops).unflatten(0, (len(windows), images.shape[0]))
    total = images.new_zeros((images.shape[0], out.shape[2], *images.shape[-2:]))
    count = images.new_zeros((1, 1, *images.shape[-2:]))
    for (y1, y2, x1, x2), logits in zip(windows, out):
        total[..., y1:y2, x1:x2] += logits
        count[..., y1:y2, x1:x2] += 1
    return total / count


def _with_flipped(images: torch.Tensor, settings: Settings) -> torch.Tensor:
    return torch.cat([images, images.flip(-1)]) if settings.flip_test else images


def _mean_with_flipped(out: torch.Tensor, settings: Settings) -> torch.Tensor:
    """The mean of the predictions of the images and of their mirrors, mirrored back."""
    if not settings.flip_test:
        return out
    plain, flipped = out.chunk(2)
    return (plain + flipped.flip(-1)) / 2


def seg_probabilities(backbone, head, images, size: tuple[int, int], settings: Settings) -> torch.Tensor:
    """Class probabilities [B, K, *size] at the original label size of [B, 3, H, W] images, or of a
    list of them (the test scales): per scale and flip, slide logits, bilinear resize to the label
    size, softmax; then the mean over scales and flips (mmseg ``aug_test``, DINOv3 TTA)."""
    def predict(crops):
        return head(feature_maps(backbone, crops, settings), crops.shape[-2:])

    scales = [images] if torch.is_tensor(images) else images
    probs = 0
    with torch.no_grad():
        for scaled in scales:
            logits = slide_logits(predict, _with_flipped(scaled, settings), settings.crop_size, settings.slide_stride,
                                  settings.square_small_windows)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            probs = probs + _mean_with_flipped(logits.softmax(1), settings)
    return probs / len(scales)


def depth_prediction(backbone, head, images: torch.Tensor, settings: Settings) -> torch.Tensor:
    """[B, H, W] depth of whole [B, 3, H, W] images, averaged with the flipped images' when ``flip_test``."""
    with torch.no_grad():
        views = _with_flipped(images, settings)
        depth = head(feature_maps(backbone, views, settings), views.shape[-2:])[:, 0]
    return _mean_with_flipped(depth, settings).clamp(settings.min_depth, settings.max_depth)


def depth_errors(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """The toolbox's metrics of one image over the given pixels (depth/core/evaluation/metrics.py:7-32):
    RMSE, abs-rel, sq-rel, RMSE-log, log10, SILog (x100), delta < 1.25 / 1.25^2 / 1.25^3."""
    pred, gt = pred.double(), gt.double()
    thresh = torch.maximum(gt / pred, pred / gt)
    err = torch.log(pred) - torch.log(gt)
    return {"rmse": torch.sqrt(((gt - pred) ** 2).mean()).item(),
            "abs_rel": ((gt - pred).abs() / gt).mean().item(),
            "sq_rel": (((gt - pred) ** 2) / gt).mean().item(),
            "rmse_log": torch.sqrt((err ** 2).mean()).item(),
            "log10": (torch.log10(gt) - torch.log10(pred)).abs().mean().item(),
            "silog": (torch.sqrt((err ** 2).mean() - err.mean() ** 2) * 100).nan_to_num(0.0).item(),
            "delta1": (thresh < 1.25).double().mean().item(),
            "delta2": (thresh < 1.25 ** 2).double().mean().item(),
            "delta3": (thresh < 1.25 ** 3).double().mean().item()}


class _EvalViews(Dataset):
    def __init__(self, dataset, settings: Settings):
        self.dataset, self.settings = dataset, settings

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return TASKS[self.settings.task].eval_view(self.dataset[i], self.settings)


def _seg_inputs(view: dict, settings: Settings) -> int:
    """Windows of one segmentation view, over its test scales."""
    return sum(len(slide_windows(*image.shape[-2:], settings.crop_size, settings.slide_stride,
                                 settings.square_small_windows))
               for image in view["images"])


def _crops_per_image(view: dict, settings: Settings) -> int:
    """Backbone inputs one image needs: the task's inputs per view (windows x scales, or 1), x flips."""
    return TASKS[settings.task].inputs_per_view(view, settings) * (2 if settings.flip_test else 1)


def _shapes(view: dict) -> list[tuple]:
    tensors = [v for value in view.values() for v in (value if isinstance(value, list) else [value])]
    return [tuple(t.shape) for t in tensors if torch.is_tensor(t)]


def _stack(group: list[dict]) -> dict:
    """Views of one size as a batch: tensors stacked (lists of tensors position by position)."""
    out = {}
    for key, value in group[0].items():
        if torch.is_tensor(value):
            out[key] = torch.stack([view[key] for view in group])
        elif isinstance(value, list) and value and torch.is_tensor(value[0]):
            out[key] = [torch.stack([view[key][i] for view in group]) for i in range(len(value))]
        else:
            out[key] = [view[key] for view in group]
    return out


def _eval_batches(dataset, settings: Settings):
    """This process's validation images (a contiguous run of rows: parquet row groups are read once,
    see the module docstring) as the protocol's evaluation views, consecutive views of one image and
    target size stacked while their crops (windows x scales x flips) fit in ``eval_batch_size`` (an
    image with more crops alone)."""
    state = PartialState()
    limit = len(dataset) if settings.max_val_images <= 0 else min(settings.max_val_images, len(dataset))
    mine = _contiguous_share(limit, state.process_index, state.num_processes, settings.num_workers)
    shard = torch.utils.data.Subset(_EvalViews(dataset, settings), mine)
    group, group_shapes = [], None
    for view in DataLoader(shard, batch_size=None, shuffle=False, num_workers=settings.num_workers):
        shapes = _shapes(view)
        full = (len(group) + 1) * _crops_per_image(view, settings) > settings.eval_batch_size
        if group and (shapes != group_shapes or full):
            yield _stack(group)
            group = []
        group.append(view)
        group_shapes = shapes
    if group:
        yield _stack(group)


def _contiguous_share(count: int, rank: int, world: int, workers: int) -> list[int]:
    """Rank ``rank``'s rows of ``range(count)``: a contiguous run, cut into ``workers`` contiguous parts
    taken in turn (the DataLoader hands item k to worker k % workers), so each part is read by one worker."""
    run = np.array_split(np.arange(count), world)[rank]
    parts = [part.tolist() for part in np.array_split(run, max(1, workers))]
    longest = max(len(part) for part in parts)
    return [part[i] for i in range(longest) for part in parts if i < len(part)]


def evaluate_segmentation(backbone, head, dataset, settings: Settings) -> dict:
    """mIoU over the split (confusion matrix summed over images and processes, nan-mean over the classes
    present in prediction or label, 255 ignored) at each label's own size; ``pixels`` = labelled pixels
    evaluated, ``images`` = images evaluated."""
    device = PartialState().device
    miou = MulticlassJaccardIndex(num_classes=settings.num_classes, ignore_index=T.IGNORE_INDEX,
                                  average="macro").to(device)
    pixels, images = SumMetric().to(device), SumMetric().to(device)
    for batch in _eval_batches(dataset, settings):
        masks = batch["mask"].to(device)
        scales = [images.to(device) for images in batch["images"]]
        probs = seg_probabilities(backbone, head, scales, tuple(masks.shape[-2:]), settings)
        miou.update(probs.argmax(1), masks)
        pixels.update((masks != T.IGNORE_INDEX).sum())
        images.update(len(masks))
    return {"miou": float(miou.compute()), "pixels": int(pixels.compute()), "images": int(images.compute())}


def evaluate_depth(backbone, head, dataset, settings: Settings) -> dict:
    """Per-image metrics over the evaluated region with ground truth in (min_depth, max_depth), averaged
    over the images that have such pixels; ``pixels`` counts them all, ``images`` the images."""
    device = PartialState().device
    means = {key: MeanMetric().to(device) for key in DEPTH_METRICS}
    pixels, images = SumMetric().to(device), SumMetric().to(device)
    for batch in _eval_batches(dataset, settings):
        preds = depth_prediction(backbone, head, batch["image"].to(device), settings)
        for pred, gt, region in zip(preds, batch["depth"].to(device), batch["region"].to(device)):
            valid = region & (gt > settings.min_depth) & (gt < settings.max_depth)
            if valid.any():
                for key, value in depth_errors(pred[valid], gt[valid]).items():
                    means[key].update(value)
                pixels.update(valid.sum())
                images.update(1)
    counted = int(images.compute())
    return {**{key: float(metric.compute()) if counted else math.nan for key, metric in means.items()},
            "pixels": int(pixels.compute()), "images": counted}


# ----------------------------------------------------------------------------- the two tasks, entry point


@dataclass(frozen=True)
class Task:
    """What segmentation and depth do differently, in one place."""

    target: str  # the view's key of the label the head learns: mask | depth
    train_view: Callable  # (item, settings, rng) -> {"image", target}: the protocol's training crop
    eval_view: Callable  # (item, settings) -> the protocol's evaluation view of one image
    head: Callable  # (feature channels, settings) -> the untrained head
    loss: Callable  # (head output, target, step, settings) -> the protocol's loss
    inputs_per_view: Callable  # (evaluation view, settings) -> backbone inputs before flips
    evaluate: Callable  # (backbone, head, dataset, settings) -> metrics over the split
    spread_layers: bool  # layers > 1: evenly spaced blocks (depth) rather than the last ones (seg)


TASKS = {
    "seg": Task(target="mask", train_view=T.seg_train_view, eval_view=T.seg_eval_view, head=_seg_head,
                loss=lambda out, target, step, settings: segmentation_loss(out, target),
                inputs_per_view=_seg_inputs, evaluate=evaluate_segmentation, spread_layers=False),
    "depth": Task(target="depth", train_view=T.depth_train_view, eval_view=T.depth_eval_view, head=_depth_head,
                  loss=lambda out, target, step, settings: sig_loss(out.squeeze(1), target, step,
                                                                      settings.sigloss_warmup),
                  inputs_per_view=lambda view, settings: 1, evaluate=evaluate_depth, spread_layers=True),
}


def run_probe(model: nn.Module, train_set, val_set, settings: Settings, seed: int = 0) -> dict:
    """Train the protocol's head on `train_set` and measure it on `val_set` (DenseDataset-like items).

    Returns the final head's metrics (``"miou"``, or the depth metrics), ``"pixels"``, ``"images"``,
    ``"head"`` and ``"evaluations"``: ``{"step", metrics}`` of each evaluation in step order, the final
    head's last. With an ``eval_interval`` (DINOv3 segmentation) the head is also evaluated every
    ``eval_interval`` steps, as DINOv3 validates it while it trains, and ``"best"`` is the first of the
    evaluations with the highest mIoU: the number DINOv3 reports (dinov3/eval/segmentation/train.py:
    256, 284-301, 331 keeps the best, run.py:61-62 writes it as the result)."""
    backbone = frozen_backbone(model)
    evaluate = TASKS[settings.task].evaluate
    evaluations = []

    def validate(step: int, head: nn.Module) -> None:
        """Evaluate the head being trained, in eval mode and with random draws of its own, so that its
        training goes on exactly as it would without this evaluation."""
        with torch.random.fork_rng(devices=_rng_devices()):
            head.eval()
            evaluations.append({"step": step, **evaluate(backbone, head, val_set, settings)})
            head.train()

    head = train_head(backbone, build_head(backbone, settings, seed), train_set, settings, seed, validate)
    final = evaluate(backbone, head, val_set, settings)
    evaluations.append({"step": settings.iterations, **final})
    result = {**final, "head": head, "evaluations": evaluations}
    if settings.eval_interval:
        result["best"] = max(evaluations, key=lambda evaluation: evaluation["miou"])  # the first of equals
    return result
