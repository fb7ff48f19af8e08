"""The DeiT-III augmentation as batched tensor operations on the accelerator (``data.augment_on: device``).

It comes in two halves, both built from the timm transform that the CPU path runs
(:func:`clsvit.data.build_train_transform` / :func:`~clsvit.data.build_eval_transform`), so both
paths follow one recipe:

- :meth:`TrainAugment.draw` runs in the DataLoader worker, before anything is decoded. It draws one
  sample's random choices — the RandomResizedCrop box, the flip, 3-Augment's operation and blur
  radius, the colour-jitter order and factors — by calling the same timm and torchvision functions on
  the same generators in the same order as the PIL transform. Under one seed both paths draw the
  same numbers (the tests compare the generator states after both), so a sample's augmentation stays
  a pure function of its seed, i.e. of (sample, seed, epoch, rank), and a resume stays bit-identical.
  The draws travel with the sample as one row of :data:`NUM_PARAMS` numbers.
- :meth:`TrainAugment.__call__` applies a batch's rows on the accelerator, for the whole batch at
  once, in a fixed number of operations whatever the batch size (no loop over images: on a GPU
  each dispatched op costs host time, and a loop per image would set the pace): every crop resized
  to the output size with PIL's antialiased filter and flipped (:func:`resize_boxes`), then
  3-Augment (timm's ``3a``: grayscale | solarize | Gaussian blur), colour jitter and
  normalisation. Mixup/CutMix (timm, batch mode) follows in the training loop as on the CPU path.

Where torchvision has no batched form of an op with per-sample parameters (a crop size, a jitter
factor, a blur radius per image), the op is written here over the batch with torchvision's
definition (``_blend``) or PIL's (the resampling filters of Pillow's resize, the box-blur kernel of
its GaussianBlur). The differences to the PIL ops are stated and tested in tests/test_augment.py.
Nothing here builds a tensor from Python numbers on the accelerator (a blocking copy on a GPU):
per-sample values travel from the host with ``non_blocking=True``.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as nnf
from timm.data.auto_augment import AutoAugment
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from clsvit.errors import InputError

# One row of draws per sample (float64 in the worker, so integer boxes stay exact).
BOX = slice(0, 4)          # top, left, height, width of the crop, in the pixels handed over
FLIP = 4                   # 1: horizontal flip
THREE_AUG = 5              # 3-Augment's operation: -1 none, then the indices of OPS
BLUR_SIGMA = 6             # Gaussian blur radius (PIL's radius is the standard deviation)
JITTER_OPS = slice(7, 10)  # colour jitter, in the drawn order: 0 brightness, 1 contrast, 2 saturation, -1 none
JITTER_FACTORS = slice(10, 13)
JPEG = 13                  # 1: the sample is its JPEG file, decoded on the accelerator (data.decode_on: device)
ROW = 14                   # the sample's row in the dataset (named in errors)
NUM_PARAMS = 15
OPS = ("Desaturate", "Solarize", "GaussianBlurRand")  # the ops of timm's 3a policy
GRAYSCALE, SOLARIZE, BLUR = range(3)
BLUR_RADIUS_RANGE = (0.1, 2.0)  # timm auto_augment.py gaussian_blur_rand: random.uniform(0.1, 2.0 * factor)
CPU_CHUNK = 8  # images per pass on a CPU device: of 1-32, 8 measured fastest (smaller temporaries stay cached)


def size_only(width: int, height: int) -> torch.Tensor:
    """A stand-in with an image's size and no pixels, for samplers that only read the size (timm's
    RandomResizedCrop.get_params)."""
    return torch.empty(()).expand(3, height, width)


def _unsupported(steps, supported, what: str):
    extra = [type(step).__name__ for step in steps if not isinstance(step, supported)]
    if extra:
        raise InputError(f"data.augment_on=device runs {what} on the accelerator; this recipe's transform also has "
                         f"{', '.join(extra)}: set data.augment_on=cpu")


class TrainAugment:
    """The training augmentation split into per-sample draws (:meth:`draw`, in the worker) and a
    batched application (:meth:`__call__`, on the accelerator). ``transform`` is the timm training
    transform of the recipe (RandomResizedCrop, flip, 3-Augment, ColorJitter, normalise)."""

    def __init__(self, transform: T.Compose):
        steps = transform.transforms
        _unsupported(steps, (RandomResizedCropAndInterpolation, T.RandomHorizontalFlip, AutoAugment, T.ColorJitter,
                             MaybeToTensor, T.Normalize),
                     "RandomResizedCrop, flip, 3-Augment, colour jitter and normalisation")
        find = lambda kind: next((step for step in steps if isinstance(step, kind)), None)  # noqa: E731
        self.crop, self.flip = find(RandomResizedCropAndInterpolation), find(T.RandomHorizontalFlip)
        self.three_augment, self.jitter, normalize = find(AutoAugment), find(T.ColorJitter), find(T.Normalize)
        if isinstance(self.crop.interpolation, (tuple, list)):
            raise InputError("data.augment_on=device needs one aug.interpolation, not a random choice")
        self.resample = _resampling_filter(self.crop.interpolation)
        if self.jitter is not None and self.jitter.hue is not None:
            raise InputError("data.augment_on=device has no hue jitter (DeiT-III uses none): set data.augment_on=cpu")
        self.size = list(self.crop.size)
        self.normalize = Normalize(normalize.mean, normalize.std)
        self.solarize_threshold, self.desaturate_keep, self.blur_factor = 256, 1.0, 1.0
        if self.three_augment is not None:
            for sub_policy in self.three_augment.policy:
                if len(sub_policy) != 1 or sub_policy[0].name not in OPS or sub_policy[0].prob < 1 \
                        or sub_policy[0].magnitude_std > 0:
                    raise InputError(f"data.augment_on=device implements timm's 3-Augment policy only, got "
                                     f"{sub_policy}: set data.augment_on=cpu")
                op = sub_policy[0]
                level = op.level_fn(max(0.0, min(op.magnitude, op.magnitude_max or 10)), op.hparams)[0]
                if op.name == "Solarize":
                    self.solarize_threshold = level
                elif op.name == "Desaturate":
                    self.desaturate_keep = min(1.0, max(0.0, 1.0 - level))  # timm desaturate(): enhance factor
                else:
                    self.blur_factor = level

    @property
    def decode_min_side(self) -> int:
        """The side a crop must keep when decoded at a DCT scale: the output size."""
        return min(self.size)

    # ------------------------------------------------------------------ in the worker

    def draw(self, width: int, height: int) -> np.ndarray:
        """One sample's random choices for a ``width x height`` image, drawn exactly as the timm
        transform draws them (no pixels needed)."""
        row = np.zeros(NUM_PARAMS)
        row[BOX] = self.crop.get_params(size_only(width, height), self.crop.scale, self.crop.ratio)  # Python's random
        if self.flip is not None:
            row[FLIP] = float(torch.rand(1) < self.flip.p)  # torchvision RandomHorizontalFlip.forward
        row[THREE_AUG] = -1
        if self.three_augment is not None:
            op = random.choice(self.three_augment.policy)[0]  # timm AutoAugment.__call__
            row[THREE_AUG] = OPS.index(op.name)
            if op.name == "GaussianBlurRand":
                row[BLUR_SIGMA] = random.uniform(BLUR_RADIUS_RANGE[0], BLUR_RADIUS_RANGE[1] * self.blur_factor)
        row[JITTER_OPS], row[JITTER_FACTORS] = -1, 1.0
        if self.jitter is not None:
            order, *factors = T.ColorJitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                                       self.jitter.saturation, self.jitter.hue)
            slots = [i for i in order.tolist() if i < 3 and factors[i] is not None]
            row[JITTER_OPS][:len(slots)] = slots
            row[JITTER_FACTORS][:len(slots)] = [factors[i] for i in slots]
        return row

    # ------------------------------------------------------------------ on the accelerator

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        """A :class:`clsvit.data.crops.CropBatch` -> normalised float32 images ``B x 3 x size x size``.
        On a CPU the ops after the resize go through in chunks that stay in the cache (results are
        the same)."""
        params = batch.params  # stays on the host: choosing what to run never waits for the device
        size = np.array([self.size], dtype=np.float64)
        plan = ResizePlan(params[:, BOX].numpy(), resized=size, first=np.zeros_like(size), count=self.size,
                          support=self.resample[0], flip=params[:, FLIP].numpy() > 0)
        x = resize_boxes(*batch.flat_images(plan.pad_bytes), plan, self.resample[1])
        if x.device.type != "cpu":
            return self._augment(x, params)
        out = torch.empty(x.shape, dtype=torch.float32)
        for start in range(0, len(x), CPU_CHUNK):
            out[start:start + CPU_CHUNK] = self._augment(x[start:start + CPU_CHUNK], params[start:start + CPU_CHUNK])
        return out

    def _augment(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """3-Augment, colour jitter, normalisation of resized (and flipped) uint8 images ``x`` with their draws."""
        device = x.device
        index = lambda mask: torch.nonzero(mask).flatten().to(device, non_blocking=True)  # noqa: E731
        op = params[:, THREE_AUG]
        if (op == SOLARIZE).any():  # on uint8 levels, as PIL's ImageOps.solarize
            chosen = index(op == SOLARIZE)
            x[chosen] = solarize(x[chosen], self.solarize_threshold)
        x = F.to_dtype(x, torch.float32, scale=True)
        if (op == GRAYSCALE).any():  # timm desaturate(): PIL ImageEnhance.Color, a blend with the grey image
            chosen = index(op == GRAYSCALE)
            x[chosen] = blend(x[chosen], F.rgb_to_grayscale(x[chosen]), self.desaturate_keep)
        if (op == BLUR).any():
            chosen = op == BLUR
            x[index(chosen)] = gaussian_blur(x[index(chosen)], params[chosen, BLUR_SIGMA],
                                             BLUR_RADIUS_RANGE[1] * self.blur_factor)
        x = color_jitter(x, params[:, JITTER_OPS], params[:, JITTER_FACTORS])
        return self.normalize(x)


class EvalTransform:
    """The evaluation transform (resize the shorter side, centre crop, normalise) on the accelerator,
    with the timm eval transform's resize size, interpolation and crop, as a batch: the output pixels
    of the centre crop of each resized image, computed with PIL's resampling filter from the rows and
    columns of the image they need (:func:`resize_boxes`). Images are decoded at full size, so top-1
    follows the published protocol up to the resize's rounding (at most one level)."""

    def __init__(self, transform: T.Compose):
        steps = transform.transforms
        _unsupported(steps, (T.Resize, T.CenterCrop, MaybeToTensor, T.Normalize),
                     "resize, centre crop and normalisation")
        resize, centre_crop, normalize = steps[0], steps[1], steps[-1]
        if not (isinstance(resize, T.Resize) and isinstance(centre_crop, T.CenterCrop)
                and isinstance(resize.size, int)):
            raise InputError(f"data.augment_on=device expects timm's centre-crop eval transform, got {transform}")
        self.resize_to, self.crop_size = resize.size, list(centre_crop.size)
        if self.resize_to < max(self.crop_size):
            raise InputError(f"data.augment_on=device crops the resized image; aug.eval_crop_pct > 1 pads it instead "
                             f"(resize to {self.resize_to}, crop {self.crop_size}): set data.augment_on=cpu")
        self.resample = _resampling_filter(resize.interpolation)
        self.normalize = Normalize(normalize.mean, normalize.std)

    decode_min_side = None  # decoded at full size: the published protocol resizes the full-resolution image

    def draw(self, width: int, height: int) -> np.ndarray:
        """The whole image (the geometry is deterministic)."""
        row = np.zeros(NUM_PARAMS)
        row[BOX] = (0, 0, height, width)
        row[THREE_AUG], row[JITTER_OPS], row[JITTER_FACTORS] = -1, -1, 1.0
        return row

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        boxes = batch.params[:, BOX].numpy()
        height, width = boxes[:, 2], boxes[:, 3]
        short, long = np.minimum(height, width), np.maximum(height, width)
        # torchvision's resize of the shorter side and its centre-crop anchor (functional.py
        # _compute_resized_output_size, v2 _center_crop_compute_crop_anchor: Python's round)
        new_long = np.floor(self.resize_to * long / short)
        resized = np.where((height <= width)[:, None], np.stack([np.full_like(short, self.resize_to), new_long], 1),
                           np.stack([new_long, np.full_like(short, self.resize_to)], 1))
        first = np.round((resized - np.array(self.crop_size)) / 2.0)
        plan = ResizePlan(boxes, resized=resized, first=first, count=self.crop_size, support=self.resample[0])
        x = resize_boxes(*batch.flat_images(plan.pad_bytes), plan, self.resample[1])
        return self.normalize(F.to_dtype(x, torch.float32, scale=True))


