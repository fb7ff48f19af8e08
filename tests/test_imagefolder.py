"""Tests for clsvit.data.imagefolder: folder datasets listed as torchvision's ImageFolder lists them,
indexed once per tree, in ImageNet-1k's class order, in both validation layouts."""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import datasets.config
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from timm.data import ImageNetInfo
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from clsvit.errors import InputError
import clsvit.data.imagefolder as imagefolder
from clsvit.data.imagefolder import load_folder_splits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Every test indexes into its own empty datasets cache."""
    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A few small JPEG and PNG files that trees hard-link."""
    folder = tmp_path_factory.mktemp("sources")
    files = []
    for k in range(4):
        pixels = np.random.default_rng(k).integers(0, 256, (6, 8, 3), dtype=np.uint8)
        files.append(folder / f"{k}.{'png' if k == 3 else 'jpg'}")
        Image.fromarray(pixels).save(files[-1])
    return files


def link(source: Path, target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    os.link(source, target)


def samples(dataset) -> list[tuple[str, int]]:
    """(path, label) rows of a split, as torchvision's ``ImageFolder.samples``."""
    rows = dataset.cast_column("image", datasets.Image(decode=False))
    return [(row["image"]["path"], row["label"]) for row in rows]


def settle(root: Path):
    """Date every folder of the tree an hour back, as a tree that is not being written to."""
    past = time.time() - 3600
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


def class_tree(root: Path, sources, classes, per_class: int, split: str = "train"):
    """``root/split/<class>/`` with ``per_class`` hard-linked images each, in torchvision's extensions
    spelled in several cases, a nested folder, and files that are not images."""
    extensions = [".JPEG", ".jpg", ".Png", ".jpeg", ".webp"]
    for c, name in enumerate(classes):
        folder = root / split / name
        for k in range(per_class):
            nested = "sub/" if k % 7 == 3 else "sub-2/" if k % 11 == 5 else ""
            link(sources[k % 3], folder / f"{nested}{name}_{k}{extensions[(c + k) % len(extensions)]}")
        (folder / "README.txt").write_text("not an image")
        (folder / "labels.json").write_text("{}")
    (root / split / "LICENSE").write_text("a stray file next to the class folders")
    return root


def test_listing_equals_torchvision_imagefolder(tmp_path, sources):
    classes = [f"n{9000 - 37 * c:08d}" for c in range(12)] + ["zebra", "Aardvark", "n0-dash"]
    root = class_tree(tmp_path / "tree", sources, classes, per_class=200)
    class_tree(root, sources, classes, per_class=20, split="val")
    (root / "val" / "zebra" / "x.TIFF").write_bytes(b"")  # an image extension: listed, even if it cannot decode
    (root / "train" / "n00009000" / "linked").symlink_to(root / "train" / "zebra")  # folders behind symlinks are
    for split in ("train", "val"):                                                     # walked (followlinks=True)
        (root / split / "linked_class").symlink_to(root / split / "Aardvark")
    (root / "train" / "zebra" / "dangling.jpg").symlink_to(root / "nowhere.jpg")     # a file by its name
    splits = load_folder_splits(str(root), "train", "validation", "class_folders")
    for split, folder in (("train", "train"), ("validation", "val")):
        reference = ImageFolder(str(root / folder))
        assert len(reference.samples) == len(splits[split]) > 0
        assert samples(splits[split]) == reference.samples
        assert splits[split].features["label"].names == reference.classes
    # 15 classes of 200; zebra's dangling link; the linked class; zebra's 201 again behind n00009000/linked
    assert len(splits["train"]) == 15 * 200 + 1 + 200 + 201
    assert any("/sub/" in path for path, _ in samples(splits["train"]))


def test_a_symlink_loop_is_a_file_as_os_walk_takes_it(tmp_path, sources):
    """A link to itself cannot be stat'ed (ELOOP): os.walk, and so torchvision, takes it for a file."""
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=2)
    class_tree(root, sources, ["a", "b"], per_class=1, split="val")
    (root / "train" / "b" / "loop.jpg").symlink_to(root / "train" / "b" / "loop.jpg")
    train = load_folder_splits(str(root), "train", "validation", "class_folders")["train"]
    assert samples(train) == ImageFolder(str(root / "train")).samples
    assert (str(root / "train" / "b" / "loop.jpg"), 1) in samples(train)


def test_a_folder_that_links_to_itself_is_walked_as_os_walk_walks_it(tmp_path, sources):
    """Followed, a link to its own folder nests until the kernel refuses to resolve the path (ELOOP);
    os.walk, and so torchvision, takes the innermost link for a file and lists each nesting level."""
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=2)
    class_tree(root, sources, ["a", "b"], per_class=1, split="val")
    (root / "train" / "a" / "again").symlink_to(root / "train" / "a")
    train = load_folder_splits(str(root), "train", "validation", "class_folders")["train"]
    assert samples(train) == ImageFolder(str(root / "train")).samples
    assert len(train) > 20 * 2 + 2


def test_a_folder_removed_during_the_scan_is_one_line_naming_it(tmp_path, sources, monkeypatch):
    """Another program removes class folder b after train/ was listed and before b is: the scan
    stops with the folder and the system's reason."""
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=2)
    class_tree(root, sources, ["a", "b"], per_class=1, split="val")
    record_mtime = imagefolder._record_mtime

    def removed_first(mtimes, path, root_):
        if path.endswith(os.sep + "b"):
            shutil.rmtree(path)
        record_mtime(mtimes, path, root_)

    monkeypatch.setattr(imagefolder, "_record_mtime", removed_first)
    with pytest.raises(InputError) as error:
        load_folder_splits(str(root), "train", "validation", "class_folders")
    assert str(error.value) == (f"cannot list {str(root / 'train' / 'b')!r} "
                                f"(FileNotFoundError: {os.strerror(errno.ENOENT)})")


