"""Data: one way in for every dataset (through HF ``datasets``), the transforms, the sampler, the loaders.

- :func:`load_splits` turns the recipe's ``data`` section into (train, val, num_classes), whatever
  the source: a hub id, an imagefolder (:mod:`clsvit.imagefolder`), parquet shards (read in place:
  :mod:`clsvit.parquet`), or the embedded shapes dataset.
- :func:`build_train_transform` / :func:`build_eval_transform` are timm's ``create_transform`` with
  the DeiT-III settings from the recipe (3-Augment or RandAugment, bicubic, crop ratio 1.0).
- :class:`clsvit.images.ImageClassDataset` decodes lazily and applies the transform with per-sample
  seeds, and :class:`TrainSampler` yields ``(index, sample_seed)``. Together they make every augmented sample
  a pure function of (run seed, epoch, rank, position): a mid-epoch resume is bit-identical and the
  result does not depend on the number of DataLoader workers.
- :func:`build_image_dataset` picks the path of ``data.augment_on``: ``cpu``, the timm PIL transform
  in the workers; ``device``, workers that hand over uint8 crops (:mod:`clsvit.crops`) and batched
  augmentation on the accelerator (:mod:`clsvit.augment`). Either dataset's
  :meth:`~clsvit.images.ImageClassDataset.batch_transform` turns a loader batch into the model's input.

The train loader must NOT go through ``accelerator.prepare``: :class:`TrainSampler` already shards
by rank, and accelerate would shard again (accelerate #4075). The eval loader does go through it.
"""

from __future__ import annotations

import glob
import math
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pyarrow.compute as pc
import torch
from datasets import ClassLabel
from timm.data import create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Sampler, Subset, default_collate

from clsvit.augment import EvalTransform, TrainAugment
from clsvit.crops import CropDataset
from clsvit.errors import InputError
from clsvit.imagefolder import load_folder_splits
from clsvit.images import ImageClassDataset
from clsvit.parquet import ParquetRows
from clsvit.shapes import ensure_shapes_dataset

SOURCES = ("hub", "imagefolder", "parquet", "shapes")


# ---------------------------------------------------------------- loading splits

def load_splits(data_cfg: dict):
    """(train, val, num_classes) for the recipe's ``data`` section; never downloads unless ``hub``.

    Datasets come back with all their columns (the dense probes use ``mask``/``depth``) as HF
    ``datasets.Dataset``, or for parquet shards (``parquet``, ``hub``, ``shapes``) as
    :class:`clsvit.parquet.ParquetRows`, read in place with the same interface;
    :class:`ImageClassDataset` picks the image and label columns.
    """
    train, val = load_raw_splits(data_cfg)
    for split_name, dataset in ((data_cfg["train_split"], train), (data_cfg["val_split"], val)):
        for key in ("image_column", "label_column"):
            _check_column(dataset, data_cfg[key], f"data.{key}", f"split {split_name!r}")
    return train, val, _num_classes(train, val, data_cfg["label_column"])


def load_raw_splits(data_cfg: dict, section: str = "data"):
    """(train, val) HF datasets of any source, without looking at their columns (the dense probes'
    datasets have no labels). ``section`` names the recipe section in error messages."""
    source, path = data_cfg["source"], data_cfg.get("path")
    splits = {f"{section}.train_split": data_cfg["train_split"], f"{section}.val_split": data_cfg["val_split"]}
    if source == "hub":
        by_split = _load_hub(path, list(splits.values()))
    elif source == "imagefolder":
        by_split = load_folder_splits(path, data_cfg["train_split"], data_cfg["val_split"], data_cfg["val_layout"],
                                      section)
    elif source == "parquet":
        by_split = _load_parquet(path, list(splits.values()))
    elif source == "shapes":
        by_split = _load_parquet(str(ensure_shapes_dataset(**data_cfg["shapes"])), list(splits.values()))
    else:
        raise InputError(f"{section}.source must be one of {', '.join(SOURCES)}, got {source!r}")
    return tuple(_pick_split(by_split, key, name, path) for key, name in splits.items())


