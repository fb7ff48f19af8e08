"""DataLoader workers that hand over uint8 crops (``data.augment_on: device``).

Per file a worker does only what has to happen per file:

1. read the bytes and parse the header (simplejpeg for a JPEG it decodes, PIL for anything else,
   which raises the CPU path's errors, e.g. for a decompression bomb);
2. draw the sample's augmentation (:mod:`clsvit.augment`): the RandomResizedCrop box comes first,
   before anything is decoded;
3. decode at the smallest libjpeg-turbo DCT scale, 1/2, 1/4 or 1/8, that keeps the crop at or above
   the output size (simplejpeg; libjpeg-turbo's other M/8 scales decode slower than full size, see
   benchmarks/bench_data.py), and cut the crop out;
4. hand over the crop's uint8 pixels and the draws; :meth:`CropBatch.collate` packs a batch into one
   buffer, which travels to the accelerator in one copy.

Whatever simplejpeg does not decode (PNG, CMYK JPEG, a broken file) goes through the CPU path's own
decoding (:func:`clsvit.data.decode_image` + :func:`~clsvit.data.to_rgb`) at full size, so odd and
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

from clsvit.augment import BOX
from clsvit.data import ImageClassDataset, seeded_rngs, to_rgb

DCT_SCALES = (1, 2, 4, 8)  # libjpeg-turbo's fast reduced IDCTs: 1/1, 1/2, 1/4, 1/8


def read_bytes(value) -> bytes:
    """An undecoded HF ``Image`` value (``{"bytes", "path"}``) -> the file's bytes."""
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
    is opened by PIL, which raises for what the CPU path cannot open either."""
    if data[:3] == b"\xff\xd8\xff":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            colorspace = None
        if colorspace in ("YCbCr", "Gray") and width * height <= (Image.MAX_IMAGE_PIXELS or math.inf):
            return width, height, None
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
    so the edges divide by the scale and round to the nearest pixel edge."""
    first = min(round(start / scale), limit - 1)
    return first, max(first + 1, min(round((start + length) / scale), limit))


class CropDataset(ImageClassDataset):
    """:class:`~clsvit.data.ImageClassDataset` whose samples are ``((crop, draws), label, problems)``:
    the uint8 H x W x 3 crop and the row of draws of ``augment`` (a :class:`clsvit.augment.TrainAugment`
    or :class:`~clsvit.augment.EvalTransform`), which :meth:`batch_transform` applies to a batch on
    the accelerator. Seeds, replacement of broken files and labels work as in the parent class."""

    def _decode(self, value, sample_seed):
        data = read_bytes(value)
        width, height, image = open_image(data)
        with seeded_rngs(sample_seed, numpy=False) if sample_seed is not None else contextlib.nullcontext():
            draws = self.transform.draw(width, height)
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
    height, width) and the draws ``params`` (B x NUM_PARAMS) stay on the host, so deciding what to
    run never waits for the accelerator."""

    pixels: torch.Tensor
    sizes: torch.Tensor
    params: torch.Tensor

    @classmethod
    def collate(cls, crops) -> CropBatch:
        return cls(torch.cat([crop.reshape(-1) for crop, _ in crops]),
                   torch.tensor([tuple(crop.shape[:2]) for crop, _ in crops], dtype=torch.int64),
                   torch.stack([draws for _, draws in crops]))

    def __len__(self) -> int:
        return len(self.sizes)

    def to(self, device, non_blocking: bool = False) -> CropBatch:
        return replace(self, pixels=self.pixels.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CropBatch:
        return replace(self, pixels=self.pixels.pin_memory())

    def crops(self, boxes) -> list[torch.Tensor]:
        """Each crop as a 3 x H x W view of ``pixels`` (on its device), cut to its row of ``boxes``
        (top, left, height, width)."""
        views, offset = [], 0
        for (height, width), (top, left, box_height, box_width) in zip(self.sizes.tolist(), boxes.long().tolist()):
            image = self.pixels[offset:offset + height * width * 3].view(height, width, 3).permute(2, 0, 1)
            views.append(image[:, top:top + box_height, left:left + box_width])
            offset += height * width * 3
        return views
