"""Parquet shards read in place (clsvit.data.parquet, the parquet and hub sources of clsvit.data): the rows
are pyarrow's, nothing is copied into the datasets cache, and a hub snapshot is read where it lies."""

import os
import pickle
import random
from pathlib import Path

import datasets
import datasets.config
import huggingface_hub.constants
import numpy as np
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


# ---------------------------------------------------------------- the row-group cache and the open files

def rows_of(path, sizes: list[int]) -> ParquetRows:
    """One shard of ``sum(sizes)`` rows (column ``i`` = the row number) in row groups of ``sizes``."""
    writer, start = None, 0
    for size in sizes:
        table = pa.table({"i": pa.array(range(start, start + size), pa.int64())})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=size)
        start += size
    writer.close()
    return ParquetRows([str(path)])


def test_a_sequential_pass_reads_each_row_group_once(tmp_path):
    rows = rows_of(tmp_path / "a.parquet", [10] * 6 + [3])
    assert rows.row_groups().tolist() == [10] * 6 + [3]
    assert [rows[i]["i"] for i in range(len(rows))] == list(range(63)) and rows.reads == 7


def test_the_cache_evicts_read_groups_first_then_the_least_recently_used(tmp_path):
    rows = rows_of(tmp_path / "a.parquet", [10] * 6)
    rows.cache_rows = 20  # 20 rows + the largest group: three groups of 10
    for group in (0, 1, 2, 3):  # one row of each: none read whole; group 3 evicts group 0, the least recently used
        rows[10 * group]
    assert rows.reads == 4
    for group in (1, 2, 3):
        rows[10 * group + 1]
    assert rows.reads == 4  # still cached
    rows[0]
    assert rows.reads == 5  # group 0 was evicted (it evicts group 1 now)
    for i in range(20, 30):  # group 2 read whole
        rows[i]
    rows[45]  # group 4 evicts group 2, although group 3 was used less recently
    rows[31]
    assert rows.reads == 6


def test_a_view_has_its_own_cache(tmp_path):
    """A column view reads only its columns into its own cache: the parent's rows keep theirs."""
    paths = write_split(tmp_path, "train", [30], row_group=10)
    rows = ParquetRows([str(p) for p in paths])
    assert rows[0]["image"] == {"bytes": b"image 0", "path": "train_0.JPEG"}  # the parent reads first
    labels = rows.select_columns(["label"])
    assert labels[1] == {"label": 1} and labels[12] == {"label": 0}
    assert rows[13] == {"image": {"bytes": b"image 13", "path": "train_13.JPEG"}, "label": 1}


def test_shards_with_other_column_types_are_refused(tmp_path):
    pq.write_table(pa.table({"image": [b"x"], "label": pa.array([1], pa.int64())}), tmp_path / "train-0.parquet")
    pq.write_table(pa.table({"image": [b"y"], "label": ["cat"]}), tmp_path / "train-1.parquet")
    with pytest.raises(InputError, match=r"train-1.parquet has columns image: binary, label: string, but "
                                         r".*train-0.parquet has image: binary, label: int64") as error:
        ParquetRows([str(tmp_path / "train-0.parquet"), str(tmp_path / "train-1.parquet")])
    assert "\n" not in str(error.value)


def test_open_files_are_bounded_300_shards_under_ulimit_256(tmp_path):
    """300 shards read in a random order twice, under a limit of 256 open files: at most
    OPEN_SHARDS files are open at once."""
    import resource

    from clsvit.data import parquet

    paths = [tmp_path / f"train-{k:05d}.parquet" for k in range(300)]
    for k, path in enumerate(paths):
        pq.write_table(pa.table({"i": [2 * k, 2 * k + 1]}), path)
    rows = ParquetRows([str(p) for p in paths])
    order = list(range(600)) * 2
    random.Random(0).shuffle(order)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_before = len(list(Path("/proc/self/fd").iterdir()))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        seen, most_open = [], 0
        for i in order:
            seen.append(rows[i]["i"])
            most_open = max(most_open, len(list(Path("/proc/self/fd").iterdir())))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert seen == order
    assert most_open - open_before <= parquet.OPEN_SHARDS + 1  # + the /proc/self/fd listing itself