def _load_hub(path: str, wanted: list[str]):
    """A hub dataset's parquet shards of the ``wanted`` splits, downloaded once into the hub cache and
    read in place (a local directory is read in place as it is); a hub dataset without parquet files
    through ``datasets.load_dataset``."""
    try:
        local = bool(path) and Path(path).is_dir()
        files = path if local else huggingface_hub.snapshot_download(path, repo_type="dataset",
                                                                     allow_patterns=split_patterns(wanted))
        if any(Path(files).rglob("*.parquet")):
            return _load_parquet(files, wanted)
        return datasets.load_dataset(path)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError,
            huggingface_hub.errors.HfHubHTTPError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"data.path {path!r}: cannot load this dataset ({first_line})") from error


def split_patterns(splits: list[str]) -> list[str]:
    """Repository paths of the parquet shards of ``splits``, in the layouts :func:`_load_parquet`
    reads (``[dir/]s-*.parquet``, ``[dir/]s/*.parquet``): a hub download fetches those splits only."""
    return [pattern for split in splits for pattern in
            (f"{split}-*.parquet", f"*/{split}-*.parquet", f"{split}/*.parquet", f"*/{split}/*.parquet")]


def _load_parquet(path: str, wanted: list[str]) -> dict[str, ParquetRows]:
    """Parquet shards from a directory or a glob, read in place (:class:`clsvit.parquet.ParquetRows`:
    no Arrow copy in the datasets cache); a file belongs to split ``s`` when it is named
    ``s-*.parquet`` or lies in a folder named ``s`` (the hub's and the usual local layouts)."""
    root, files = _parquet_files(path)
    by_split = {}
    for split in wanted:
        matching = [f for f in files
                    if f.name.startswith(f"{split}-") or (f.parent != root and f.parent.name == split)]
        if not matching:
            available = sorted({f.name.split("-")[0] for f in files if "-" in f.name}
                               | {f.parent.name for f in files if f.parent != root})
            raise InputError(f"split {split!r} not found in parquet data.path {path!r}; "
                             f"available splits: {', '.join(available) or 'none'}")
        by_split[split] = ParquetRows([str(f) for f in matching])
    return by_split


def _parquet_files(path: str):
    """(root, files): ``root`` is the directory given, or the deepest glob-free parent of a glob."""
    if not path:
        raise InputError("data.path is empty (parquet needs a directory or a glob)")
    if _is_glob(path):
        root = Path(path)
        while _is_glob(str(root)):
            root = root.parent
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if f.endswith(".parquet"))
    elif Path(path).is_dir():
        root, files = Path(path), sorted(Path(path).rglob("*.parquet"))
    else:
        raise InputError(f"data.path {path!r} does not exist")
    if not files:
        raise InputError(f"data.path {path!r} matches no .parquet files")
    return root, files


def _is_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def _pick_split(by_split, key: str, name: str, path):
    if name not in by_split:
        raise InputError(f"{key} {name!r} not found in {path!r}; available splits: {', '.join(by_split)}")
    return by_split[name]


def _check_column(dataset, column: str, what: str, where: str):
    if column not in dataset.column_names:
        raise InputError(f"{what} {column!r} not in {where}; available columns: {', '.join(dataset.column_names)}")


def _num_classes(train, val, label_column: str) -> int:
    """From the ClassLabel feature when there is one, else the largest label + 1 over both splits."""
    feature = train.features[label_column]
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    return 1 + max(pc.max(d.column(label_column) if isinstance(d, ParquetRows) else d.data.column(label_column)
                          ).as_py() for d in (train, val))


