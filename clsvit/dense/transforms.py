"""The linear dense protocols' image pipelines: each operation as its reference defines it, and the
four views built from them (training and evaluation, segmentation and depth) that the engine reads.

Images are HxWx3 ``uint8`` RGB arrays (float32 once photometric operations ran), masks HxW ``int64``
class ids (255 = ignore), depth maps HxW ``float32`` metres (0 = no measurement), until
:func:`to_tensors` turns them into the normalised tensors the backbone reads. Every random op takes a
``numpy.random.Generator``, so an augmented sample is a pure function of its seed (the same on any
number of processes or DataLoader workers). The references draw from numpy's global RNG; the
distributions and the order of the draws are theirs.

References (commits of the copies read): mmsegmentation ``mmseg/datasets/pipelines/transforms.py``
at 0066ce88 (DINOv2's segmentation configs run mmseg 0.x), facebookresearch/dinov3 at 6876159
(``dinov3/eval/segmentation/transforms.py``, ``dinov3/eval/depth/transforms.py``), and
zhyever/Monocular-Depth-Estimation-Toolbox at d8aff50 (``depth/datasets/pipelines/transforms.py``,
the depth codebase of DINOv2).
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from clsvit.dense.protocols import Settings

IGNORE_INDEX = 255


# ----------------------------------------------------------------------------- resizing


def mmseg_rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(h, w) after mmseg ``Resize(img_scale=scale, keep_ratio=True)`` (mmcv ``imrescale``): the largest
    size whose long side is at most max(scale) and short side at most min(scale), rounded half up."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(h, w) with the short side set to `short` and the aspect ratio kept (DINOv3 ``FixedSideResize``,
    dinov3/eval/segmentation/transforms.py:177-185)."""
    if height > width:
        return int(short * height / width + 0.5), short
    return short, int(short * width / height + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int], backend: str) -> np.ndarray:
    """Bilinear resize to (h, w): ``cv2`` = OpenCV INTER_LINEAR as mmcv's ``imresize`` (mmseg, DINOv2);
    ``pil`` = PIL bilinear with antialiasing as torchvision's ``Resize`` of a PIL image (DINOv3)."""
    height, width = size
    if backend == "cv2":
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_nearest(target: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a mask or depth map (both references use nearest for labels)."""
    height, width = size
    dtype = target.dtype
    if dtype == np.int64:  # OpenCV has no 64-bit integers; class ids fit in 32 bits
        target = target.astype(np.int32)
    return cv2.resize(target, (width, height), interpolation=cv2.INTER_NEAREST).astype(dtype)


# ----------------------------------------------------------------------------- segmentation ops


def random_crop_box(height: int, width: int, crop: tuple[int, int], rng: np.random.Generator):
    """(y1, y2, x1, x2) of a uniformly placed crop (mmseg ``RandomCrop.get_crop_bbox``); a side shorter
    than the crop is taken whole (padding comes later)."""
    offset_h = int(rng.integers(0, max(height - crop[0], 0) + 1))
    offset_w = int(rng.integers(0, max(width - crop[1], 0) + 1))
    return offset_h, offset_h + crop[0], offset_w, offset_w + crop[1]


def crop_with_cat_max_ratio(image, mask, crop, cat_max_ratio: float, rng: np.random.Generator):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``: redraw the crop up to 10 times until no single
    class covers ``cat_max_ratio`` or more of the crop's labelled pixels and at least two classes are
    present; after 10 failures the 11th draw is kept whatever it holds."""
    box = random_crop_box(*mask.shape, crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            labels, counts = np.unique(mask[y1:y2, x1:x2], return_counts=True)
            counts = counts[labels != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = random_crop_box(*mask.shape, crop, rng)
    y1, y2, x1, x2 = box
    return image[y1:y2, x1:x2], mask[y1:y2, x1:x2]


def _clip_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(values, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, flavour: str) -> np.ndarray:
    """``PhotoMetricDistortion``: brightness +U(-32, 32), contrast xU(0.5, 1.5) first or last (one coin),
    saturation xU(0.5, 1.5), hue shift; each applied with probability 1/2, on uint8 values.

    ``mmseg`` (DINOv2): saturation scales the S channel of OpenCV's 8-bit HSV and the hue moves by an
    integer in [-18, 18) of OpenCV's 180-step hue circle (mmseg ``PhotoMetricDistortion``, hue_delta=18,
    numpy's ``randint`` excluding the upper bound).
    ``dinov3``: saturation and hue are torchvision's ``adjust_saturation`` / ``adjust_hue`` with a hue
    factor U(-0.5, 0.5) of the full circle (dinov3/eval/segmentation/transforms.py:38-101).
    """
    image = np.ascontiguousarray(image)
    if rng.integers(2):
        image = _clip_uint8(image.astype(np.float32) + rng.uniform(-32, 32))
    contrast_last = rng.integers(2) == 0  # mmseg/dinov3: mode 1 = contrast first, mode 0 = contrast last

    def contrast(img):
        return _clip_uint8(img.astype(np.float32) * rng.uniform(0.5, 1.5)) if rng.integers(2) else img

    if not contrast_last:
        image = contrast(image)
    if rng.integers(2):
        factor = rng.uniform(0.5, 1.5)
        if flavour == "mmseg":
            hsv = cv2.cvtColor(image[..., ::-1], cv2.COLOR_BGR2HSV)  # mmcv.bgr2hsv on the BGR image
            hsv[..., 1] = _clip_uint8(hsv[..., 1].astype(np.float32) * factor)
            image = np.ascontiguousarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[..., ::-1])
        else:
            image = TF.adjust_saturation(torch.tensor(image).permute(2, 0, 1), factor).permute(1, 2, 0).numpy()
    if rng.integers(2):
        if flavour == "mmseg":
            hsv = cv2.cvtColor(image[..., ::-1], cv2.COLOR_BGR2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(int) + int(rng.integers(-18, 18))) % 180
            image = np.ascontiguousarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[..., ::-1])
        else:
            image = TF.adjust_hue(torch.tensor(image).permute(2, 0, 1), rng.uniform(-0.5, 0.5)).permute(1, 2, 0).numpy()
    if contrast_last:
        image = contrast(image)
    return image


def pad_to(array: np.ndarray, size: tuple[int, int], value) -> np.ndarray:
    """Pad at the bottom and right to at least (h, w) (mmseg ``Pad(size)``, DINOv3 ``PadTensor``)."""
    pad_h, pad_w = max(size[0] - array.shape[0], 0), max(size[1] - array.shape[1], 0)
    if not (pad_h or pad_w):
        return array
    widths = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (array.ndim - 2)
    return np.pad(array, widths, constant_values=value)


# ----------------------------------------------------------------------------- depth ops


NYU_TRAIN_BOX = (45, 472, 43, 608)  # rows, cols of the toolbox's and DINOv3's NYUCrop (480x640 images)
EIGEN_BOX = (45, 471, 41, 601)  # the Eigen evaluation crop of NYUv2 (toolbox nyu.py:217, dinov3 datasets_utils.py:27)
GARG_FRACTIONS = (0.40810811, 0.99189189, 0.03594771, 0.96405229)  # toolbox kitti.py:246-247


def scaled_box(box: tuple[int, int, int, int], height: int, width: int, ref=(480, 640)) -> tuple[int, int, int, int]:
    """A box given on a 480x640 NYU frame, on an image of another size (DINOv3's rescaling rule)."""
    y1, y2, x1, x2 = box
    return (int(y1 / ref[0] * height), int(y2 / ref[0] * height), int(x1 / ref[1] * width), int(x2 / ref[1] * width))


def kb_crop_box(height: int, width: int, crop=(352, 1216)) -> tuple[int, int, int, int]:
    """The KITTI benchmark crop: the bottom 352 rows, 1216 centred columns (toolbox ``KBCrop``)."""
    top, left = int(height - crop[0]), int((width - crop[1]) / 2)
    return top, top + crop[0], left, left + crop[1]


def eval_region(kind: str, height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of the evaluated region: ``eigen`` (NYUv2 rows 45:471, cols 41:601 of 480x640),
    ``garg`` (KITTI, fractions of the height and width) or ``full``."""
    region = np.zeros((height, width), dtype=bool)
    if kind == "eigen":
        y1, y2, x1, x2 = scaled_box(EIGEN_BOX, height, width)
    elif kind == "garg":
        a, b, c, d = GARG_FRACTIONS
        y1, y2, x1, x2 = int(a * height), int(b * height), int(c * width), int(d * width)
    else:
        y1, y2, x1, x2 = 0, height, 0, width
    region[y1:y2, x1:x2] = True
    return region


def random_rotate(image, depth, degrees: float, rng: np.random.Generator):
    """With probability 1/2, rotate about the centre by U(-degrees, degrees): bilinear image, nearest
    depth, zeros outside (toolbox ``RandomRotate(prob=0.5, degree=2.5)``, mmcv ``imrotate``). The angle
    is drawn whether or not the rotation happens, as the toolbox does."""
    rotate = rng.random() < 0.5
    angle = rng.uniform(-degrees, degrees)
    if not rotate:
        return image, depth
    height, width = depth.shape
    matrix = cv2.getRotationMatrix2D(((width - 1) * 0.5, (height - 1) * 0.5), -angle, 1.0)
    image = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)
    depth = cv2.warpAffine(depth, matrix, (width, height), flags=cv2.INTER_NEAREST, borderValue=0)
    return image, depth


def color_augmentation(image: np.ndarray, rng: np.random.Generator, brightness: tuple[float, float]) -> np.ndarray:
    """With probability 1/2: values (0-255) to the power U(0.9, 1.1), times a brightness U(brightness)
    and a colour U(0.9, 1.1) per channel, clipped to [0, 255] (toolbox ``ColorAug``: NYU brightness
    (0.75, 1.25), KITTI (0.9, 1.1)). Returns float32."""
    image = image.astype(np.float32)
    if rng.random() >= 0.5:
        return image
    image = image ** rng.uniform(0.9, 1.1)
    image = image * rng.uniform(*brightness)
    image = image * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.float32)


# ----------------------------------------------------------------------------- to tensors


def to_tensors(image: np.ndarray, mean, std, **targets: np.ndarray) -> dict[str, torch.Tensor]:
    """HxWx3 values in [0, 255] -> float [3, H, W] normalised with the backbone's `mean` / `std` (both
    references normalise with the backbone's ImageNet statistics); masks -> int64, depth -> float32."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    out = {"image": TF.normalize(tensor, list(mean), list(std))}
    for key, value in targets.items():
        value = np.ascontiguousarray(value)
        out[key] = torch.from_numpy(value.astype(np.int64) if key == "mask" else value.astype(np.float32))
    return out


# ----------------------------------------------------------------------------- the protocols' views


def seg_train_view(item: dict, settings: Settings, rng: np.random.Generator) -> dict:
    """Resize (scale x U(ratio_range), kept aspect ratio) -> crop (cat_max_ratio) -> flip -> photometric
    distortion -> normalise -> pad to the crop with 0 / 255 (mmseg and DINOv3 order)."""
    image, mask = item["image"], item["mask"]
    low, high = settings.ratio_range
    ratio = rng.random() * (high - low) + low
    height, width = mask.shape
    if settings.resize == "mmseg":
        size = mmseg_rescale_size(height, width, (int(settings.scale[0] * ratio), int(settings.scale[1] * ratio)))
    else:
        size = short_side_size(height, width, int(min(settings.scale) * ratio))
    image = resize_image(image, size, "cv2" if settings.resize == "mmseg" else "pil")
    mask = resize_nearest(mask, size)
    image, mask = crop_with_cat_max_ratio(image, mask, settings.crop_size, settings.cat_max_ratio, rng)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    image = photometric_distortion(image, rng, settings.distortion)
    out = to_tensors(image, settings.mean, settings.std, mask=mask)
    pad_h, pad_w = settings.crop_size[0] - mask.shape[0], settings.crop_size[1] - mask.shape[1]
    return {"image": F.pad(out["image"], (0, pad_w, 0, pad_h), value=0.0),
            "mask": F.pad(out["mask"], (0, pad_w, 0, pad_h), value=IGNORE_INDEX)}


def seg_test_size(height: int, width: int, settings: Settings, ratio: float = 1.0) -> tuple[int, int]:
    """(h, w) an image is tested at, scale x `ratio`: mmseg ``MultiScaleFlipAug`` rescales to
    (int(long x ratio), int(short x ratio)) keeping the aspect ratio; DINOv3 sets the short side to
    int(short x ratio), rounded up to a multiple of 32 below ratio 1 (dinov3/eval/segmentation/
    transforms.py:199-202)."""
    if settings.resize == "mmseg":
        return mmseg_rescale_size(height, width, (int(settings.scale[0] * ratio), int(settings.scale[1] * ratio)))
    short = int(min(settings.scale) * ratio)
    if ratio < 1:
        short = math.ceil(short / 32) * 32
    return short_side_size(height, width, short)


def seg_eval_view(item: dict, settings: Settings) -> dict:
    """The image resized as the protocol tests, once per test ratio (``images``), the mask untouched
    at its own size."""
    height, width = item["mask"].shape
    backend = "cv2" if settings.resize == "mmseg" else "pil"
    first, *rest = [resize_image(item["image"], seg_test_size(height, width, settings, ratio), backend)
                    for ratio in settings.test_ratios]
    out = to_tensors(first, settings.mean, settings.std, mask=item["mask"])
    images = [out["image"]] + [to_tensors(image, settings.mean, settings.std)["image"] for image in rest]
    return {"images": images, "mask": out["mask"], "name": item["name"]}


def benchmark_crop_box(settings: Settings, height: int, width: int, train: bool) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) every depth view starts from: NYU's training crop (training only), KITTI's
    benchmark crop (always), else the whole image."""
    if settings.crops == "nyu" and train:
        return scaled_box(NYU_TRAIN_BOX, height, width)
    if settings.crops == "kitti":
        return kb_crop_box(height, width)
    return 0, height, 0, width


def depth_train_view(item: dict, settings: Settings, rng: np.random.Generator) -> dict:
    """NYU / KITTI benchmark crop -> rotation (p 0.5, +-2.5 deg) -> flip -> random crop -> colour
    augmentation (p 0.5) -> normalise (toolbox nyu.py:7-16, kitti.py:7-16; DINOv3 transforms.py:306-355)."""
    image, depth = item["image"], item["depth"]
    y1, y2, x1, x2 = benchmark_crop_box(settings, *depth.shape, train=True)
    image, depth = image[y1:y2, x1:x2], depth[y1:y2, x1:x2]
    image, depth = random_rotate(np.ascontiguousarray(image), np.ascontiguousarray(depth), 2.5, rng)
    if rng.random() < 0.5:
        image, depth = image[:, ::-1], depth[:, ::-1]
    cy1, cy2, cx1, cx2 = random_crop_box(*depth.shape, settings.crop_size, rng)
    image, depth = image[cy1:cy2, cx1:cx2], depth[cy1:cy2, cx1:cx2]
    image = color_augmentation(image, rng, settings.brightness_range)
    return to_tensors(pad_to(image, settings.crop_size, 0), settings.mean, settings.std,
                      depth=pad_to(depth, settings.crop_size, 0))


def depth_eval_view(item: dict, settings: Settings) -> dict:
    """The whole image (KITTI: its benchmark crop) and its depth, with the evaluated region."""
    y1, y2, x1, x2 = benchmark_crop_box(settings, *item["depth"].shape, train=False)
    depth = item["depth"][y1:y2, x1:x2]
    region = eval_region({"nyu": "eigen", "kitti": "garg"}.get(settings.crops, "full"), *depth.shape)
    return {**to_tensors(item["image"][y1:y2, x1:x2], settings.mean, settings.std, depth=depth),
            "region": torch.from_numpy(region), "name": item["name"]}
