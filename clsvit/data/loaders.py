"""From rows to model input: the DeiT-III transforms from timm, the dataset of each
``data.augment_on`` path, and the DataLoaders."""

from __future__ import annotations

import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Subset, default_collate

from clsvit.data.augment import EvalTransform, TrainAugment
from clsvit.data.crops import CropDataset
from clsvit.data.images import ImageClassDataset
from clsvit.data.parquet import ParquetRows
from clsvit.data.sampler import EvalBatches, TrainSampler
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


def row_groups(dataset):
    """Rows per row group of a dataset read from parquet shards (through ``ImageClassDataset`` and its
    subclasses), else None."""
    rows = getattr(dataset, "dataset", None)
    return rows.row_groups() if isinstance(rows, ParquetRows) else None


def build_train_sampler(dataset, cfg: dict, *, num_replicas: int, rank: int, micro_batch: int) -> TrainSampler:
    """The training order ``data.order`` names (``auto``: grouped for parquet shards, random for the
    rest) of process ``rank`` of ``num_replicas``, for micro-batches of ``micro_batch``. For the
    grouped order, each process's row-group cache of ``dataset`` is sized to hold a window."""
    data_cfg, groups = cfg["data"], row_groups(dataset)
    order = data_cfg["order"] if data_cfg["order"] != "auto" else "random" if groups is None else "grouped"
    if order == "grouped" and groups is None:
        raise InputError(f"data.order=grouped reads parquet row groups, and data.source={data_cfg['source']} "
                         f"data.path={data_cfg['path']!r} is not read from parquet shards: set data.order=random")
    if order == "grouped":
        dataset.dataset.cache_rows = data_cfg["window"]
    return TrainSampler(len(dataset), num_replicas=num_replicas, rank=rank, seed=cfg["run"]["seed"],
                        repeats=cfg["aug"]["repeated_aug"], row_groups=groups if order == "grouped" else None,
                        workers=data_cfg["num_workers"], batch_size=micro_batch, window=data_cfg["window"])


def build_train_loader(dataset, sampler: TrainSampler, batch_size: int, data_cfg: dict) -> DataLoader:
    """Per-process train loader; full batches only (batch-mode Mixup needs equal sizes). Do not
    pass it through ``accelerator.prepare`` (the sampler already shards)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=_collate(dataset),
                      **_loader_options(data_cfg))


def build_eval_loader(dataset, batch_size: int, data_cfg: dict, *, num_replicas: int = 1, rank: int = 0) -> DataLoader:
    """Process ``rank``'s share of an evaluation pass over the whole split, in batches of at most
    ``batch_size`` (:class:`clsvit.data.sampler.EvalBatches`: every row once over all processes, each
    parquet row group read by one loader worker). Not for ``accelerator.prepare``: it shards already,
    and :func:`clsvit.evaluation.topk_accuracy` counts every row once. Workers are not kept alive
    between the (rare) evaluations."""
    options = _loader_options(data_cfg)
    options["persistent_workers"] = False
    groups = row_groups(dataset)
    batches = EvalBatches(groups if groups is not None else [1] * len(dataset), batch_size,
                          num_replicas=num_replicas, rank=rank, workers=data_cfg["num_workers"])
    return DataLoader(dataset, batch_sampler=batches, collate_fn=_collate(dataset), **options)


def _collate(dataset):
    """The dataset's own ``collate`` (through ``Subset`` wrappers), else torch's default."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "collate", default_collate)
