"""From rows to model input: the DeiT-III transforms from timm, the dataset of each
``data.augment_on`` path, and the DataLoaders."""

from __future__ import annotations

import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Subset, default_collate

from clsvit.data.augment import EvalTransform, TrainAugment
from clsvit.data.crops import CropDataset
from clsvit.data.images import ImageClassDataset
from clsvit.data.sampler import TrainSampler
from clsvit.errors import InputError

def build_train_transform(cfg: dict):
    """DeiT-III training transform from timm: RandomResizedCrop + flip + (3-Augment | RandAugment)
    + colour jitter + normalise, no random erasing. timm drops colour jitter when RandAugment is on
    (as the DeiT fine-tuning reference does); 3-Augment keeps it."""
    aug = cfg["aug"]  # 3-Augment and RandAugment together are refused when the recipe loads (clsvit.config)
    return create_transform(
        cfg["model"]["img_size"], is_training=True, scale=tuple(aug["crop_scale"]), hflip=aug["hflip"],
        auto_augment="3a" if aug["three_augment"] else aug["rand_augment"] or None,
        color_jitter=aug["color_jitter"] or None, interpolation=aug["interpolation"], re_prob=0.0,
        mean=tuple(cfg["data"]["mean"]), std=tuple(cfg["data"]["std"]))


def build_eval_transform(cfg: dict):
    """Resize to img_size / eval_crop_pct, centre crop img_size, normalise with data.mean / data.std
    (DeiT-III: crop_pct 1.0)."""
    return create_transform(cfg["model"]["img_size"], is_training=False, crop_pct=cfg["aug"]["eval_crop_pct"],
                            interpolation=cfg["aug"]["interpolation"],
                            mean=tuple(cfg["data"]["mean"]), std=tuple(cfg["data"]["std"]))


def build_image_dataset(dataset, cfg: dict, *, train: bool, num_classes: int, image_column: str = "image",
                        label_column: str = "label") -> ImageClassDataset:
    """The training (``train``) or evaluation dataset of the path ``data.augment_on`` names: ``cpu``,
    the timm transform in the DataLoader workers; ``device``, workers that hand over uint8 crops
    (:class:`clsvit.data.crops.CropDataset`) and the same transform batched on the accelerator."""
    transform = build_train_transform(cfg) if train else build_eval_transform(cfg)
    columns = dict(num_classes=num_classes, image_column=image_column, label_column=label_column,
                   max_pixels=cfg["data"]["max_image_pixels"])
    if cfg["data"]["augment_on"] == "cpu":
        if cfg["data"]["decode_on"] != "cpu":
            raise InputError("data.decode_on=device needs data.augment_on=device (the CPU path decodes with PIL)")
        return ImageClassDataset(dataset, transform, **columns)
    if cfg["aug"]["rand_augment"]:
        raise InputError(f"aug.rand_augment={cfg['aug']['rand_augment']!r} runs on the CPU only: set "
                         f"data.augment_on=cpu (data.augment_on=device implements 3-Augment)")
    return CropDataset(dataset, TrainAugment(transform) if train else EvalTransform(transform),
                       jpeg_on_device=cfg["data"]["decode_on"] == "device", **columns)


def _loader_options(data_cfg: dict) -> dict:
    """Worker settings from the recipe. A private generator keeps the DataLoader from drawing its
    per-iterator base seed from the global torch RNG (which would shift the trainer's RNG stream)."""
    workers = data_cfg["num_workers"]
    options = dict(num_workers=workers, generator=torch.Generator().manual_seed(0),
                   pin_memory=bool(data_cfg["pin_memory"]) and torch.accelerator.is_available())
    if workers > 0:
        options.update(persistent_workers=bool(data_cfg["persistent_workers"]),
                       prefetch_factor=data_cfg["prefetch_factor"])
    return options


def build_train_loader(dataset, sampler: TrainSampler, batch_size: int, data_cfg: dict) -> DataLoader:
    """Per-process train loader; full batches only (batch-mode Mixup needs equal sizes). Do not
    pass it through ``accelerator.prepare`` (the sampler already shards)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=_collate(dataset),
                      **_loader_options(data_cfg))


def build_eval_loader(dataset, batch_size: int, data_cfg: dict) -> DataLoader:
    """Sequential eval loader over the whole split; ``accelerator.prepare`` shards it and
    ``gather_for_metrics`` drops the padding duplicates. Workers are not kept alive between the
    (rare) evaluations."""
    options = _loader_options(data_cfg)
    options["persistent_workers"] = False
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, collate_fn=_collate(dataset),
                      **options)


def _collate(dataset):
    """The dataset's own ``collate`` (through ``Subset`` wrappers), else torch's default."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "collate", default_collate)