# ---------------------------------------------------------------- transforms

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
    (:class:`clsvit.crops.CropDataset`) and the same transform batched on the accelerator."""
    transform = build_train_transform(cfg) if train else build_eval_transform(cfg)
    columns = dict(num_classes=num_classes, image_column=image_column, label_column=label_column)
    if cfg["data"]["augment_on"] == "cpu":
        if cfg["data"]["decode_on"] != "cpu":
            raise InputError("data.decode_on=device needs data.augment_on=device (the CPU path decodes with PIL)")
        return ImageClassDataset(dataset, transform, **columns)
    if cfg["aug"]["rand_augment"]:
        raise InputError(f"aug.rand_augment={cfg['aug']['rand_augment']!r} runs on the CPU only: set "
                         f"data.augment_on=cpu (data.augment_on=device implements 3-Augment)")
    return CropDataset(dataset, TrainAugment(transform) if train else EvalTransform(transform),
                       jpeg_on_device=cfg["data"]["decode_on"] == "device", **columns)


class TrainSampler(Sampler):
    """The training order of one process: ``(index, sample_seed)`` pairs, sharded by rank.

    Why it yields seeds: the seed makes each sample's augmentation reproducible (see
    :class:`ImageClassDataset`), so :meth:`set_start` can resume mid-epoch bit-identically by
    skipping positions without loading data, and results do not depend on ``num_workers``. The
    seed depends on (seed, epoch, rank, position), so the copies of a repeated image get
    different augmentations.

    Order per epoch, from ``torch.Generator().manual_seed(seed + epoch)``:
    - repeats > 1 and several processes: timm's ``RepeatAugSampler`` (DeiT repeated augmentation:
      each image ``repeats`` times in a row, interleaved over ranks, and its epoch selection of
      ``floor(N // 256 * 256 / num_replicas)`` samples per rank, about N / num_replicas);
    - otherwise a strided split ``perm[rank::num_replicas]``, wrapped around to equal lengths.
      Repeated augmentation is inactive on one process, as in the DeiT reference.

    Being rank-aware, the train DataLoader must not go through ``accelerator.prepare``.
    Call :meth:`set_epoch` (and :meth:`set_start` when resuming) before creating the loader iterator.
    """

    def __init__(self, num_samples: int, *, num_replicas: int, rank: int, seed: int,
                 repeats: int = 3, shuffle: bool = True):
        if num_samples < 1:
            raise InputError("the training split is empty")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"TrainSampler needs 0 <= rank < num_replicas, got rank={rank}, "
                             f"num_replicas={num_replicas}")
        if seed < 0 or repeats < 1:
            raise ValueError(f"TrainSampler needs seed >= 0 and repeats >= 1, got seed={seed}, repeats={repeats}")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.repeats, self.shuffle = seed, repeats, shuffle
        self.repeated_aug = repeats > 1 and num_replicas > 1
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def note(self) -> str | None:
        """What a user should know at start: repeated augmentation asked for but inactive here."""
        if self.repeats > 1 and not self.repeated_aug:
            return (f"note: aug.repeated_aug={self.repeats} is inactive on a single process (as in the DeiT "
                    f"reference): each image is seen once per epoch")
        return None

    def steps_per_epoch(self, batch_size: int, accum_steps: int) -> int:
        """Optimizer steps of ``accum_steps`` batches of ``batch_size`` in one epoch of this process.
        An epoch without one is a one-line error naming the sizes and the keys to change."""
        steps = len(self) // batch_size // accum_steps
        if steps == 0:
            per_process = batch_size * accum_steps
            needed = f"train.global_batch={per_process * self.num_replicas} needs {per_process} per process"
            if self.repeated_aug:
                raise InputError(
                    f"repeated augmentation (aug.repeated_aug={self.repeats}, timm's RepeatAugSampler) draws "
                    f"{len(self)} images per process per epoch from the {self.num_samples}-image training split "
                    f"over {self.num_replicas} processes; {needed}: set aug.repeated_aug=1 or lower "
                    f"train.global_batch")
            raise InputError(f"the {self.num_samples}-image training split gives {len(self)} images per process per "
                             f"epoch over {self.num_replicas} process(es); {needed}: lower train.global_batch")
        return steps

    def set_start(self, position: int):
        """Skip the first ``position`` samples of the next iteration (mid-epoch resume); one-shot."""
        if not 0 <= position <= len(self):
            raise ValueError(f"start position {position} outside [0, {len(self)}]")
        self.start = position

    def __len__(self) -> int:
        if self.repeated_aug:
            return len(self._repeat_aug_sampler())
        return math.ceil(self.num_samples / self.num_replicas)

    def __iter__(self):
        indices = self._indices()
        seeds = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(len(indices))
        start, self.start = self.start, 0
        return iter(list(zip(indices[start:], seeds[start:].tolist())))

    def _indices(self) -> list[int]:
        if self.repeated_aug:
            return list(self._repeat_aug_sampler())
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        order = order.tolist()
        total = len(self) * self.num_replicas
        return [order[i % self.num_samples] for i in range(self.rank, total, self.num_replicas)]

    def _repeat_aug_sampler(self):
        sampler = RepeatAugSampler(range(self.num_samples), num_replicas=self.num_replicas, rank=self.rank,
                                   shuffle=self.shuffle, num_repeats=self.repeats)
        sampler.set_epoch(self.seed + self.epoch)  # timm seeds its permutation with the epoch alone
        return sampler


# ---------------------------------------------------------------- loaders

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
