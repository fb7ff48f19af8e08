"""DataLoader workers that hand over uint8 crops (``data.augment_on: device``).

Per file a worker does only what has to happen per file:

1. read the bytes and parse the header (simplejpeg for a JPEG it decodes, PIL for anything else,
   which raises the CPU path's errors, e.g. for a decompression bomb);
2. draw the sample's augmentation (:mod:`clsvit.data.augment`): the RandomResizedCrop box comes first,
   before anything is decoded;
3. decode at the smallest libjpeg-turbo DCT scale, 1/2, 1/4 or 1/8, that keeps the crop at or above
   the output size (simplejpeg; libjpeg-turbo's other M/8 scales decode slower than full size, see
   benchmarks/bench_data.py), and cut the crop out;
4. hand over the crop's uint8 pixels and the draws; :meth:`CropBatch.collate` packs a batch into one
   buffer, which travels to the accelerator in one copy.

Whatever simplejpeg does not decode (PNG, CMYK JPEG, a broken file) goes through the CPU path's own
decoding (:func:`clsvit.data.images.decode_image` + :func:`~clsvit.data.images.to_rgb`) at full size, so odd and
broken files behave exactly as there: converted to RGB, or counted and replaced by the next sample
with the same error.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, replace

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from clsvit.data.augment import BOX, JPEG, ROW
from clsvit.errors import InputError
from clsvit.data.images import NO_IMAGE, ImageClassDataset, check_pixels, seeded_rngs, size_checked_by_caller, to_rgb

DCT_SCALES = (1, 2, 4, 8)  # libjpeg-turbo's fast reduced IDCTs: 1/1, 1/2, 1/4, 1/8


def read_bytes(value) -> bytes:
    """An undecoded HF ``Image`` value (``{"bytes", "path"}``) -> the file's bytes; a null value
    raises ``ValueError``, as :func:`~clsvit.data.images.decode_image` does."""
    if value is None:
        raise ValueError(NO_IMAGE)
    if value.get("bytes") is not None:
        return value["bytes"]
    with open(value["path"], "rb") as file:
        return file.read()


def dct_scale(height: int, width: int, min_side: int | None) -> int:
    """The largest of 1, 2, 4, 8 that keeps a ``height x width`` region at least ``min_side`` on both
    sides (None: 1, full size)."""
    if min_side is None:
        return 1
    return max(scale for scale in DCT_SCALES if min(height, width) >= scale * min_side or scale == 1)


def open_image(data: bytes) -> tuple[int, int, Image.Image | None]:
    """(width, height, PIL image or None): a JPEG that simplejpeg decodes (YCbCr or grey, no larger
    than PIL's decompression-bomb limit) is only header-parsed by simplejpeg (None); anything else
    is opened by PIL, which raises for what the CPU path cannot open either, and, as there, warns of
    no size: the caller checks it (:func:`~clsvit.data.images.check_pixels`)."""
    if data[:3] == b"\xff\xd8\xff":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None
        if colorspace in ("YCbCr", "Gray") and width * height <= (Image.MAX_IMAGE_PIXELS or math.inf):
            return width, height, None
    with size_checked_by_caller():
        image = Image.open(io.BytesIO(data))
    return *image.size, image


def decode_crop(data: bytes, image: Image.Image | None, box, min_side: int | None):
    """The pixels of ``box`` = (top, left, height, width) of the image ``data`` as uint8 H x W x 3,
    decoded at the DCT scale :func:`dct_scale` allows, and the box within the returned pixels.
    ``image`` is :func:`open_image`'s PIL image (None: a JPEG for simplejpeg). Whatever simplejpeg
    does not decode is decoded as the CPU path decodes it, at full size, raising what it raises."""
    top, left, height, width = (int(v) for v in box)
    scale = dct_scale(height, width, min_side)
    pixels = None
    if image is None:
        image_height, image_width, _, _ = simplejpeg.decode_jpeg_header(data)
        try:
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(image_width / scale),
                                            min_height=math.ceil(image_height / scale))
        except ValueError:  # strict: also libjpeg's warnings (a truncated file); the CPU decode decides
            image = Image.open(io.BytesIO(data))
    if pixels is None:
        pixels, scale = np.asarray(to_rgb(image)), 1
    rows = _scaled_span(top, height, scale, pixels.shape[0])
    cols = _scaled_span(left, width, scale, pixels.shape[1])
    crop = np.require(pixels[rows[0]:rows[1], cols[0]:cols[1]], requirements=["C", "W"])  # copies if needed
    return crop, (0, 0, crop.shape[0], crop.shape[1])


def _scaled_span(start: int, length: int, scale: int, limit: int) -> tuple[int, int]:
    """[start, start + length) at 1/scale: a DCT-scaled pixel p covers original pixels [p·scale, (p+1)·scale),
    so the edges divide by the scale and round to the nearest pixel edge; the span keeps at least one
    pixel, inside the ``limit`` pixels decoded."""
    first = min(round(start / scale), limit - 1)
    return first, max(first + 1, min(round((start + length) / scale), limit))


class CropDataset(ImageClassDataset):
    """:class:`~clsvit.data.images.ImageClassDataset` whose samples are ``((crop, draws), label, problems)``:
    the uint8 H x W x 3 crop and the row of draws of ``augment`` (a :class:`clsvit.data.augment.TrainAugment`
    or :class:`~clsvit.data.augment.EvalTransform`), which :meth:`batch_transform` applies to a batch on
    the accelerator. Seeds, replacement of broken files and labels work as in the parent class.

    ``jpeg_on_device`` (``data.decode_on: device``): a JPEG that simplejpeg would decode and that is
    complete (it ends with the end-of-image marker; a truncated file takes the CPU decode, which
    finds it broken as the CPU path does) is handed over as its file, decoded on the accelerator
    (:func:`decode_jpegs`) and cropped there, at full size."""

    def __init__(self, dataset, augment, *, jpeg_on_device: bool = False, **columns):
        super().__init__(dataset, augment, **columns)
        self.jpeg_on_device = jpeg_on_device

    def _decode(self, value, sample_seed, position: int):
        data = read_bytes(value)
        width, height, image = open_image(data)
        check_pixels(width, height, self.max_pixels)
        with seeded_rngs(sample_seed, numpy=False) if sample_seed is not None else contextlib.nullcontext():
            draws = self.transform.draw(width, height)
        draws[ROW] = position
        if self.jpeg_on_device and image is None and data.rstrip(b"\0").endswith(b"\xff\xd9"):
            draws[JPEG] = 1
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.from_numpy(draws)
        crop, draws[BOX] = decode_crop(data, image, draws[BOX], self.transform.decode_min_side)
        return torch.from_numpy(crop), torch.from_numpy(draws)

    def _transform(self, decoded, sample_seed):
        return decoded

    @staticmethod
    def collate(samples):
        crops, labels, problems = zip(*samples)
        return CropBatch.collate(crops), torch.tensor(labels), [p for sample in problems for p in sample]

    def batch_transform(self, device):
        """A loader batch (:class:`CropBatch`) -> normalised float images on ``device``."""
        augment = self.transform
        return lambda batch: augment(batch.to(device, non_blocking=True))


@dataclass
class CropBatch:
    """A batch of crops of different sizes in one buffer: ``pixels`` holds every crop's H x W x 3
    uint8 values one after the other (it moves to the accelerator in one copy); ``sizes`` (B x 2:
    height, width), the draws ``params`` (B x NUM_PARAMS) and ``files``, the JPEG files to decode on
    the accelerator one after the other (``sizes``: length, 0), stay on the host, so deciding what to
    run never waits for the accelerator. The augmentation reads the crops in place
    (:meth:`flat_images`, :func:`clsvit.data.augment.resize_boxes`)."""

    pixels: torch.Tensor
    sizes: torch.Tensor
    params: torch.Tensor
    files: torch.Tensor

    @classmethod
    def collate(cls, crops) -> CropBatch:
        """``crops``: (uint8 crop or JPEG file, draws) pairs."""
        empty = torch.zeros(0, dtype=torch.uint8)
        is_file = [bool(draws[JPEG]) for _, draws in crops]
        pixels = [crop.reshape(-1) for (crop, _), file in zip(crops, is_file) if not file]
        files = [crop for (crop, _), file in zip(crops, is_file) if file]
        sizes = [(crop.numel(), 0) if file else tuple(crop.shape[:2]) for (crop, _), file in zip(crops, is_file)]
        return cls(torch.cat(pixels or [empty]), torch.tensor(sizes, dtype=torch.int64),
                   torch.stack([draws for _, draws in crops]), torch.cat(files or [empty]))

    def __len__(self) -> int:
        return len(self.sizes)

    def to(self, device, non_blocking: bool = False) -> CropBatch:
        return replace(self, pixels=self.pixels.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CropBatch:
        return replace(self, pixels=self.pixels.pin_memory())

    def flat_images(self, pad_bytes: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """``(buffer, offsets, widths)``: every image's H x W x 3 uint8 pixels one after the other in
        one buffer on the device of ``pixels``, then ``pad_bytes`` zero bytes; each image's first
        byte and pixels per row (host arrays). A crop is its pixels as they came (its box is the
        whole crop); a JPEG file is decoded here (:func:`decode_jpegs`), whole (its box is the
        drawn one)."""
        device = self.pixels.device
        sizes = self.sizes.numpy()
        is_file = self.params[:, JPEG].numpy() > 0
        lengths = np.where(is_file, 0, sizes[:, 0] * sizes[:, 1] * 3)
        offsets, widths = np.cumsum(lengths) - lengths, sizes[:, 1].copy()
        parts = [self.pixels]
        if is_file.any():
            ends = np.cumsum(sizes[is_file, 0])
            files = list(torch.tensor_split(self.files, ends[:-1].tolist()))
            decoded = decode_jpegs(files, self.params[is_file, ROW].long().tolist(), device)
            position = int(lengths.sum())
            for index, image in zip(np.flatnonzero(is_file), decoded):
                offsets[index], widths[index] = position, image.shape[2]
                parts.append(image.permute(1, 2, 0).reshape(-1))
                position += image.numel()
        parts.append(torch.zeros(pad_bytes, dtype=torch.uint8, device=device))
        return torch.cat(parts), offsets, widths


def decode_jpegs(files: list[torch.Tensor], rows: list[int], device) -> list[torch.Tensor]:
    """JPEG files (uint8 host tensors) -> 3 x H x W uint8 images on ``device``, in one batched call
    of ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA). When the batch fails, file by file; a file
    the device does not decode is decoded on the host (simplejpeg, else PIL). A file neither decodes
    is an error naming its row: it passed the worker's checks, so only the CPU decode path
    (``data.decode_on: cpu``) can count and replace it."""
    try:
        return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        images = []
        for data, row in zip(files, rows):
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as error:
                images.append(_decode_on_host(data.numpy().tobytes(), row, error).to(device, non_blocking=True))
        return images


def _decode_on_host(data: bytes, row: int, device_error: Exception) -> torch.Tensor:
    try:
        width, height, image = open_image(data)
        crop, _ = decode_crop(data, image, (0, 0, height, width), None)
    except (OSError, ValueError, SyntaxError) as error:
        raise InputError(f"row {row}: a JPEG that passed the worker's checks decodes neither on the device "
                         f"({type(device_error).__name__}) nor on the host ({type(error).__name__}: {error}); "
                         f"set data.decode_on=cpu to have such files counted and replaced") from error
    return torch.from_numpy(crop).permute(2, 0, 1)