# ---------------------------------------------------------------------- batched ops

class Normalize:
    """torchvision's normalize (``image.sub_(mean).div_(std)``) with the mean and std held as host
    tensors and copied to the device once (``non_blocking``): torchvision builds them from Python
    lists on the device at every call, a blocking copy per batch on a GPU."""

    def __init__(self, mean, std):
        self.host = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1), \
            torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self.on_device:
            self.on_device[x.device] = tuple(t.to(x.device, non_blocking=True) for t in self.host)
        mean, std = self.on_device[x.device]
        return x.sub_(mean).div_(std)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution with a = -0.5, PIL's (and aten's antialiased) bicubic filter, support 2."""
    x = x.abs()
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, 0.0))


def _triangle(x: torch.Tensor) -> torch.Tensor:
    """PIL's bilinear filter, support 1."""
    return (1 - x.abs()).clamp_(min=0)


RESAMPLING = {InterpolationMode.BICUBIC: (2.0, _bicubic), InterpolationMode.BILINEAR: (1.0, _triangle)}


def _resampling_filter(mode):
    if mode not in RESAMPLING:
        raise InputError(f"data.augment_on=device resizes with PIL's bilinear or bicubic filter, not "
                         f"{getattr(mode, 'value', mode)} (aug.interpolation): set data.augment_on=cpu")
    return RESAMPLING[mode]


