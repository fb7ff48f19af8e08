"""Dense datasets at their own resolution: image + class mask or depth map, checked as they load.

Any ``source`` of the recipe works: ``hub`` / ``parquet`` / ``imagefolder`` / ``shapes`` through
``clsvit.data.load_raw_splits``, or ``folder`` — a dataset's own directory layout as its authors ship it
(:data:`LAYOUTS`), read into the same HF ``datasets.Dataset`` of file paths.

:class:`DenseDataset` returns raw arrays, never resized: ``image`` HxWx3 uint8 RGB, ``mask`` HxW int64
(255 = ignore; ADE20k's 0 = unlabelled becomes 255 and class k+1 becomes k with
``reduce_zero_label``), ``depth`` HxW float32 metres (0 = no measurement), and ``name`` (file or row).
A mask whose size differs from its image, a label outside the classes that is not 255, an 8-bit
depth map or depths far beyond the range (a wrong ``depth_scale``) are one-line errors naming the file.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
from datasets import Image as ImageFeature
from torch.utils.data import Dataset

from clsvit.data import load_raw_splits
from clsvit.dense.transforms import IGNORE_INDEX
from clsvit.errors import InputError
from clsvit.data.images import decode_image, sample_name, to_rgb

LAYOUTS = {
    "ade20k": "ADEChallengeData2016: images/<split>/*.jpg + annotations/<split>/*.png (split: training | validation)",
    "voc": "VOCdevkit/VOC2012: ImageSets/Segmentation/<split>.txt, JPEGImages/<id>.jpg, SegmentationClass/<id>.png",
    "cityscapes": "leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/<split>/<city>/*_gtFine_labelTrainIds.png",
    "nyu": "BTS/BinsFormer NYUv2: nyu_<split>.txt lines 'rgb depth focal', paths relative to the root",
    "kitti": "Eigen split: kitti_eigen_<split>.txt lines 'image depth focal' under input/ and gt_depth/",
}


def load_dense_splits(section: dict, data_cfg: dict, name: str, target_column: str, listings: dict | None = None):
    """(train, val) HF datasets of ``eval.<task>`` with the image and target columns (``listings``:
    another process's folder listings to serve, :mod:`clsvit.data.agreement`)."""
    if section["source"] != "folder":
        merged = {**data_cfg, **{key: section[key] for key in ("source", "path", "train_split", "val_split")}}
        splits = load_raw_splits(merged, name, listings)
    else:
        splits = tuple(folder_split(section["path"], section["layout"], section[key], name,
                                    section["image_column"], target_column)
                       for key in ("train_split", "val_split"))
    target_key = next(key for key in ("mask_column", "depth_column") if section.get(key) == target_column)
    for split, dataset in zip((section["train_split"], section["val_split"]), splits):
        for key in ("image_column", target_key):
            if section[key] not in dataset.column_names:
                raise InputError(f"{name}.{key} {section[key]!r} is not a column of {section['source']} dataset "
                                 f"{section['path']!r} split {split!r} (columns: {', '.join(dataset.column_names)})")
    return splits


def _read_list(path: Path, name: str) -> list[list[str]]:
    if not path.is_file():
        raise InputError(f"{name}: split file {path} does not exist")
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def folder_split(root: str, layout: str, split: str, name: str, image_column: str, target_column: str):
    """One split of a dataset in its own layout, as an HF dataset of (image path, target path)."""
    if layout not in LAYOUTS:
        raise InputError(f"{name}.layout must be one of {' | '.join(LAYOUTS)}, got {layout!r}")
    base = Path(root or "")
    if not root or not base.is_dir():
        raise InputError(f"{name}.path {root!r} does not exist (layout {layout}: {LAYOUTS[layout]})")
    pairs = []
    if layout == "ade20k":
        for image in sorted((base / "images" / split).glob("*.jpg")):
            pairs.append((image, base / "annotations" / split / f"{image.stem}.png"))
    elif layout == "voc":
        for (sample_id, *_) in _read_list(base / "ImageSets" / "Segmentation" / f"{split}.txt", name):
            pairs.append((base / "JPEGImages" / f"{sample_id}.jpg", base / "SegmentationClass" / f"{sample_id}.png"))
    elif layout == "cityscapes":
        for image in sorted((base / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
            stem = image.name[: -len("_leftImg8bit.png")]
            pairs.append((image, base / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelTrainIds.png"))
    else:  # nyu / kitti list files (the toolbox skips entries whose depth is 'None' and sorts by image)
        listing = base / (f"nyu_{split}.txt" if layout == "nyu" else f"kitti_eigen_{split}.txt")
        images, depths = (base, base) if layout == "nyu" else (base / "input", base / "gt_depth")
        for entry in _read_list(listing, name):
            if len(entry) >= 2 and entry[1] != "None":
                pairs.append((images / entry[0].lstrip("/"), depths / entry[1].lstrip("/")))
        pairs.sort(key=lambda pair: str(pair[0]))
    if not pairs:
        raise InputError(f"{name}: no samples for split {split!r} in {root} (layout {layout}: {LAYOUTS[layout]})")
    for image, target in pairs:
        for path in (image, target):
            if not path.is_file():
                raise InputError(f"{name}: {path} does not exist (split {split!r}, layout {layout})")
    dataset = datasets.Dataset.from_dict({image_column: [str(i) for i, _ in pairs],
                                          target_column: [str(t) for _, t in pairs]})
    for column in (image_column, target_column):
        dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


class DenseDataset(Dataset):
    """An HF dataset of (image, mask) or (image, depth) -> raw checked arrays (see the module docstring).

    task ``seg``: ``num_classes`` and ``reduce_zero_label`` define the valid labels. task ``depth``:
    stored values x ``depth_scale`` = metres; values above 4 x ``max_depth`` mean a wrong scale.
    """

    def __init__(self, dataset, task: str, *, image_column: str, target_column: str, num_classes: int = 0,
                 reduce_zero_label: bool = False, depth_scale: float = 1e-3, max_depth: float = 10.0,
                 name: str = "eval"):
        self.task, self.name = task, name
        self.image_column, self.target_column = image_column, target_column
        self.dataset = dataset.select_columns(list(dict.fromkeys([image_column, target_column])))
        for column in self.dataset.column_names:
            if isinstance(self.dataset.features[column], ImageFeature):
                self.dataset = self.dataset.cast_column(column, ImageFeature(decode=False))
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        self.depth_scale, self.max_depth = depth_scale, max_depth

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[int(index)]
        for column in (self.image_column, self.target_column):
            if row[column] is None:
                raise InputError(f"{self.name}: row {int(index)} has no {column} (the value is null)")
        image = np.asarray(to_rgb(decode_image(row[self.image_column])))
        target_value = row[self.target_column]
        where = sample_name(target_value, int(index))
        target = decode_image(target_value)
        array = self._mask(target, where) if self.task == "seg" else self._depth(target, where)
        if array.shape != image.shape[:2]:
            raise InputError(f"{self.name}: {self.target_column} of {where} is {array.shape[1]}x{array.shape[0]} "
                             f"but its image is {image.shape[1]}x{image.shape[0]} (width x height)")
        return {"image": image, "mask" if self.task == "seg" else "depth": array, "name": where}

    def _mask(self, mask, where: str) -> np.ndarray:
        array = np.asarray(mask)
        if array.ndim != 2:
            raise InputError(f"{self.name}: mask {where} must hold one class id per pixel (mode L, P or I), "
                             f"got mode {mask.mode}")
        labels = array.astype(np.int64)
        if self.reduce_zero_label:  # 0 = unlabelled -> 255, class k+1 -> k, 255 stays (mmseg/DINOv3 rule)
            labels = np.where((labels == 0) | (labels == IGNORE_INDEX), IGNORE_INDEX, labels - 1)
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.num_classes))
        if bad.any():
            raise InputError(f"{self.name}: mask {where} has label {int(labels[bad][0])} outside "
                             f"[0, {self.num_classes}) and not 255 (after reduce_zero_label={self.reduce_zero_label}); "
                             f"check num_classes / reduce_zero_label")
        return labels

    def _depth(self, depth, where: str) -> np.ndarray:
        if depth.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise InputError(f"{self.name}: depth {where} must be a 16-bit or float single-channel image "
                             f"(NYUv2: uint16 millimetres, KITTI: uint16 x 256), got mode {depth.mode}")
        metres = np.asarray(depth, dtype=np.float32) * np.float32(self.depth_scale)
        deepest = float(metres.max()) if metres.size else 0.0
        if deepest > 4 * self.max_depth:
            raise InputError(f"{self.name}: depth {where} reaches {deepest:g} m with depth_scale={self.depth_scale:g}, "
                             f"far beyond max_depth={self.max_depth:g} m: wrong unit? (NYUv2 millimetres: 0.001, "
                             f"KITTI: 1/256 = 0.00390625)")
        return np.where(metres > 0, metres, 0).astype(np.float32)
