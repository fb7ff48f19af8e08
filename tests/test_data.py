"""Tests for clsvit.data.shapes (the embedded dataset) and clsvit.data (loading, transforms, sampling)."""

import io
import random
import shutil
import struct
import threading
import warnings
import zlib
from collections import Counter
from pathlib import Path

import datasets
import datasets.config
import huggingface_hub.constants
import numpy as np
import pytest
import torch
import yaml
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from filelock import FileLock
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import AutoAugment, RandAugment
from timm.data.distributed_sampler import RepeatAugSampler
from torchvision import transforms as T

from clsvit import data as D
from clsvit.data import loaders
from clsvit.data.images import ImageClassDataset, UndecodableImage, UndecodableImages
from clsvit.data.shapes import CLASS_NAMES, FLOOR_FAR_M, FLOOR_NEAR_M, dataset_name, ensure_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
SHAPES = dict(num_train=120, num_val=40, image_size=32, num_classes=6)


@pytest.fixture(autouse=True)
def offline_hf_cache(tmp_path_factory, monkeypatch):
    """HF caches go to a temporary directory and nothing is ever downloaded."""
    cache = tmp_path_factory.getbasetemp() / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return ensure_shapes_dataset(**SHAPES, cache_dir=tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def shapes_val(shapes_dir):
    return Dataset.from_parquet(str(shapes_dir / "validation-00000-of-00001.parquet"),
                                cache_dir=str(shapes_dir.parent / "arrow"))


def recipe(**aug):
    cfg = yaml.safe_load((ROOT / "recipes" / "default.yaml").read_text())
    cfg["model"]["img_size"] = 32
    cfg["aug"].update(aug)
    return cfg


def data_cfg(**overrides):
    cfg = recipe()["data"]
    cfg.update({"num_workers": 0, **overrides})
    return cfg


def png_bytes(image: Image.Image, fmt="PNG") -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return {"bytes": buffer.getvalue(), "path": None}


def class_dataset(images, labels, num_classes=3):
    features = Features(image=ImageFeature(), label=ClassLabel(num_classes=num_classes))
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def random_image(seed, size=(40, 30), mode="RGB"):
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


# ---------------------------------------------------------------- shapes

def test_shapes_generation_is_deterministic(tmp_path):
    first = ensure_shapes_dataset(**SHAPES, cache_dir=tmp_path / "a")
    second = ensure_shapes_dataset(**SHAPES, cache_dir=tmp_path / "b")
    assert first.name == second.name == dataset_name(**{k: v for k, v in SHAPES.items()}, seed=0)
    for split in ("train", "validation"):
        name = f"{split}-00000-of-00001.parquet"
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_shapes_different_seed_differs(tmp_path, shapes_dir):
    other = ensure_shapes_dataset(**SHAPES, seed=1, cache_dir=tmp_path)
    name = "validation-00000-of-00001.parquet"
    assert (other / name).read_bytes() != (shapes_dir / name).read_bytes()


def test_shapes_columns_types_and_ranges(shapes_val):
    features = shapes_val.features
    assert features["label"].names == list(CLASS_NAMES[:SHAPES["num_classes"]])
    assert len(shapes_val) == SHAPES["num_val"]
    size = SHAPES["image_size"]
    for row in shapes_val:
        assert row["image"].mode == "RGB" and row["image"].size == (size, size)
        assert row["mask"].mode == "L" and row["depth"].mode == "I;16"
        mask, depth = np.asarray(row["mask"]), np.asarray(row["depth"])
        assert mask.shape == depth.shape == (size, size)
        assert depth.dtype == np.uint16
        assert set(np.unique(mask)) <= set(range(SHAPES["num_classes"] + 1))
        assert 0 <= row["label"] < SHAPES["num_classes"]
        assert depth.min() >= 500 and depth.max() <= 4000  # millimetres, none invalid


def test_shapes_mask_agrees_with_label(shapes_val):
    agree = 0
    for row in shapes_val:
        counts = np.bincount(np.asarray(row["mask"]).ravel(), minlength=SHAPES["num_classes"] + 1)
        agree += int(np.argmax(counts[1:]) + 1 == row["label"] + 1)
        assert counts[row["label"] + 1] >= 0.05 * counts.sum()  # the main shape is big
    assert agree >= 0.95 * len(shapes_val)


def test_shapes_depth_floor_and_shapes_in_front(shapes_val):
    size = SHAPES["image_size"]
    floor_mm = np.repeat(np.linspace(FLOOR_FAR_M, FLOOR_NEAR_M, size)[:, None] * 1000, size, axis=1)
    for row in shapes_val:
        mask, depth = np.asarray(row["mask"]), np.asarray(row["depth"]).astype(float)
        background = mask == 0
        np.testing.assert_allclose(depth[background], floor_mm[background], atol=0.51)
        assert (depth[~background] < floor_mm[~background]).all()
    # top row far, bottom row near
    assert floor_mm[0, 0] == 4000 and floor_mm[-1, 0] == 1500


def test_shapes_cache_reuse_and_stale_temp_cleanup(tmp_path):
    name = dataset_name(**SHAPES, seed=0)
    stale = tmp_path / "clsvit_shapes" / f".tmp-{name}-killed"
    stale.mkdir(parents=True)
    (stale / "train-00000-of-00001.parquet").write_bytes(b"half")
    target = ensure_shapes_dataset(**SHAPES, cache_dir=tmp_path)
    assert not stale.exists()
    assert sorted(p.name for p in target.iterdir()) == [
        "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]
    stamp = (target / "train-00000-of-00001.parquet").stat().st_mtime_ns
    assert ensure_shapes_dataset(**SHAPES, cache_dir=tmp_path) == target
    assert (target / "train-00000-of-00001.parquet").stat().st_mtime_ns == stamp


def test_shapes_waits_for_the_generating_process(tmp_path):
    root = tmp_path / "clsvit_shapes"
    root.mkdir()
    lock = FileLock(str(root / f"{dataset_name(**SHAPES, seed=0)}.lock"))
    results = []
    with lock:  # "another process" is generating
        waiter = threading.Thread(target=lambda: results.append(ensure_shapes_dataset(**SHAPES, cache_dir=tmp_path)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not results
    waiter.join(timeout=60)
    assert results and results[0].is_dir()


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        ensure_shapes_dataset(10, 10, 32, 11)


# ---------------------------------------------------------------- load_splits

def test_load_splits_shapes():
    train, val, num_classes = D.load_splits(data_cfg(source="shapes", shapes=SHAPES))
    assert (len(train), len(val), num_classes) == (SHAPES["num_train"], SHAPES["num_val"], SHAPES["num_classes"])
    assert sorted(train.column_names) == ["depth", "image", "label", "mask"]


@pytest.fixture
def image_folder(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for label, name in enumerate(("cat", "dog")):
            folder = tmp_path / "folder" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = random_image(10 * label + i)
                image.save(folder / (f"{i}.png" if i % 2 else f"{i}.jpg"))
    return tmp_path / "folder"


def test_load_splits_imagefolder(image_folder):
    train, val, num_classes = D.load_splits(data_cfg(source="imagefolder", path=str(image_folder)))
    assert (len(train), len(val), num_classes) == (6, 4, 2)
    assert train.features["label"].names == ["cat", "dog"]
    assert sorted(train["label"]) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("layout", ["prefix", "folders", "glob", "hub_local_dir"])
def test_load_splits_parquet_layouts(shapes_dir, tmp_path, layout):
    root = tmp_path / "pq"
    for split in ("train", "validation"):
        source = shapes_dir / f"{split}-00000-of-00001.parquet"
        target = root / split / "part0.parquet" if layout == "folders" else root / "data" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    path = {"prefix": root, "folders": root, "glob": root / "data" / "*.parquet", "hub_local_dir": root}[layout]
    source = "hub" if layout == "hub_local_dir" else "parquet"
    train, val, num_classes = D.load_splits(data_cfg(source=source, path=str(path)))
    assert (len(train), len(val), num_classes) == (SHAPES["num_train"], SHAPES["num_val"], SHAPES["num_classes"])


def test_num_classes_without_classlabel(tmp_path):
    for split, labels in (("train", [0, 4, 2]), ("validation", [1, 6])):
        Dataset.from_dict({"image": [png_bytes(random_image(i)) for i in range(len(labels))], "label": labels},
                          features=Features(image=ImageFeature(), label=Value("int64"))
                          ).to_parquet(str(tmp_path / f"{split}-0.parquet"))
    assert D.load_splits(data_cfg(source="parquet", path=str(tmp_path)))[2] == 7


@pytest.mark.parametrize("source", ["imagefolder", "parquet"])
def test_load_splits_missing_path(tmp_path, source):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nowhere") as error:
        D.load_splits(data_cfg(source=source, path=missing))
    assert "\n" not in str(error.value)


def test_load_splits_missing_hub_dataset():
    with pytest.raises(ValueError, match="nobody-xyz/no-such-dataset"):
        D.load_splits(data_cfg(source="hub", path="nobody-xyz/no-such-dataset"))


def test_load_splits_missing_split(shapes_dir, image_folder):
    with pytest.raises(ValueError, match="'test'.*train, validation") as error:
        D.load_splits(data_cfg(source="parquet", path=str(shapes_dir), val_split="test"))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="data.train_split 'training'.*train, validation"):
        D.load_splits(data_cfg(source="imagefolder", path=str(image_folder), train_split="training"))


def test_load_splits_missing_column(shapes_dir):
    with pytest.raises(ValueError, match="'img'.*image, label, mask, depth") as error:
        D.load_splits(data_cfg(source="parquet", path=str(shapes_dir), image_column="img"))
    assert "data.image_column" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="data.label_column 'target'"):
        D.load_splits(data_cfg(source="parquet", path=str(shapes_dir), label_column="target"))


def test_load_splits_unknown_source():
    with pytest.raises(ValueError, match="webdataset"):
        D.load_splits(data_cfg(source="webdataset"))


# ---------------------------------------------------------------- transforms

def test_train_transform_three_augment():
    transform = D.build_train_transform(recipe())
    output = transform(random_image(0))
    assert output.shape == (3, 32, 32) and output.dtype == torch.float32
    kinds = [type(t) for t in transform.transforms]
    assert AutoAugment in kinds and T.ColorJitter in kinds and RandAugment not in kinds
    three_augment = next(t for t in transform.transforms if isinstance(t, AutoAugment))
    ops = {op.name for sub_policy in three_augment.policy for op in sub_policy}
    assert ops == {"Solarize", "Desaturate", "GaussianBlurRand"}
    crop = transform.transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.size == (32, 32)


def test_train_transform_rand_augment():
    transform = D.build_train_transform(recipe(three_augment=False, rand_augment="rand-m9-mstd0.5-inc1",
                                               crop_scale=[0.5, 1.0]))
    kinds = [type(t) for t in transform.transforms]
    assert RandAugment in kinds and AutoAugment not in kinds
    assert transform.transforms[0].scale == (0.5, 1.0)
    assert transform(random_image(1)).shape == (3, 32, 32)
    plain = D.build_train_transform(recipe(three_augment=False, color_jitter=0.0, hflip=0.0))
    assert [type(t).__name__ for t in plain.transforms] == [
        "RandomResizedCropAndInterpolation", "MaybeToTensor", "Normalize"]


def test_eval_transform_matches_timm():
    image = random_image(2, size=(50, 37))
    expected = create_transform(32, is_training=False, crop_pct=1.0, interpolation="bicubic")(image)
    assert torch.equal(D.build_eval_transform(recipe())(image), expected)


def test_transforms_normalise_with_the_recipes_mean_and_std():
    """data.mean / data.std (timm's augreg ViTs: 0.5): a grey level of 51 becomes (51 / 255 - 0.5) / 0.5
    = -0.6 in every channel, in the eval and the training transform."""
    cfg = recipe(three_augment=False, color_jitter=0.0, hflip=0.0)
    cfg["data"].update(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    grey = Image.new("RGB", (40, 40), (51, 51, 51))
    for transform in (D.build_eval_transform(cfg), D.build_train_transform(cfg)):
        out = transform(grey)
        assert out.shape == (3, 32, 32) and torch.allclose(out, torch.full_like(out, -0.6), atol=1e-6)


# ---------------------------------------------------------------- ImageClassDataset

@pytest.fixture
def train_dataset():
    images = [png_bytes(random_image(i)) for i in range(6)]
    return ImageClassDataset(class_dataset(images, [0, 1, 2, 0, 1, 2]), D.build_train_transform(recipe()),
                               num_classes=3)


def rng_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()


def test_seeded_sample_is_reproducible(train_dataset):
    first, label, problems = train_dataset[(2, 1234)]
    random.random(), np.random.rand(), torch.rand(3)
    again, _, _ = train_dataset[(2, 1234)]
    other, _, _ = train_dataset[(2, 1235)]
    assert label == 2 and problems == ()
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    unseeded = [train_dataset[2][0] for _ in range(3)]
    assert not all(torch.equal(unseeded[0], x) for x in unseeded[1:])


def test_seeded_sample_leaves_caller_rng_alone(train_dataset):
    before = rng_states()
    train_dataset[(1, 99)]
    after = rng_states()
    assert before[0] == after[0]
    assert np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])


def test_label_out_of_range_names_index():
    images = [png_bytes(random_image(i)) for i in range(3)]
    dataset = ImageClassDataset(class_dataset(images, [0, 5, 1], num_classes=6), T.ToTensor(), num_classes=3)
    assert dataset[0][1] == 0
    with pytest.raises(ValueError, match=r"sample row 1: label 5 is outside \[0, 3\)"):
        dataset[1]


def test_image_modes_decode_to_rgb():
    base = random_image(3)
    ramp16 = Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16))
    images = [png_bytes(base.convert("CMYK"), "JPEG"), png_bytes(base.convert("P")), png_bytes(base.convert("L")),
              png_bytes(ramp16), png_bytes(base.convert("RGBA")), png_bytes(base.convert("LA"))]
    dataset = ImageClassDataset(class_dataset(images, [0] * len(images)), T.ToTensor(), num_classes=3)
    for i in range(len(images)):
        tensor, _, problems = dataset[i]
        assert problems == ()
        assert tensor.shape == (3, 30, 40), i
    sixteen = dataset[3][0]
    expected = torch.from_numpy((np.asarray(ramp16).astype(np.int64) >> 8).astype(np.float32) / 255)
    assert torch.allclose(sixteen[0], expected)  # scaled to 8 bits, not clipped white


