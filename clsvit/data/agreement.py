"""Every process trains on the same data, or none starts.

Under several processes each one holds its own copy of the splits, and nothing in DDP compares
them: two processes whose datasets differ by one row shuffle different permutations (a sample seen
twice, another never), and a few thousand rows apart they run different numbers of steps and their
collectives stop matching. Processes can see different data when a node has its own copy of the
tree or its own datasets cache, or when the data changes while the launch starts.

:func:`load_splits_on_every_process` loads the splits on the main process first and hands its
folder listings (:class:`clsvit.data.imagefolder.Listing`: the index file, its row count and digest)
to the others, which serve that very file when they can read it; then every process describes what
it loaded (:class:`DataIdentity`: each split's rows and digest, the class names) and one gather
compares them. A difference, or a process that could not load its data, stops the launch on every
process, the main process printing one line that names the processes and what each loaded.

The digest of a split (:func:`split_digest`) is the folder listing's (class names, paths, labels;
recorded in its index), the parquet shards' footers (file names relative to the split's folder,
sizes, the footers' bytes: row groups, row counts, schema), or for another ``datasets.Dataset`` its
Arrow cache files' names and sizes (its content fingerprint when it has none).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable

import datasets
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from datasets import ClassLabel

from clsvit.data.imagefolder import listing_of
from clsvit.data.parquet import ParquetRows
from clsvit.data.sources import load_splits
from clsvit.errors import InputError
from clsvit.ranges import index_ranges

PARQUET_TAIL = 8  # a parquet file ends with its footer's length (4 bytes, little-endian) and "PAR1"
PARQUET_HEAD = 4  # and starts with "PAR1" (parquet-format README, "File Format")


@dataclass(frozen=True)
class SplitIdentity:
    name: str    # the split, as the recipe names it
    rows: int
    digest: str  # SHA-256, hex


@dataclass(frozen=True)
class DataIdentity:
    """What a process loaded: every split's rows and digest, the class names (when the labels
    have them) and the number of classes."""

    splits: tuple[SplitIdentity, ...]
    classes: tuple[str, ...] | None
    num_classes: int | None

    def describe(self) -> str:
        """``train 1,281,167 images (digest 3f2a9c1b0d4e), validation 50,000 images (digest …), 1000 classes``."""
        splits = ", ".join(f"{split.name} {split.rows:,} images (digest {split.digest[:12]})" for split in self.splits)
        return splits + (f", {self.num_classes} classes" if self.num_classes is not None else "")

    def as_dict(self) -> dict:
        """provenance.json's ``data``: each split's rows and full digest, the number of classes."""
        return {"splits": {split.name: {"rows": split.rows, "digest": split.digest} for split in self.splits},
                "num_classes": self.num_classes}


def load_splits_on_every_process(data_cfg: dict, accelerator) -> tuple:
    """(train, val, num_classes, identity) as :func:`clsvit.data.load_splits` gives them, the same
    on every process of ``accelerator`` (or accelerate's ``PartialState``), else an
    :class:`~clsvit.errors.InputError` on the main process (the others exit with status 2)."""
    names = (data_cfg["train_split"], data_cfg["val_split"])

    def load(listings):
        train, val, num_classes = load_splits(data_cfg, listings=listings)
        return (train, val, num_classes), dict(zip(names, (train, val))), num_classes

    (train, val, num_classes), identity = on_every_process(
        accelerator, load, f"data.source={data_cfg['source']} data.path={data_cfg.get('path')!r}",
        label_column=data_cfg["label_column"])
    return train, val, num_classes, identity


def on_every_process(accelerator, load: Callable, source: str, label_column: str | None = None):
    """(value, identity) of ``load(listings)`` -> (value, {split name: dataset}, num_classes or
    None), called on the main process first and then on the others with its folder listings; the
    processes' identities compared as the module says. ``source`` names the data in the error."""
    world, main = accelerator.num_processes, accelerator.is_main_process

    def attempt(listings):  # (loaded, identity, None), or (None, None, the InputError)
        try:
            loaded = load(listings)
            return loaded, identify(loaded[1], loaded[2], label_column), None
        except InputError as error:
            return None, None, error

    loaded, mine, failure = attempt(None) if main else (None, None, None)
    if world == 1:
        if failure is not None:
            raise failure
        return loaded[0], mine
    handed, main_failed = broadcast_object_list([_listings(loaded[1]) if loaded else None, failure is not None])
    if main_failed:
        _stop(failure)
    if not main:
        loaded, mine, failure = attempt(handed)
    identities = gather_object([mine if failure is None else str(failure)])
    if len(set(identities)) > 1 or isinstance(identities[0], str):
        _stop(InputError(disagreement(identities, source)) if main else None)
    return loaded[0], mine


def _stop(error: InputError | None):
    """Every process leaves: the main process with ``error`` (its one line), the others with status
    2, silently. The process group is destroyed first: a process that exits with gloo's threads
    running aborts, and the launcher would report that instead."""
    PartialState().destroy_process_group()
    if error is not None:
        raise error
    raise SystemExit(2)


def disagreement(identities: list, source: str) -> str:
    """One line naming the processes (grouped when they agree) and what each loaded or raised."""
    groups: dict = {}
    for process, identity in enumerate(identities):
        groups.setdefault(identity, []).append(process)
    parts = [f"{'processes' if len(processes) > 1 else 'process'} {index_ranges(processes, ', ')}: "
             f"{identity if isinstance(identity, str) else identity.describe()}" for identity, processes in groups.items()]
    names = {identity.classes for identity in groups if isinstance(identity, DataIdentity)}
    note = " (their class names differ)" if len(names) > 1 else ""
    return (f"the processes loaded different data from {source}{note}: {'; '.join(parts)}; every process must "
            f"see the same files (a node's own copy of the tree or datasets cache that differs, or data that "
            f"changed while the launch started)")


def _listings(splits: dict) -> dict:
    """{split name: Listing} of the splits served from a folder index."""
    return {name: listing for name, dataset in splits.items() if (listing := listing_of(dataset)) is not None}


def identify(splits: dict, num_classes: int | None = None, label_column: str | None = None) -> DataIdentity:
    """The :class:`DataIdentity` of ``{split name: dataset}``."""
    first = next(iter(splits.values()))
    feature = first.features.get(label_column) if label_column else None
    classes = tuple(feature.names) if isinstance(feature, ClassLabel) else None
    return DataIdentity(tuple(SplitIdentity(name, len(dataset), split_digest(dataset)) for name, dataset in splits.items()),
                        classes, num_classes)


def split_digest(dataset) -> str:
    """SHA-256 (hex) of what identifies a split's rows, as the module says, without reading them."""
    listing = listing_of(dataset)
    if listing is not None:
        return listing.digest
    digest = hashlib.sha256(json.dumps([len(dataset), dataset.features.to_dict()], sort_keys=True).encode())
    if isinstance(dataset, ParquetRows):
        for part in shard_footers(dataset.files):
            digest.update(part)
    elif isinstance(dataset, datasets.Dataset) and dataset.cache_files:
        files = [entry["filename"] for entry in dataset.cache_files]
        digest.update(json.dumps([(os.path.basename(f), os.path.getsize(f)) for f in files]).encode())
    else:
        digest.update(dataset._fingerprint.encode())  # an in-memory dataset: its content hash
    return digest.hexdigest()


def shard_footers(files: list[str]):
    """Per parquet file: its name relative to the files' common folder and its size, then the
    SHA-256 of its footer's bytes (two small reads per file)."""
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    for path in files:
        try:
            with open(path, "rb") as file:
                size = file.seek(0, os.SEEK_END)
                file.seek(max(size - PARQUET_TAIL, 0))
                tail = file.read(PARQUET_TAIL)
                length = int.from_bytes(tail[:4], "little")
                if len(tail) < PARQUET_TAIL or tail[4:] not in (b"PAR1", b"PARE") or length > size - PARQUET_HEAD - PARQUET_TAIL:
                    raise InputError(f"{path} is not a parquet file: it does not end with a footer ({size} bytes)")
                file.seek(size - PARQUET_TAIL - length)
                footer = file.read(length)
        except OSError as error:
            raise InputError(f"cannot read the footer of {path} ({type(error).__name__}: {error.strerror or error})"
                             ) from error
        yield json.dumps([os.path.relpath(os.path.abspath(path), root), size]).encode()
        yield hashlib.sha256(footer).digest()
