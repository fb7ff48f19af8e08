"""Where a split's rows come from (clsvit.data.sources): a hub dataset served offline from the hub cache
(its tree listing says what a complete snapshot holds), a local dataset without parquet files read by
``datasets``, and parquet shards found by a directory or a glob (Python's glob semantics), with the
one-line errors that name the path."""

import json

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub.errors import IncompleteSnapshotError
from PIL import Image

from clsvit import data as D
from clsvit.errors import InputError
from test_parquet import data_cfg, offline_hf_cache, pyarrow_rows, write_split  # noqa: F401 (autouse fixture)

REPO_ID = "ILSVRC/imagenet-1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with_tree(hub_cache, downloaded: list[str], listed: list[str]) -> dict:
    """The hub cache of ``REPO_ID`` as a download of the splits ``downloaded`` leaves it: refs/main,
    the snapshot folder with their shards, and the repository's tree listing ``trees/<commit>.json``
    in huggingface_hub's format (``huggingface_hub/_tree_cache.py``) naming all its files ``listed``.
    Returns the shard paths per split."""
    repo = hub_cache / "datasets--ILSVRC--imagenet-1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    paths = {split: write_split(repo / "snapshots" / COMMIT / "data", split, [4]) for split in downloaded}
    (repo / "trees").mkdir()
    files = {name: {"size": 1, "blob_id": f"{i:040x}"} for i, name in enumerate(listed)}
    (repo / "trees" / f"{COMMIT}.json").write_text(json.dumps({"format_version": 1, "files": files}))
    return paths


# ---------------------------------------------------------------- hub


def test_a_snapshot_of_the_wanted_splits_is_complete_offline_and_a_missing_split_quotes_the_hub(tmp_path):
    """A download of train + validation leaves those shards; the repository also has a test split and a
    README. Offline, huggingface_hub checks the snapshot against its cached tree listing for the patterns
    asked: train + validation are complete and read in place; asking for test stops in one line quoting
    the type and first line of huggingface_hub's own error."""
    listed = ["README.md", "data/train-00000-of-00001.parquet", "data/validation-00000-of-00001.parquet",
              "data/test-00000-of-00001.parquet"]
    paths = hub_cache_with_tree(tmp_path / "hub_cache", ["train", "validation"], listed)
    train, val, num_classes = D.load_splits(data_cfg(source="hub", path=REPO_ID))
    assert train.files == [str(p) for p in paths["train"]] and val.files == [str(p) for p in paths["validation"]]
    assert [val[i] for i in range(len(val))] == pyarrow_rows(paths["validation"]) and num_classes == 3

    with pytest.raises(IncompleteSnapshotError) as hub_error:
        huggingface_hub.snapshot_download(REPO_ID, repo_type="dataset", allow_patterns=D.split_patterns(
            ["train", "test"]))
    with pytest.raises(InputError) as error:
        D.load_splits(data_cfg(source="hub", path=REPO_ID, val_split="test"))
    first_line = str(hub_error.value).strip().splitlines()[0]
    assert "test-00000-of-00001.parquet" in first_line
    assert str(error.value) == (f"data.path {REPO_ID!r}: cannot load this dataset "
                                f"(IncompleteSnapshotError: {first_line[:200]})")


def test_a_local_dataset_without_parquet_files_is_what_datasets_loads(tmp_path):
    """data.source=hub with a local directory of images (datasets' imagefolder layout) and no parquet file:
    the splits are datasets.load_dataset's."""
    root = tmp_path / "pets"
    for split, count in (("train", 4), ("validation", 2)):
        for label, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (40 * i, 100 * label, 7)).save(root / split / name / f"{i}.png")
    train, val, num_classes = D.load_splits(data_cfg(source="hub", path=str(root)))
    reference = datasets.load_dataset(str(root))
    assert isinstance(train, datasets.Dataset) and num_classes == 2
    for ours, theirs in ((train, reference["train"]), (val, reference["validation"])):
        assert ours["label"] == theirs["label"] and len(ours) == len(theirs)
        assert ours.features == theirs.features
    assert sorted(train["label"]) == [0] * 4 + [1] * 4
    with pytest.raises(InputError) as error:
        D.load_splits(data_cfg(source="hub", path=str(root), val_split="test"))
    assert str(error.value) == f"data.val_split 'test' not found in {str(root)!r}; available splits: train, validation"


def test_labels_without_a_classlabel_count_to_the_largest_over_both_splits(tmp_path):
    """A local JSON-lines dataset (datasets' json builder, integer labels): 1 + the largest label of
    train [0, 4, 2] and validation [1, 6] is 7 classes."""
    for split, labels in (("train", [0, 4, 2]), ("validation", [1, 6])):
        (tmp_path / f"{split}.jsonl").write_text("".join(
            json.dumps({"image": f"{split}/{i}.png", "label": label}) + "\n" for i, label in enumerate(labels)))
    train, val, num_classes = D.load_splits(data_cfg(source="hub", path=str(tmp_path)))
    assert isinstance(train, datasets.Dataset) and (len(train), len(val), num_classes) == (3, 2, 7)