def test_palette_images_with_transparency_decode_to_their_palette_colours_without_a_warning():
    """A palette PNG with per-entry alpha (Pillow opens its tRNS as bytes) and a GIF with one
    transparent index decode to the RGB of their palette entries, the colours Pillow's own RGBA
    conversion gives with the alpha dropped, and without Pillow's "Palette images with Transparency
    expressed in bytes should be converted to RGBA images" warning, which a direct RGB conversion
    raises for every such file. The RGB image is a plain one: an augmentation's own Pillow
    conversions (timm's Color op, through ImageEnhance.Color) neither warn nor fail on it."""
    from PIL import ImageEnhance

    from clsvit.data.images import to_rgb

    palette = Image.new("P", (4, 2))
    palette.putpalette(bytes(range(3, 3 + 3 * 16)))
    palette.putdata(list(range(8)))
    alpha_png, gif = io.BytesIO(), io.BytesIO()
    palette.save(alpha_png, "PNG", transparency=bytes([0, 128, 255, 64, 255, 255, 255, 255]))
    palette.save(gif, "GIF", transparency=2)
    opened = [Image.open(alpha_png), Image.open(gif)]
    assert [(image.mode, type(image.info["transparency"])) for image in opened] == [("P", bytes), ("P", int)]
    by_hand = np.arange(3, 3 + 3 * 8, dtype=np.uint8).reshape(2, 4, 3)  # entry i is (3 + 3i, 4 + 3i, 5 + 3i)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = [to_rgb(image) for image in opened]
        for rgb in converted:
            ImageEnhance.Color(rgb).enhance(0.5)
            rgb.convert("RGBA")
    for image, rgb in zip(opened, converted):
        pixels = np.asarray(rgb)
        assert rgb.mode == "RGB" and np.array_equal(pixels, by_hand)
        assert np.array_equal(pixels, np.asarray(image.convert("RGBA"))[..., :3])
    with pytest.warns(UserWarning, match="Palette images with Transparency expressed in bytes"):
        opened[0].convert("RGB")  # what to_rgb avoids


