"""Where a split's rows come from: :func:`load_splits` turns the recipe's ``data`` section into
(train, val, num_classes), whatever the source: a hub id, an imagefolder (:mod:`clsvit.data.imagefolder`),
parquet shards (read in place: :mod:`clsvit.data.parquet`), or the embedded shapes dataset
(:mod:`clsvit.data.shapes`)."""

from __future__ import annotations

import glob
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow.compute as pc
from datasets import ClassLabel

from clsvit.data.imagefolder import load_folder_splits
from clsvit.data.parquet import ParquetRows
from clsvit.data.shapes import ensure_shapes_dataset
from clsvit.errors import InputError, quote_error

SOURCES = ("hub", "imagefolder", "parquet", "shapes")


def load_splits(data_cfg: dict, listings: dict | None = None):
    """(train, val, num_classes) for the recipe's ``data`` section; never downloads unless ``hub``.

    Datasets come back with all their columns (the dense probes use ``mask``/``depth``) as HF
    ``datasets.Dataset``, or for parquet shards (``parquet``, ``hub``, ``shapes``) as
    :class:`clsvit.data.parquet.ParquetRows`, read in place with the same interface;
    :class:`ImageClassDataset` picks the image and label columns. ``listings``: another process's
    folder listings to serve (:mod:`clsvit.data.agreement`).
    """
    train, val = load_raw_splits(data_cfg, listings=listings)
    for split_name, dataset in ((data_cfg["train_split"], train), (data_cfg["val_split"], val)):
        for key in ("image_column", "label_column"):
            _check_column(dataset, data_cfg[key], f"data.{key}", f"split {split_name!r}")
    return train, val, _num_classes(train, val, data_cfg["label_column"])


def load_raw_splits(data_cfg: dict, section: str = "data", listings: dict | None = None):
    """(train, val) HF datasets of any source, without looking at their columns (the dense probes'
    datasets have no labels). ``section`` names the recipe section in error messages; ``listings``
    (``{split: clsvit.data.imagefolder.Listing}``) are served as they are by an imagefolder."""
    source, path = data_cfg["source"], data_cfg.get("path")
    splits = {f"{section}.train_split": data_cfg["train_split"], f"{section}.val_split": data_cfg["val_split"]}
    if source == "hub":
        by_split = _load_hub(path, list(splits.values()))
    elif source == "imagefolder":
        by_split = load_folder_splits(path, data_cfg["train_split"], data_cfg["val_split"], data_cfg["val_layout"],
                                      section, listings)
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
        raise InputError(f"data.path {path!r}: cannot load this dataset ({quote_error(error)})") from error


def split_patterns(splits: list[str]) -> list[str]:
    """Repository paths of the parquet shards of ``splits``, in the layouts :func:`_load_parquet`
    reads (``[dir/]s-*.parquet``, ``[dir/]s/*.parquet``): a hub download fetches those splits only."""
    return [pattern for split in splits for pattern in
            (f"{split}-*.parquet", f"*/{split}-*.parquet", f"{split}/*.parquet", f"*/{split}/*.parquet")]


def _load_parquet(path: str, wanted: list[str]) -> dict[str, ParquetRows]:
    """Parquet shards from a directory or a glob, read in place (:class:`clsvit.data.parquet.ParquetRows`:
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

