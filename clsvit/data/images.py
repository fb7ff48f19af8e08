"""One image sample of a classification dataset, shared by both data paths (clsvit.data's CPU
transform, clsvit.data.crops' device crops): decoding any file to RGB, per-sample seeded RNGs, the base
dataset (lazy decoding, a broken file replaced by the next sample and recorded), and the policy that
counts broken files across workers and processes."""

from __future__ import annotations

import contextlib
import io
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Image as ImageFeature
from PIL import Image
from torch.utils.data import Dataset, default_collate

from clsvit.errors import InputError, quote_error


# ---------------------------------------------------------------- decoding

NO_IMAGE = "no image (the row's image is null)"


def decode_image(value) -> Image.Image:
    """An undecoded HF ``Image`` value (``{"bytes", "path"}``) or a PIL image -> PIL image; a null
    value (a row without an image) raises ``ValueError``, a broken sample."""
    if isinstance(value, Image.Image):
        return value
    if value is None:
        raise ValueError(NO_IMAGE)
    if value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    return Image.open(value["path"])


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. PIL's own ``convert`` clips 16-bit values at 255 (a white image), so
    16/32-bit greyscale is scaled to 8 bits first (the high byte of the value clipped to
    [0, 65535]); palette images with transparency go via RGBA."""
    if image.mode.startswith("I"):  # I;16, I;16B, ... (16-bit greyscale PNGs open as these), I (32-bit)
        array = np.asarray(image)  # the decoder's own width: uint16 (2 bytes a pixel), int32 for I
        if array.dtype.kind == "i":
            array = np.clip(array, 0, 65535)
        high = np.empty(array.shape, np.uint8)
        np.right_shift(array, 8, out=high, casting="unsafe")  # no wider copy: values <= 255 after the shift
        image = Image.fromarray(high)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def check_pixels(width: int, height: int, max_pixels: int | None):
    """Raise Pillow's ``DecompressionBombError`` (a broken file: replaced and counted) for an image
    above ``max_pixels`` (``data.max_image_pixels``; None: only Pillow's own limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise Image.DecompressionBombError(f"{width}x{height} = {width * height:,} pixels, above "
                                           f"data.max_image_pixels={max_pixels:,}")