def test_a_missing_column_is_named_with_the_columns_there_are():
    """Each of the image and label columns must be there; the error names the first one missing
    and lists the dataset's columns."""
    hf = Dataset.from_dict({"img": [png_bytes(random_image(0))], "cls": [0]},
                           features=Features(img=ImageFeature(), cls=ClassLabel(num_classes=3)))
    with pytest.raises(ValueError) as error:
        ImageClassDataset(hf, T.ToTensor(), num_classes=3)
    assert str(error.value) == "column 'image' not in the dataset; available columns: img, cls"
    with pytest.raises(ValueError) as error:
        ImageClassDataset(hf, T.ToTensor(), num_classes=3, image_column="img")
    assert str(error.value) == "column 'label' not in the dataset; available columns: img, cls"
    assert ImageClassDataset(hf, T.ToTensor(), num_classes=3, image_column="img", label_column="cls")[0][1] == 0


def test_a_label_equal_to_num_classes_is_refused_naming_the_file():
    """Labels are 0 .. num_classes - 1: the label num_classes is outside, and the error names the
    sample by its file when the dataset knows it."""
    images = [{**png_bytes(random_image(i)), "path": f"train/n0{i}.png"} for i in range(3)]
    dataset = ImageClassDataset(class_dataset(images, [2, 3, 0], num_classes=4), T.ToTensor(), num_classes=3)
    assert dataset[0][1] == 2
    with pytest.raises(ValueError) as error:
        dataset[1]
    assert str(error.value).startswith("sample train/n01.png (row 1): label 3 is outside [0, 3) (column 'label';")


