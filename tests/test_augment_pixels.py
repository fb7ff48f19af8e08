"""The device path's pixel ops (clsvit.data.augment) against independent references, each op on its
own: the resampling filters against their definitions, the resampling weights, the regions a
resize reads and the resized boxes against Pillow's own resize, blend and colour jitter against
torchvision and ImageEnhance, solarize against ImageOps, the blur kernel against the construction
of Pillow's GaussianBlur; and every op keeping its work on its input's device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from clsvit.data import augment as A
from clsvit.errors import InputError

PIL_FILTER = {InterpolationMode.BICUBIC: Image.Resampling.BICUBIC, InterpolationMode.BILINEAR: Image.Resampling.BILINEAR}
MODES = list(PIL_FILTER)

# One batch of resizes, per image and axis (box size, resized size, first kept output pixel), with
# COUNT (height, width) kept output pixels: a box slightly larger than the output, an upscale, a
# downscale, the whole output kept, and a centre crop (the eval geometry). The scales put no filter
# tap on a zero of the filter, so the pixels a resize reads are those with a non-zero weight.
VERTICAL = [(23, 17, 3), (13, 40, 9), (60, 21, 5), (37, 10, 0), (50, 36, 13)]
HORIZONTAL = [(41, 29, 4), (11, 33, 7), (74, 25, 3), (19, 12, 0), (64, 36, 12)]
COUNT = (10, 12)


def resize_plan(mode, boxes=None, flip=None) -> A.ResizePlan:
    boxes = [(0, 0, v[0], h[0]) for v, h in zip(VERTICAL, HORIZONTAL)] if boxes is None else boxes
    return A.ResizePlan(boxes, resized=[[v[1], h[1]] for v, h in zip(VERTICAL, HORIZONTAL)],
                        first=[[v[2], h[2]] for v, h in zip(VERTICAL, HORIZONTAL)], count=COUNT,
                        support=A.RESAMPLING[mode][0], flip=flip)


def pil_weights(source: int, resized: int, mode) -> np.ndarray:
    """Pillow's resampling weights of one axis, ``source x resized``: the resize of an identity
    image of float pixels (mode "F": no rounding) along that axis; column i is what output pixel i
    reads."""
    identity = Image.fromarray(np.eye(source, dtype=np.float32), "F")
    return np.asarray(identity.resize((resized, source), PIL_FILTER[mode]))


def pil_float_resize(image: np.ndarray, size, mode) -> np.ndarray:
    """Pillow's resize of each channel of ``image`` (H x W x C) in float pixels: its sums before rounding."""
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32), "F")
                                .resize(size, PIL_FILTER[mode])) for channel in np.moveaxis(image, -1, 0)], -1)


