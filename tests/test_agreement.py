"""Tests for clsvit.data.agreement: what identifies a split (a folder listing's digest, parquet shard
footers), the main process's listing served as it is by the others, and the one line that stops a
launch whose processes loaded different data. The 2-process runs are in test_imagefolder.py (a
folder changed after the main process's scan) and test_fault_tolerance.py (processes that see
different trees)."""

import shutil
from pathlib import Path

import datasets
import datasets.config
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Features
from datasets import Image as ImageFeature
from torchvision.datasets import ImageFolder

from clsvit.data.agreement import DataIdentity, SplitIdentity, disagreement, identify, split_digest
from clsvit.data.imagefolder import Listing, listing_digest, listing_of, load_folder_splits
from clsvit.data.parquet import ParquetRows
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
    assert "(their class names differ)" in disagreement([same, identity(120_000, "a", ("a", "c"))], "x")


def test_the_identity_goes_into_provenance_whole():
    assert identity(5, "a").as_dict() == {"splits": {"train": {"rows": 5, "digest": "a" * 64},
                                                     "validation": {"rows": 10, "digest": "e" * 64}}, "num_classes": 2}