def test_sample_name_is_the_file_else_the_row():
    """A stored value with a path is named by it; one without (bytes only, a decoded PIL image,
    which decode_image also takes, or nothing) by its row."""
    from clsvit.data.images import sample_name

    assert sample_name({"bytes": b"", "path": "a/b.jpg"}, 4) == "a/b.jpg (row 4)"
    assert sample_name({"bytes": b"", "path": None}, 4) == "row 4"
    assert sample_name(random_image(0), 4) == "row 4"
    assert sample_name(None, 4) == "row 4"


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (PIL checks the size when it opens the file)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def broken_images() -> dict[str, bytes]:
    """Files a real dataset contains, each undecodable in its own way."""
    jpeg = png_bytes(random_image(7, size=(64, 48)), "JPEG")["bytes"]
    return {"truncated.jpg": jpeg[: len(jpeg) // 2], "empty.jpg": b"", "notes.txt": b"not an image\n",
            "bomb.png": huge_png_header(20000, 20000)}


def test_undecodable_images_are_replaced_and_recorded():
    good = [png_bytes(random_image(i)) for i in range(3)]
    bad = [{"bytes": data, "path": f"images: a/{name}"} for name, data in broken_images().items()]  # ": " in a path
    images = [good[0], *bad, good[1], good[2]]
    dataset = ImageClassDataset(class_dataset(images, [0, 1, 1, 1, 1, 2, 0]), T.ToTensor(), num_classes=3)
    assert dataset[0][2] == ()
    tensor, label, problems = dataset[1]  # four broken files in a row: replaced by the next good one
    assert label == 2 and torch.equal(tensor, T.ToTensor()(random_image(1)))
    assert all(isinstance(p, UndecodableImage) for p in problems)
    assert [(p.path, p.row, p.error.split(":")[0]) for p in problems] == [
        ("images: a/truncated.jpg", 1, "OSError"), ("images: a/empty.jpg", 2, "UnidentifiedImageError"),
        ("images: a/notes.txt", 3, "UnidentifiedImageError"), ("images: a/bomb.png", 4, "DecompressionBombError")]
    assert problems[0].error.startswith("OSError: image file is truncated")
    assert problems[0].name == "images: a/truncated.jpg (row 1)"
    assert str(problems[0]) == f"images: a/truncated.jpg (row 1): {problems[0].error}"
    assert [p.row for p in dataset[4][2]] == [4]  # the bomb alone
    only_bad = ImageClassDataset(class_dataset(bad, [0] * len(bad)), T.ToTensor(), num_classes=3)
    with pytest.raises(ValueError, match=r"no image of the dataset can be decoded \(first: images: a/truncated.jpg"):
        only_bad[0]


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_a_row_without_an_image_is_replaced_and_recorded(augment_on):
    """A null in the image column (a row of a parquet shard with no image) is a broken sample on
    both data paths: replaced by the next sample and recorded by its row."""
    images = [png_bytes(random_image(0, size=(32, 32))), None, png_bytes(random_image(2, size=(32, 32)))]
    cfg = recipe()
    cfg["data"]["augment_on"] = augment_on
    dataset = D.build_image_dataset(class_dataset(images, [0, 1, 2]), cfg, train=False, num_classes=3)
    _, label, problems = dataset[1]
    assert label == 2 and [(p.path, p.row, p.error, p.name) for p in problems] == [
        (None, 1, "ValueError: no image (the row's image is null)", "row 1")]
    assert dataset[0][2] == ()


def test_undecodable_records_travel_through_loader_workers():
    """Records from two DataLoader workers arrive as they were made (paths with ": " intact)."""
    images = [png_bytes(random_image(i)) for i in range(6)]
    images[2] = {"bytes": b"", "path": "C: drive/x: y.jpg"}
    images[5] = {"bytes": b"nope", "path": "d: e.png"}
    dataset = ImageClassDataset(class_dataset(images, [0] * 6), D.build_eval_transform(recipe()), num_classes=3)
    loader = D.build_eval_loader(dataset, 3, data_cfg(num_workers=2))
    problems = [p for _, _, batch_problems in loader for p in batch_problems]
    assert [(p.path, p.row) for p in problems] == [("C: drive/x: y.jpg", 2), ("d: e.png", 5)]
    assert [p.name for p in problems] == ["C: drive/x: y.jpg (row 2)", "d: e.png (row 5)"]


def test_evaluation_counts_undecodable_records():
    """clsvit.evaluation counts the records (one per broken file, whatever its name) over an
    evaluation pass of build_eval_loader, for both data paths."""
    from accelerate import Accelerator

    from clsvit.evaluation import topk_accuracy

    images = [png_bytes(random_image(i, size=(32, 32))) for i in range(7)]
    images[1] = {"bytes": b"", "path": "a: b.jpg"}
    images[2] = {"bytes": b"x", "path": "c: d.jpg\nsecond line"}
    images[5] = {"bytes": b"", "path": None}
    hf = class_dataset(images, [0, 1, 2, 0, 1, 2, 0])
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3))
    for augment_on in ("cpu", "device"):
        cfg = recipe()
        cfg["data"]["augment_on"] = augment_on
        dataset = D.build_image_dataset(hf, cfg, train=False, num_classes=3)
        loader = D.build_eval_loader(dataset, 3, data_cfg())
        result = topk_accuracy(model, loader, accelerator, to_input=dataset.batch_transform(accelerator.device))
        assert (result["images"], result["undecodable"]) == (7, 4), augment_on  # rows 1, 2 (for 1 and 2), 5