class ResizePlan:
    """What :func:`resize_boxes` computes for a batch, decided on the host from the draws: per image,
    its ``boxes`` (top, left, height, width, in its pixels) are resized to ``resized`` (B x 2:
    height, width) and the ``count`` (height, width) output pixels from ``first`` (B x 2) on are
    kept; ``flip`` mirrors an image's output horizontally. PIL's resampling geometry (Pillow
    src/libImaging/Resample.c, ``precompute_coeffs``; aten's ``_compute_indices_min_size_weights_aa``
    is the same): output pixel i of an axis scaled by s = box / resized has its centre at
    s * (i + 0.5) and reads the box pixels within ``support * max(s, 1)`` of it. ``region`` (B x 4:
    top, left, height, width within the box) is what the kept outputs read."""

    def __init__(self, boxes: np.ndarray, *, resized: np.ndarray, first: np.ndarray, count, support: float,
                 flip: np.ndarray | None = None):
        boxes = np.asarray(boxes, dtype=np.float64)
        resized = np.broadcast_to(np.asarray(resized, dtype=np.float64), (len(boxes), 2))
        first = np.broadcast_to(np.asarray(first, dtype=np.float64), (len(boxes), 2))
        self.boxes, self.resized, self.first, self.count = boxes, resized, first, tuple(int(c) for c in count)
        self.support = support
        self.flip = np.zeros(len(boxes), dtype=bool) if flip is None else np.asarray(flip, dtype=bool)
        source = boxes[:, 2:]
        scale = source / resized
        reach = support * np.maximum(scale, 1.0)
        last = first + np.array(self.count) - 1
        start = np.maximum(np.trunc(scale * (first + 0.5) - reach + 0.5), 0)
        end = np.minimum(np.trunc(scale * (last + 0.5) + reach + 0.5), source)
        self.region = np.concatenate([start, end - start], axis=1)
        self.padded = (int(self.region[:, 2].max()), int(self.region[:, 3].max()))

    @property
    def pad_bytes(self) -> int:
        """Bytes an image buffer needs after its last image: one padded row of pixels."""
        return 3 * self.padded[1]


