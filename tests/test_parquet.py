"""Parquet shards read in place (clsvit.data.parquet, the parquet and hub sources of clsvit.data): the rows
are pyarrow's, nothing is copied into the datasets cache, and a hub snapshot is read where it lies."""

import pickle
import random

import datasets
import datasets.config
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature

from clsvit import data as D
from clsvit.errors import InputError
from clsvit.data.parquet import ParquetRows

NAMES = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture(autouse=True)
def offline_hf_cache(tmp_path, monkeypatch):
    """The datasets and hub caches are temporary directories, and nothing is ever downloaded."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write_split(folder, split: str, sizes: list[int], row_group: int = 7, start: int = 0) -> list:
    """Shards ``<split>-0000k-of-0000n.parquet`` written by ``datasets`` (its schema metadata holds
    the features) with ``row_group`` rows per row group; returns the shard paths."""
    paths, row = [], start
    for k, size in enumerate(sizes):
        rows = range(row, row + size)
        shard = Dataset.from_dict(
            {"image": [{"bytes": f"image {i}".encode(), "path": f"{split}_{i}.JPEG"} for i in rows],
             "label": [i % len(NAMES) for i in rows]},
            features=Features(image=ImageFeature(decode=False), label=ClassLabel(names=NAMES)))
        path = folder / f"{split}-{k:05d}-of-{len(sizes):05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(shard.data.table, path, row_group_size=row_group)
        paths.append(path)
        row += size
    return paths


def pyarrow_rows(paths) -> list[dict]:
    return pa.concat_tables(pq.read_table(p) for p in paths).to_pylist()


def data_cfg(**overrides) -> dict:
    return {"source": "parquet", "path": None, "train_split": "train", "val_split": "validation",
            "image_column": "image", "label_column": "label", **overrides}


def test_rows_are_pyarrows_in_any_order(tmp_path):
    paths = write_split(tmp_path, "train", [30, 5, 18])
    expected = pyarrow_rows(paths)
    rows = ParquetRows([str(p) for p in paths])
    assert len(rows) == len(expected) == 53
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)  # row groups leave the cache and are read again
    assert [rows[i] for i in order] == [expected[i] for i in order]
    assert rows.features["label"] == ClassLabel(names=NAMES)
    with pytest.raises(IndexError):
        rows[53]


def test_views_select_and_cast_without_touching_the_data(tmp_path):
    paths = write_split(tmp_path, "train", [10])
    rows = ParquetRows([str(p) for p in paths]).select_columns(["label"])
    assert rows.column_names == ["label"] and rows[4] == {"label": 1}
    with pytest.raises(InputError, match="'nope'.*image, label"):
        ParquetRows([str(p) for p in paths]).cast_column("nope", Value("int64"))
    decoded = ParquetRows([str(p) for p in paths]).cast_column("image", ImageFeature(decode=False))
    assert decoded[3]["image"] == {"bytes": b"image 3", "path": "train_3.JPEG"}


def test_workers_open_their_own_files(tmp_path):
    paths = write_split(tmp_path, "train", [20, 20])
    rows = ParquetRows([str(p) for p in paths])
    rows[0]  # this process has the file open and a row group cached; a worker gets neither
    assert pickle.loads(pickle.dumps(rows))[39] == rows[39]
    loader = torch.utils.data.DataLoader(rows, batch_size=None, num_workers=2, collate_fn=lambda row: row["label"])
    assert list(loader) == [row["label"] for row in pyarrow_rows(paths)]


def test_load_splits_reads_in_place_and_writes_no_cache(tmp_path):
    train_paths = write_split(tmp_path / "pq" / "data", "train", [12, 9])
    val_paths = write_split(tmp_path / "pq" / "data", "validation", [8], start=100)
    train, val, num_classes = D.load_splits(data_cfg(path=str(tmp_path / "pq")))
    assert num_classes == len(NAMES)
    assert [train[i] for i in range(len(train))] == pyarrow_rows(train_paths)
    assert [val[i] for i in range(len(val))] == pyarrow_rows(val_paths)
    assert not (tmp_path / "datasets_cache").exists() or not any((tmp_path / "datasets_cache").rglob("*"))


def test_hub_snapshot_is_read_where_it_lies(tmp_path):
    """The layout huggingface_hub's snapshot_download leaves: refs/main names the snapshot folder."""
    repo = tmp_path / "hub_cache" / "datasets--ILSVRC--imagenet-1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit / "data"
    train_paths = write_split(snapshot, "train", [10, 10])
    write_split(snapshot, "validation", [6])
    write_split(snapshot, "test", [4])
    train, val, _ = D.load_splits(data_cfg(source="hub", path="ILSVRC/imagenet-1k"))
    assert train.files == [str(p) for p in train_paths] and len(val) == 6
    assert [train[i] for i in range(len(train))] == pyarrow_rows(train_paths)
    assert not (tmp_path / "datasets_cache").exists() or not any((tmp_path / "datasets_cache").rglob("*"))


def test_hub_dataset_not_in_the_cache_offline_is_one_line(tmp_path):
    with pytest.raises(InputError, match="data.path 'nobody-xyz/no-such-dataset': cannot load") as error:
        D.load_splits(data_cfg(source="hub", path="nobody-xyz/no-such-dataset"))
    assert "\n" not in str(error.value)


def test_num_classes_without_classlabel_reads_only_the_label_column(tmp_path):
    for split, labels in (("train", [0, 4, 2]), ("validation", [1, 6])):
        table = pa.table({"image": [{"bytes": b"x", "path": None}] * len(labels), "label": labels})
        pq.write_table(table, tmp_path / f"{split}-0.parquet")
    assert D.load_splits(data_cfg(path=str(tmp_path)))[2] == 7


def test_bad_shards_are_one_line_errors_naming_the_file(tmp_path):
    good = write_split(tmp_path, "train", [5])[0]
    other = tmp_path / "train-00001-of-00002.parquet"
    pq.write_table(pa.table({"image": [b"x"], "target": [1]}), other)
    with pytest.raises(InputError, match="train-00001-of-00002.parquet has columns.*one schema") as error:
        ParquetRows([str(good), str(other)])
    assert "\n" not in str(error.value)
    broken = tmp_path / "broken" / "train-00000-of-00001.parquet"
    broken.parent.mkdir()
    broken.write_bytes(b"not parquet")
    with pytest.raises(InputError, match="train-00000-of-00001.parquet is not a readable parquet file"):
        ParquetRows([str(broken)])


def test_a_hub_download_fetches_the_wanted_splits_only():
    """The patterns go to snapshot_download, which filters the repository's files with this function."""
    from huggingface_hub.utils import filter_repo_objects
    repository = ["README.md", "data/train-00000-of-00294.parquet", "data/validation-00013-of-00014.parquet",
                  "data/test-00000-of-00028.parquet", "data/pretrain-00000-of-00001.parquet",
                  "train/part-0.parquet", "other/validation/part-1.parquet", "classes.py"]
    assert list(filter_repo_objects(repository, allow_patterns=D.split_patterns(["train", "validation"]))) == [
        "data/train-00000-of-00294.parquet", "data/validation-00013-of-00014.parquet", "train/part-0.parquet",
        "other/validation/part-1.parquet"]