def test_a_classlabel_gives_its_classes_even_where_some_have_no_rows(tmp_path):
    """ClassLabel(num_classes=10) with labels 0-2 only (shards written by datasets): 10 classes."""
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(num_classes=10))
    for split in ("train", "validation"):
        datasets.Dataset.from_dict({"image": [{"bytes": b"x", "path": None}] * 3, "label": [0, 1, 2]},
                                   features=features).to_parquet(str(tmp_path / f"{split}-0.parquet"))
    assert D.load_splits(data_cfg(path=str(tmp_path)))[2] == 10


def test_unknown_sources_and_missing_columns_are_one_line_errors_naming_the_choices(tmp_path):
    with pytest.raises(InputError) as error:
        D.load_splits(data_cfg(source="webdataset"))
    assert str(error.value) == "data.source must be one of hub, imagefolder, parquet, shapes, got 'webdataset'"
    write_split(tmp_path, "train", [3])
    write_split(tmp_path, "validation", [3])
    with pytest.raises(InputError) as error:
        D.load_splits(data_cfg(path=str(tmp_path), image_column="jpg"))
    assert str(error.value) == "data.image_column 'jpg' not in split 'train'; available columns: image, label"


@pytest.mark.parametrize("message, quoted", [("", "ConnectionError"),
                                             ("Max retries exceeded\ncaused by NameResolutionError",
                                              "ConnectionError: Max retries exceeded")])
def test_a_hub_failure_is_quoted_by_its_first_line_or_its_type(monkeypatch, message, quoted):
    """A connection failure while reaching the hub (raised where huggingface_hub would raise it): the
    one-line error quotes its type and first line, or its type alone when it says nothing."""
    def unreachable(*args, **kwargs):
        raise ConnectionError(message)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(InputError) as error:
        D.load_splits(data_cfg(source="hub", path="org/dataset"))
    assert str(error.value) == f"data.path 'org/dataset': cannot load this dataset ({quoted})"


# ---------------------------------------------------------------- parquet: directories and globs

def table_file(path, rows: int = 2):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"i": list(range(rows))}), path)
    return str(path)


def files_of(splits) -> list[list[str]]:
    return [split.files for split in splits]


@pytest.mark.parametrize("glob", [False, True])
def test_only_folders_below_the_given_root_name_a_split(tmp_path, glob):
    """Shards train-0 and validation-0 in a folder that happens to be called ``train`` (under
    ``imagenet-X``: letters are no glob): the folder given, or the glob-free part of a glob, is the
    root, and its own name assigns no split."""
    folder = tmp_path / "imagenet-X" / "train"
    train, val = table_file(folder / "train-0.parquet"), table_file(folder / "validation-0.parquet")
    path = str(folder / "*.parquet") if glob else str(folder)
    assert files_of(D.load_raw_splits(data_cfg(path=path))) == [[train], [val]]


def test_a_double_star_glob_reaches_shards_at_any_depth(tmp_path):
    """``**`` matches zero or more folders (glob.glob(recursive=True)): the shards directly under the
    root, one folder down and three folders down all belong to the splits their names and folders say
    (in path order)."""
    root = tmp_path / "pq"
    top = table_file(root / "train-00000.parquet")
    one_down = table_file(root / "train" / "part-1.parquet")
    three_down = table_file(root / "extra" / "more" / "validation" / "part-0.parquet")
    (root / "notes.txt").write_text("not a shard")
    train, val = D.load_raw_splits(data_cfg(path=str(root / "**" / "*")))
    assert (train.files, val.files) == ([one_down, top], [three_down])


def test_parquet_paths_without_shards_are_one_line_errors_naming_them(tmp_path):
    for empty in ("", None):
        with pytest.raises(InputError) as error:
            D.load_raw_splits(data_cfg(path=empty))
        assert str(error.value) == "data.path is empty (parquet needs a directory or a glob)"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("no shards here")
    for path in (tmp_path / "docs", tmp_path / "docs" / "*"):
        with pytest.raises(InputError) as error:
            D.load_raw_splits(data_cfg(path=str(path)))
        assert str(error.value) == f"data.path {str(path)!r} matches no .parquet files"
    table_file(tmp_path / "flat" / "shard0.parquet")
    with pytest.raises(InputError) as error:
        D.load_raw_splits(data_cfg(path=str(tmp_path / "flat")))
    assert str(error.value) == (f"split 'train' not found in parquet data.path {str(tmp_path / 'flat')!r}; "
                                f"available splits: none")