def _resampling_weights(source, resized, first, start, count: int, length: int, support: float, kernel,
                        device) -> torch.Tensor:
    """B x count x length weights of one axis: output pixels first..first+count-1 of each image's
    box of ``source`` pixels resized to ``resized``, over box pixels start..start+length-1 (beyond
    the box: 0). PIL's coefficients: the filter at (pixel - centre + 0.5) / max(s, 1), on the pixels
    [trunc(centre - reach + 0.5), trunc(centre + reach + 0.5)) clipped to the box, normalised to sum
    1. ``source`` ... ``start``: B x 1 float64 tensors on ``device``."""
    scale = source / resized
    stretch = scale.clamp(min=1.0)
    reach = support * stretch
    centre = scale * (first + torch.arange(count, device=device, dtype=torch.float64) + 0.5)  # B x count
    low = torch.trunc(centre - reach + 0.5).clamp_(min=0)
    high = torch.minimum(torch.trunc(centre + reach + 0.5), source)
    pixel = start + torch.arange(length, device=device, dtype=torch.float64)  # B x length
    taps = kernel(((pixel[:, None, :] - centre[..., None] + 0.5) / stretch[..., None]).float())
    inside = (pixel[:, None, :] >= low[..., None]) & (pixel[:, None, :] < high[..., None])
    taps = taps.where(inside, 0.0)
    return taps / taps.sum(-1, keepdim=True)