def test_images_decode_lazily_from_their_paths(tmp_path, sources):
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=3)
    class_tree(root, sources, ["a", "b"], per_class=1, split="val")
    train = load_folder_splits(str(root), "train", "validation", "class_folders")["train"]
    first = ImageFolder(str(root / "train"))[0][0]
    assert np.array_equal(np.asarray(train[0]["image"].convert("RGB")), np.asarray(first))


def flat_val(root: Path, sources, rows: dict[str, str], csv_in: str = "") -> Path:
    """A flat ``val/`` of ``ILSVRC2012_val_XXXXXXXX.JPEG`` and ILSVRC's ``LOC_val_solution.csv``
    (rows: image id -> PredictionString) in ``root`` or in ``root/csv_in``."""
    for k, image_id in enumerate(rows):
        link(sources[k % 3], root / "val" / f"{image_id}.JPEG")
    lines = ["ImageId,PredictionString"] + [f"{image_id},{value}" for image_id, value in rows.items()]
    (root / csv_in / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("csv_in", ["", "val"])
def test_flat_validation_labelled_by_loc_val_solution(tmp_path, sources, csv_in):
    classes = ["n01440764", "n01443537", "n01484850"]
    root = class_tree(tmp_path / "tree", sources, classes, per_class=2)
    rows = {"ILSVRC2012_val_00000003": "n01484850 10 20 30 40 n01440764 1 2 3 4",  # first synset labels
            "ILSVRC2012_val_00000001": "n01443537 0 0 5 5",
            "ILSVRC2012_val_00000002": "n01440764 1 1 2 2 n01440764 3 3 4 4"}
    flat_val(root, sources, rows, csv_in)
    (root / "val" / "notes.txt").write_text("not an image")
    val = load_folder_splits(str(root), "train", "validation", "ilsvrc_csv")["validation"]
    assert samples(val) == [(str(root / "val" / f"ILSVRC2012_val_0000000{k}.JPEG"), label)
                            for k, label in ((1, 1), (2, 0), (3, 2))]
    assert val.features["label"].names == classes


def test_flat_validation_errors_name_what_was_expected(tmp_path, sources):
    root = class_tree(tmp_path / "tree", sources, ["n01440764", "n01443537"], per_class=2)
    flat_val(root, sources, {"ILSVRC2012_val_00000001": "n01440764 0 0 5 5"})
    with pytest.raises(InputError, match="holds no class folders but 1 image files: a flat validation folder "
                                         "needs data.val_layout=ilsvrc_csv"):
        load_folder_splits(str(root), "train", "validation", "class_folders")
    link(sources[0], root / "val" / "ILSVRC2012_val_00000002.JPEG")
    with pytest.raises(InputError, match="1 images of .* have no row in .*LOC_val_solution.csv.*_00000002.JPEG"):
        load_folder_splits(str(root), "train", "validation", "ilsvrc_csv")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n09999999 1 1 2 2\n"
                                               "ILSVRC2012_val_00000002,n01440764 1 1 2 2\n")
    with pytest.raises(InputError, match="labelled 'n09999999', not a class folder of the training split"):
        load_folder_splits(str(root), "train", "validation", "ilsvrc_csv")
    (root / "LOC_val_solution.csv").unlink()
    with pytest.raises(InputError, match="ilsvrc_csv expects val/ILSVRC2012_val_XXXXXXXX.JPEG and "
                                         "LOC_val_solution.csv .*; LOC_val_solution.csv not found"):
        load_folder_splits(str(root), "train", "validation", "ilsvrc_csv")
    class_tree(tmp_path / "classes", sources, ["n01440764", "n01443537"], per_class=1, split="val")
    class_tree(tmp_path / "classes", sources, ["n01440764", "n01443537"], per_class=1)
    with pytest.raises(InputError, match="holds 2 class folders: set data.val_layout=class_folders") as error:
        load_folder_splits(str(tmp_path / "classes"), "train", "validation", "ilsvrc_csv")
    assert "\n" not in str(error.value)


def test_flat_validation_says_whether_the_images_or_the_csv_are_missing(tmp_path, sources):
    """A flat val/ refused for what it lacks: the CSV (images there, a stray folder beside them), the
    images (a folder only: the other layout), or both."""
    root = class_tree(tmp_path / "tree", sources, ["n01440764"], per_class=1)
    (root / "val" / "notes").mkdir(parents=True)  # a folder that is not a class, next to the images
    link(sources[0], root / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(InputError, match=r"; LOC_val_solution.csv not found$"):
        load_folder_splits(str(root), "train", "validation", "ilsvrc_csv")
    (root / "val" / "ILSVRC2012_val_00000001.JPEG").unlink()
    (root / "val" / "notes" / "readme.txt").write_text("not an image")
    (root / "val" / "readme.txt").write_text("not an image")
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    with pytest.raises(InputError, match=r"; '.*/val' holds 1 class folders: set data.val_layout=class_folders$"):
        load_folder_splits(str(root), "train", "validation", "ilsvrc_csv")
    (root / "val" / "notes" / "readme.txt").unlink()
    (root / "val" / "notes").rmdir()
    with pytest.raises(InputError, match=r"; '.*/val' holds no images$"):
        load_folder_splits(str(root), "train", "validation", "ilsvrc_csv")


def test_a_malformed_solution_csv_names_the_file_line_and_image(tmp_path, sources):
    """Line numbers count the file's lines (the header is line 1); a row without a PredictionString
    field reads as empty, as one with an empty field."""
    root = class_tree(tmp_path / "tree", sources, ["n01440764"], per_class=1)
    flat_val(root, sources, {"ILSVRC2012_val_00000001": "n01440764 0 0 5 5"})
    solution = root / "LOC_val_solution.csv"
    solution.write_text("ImageId,Label\nILSVRC2012_val_00000001,n01440764\n")
    with pytest.raises(InputError) as error:
        load_folder_splits(str(root), "train", "validation", "ilsvrc_csv")
    assert str(error.value) == (f"{str(solution)!r}: expected the columns ImageId,PredictionString, "
                                f"got ['ImageId', 'Label']")
    for third_line in ("ILSVRC2012_val_00000002,", "ILSVRC2012_val_00000002"):
        solution.write_text(f"ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 0 0 5 5\n{third_line}\n")
        with pytest.raises(InputError) as error:
            load_folder_splits(str(root), "train", "validation", "ilsvrc_csv")
        assert str(error.value) == f"{str(solution)!r} line 3: empty PredictionString for 'ILSVRC2012_val_00000002'"


def test_empty_class_folder_is_an_error_naming_it(tmp_path, sources):
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=2)
    class_tree(root, sources, ["a", "b", "c"], per_class=1, split="val")
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "notes.txt").write_text("no image here")
    with pytest.raises(InputError, match=r"class folder\(s\) without an image in .*train': c \(image extensions"):
        load_folder_splits(str(root), "train", "validation", "class_folders")
    with pytest.raises(FileNotFoundError, match="Found no valid file for the classes c"):  # torchvision's default
        ImageFolder(str(root / "train"))


