"""Tests for clsvit.data.agreement: what identifies a split (a folder listing's digest, parquet shard
footers), the main process's listing served as it is by the others, and the one line that stops a
launch whose processes loaded different data. Two processes run here as accelerate's debug_launcher
forks them (gloo), each on its own "node" folder; the launches of train.py and eval.py are in
test_imagefolder.py (a folder changed after the main process's scan) and test_fault_tolerance.py
(processes that see different trees)."""

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import datasets
import datasets.config
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from accelerate import PartialState
from accelerate.launchers import debug_launcher
from accelerate.state import AcceleratorState
from datasets import ClassLabel, Features
from datasets import Image as ImageFeature
from torchvision.datasets import ImageFolder

from clsvit.data.agreement import (DataIdentity, SplitIdentity, _listings, _stop, disagreement, identify,
                                   load_splits_on_every_process, shard_footers, split_digest)
from clsvit.data.imagefolder import Listing, listing_digest, listing_of, load_folder_splits
from clsvit.data.parquet import ParquetRows
from clsvit.errors import InputError
from test_imagefolder import class_tree, link, rebatch, samples, settle, sources  # noqa: F401 (a fixture)
from test_parquet import write_split


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def tree(root: Path, sources, classes=("a", "b", "c"), per_class=5) -> Path:
    class_tree(root, sources, list(classes), per_class=per_class)
    class_tree(root, sources, list(classes), per_class=1, split="val")
    settle(root)
    return root


def load(root: Path, listings=None) -> dict:
    return load_folder_splits(str(root), "train", "validation", "class_folders", listings=listings)


def test_a_folder_digest_is_that_of_torchvisions_listing_whatever_the_batches(tmp_path, sources, hf_cache):
    root = tree(tmp_path / "tree", sources)
    train = load(root)["train"]
    reference = ImageFolder(str(root / "train"))  # the same listing, built independently
    features = Features(image=ImageFeature(), label=ClassLabel(names=reference.classes))
    table = pa.Table.from_pylist([{"image": {"bytes": None, "path": path}, "label": label}
                                  for path, label in reference.samples], schema=features.arrow_schema)
    assert listing_of(train).digest == listing_digest(table) == split_digest(train)
    assert listing_of(train).rows == len(reference.samples) == 15
    index = Path(listing_of(train).path)
    rebatch(index, rows_per_batch=4)  # the same rows in other record batches: the same listing, served
    assert listing_of(load(root)["train"]) == listing_of(train)


@pytest.mark.parametrize("change", ["a file renamed", "a class renamed"])
def test_a_folder_digest_changes_with_any_path_or_class_name(tmp_path, sources, change):
    first = identify(load(tree(tmp_path / "one", sources)), 3, "label")
    second = tree(tmp_path / "two", sources)
    if change == "a file renamed":
        (second / "train" / "b" / "b_1.Png").rename(second / "train" / "b" / "b_1x.Png")
    else:
        shutil.move(second / "train" / "c", second / "train" / "d")
        shutil.move(second / "val" / "c", second / "val" / "d")
    (tmp_path / "one").rename(tmp_path / "gone")
    (tmp_path / "two").rename(tmp_path / "one")  # the same paths but for the change
    other = identify(load(tmp_path / "one"), 3, "label")
    assert [split.rows for split in other.splits] == [split.rows for split in first.splits] == [15, 3]
    assert other.splits[0].digest != first.splits[0].digest
    assert (other.classes == first.classes) == (change == "a file renamed")


def test_a_handed_listing_is_served_as_it_is(tmp_path, sources):
    """Another process's listing is served even when a folder changed after it was made (a file
    added: the folder's time moved); a listing its file does not hold is not."""
    root = tree(tmp_path / "tree", sources)
    handed = {split: listing_of(dataset) for split, dataset in load(root).items()}
    link(sources[0], root / "train" / "b" / "late.jpg")
    served = load(root, handed)
    assert {split: listing_of(dataset) for split, dataset in served.items()} == handed
    assert (str(root / "train" / "b" / "late.jpg"), 1) not in samples(served["train"])
    listed = load(root, {"train": Listing(handed["train"].path, 15, "0" * 64)})["train"]  # not what the file holds
    assert samples(listed) == ImageFolder(str(root / "train")).samples and len(listed) == 16


def test_parquet_digest_follows_the_shards_not_where_they_lie(tmp_path):
    shards = write_split(tmp_path / "one", "train", [10, 7])
    digest = split_digest(ParquetRows([str(p) for p in shards]))
    shutil.copytree(tmp_path / "one", tmp_path / "two")  # a node's own copy
    copies = [str(tmp_path / "two" / p.name) for p in shards]
    assert split_digest(ParquetRows(copies)) == digest
    table = pq.read_table(copies[1])  # the same rows and schema, one image byte changed
    images = table.column("image").to_pylist()
    images[3]["bytes"] = images[3]["bytes"].replace(b"image", b"imagf")
    pq.write_table(table.set_column(0, "image", pa.array(images, table.schema.field("image").type)), copies[1],
                   row_group_size=7)
    changed = ParquetRows(copies)
    assert len(changed) == 17 and split_digest(changed) != digest