def test_reading_keeps_no_file_backed_memory(tmp_path):
    """A pass over 48 MB of shards written by ``datasets`` leaves the process's file-backed memory
    (RssFile) where it was: the shards are read, not memory-mapped (pyarrow reads their uncompressed
    image column out of a memory map without a copy, and a mapped pass keeps every page it touched)."""
    rng = np.random.default_rng(0)
    paths = []
    for k in range(4):
        images = [{"bytes": rng.integers(0, 256, 110_000, dtype=np.uint8).tobytes(), "path": None} for _ in range(110)]
        path = tmp_path / f"train-{k}.parquet"
        Dataset.from_dict({"image": images}, features=Features(image=ImageFeature(decode=False))).to_parquet(
            str(path), batch_size=10)
        paths.append(str(path))
    rows = ParquetRows(paths)
    payload = 110_000

    def file_backed_kb() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssFile:")))

    before = file_backed_kb()
    assert all(len(rows[i]["image"]["bytes"]) == payload for i in range(len(rows)))
    assert file_backed_kb() - before < 8_000


# ---------------------------------------------------------------- shards that change or break

def one_line(error) -> str:
    from clsvit.cli import error_line
    line = error_line("train.py", error)
    assert "\n" not in line
    return line


def test_a_shard_truncated_or_replaced_after_the_launch_stops_naming_it(tmp_path):
    paths = write_split(tmp_path, "train", [20, 20], row_group=5)
    rows = ParquetRows([str(p) for p in paths])
    assert rows[0]["label"] == 0  # shard 0 open, its first row group cached
    size = paths[0].stat().st_size
    with open(paths[0], "r+b") as file:
        file.truncate(size // 2)
    with pytest.raises(InputError) as error:
        rows[7]
    assert one_line(error.value) == (f"train.py: error: parquet shard {paths[0]}, row group 1: the shard changed after "
                                     f"the launch read it ({size} bytes at launch, {size // 2} now); restore it, or "
                                     f"relaunch to train on the data as it is now")
    replacement = write_split(tmp_path / "new", "train", [6], row_group=3)[0]
    os.replace(replacement, paths[1])  # another file under the shard's name
    with pytest.raises(InputError, match=rf"^parquet shard {paths[1]}, row group 0: the shard changed after the launch "
                                         r"read it \(another file now has its name\)"):
        rows[20]
    assert ParquetRows([str(paths[1])])[5]["label"] == 5 % len(NAMES)  # a relaunch reads the shard as it is


def test_a_damaged_row_group_stops_naming_shard_and_group(tmp_path):
    """Zeros over a row group's data, written before the launch (the footer intact): the read fails
    in the DataLoader worker, and the run stops in one line naming the shard and the row group."""
    from clsvit.data.images import ImageClassDataset

    path = write_split(tmp_path, "train", [40], row_group=10)[0]
    metadata = pq.read_metadata(path)
    column = metadata.row_group(2).column(0)
    with open(path, "r+b") as file:
        file.seek(column.data_page_offset)
        file.write(b"\0" * column.total_compressed_size)
    dataset = ImageClassDataset(ParquetRows([str(path)]), lambda image: 0, num_classes=len(NAMES))
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=1, collate_fn=lambda batch: batch)
    with pytest.raises(InputError) as error:
        list(loader)
    assert one_line(error.value).startswith(f"train.py: error: parquet shard {path}, row group 2 cannot be read (")
    assert one_line(error.value).endswith("); the shard is damaged: download or write it again")