@pytest.mark.parametrize("empty", [5, 6])
def test_empty_class_folders_are_named_five_at_most(tmp_path, sources, empty):
    """The first five empty class folders by name, then how many more; with torchvision's extensions."""
    names = [f"n{k:02d}" for k in range(8)]
    root = class_tree(tmp_path / "tree", sources, names[:8 - empty], per_class=1)
    class_tree(root, sources, names, per_class=1, split="val")
    for name in names[8 - empty:]:
        (root / "train" / name).mkdir()
    with pytest.raises(InputError) as error:
        load_folder_splits(str(root), "train", "validation", "class_folders")
    more = " and 1 more" if empty == 6 else ""
    assert str(error.value) == (f"class folder(s) without an image in {str(root / 'train')!r}: "
                                f"{', '.join(names[8 - empty:][:5])}{more} (image extensions: "
                                f"{', '.join(IMG_EXTENSIONS)}); remove them or complete the extraction")


def test_a_split_without_class_folders_or_images_shows_the_expected_layout(tmp_path, sources):
    """A split folder holding neither class folders nor images: the error shows the layout expected,
    without the flat-validation hint."""
    root = class_tree(tmp_path / "tree", sources, ["a"], per_class=1)
    (root / "val").mkdir()
    (root / "val" / "readme.txt").write_text("not an image")
    with pytest.raises(InputError) as error:
        load_folder_splits(str(root), "train", "validation", "class_folders")
    assert str(error.value) == (f"{str(root / 'val')!r} holds no class folders (expected val/<class>/<image>, "
                                f"e.g. val/n01440764/*.JPEG)")


def test_class_folder_differences_name_three_of_each(tmp_path, sources):
    """Validation class folders other than the training ones: counts, and the first three names of each."""
    root = class_tree(tmp_path / "tree", sources, ["a", "b", "c", "d", "e"], per_class=1)
    class_tree(root, sources, ["a", "w", "x", "y", "z"], per_class=1, split="val")
    with pytest.raises(InputError) as error:
        load_folder_splits(str(root), "train", "validation", "class_folders")
    assert str(error.value) == (f"the class folders of {str(root / 'val')!r} differ from the training split's: "
                                f"4 missing (e.g. b, c, d); 4 not in training (e.g. w, x, y)")


def test_validation_classes_must_be_the_training_classes(tmp_path, sources):
    root = class_tree(tmp_path / "tree", sources, ["a", "b", "c"], per_class=2)
    class_tree(root, sources, ["a", "c", "d"], per_class=1, split="val")
    with pytest.raises(InputError, match=r"differ from the training split's: 1 missing \(e.g. b\); "
                                         r"1 not in training \(e.g. d\)$"):
        load_folder_splits(str(root), "train", "validation", "class_folders")


def test_a_changed_tree_is_never_served_from_a_stale_index(tmp_path, sources, hf_cache):
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=3)
    class_tree(root, sources, ["a", "b"], per_class=1, split="val")
    settle(root)
    load = lambda: load_folder_splits(str(root), "train", "validation", "class_folders")  # noqa: E731
    first = samples(load()["train"])
    indexes = sorted((hf_cache / "clsvit_imagefolder").iterdir())
    assert [path.suffix for path in indexes] == [".arrow", ".arrow"]  # one per split, no temporary left
    umask = os.umask(0o022)
    os.umask(umask)
    assert [path.stat().st_mode & 0o777 for path in indexes] == [0o666 & ~umask] * 2  # readable as the cache is
    written = [path.stat().st_mtime_ns for path in indexes]
    assert samples(load()["train"]) == first
    assert [path.stat().st_mtime_ns for path in indexes] == written  # served from the index, not scanned
    link(sources[0], root / "train" / "b" / "sub" / "new.jpg")  # a file added to a nested folder
    listed = samples(load()["train"])
    assert listed == ImageFolder(str(root / "train")).samples and set(listed) - set(first) == {
        (str(root / "train" / "b" / "sub" / "new.jpg"), 1)}
    (root / "train" / "a" / "a_0.JPEG").unlink()  # a file removed
    assert samples(load()["train"]) == ImageFolder(str(root / "train")).samples
    for split in ("train", "val"):  # a class added
        link(sources[0], root / split / "c" / "c.png")
    train = load()["train"]
    assert train.features["label"].names == ["a", "b", "c"] and samples(train) == ImageFolder(str(root / "train")).samples


def test_a_scan_logs_its_folder_count_time_and_index(tmp_path, sources, hf_cache, caplog):
    """One INFO line per scanned split: its folder, image count (torchvision's), seconds taken (within
    the load's own time) and the index written."""
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=12)
    class_tree(root, sources, ["a", "b"], per_class=1, split="val")
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="clsvit.data.imagefolder"):
        load_folder_splits(str(root), "train", "validation", "class_folders")
    elapsed = time.perf_counter() - start
    indexes = {"-val-" in path.name: path for path in (hf_cache / "clsvit_imagefolder").iterdir()}
    logged = [re.fullmatch(rf"scanned (\S+): (\d+) images in (\d+\.\d) s; index (\S+)", record.getMessage())
              for record in caplog.records]
    assert [(m[1], int(m[2]), m[4]) for m in logged] == [(str(root / "train"), 24, str(indexes[False])),
                                                         (str(root / "val"), 2, str(indexes[True]))]
    assert all(0 <= float(m[3]) <= elapsed + 0.05 for m in logged)