@contextlib.contextmanager
def size_checked_by_caller():
    """Pillow's ``DecompressionBombWarning`` silenced while an image is opened: the caller checks
    its size with :func:`check_pixels`, which names the image and the key."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _without_decoding(dataset, columns: list[str]):
    """Keep ``columns`` and stop HF from decoding images: we decode ourselves, only what we use."""
    dataset = dataset.select_columns(columns)
    for column in columns:
        if isinstance(dataset.features[column], ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


@contextlib.contextmanager
def seeded_rngs(seed: int, numpy: bool = True):
    """Seed Python's ``random``, NumPy's global RNG and torch's CPU generator for the block, then
    restore all three: transforms draw from these global RNGs (timm uses ``random``, torchvision
    uses torch), so seeding them makes one sample's augmentation reproducible without disturbing
    the caller's random streams. Only the CPU generator is touched (never CUDA state).
    ``numpy=False`` leaves NumPy alone, for code known not to draw from it (its state is the
    costliest to save: ~0.1 ms)."""
    python_state, numpy_state = random.getstate(), np.random.get_state() if numpy else None
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        if numpy:
            np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy:
                np.random.set_state(numpy_state)


# ---------------------------------------------------------------- the dataset

@dataclass(frozen=True)
class UndecodableImage:
    """One file that could not be decoded: where it is and why. Travels as it is from the
    DataLoader workers to the training loop and across processes (``gather_object`` pickles it)."""

    path: str | None  # the file, when the dataset knows it
    row: int          # the row of the dataset
    error: str        # exception type and the first line of its message

    @property
    def name(self) -> str:
        return sample_name({"path": self.path}, self.row)

    def __str__(self) -> str:
        return f"{self.name}: {self.error}"


class ImageClassDataset(Dataset):
    """An HF dataset + a transform -> ``(image tensor, label, problems)``, decoded lazily per sample.

    ``dataset[i]`` uses the global RNGs; ``dataset[(i, sample_seed)]`` (what :class:`TrainSampler`
    yields) runs the transform under :func:`seeded_rngs`, so the augmentation is a pure function
    of (index, seed) whichever worker process runs it.

    ``problems`` is a tuple of :class:`UndecodableImage`, empty for a clean sample. An image that
    cannot be decoded (truncated, empty, not an image, null) or holds more than ``max_pixels`` pixels
    (:func:`check_pixels`, read from the header before anything is decoded) is replaced by the next
    decodable sample and recorded, so the training loop can count and report broken files across
    DataLoader workers and processes (:class:`UndecodableImages` holds the policy). A label
    outside ``[0, num_classes)`` is an error naming the sample: a wrong label is not noise to skip.
    Loaders batch samples with :meth:`collate` (the problems of a batch become one flat list).
    """

    def __init__(self, dataset, transform, *, num_classes: int, image_column: str = "image",
                 label_column: str = "label", max_pixels: int | None = None):
        missing = [column for column in (image_column, label_column) if column not in dataset.column_names]
        if missing:
            raise InputError(f"column {missing[0]!r} not in the dataset; available columns: "
                             f"{', '.join(dataset.column_names)}")
        self.dataset = _without_decoding(dataset, [image_column, label_column])
        self.transform = transform
        self.num_classes, self.max_pixels = num_classes, max_pixels
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        decoded, label, problems = self._load(index, sample_seed)
        return self._transform(decoded, sample_seed), label, problems

    def _decode(self, value, sample_seed, position: int):
        """The stored image value of row ``position`` -> what :meth:`_transform` takes; raises for a
        broken file."""
        with size_checked_by_caller():
            image = decode_image(value)
        check_pixels(*image.size, self.max_pixels)
        return to_rgb(image)

    def _transform(self, image, sample_seed):
        if sample_seed is None:
            return self.transform(image)
        with seeded_rngs(sample_seed):
            return self.transform(image)

    def _load(self, index: int, sample_seed):
        problems = []
        for attempt in range(len(self)):
            position = (index + attempt) % len(self)
            row = self.dataset[position]
            value = row[self.image_column]
            label = int(row[self.label_column])
            if not 0 <= label < self.num_classes:
                raise InputError(f"sample {sample_name(value, position)}: label {label} is outside "
                                 f"[0, {self.num_classes}) (column {self.label_column!r}; set model.num_classes "
                                 f"or fix the label)")
            try:
                return self._decode(value, sample_seed, position), label, tuple(problems)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                path = value.get("path") if isinstance(value, dict) else None
                problems.append(UndecodableImage(path, position, quote_error(error)))
        raise InputError(f"no image of the dataset can be decoded (first: {problems[0]})")

    @staticmethod
    def collate(samples):
        """``(images, labels, problems)``: stacked images and labels, the problems of all samples."""
        images, labels, problems = zip(*samples)
        return default_collate(images), torch.tensor(labels), [p for sample in problems for p in sample]

    def batch_transform(self, device):
        """Loader images -> model input on ``device`` (here: the copy; the transform ran in the workers)."""
        return lambda images: images.to(device, non_blocking=True)


def sample_name(value, position: int) -> str:
    """The file a sample came from when the dataset knows it, else its row number."""
    path = value.get("path") if isinstance(value, dict) else None
    return f"{path} (row {position})" if path else f"row {position}"


class UndecodableImages:
    """The one place of the broken-file policy: undecodable images reported by every process are
    collected (distinct by file and row), and more than ``max_fraction`` of the dataset stops the run.

    The training loop feeds it the :class:`UndecodableImage` records of :class:`ImageClassDataset`
    gathered from all processes at each log step; its state is saved in checkpoints."""

    def __init__(self, dataset_size: int, max_fraction: float):
        self.limit = int(max_fraction * dataset_size)
        self.dataset_size, self.max_fraction = dataset_size, max_fraction
        self.names: list[str] = []

    def add(self, records) -> list[UndecodableImage]:
        """Record problems; returns the records of files not seen before."""
        known, new = set(self.names), []
        for record in records:
            if record.name not in known:
                known.add(record.name)
                self.names.append(record.name)
                new.append(record)
        return new

    def check(self) -> None:
        if len(self.names) > self.limit:
            raise InputError(f"{len(self.names)} of {self.dataset_size} images cannot be decoded, more than "
                             f"data.max_bad_fraction={self.max_fraction} allows; first: {', '.join(self.names[:3])}")

    def state_dict(self) -> dict:
        return {"names": list(self.names)}

    def load_state_dict(self, state: dict) -> None:
        self.names = list(state["names"])