def test_other_datasets_are_identified_by_their_cache_files_or_content():
    rows = {"image": ["a.jpg", "b.jpg"], "label": [0, 1]}
    in_memory = datasets.Dataset.from_dict(rows)
    assert split_digest(in_memory) == split_digest(datasets.Dataset.from_dict(rows))
    assert split_digest(in_memory) != split_digest(datasets.Dataset.from_dict({**rows, "label": [1, 0]}))


def test_a_dataset_from_cache_files_is_identified_by_their_names_and_sizes(tmp_path):
    """A dataset memory-mapped from its Arrow cache files: the same digest from a copy of the files
    in another folder (a node's own cache), another one when a file's size differs with the same
    rows and features, or for fewer rows of the same files."""
    rows = {"image": ["a.jpg", "b.jpg"], "label": [0, 1]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    shutil.copytree(tmp_path / "one", tmp_path / "copy")
    datasets.Dataset.from_dict({**rows, "image": ["a-longer-name.jpg", "b.jpg"]}).save_to_disk(str(tmp_path / "other"))
    one, copy, other = (datasets.load_from_disk(str(tmp_path / name)) for name in ("one", "copy", "other"))
    assert one.cache_files and one.cache_files[0]["filename"] != copy.cache_files[0]["filename"]
    assert split_digest(one) == split_digest(copy) != split_digest(other)
    first_row = one.select(range(1))  # a slice of the same memory-mapped file
    assert first_row.cache_files == one.cache_files and split_digest(first_row) != split_digest(one)
    assert len(other) == len(one) and other.features == one.features


def write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_shard_footers_name_each_file_from_their_common_folder_and_hash_its_footer(tmp_path):
    """Per file: [its path relative to the folder the files share, its size], then the SHA-256 of
    its footer, the bytes before the last 8 that pyarrow's FileMetaData.serialized_size counts; an
    encrypted footer (the file ends with "PARE", parquet-format's Encryption.md) as well."""
    shards = write_split(tmp_path / "a", "train", [5]) + write_split(tmp_path / "b" / "c", "train", [3])
    encrypted = write_bytes(tmp_path / "a" / "encrypted.parquet",
                            b"PARE" + b"data" + b"footer 10" + (9).to_bytes(4, "little") + b"PARE")
    parts = list(shard_footers([str(path) for path in shards] + [encrypted]))
    names = ["a/train-00000-of-00001.parquet", "b/c/train-00000-of-00001.parquet", "a/encrypted.parquet"]
    assert [json.loads(part) for part in parts[0::2]] == [[name, (tmp_path / name).stat().st_size] for name in names]
    footers = []
    for path in shards:
        data, length = path.read_bytes(), pq.read_metadata(path).serialized_size
        footers.append(data[len(data) - 8 - length:len(data) - 8])
    assert parts[1::2] == [hashlib.sha256(footer).digest() for footer in [*footers, b"footer 10"]]


def test_a_footer_that_fills_the_file_after_its_leading_magic_is_read(tmp_path):
    """The longest footer a file can hold fills everything between the leading "PAR1" and the last 8
    bytes, as in pyarrow's file of a table with no column."""
    path = tmp_path / "no-column.parquet"
    pq.write_table(pa.table({}), path)
    data, length = path.read_bytes(), pq.read_metadata(path).serialized_size
    assert len(data) == 4 + length + 8
    assert list(shard_footers([str(path)]))[1] == hashlib.sha256(data[4:-8]).digest()


def test_a_file_without_a_parquet_footer_is_named_with_its_size(tmp_path):
    """A file that does not end with a footer (not parquet, shorter than the 8 bytes that end one, or
    a footer length that leaves no room for the leading "PAR1") or cannot be read: a one-line error
    naming the file."""
    cases = {
        "image.jpg": b"\xff\xd8\xff\xe0" + bytes(96),
        "short.parquet": b"PAR1",
        "overlong.parquet": b"PAR1" + bytes(20) + (21).to_bytes(4, "little") + b"PAR1",  # 32 bytes: at most 20
    }
    for name, data in cases.items():
        path = write_bytes(tmp_path / name, data)
        with pytest.raises(InputError) as raised:
            list(shard_footers([path]))
        assert str(raised.value) == f"{path} is not a parquet file: it does not end with a footer ({len(data)} bytes)"
    missing = str(tmp_path / "gone.parquet")
    with pytest.raises(InputError) as raised:
        list(shard_footers([missing]))
    assert str(raised.value) == f"cannot read the footer of {missing} (FileNotFoundError: No such file or directory)"


def identity(train_rows: int, digest: str, classes=("a", "b")) -> DataIdentity:
    return DataIdentity((SplitIdentity("train", train_rows, digest * 64), SplitIdentity("validation", 10, "e" * 64)),
                        classes, len(classes))


def test_a_disagreement_is_one_line_naming_the_processes_and_what_each_loaded():
    same, other = identity(120_000, "a"), identity(119_999, "b")
    message = disagreement([same, same, other, same, same, "data.path '/scratch/imagenet' does not exist"],
                           "data.source=imagefolder data.path='/scratch/imagenet'")
    assert message == (
        "the processes loaded different data from data.source=imagefolder data.path='/scratch/imagenet': "
        f"processes 0-1, 3-4: train 120,000 images (digest {'a' * 12}), validation 10 images (digest {'e' * 12}), "
        f"2 classes; process 2: train 119,999 images (digest {'b' * 12}), validation 10 images (digest {'e' * 12}), "
        "2 classes; process 5: data.path '/scratch/imagenet' does not exist; every process must see the same files "
        "(a node's own copy of the tree or datasets cache that differs, or data that changed while the launch started)")
    renamed = identity(120_000, "a", ("a", "c"))  # the same listing digest: only the class names tell them apart
    assert disagreement([same, same, renamed], "data.source=parquet data.path='/data'") == (
        "the processes loaded different data from data.source=parquet data.path='/data' (their class names differ): "
        f"processes 0-1: {same.describe()}; process 2: {renamed.describe()}; {EVERY_PROCESS}")


def test_an_identity_without_labels_names_no_classes():
    unlabelled = DataIdentity((SplitIdentity("train", 1_281_167, "c" * 64),), None, None)
    assert unlabelled.describe() == f"train 1,281,167 images (digest {'c' * 12})"


def test_the_identity_goes_into_provenance_whole():
    assert identity(5, "a").as_dict() == {"splits": {"train": {"rows": 5, "digest": "a" * 64},
                                                     "validation": {"rows": 10, "digest": "e" * 64}}, "num_classes": 2}


DATA = dict(source="imagefolder", path="/proc/self/cwd/imagenet", train_split="train", val_split="validation",
            val_layout="class_folders", image_column="image", label_column="label")
SOURCE = "data.source=imagefolder data.path='/proc/self/cwd/imagenet'"
CWD_CACHE = Path("/proc/self/cwd/hf_cache")  # each process's own node's datasets cache
EVERY_PROCESS = ("every process must see the same files (a node's own copy of the tree or datasets cache that "
                 "differs, or data that changed while the launch started)")


def nodes(tmp_path: Path, sources, trees: dict) -> Path:
    """``nodes/node<r>/imagenet`` for each process r: ``trees[r]`` is its train images per class (3
    classes, 1 validation image each), None for no tree, "node0" for a link to node 0's tree."""
    for rank, per_class in trees.items():
        node = tmp_path / "nodes" / f"node{rank}"
        node.mkdir(parents=True)
        if per_class == "node0":
            (node / "imagenet").symlink_to(tmp_path / "nodes" / "node0" / "imagenet")
        elif per_class is not None:
            tree(node / "imagenet", sources, per_class=per_class)
    return tmp_path / "nodes"


def _on_node(nodes: Path, own_cache: bool, results: Path):
    """One process of a 2-process launch: its working directory is its node (data.path and, unless
    ``own_cache``, the datasets cache are under /proc/self/cwd, as on nodes with local copies);
    with ``own_cache`` the datasets cache is node<r>/hf_cache, the main process's readable by every
    process. Writes what the process loaded, or how it stopped, to results/rank<r>.json."""
    AcceleratorState._reset_state(reset_partial_state=True)
    state = PartialState(cpu=True, timeout=timedelta(seconds=60))
    rank = state.process_index
    os.chdir(nodes / f"node{rank}")
    datasets.config.HF_DATASETS_CACHE = nodes / f"node{rank}" / "hf_cache" if own_cache else CWD_CACHE
    try:
        train, val, num_classes, identity = load_splits_on_every_process(DATA, state)
        outcome = {"identity": [identity.as_dict(), list(identity.classes)], "listing": asdict(listing_of(train)),
                   "rows": [len(train), len(val), num_classes]}
    except InputError as error:
        outcome = {"InputError": str(error)}
    except SystemExit as stop:
        outcome = {"SystemExit": stop.code}
    (results / f"rank{rank}.json").write_text(json.dumps(outcome))


def loaded_on(node: Path, monkeypatch, cache: Path = CWD_CACHE):
    """What one process loads on ``node`` (its identity and train listing), or the InputError it raises."""
    monkeypatch.chdir(node)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    try:
        train, _, _, identity = load_splits_on_every_process(DATA, PartialState(cpu=True))
    except InputError as error:
        return str(error)
    return identity, listing_of(train)


def launch(nodes: Path, own_cache: bool = False) -> list[dict]:
    results = nodes.parent / "results"
    results.mkdir()
    debug_launcher(_on_node, args=(nodes, own_cache, results), num_processes=2)
    return [json.loads((results / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_one_process_serves_its_own_splits_and_names_them(tmp_path, sources, monkeypatch):
    """One process: the splits load_splits gives, identified by name, rows (torchvision's count),
    folder listing digest and class names; its loading error raised as it is."""
    root = nodes(tmp_path, sources, {0: 5, 1: None})
    identity, listing = loaded_on(root / "node0", monkeypatch)
    reference = ImageFolder(str(root / "node0" / "imagenet" / "train"))
    assert listing.rows == len(reference.samples) == 15
    assert identity == DataIdentity((SplitIdentity("train", 15, listing.digest),
                                     SplitIdentity("validation", 3, identity.splits[1].digest)), ("a", "b", "c"), 3)
    assert identity.splits[1].digest != listing.digest
    missing = loaded_on(root / "node1", monkeypatch)
    assert isinstance(missing, str) and "/proc/self/cwd/imagenet" in missing


def test_the_other_process_serves_the_main_process_listing(tmp_path, sources, monkeypatch):
    """Two processes on one tree, each with its own datasets cache: the other process serves the
    index the main process listed (its file, in the main process's cache) instead of listing the
    tree itself; both return the splits and identity one process gets."""
    root = nodes(tmp_path, sources, {0: 5, 1: "node0"})
    identity, listing = loaded_on(root / "node0", monkeypatch, cache=root / "node0" / "hf_cache")
    expected = {"identity": [identity.as_dict(), ["a", "b", "c"]], "listing": asdict(listing), "rows": [15, 3, 3]}
    assert launch(root, own_cache=True) == [expected, expected]
    assert not (root / "node1" / "hf_cache").exists()


def test_processes_that_loaded_different_trees_stop_with_one_line(tmp_path, sources, monkeypatch):
    """Process 1's node holds one image more per class: the main process stops with the line naming
    each process and what it loaded, the other exits with status 2."""
    root = nodes(tmp_path, sources, {0: 5, 1: 6})
    (identity0, _), (identity1, _) = loaded_on(root / "node0", monkeypatch), loaded_on(root / "node1", monkeypatch)
    assert [split.rows for split in identity1.splits] == [18, 3]
    assert launch(root) == [
        {"InputError": f"the processes loaded different data from {SOURCE}: process 0: {identity0.describe()}; "
                       f"process 1: {identity1.describe()}; {EVERY_PROCESS}"},
        {"SystemExit": 2}]


def test_a_process_that_cannot_load_stops_every_process(tmp_path, sources, monkeypatch):
    """The main process's loading error is raised as it is and the other process does not load;
    another process's error is named in the main process's line next to what the main process loaded."""
    root = nodes(tmp_path / "main", sources, {0: None, 1: 5})
    error = loaded_on(root / "node0", monkeypatch)
    assert launch(root) == [{"InputError": error}, {"SystemExit": 2}]
    root = nodes(tmp_path / "other", sources, {0: 5, 1: None})
    (identity0, _), error = loaded_on(root / "node0", monkeypatch), loaded_on(root / "node1", monkeypatch)
    assert launch(root) == [
        {"InputError": f"the processes loaded different data from {SOURCE}: process 0: {identity0.describe()}; "
                       f"process 1: {error}; {EVERY_PROCESS}"},
        {"SystemExit": 2}]


def test_only_folder_splits_hand_a_listing_over(tmp_path, sources):
    """The listings the main process hands over: one per split served from a folder index, none for
    a split of another kind."""
    train = load(tree(tmp_path / "tree", sources))["train"]
    in_memory = datasets.Dataset.from_dict({"image": ["a.jpg"], "label": [0]})
    assert _listings({"train": train, "validation": in_memory}) == {"train": listing_of(train)}
    assert listing_of(train) is not None and listing_of(in_memory) is None


def test_a_stopping_process_leaves_with_the_main_process_error_or_status_2():
    """Outside a process group: the main process's error is raised as it is, another process exits
    with status 2 (no message of its own: the main process's line is the one the launcher shows)."""
    error = InputError("data.path '/scratch/imagenet' does not exist")
    with pytest.raises(InputError) as raised:
        _stop(error)
    assert raised.value is error
    with pytest.raises(SystemExit) as stopped:
        _stop(None)
    assert stopped.value.code == 2