def test_the_index_is_written_in_record_batches(tmp_path, sources, hf_cache, monkeypatch):
    """``INDEX_BATCH_ROWS`` rows per Arrow record batch, counted by pyarrow; served as torchvision lists it."""
    monkeypatch.setattr(imagefolder, "INDEX_BATCH_ROWS", 10)
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=12)
    class_tree(root, sources, ["a", "b"], per_class=1, split="val")
    settle(root)
    train = load_folder_splits(str(root), "train", "validation", "class_folders")["train"]
    index = next(path for path in (hf_cache / "clsvit_imagefolder").iterdir() if "-train-" in path.name)
    with pa.memory_map(str(index)) as source:
        assert [batch.num_rows for batch in pa.ipc.open_stream(source)] == [10, 10, 4]
    written = index.stat().st_mtime_ns
    served = load_folder_splits(str(root), "train", "validation", "class_folders")["train"]
    assert index.stat().st_mtime_ns == written and served.cache_files[0]["filename"] == str(index)
    assert samples(served) == samples(train) == ImageFolder(str(root / "train")).samples


def test_a_validation_folder_is_listed_in_the_layout_asked_for(tmp_path, sources, hf_cache):
    """A val/ holding both layouts (class folders and ILSVRC's flat images with the CSV) is listed
    as the layout asked for, whichever layout's index the cache holds."""
    classes = ["n01440764", "n01443537"]
    root = class_tree(tmp_path / "tree", sources, classes, per_class=2)
    class_tree(root, sources, classes, per_class=1, split="val")
    flat_val(root, sources, {"ILSVRC2012_val_00000001": "n01443537 0 0 1 1"})
    settle(root)
    os.utime(root / "LOC_val_solution.csv", (time.time() - 3600,) * 2)
    for layout in ("class_folders", "ilsvrc_csv", "class_folders"):
        val = load_folder_splits(str(root), "train", "validation", layout)["validation"]
        expected = (ImageFolder(str(root / "val")).samples if layout == "class_folders"
                    else [(str(root / "val" / "ILSVRC2012_val_00000001.JPEG"), 1)])
        assert samples(val) == expected
    assert len(list((hf_cache / "clsvit_imagefolder").iterdir())) == 3  # train, val in each layout


def test_an_index_replaced_by_another_launch_while_written_is_refused(tmp_path, sources, monkeypatch):
    """Another launch lists the tree, one file shorter, and replaces the index between this launch's
    write and its read: this launch stops, naming the index and the folder, instead of serving a
    listing other than its own."""
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=3)
    class_tree(root, sources, ["a", "b"], per_class=1, split="val")
    settle(root)
    write = imagefolder._write_index
    written = []

    def write_then_another_launch(index, *listing):
        monkeypatch.setattr(imagefolder, "_write_index", write)
        written.append(index)
        own = write(index, *listing)
        next((root / "train" / "b").glob("b_1.*")).unlink()
        load_folder_splits(str(root), "train", "validation", "class_folders")
        return own

    monkeypatch.setattr(imagefolder, "_write_index", write_then_another_launch)
    with pytest.raises(InputError) as error:
        load_folder_splits(str(root), "train", "validation", "class_folders")
    assert str(error.value) == (f"the index {written[0]} was replaced while this launch wrote it, by another launch "
                                f"that listed {str(root / 'train')!r} otherwise (the tree changes): launch again")


def test_a_folder_modified_just_before_the_scan_is_listed_again(tmp_path, sources, hf_cache):
    """A change within the file system's clock tick after the scan would not change the folder's
    time: a recently modified folder is never taken as current."""
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=3)
    class_tree(root, sources, ["a", "b"], per_class=1, split="val")
    settle(root)
    now = time.time()
    os.utime(root / "train" / "b", (now, now))
    load_folder_splits(str(root), "train", "validation", "class_folders")
    train_index, val_index = sorted((hf_cache / "clsvit_imagefolder").iterdir(), key=lambda p: "-val-" in p.name)
    written = train_index.stat().st_mtime_ns, val_index.stat().st_mtime_ns
    time.sleep(0.01)
    load_folder_splits(str(root), "train", "validation", "class_folders")
    assert train_index.stat().st_mtime_ns > written[0] and val_index.stat().st_mtime_ns == written[1]


def test_a_folder_exactly_settle_ns_old_is_trusted(tmp_path, sources, hf_cache, monkeypatch):
    """"Modified less than SETTLE_NS before the scan" is listed again; SETTLE_NS before is current
    (the clock held still, the folders dated against it to the nanosecond)."""
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=2)
    class_tree(root, sources, ["a", "b"], per_class=1, split="val")
    now = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: now)
    for folder, _, _ in os.walk(root):
        os.utime(folder, ns=(now - imagefolder.SETTLE_NS,) * 2)
    os.utime(root / "train" / "b", ns=(now - imagefolder.SETTLE_NS + 1,) * 2)
    load_folder_splits(str(root), "train", "validation", "class_folders")
    train_index, val_index = sorted((hf_cache / "clsvit_imagefolder").iterdir(), key=lambda p: "-val-" in p.name)
    recorded = dict(map(tuple, index_record(train_index)["mtimes"]))
    assert recorded == {"train": now - imagefolder.SETTLE_NS, "train/a": now - imagefolder.SETTLE_NS, "train/b": -1}
    written = train_index.stat().st_mtime_ns, val_index.stat().st_mtime_ns
    time.sleep(0.01)
    load_folder_splits(str(root), "train", "validation", "class_folders")
    assert train_index.stat().st_mtime_ns > written[0] and val_index.stat().st_mtime_ns == written[1]