def test_a_shard_truncated_under_a_worker_is_an_error_not_a_bus_error(tmp_path):
    """A worker reads the shard while it is cut short (as a failed copy or download leaves it): the
    run stops in one line naming the shard; a memory-mapped read would die of SIGBUS instead."""
    paths = write_split(tmp_path, "train", [60], row_group=10)
    rows = ParquetRows([str(p) for p in paths])
    loader = iter(torch.utils.data.DataLoader(rows, batch_size=10, num_workers=1, prefetch_factor=1,
                                              collate_fn=lambda batch: [row["label"] for row in batch]))
    assert next(loader) == [i % len(NAMES) for i in range(10)]
    with open(paths[0], "r+b") as file:
        file.truncate(200)
    # the worker may be reading the next batch's row group as the shard is cut: then the read fails
    with pytest.raises(InputError, match=rf"parquet shard {paths[0]}, row group [1-5](: the shard changed after the "
                                         rf"launch| cannot be read \(OSError: File too short)"):
        list(loader)


# ---------------------------------------------------------------- the interface, against pyarrow's own reading

def test_constructor_arguments_select_columns_and_override_features(tmp_path):
    """``columns`` and ``features`` as the docstring says; paths may be ``Path`` objects; the row counts
    per row group are the footers' (pyarrow's metadata), as integers."""
    paths = write_split(tmp_path, "train", [12, 5], row_group=4)
    rows = ParquetRows(paths, columns=["label"])
    assert rows.files == [str(p) for p in paths] and rows.column_names == ["label"]
    assert list(rows.features) == ["label"] and rows.features["label"] == ClassLabel(names=NAMES)
    assert [rows[i] for i in range(len(rows))] == [{"label": row["label"]} for row in pyarrow_rows(paths)]
    footers = [pq.read_metadata(p) for p in paths]
    groups = rows.row_groups()
    assert groups.tolist() == [m.row_group(g).num_rows for m in footers for g in range(m.num_row_groups)] == [4, 4, 4, 4, 1]
    assert groups.dtype == np.int64
    as_ids = ParquetRows(paths, features=Features(image=ImageFeature(decode=False), label=Value("int64")))
    assert as_ids.features["label"] == Value("int64") and as_ids[16]["label"] == 16 % len(NAMES)


def test_one_column_of_every_row_is_pyarrows_read_of_that_column_alone(tmp_path):
    """``column`` reads only the column it is asked for: zeros over a row group of the image column
    (footer intact) leave the labels readable, as they are by pyarrow's read of that column."""
    paths = write_split(tmp_path, "train", [9, 4], row_group=3)
    image = pq.read_metadata(paths[1]).row_group(1).column(0)
    assert image.path_in_schema.startswith("image")
    with open(paths[1], "r+b") as file:
        file.seek(image.data_page_offset)
        file.write(b"\0" * image.total_compressed_size)
    with pytest.raises(OSError):
        pq.read_table(paths[1])
    labels = ParquetRows(paths).column("label")
    assert labels.equals(pa.concat_tables(pq.read_table(p, columns=["label"]) for p in paths).column("label"))
    assert labels.to_pylist() == [i % len(NAMES) for i in range(13)]


def test_the_interfaces_errors_name_what_is_wrong(tmp_path):
    """Every refusal is one line naming the file or value; an OS error is quoted by its type and first line,
    cut at 200 characters."""
    with pytest.raises(InputError, match=r"^ParquetRows needs at least one parquet file$"):
        ParquetRows([])
    missing = tmp_path / ("d" * 240 + ".parquet")
    with pytest.raises(InputError) as error:
        ParquetRows([missing])
    assert str(error.value) == (f"{missing} is not a readable parquet file "
                                f"(FileNotFoundError: {f'[Errno 2] No such file or directory: {str(missing)!r}'[:200]})")
    paths = write_split(tmp_path, "train", [6], row_group=4)
    rows = ParquetRows(paths)
    with pytest.raises(InputError) as error:
        rows.select_columns(["label", "caption", "box"])
    assert str(error.value) == f"column(s) caption, box not in {paths[0]}; available columns: image, label"
    with pytest.raises(InputError) as error:
        rows.cast_column("caption", Value("string"))
    assert str(error.value) == f"column 'caption' not in {paths[0]}; available columns: image, label"
    for outside in (6, -1):
        with pytest.raises(IndexError, match=rf"^row {outside} outside \[0, 6\)$"):
            rows[outside]
    assert rows[np.int64(5)] == pyarrow_rows(paths)[5]


