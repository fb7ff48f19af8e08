"""The named linear-probe protocols and the resolved settings of one evaluation.

A protocol fixes what a reference implementation fixes in code — which augmentation variant, the head,
the loss, the optimizer and the shape of the schedule — plus the hyper-parameters it publishes
(iterations, batch, lr, weight decay, warmup). The dataset geometry (scale, crop, stride, classes,
depth range, crops) stays in the recipe's ``eval.seg`` / ``eval.depth`` section: the same protocol runs
on ADE20k, VOC or Cityscapes. A recipe key left ``null`` takes the protocol's value; a number overrides
it (the offline shapes demo does). :func:`resolve` returns the settings actually used, which eval.py
writes into eval.json next to the result.

Where each value comes from (file:line at the commit of the copy read):

``seg`` / ``dinov2_linear`` — DINOv2's ``*_ade20k_linear_config.py`` run mmsegmentation 0.x; the
configs themselves are hosted at dl.fbaipublicfiles.com and not in the repository (dinov2 at b8931f7),
so what its repository shows is cited and the rest is marked *unconfirmed* (the values of the published
configs as they circulate, not verifiable here). The repository holds DINOv2's head class, BatchNorm +
1x1 conv and no dropout (``BNHead``, dinov2/eval/segmentation/models/decode_heads/linear_head.py:14-90),
and prints one configured head: the notebook's VOC "+ms" head (notebooks/semantic_segmentation.ipynb:
225-240 with :261-274: ``BNHead(input_transform=resize_concat)``, SyncBatchNorm(1536) and a 1536 -> 21
conv, i.e. the last four layers x 384 channels of ViT-S/14, no Dropout2d, conv init N(0, 0.01) and bias 0
(:202-210), ``CrossEntropyLoss(avg_non_ignore=False)`` (:200, 236)). That the linear ADE20k head is the
same BNHead on the last layer's tokens is read from these, not shown:
  head BatchNorm + 1x1 conv, no dropout, conv init N(0, 0.01), bias 0; patch tokens through the final norm
  (``get_intermediate_layers(norm=True)`` default, dinov2/models/vision_transformer.py:299-305, as the
  notebook calls it, ipynb:85-89); cross-entropy averaged over all pixels, ignored ones included; mmseg
  ``Resize(img_scale, ratio_range)`` keep-ratio rescaling with OpenCV bilinear, ``RandomCrop(cat_max_ratio)``,
  ``RandomFlip``, ``PhotoMetricDistortion``, ``Pad`` (mmseg mmseg/datasets/pipelines/transforms.py); the
  final head is the result; AdamW lr 1e-3, weight decay 1e-4, 40k iterations, batch 16 (2 x 8 GPUs),
  poly(1.0) schedule with 1500 linear warmup iterations from 1e-6 x lr: *unconfirmed*.
``seg`` / ``dinov3_linear`` — dinov3 at 6876159, dinov3/eval/segmentation/:
  configs/config-ade20k-linear-training.yaml:3-4 (batch 2 x 8 GPUs), :8-17 (40k iterations,
  WarmupOneCycleLR: 1500 warmup iterations from 1e-6, cosine to 0), :19-23 (AdamW lr 1e-3, betas
  0.9/0.999, weight decay 1e-3, no clipping), :31-37 (linear head on the last layer, backbone norm, BN,
  no [CLS]), :38-45 (short side 512 x U(0.5, 2), crop 512, flip 0.5); config.py:66 (dropout 0.1);
  models/heads/linear_head.py:29-33, 80-86 (Dropout2d -> BN -> conv, init N(0, 0.01)); transforms.py:
  137-205 (short-side resize, PIL bilinear), 257-309 (crop, cat_max_ratio 0.75), 21-101 (distortion,
  hue U(-0.5, 0.5)), 336-350 (pad 0 / 255), 391-440 (order); loss.py:247-276 (mean over all pixels);
  schedulers.py:29-147 (the schedule), train.py:140-141 (the scheduler skips its first step);
  inference.py:118-119 (an image smaller than the window in both sides: square windows of side min(h, w));
  the head evaluated every 5,000 steps (config-ade20k-linear-training.yaml:52; train.py:284-301) and the
  best of these evaluations reported (train.py:256, 299-301, 331; run.py:61-62). DINOv3's metric
  hard-codes ``reduce_zero_label=True`` (eval.py:66) and its one linear config is ADE20k's: on VOC and
  Cityscapes this protocol is clsvit's extension.
``depth`` / ``dinov2_linear`` — dinov2 at b8931f7, dinov2/hub/depthers.py:36-67 (256 uniform bins,
  linear normalisation, features upsampled x4, no BatchNorm, [CLS] concatenated: channels = 2 x C x
  layers), :110-128 (last layer, or layers {3,6,9,12} / {5,12,18,24} / {10,20,30,40}; intermediate
  tokens WITHOUT the final norm); dinov2/eval/depth/models/decode_heads/decode_head.py:155-184 (bins);
  .../depther/encoder_decoder.py:69-83 (prediction clamped to [min, max], resized bilinearly),
  :220-236 (flip TTA: mean of the predictions); .../losses/sigloss.py:42-59 (SigLoss over gt > 0).
  Training pipeline, evaluation and schedule: the Monocular-Depth-Estimation-Toolbox (d8aff50) that
  DINOv2's depth evaluation is built on — configs/_base_/datasets/nyu.py:6-42 and kitti.py:6-45
  (crops, rotation, flip, colour augmentation, flip TTA), configs/_base_/schedules/schedule_24x.py:1-12
  (AdamW lr 1e-4, betas 0.95/0.99, weight decay 0.01, one-cycle 25/100, clip 35). DINOv2's own depth
  configs (iterations, batch) are hosted, not in the repository: 38400 iterations x 16 is *unconfirmed*.
``depth`` / ``dinov3_linear`` — dinov3 at 6876159, dinov3/eval/depth/configs/config-nyu.yaml:1-46
  (batch 2 x 8, 38400 iterations, WarmupOneCycleLR 12800 warmup iterations, final_div 1000, momentum
  0.85-0.95; AdamW lr 3e-4, betas 0.9/0.99, weight decay 1e-4, clip 35; last layer with backbone norm,
  BN, no [CLS], 256 bins; crop 416x544, brightness 0.75-1.25; Eigen mask, flip TTA); loss.py:16-20,
  102-131 (SigLoss with 100 warm-up iterations of the mean term only); models/__init__.py:75-110 (bins);
  the final head is the result (train.py:124-151 validates without keeping a best, :253-282 returns the
  final depther). DINOv3 has no KITTI config (eval/depth/configs/ holds NYU's): on KITTI this protocol is
  clsvit's extension.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from clsvit.errors import InputError

SEG_PROTOCOLS = ("dinov2_linear", "dinov3_linear")
DEPTH_PROTOCOLS = ("dinov2_linear", "dinov3_linear")

# What each protocol publishes; a recipe key left null takes these values.
PUBLISHED = {
    ("seg", "dinov2_linear"): dict(iterations=40000, batch_size=16, lr=1e-3, weight_decay=1e-4, warmup_iters=1500),
    ("seg", "dinov3_linear"): dict(iterations=40000, batch_size=16, lr=1e-3, weight_decay=1e-3, warmup_iters=1500),
    ("depth", "dinov2_linear"): dict(iterations=38400, batch_size=16, lr=1e-4, weight_decay=1e-2, warmup_iters=None),
    ("depth", "dinov3_linear"): dict(iterations=38400, batch_size=16, lr=3e-4, weight_decay=1e-4, warmup_iters=12800),
}

# What each protocol fixes in code (not recipe keys).
FIXED = {
    ("seg", "dinov2_linear"): dict(resize="mmseg", distortion="mmseg", dropout=0.0, final_norm=True, cls_token=False,
                                   batchnorm=True, upsample=1, betas=(0.9, 0.999), grad_clip=None, schedule="poly",
                                   warmup_ratio=1e-6, final_div=math.inf, cycle_beta1=False, schedule_offset=0,
                                   sigloss_warmup=0, normal_init=True, square_small_windows=False, eval_interval=0),
    ("seg", "dinov3_linear"): dict(resize="short_side", distortion="dinov3", dropout=0.1, final_norm=True,
                                   cls_token=False, batchnorm=True, upsample=1, betas=(0.9, 0.999), grad_clip=None,
                                   schedule="warmup_one_cycle", warmup_ratio=1e-6, final_div=math.inf,
                                   cycle_beta1=False, schedule_offset=1, sigloss_warmup=0, normal_init=True,
                                   square_small_windows=True, eval_interval=5000),
    ("depth", "dinov2_linear"): dict(resize="none", distortion="none", dropout=0.0, final_norm=False, cls_token=True,
                                     batchnorm=False, upsample=4, betas=(0.95, 0.99), grad_clip=35.0,
                                     schedule="one_cycle", warmup_ratio=1 / 25, final_div=100.0, cycle_beta1=False,
                                     schedule_offset=0, sigloss_warmup=0, normal_init=False, eval_interval=0),
    ("depth", "dinov3_linear"): dict(resize="none", distortion="none", dropout=0.0, final_norm=True, cls_token=False,
                                     batchnorm=True, upsample=1, betas=(0.9, 0.99), grad_clip=35.0,
                                     schedule="warmup_one_cycle", warmup_ratio=0.0, final_div=1000.0,
                                     cycle_beta1=True, schedule_offset=0, sigloss_warmup=100, normal_init=True,
                                     eval_interval=0),
}

# DINOv2's four depth layers (dinov2/hub/depthers.py:110-116), by model depth; other depths: even spacing.
DINOV2_FOUR_LAYERS = {12: [2, 5, 8, 11], 24: [4, 11, 17, 23], 40: [9, 19, 29, 39]}


@dataclass(frozen=True)
class Settings:
    """Everything one dense evaluation runs with (recorded in eval.json as ``<task>.settings``)."""

    task: str  # seg | depth
    protocol: str
    # recipe keys (eval.seg / eval.depth; see recipes/default.yaml)
    crop_size: tuple  # [h, w] training crop (seg: also the slide window)
    layers: int
    iterations: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_iters: int
    flip_test: bool
    max_val_images: int
    max_train_images: int
    cache_features: bool
    num_workers: int
    eval_batch_size: int
    scale: tuple = (0, 0)  # seg: img_scale [long, short]
    ratio_range: tuple = (1.0, 1.0)  # seg: training rescale ratio range
    slide_stride: tuple = (0, 0)  # seg: [h, w]
    cat_max_ratio: float = 1.0  # seg
    test_ratios: tuple = (1.0,)  # seg: test scales as ratios of `scale`
    num_classes: int = 0  # seg
    crops: str = "none"  # depth: nyu | kitti | none
    min_depth: float = 1e-3  # depth
    max_depth: float = 10.0  # depth
    n_bins: int = 256  # depth
    bin_spacing: str = "linear"  # depth
    brightness_range: tuple = (0.9, 1.1)  # depth
    mean: tuple = IMAGENET_DEFAULT_MEAN  # data.mean / data.std: the backbone's input normalisation
    std: tuple = IMAGENET_DEFAULT_STD
    # protocol constants (FIXED)
    resize: str = "none"
    distortion: str = "none"
    dropout: float = 0.0
    final_norm: bool = True
    cls_token: bool = False
    batchnorm: bool = True
    upsample: int = 1
    betas: tuple = (0.9, 0.999)
    grad_clip: float | None = None
    schedule: str = "poly"
    warmup_ratio: float = 0.0
    final_div: float = math.inf
    cycle_beta1: bool = False
    schedule_offset: int = 0
    sigloss_warmup: int = 0
    normal_init: bool = True
    square_small_windows: bool = False  # seg: an image smaller than the window in both sides is slid over
    #   with square windows of side min(h, w) (DINOv3), not taken as one window (mmseg)
    eval_interval: int = 0  # head steps between the periodic evaluations whose best is the protocol's
    #   result (DINOv3 segmentation); 0 = the final head's evaluation is the result

    def as_dict(self) -> dict:
        """JSON-ready (infinity as a string, tuples as lists)."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, tuple):
                value = list(value)
            if isinstance(value, float) and math.isinf(value):
                value = "inf"
            out[key] = value
        return out


