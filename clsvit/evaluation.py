"""Classification accuracy on a validation loader, shared by train.py and eval.py."""

from __future__ import annotations

import torch


@torch.no_grad()
def topk_accuracy(model, loader, accelerator, max_batches: int | None = None, to_input=None) -> dict[str, float]:
    """Top-1/top-5 (%), the number of images seen and of undecodable images replaced (the
    `clsvit.data.images.UndecodableImage` records of `clsvit.data.images.ImageClassDataset`), over a loader of
    `(images, labels, problems)` prepared by `accelerator`. `to_input` turns a loader batch into the
    model's input (the dataset's `batch_transform`: the batched eval transform with
    `data.augment_on: device`); None takes the images as they come. Exact under several processes:
    `gather_for_metrics` drops the samples duplicated to pad an uneven split. Hits are counted on
    the device and read once at the end (no host sync per batch)."""
    model.eval()
    hits = torch.zeros(2, dtype=torch.long, device=accelerator.device)  # top-1, top-5
    seen, undecodable = 0, 0  # on the host: a batch builds no tensor on the device
    for index, (images, labels, problems) in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        if to_input is not None:
            images = to_input(images)
        with accelerator.autocast():
            logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
        top1, top5 = accelerator.gather_for_metrics((top[:, 0], top.any(dim=1)))
        hits += torch.stack([top1.sum(), top5.sum()])
        seen += top1.numel()  # the gathered length: a shape, known on the host
        undecodable += len(problems)
    undecodable = accelerator.reduce(torch.tensor(undecodable).to(hits.device, non_blocking=True), reduction="sum")
    top1, top5 = hits.tolist()
    return {"top1": 100.0 * top1 / max(seen, 1), "top5": 100.0 * top5 / max(seen, 1), "images": seen,
            "undecodable": int(undecodable)}


def validation_metrics(model, loader, accelerator, max_batches: int | None = None,
                       prefix: str = "val", to_input=None) -> dict[str, float]:
    """:func:`topk_accuracy` as training metrics: ``{"val/top1": ..., "val/top5": ..., "val/images": ...}``."""
    return {f"{prefix}/{key}": float(value) for key, value in
            topk_accuracy(model, loader, accelerator, max_batches, to_input).items()}


def format_metrics(metrics: dict) -> str:
    """'val/top1 42.60, val/top5 88.10 (1000 images, 2 undecodable replaced)' for a console line."""
    counts = {key.split("/")[-1]: int(value) for key, value in metrics.items()
              if key.split("/")[-1] in ("images", "undecodable")}
    text = ", ".join(f"{key} {value:.2f}" for key, value in metrics.items()
                     if key.split("/")[-1] not in ("images", "undecodable"))
    if "images" in counts:
        bad = counts.get("undecodable", 0)
        text += f" ({counts['images']} images" + (f", {bad} undecodable replaced)" if bad else ")")
    return text
