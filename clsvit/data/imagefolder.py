"""Folder datasets (``data.source: imagefolder``): torchvision's ImageFolder listing, scanned once per tree.

A split folder holds one folder per class (``train/<wnid>/*.JPEG``). Its samples are exactly
``torchvision.datasets.ImageFolder``'s ``(path, class index)`` list: class folders sorted by name,
files under each class folder in ``sorted(os.walk(class_folder, followlinks=True))`` order, files
kept by torchvision's ``IMG_EXTENSIONS`` (case-insensitive), everything else ignored. A class folder
without an image is an error, as in torchvision's default (``allow_empty=False``): in ImageNet it is
an incomplete extraction, and dropping the class would shift every later label.

Labels index the training split's sorted class folders; for ImageNet's ``nXXXXXXXX`` synset folders
that is ImageNet-1k's standard class order, the order of timm's ``ImageNetInfo`` and of public
checkpoints' classifiers. The validation split (``data.val_split``) comes in one of two layouts,
named by ``data.val_layout``:

- ``class_folders``: ``val/<wnid>/*.JPEG``, as torchvision's ``valprep.sh`` leaves it;
- ``ilsvrc_csv``: a flat ``val/ILSVRC2012_val_XXXXXXXX.JPEG`` plus ILSVRC's ``LOC_val_solution.csv``
  (columns ``ImageId,PredictionString``; the label is the first synset of ``PredictionString``),
  the CSV in ``data.path`` or in ``val/``.

Each split comes back as a ``datasets.Dataset`` with an ``image`` column (``datasets.Image`` over
file paths, decoded lazily) and a ``label`` column (``ClassLabel`` with the class folder names).
Split folders are found as ``datasets``' imagefolder finds them (``val/`` is the ``validation``
split); a tree with a ``datasets`` metadata file (``metadata.csv``/``.jsonl``/``.parquet``, which
adds columns such as a segmentation mask) is read by ``datasets``' own imagefolder builder instead.

The listing is kept as an index in the ``datasets`` cache: one Arrow file per split, keyed by the
absolute root, and memory-mapped as the dataset itself. It records the modification time of every
folder it listed (taken before listing it; adding, removing or renaming a file changes its folder's
time), so a launch stats those folders and serves the index only when none changed, else scans
again. A folder modified less than :data:`SETTLE_NS` before the scan is recorded as changed (the
next launch lists it again): a file system's clock ticks coarsely, and a second change within the
same tick would leave the time as it was.

An index is served only when it is whole: it records its row count and the digest of the listing
(:func:`listing_digest`: class names, paths and labels), and a launch checks both; an index that
cannot be read, or is shorter or different (a crash before the write reached the disk), is listed
again. It is written to a temporary file, flushed to the disk (fsync) and renamed, and the rename
is flushed too: a killed scan or a crash leaves the previous index or the whole new one. A cache
that cannot be written is a one-line error naming ``HF_DATASETS_CACHE``: without the index every
process of every launch would list the whole tree again.

Under several processes the main process loads first and hands its :class:`Listing` (the index
file, its row count and digest) to the others, which serve exactly that file
(:mod:`clsvit.data.agreement`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import datasets.config
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Features
from datasets import Image as ImageFeature
from datasets.data_files import SPLIT_KEYWORDS
from datasets.packaged_modules.folder_based_builder.folder_based_builder import FolderBasedBuilder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from clsvit.errors import InputError, quote_error

VAL_LAYOUTS = ("class_folders", "ilsvrc_csv")
SOLUTION_CSV = "LOC_val_solution.csv"
INDEX_FORMAT = 2  # bump when the index's content or keying changes
SETTLE_NS = 2_000_000_000  # a modification time this recent may not yet show every change (NFS: 1 s ticks)
INDEX_BATCH_ROWS = 100_000  # rows per Arrow record batch of an index
_METADATA_KEY = b"clsvit_imagefolder"

logger = logging.getLogger(__name__)


def load_folder_splits(root: str, label_split: str, val_split: str, val_layout: str,
                       section: str = "data", listings: dict | None = None) -> dict[str, datasets.Dataset]:
    """``{split: Dataset}`` of ``label_split`` (class folders, whose names are the labels) and
    ``val_split`` (in ``val_layout``), from the index when the tree has not changed. ``section``
    names the recipe section in error messages. ``listings`` (``{split: Listing}``, another
    process's) are served as they are when their index file holds them, whatever the folders' times."""
    if not root or not Path(root).is_dir():
        raise InputError(f"{section}.path {root!r} does not exist (imagefolder needs a directory with train/ and val/)")
    if val_layout not in VAL_LAYOUTS:
        raise InputError(f"{section}.val_layout must be one of {' | '.join(VAL_LAYOUTS)}, got {val_layout!r}")
    root = os.path.abspath(root)
    folders = {split: split_folder(root, split) for split in (label_split, val_split)}
    if any(_has_metadata_file(os.path.join(root, folder)) for folder in ("", *filter(None, folders.values()))):
        return datasets.load_dataset("imagefolder", data_dir=root)
    for split, folder in folders.items():
        if folder is None:
            key = f"{section}.train_split" if split == label_split else f"{section}.val_split"
            raise InputError(f"{key} {split!r} not found in {root!r}; available splits: "
                             f"{', '.join(available_splits(root)) or 'none'}")
    listings = listings or {}
    train = _indexed_split(root, folders[label_split], "class_folders", None, listings.get(label_split))
    classes = train.features["label"].names
    if val_split == label_split:
        return {label_split: train}
    return {label_split: train,
            val_split: _indexed_split(root, folders[val_split], val_layout, classes, listings.get(val_split))}


def split_folder(root: str, split: str) -> str | None:
    """The folder of ``split`` under ``root``, named as ``datasets``' imagefolder names splits
    (``train``/``training``, ``validation``/``valid``/``dev``/``val``, ``test``/...), else ``split`` itself."""
    for name in SPLIT_KEYWORDS.get(split, [split]):
        if os.path.isdir(os.path.join(root, name)):
            return name
    return None


def available_splits(root: str) -> list[str]:
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    return [next((str(split) for split, words in SPLIT_KEYWORDS.items() if name in words), name) for name in names]


def _has_metadata_file(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in FolderBasedBuilder.METADATA_FILENAMES)


# ---------------------------------------------------------------- the index

@dataclass(frozen=True)
class Listing:
    """A served index: its file, row count and :func:`listing_digest`. The main process hands its
    listings to the others, which serve the same file when it holds the same rows."""

    path: str
    rows: int
    digest: str


def listing_of(dataset) -> Listing | None:
    """The :class:`Listing` of a split served from an index (None for any other dataset)."""
    return getattr(dataset, "_clsvit_listing", None)


def _indexed_split(root: str, folder: str, layout: str, classes: list[str] | None,
                   given: Listing | None = None) -> datasets.Dataset:
    """The split's dataset, memory-mapped from its index: ``given``'s file when it holds ``given``'s
    rows, else the index of ``root/folder`` when it is whole and current, else scanned and indexed first."""
    if given is not None and (dataset := _open_index(Path(given.path), expected=given)) is not None:
        return dataset
    index = index_path(root, folder, layout, classes)
    dataset = _open_index(index) if _index_is_current(index, root) else None
    if dataset is None:
        start = time.perf_counter()
        scan = scan_class_folders if layout == "class_folders" else scan_flat_val
        scanned = scan(root, folder, classes)
        written = _write_index(index, *scanned)
        logger.info("scanned %s: %d images in %.1f s; index %s", os.path.join(root, folder), len(scanned[0]),
                    time.perf_counter() - start, index)
        dataset = _open_index(index, expected=written)
        if dataset is None:
            raise InputError(f"the index {index} was replaced while this launch wrote it, by another launch that "
                             f"listed {os.path.join(root, folder)!r} otherwise (the tree changes): launch again")
    return dataset


def index_path(root: str, folder: str, layout: str, classes: list[str] | None) -> Path:
    """Where the index of ``root/folder`` lives: the key holds everything the listing depends on
    except the folders' contents (those are checked by modification time). The file name starts
    with at most 64 characters of the root's name, for people reading the cache: the digest is the
    key, and a name within the file system's 255 bytes leaves room for the temporary file's."""
    key = json.dumps([INDEX_FORMAT, root, folder, layout, classes, IMG_EXTENSIONS])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(datasets.config.HF_DATASETS_CACHE) / "clsvit_imagefolder" / f"{Path(root).name[:64]}-{folder}-{digest}.arrow"


def _index_metadata(index: Path) -> dict | None:
    """The index's own record (folder times, rows, digest), read from its header; None when the
    file is missing or cannot be read."""
    try:
        with pa.memory_map(str(index)) as source:
            metadata = pa.ipc.open_stream(source).schema.metadata or {}
        record = json.loads(metadata[_METADATA_KEY])
        return record if {"mtimes", "rows", "digest"} <= set(record) else None
    except (OSError, ValueError, KeyError, TypeError):  # ArrowInvalid and JSONDecodeError are ValueErrors
        return None


def _index_is_current(index: Path, root: str) -> bool:
    record = _index_metadata(index)
    return record is not None and all(_mtime_ns(os.path.join(root, relative)) == mtime
                                      for relative, mtime in record["mtimes"])


def _open_index(index: Path, expected: Listing | None = None) -> datasets.Dataset | None:
    """The index memory-mapped as a dataset when it is whole: as many rows as it records, the
    listing of its recorded digest (and ``expected``'s, when given). None, with a warning for a
    damaged file, otherwise: the caller lists the tree again."""
    record = _index_metadata(index)
    if record is None:
        return None
    try:
        dataset = datasets.Dataset.from_file(str(index))
        rows, digest = len(dataset), listing_digest(dataset.data.table)
    except (OSError, ValueError, KeyError, TypeError) as error:  # a cut or damaged record batch
        logger.warning("the index %s cannot be read (%s): listing the tree again", index, quote_error(error))
        return None
    listing = Listing(str(index), rows, digest)
    if (rows, digest) != (record["rows"], record["digest"]):
        logger.warning("the index %s holds %d rows (digest %s) of the %d it recorded (digest %s): listing the "
                       "tree again", index, rows, digest[:12], record["rows"], record["digest"][:12])
        return None
    if expected is not None and listing != expected:
        return None
    dataset._clsvit_listing = listing
    return dataset


def listing_digest(table: pa.Table) -> str:
    """SHA-256 of an index's listing: its class names, then every path and label in order (whatever
    Arrow record batches hold them)."""
    values, lengths, labels = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for chunk in table.column("image").chunks:
        paths = pc.struct_field(chunk, "path")
        if len(paths):
            offsets = np.frombuffer(paths.buffers()[1], dtype=np.int32)[paths.offset:paths.offset + len(paths) + 1]
            values.update(memoryview(paths.buffers()[2])[offsets[0]:offsets[-1]])
            lengths.update(np.diff(offsets).astype("<i4", copy=False))
    for chunk in table.column("label").chunks:
        labels.update(chunk.to_numpy().astype("<i8", copy=False))
    classes = Features.from_arrow_schema(table.schema)["label"].names
    whole = hashlib.sha256(json.dumps(classes).encode())
    for part in (values, lengths, labels):
        whole.update(part.digest())
    return whole.hexdigest()


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return None


def _write_index(index: Path, paths: list[str], labels: list[int], classes: list[str], mtimes: list) -> Listing:
    """The Arrow stream ``datasets.Dataset.from_file`` maps, with its row count and digest, written
    to a temporary file, flushed to the disk and renamed (the rename flushed too)."""
    features = Features(image=ImageFeature(), label=ClassLabel(names=classes))
    image = pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), pa.array(paths, pa.string())],
                                       names=["bytes", "path"])
    table = pa.Table.from_arrays([image, pa.array(labels, pa.int64())], schema=features.arrow_schema)
    listing = Listing(str(index), len(paths), listing_digest(table))
    record = {"mtimes": mtimes, "rows": listing.rows, "digest": listing.digest}
    table = table.replace_schema_metadata({**table.schema.metadata, _METADATA_KEY: json.dumps(record).encode()})
    temporary = index.with_name(f".{index.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "xb") as file:  # the umask's permissions, as the rest of the datasets cache
            with pa.ipc.new_stream(file, table.schema) as writer:
                writer.write_table(table, max_chunksize=INDEX_BATCH_ROWS)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, index)
        directory = os.open(index.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        _remove(temporary)
        raise InputError(f"cannot write the folder index {index} ({type(error).__name__}: {error.strerror or error}):"
                         f" HF_DATASETS_CACHE ({datasets.config.HF_DATASETS_CACHE}) must be a writable directory; "
                         f"set HF_DATASETS_CACHE to one (the index keeps the listing between launches and hands it "
                         f"to every process)") from error
    except BaseException:
        _remove(temporary)
        raise
    return listing


def _remove(path: Path):
    try:
        path.unlink()
    except OSError:  # never written, or its folder cannot be written either
        pass


# ---------------------------------------------------------------- the scans

def is_image_file(name: str) -> bool:
    """Whether ImageFolder keeps the file: torchvision's own test, with its ``IMG_EXTENSIONS``."""
    return has_file_allowed_extension(name, IMG_EXTENSIONS)


def _listing(folder: str, mtimes: list, root: str) -> tuple[list[str], list[str]]:
    """(sub-folder names, other names) of ``folder`` as ``os.walk`` splits them (symlinks to folders
    are folders); the folder's modification time is recorded before it is listed, so a change during
    the scan makes the index stale."""
    try:
        _record_mtime(mtimes, folder, root)
        folders, files = [], []
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    is_folder = entry.is_dir()
                except OSError:
                    is_folder = False
                (folders if is_folder else files).append(entry.name)
    except OSError as error:
        raise InputError(f"cannot list {folder!r} ({type(error).__name__}: {error.strerror or error})") from error
    return folders, files


def _record_mtime(mtimes: list, path: str, root: str):
    """Append (``path`` relative to ``root``, its modification time), or -1 (never current) when the
    time is too recent to be trusted."""
    mtime = os.stat(path).st_mtime_ns
    mtimes.append((os.path.relpath(path, root), mtime if time.time_ns() - mtime >= SETTLE_NS else -1))


def _walk(top: str, mtimes: list, root: str) -> list[tuple[str, list[str]]]:
    """``sorted(os.walk(top, followlinks=True))`` as (folder, file names), listing errors raised."""
    walked, pending = [], [top]
    while pending:
        folder = pending.pop()
        folders, files = _listing(folder, mtimes, root)
        walked.append((folder, files))
        pending.extend(os.path.join(folder, name) for name in folders)
    return sorted(walked)


def scan_class_folders(root: str, folder: str, classes: list[str] | None = None):
    """(paths, labels, classes, folder mtimes) of ``root/folder/<class>/...``: torchvision's
    ``make_dataset`` listing. No class folder, a class folder without an image, or class folders
    other than ``classes`` (the training split's, when given) are errors."""
    mtimes, top = [], os.path.join(root, folder)
    class_folders, loose = _listing(top, mtimes, root)
    if not class_folders:
        images = sum(map(is_image_file, loose))
        hint = (f" but {images} image files: a flat validation folder needs data.val_layout=ilsvrc_csv and "
                f"{SOLUTION_CSV}" if images else "")
        raise InputError(f"{top!r} holds no class folders{hint} (expected {folder}/<class>/<image>, e.g. "
                         f"{folder}/n01440764/*.JPEG)")
    if classes is not None and sorted(class_folders) != classes:
        missing, extra = sorted(set(classes) - set(class_folders)), sorted(set(class_folders) - set(classes))
        differences = [f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
                       for names, what in ((missing, "missing"), (extra, "not in training")) if names]
        raise InputError(f"the class folders of {top!r} differ from the training split's: {'; '.join(differences)}")
    classes = sorted(class_folders)
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        count = len(paths)
        for directory, files in _walk(os.path.join(top, name), mtimes, root):
            prefix = directory + os.sep  # os.path.join(directory, file), without its per-call checks
            images = [prefix + file for file in sorted(files) if is_image_file(file)]
            paths += images
            labels += [label] * len(images)
        if len(paths) == count:
            empty.append(name)
    if empty:
        raise InputError(f"class folder(s) without an image in {top!r}: {', '.join(empty[:5])}"
                         f"{f' and {len(empty) - 5} more' if len(empty) > 5 else ''} (image extensions: "
                         f"{', '.join(IMG_EXTENSIONS)}); remove them or complete the extraction")
    return paths, labels, classes, mtimes


def scan_flat_val(root: str, folder: str, classes: list[str]):
    """(paths, labels, classes, mtimes) of a flat ILSVRC validation folder labelled by
    ``LOC_val_solution.csv``: the images sorted by name, each with the first synset of its row."""
    mtimes, top = [], os.path.join(root, folder)
    class_folders, files = _listing(top, mtimes, root)
    images = sorted(name for name in files if is_image_file(name))
    csv_path = next((path for path in (os.path.join(root, SOLUTION_CSV), os.path.join(top, SOLUTION_CSV))
                     if os.path.isfile(path)), None)
    expected = f"data.val_layout=ilsvrc_csv expects {folder}/ILSVRC2012_val_XXXXXXXX.JPEG and {SOLUTION_CSV} in {root!r} or {top!r}"
    if not images or csv_path is None:
        found = (f"{top!r} holds {len(class_folders)} class folders: set data.val_layout=class_folders"
                 if class_folders and not images else f"{SOLUTION_CSV} not found" if images else f"{top!r} holds no images")
        raise InputError(f"{expected}; {found}")
    _record_mtime(mtimes, csv_path, root)
    solution = _read_solution(csv_path)
    unlabelled = [name for name in images if os.path.splitext(name)[0] not in solution]
    if unlabelled:
        raise InputError(f"{len(unlabelled)} images of {top!r} have no row in {csv_path!r}, e.g. {unlabelled[0]}")
    index = {name: label for label, name in enumerate(classes)}
    labels = []
    for name in images:
        synset = solution[os.path.splitext(name)[0]]
        if synset not in index:
            raise InputError(f"{csv_path!r}: {name} is labelled {synset!r}, not a class folder of the training split")
        labels.append(index[synset])
    return [os.path.join(top, name) for name in images], labels, classes, mtimes


def _read_solution(path: str) -> dict[str, str]:
    """``ImageId`` -> the first synset of ``PredictionString`` (``"n01751748 x0 y0 x1 y1 ..."``)."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
            raise InputError(f"{path!r}: expected the columns ImageId,PredictionString, got {reader.fieldnames}")
        solution = {}
        for line, row in enumerate(reader, start=2):
            tokens = (row["PredictionString"] or "").split()
            if not tokens:
                raise InputError(f"{path!r} line {line}: empty PredictionString for {row['ImageId']!r}")
            solution[row["ImageId"]] = tokens[0]
    return solution