def resolve(section: dict, task: str, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> Settings:
    """The settings of ``eval.<task>``: recipe values, the protocol's published values where the recipe
    says null, and the protocol's fixed choices; images normalised with `mean` / `std` (the recipe's
    data.mean / data.std: the backbone's own). One-line errors name the key."""
    name = f"eval.{task}"
    protocol = section["protocol"]
    protocols = SEG_PROTOCOLS if task == "seg" else DEPTH_PROTOCOLS
    if protocol not in protocols:
        raise InputError(f"{name}.protocol must be one of {' | '.join(protocols)}, got {protocol!r}")
    published = PUBLISHED[(task, protocol)]
    own = {f.name for f in fields(Settings)} - {"task", "protocol", "mean", "std"} - set(FIXED[(task, protocol)])
    values = {key: section[key] for key in own if key in section}
    for key, default in published.items():
        if values.get(key) is None:
            values[key] = default
    if values["warmup_iters"] is None:  # one-cycle: the rise takes 30 % of the run (mmcv / torch default)
        values["warmup_iters"] = round(0.3 * values["iterations"])
    for key in ("crop_size", "scale", "ratio_range", "slide_stride", "brightness_range", "test_ratios"):
        if key in values:
            values[key] = tuple(values[key])
    settings = Settings(task=task, protocol=protocol, mean=tuple(mean), std=tuple(std), **values,
                        **FIXED[(task, protocol)])
    _check(settings, name)
    return settings


def _check(settings: Settings, name: str) -> None:
    positive = ["layers", "iterations", "batch_size", "eval_batch_size"]
    positive += ["num_classes"] if settings.task == "seg" else ["n_bins"]
    for key in positive:
        if getattr(settings, key) < 1:
            raise InputError(f"{name}.{key} must be >= 1, got {getattr(settings, key)}")
    pairs = ["crop_size"] + (["scale", "slide_stride"] if settings.task == "seg" else [])
    for key in pairs:
        if min(getattr(settings, key)) < 1:
            raise InputError(f"{name}.{key} must be two sizes >= 1, got {list(getattr(settings, key))}")
    if settings.warmup_iters < 0:
        raise InputError(f"{name}.warmup_iters must be >= 0, got {settings.warmup_iters}")
    if settings.task == "seg" and min(settings.test_ratios) <= 0:
        raise InputError(f"{name}.test_ratios must be ratios > 0, got {list(settings.test_ratios)}")
    if settings.task == "seg" and not 0 < settings.ratio_range[0] <= settings.ratio_range[1]:
        raise InputError(f"{name}.ratio_range must be [low, high] with 0 < low <= high, got {list(settings.ratio_range)}")
    if settings.task == "depth" and not 0 < settings.min_depth < settings.max_depth:
        raise InputError(f"{name}: need 0 < min_depth < max_depth, got {settings.min_depth} and {settings.max_depth}")
