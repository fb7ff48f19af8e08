"""The embedded offline dataset: coloured geometric shapes on textured backgrounds.

Why it exists: training, the classification evaluation and the dense probes (segmentation, depth)
must run end to end offline on a CPU, with labels that a tiny ViT can actually learn. Every sample
has the four columns the real datasets have, in the same storage conventions:

- ``image``: RGB PNG. One large *main* shape (bounding circle 60-90 % of the image side) defines
  the label; 0-2 small distractor shapes of other classes make segmentation non-trivial.
  Background textures (smooth noise, stripes, gradients, at half contrast) use the same colours as the
  shapes, so colour alone does not give the mask away.
- ``label``: the main shape's class (a ``ClassLabel`` with the names in :data:`CLASS_NAMES`).
- ``mask``: 8-bit PNG (mode L), 0 = background, ``k + 1`` = class ``k`` (the top-most shape wins),
  i.e. ADE20k-style storage, but here 0 is a real class (background) for the probes.
- ``depth``: 16-bit PNG in millimetres (mode I;16, like NYUv2; 0 would mean invalid, none here).
  A floor ramp from 4 m at the top row to 1.5 m at the bottom row, and each shape a fronto-parallel
  plane nearer than the floor behind it; nearer shapes are drawn on top.

Shapes are drawn at 4x resolution and box-downsampled into an anti-aliased coverage; mask and depth
take the centre sample of each 4x4 block so they stay exact class ids / depths.
Generation is deterministic: each sample draws from its own ``numpy`` generator seeded by
``(seed, split, index)``, so the same arguments always give byte-identical parquet files. They are
written in row groups of :data:`ROW_GROUP` rows, as the hub's image datasets are (``datasets`` 5
would size the groups by bytes, one group for this dataset), so training reads them as it reads
ImageNet from the hub.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import datasets.config
import numpy as np
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from filelock import FileLock
from PIL import Image, ImageDraw

from clsvit.errors import InputError

FORMAT_VERSION = 3  # bump when the rendering or the file layout changes, so stale caches are not reused
ROW_GROUP = 100  # rows per parquet row group, as the hub's image datasets (e.g. ImageNet-1k) are written
CLASS_NAMES = ("circle", "square", "triangle", "star", "cross",
               "ring", "ellipse", "hexagon", "diamond", "crescent")
SUPERSAMPLE = 4
FLOOR_FAR_M, FLOOR_NEAR_M = 4.0, 1.5  # floor depth at the top and bottom image rows
MAIN_DIAMETER = (0.60, 0.90)          # main shape bounding-circle diameter, fraction of the side
DISTRACTOR_DIAMETER = (0.12, 0.25)
MIN_COLOUR_CONTRAST = 0.35            # RGB distance (0-1 scale) from the background under the shape
SPLIT_IDS = {"train": 0, "validation": 1}


# ---------------------------------------------------------------- silhouettes (unit bounding circle)

def _polygon(n: int, radius: float = 1.0, phase: float = 0.0, centre=(0.0, 0.0)) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _polygon(points, 1.0, -np.pi / 2)
    inner_pts = _polygon(points, inner, -np.pi / 2 + np.pi / points)
    return np.stack([outer, inner_pts], 1).reshape(-1, 2)


def _rect(half_w: float, half_h: float) -> np.ndarray:
    return np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])


# Each silhouette is a list of (polygon, paint) in a unit bounding circle; paint=False erases, which
# gives the ring and the crescent their holes. Square and diamond differ in aspect ratio, so a
# random rotation cannot turn one into the other.
SILHOUETTES = {
    "circle": [(_polygon(48), True)],
    "square": [(_rect(0.72, 0.72), True)],
    "triangle": [(_polygon(3, 1.0, -np.pi / 2), True)],
    "star": [(_star(), True)],
    "cross": [(_rect(1.0, 0.3), True), (_rect(0.3, 1.0), True)],
    "ring": [(_polygon(48), True), (_polygon(48, 0.55), False)],
    "ellipse": [(_polygon(48) * [1.0, 0.5], True)],
    "hexagon": [(_polygon(6), True)],
    "diamond": [(_polygon(4) * [1.0, 0.55], True)],
    "crescent": [(_polygon(48), True), (_polygon(48, 0.85, centre=(0.45, 0.0)), False)],
}


def _rasterise(name: str, centre: np.ndarray, radius: float, angle: float, size: int):
    """One shape on a ``size`` x ``size`` image: (anti-aliased coverage in [0, 1], hard mask).

    The polygon is drawn at ``SUPERSAMPLE`` x resolution; the coverage is the box-downsampled
    drawing (exactly what rendering at 4x and downsampling gives for a flat colour), the hard mask
    is the centre sample of each block, so mask and depth stay exact class ids / depths.
    """
    side = size * SUPERSAMPLE
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre_hr = (centre + 0.5) * SUPERSAMPLE - 0.5  # pixel centres at high resolution
    for polygon, paint in SILHOUETTES[name]:
        points = polygon @ rotation.T * radius * SUPERSAMPLE + centre_hr
        draw.polygon([tuple(p) for p in points], fill=255 if paint else 0)
    coverage = np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255
    hard = np.asarray(canvas)[SUPERSAMPLE // 2::SUPERSAMPLE, SUPERSAMPLE // 2::SUPERSAMPLE] > 0
    return coverage, hard


# ---------------------------------------------------------------- backgrounds

def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """A random texture (float32 HxWx3 in [0.25, 0.75]): smooth noise, stripes or a gradient, or a
    blend, at half contrast. Full-contrast textures made the toy task too hard for a tiny ViT to
    learn in a few CPU minutes (chance accuracy after 600 steps; 53 % at half contrast with larger
    main shapes, measured with AdamW on 5000 images at 32 px)."""
    kinds = [_smooth_noise, _stripes, _gradient]
    texture = kinds[rng.integers(3)](rng, side)
    if rng.random() < 0.5:
        alpha = rng.uniform(0.2, 0.5)
        texture = (1 - alpha) * texture + alpha * kinds[rng.integers(3)](rng, side)
    return 0.25 + 0.5 * texture


def _smooth_noise(rng: np.random.Generator, side: int) -> np.ndarray:
    cells = int(rng.integers(2, 7))
    coarse = Image.fromarray((rng.random((cells, cells, 3)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((side, side), Image.BICUBIC), dtype=np.float32) / 255


def _ramp(rng: np.random.Generator, side: int) -> np.ndarray:
    """Position along a random direction, in [0, 1] over the image (HxWx1)."""
    theta = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) / side
    t = xs * np.cos(theta) + ys * np.sin(theta)
    return ((t - t.min()) / (t.max() - t.min()))[..., None]


def _two_colours(rng: np.random.Generator):
    return rng.random(3).astype(np.float32), rng.random(3).astype(np.float32)


def _stripes(rng: np.random.Generator, side: int) -> np.ndarray:
    c1, c2 = _two_colours(rng)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 8) * _ramp(rng, side) + rng.uniform(0, 2 * np.pi))
    return c1 * (1 - t) + c2 * t


def _gradient(rng: np.random.Generator, side: int) -> np.ndarray:
    c1, c2 = _two_colours(rng)
    t = _ramp(rng, side)
    return c1 * (1 - t) + c2 * t


# ---------------------------------------------------------------- one sample

def _floor_depth(size: int) -> np.ndarray:
    """Floor depth in metres per pixel row (far at the top, near at the bottom), HxW."""
    rows = np.linspace(FLOOR_FAR_M, FLOOR_NEAR_M, size, dtype=np.float32)
    return np.repeat(rows[:, None], size, axis=1)


def _sample_shapes(rng: np.random.Generator, size: int, num_classes: int, label: int) -> list[dict]:
    """The main shape plus 0-2 distractors of other classes, each with a depth in front of the floor."""
    others = [c for c in range(num_classes) if c != label]
    num_distractors = min(int(rng.integers(0, 3)), len(others))
    classes = [label] + list(rng.choice(others, num_distractors, replace=False)) if others else [label]
    shapes = []
    for i, cls in enumerate(classes):
        low, high = MAIN_DIAMETER if i == 0 else DISTRACTOR_DIAMETER
        radius = rng.uniform(low, high) * size / 2
        margin = radius if i == 0 else 0.0  # the main shape stays inside the image
        centre = rng.uniform(margin, size - margin, 2)
        bottom_row = min(centre[1] + radius, size - 1)
        floor_behind = FLOOR_FAR_M + (FLOOR_NEAR_M - FLOOR_FAR_M) * max(bottom_row, 0) / (size - 1)
        shapes.append(dict(cls=int(cls), centre=centre, radius=radius,
                           angle=rng.uniform(0, 2 * np.pi), depth=floor_behind * rng.uniform(0.5, 0.9)))
    return shapes


def _shape_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour that stands out from the background under the shape (so the label is visible)."""
    for _ in range(20):
        colour = rng.random(3).astype(np.float32)
        if np.linalg.norm(colour - under) >= MIN_COLOUR_CONTRAST:
            break
    return colour