def resize_boxes(pixels: torch.Tensor, offsets: np.ndarray, widths: np.ndarray, plan: ResizePlan,
                 kernel) -> torch.Tensor:
    """uint8 images B x 3 x count: every image's box resized as ``plan`` says, antialiased with
    PIL's filter ``kernel`` (:data:`RESAMPLING`) in PIL's two passes: horizontal, rounded to uint8
    levels, then vertical, rounded (PIL's fixed-point sums round the same way, up to ties). That is
    the order of torchvision's uint8 kernel and of Pillow up to 12; Pillow 13 runs the vertical pass
    first for some shapes, which changes a level only where the first pass clips. ``pixels``: the images' H x W x 3 uint8 values in one buffer on the device, each from
    ``offsets`` (bytes) with ``widths`` pixels per row, followed by ``plan.pad_bytes`` bytes.

    Batched for any box sizes: each image's region (its rows, ``plan.padded`` pixels wide from the
    region's left edge) is gathered as rows of a sliding-window view of the buffer into one
    B x H x W x 3 tensor, and each pass is one batched matrix product with per-image weights that
    are 0 outside the image's own region, so whatever lies past it in the buffer contributes
    nothing. The op count does not depend on the batch size."""
    device = pixels.device
    boxes, region = plan.boxes, plan.region
    rows, cols = plan.padded
    # per image, in one host tensor (one copy): first byte of the region's top row, bytes per row,
    # region height, then per axis (vertical, horizontal) the box size, resized size, first output, region start
    per_image = np.column_stack([
        offsets + ((boxes[:, 0] + region[:, 0]) * widths + boxes[:, 1] + region[:, 1]) * 3, widths * 3,
        region[:, 2], boxes[:, 2], plan.resized[:, 0], plan.first[:, 0], region[:, 0],
        boxes[:, 3], plan.resized[:, 1], plan.first[:, 1], region[:, 1], plan.flip])
    values = torch.from_numpy(per_image).to(device, non_blocking=True).unbind(1)
    top_row, row_bytes, height, *vertical, source_w, resized_w, first_w, start_w, flip = (v[:, None] for v in values)
    row = torch.arange(rows, device=device, dtype=torch.float64).minimum(height - 1)  # B x rows
    x = pixels.unfold(0, 3 * cols, 1)[(top_row + row * row_bytes).long()]  # B x rows x 3*cols
    x = x.view(len(boxes), rows, cols, 3).permute(0, 3, 1, 2).float()  # B x 3 x rows x cols
    horizontal = _resampling_weights(source_w, resized_w, first_w, start_w, plan.count[1], cols, plan.support,
                                     kernel, device)
    horizontal = torch.where(flip[..., None] > 0, horizontal.flip(1), horizontal)  # B x width x cols
    x = (x @ horizontal.transpose(1, 2)[:, None]).add_(0.5).floor_().clamp_(0, 255)  # B x 3 x rows x width
    vertical = _resampling_weights(*vertical, plan.count[0], rows, plan.support, kernel, device)  # B x height x rows
    x = (vertical[:, None] @ x).add_(0.5).floor_().clamp_(0, 255)
    return x.to(torch.uint8)

def _column(mask: torch.Tensor, device) -> torch.Tensor:
    """A host boolean per sample -> a B x 1 x 1 x 1 mask on ``device``."""
    return mask.view(-1, 1, 1, 1).to(device, non_blocking=True)