def pil_two_passes(crop: np.ndarray, height: int, width: int, mode) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's resize of a uint8 crop to ``height x width`` as its two passes, horizontal (rounded
    and clipped to uint8 levels), then vertical; and where the result is sure: Pillow sums with
    22-bit fixed-point weights, so an output whose sum lies within 2e-3 of a half level, or that
    reads such a sum from the first pass, may round either way."""
    horizontal = np.asarray(Image.fromarray(crop).resize((width, crop.shape[0]), PIL_FILTER[mode]))
    result = np.asarray(Image.fromarray(horizontal).resize((width, height), PIL_FILTER[mode]))
    near_tie = lambda sums: np.abs(sums - np.floor(sums) - 0.5) < 2e-3  # noqa: E731
    first_ties = near_tie(pil_float_resize(crop, (width, crop.shape[0]), mode))
    reads_tie = pil_float_resize(first_ties, (width, height), mode) != 0
    return result, ~near_tie(pil_float_resize(horizontal, (width, height), mode)) & ~reads_tie


def hard_edged(seed: int, height: int, width: int) -> np.ndarray:
    """Black and white 3 x 3 blocks (the bicubic filter overshoots past 0 and 255 at their edges,
    so both passes clip), with 30 % of the pixels random levels."""
    generator = np.random.default_rng(seed)
    blocks = generator.choice(np.array([0, 255], dtype=np.uint8), size=(height // 3 + 1, width // 3 + 1, 3))
    image = blocks.repeat(3, 0).repeat(3, 1)[:height, :width]
    noise = generator.integers(0, 256, image.shape, dtype=np.uint8)
    return np.where(generator.random((height, width, 1)) < 0.3, noise, image)


def flat_buffer(images: list[np.ndarray], pad_bytes: int):
    """The images one after another in one uint8 buffer, as CropBatch.flat_images gives them."""
    pixels = torch.from_numpy(np.concatenate([image.ravel() for image in images] + [np.zeros(pad_bytes, np.uint8)]))
    offsets = np.cumsum([0] + [image.size for image in images[:-1]])
    return pixels, offsets, np.array([image.shape[1] for image in images])


# ---------------------------------------------------------------- resampling

def test_resampling_filters_are_keys_cubic_and_the_triangle():
    """PIL's bicubic filter is Keys' cubic convolution with a = -0.5 (support 2), its bilinear filter
    the triangle (support 1): hand-computed values, 0 from the support on."""
    x = torch.tensor([0.0, 0.5, -0.5, 1.0, 1.5, -1.5, 2.0, 2.5, -2.5, 3.0])
    support, bicubic = A.RESAMPLING[InterpolationMode.BICUBIC]
    assert support == 2.0
    assert bicubic(x).tolist() == [1.0, 0.5625, 0.5625, 0.0, -0.0625, -0.0625, 0.0, 0.0, 0.0, 0.0]
    support, triangle = A.RESAMPLING[InterpolationMode.BILINEAR]
    assert support == 1.0
    assert triangle(x).tolist() == [1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("mode, name", [(InterpolationMode.NEAREST, "nearest"), (InterpolationMode.LANCZOS, "lanczos"),
                                        ("box", "box")])
def test_other_interpolations_stop_with_their_name(mode, name):
    """A filter the device path lacks stops in one line naming it and the key (an InterpolationMode
    by its value, a mode given by name as it is)."""
    with pytest.raises(InputError) as error:
        A._resampling_filter(mode)
    assert str(error.value) == (f"data.augment_on=device resizes with PIL's bilinear or bicubic filter, not {name} "
                                f"(aug.interpolation): set data.augment_on=cpu")


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.value)
def test_resize_plan_reads_exactly_the_pixels_pils_weights_reach(mode):
    """Each image's region (per axis: first pixel, and the count) is the span of box pixels with a
    non-zero Pillow weight for the kept output pixels — none more, none fewer — and the padded size
    is the largest region."""
    plan = resize_plan(mode)
    for index, axes in enumerate(zip(VERTICAL, HORIZONTAL)):
        for axis, (source, resized, first) in enumerate(axes):
            reached = np.flatnonzero(pil_weights(source, resized, mode)[:, first:first + COUNT[axis]].any(1))
            region = plan.region[index, axis], plan.region[index, axis + 2]
            assert region == (reached[0], reached[-1] + 1 - reached[0]), (index, axis)
    assert plan.padded == tuple(int(size) for size in plan.region[:, 2:].max(0))


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.value)
def test_resampling_weights_are_pils(mode):
    """The weights of every kept output pixel over an image's padded region (0 past the box) equal
    Pillow's resize weights (float32 against Pillow's double)."""
    plan = resize_plan(mode)
    support, kernel = A.RESAMPLING[mode]
    for axis, axes in enumerate((VERTICAL, HORIZONTAL)):
        column = lambda values: torch.tensor(values, dtype=torch.float64)[:, None]  # noqa: E731
        source, resized, first = (column([a[i] for a in axes]) for i in range(3))
        start, length = column(plan.region[:, axis]), plan.padded[axis]
        ours = A._resampling_weights(source, resized, first, start, COUNT[axis], length, support, kernel, "cpu")
        for index, (size, out, kept) in enumerate(axes):
            expected = np.zeros((COUNT[axis], length))
            low = int(plan.region[index, axis])
            high = min(low + length, size)
            expected[:, :high - low] = pil_weights(size, out, mode)[low:high, kept:kept + COUNT[axis]].T
            assert np.abs(ours[index].numpy() - expected).max() < 1e-6, (axis, index)


@pytest.mark.parametrize("mode", MODES, ids=lambda mode: mode.value)
def test_resized_boxes_are_pils_two_passes_level_for_level(mode):
    """resize_boxes of boxes inside larger images (upscaled, downscaled, centre-cropped, flipped or
    not) equals Pillow's two-pass resize of each cropped box to the level, clipping after each pass
    included, wherever Pillow's fixed-point sum is not within reach of a half level (and within one
    level there)."""
    images, boxes = [], []
    for index, (vertical, horizontal) in enumerate(zip(VERTICAL, HORIZONTAL)):
        top, left = index, 2 * index + 1
        images.append(hard_edged(index, top + vertical[0] + 3, left + horizontal[0] + 2))
        boxes.append((top, left, vertical[0], horizontal[0]))
    flip = np.arange(len(boxes)) % 2 == 1
    plan = resize_plan(mode, boxes, flip)
    ours = A.resize_boxes(*flat_buffer(images, plan.pad_bytes), plan, A.RESAMPLING[mode][1])
    assert ours.dtype == torch.uint8 and ours.shape == (len(boxes), 3, *COUNT)
    checked = 0
    for image, (top, left, height, width), vertical, horizontal, flipped, resized in zip(
            images, boxes, VERTICAL, HORIZONTAL, flip, ours.permute(0, 2, 3, 1).numpy()):
        expected, sure = pil_two_passes(image[top:top + height, left:left + width], vertical[1], horizontal[1], mode)
        kept = np.s_[vertical[2]:vertical[2] + COUNT[0], horizontal[2]:horizontal[2] + COUNT[1]]
        expected, sure = expected[kept], sure[kept]
        if flipped:
            expected, sure = expected[:, ::-1], sure[:, ::-1]
        difference = resized.astype(int) - expected
        assert (difference[sure] == 0).all() and np.abs(difference).max() <= 1
        checked += sure.sum()
    assert checked > 0.9 * ours.numel()


# ---------------------------------------------------------------- 3-Augment and colour jitter

def saturated(seed: int, size=(24, 20)) -> Image.Image:
    """Random levels: many pixels far from their grey level, so a blend past 1 leaves [0, 1]."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def as_float(images: list[Image.Image]) -> torch.Tensor:
    return F.to_dtype(torch.stack([torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1) for image in images]),
                      torch.float32, scale=True)