def render_sample(rng: np.random.Generator, size: int, num_classes: int):
    """One sample: (image uint8 HxWx3, label, mask uint8 HxW, depth uint16 HxW in mm)."""
    image = _background(rng, size)
    label = int(rng.integers(num_classes))
    mask = np.zeros((size, size), np.uint8)
    depth_m = _floor_depth(size)
    shading = _ramp(rng, size) - 0.5  # a soft light gradient, so shapes are not flat colour
    for shape in sorted(_sample_shapes(rng, size, num_classes, label), key=lambda s: -s["depth"]):
        coverage, hard = _rasterise(CLASS_NAMES[shape["cls"]], shape["centre"], shape["radius"],
                                    shape["angle"], size)
        if not hard.any():
            continue
        colour = _shape_colour(rng, image[hard].mean(0))
        shaded = np.clip(colour * (1 + 0.3 * shading), 0, 1)
        image = image * (1 - coverage) + shaded * coverage
        mask[hard] = shape["cls"] + 1
        depth_m[hard] = shape["depth"]
    image = image + 0.015 * rng.standard_normal(image.shape, dtype=np.float32)
    return (np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), label, mask,
            np.round(depth_m * 1000).astype(np.uint16))


# ---------------------------------------------------------------- dataset files

def _png(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # fast; sizes barely differ
    return {"bytes": buffer.getvalue(), "path": None}


def _write_split(path: Path, split: str, count: int, image_size: int, num_classes: int, seed: int):
    columns = {"image": [], "label": [], "mask": [], "depth": []}
    for index in range(count):
        rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
        image, label, mask, depth = render_sample(rng, image_size, num_classes)
        columns["image"].append(_png(image))
        columns["label"].append(label)
        columns["mask"].append(_png(mask))
        columns["depth"].append(_png(depth))
    features = Features(image=ImageFeature(), label=ClassLabel(names=list(CLASS_NAMES[:num_classes])),
                        mask=ImageFeature(), depth=ImageFeature())
    Dataset.from_dict(columns, features=features).to_parquet(str(path / f"{split}-00000-of-00001.parquet"),
                                                             batch_size=ROW_GROUP)


def _default_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE)