def test_a_validation_split_missing_a_training_class_is_refused(tmp_path, sources):
    """Labelled by its own class list, a validation split without class b would give c the label 1."""
    root = class_tree(tmp_path / "tree", sources, ["a", "b", "c"], per_class=2)
    class_tree(root, sources, ["a", "c"], per_class=1, split="val")
    with pytest.raises(InputError, match=r"differ from the training split's: 1 missing \(e.g. b\)$"):
        load_folder_splits(str(root), "train", "validation", "class_folders")


def test_a_flat_validation_index_follows_a_training_class_added(tmp_path, sources):
    """The flat validation folder and its CSV do not change when a training class is added, but
    every label after the new class moves: its index must not be served."""
    root = class_tree(tmp_path / "tree", sources, ["n2", "n3"], per_class=2)
    flat_val(root, sources, {"ILSVRC2012_val_00000001": "n3 0 0 1 1", "ILSVRC2012_val_00000002": "n2 0 0 1 1"})
    settle(root)
    os.utime(root / "LOC_val_solution.csv", (time.time() - 3600,) * 2)  # its time is recorded too
    load = lambda: load_folder_splits(str(root), "train", "validation", "ilsvrc_csv")["validation"]  # noqa: E731
    assert [label for _, label in samples(load())] == [1, 0]
    link(sources[0], root / "train" / "n1" / "n1_0.JPEG")  # sorts first: n2 -> 1, n3 -> 2; val/ is untouched
    val = load()
    assert val.features["label"].names == ["n1", "n2", "n3"] and [label for _, label in samples(val)] == [2, 1]


def rebatch(index: Path, rows_per_batch: int) -> list[int]:
    """Rewrite an index as the writer writes a large tree's, in record batches of ``rows_per_batch``
    rows (schema and metadata kept); returns the offset at which each batch ends."""
    reader = pa.ipc.open_stream(index.read_bytes())
    table, schema = reader.read_all(), reader.schema
    with pa.OSFile(str(index), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table, max_chunksize=rows_per_batch)
    ends = []
    with pa.memory_map(str(index)) as source:
        for _ in pa.ipc.open_stream(source):
            ends.append(source.tell())
    return ends


def cut_between_batches(index: Path, ends: list[int]):
    os.truncate(index, ends[0])  # a crash before the second batch reached the disk


def cut_inside_a_batch(index: Path, ends: list[int]):
    os.truncate(index, (ends[0] + ends[1]) // 2)


def cut_short(index: Path, ends: list[int]):
    os.truncate(index, ends[-1] - 9)  # the last batch's last bytes and the end-of-stream marker lost


def zeros_inside_a_batch(index: Path, ends: list[int]):
    data = bytearray(index.read_bytes())  # the file keeps its size and header: a damaged disk block
    start = data.index(b"/train/", ends[0])  # within the second batch's paths
    data[start:start + 100] = bytes(100)
    index.write_bytes(bytes(data))


def garbage(index: Path, ends: list[int]):
    index.write_bytes(np.random.default_rng(0).bytes(index.stat().st_size))


def rewrite_metadata(index: Path, key: bytes, change):
    """Rewrite an index with ``change`` applied to its schema's metadata value ``key``."""
    table = pa.ipc.open_stream(index.read_bytes()).read_all()
    metadata = {**table.schema.metadata, key: change(table.schema.metadata[key])}
    with pa.OSFile(str(index), "wb") as sink, pa.ipc.new_stream(sink, table.schema.with_metadata(metadata)) as writer:
        writer.write_table(table)


def record_without_digest(index: Path, ends: list[int]):
    """The index's own record lacks a field (as one another writer left)."""
    def without_digest(record: bytes) -> bytes:
        return json.dumps({key: value for key, value in json.loads(record).items() if key != "digest"}).encode()
    rewrite_metadata(index, b"clsvit_imagefolder", without_digest)


def damaged_train_index(tmp_path: Path, sources, hf_cache: Path, damage) -> tuple[Path, Path]:
    """(root, train index) of a settled 3-class tree of 120 training images, listed once, its index
    rewritten in 3 record batches and damaged by ``damage``."""
    root = class_tree(tmp_path / "tree", sources, ["a", "b", "c"], per_class=40)
    class_tree(root, sources, ["a", "b", "c"], per_class=1, split="val")
    settle(root)
    load_folder_splits(str(root), "train", "validation", "class_folders")
    index = next(path for path in (hf_cache / "clsvit_imagefolder").iterdir() if "-train-" in path.name)
    damage(index, rebatch(index, rows_per_batch=50))
    return root, index


@pytest.mark.parametrize("damage", [cut_between_batches, cut_inside_a_batch, cut_short, zeros_inside_a_batch,
                                    garbage, record_without_digest])
def test_an_index_that_is_not_whole_is_listed_again(tmp_path, sources, hf_cache, damage):
    root, index = damaged_train_index(tmp_path, sources, hf_cache, damage)
    train = load_folder_splits(str(root), "train", "validation", "class_folders")["train"]
    assert samples(train) == ImageFolder(str(root / "train")).samples
    again = load_folder_splits(str(root), "train", "validation", "class_folders")["train"]  # whole again: served
    assert samples(again) == samples(train) and len(again) == 120


def digest_by_definition(classes: list[str], rows: list[tuple[str, int]]) -> str:
    """listing_digest's definition in plain Python: SHA-256 of the JSON class names, then of the
    SHA-256 of the paths' UTF-8 bytes end to end, of their byte lengths (little-endian int32) and of
    the labels (little-endian int64)."""
    paths = [path.encode() for path, _ in rows]
    whole = hashlib.sha256(json.dumps(classes).encode())
    for part in (b"".join(paths), np.array([len(path) for path in paths], "<i4").tobytes(),
                 np.array([label for _, label in rows], "<i8").tobytes()):
        whole.update(hashlib.sha256(part).digest())
    return whole.hexdigest()


def index_record(index: Path) -> dict:
    """The record an index keeps in its Arrow schema's metadata, read with pyarrow."""
    with pa.memory_map(str(index)) as source:
        return json.loads(pa.ipc.open_stream(source).schema.metadata[b"clsvit_imagefolder"])


def test_the_index_records_its_rows_digest_and_folder_times(tmp_path, sources, hf_cache):
    """Read back with pyarrow: the row count, the listing's digest (its definition, over
    torchvision's samples) and every listed folder's time, relative to the root; the digest of the
    same listing is the same however Arrow chunks it."""
    from clsvit.data.imagefolder import listing_digest

    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=12)
    flat_val(root, sources, {"ILSVRC2012_val_00000001": "b 0 0 1 1", "ILSVRC2012_val_00000002": "a 0 0 1 1"})
    settle(root)
    os.utime(root / "LOC_val_solution.csv", (time.time() - 3600,) * 2)
    load_folder_splits(str(root), "train", "validation", "ilsvrc_csv")
    train_index, val_index = sorted((hf_cache / "clsvit_imagefolder").iterdir(), key=lambda p: "-val-" in p.name)
    reference = ImageFolder(str(root / "train"))
    train = index_record(train_index)
    assert train["rows"] == len(reference.samples) == 24
    assert train["digest"] == digest_by_definition(reference.classes, reference.samples)
    folders = sorted(os.path.relpath(folder, root) for folder, _, _ in os.walk(root / "train"))
    assert len(folders) == 7  # train, its 2 class folders, their sub/ and sub-2/
    assert sorted(map(tuple, train["mtimes"])) == [(folder, (root / folder).stat().st_mtime_ns) for folder in folders]
    val = index_record(val_index)
    val_rows = [(str(root / "val" / "ILSVRC2012_val_00000001.JPEG"), 1),
                (str(root / "val" / "ILSVRC2012_val_00000002.JPEG"), 0)]
    assert (val["rows"], val["digest"]) == (2, digest_by_definition(["a", "b"], val_rows))
    assert [tuple(entry) for entry in val["mtimes"]] == [(name, (root / name).stat().st_mtime_ns)
                                                         for name in ("val", "LOC_val_solution.csv")]
    with pa.memory_map(str(train_index)) as source:
        table = pa.ipc.open_stream(source).read_all()
    for pieces in ((0, 24), (0, 7, 24), (0, 1, 2, 23, 24), (0, 5, 5, 17, 24)):  # slices of one array, an empty one
        chunked = pa.concat_tables([table.slice(start, stop - start) for start, stop in zip(pieces, pieces[1:])])
        assert chunked.column("image").num_chunks == len(pieces) - 1
        assert listing_digest(chunked) == train["digest"]


