"""Classification accuracy on a validation loader, shared by train.py and eval.py."""

from __future__ import annotations

import torch


@torch.no_grad()
def topk_accuracy(model, loader, accelerator, max_batches: int | None = None, to_input=None) -> dict[str, float]:
    """Top-1/top-5 (%), the number of images seen and of undecodable images replaced (the
    `clsvit.data.images.UndecodableImage` records of `clsvit.data.images.ImageClassDataset`), over this
    process's share of an evaluation pass (`clsvit.data.build_eval_loader`: every row once over the
    processes, the same number of batches on each; a batch's rows beyond its sampler's ``valid``
    count repeat a row and are not counted). `to_input` turns a loader batch into the model's input
    on the device (the dataset's `batch_transform`); None moves the images as they come. Hits are
    counted on the device and summed over the processes once at the end (no host sync per batch)."""
    model.eval()
    device = accelerator.device
    valid = getattr(getattr(loader, "batch_sampler", None), "valid", None)
    hits = torch.zeros(2, dtype=torch.long, device=device)  # top-1, top-5
    seen, undecodable = 0, 0  # on the host: a batch builds no tensor from host values
    for index, (images, labels, problems) in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        images = to_input(images) if to_input is not None else images.to(device, non_blocking=True)
        with accelerator.autocast():
            logits = model(images)
        count = len(labels) if valid is None else valid[index]
        labels = labels[:count].to(device, non_blocking=True)
        top = logits[:count].topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
        hits += torch.stack([top[:, 0].sum(), top.any(dim=1).sum()])
        seen += count
        undecodable += len(problems)
    counts = torch.cat([hits, torch.tensor([seen, undecodable]).to(device, non_blocking=True)])
    top1, top5, seen, undecodable = accelerator.reduce(counts, reduction="sum").tolist()
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