def test_undecodable_policy_counts_distinct_files_and_stops_beyond_the_fraction():
    policy = UndecodableImages(dataset_size=1000, max_fraction=0.002)  # 2 files tolerated
    a = UndecodableImage("x: a.jpg", 3, "OSError: truncated")
    b = UndecodableImage("x: a.jpg", 4, "OSError: empty")  # the same path at another row is another file
    assert policy.add([a]) == [a]
    assert policy.add([a, b]) == [b]  # a file seen again (another epoch, another process) counts once
    policy.check()
    restored = UndecodableImages(dataset_size=1000, max_fraction=0.002)
    restored.load_state_dict(policy.state_dict())
    assert restored.add([UndecodableImage(None, 9, "OSError: x")]) != []
    with pytest.raises(ValueError, match=r"3 of 1000 images cannot be decoded, more than "
                                         r"data.max_bad_fraction=0.002 allows; first: x: a.jpg \(row 3\), "
                                         r"x: a.jpg \(row 4\), row 9"):
        restored.check()


def test_undecodable_policy_counts_a_file_reported_twice_in_one_batch_once_and_names_three():
    """Records gathered from several processes can hold one file twice: it is one file. Beyond the
    limit the error names the first three files and no more."""
    policy = UndecodableImages(dataset_size=100, max_fraction=0.03)  # 3 files tolerated
    a, b = UndecodableImage("a.jpg", 0, "OSError: x"), UndecodableImage("b.jpg", 1, "OSError: x")
    assert policy.add([a, b, a, b]) == [a, b]
    assert policy.state_dict() == {"names": ["a.jpg (row 0)", "b.jpg (row 1)"]}
    policy.add([UndecodableImage(None, 7, "OSError: x"), UndecodableImage("d.jpg", 9, "OSError: x")])
    with pytest.raises(ValueError) as error:
        policy.check()
    assert str(error.value).endswith("data.max_bad_fraction=0.03 allows; first: a.jpg (row 0), b.jpg (row 1), row 7")