def unknown_feature_type(index: Path, ends: list[int]):
    """An index whose datasets features name a type this datasets does not know (``Picture``)."""
    rewrite_metadata(index, b"huggingface", lambda features: features.replace(b'"Image"', b'"Picture"'))


@pytest.mark.parametrize("damage", [cut_between_batches, cut_inside_a_batch, unknown_feature_type])
def test_a_damaged_index_is_one_warning_line_naming_it(tmp_path, sources, hf_cache, caplog, damage):
    """The warning names the index and what is wrong with it: the rows and digests it holds against
    those it recorded (digests by their definition, over torchvision's samples), or the reading
    error's type and the first line of its message, at most 200 characters."""
    root, index = damaged_train_index(tmp_path, sources, hf_cache, damage)
    try:
        datasets.Dataset.from_file(str(index))
        error = None
    except (OSError, ValueError) as raised:
        error = raised
    with caplog.at_level(logging.WARNING, logger="clsvit.data.imagefolder"):
        load_folder_splits(str(root), "train", "validation", "class_folders")
    reference = ImageFolder(str(root / "train"))
    if error is None:
        held, whole = (digest_by_definition(reference.classes, rows)[:12]
                       for rows in (reference.samples[:50], reference.samples))
        expected = (f"the index {index} holds 50 rows (digest {held}) of the 120 it recorded (digest {whole}): "
                    f"listing the tree again")
    else:
        first_line = str(error).strip().splitlines()[0]
        expected = (f"the index {index} cannot be read ({type(error).__name__}: {first_line[:200]}): "
                    f"listing the tree again")
        assert (len(first_line) > 200) == (damage is unknown_feature_type)
    assert [record.getMessage() for record in caplog.records] == [expected]


def test_an_unwritable_cache_is_one_line_naming_hf_datasets_cache(tmp_path, sources, monkeypatch):
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=2)
    class_tree(root, sources, ["a", "b"], per_class=1, split="val")
    (tmp_path / "not_a_folder").write_text("a file where the cache should be")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "not_a_folder" / "cache")
    with pytest.raises(InputError, match=rf"cannot write the folder index .*\(NotADirectoryError: "
                                         rf"{os.strerror(errno.ENOTDIR)}\): HF_DATASETS_CACHE "
                                         r"\(.*not_a_folder/cache\) must be a writable directory") as error:
        load_folder_splits(str(root), "train", "validation", "class_folders")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name_length", [180, 250])