def blend(image: torch.Tensor, other: torch.Tensor, ratio) -> torch.Tensor:
    """torchvision's ``_blend`` for float images, with ``ratio`` a number or one per sample (B x 1 x 1 x 1)."""
    return (image * ratio + other * (1 - ratio)).clamp_(0, 1)


def pil_blur_kernel(sigma: float, passes: int = 3) -> np.ndarray:
    """The 1-D kernel of PIL's ``GaussianBlur(radius=sigma)``: ``passes`` box blurs of the same
    extended box, whose radius ``l + a`` gives the passes the variance ``sigma²`` (integer taps
    ``1/(2(l+a)+1)``, the two outer taps the rest; Pillow src/libImaging/BoxBlur.c,
    ``_gaussian_blur_radius`` and ``ImagingHorizontalBoxBlur``). A sampled Gaussian would blur
    far less than PIL for sigma < 0.5."""
    variance = sigma * sigma / passes
    whole = math.floor((math.sqrt(12.0 * variance + 1.0) - 1.0) / 2.0)
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance) / (6 * (variance - (whole + 1) ** 2))
    inner = 1.0 / (2 * (whole + fraction) + 1)
    outer = (1 - (2 * whole + 1) * inner) / 2
    box = np.array([outer] + [inner] * (2 * whole + 1) + [outer])
    kernel = box
    for _ in range(passes - 1):
        kernel = np.convolve(kernel, box)
    return kernel


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """PIL's GaussianBlur with one radius per image (``sigma``, on the host), as one separable
    convolution per direction for the whole batch (grouped by image and channel): the kernel of
    :func:`pil_blur_kernel`, zero-padded to the length of ``max_sigma``'s (so an image's result does
    not depend on its batch); borders repeat the edge pixel, as PIL does. PIL rounds to uint8 after
    each of its passes, this does not."""
    radius = len(pil_blur_kernel(max_sigma)) // 2
    kernels = np.zeros((len(sigma), 2 * radius + 1))
    for row, value in zip(kernels, sigma.tolist()):
        kernel = pil_blur_kernel(value)
        row[radius - len(kernel) // 2:radius + len(kernel) // 2 + 1] = kernel
    batch, channels, height, width = x.shape
    kernel = torch.from_numpy(kernels).to(x.device, x.dtype, non_blocking=True).repeat_interleave(channels, 0)
    y = nnf.pad(x.reshape(1, batch * channels, height, width), (radius,) * 4, mode="replicate")
    y = nnf.conv2d(y, kernel[:, None, :, None], groups=batch * channels)
    y = nnf.conv2d(y, kernel[:, None, None, :], groups=batch * channels)
    return y.reshape(batch, channels, height, width)


def solarize(x: torch.Tensor, threshold: int) -> torch.Tensor:
    """torchvision's solarize of uint8 images: levels >= ``threshold`` are inverted. For timm's 3a
    threshold, 128, that is ``min(x, 255 - x)``: the same values in one pass without a mask (a
    masked ``torch.where`` is ~40x slower on the CPU)."""
    if threshold == 128:
        return torch.minimum(x, 255 - x)
    return F.solarize(x, threshold)


def color_jitter(x: torch.Tensor, ops: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter with per-image order and factors (``ops``/``factors``: B x 3, on the
    host), in place: in each slot an image's brightness, contrast or saturation blend, torchvision's
    ``adjust_*`` definitions (``_blend(image, other, factor)`` with ``other`` black, the mean grey
    level, the grey image), written as one weighted sum for the batch."""
    device = x.device
    for slot in range(ops.shape[1]):
        op = ops[:, slot]
        if (op < 0).all():
            continue
        ratio = torch.where(op < 0, 1.0, factors[:, slot]).to(x.dtype)
        weight_grey = _column((op == 2).to(x.dtype), device)
        weight_mean = _column((op == 1).to(x.dtype), device)
        grey = F.rgb_to_grayscale(x)
        mean = grey.mean(dim=(-3, -2, -1), keepdim=True)
        other = grey.mul_(weight_grey).add_(mean * weight_mean)
        x = torch.lerp(other, x, _column(ratio, device)).clamp_(0, 1)  # = x * ratio + other * (1 - ratio)
    return x