def test_batch_transform_moves_the_images_to_the_given_device():
    """The loader's images go to the device the caller names (the meta device stands in for an
    accelerator here: the copy must land there, not stay on the host)."""
    dataset = ImageClassDataset(class_dataset([png_bytes(random_image(0))], [0]), T.ToTensor(), num_classes=3)
    images = torch.rand(2, 3, 4, 4)
    moved = dataset.batch_transform(torch.device("meta"))(images)
    assert moved.device.type == "meta" and moved.shape == images.shape and moved.dtype == images.dtype
    assert torch.equal(dataset.batch_transform(torch.device("cpu"))(images), images)


def constant_png(width: int, height: int, rgb: tuple[int, int, int], rows_per_block: int = 100) -> bytes:
    """A real RGB PNG of one colour (every row filtered "Up" from the first, so all but the first
    pixel are zeros), built in well under a second at 100 Mpx: the deflate stream is a block of
    ``rows_per_block`` rows compressed once and repeated (each block ends in a full flush, so no
    block refers to another), with the zlib checksum of the whole."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    first, up = b"\x01" + bytes(rgb) + bytes(3 * width - 3), b"\x02" + bytes(3 * width)
    blocks, rest = divmod(height - 1, rows_per_block)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(first) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(up * rows_per_block) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.compress(up * rest) + deflate.flush()
    checksum = zlib.adler32(first)
    for rows in [rows_per_block] * blocks + [rest]:
        checksum = zlib.adler32(up * rows, checksum)
    stream = b"\x78\xda" + head + block * blocks + tail + struct.pack(">I", checksum)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def test_constant_png_is_the_image_it_says():
    png = constant_png(130, 250, (128, 64, 32), rows_per_block=16)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.full((250, 130, 3), (128, 64, 32), np.uint8))


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_an_image_above_the_pixel_limit_is_replaced_and_counted(augment_on):
    """A 100-Mpx PNG (Pillow's own limit, 2 x 89.5 Mpx, lets it through with a warning) is a broken
    file under data.max_image_pixels' default, on both data paths, read no further than its header."""
    huge = constant_png(10_000, 10_000, (128, 64, 32))
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow would decode it, with a warning
        Image.open(io.BytesIO(huge)).verify()  # a whole, valid PNG
    images = [{"bytes": huge, "path": "big/huge.png"}, png_bytes(random_image(1, size=(100, 100))),
              png_bytes(random_image(2, size=(100, 100)))]
    cfg = recipe()
    cfg["data"]["augment_on"] = augment_on
    assert cfg["data"]["max_image_pixels"] == Image.MAX_IMAGE_PIXELS == 89_478_485
    dataset = D.build_image_dataset(class_dataset(images, [0, 1, 2]), cfg, train=False, num_classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # no second report of the same file
        _, label, problems = dataset[0]
    assert label == 1 and [(p.path, p.row, p.error) for p in problems] == [
        ("big/huge.png", 0, "DecompressionBombError: 10000x10000 = 100,000,000 pixels, above "
                            "data.max_image_pixels=89,478,485")]
    cfg["data"]["max_image_pixels"] = 100 * 100  # the limit is the key's: 100 x 100 images are at it
    assert D.build_image_dataset(class_dataset(images[1:], [1, 2]), cfg, train=False, num_classes=3)[0][2] == ()
    cfg["data"]["max_image_pixels"] -= 1
    above = D.build_image_dataset(class_dataset(images[1:], [1, 2]), cfg, train=False, num_classes=3)
    with pytest.raises(ValueError, match=r"first: row 0: DecompressionBombError: 100x100 = 10,000 pixels, above "
                                         r"data.max_image_pixels=9,999"):
        above[0]


def test_max_image_pixels_must_be_positive_or_null(tmp_path):
    from clsvit.config import load_config

    assert load_config(ROOT / "recipes" / "default.yaml", ["data.max_image_pixels=null"])["data"]["max_image_pixels"] is None
    with pytest.raises(ValueError, match=r"data.max_image_pixels=0: images above this many pixels"):
        load_config(ROOT / "recipes" / "default.yaml", ["data.max_image_pixels=0"])


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16B", ">u2"), ("I", "<i4")])
def test_sixteen_bit_greyscale_keeps_its_high_byte_without_wide_copies(mode, dtype):
    """The 8-bit value of a 16-bit pixel is its high byte (value // 256, clipped to [0, 65535]
    first): by hand, 0 -> 0, 255 -> 0, 256 -> 1, 0x1234 -> 0x12, 32768 -> 128, 65535 -> 255 (and
    for 32-bit, -5 -> 0, 70000 -> 255). Converting 2 Mpx allocates under 5 bytes a pixel (9 for
    32-bit; NumPy's and Python's allocations, traced, the pixels Pillow hands to NumPy included): no
    int64 copy."""
    import tracemalloc

    from clsvit.data.images import to_rgb

    values = [0, 255, 256, 0x1234, 32768, 65535] + ([-5, 70000] if mode == "I" else [])
    expected = [0, 0, 1, 0x12, 128, 255] + ([0, 255] if mode == "I" else [])
    image = Image.frombytes(mode, (len(values), 1), np.array([values], dtype=dtype).tobytes())
    if mode == "I;16":  # as a 16-bit greyscale PNG opens
        image = Image.open(io.BytesIO(png_bytes(image)["bytes"]))
        assert image.mode == "I;16"
    assert np.asarray(to_rgb(image)).tolist() == [[[v, v, v] for v in expected]]
    big = Image.frombytes(mode, (2000, 1000), np.random.default_rng(0).integers(0, 65536, (1000, 2000))
                          .astype(dtype).tobytes())
    tracemalloc.start()
    to_rgb(big)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < (5 if mode != "I" else 9) * big.width * big.height, peak / (big.width * big.height)  # int64: 16


# ---------------------------------------------------------------- TrainSampler

def sampler_output(n, **kwargs):
    return list(D.TrainSampler(n, **kwargs))


def test_repeated_aug_matches_timm():
    n, replicas, seed, epoch = 600, 2, 7, 3
    per_rank = []
    for rank in range(replicas):
        sampler = D.TrainSampler(n, num_replicas=replicas, rank=rank, seed=seed, repeats=3)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
        reference = RepeatAugSampler(range(n), num_replicas=replicas, rank=rank, num_repeats=3)
        reference.set_epoch(seed + epoch)
        assert [index for index, _ in per_rank[-1]] == list(reference)
        assert len(sampler) == len(reference) == 600 // 256 * 256 // replicas
    # independent check of the selection: the first 2 * 256 entries of the repeated permutation
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    repeated = torch.repeat_interleave(permutation, 3)[:2 * 256].tolist()
    assert Counter(i for rank in per_rank for i, _ in rank) == Counter(repeated)
    assert per_rank[0][:2] != per_rank[1][:2]
    # all copies of an image get different augmentation seeds
    seeds_by_index = {}
    for rank in per_rank:
        for index, sample_seed in rank:
            seeds_by_index.setdefault(index, []).append(sample_seed)
    assert all(len(set(s)) == len(s) for s in seeds_by_index.values())
    assert max(len(s) for s in seeds_by_index.values()) == 3


def test_single_process_is_a_permutation_and_repeats_inactive():
    out = sampler_output(50, num_replicas=1, rank=0, seed=0, repeats=3)
    assert sorted(i for i, _ in out) == list(range(50))
    sampler = D.TrainSampler(50, num_replicas=1, rank=0, seed=0)
    assert len(sampler) == 50
    assert sampler.note() == ("note: aug.repeated_aug=3 is inactive on a single process (as in the DeiT reference): "
                              "each image is seen once per epoch")
    assert D.TrainSampler(50, num_replicas=2, rank=0, seed=0).note() is None
    assert D.TrainSampler(50, num_replicas=1, rank=0, seed=0, repeats=1).note() is None


def test_an_epoch_without_an_optimizer_step_names_sizes_and_keys():
    # timm keeps floor(700 / 256) x 256 = 512 of 700 images per epoch: 256 per process, one batch of 300 too many
    sampler = D.TrainSampler(700, num_replicas=2, rank=0, seed=0, repeats=3)
    assert len(sampler) == 256 and sampler.steps_per_epoch(128, 2) == 1
    with pytest.raises(ValueError) as error:
        sampler.steps_per_epoch(300, 1)
    assert str(error.value) == (
        "repeated augmentation (aug.repeated_aug=3, timm's RepeatAugSampler) draws 256 images per process per "
        "epoch from the 700-image training split over 2 processes; train.global_batch=600 needs 300 per process: "
        "set aug.repeated_aug=1 or lower train.global_batch")
    with pytest.raises(ValueError, match=r"^the 40-image training split gives 20 images per process per epoch over "
                                         r"2 process\(es\); train.global_batch=64 needs 32 per process: lower "
                                         r"train.global_batch$"):
        D.TrainSampler(40, num_replicas=2, rank=1, seed=0, repeats=1).steps_per_epoch(16, 2)
    assert D.TrainSampler(40, num_replicas=2, rank=1, seed=0, repeats=1).steps_per_epoch(4, 2) == 2


def test_no_repeats_is_padded_strided_split():
    outputs = [sampler_output(10, num_replicas=3, rank=r, seed=1, repeats=1) for r in range(3)]
    assert [len(o) for o in outputs] == [4, 4, 4]
    permutation = torch.randperm(10, generator=torch.Generator().manual_seed(1)).tolist()
    padded = permutation + permutation[:2]
    for rank, out in enumerate(outputs):
        assert [i for i, _ in out] == padded[rank::3]
    ordered = sampler_output(6, num_replicas=2, rank=1, seed=0, repeats=1, shuffle=False)
    assert [i for i, _ in ordered] == [1, 3, 5]


def test_sampler_epochs_determinism_and_resume():
    sampler = D.TrainSampler(40, num_replicas=2, rank=1, seed=3)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0 == sampler_output(40, num_replicas=2, rank=1, seed=3)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert [i for i, _ in epoch1] != [i for i, _ in epoch0]
    assert [s for _, s in epoch1] != [s for _, s in epoch0]
    sampler.set_start(7)
    assert list(sampler) == epoch1[7:]
    assert list(sampler) == epoch1  # one-shot
    assert len(sampler) == len(epoch1) == 20
    with pytest.raises(ValueError, match="start position"):
        sampler.set_start(21)
    with pytest.raises(ValueError, match="rank"):
        D.TrainSampler(40, num_replicas=2, rank=2, seed=0)


def test_loader_is_worker_independent_and_resumable():
    images = [png_bytes(random_image(i, size=(24, 24))) for i in range(24)]
    dataset = ImageClassDataset(class_dataset(images, [i % 3 for i in range(24)]),
                                  D.build_train_transform(recipe()), num_classes=3)

    def batches(num_workers, start=0):
        sampler = D.TrainSampler(len(dataset), num_replicas=1, rank=0, seed=5)
        sampler.set_epoch(2)
        sampler.set_start(start)
        loader = D.build_train_loader(dataset, sampler, 4, data_cfg(num_workers=num_workers))
        return list(loader)

    torch_state = torch.get_rng_state()
    reference = batches(0)
    assert torch.equal(torch.get_rng_state(), torch_state)  # the loader did not draw from the global RNG
    assert len(reference) == 6 and reference[0][0].shape == (4, 3, 32, 32)
    for ours, theirs in zip(batches(2), reference):
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    for ours, theirs in zip(batches(0, start=8), reference[2:], strict=True):
        assert torch.equal(ours[0], theirs[0])


def test_eval_loader_is_sequential_and_keeps_last_batch():
    images = [png_bytes(random_image(i, size=(32, 32))) for i in range(5)]
    dataset = ImageClassDataset(class_dataset(images, [0, 1, 2, 0, 1]), D.build_eval_transform(recipe()),
                                  num_classes=3)
    loader = D.build_eval_loader(dataset, 2, data_cfg())
    labels = torch.cat([y for _, y, _ in loader])
    assert labels.tolist() == [0, 1, 2, 0, 1]
    options = loaders._loader_options(data_cfg(num_workers=3))
    assert options["prefetch_factor"] == 2 and options["persistent_workers"] is True
    assert "prefetch_factor" not in loaders._loader_options(data_cfg(num_workers=0))