def test_a_tree_with_a_long_folder_name_is_indexed(tmp_path, sources, hf_cache, name_length):
    """The index and its temporary file are named after the tree's folder, cut to 64 characters: a
    folder name of 180 or 250 characters (of the 255 bytes a file name may hold) is indexed and
    served, and different long names that share their first 64 characters get indexes of their own."""
    roots = [tmp_path / (("imagenet-" * 28)[:name_length - 1] + end) for end in "ab"]
    for root, classes in zip(roots, (["a", "b"], ["c", "d", "e"])):
        class_tree(root, sources, classes, per_class=2)
        class_tree(root, sources, classes, per_class=1, split="val")
        train = load_folder_splits(str(root), "train", "validation", "class_folders")["train"]
        assert samples(train) == ImageFolder(str(root / "train")).samples
    names = sorted(path.name for path in (hf_cache / "clsvit_imagefolder").iterdir())
    assert len(names) == 4 and all(name.startswith(roots[0].name[:64] + "-") for name in names)


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path, sources, hf_cache, monkeypatch):
    """Ctrl-C while the index is flushed to the disk: the interrupt goes through and the cache holds
    neither an index nor its temporary file."""
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=2)
    class_tree(root, sources, ["a", "b"], per_class=1, split="val")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_folder_splits(str(root), "train", "validation", "class_folders")
    assert list((hf_cache / "clsvit_imagefolder").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_cache_is_one_line_naming_hf_datasets_cache(tmp_path, sources, hf_cache):
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=2)
    class_tree(root, sources, ["a", "b"], per_class=1, split="val")
    (hf_cache / "clsvit_imagefolder").mkdir(parents=True)
    (hf_cache / "clsvit_imagefolder").chmod(0o555)
    with pytest.raises(InputError, match=r"cannot write the folder index .*PermissionError.*HF_DATASETS_CACHE"):
        load_folder_splits(str(root), "train", "validation", "class_folders")
    assert list((hf_cache / "clsvit_imagefolder").iterdir()) == []


def test_labels_follow_imagenet_1k_order(tmp_path, sources):
    """Sorted synset folders are timm's ImageNetInfo order, the order of public checkpoints' classifiers."""
    synsets = list(ImageNetInfo().label_names())
    assert len(synsets) == 1000
    shuffled = [synsets[k] for k in np.random.default_rng(0).permutation(1000)]  # created in no particular order
    for split in ("train", "val"):
        for k, synset in enumerate(shuffled):
            link(sources[k % 3], tmp_path / "tree" / split / synset / f"{synset}_{split}.JPEG")
    splits = load_folder_splits(str(tmp_path / "tree"), "train", "validation", "class_folders")
    for dataset in splits.values():
        assert dataset.features["label"].names == synsets
        assert [synsets[label] for label in dataset["label"]] == [Path(p).parent.name for p, _ in samples(dataset)]
    assert ImageNetInfo().index_to_description(synsets.index("n01440764")) == "tench, Tinca tinca"


def test_a_missing_split_names_the_splits_the_tree_has(tmp_path, sources):
    """Split folders are named as datasets' imagefolder names them (val/ is the validation split);
    a folder that is no split keyword is a split of its own name."""
    root = class_tree(tmp_path / "tree", sources, ["a"], per_class=1)
    class_tree(root, sources, ["a"], per_class=1, split="val")
    class_tree(root, sources, ["a"], per_class=1, split="holdout")
    with pytest.raises(InputError) as error:
        load_folder_splits(str(root), "train", "test", "class_folders", section="eval.data")
    assert str(error.value) == (f"eval.data.val_split 'test' not found in {str(root)!r}; available splits: "
                                f"holdout, train, validation")