def dataset_name(num_train: int, num_val: int, image_size: int, num_classes: int, seed: int) -> str:
    return f"v{FORMAT_VERSION}-train{num_train}-val{num_val}-{image_size}px-{num_classes}cls-seed{seed}"


def ensure_shapes_dataset(num_train: int, num_val: int, image_size: int, num_classes: int,
                          seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """Generate the shapes dataset once and return its directory of parquet shards.

    The directory is ``<cache_dir or HF datasets cache>/clsvit_shapes/<name from the arguments>/``
    and holds ``train-00000-of-00001.parquet`` and ``validation-00000-of-00001.parquet``.

    Concurrency (DDP): every process may call this. A file lock next to the directory serialises
    them: the first process generates while the others block on the lock, then find the finished
    directory and return it. Generation writes into a temporary directory that is renamed into
    place only when complete, so a killed run never leaves a half dataset (its leftover temporary
    directory is removed by the next caller).
    """
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise InputError(f"data.shapes.num_classes must be in 1..{len(CLASS_NAMES)}, got {num_classes}")
    if image_size < 8 or num_train < 1 or num_val < 1:
        raise InputError(f"data.shapes needs image_size >= 8 and num_train, num_val >= 1, got "
                         f"image_size={image_size}, num_train={num_train}, num_val={num_val}")
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    root = root / "clsvit_shapes"
    name = dataset_name(num_train, num_val, image_size, num_classes, seed)
    target = root / name
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if target.is_dir():  # another process finished it while we waited
            return target
        for stale in root.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
        _write_split(staging, "train", num_train, image_size, num_classes, seed)
        _write_split(staging, "validation", num_val, image_size, num_classes, seed)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is shared like HF's
        os.rename(staging, target)
    return target