def test_shards_differing_only_in_schema_metadata_are_one_split(tmp_path):
    """A shard written by ``datasets`` (features in the schema metadata) and one written by plain
    pyarrow with the same column types are one split; the features come from the first."""
    first = write_split(tmp_path, "train", [3])[0]
    plain = tmp_path / "train-00001-of-00002.parquet"
    pq.write_table(pq.read_table(first).replace_schema_metadata(None), plain)
    rows = ParquetRows([first, plain])
    assert len(rows) == 6 and rows.features["label"] == ClassLabel(names=NAMES)
    assert [rows[i] for i in range(6)] == pyarrow_rows([first]) * 2


# ---------------------------------------------------------------- the row-group cache, counted in reads

def test_the_cache_holds_cache_rows_plus_the_largest_group_and_no_more(tmp_path):
    """``cache_rows`` 0 (the default) keeps one group, even a group of 1 row beside one of 10; a cache
    of 20 rows + 10 keeps exactly three groups of 10, and a fourth evicts the least recently *used*
    one (not the first read)."""
    rows = rows_of(tmp_path / "a.parquet", [10, 1, 10])
    for i in (0, 10, 0, 10, 11, 0):  # groups 0, 1, 0, 1, 2, 0: each evicts the one before
        assert rows[i]["i"] == i
    assert rows.reads == 6
    rows = rows_of(tmp_path / "b.parquet", [10] * 5)
    rows.cache_rows = 20
    for i in (0, 10, 20, 1, 11, 21):  # three groups fit: no group is read twice
        rows[i]
    assert rows.reads == 3
    rows[2], rows[30]  # group 0 used last: group 3 evicts group 1
    assert rows.reads == 4
    rows[3], rows[22]
    assert rows.reads == 4
    rows[12]  # group 1 again: group 3 evicted, the cache holds 0, 2, 1 and nothing else
    assert rows.reads == 5
    rows[31]
    assert rows.reads == 6


def test_a_group_read_whole_leaves_first_even_when_used_last(tmp_path):
    """Groups 0 and 1 partly read, group 2 read whole: group 3 evicts group 2, then group 4
    (group 3 now read whole too) evicts group 3; groups 0 and 1 stay cached."""
    rows = rows_of(tmp_path / "a.parquet", [4] * 5)
    rows.cache_rows = 8  # three groups of 4
    rows[0], rows[4]
    for i in range(8, 12):
        rows[i]
    rows[12], rows[13], rows[14], rows[15]
    rows[16]
    assert rows.reads == 5
    rows[1], rows[5]
    assert rows.reads == 5


# ---------------------------------------------------------------- the open files, seen in /proc/self/fd

def open_shards(paths) -> list[int]:
    """Indices of ``paths`` this process holds open (what /proc/self/fd links to)."""
    links = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            links.add(os.readlink(fd))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return [k for k, path in enumerate(paths) if str(Path(path).resolve()) in links]


def test_the_least_recently_read_shard_is_closed_first(tmp_path, monkeypatch):
    from clsvit.data import parquet

    monkeypatch.setattr(parquet, "OPEN_SHARDS", 3)
    paths = [tmp_path / f"train-{k}.parquet" for k in range(5)]
    for k, path in enumerate(paths):
        pq.write_table(pa.table({"i": [k]}), path)
    rows = ParquetRows(paths)
    for k in (0, 1, 2):
        rows[k]
    assert open_shards(paths) == [0, 1, 2]
    rows[0], rows[3]  # shard 1 read least recently: closed
    assert open_shards(paths) == [0, 2, 3]
    rows[4]
    assert open_shards(paths) == [0, 3, 4]
    assert rows.reads == 6


# ---------------------------------------------------------------- shards changed in place

def rewrite_in_place(path, content: bytes) -> None:
    """``content`` written into the shard's own file (same inode), its modification time restored."""
    stat = os.stat(path)
    with open(path, "r+b") as file:
        file.write(content)
        file.truncate(len(content))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def error_of(call, *args) -> str:
    """``Type: first line of the message`` of what ``call(*args)`` raises (the exception, and the
    frames its traceback holds, freed on return)."""
    try:
        call(*args)
    except Exception as error:
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    raise AssertionError(f"{call} raised nothing")