def test_split_and_layout_errors_name_the_data_keys(tmp_path, sources):
    """Without a section given, errors name the recipe's data.* keys; a tree without any split folder
    says so."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as error:
        load_folder_splits(str(tmp_path / "empty"), "train", "validation", "class_folders")
    assert str(error.value) == (f"data.train_split 'train' not found in {str(tmp_path / 'empty')!r}; "
                                f"available splits: none")
    with pytest.raises(InputError) as error:
        load_folder_splits(str(tmp_path / "empty"), "train", "validation", "flat")
    assert str(error.value) == "data.val_layout must be one of class_folders | ilsvrc_csv, got 'flat'"


def test_handed_listings_are_served_whatever_the_tree_became(tmp_path, sources):
    """Another process's listings (index file, rows, digest) are served as they are, for both
    splits, though a file was added to each since; without them the tree is listed again."""
    root = class_tree(tmp_path / "tree", sources, ["a", "b"], per_class=2)
    class_tree(root, sources, ["a", "b"], per_class=2, split="val")
    settle(root)
    first = load_folder_splits(str(root), "train", "validation", "class_folders")
    listings = {split: imagefolder.listing_of(dataset) for split, dataset in first.items()}
    assert [listing.rows for listing in listings.values()] == [4, 4]
    for split in ("train", "val"):
        link(sources[0], root / split / "b" / "late.jpg")
    handed = load_folder_splits(str(root), "train", "validation", "class_folders", listings=listings)
    assert {split: imagefolder.listing_of(dataset) for split, dataset in handed.items()} == listings
    assert {split: samples(dataset) for split, dataset in handed.items()} == \
        {split: samples(dataset) for split, dataset in first.items()}
    listed = load_folder_splits(str(root), "train", "validation", "class_folders")
    assert samples(listed["validation"]) == ImageFolder(str(root / "val")).samples and len(listed["validation"]) == 5


def test_a_tree_without_split_folders_with_a_root_metadata_file_goes_through_datasets(tmp_path, sources):
    """datasets' imagefolder reads a tree of images and a metadata file at its root as one train split."""
    for k in range(2):
        link(sources[k], tmp_path / "tree" / f"{k}.jpg")
    (tmp_path / "tree" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{k}.jpg", "caption": f"picture {k}"}) + "\n" for k in range(2)))
    splits = load_folder_splits(str(tmp_path / "tree"), "train", "validation", "class_folders")
    assert list(splits) == ["train"] and splits["train"]["caption"] == ["picture 0", "picture 1"]


def test_a_tree_with_a_datasets_metadata_file_goes_through_datasets(tmp_path, sources):
    """A metadata file adds columns (e.g. a segmentation mask): datasets' imagefolder builder reads it."""
    for split in ("train", "val"):
        link(sources[0], tmp_path / "tree" / split / "0.jpg")
        link(sources[3], tmp_path / "tree" / split / "0_mask.png")
        (tmp_path / "tree" / split / "metadata.jsonl").write_text(
            json.dumps({"file_name": "0.jpg", "mask_file_name": "0_mask.png"}) + "\n")
    splits = load_folder_splits(str(tmp_path / "tree"), "train", "validation", "class_folders")
    assert splits["train"].column_names == ["image", "mask"]


SCAN_ONCE = """
import logging, sys
from accelerate import PartialState
from clsvit.data.imagefolder import load_folder_splits
logging.basicConfig(level=logging.INFO, format="rank %(rank)s %(message)s")
state = PartialState(cpu=True)
logging.getLogger().handlers[0].addFilter(lambda record: setattr(record, "rank", state.process_index) or True)
with state.main_process_first():  # the other process finds the main process's index current
    splits = load_folder_splits(sys.argv[1], "train", "validation", "class_folders")
print("rank", state.process_index, "rows", len(splits["train"]), len(splits["validation"]), flush=True)
"""


def two_processes(script: str, *args: str, cache: Path, timeout: int = 300) -> list[str]:
    """``script`` run by 2 processes (gloo) as ``accelerate launch`` starts them; their outputs."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    processes = [subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, text=True,
                                  env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in (0, 1)]
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    return outputs


@pytest.mark.slow
def test_two_processes_scan_once(tmp_path, sources, hf_cache):
    root = class_tree(tmp_path / "tree", sources, ["a", "b", "c"], per_class=40)
    class_tree(root, sources, ["a", "b", "c"], per_class=5, split="val")
    settle(root)
    outputs = two_processes(SCAN_ONCE, str(root), cache=hf_cache)
    scans = [line for output in outputs for line in output.splitlines() if " scanned " in line]
    assert len(scans) == 2 and all(line.startswith("rank 0 scanned ") for line in scans), outputs  # train, val
    assert all(f"rows {3 * 40} {3 * 5}" in output for output in outputs), outputs


LISTING_HANDED_OVER = """
import os, sys
from accelerate import PartialState
import clsvit.data.imagefolder as imagefolder
from clsvit.data import load_splits_on_every_process
state = PartialState(cpu=True)
scan = imagefolder.scan_class_folders
def scan_then_add_a_file(root, folder, classes=None):  # the tree changes right after the main process's scan
    listed = scan(root, folder, classes)
    open(os.path.join(root, folder, "b", "late.jpg"), "wb").close()
    return listed
if state.is_main_process:
    imagefolder.scan_class_folders = scan_then_add_a_file
else:
    imagefolder.scan_class_folders = lambda *args: sys.exit("process 1 scanned")
data_cfg = dict(source="imagefolder", path=sys.argv[1], train_split="train", val_split="validation",
                val_layout="class_folders", image_column="image", label_column="label")
train, val, num_classes, identity = load_splits_on_every_process(data_cfg, state)
paths = [row["path"] for row in train.cast_column("image", imagefolder.ImageFeature(decode=False))["image"]]
late = sum(path.endswith("late.jpg") for path in paths)
print("rank", state.process_index, "rows", len(train), len(val), "late", late, identity.describe(), flush=True)
"""


@pytest.mark.slow
def test_a_folder_changed_around_the_main_process_scan_is_listed_once(tmp_path, sources, hf_cache):
    """The tree was modified just before the main process's scan (its folders' times are too recent
    to be trusted) and a file is added right after it: the other process serves the main process's
    listing as it is, instead of listing a tree that is one file longer."""
    root = class_tree(tmp_path / "tree", sources, ["a", "b", "c"], per_class=40)
    class_tree(root, sources, ["a", "b", "c"], per_class=5, split="val")
    outputs = two_processes(LISTING_HANDED_OVER, str(root), cache=hf_cache)
    assert (root / "train" / "b" / "late.jpg").exists()
    rows = [line.split(" train ")[0] for output in outputs for line in output.splitlines() if line.startswith("rank")]
    assert rows == ["rank 0 rows 120 15 late 0", "rank 1 rows 120 15 late 0"], outputs


@pytest.mark.slow
@pytest.mark.parametrize("val_layout", ["class_folders", "ilsvrc_csv"])
def test_eval_weights_on_a_folder_val_set_scores_in_imagenet_order(tmp_path, sources, val_layout):
    """eval.py --weights on a folder validation set: a 1000-class checkpoint whose classifier always
    answers the class at ``favoured``'s index in ImageNetInfo's order is right exactly on that class's images."""
    import timm
    import torch

    from trainer_utils import REPO, subprocess_env, write_tiny_recipe

    synsets = list(ImageNetInfo().label_names())
    favoured = synsets[617]
    model = timm.create_model("deit3_small_patch16_224", img_size=32, num_classes=1000, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[synsets.index(favoured)] = 1.0
    torch.save(model.state_dict(), tmp_path / "head_617.pth")
    tree, rows = tmp_path / "imagenet", {}
    for k, synset in enumerate(synsets):
        link(sources[k % 3], tree / "train" / synset / f"{synset}_0.JPEG")
        for copy in range(3 if synset == favoured else 1):
            image_id = f"ILSVRC2012_val_{len(rows) + 1:08d}"
            rows[image_id] = f"{synset} 0 0 4 4"
            if val_layout == "class_folders":
                link(sources[k % 3], tree / "val" / synset / f"{image_id}.JPEG")
    if val_layout == "ilsvrc_csv":
        flat_val(tree, sources, rows)
    recipe = write_tiny_recipe(tmp_path, tmp_path / "runs")
    unspecialized = [f"model.specialize.{c}=0.0" for c in ("norm", "layerscale", "qkv")]
    subprocess.run([sys.executable, str(REPO / "eval.py"), "--weights", str(tmp_path / "head_617.pth"),
                    "--arch", "deit3_small_patch16_224", "--config", str(recipe), "--out", str(tmp_path / "out"),
                    "--tasks", "cls", "data.source=imagefolder", f"data.path={tree}", f"data.val_layout={val_layout}",
                    *unspecialized], cwd=REPO, env=subprocess_env(tmp_path / "hf_cache"), check=True,
                   capture_output=True, timeout=600)
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["cls.images"] == 1002 and result["cls.top1"] == pytest.approx(100 * 3 / 1002)