def test_blend_is_torchvisions_and_pils_colour_enhance():
    """blend(image, grey, factor) is torchvision's adjust_saturation and PIL's ImageEnhance.Color
    (timm's desaturate), for one factor and for one per image, inside [0, 1] and past it (the
    result clipped to [0, 1]); PIL truncates to uint8 levels."""
    images = [saturated(seed) for seed in range(4)]
    x = as_float(images)
    grey = F.rgb_to_grayscale(x)
    factors = [0.0, 0.4, 1.0, 1.6]
    for ratio in (*factors, torch.tensor(factors).view(-1, 1, 1, 1)):
        ours = A.blend(x, grey, ratio)
        per_image = factors if isinstance(ratio, torch.Tensor) else [ratio] * len(images)
        for image, pixels, result, factor in zip(images, x, ours, per_image):
            assert torch.allclose(result, TF.adjust_saturation(pixels, factor), atol=1e-6), factor
            pil = torch.from_numpy(np.asarray(ImageEnhance.Color(image).enhance(factor)).copy()).permute(2, 0, 1)
            assert (result * 255 - pil.float()).abs().max() <= 1.5, factor
    assert (x * 1.6 - grey * 0.6).min() < -0.2 and (x * 1.6 - grey * 0.6).max() > 1.2  # the clipping is exercised


def test_colour_jitter_applies_each_images_order_and_skips_empty_slots():
    """Per image, the ops in its slots in order (0 brightness, 1 contrast, 2 saturation; -1 none),
    each torchvision's adjust_* with that image's factor: an image with no op in a slot is left as
    it is there, and a slot no image uses does not end the jitter."""
    images = [saturated(seed, size=(16, 12)) for seed in range(3)]
    x = as_float(images)
    ops = torch.tensor([[-1, 1, 2], [-1, 0, -1], [-1, 2, 0]], dtype=torch.float64)
    factors = torch.tensor([[1.0, 0.7, 1.4], [1.0, 1.3, 1.0], [1.0, 0.5, 0.8]], dtype=torch.float64)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    ours = A.color_jitter(x.clone(), ops, factors)
    for pixels, result, image_ops, image_factors in zip(x, ours, ops.tolist(), factors.tolist()):
        expected = pixels
        for op, factor in zip(image_ops, image_factors):
            if op >= 0:
                expected = adjust[int(op)](expected, factor)
        assert torch.allclose(result, expected, atol=1e-6)
    assert not torch.allclose(ours[1], x[1], atol=1e-2)  # the brightness in slot 1 ran