def test_a_shard_rewritten_to_the_same_size_and_time_with_other_row_groups_stops(tmp_path):
    """The same rows in one row group instead of two, padded to the same size (bytes before the
    footer, which parquet readers skip), written over the shard with its time restored."""
    table = pa.table({"i": pa.array(range(10), pa.int64())})
    paths = [tmp_path / "train-0.parquet", tmp_path / "train-1.parquet"]
    pq.write_table(table, paths[0], row_group_size=5)
    pq.write_table(table, paths[1], row_group_size=5)
    pq.write_table(table, tmp_path / "one_group.parquet", row_group_size=10)
    one_group = (tmp_path / "one_group.parquet").read_bytes()
    footer = 8 + int.from_bytes(one_group[-8:-4], "little")
    padding = paths[1].stat().st_size - len(one_group)
    assert padding > 0
    padded = one_group[:-footer] + b"\0" * padding + one_group[-footer:]
    rows = ParquetRows(paths)
    assert rows[0] == {"i": 0}  # shard 0 open, shard 1 not yet
    rewrite_in_place(paths[1], padded)
    assert pq.read_metadata(paths[1]).num_row_groups == 1 and pq.read_table(paths[1]).equals(table)
    with pytest.raises(InputError) as error:
        rows[12]
    assert str(error.value) == (f"parquet shard {paths[1]}, row group 0: the shard's row groups changed after the "
                                f"launch read it; restore it, or relaunch to train on the data as it is now")


def test_a_shard_touched_deleted_or_with_a_damaged_footer_stops_naming_it(tmp_path):
    paths = write_split(tmp_path, "train", [6, 6, 6], row_group=3)
    rows = ParquetRows(paths)
    stat = paths[0].stat()
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(InputError) as error:
        rows[4]
    assert str(error.value) == (f"parquet shard {paths[0]}, row group 1: the shard changed after the launch read it "
                                f"(modified since); restore it, or relaunch to train on the data as it is now")
    paths[1].unlink()
    with pytest.raises(InputError) as error:
        rows[6]
    assert str(error.value) == (f"parquet shard {paths[1]}, row group 0: the shard cannot be read any more "
                                f"(FileNotFoundError: [Errno 2] No such file or directory: {str(paths[1])!r})")
    content = paths[2].read_bytes()
    rewrite_in_place(paths[2], content[:-4] + b"\0" * 4)  # the magic bytes after the footer
    pyarrows = error_of(pq.ParquetFile, paths[2])
    assert pyarrows.startswith("ArrowInvalid: ")
    for _ in range(2):  # the shard was not left open: the second read fails the same way
        assert error_of(rows.__getitem__, 15) == (f"InputError: parquet shard {paths[2]}, row group 1 cannot be read "
                                                  f"({pyarrows}); the shard is damaged: download or write it again")
    assert open_shards(paths) == []


def test_a_damaged_row_group_is_closed_and_the_others_still_read(tmp_path):
    """Zeros over row group 2's data (footer intact): reading it fails as pyarrow's own read of that
    group fails, quoted by its first line; the shard's file is closed; the other groups read."""
    path = write_split(tmp_path, "train", [40], row_group=10)[0]
    column = pq.read_metadata(path).row_group(2).column(0)
    with open(path, "r+b") as file:
        file.seek(column.data_page_offset)
        file.write(b"\0" * column.total_compressed_size)
    pyarrows = error_of(pq.ParquetFile(path).read_row_group, 2)
    assert pyarrows.startswith("OSError: ")
    rows = ParquetRows([path])
    assert rows[5] == pq.ParquetFile(path).read_row_group(0).to_pylist()[5] and open_shards([path]) == [0]
    assert error_of(rows.__getitem__, 25) == (f"InputError: parquet shard {path}, row group 2 cannot be read "
                                              f"({pyarrows}); the shard is damaged: download or write it again")
    assert open_shards([path]) == []
    assert rows[35]["image"] == {"bytes": b"image 35", "path": "train_35.JPEG"}