def test_solarize_is_pils_for_every_threshold():
    """solarize inverts the levels >= threshold, as PIL's ImageOps.solarize, on all 256 levels, for
    timm's 3a threshold (128) and others."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([levels, levels.T, 255 - levels], -1))
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    for threshold in (0, 1, 64, 127, 128, 129, 200, 255):
        expected = torch.from_numpy(np.asarray(ImageOps.solarize(image, threshold)).copy()).permute(2, 0, 1)
        assert torch.equal(A.solarize(pixels[None], threshold)[0], expected), threshold


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.5, 0.8, 1.0, 1.2, 1.35, 1.4, 1.5, 1.6, 1.73, 1.8, 1.9, 2.0])
def test_blur_kernel_is_three_passes_of_an_extended_box(sigma):
    """PIL's GaussianBlur(sigma) is 3 passes of one box of 2l+1 equal taps plus an outer tap on each
    side holding a fraction of an inner one (Pillow BoxBlur.c: the box radius l + a, 0 <= a < 1),
    with variance sigma² in all: the kernel sums to 1, has that variance, and is that box convolved
    3 times."""
    kernel = A.pil_blur_kernel(sigma)
    offsets = np.arange(len(kernel)) - len(kernel) // 2
    assert kernel.sum() == pytest.approx(1.0) and (kernel * offsets ** 2).sum() == pytest.approx(sigma ** 2)
    box_length = (len(kernel) + 2) // 3  # 3 passes of a box of n taps: 3n - 2 taps
    assert len(kernel) == 3 * box_length - 2 and box_length % 2 == 1
    # the box from the kernel's first taps: kernel[0] = outer³, kernel[1] = 3 outer² inner
    outer = np.cbrt(kernel[0])
    inner = kernel[1] / (3 * outer ** 2)
    box = np.array([outer] + [inner] * (box_length - 2) + [outer])
    assert 0 < outer < inner
    assert np.allclose(np.convolve(np.convolve(box, box), box), kernel, atol=1e-12)


# ---------------------------------------------------------------- devices

class MixedDevices(TorchDispatchMode):
    """Records every op whose tensors are on more than one device (0-dim CPU scalars aside, and the
    copy between devices), which CUDA refuses and the meta device does not always."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices = {t.device for t in tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and (t.dim() > 0 or t.device.type != "cpu")}
        if len(devices) > 1 and func is not torch.ops.aten.copy_.default:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_ops_keep_their_work_on_the_inputs_device():
    """Every tensor the batched ops build is built on their input's device, whatever the default
    device: on a GPU the images are on the accelerator and the default device is the CPU. The meta
    device stands in for the other device: CPU inputs under a meta default give the CPU results,
    and meta inputs give meta results of the right shape, with no op mixing meta and CPU tensors."""
    mode = InterpolationMode.BICUBIC
    images = [hard_edged(index, v[0], h[0]) for index, (v, h) in enumerate(zip(VERTICAL, HORIZONTAL))]
    plan = resize_plan(mode, flip=np.arange(len(images)) % 2 == 0)
    pixels, offsets, widths = flat_buffer(images, plan.pad_bytes)
    x = as_float([saturated(seed, size=(12, 10)) for seed in range(2)])
    sigma = torch.tensor([0.4, 1.7], dtype=torch.float64)
    jitter = (torch.tensor([[0, 1, 2], [2, -1, -1]], dtype=torch.float64),
              torch.tensor([[0.6, 1.3, 0.4], [1.5, 1.0, 1.0]], dtype=torch.float64))
    ops = (lambda pixels, x: A.resize_boxes(pixels, offsets, widths, plan, A.RESAMPLING[mode][1]),
           lambda pixels, x: A.color_jitter(x.clone(), *jitter),
           lambda pixels, x: A.gaussian_blur(x, sigma, 2.0))
    for op in ops:
        expected = op(pixels, x)
        with torch.device("meta"):
            assert torch.equal(op(pixels, x), expected)
        with MixedDevices() as mixed:
            on_meta = op(pixels.to("meta"), x.to("meta"))
        assert mixed.ops == []
        assert on_meta.device.type == "meta" and on_meta.shape == expected.shape and on_meta.dtype == expected.dtype
