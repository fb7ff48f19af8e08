"""Tests of clsvit.dense: the linear segmentation / depth protocols, on real photos and elevation maps
that matplotlib ships (at their own, non-square sizes) and on hand-computed values.

Several processes are covered end to end by tests/test_eval.py::test_two_processes_give_the_single_process_numbers.
"""

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import matplotlib
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from datasets import Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from torch import nn

from clsvit.config import ConfigError, load_config
from clsvit.dense import DenseDataset, engine, resolve
from clsvit.dense import transforms as T
from clsvit.dense.heads import LinearDepthHead, depth_bin_centres, lr_at, segmentation_loss, sig_loss
from clsvit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]

SAMPLE_DATA = Path(matplotlib.get_data_path()) / "sample_data"
MEAN, STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def grace_hopper() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE_DATA / "grace_hopper.jpg").convert("RGB"))  # 600 x 512 (h x w)


def luminance_mask(image: np.ndarray, num_classes: int) -> np.ndarray:
    """Class = luminance quantile of the photo, with a 255 border band (VOC style)."""
    gray = image.mean(2)
    mask = np.digitize(gray, np.quantile(gray, np.linspace(0, 1, num_classes + 1)[1:-1])).astype(np.int64)
    mask[:3], mask[:, -3:] = 255, 255
    return mask


def seg_settings(**overrides):
    section = dict(load_config(ROOT / "recipes" / "default.yaml")["eval"]["seg"], num_classes=4)
    section.update(overrides)
    return resolve(section, "seg")


def depth_settings(**overrides):
    section = dict(load_config(ROOT / "recipes" / "default.yaml")["eval"]["depth"])
    section.update(overrides)
    return resolve(section, "depth")


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                             num_heads=2, num_classes=10)


class ColourBackbone(nn.Module):
    """A stand-in frozen backbone (patch p) whose features are the one-hot of the dominant RGB channel at
    each patch centre, after undoing the normalisation: perfect features for colour-coded classes,
    unchanged by brightness, contrast, saturation and mmseg's small hue shifts."""

    def __init__(self, patch: int):
        super().__init__()
        self.patch_embed = SimpleNamespace(patch_size=(patch, patch))
        self.blocks = [None]

    def forward_intermediates(self, x, indices, norm, output_fmt, intermediates_only, return_prefix_tokens):
        p = self.patch_embed.patch_size[0]
        rgb = x * STD.to(x) + MEAN.to(x)
        level = rgb[:, :, p // 2 :: p, p // 2 :: p].argmax(1)
        maps = [F.one_hot(level, 3).permute(0, 3, 1, 2).float()]
        return [(m, torch.zeros(m.shape[0], 1, 3)) for m in maps] if return_prefix_tokens else maps


# ----------------------------------------------------------------------------- resizing, windows


def test_resize_rules_by_hand():
    # mmseg keep-ratio rescale: factor = min(long_max / long, short_max / short), rounded half up
    assert T.mmseg_rescale_size(600, 512, (2048, 512)) == (600, 512)
    assert T.mmseg_rescale_size(375, 500, (1024, 256)) == (256, 341)  # 500 * 256/375 = 341.33
    assert T.mmseg_rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side binds: factor 2.048
    assert T.short_side_size(375, 500, 256) == (256, 341) and T.short_side_size(600, 512, 512) == (600, 512)


@pytest.mark.parametrize("size,crop,stride,expected", [
    ((512, 683), (512, 512), (341, 341), [(0, 512, 0, 512), (0, 512, 171, 683)]),
    ((1024, 2048), (512, 1024), (341, 683), [(y, y + 512, x, x + 1024) for y in (0, 341, 512) for x in (0, 683, 1024)]),
    ((300, 400), (512, 512), (341, 341), [(0, 300, 0, 400)]),  # smaller than the window: one smaller window
    ((600, 512), (512, 512), (341, 341), [(0, 512, 0, 512), (88, 600, 0, 512)]),
])
def test_slide_windows_match_a_hand_count(size, crop, stride, expected):
    assert engine.slide_windows(*size, crop, stride) == expected


@pytest.mark.parametrize("size,expected", [
    # smaller than the 512 window in both sides: square windows of side min(h, w) = 300, stride 341
    # (dinov3/eval/segmentation/inference.py:118-119, then its grid of :121-132): cols (400-300+340)//341+1 = 2
    ((300, 400), [(0, 300, 0, 300), (0, 300, 100, 400)]),
    ((400, 300), [(0, 300, 0, 300), (100, 400, 0, 300)]),
    ((200, 200), [(0, 200, 0, 200)]),
    ((300, 1000), [(0, 300, 0, 512), (0, 300, 341, 853), (0, 300, 488, 1000)]),  # one side longer: mmseg's windows
])
def test_dinov3_slides_square_windows_over_images_smaller_than_the_crop(size, expected):
    assert engine.slide_windows(*size, (512, 512), (341, 341), square_small=True) == expected
    image = torch.arange(3 * size[0] * size[1], dtype=torch.float64).reshape(1, 3, *size)
    shapes = []

    def identity(crops):
        shapes.append(tuple(crops.shape))
        return crops

    torch.testing.assert_close(engine.slide_logits(identity, image, (512, 512), (341, 341), square_small=True), image)
    assert shapes == [(len(expected), 3, expected[0][1] - expected[0][0], expected[0][3] - expected[0][2])]
    assert seg_settings(protocol="dinov3_linear").square_small_windows
    assert not seg_settings(protocol="dinov2_linear").square_small_windows  # mmseg: one smaller window


def test_slide_logits_reassemble_a_real_photo():
    image = torch.from_numpy(grace_hopper()[:200, :150].copy()).permute(2, 0, 1)[None].float()
    calls = []

    def identity(crops):
        calls.append(crops.shape[0])
        return crops

    torch.testing.assert_close(engine.slide_logits(identity, image, (64, 64), (40, 40)), image)
    assert calls == [5 * 4]  # rows ceil((200-64)/40)+1 = 5, cols ceil((150-64)/40)+1 = 4, one batched call


# ----------------------------------------------------------------------------- training pipeline ops


def test_crop_keeps_the_first_draw_under_cat_max_ratio():
    mask = np.zeros((60, 80), np.int64)
    mask[:, 70:] = 1  # class 1 only in a narrow strip: most 40x40 crops are all class 0
    mask[:5] = 255
    for seed in range(30):
        replay = np.random.default_rng(seed)
        boxes = [T.random_crop_box(60, 80, (40, 40), replay) for _ in range(11)]

        def accepted(box):
            labels, counts = np.unique(mask[box[0]:box[1], box[2]:box[3]], return_counts=True)
            counts = counts[labels != 255]  # ignore pixels never count
            return len(counts) > 1 and counts.max() / counts.sum() < 0.75

        expected = next((b for b in boxes[:10] if accepted(b)), boxes[10])
        image = np.arange(60 * 80)[:, None].repeat(3, 1).reshape(60, 80, 3)
        crop_image, crop_mask = T.crop_with_cat_max_ratio(image, mask, (40, 40), 0.75, np.random.default_rng(seed))
        y1, y2, x1, x2 = expected
        assert np.array_equal(crop_mask, mask[y1:y2, x1:x2]) and np.array_equal(crop_image, image[y1:y2, x1:x2])


class Scripted:
    """A generator that returns scripted draws, to follow the distortion step by step."""

    def __init__(self, *values):
        self.values = list(values)

    def integers(self, *args, **kwargs):
        return self.values.pop(0)

    uniform = integers


def test_photometric_distortion_follows_mmseg():
    image = grace_hopper()[::8, ::8].copy()
    # brightness on (+20), mode 1 = contrast first (on, x0.5), saturation off, hue on (+7 steps of 180)
    out = T.photometric_distortion(image, Scripted(1, 20.0, 1, 1, 0.5, 0, 1, 7), "mmseg")
    step = np.clip(np.clip(image.astype(np.float32) + 20, 0, 255).astype(np.uint8) * np.float32(0.5), 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(np.ascontiguousarray(step[..., ::-1]), cv2.COLOR_BGR2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + 7) % 180
    assert np.array_equal(out, cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[..., ::-1])
    # all off except mode 0 contrast last (on, x1.5): only a clipped contrast change
    out = T.photometric_distortion(image, Scripted(0, 0, 0, 0, 1, 1.5), "mmseg")
    assert np.array_equal(out, np.clip(image * np.float32(1.5), 0, 255).astype(np.uint8))


def test_photometric_distortion_ranges_over_seeds():
    image = grace_hopper()[::16, ::16].copy()
    for seed in range(40):
        for flavour in ("mmseg", "dinov3"):
            out = T.photometric_distortion(image, np.random.default_rng(seed), flavour)
            assert out.dtype == np.uint8 and out.shape == image.shape
    gray = np.full((8, 8, 3), 100, np.uint8)  # no saturation, no hue: only brightness and contrast act
    for seed in range(40):
        out = T.photometric_distortion(gray, np.random.default_rng(seed), "mmseg").astype(int)
        assert (out == out[0, 0, 0]).all() and 100 * 0.5 - 32 - 1 <= out[0, 0, 0] <= (100 + 32) * 1.5 + 1


@pytest.mark.parametrize("protocol", ["dinov2_linear", "dinov3_linear"])
def test_seg_train_view_scales_within_the_ratio_range_and_pads_with_ignore(protocol):
    image = grace_hopper()
    mask = luminance_mask(image, 4)
    s = seg_settings(protocol=protocol, scale=[200, 100], crop_size=[160, 160], ratio_range=[0.5, 2.0])
    for seed in range(12):
        view = T.seg_train_view({"image": image, "mask": mask}, s, np.random.default_rng(seed))
        assert view["image"].shape == (3, 160, 160) and view["mask"].shape == (160, 160)
        labelled = view["mask"] != 255
        rows, cols = labelled.any(1).nonzero(), labelled.any(0).nonzero()
        # a rescaled 600x512 photo is at least 0.5 x 100 px wide (short side): smaller crops are padded
        padded_rows = (~(view["mask"] != 255).any(1)).nonzero().flatten()
        if len(padded_rows) and padded_rows.min() > 10:  # bottom padding (beyond the 255 border rows)
            assert view["image"][:, padded_rows.min():].abs().sum() == 0
        assert len(rows) and len(cols)


def test_seg_train_view_small_image_padding_by_hand():
    image, mask = grace_hopper()[:40, :30].copy(), np.full((40, 30), 2, np.int64)
    s = seg_settings(scale=[40, 30], ratio_range=[1.0, 1.0], crop_size=[64, 64])
    view = T.seg_train_view({"image": image, "mask": mask}, s, np.random.default_rng(0))
    assert (view["mask"][:40, :30] == 2).all() and (view["mask"][40:] == 255).all() and (view["mask"][:, 30:] == 255).all()
    assert view["image"][:, 40:].abs().sum() == 0 and view["image"][:, :, 30:].abs().sum() == 0


# ----------------------------------------------------------------------------- segmentation evaluation


def seg_dataset(items):
    return [{"image": im, "mask": m, "name": f"row {i}"} for i, (im, m) in enumerate(items)]


class OneHotMaskHead(nn.Module):
    """Logits = the one-hot of the dominant-colour class, upsampled to the requested size (nearest)."""

    def forward(self, features, size):
        return F.interpolate(features * 10, size=size, mode="nearest")


def colour_coded(mask: np.ndarray) -> np.ndarray:
    return (np.eye(3, dtype=np.uint8)[np.where(mask == 255, 0, mask)] * 255)


def test_one_hot_head_scores_miou_one_at_the_labels_own_size_and_counts_labelled_pixels():
    photo_mask = luminance_mask(grace_hopper(), 3)  # 600 x 512
    masks = [photo_mask, photo_mask.T.copy(), photo_mask[:512, :512]]  # 600x512, 512x600, 512x512
    items = seg_dataset([(colour_coded(m), m) for m in masks])
    s = seg_settings(num_classes=3, scale=[4096, 512], crop_size=[96, 128], slide_stride=[64, 100])
    result = engine.evaluate_segmentation(ColourBackbone(1), OneHotMaskHead(), items, s)
    assert result["miou"] == pytest.approx(1.0)
    assert result["pixels"] == sum(int((m != 255).sum()) for m in masks) and result["images"] == 3


def test_predictions_are_compared_at_the_original_label_size():
    mask = luminance_mask(grace_hopper(), 3)
    items = seg_dataset([(colour_coded(mask), mask)])
    s = seg_settings(num_classes=3, scale=[1024, 200], crop_size=[96, 96], slide_stride=[64, 64])  # test at 234x200
    probs = engine.seg_probabilities(ColourBackbone(1), OneHotMaskHead(), T.seg_eval_view(items[0], s)["images"][0][None],
                                     mask.shape, s)
    assert probs.shape == (1, 3, 600, 512)
    result = engine.evaluate_segmentation(ColourBackbone(1), OneHotMaskHead(), items, s)
    assert result["pixels"] == int((mask != 255).sum()) and 0.6 < result["miou"] < 1.0  # resampled borders


def test_multi_scale_test_sizes_by_hand_and_mean_of_the_scales():
    s2 = seg_settings(protocol="dinov2_linear", scale=[2048, 512], test_ratios=[0.5, 1.5])
    assert [T.seg_test_size(600, 512, s2, r) for r in (0.5, 1.0, 1.5)] == [(300, 256), (600, 512), (900, 768)]
    s3 = seg_settings(protocol="dinov3_linear", scale=[2048, 512])
    assert T.seg_test_size(600, 512, s3, 0.7) == (450, 384)  # short side int(358.4) -> 384 (multiple of 32)
    assert T.seg_test_size(600, 512, s3, 1.25) == (750, 640)
    mask = luminance_mask(grace_hopper()[::4, ::4], 3)  # 150 x 128
    items = seg_dataset([(colour_coded(mask), mask)])
    ratios = [0.5, 1.0, 1.5]
    s = seg_settings(num_classes=3, scale=[1024, 128], crop_size=[64, 64], slide_stride=[48, 48], test_ratios=ratios,
                     flip_test=True)
    view = T.seg_eval_view(items[0], s)
    assert [tuple(image.shape[-2:]) for image in view["images"]] == [(75, 64), (150, 128), (225, 192)]
    singles = [engine.seg_probabilities(ColourBackbone(1), OneHotMaskHead(), image[None], mask.shape, s)
               for image in view["images"]]
    torch.testing.assert_close(engine.seg_probabilities(ColourBackbone(1), OneHotMaskHead(),
                                                        [image[None] for image in view["images"]], mask.shape, s),
                               sum(singles) / 3)
    result = engine.evaluate_segmentation(ColourBackbone(1), OneHotMaskHead(), items, s)
    assert result["pixels"] == int((mask != 255).sum()) and result["miou"] > 0.9


def test_miou_accumulates_over_the_split_ignores_255_and_skips_absent_classes():
    # Two 2x2 images, predictions coded by colour; over the split: class 0 I=2 U=4, class 1 I=2 U=3, class 2
    # target only -> 0; a class predicted only on ignored pixels is excluded. (Per image: 5/12.)
    preds = [[0, 1, 1, 1], [2, 0, 2, 0]]
    targets = [[0, 0, 1, 1], [255, 2, 255, 0]]
    items = seg_dataset([(colour_coded(np.array(p).reshape(2, 2)), np.array(t).reshape(2, 2)) for p, t in zip(preds, targets)])
    items[1]["image"][1, 0] = [0, 0, 255]  # pixel 3 (target 2) predicted as class 2
    items[1]["image"][0, 1] = [255, 0, 0]  # pixel 1 (target 2) predicted as class 0
    s = seg_settings(num_classes=4, scale=[2, 2], crop_size=[2, 2], slide_stride=[2, 2])
    result = engine.evaluate_segmentation(ColourBackbone(1), OneHotMaskHead(), items, s)
    # class 0: I = px0 + px7 = 2, U = {0, 1, 5, 7} = 4; class 1: I=2, U=3; class 2: I = px6 = 1, U = {4?, 5, 6} ...
    confusion = np.zeros((4, 4))
    for (p, t) in [([0, 1, 1, 1], [0, 0, 1, 1]), ([2, 0, 2, 0], [255, 2, 255, 0])]:
        for pi, ti in zip(p, t):
            if ti != 255:
                confusion[ti, pi] += 1
    iou = [confusion[k, k] / (confusion[k].sum() + confusion[:, k].sum() - confusion[k, k])
           for k in range(4) if confusion[k].sum() + confusion[:, k].sum() > 0]
    assert result["miou"] == pytest.approx(np.mean(iou)) and result["pixels"] == 6


def test_perfect_features_train_to_miou_one():
    g = np.random.default_rng(0)
    items = []
    for _ in range(24):
        grid = g.integers(0, 3, (8, 8))
        mask = F.interpolate(F.one_hot(torch.from_numpy(grid), 3).permute(2, 0, 1)[None].double(), size=(32, 32),
                             mode="bilinear", align_corners=False)[0].argmax(0).numpy()
        items.append((colour_coded(grid.repeat(4, 0).repeat(4, 1)), mask))
    s = seg_settings(num_classes=3, scale=[32, 32], ratio_range=[1.0, 1.0], crop_size=[32, 32], slide_stride=[32, 32],
                     iterations=150, batch_size=8, lr=0.1, weight_decay=0.0, warmup_iters=10, max_train_images=16)
    backbone = ColourBackbone(4)
    head = engine.train_head(backbone, engine.LinearSegHead(3, 3, s), seg_dataset(items[:16]), s)
    assert engine.evaluate_segmentation(backbone, head, seg_dataset(items[16:]), s)["miou"] > 0.99


def test_dinov3_reports_the_best_of_its_periodic_evaluations():
    """DINOv3's segmentation evaluates the head every eval_interval steps and at the end and reports the
    best (config-ade20k-linear-training.yaml:52: every 5,000 steps). The evaluations leave the training
    alone: the final head and its mIoU are those of the same run without them (dropout draws included)."""
    photo = grace_hopper()
    items = [(photo[y : y + 40, x : x + 48].copy(), luminance_mask(photo[y : y + 40, x : x + 48], 4))
             for y in (0, 150, 300, 450) for x in (0, 200, 400)]
    s = seg_settings(protocol="dinov3_linear", scale=[40, 40], ratio_range=[1.0, 1.0], crop_size=[32, 32],
                     slide_stride=[24, 24], iterations=10, batch_size=4, lr=0.05, warmup_iters=2, max_train_images=8)
    assert s.eval_interval == 5000 and seg_settings(protocol="dinov2_linear").eval_interval == 0
    every_4 = dataclasses.replace(s, eval_interval=4)
    train, val = seg_dataset(items[:8]), seg_dataset(items[8:])
    result = engine.run_probe(tiny_vit(), train, val, every_4, seed=0)
    assert [e["step"] for e in result["evaluations"]] == [4, 8, 10]  # 4, 8 and the final head
    assert result["miou"] == result["evaluations"][-1]["miou"]
    scores = [e["miou"] for e in result["evaluations"]]
    assert len(set(scores)) > 1, "the test needs evaluations that differ"
    assert result["best"] is result["evaluations"][scores.index(max(scores))]
    alone = engine.run_probe(tiny_vit(), train, val, dataclasses.replace(s, eval_interval=0), seed=0)
    assert "best" not in alone and [e["step"] for e in alone["evaluations"]] == [10]
    assert alone["miou"] == result["miou"]
    for name, tensor in alone["head"].state_dict().items():
        torch.testing.assert_close(tensor, result["head"].state_dict()[name], rtol=0, atol=0, msg=name)


class CountingBackbone(nn.Module):
    """A frozen timm ViT that counts its forward passes."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.patch_embed, self.blocks, self.calls = backbone, backbone.patch_embed, backbone.blocks, 0

    def forward_intermediates(self, *args, **kwargs):
        self.calls += 1
        return self.backbone.forward_intermediates(*args, **kwargs)


def test_batched_evaluation_equals_image_by_image():
    photo = grace_hopper()
    tall, wide = photo[:200, :150], photo[:150, :200]  # at scale [128, 64]: 85x64 (3x2 windows), 64x85 (2x3)
    items = seg_dataset([(tile.copy(), luminance_mask(tile, 4)) for tile in (tall, photo[300:500, 200:350], wide, tall)])
    backbone = CountingBackbone(engine.frozen_backbone(tiny_vit()))
    results = {}
    for budget, forwards in ((1, 4), (12, 4), (24, 3), (64, 3)):  # 12 crops per image (6 windows x flip)
        s = seg_settings(scale=[128, 64], crop_size=[48, 48], slide_stride=[32, 32], flip_test=True, eval_batch_size=budget)
        head = engine.build_head(backbone, s, seed=0).eval()
        backbone.calls = 0
        results[budget] = engine.evaluate_segmentation(backbone, head, items, s)
        assert backbone.calls == forwards, budget  # consecutive images of one size share a forward
    assert results[1]["pixels"] == sum(int((m["mask"] != 255).sum()) for m in items) and results[1]["images"] == 4
    for budget in (12, 24, 64):
        assert results[budget]["pixels"] == results[1]["pixels"]
        assert results[budget]["miou"] == pytest.approx(results[1]["miou"], abs=1e-4)
    depth_items = elevation_items("topobathy.npz", "topo", 2) * 2
    depth = {}
    for budget in (1, 64):
        s = depth_settings(protocol="dinov2_linear", min_depth=0.1, max_depth=12.0, n_bins=16, eval_batch_size=budget)
        head = engine.build_head(backbone, s, seed=0).eval()
        depth[budget] = engine.evaluate_depth(backbone, head, depth_items, s)
    for key in engine.DEPTH_METRICS:
        assert depth[64][key] == pytest.approx(depth[1][key], rel=1e-4), key
    assert depth[64]["pixels"] == depth[1]["pixels"] and depth[64]["images"] == 4


# ----------------------------------------------------------------------------- depth


def test_eval_crops_by_hand():
    assert T.eval_region("eigen", 480, 640).sum() == (471 - 45) * (601 - 41)
    assert T.eval_region("eigen", 480, 640)[45, 41] and not T.eval_region("eigen", 480, 640)[44, 41]
    garg = T.eval_region("garg", 352, 1216)  # rows int(.408*352)=143 .. int(.9919*352)=349, cols 43 .. 1172
    assert garg.sum() == (349 - 143) * (1172 - 43) and garg[143, 43] and not garg[142, 43]
    assert T.kb_crop_box(375, 1242) == (23, 375, 13, 1229)


def depth_item(depth: np.ndarray):
    gray = np.clip(depth / depth.max() * 255, 0, 255).astype(np.uint8)
    return {"image": np.stack([gray] * 3, -1), "depth": depth.astype(np.float32), "name": "row 0"}


class ConstantDepthHead(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, features, size):
        return torch.full((features.shape[0], 1, *size), self.value)


def test_nyu_eval_counts_the_eigen_crop_and_the_range_exactly():
    depth = np.full((480, 640), 5.0, np.float32)
    depth[:100, :100] = 0.0  # no measurement (partly inside the crop: rows 45:100, cols 41:100)
    depth[200:210, 300:320] = 10.0  # at max_depth: excluded (open interval)
    depth[300:302, 300:305] = 0.0005  # below min_depth
    depth[470:480] = 7.0  # rows 470 inside, 471+ outside the crop
    s = depth_settings(crops="nyu", min_depth=1e-3, max_depth=10.0, flip_test=False)
    result = engine.evaluate_depth(ColourBackbone(16), ConstantDepthHead(5.0), [depth_item(depth)], s)
    expected = (471 - 45) * (601 - 41) - (100 - 45) * (100 - 41) - 10 * 20 - 2 * 5
    assert result["pixels"] == expected and result["images"] == 1
    seven = (601 - 41)  # row 470 at 7 m vs 5 m predicted
    assert result["rmse"] == pytest.approx(math.sqrt(seven * 4 / expected), rel=1e-6)


def test_kitti_eval_benchmark_crop_garg_and_80m():
    depth = np.zeros((375, 1242), np.float32)
    depth[::3, ::2] = 20.0  # sparse lidar
    depth[360:, :] = 85.0  # beyond 80 m (inside the crop rows, removed by the range)
    s = depth_settings(crops="kitti", min_depth=1e-3, max_depth=80.0, flip_test=False)
    result = engine.evaluate_depth(ColourBackbone(16), ConstantDepthHead(20.0), [depth_item(depth)], s)
    cropped = depth[23:375, 13:1229]
    region = T.eval_region("garg", 352, 1216)
    assert result["pixels"] == int(((cropped > 1e-3) & (cropped < 80) & region).sum()) > 0
    assert result["rmse"] == 0.0 and result["delta1"] == 1.0


def test_depth_metrics_by_hand():
    gt, pred = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2.0, 2.0, 3.0])
    m = engine.depth_errors(pred, gt)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 0 + 1) / 3))
    assert m["abs_rel"] == pytest.approx((1 / 1 + 0 + 1 / 4) / 3)
    assert m["sq_rel"] == pytest.approx((1 / 1 + 0 + 1 / 4) / 3)
    logs = [math.log(2), 0.0, math.log(3 / 4)]  # log pred - log gt
    assert m["rmse_log"] == pytest.approx(math.sqrt(sum(x * x for x in logs) / 3))
    assert m["log10"] == pytest.approx((math.log10(2) + 0 + abs(math.log10(3 / 4))) / 3)
    mean = sum(logs) / 3
    assert m["silog"] == pytest.approx(100 * math.sqrt(sum(x * x for x in logs) / 3 - mean ** 2))
    assert (m["delta1"], m["delta2"], m["delta3"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))  # ratios 2, 1, 4/3


class LeftRampHead(nn.Module):
    """An asymmetric prediction: depth grows from left to right whatever the image."""

    def forward(self, features, size):
        return torch.linspace(1.0, 3.0, size[1]).expand(features.shape[0], 1, *size).clone()


def test_flip_tta_is_the_mean_with_the_mirrored_prediction():
    image = torch.from_numpy(np.asarray(Image.open(SAMPLE_DATA / "grace_hopper.jpg"))[:64, :96].copy()).permute(2, 0, 1)[None].float()
    flip = engine.depth_prediction(ColourBackbone(16), LeftRampHead(), image, depth_settings(flip_test=True, max_depth=10.0))
    plain = engine.depth_prediction(ColourBackbone(16), LeftRampHead(), image, depth_settings(flip_test=False, max_depth=10.0))
    torch.testing.assert_close(flip, (plain + plain.flip(-1)) / 2)
    torch.testing.assert_close(flip, flip.flip(-1))  # symmetric, unlike the plain prediction
    assert not torch.allclose(plain, plain.flip(-1))


def test_sig_loss_formula_and_warmup():
    target = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    pred = torch.tensor([[1.5, 1.0, 7.0], [3.0, 6.0, 2.0]])
    g = torch.log(pred[target > 0] + 1e-3) - torch.log(target[target > 0] + 1e-3)
    torch.testing.assert_close(sig_loss(pred, target), torch.sqrt(g.var() + 0.15 * g.mean() ** 2))
    torch.testing.assert_close(sig_loss(pred, target, step=3, warmup=100), torch.sqrt(0.15 * g.mean() ** 2))
    scaled = sig_loss(2 * target[target > 0], target[target > 0], eps=0.0)  # a pure scale error
    assert float(scaled) == pytest.approx(math.sqrt(0.15) * math.log(2), rel=1e-5)


def test_segmentation_loss_averages_over_all_pixels():
    logits, mask = torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 1], [255, 255]]])
    assert float(segmentation_loss(logits, mask)) == pytest.approx(2 * math.log(3) / 4)


def elevation_items(name, key, n):
    """Real elevation grids as depth maps (metres / 100, water at 0 = no measurement), their hillshade as
    the image, split into non-square tiles."""
    z = np.load(SAMPLE_DATA / name)[key].astype(np.float32)
    shade = matplotlib.colors.LightSource(azdeg=315, altdeg=45).hillshade(z, vert_exag=0.05)
    depth = np.clip(z / 100.0, 0, None)
    image = np.stack([(shade * 255).astype(np.uint8)] * 3, -1)
    h, w = depth.shape
    tiles = [(slice(0, h * 2 // 3), slice(0, w * 3 // 4)), (slice(h // 3, h), slice(w // 4, w))]
    return [{"image": image[a, b].copy(), "depth": depth[a, b].copy(), "name": f"{name} {i}"}
            for i, (a, b) in enumerate(tiles[:n])]


@pytest.mark.parametrize("protocol", ["dinov2_linear", "dinov3_linear"])
def test_depth_probe_on_real_elevation_maps(protocol):
    train = elevation_items("jacksboro_fault_dem.npz", "elevation", 2)
    val = elevation_items("topobathy.npz", "topo", 2)
    s = depth_settings(protocol=protocol, crop_size=[64, 96], min_depth=0.1, max_depth=12.0, n_bins=16,
                       iterations=3, batch_size=2, cache_features=False, layers=1)
    result = engine.run_probe(tiny_vit(), train, val, s, seed=0)
    expected = sum(int(((v["depth"] > 0.1) & (v["depth"] < 12.0)).sum()) for v in val)
    assert result["pixels"] == expected and result["images"] == 2
    assert all(math.isfinite(result[k]) for k in engine.DEPTH_METRICS)
    head = result["head"]
    assert head.conv.in_channels == (64 if protocol == "dinov2_linear" else 32)  # [CLS] concatenated for DINOv2
    assert isinstance(head.bn, nn.Identity) == (protocol == "dinov2_linear")


@pytest.mark.parametrize("protocol", ["dinov2_linear", "dinov3_linear"])
def test_depth_head_computes_the_reference_order(protocol):
    """DINOv2's head upsamples the tokens x4, then BatchNorm (none for DINOv2) and the 1x1 conv; the head
    convolves before upsampling when it can (the two commute): same depth, same gradients."""
    s = depth_settings(protocol=protocol, n_bins=16, max_depth=12.0)
    head = LinearDepthHead(24, depth_bin_centres(16, s.min_depth, 12.0, "linear"), s).train()
    features = torch.randn(3, 24, 5, 7, generator=torch.Generator().manual_seed(0))
    upsampled = F.interpolate(features, scale_factor=s.upsample, mode="bilinear", align_corners=False)
    weights = torch.relu(head.conv(head.bn(upsampled))) + 0.1
    reference = (weights / weights.sum(1, keepdim=True) * head.bin_centres[:, None, None]).sum(1, keepdim=True)
    reference = F.interpolate(reference, size=(40, 56), mode="bilinear", align_corners=False)
    out = head(features, (40, 56))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().mean(), [head.conv.weight, head.conv.bias])
    expected = torch.autograd.grad(reference.square().mean(), [head.conv.weight, head.conv.bias])
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)


def test_depth_train_view_crops_and_flips_the_depth_with_the_image():
    item = elevation_items("jacksboro_fault_dem.npz", "elevation", 1)[0]
    s = depth_settings(crop_size=[64, 96])
    for seed in range(6):
        view = T.depth_train_view(item, s, np.random.default_rng(seed))
        assert view["image"].shape == (3, 64, 96) and view["depth"].shape == (64, 96)
        assert view["depth"].max() <= item["depth"].max() + 1e-6


# ----------------------------------------------------------------------------- protocols and inputs


def test_protocols_fill_nulls_with_their_published_values():
    s2 = seg_settings(protocol="dinov2_linear", iterations=None, batch_size=None, lr=None, weight_decay=None,
                      warmup_iters=None)
    s3 = seg_settings(protocol="dinov3_linear", iterations=None, batch_size=None, lr=None, weight_decay=None,
                      warmup_iters=None)
    assert (s2.iterations, s2.batch_size, s2.lr, s2.weight_decay, s2.warmup_iters) == (40000, 16, 1e-3, 1e-4, 1500)
    assert (s3.weight_decay, s3.dropout, s3.resize, s3.distortion) == (1e-3, 0.1, "short_side", "dinov3")
    assert seg_settings(iterations=7).iterations == 7
    json.dumps(s3.as_dict())  # eval.json-ready
    d2 = depth_settings(protocol="dinov2_linear", iterations=None, warmup_iters=None)
    assert (d2.cls_token, d2.final_norm, d2.upsample, d2.batchnorm, d2.warmup_iters) == (True, False, 4, False, 11520)


def test_test_ratios_take_any_number_of_scales():
    cfg = load_config(ROOT / "recipes" / "default.yaml", ["eval.seg.test_ratios=[0.5, 1, 1.75]"])
    assert seg_settings(test_ratios=cfg["eval"]["seg"]["test_ratios"]).test_ratios == (0.5, 1.0, 1.75)
    with pytest.raises(ConfigError, match=r"'eval.seg.test_ratios' must be a non-empty list"):
        load_config(ROOT / "recipes" / "default.yaml", ["eval.seg.test_ratios=[]"])
    with pytest.raises(InputError, match=r"eval.seg.test_ratios must be ratios > 0, got \[0.0, 1.0\]"):
        seg_settings(test_ratios=[0.0, 1.0])


def test_schedules_by_hand():
    s = seg_settings(protocol="dinov2_linear", iterations=100, warmup_iters=10, lr=1.0)
    assert lr_at(0, s)[0] == pytest.approx(1e-6) and lr_at(5, s)[0] == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert lr_at(50, s)[0] == pytest.approx(0.5)
    s = seg_settings(protocol="dinov3_linear", iterations=100, warmup_iters=10, lr=1.0)
    assert lr_at(0, s)[0] == lr_at(1, s)[0] == pytest.approx(1e-6)  # the skipped first scheduler step
    assert lr_at(11, s)[0] == pytest.approx((math.cos(math.pi * 11 / 100) + 1) / 2)
    d = depth_settings(protocol="dinov3_linear", iterations=100, warmup_iters=10, lr=1.0)
    assert lr_at(5, d) == pytest.approx((1 / 1000 + (1 + math.cos(math.pi * 0.05)) / 2 * 0.5, 0.0))
    assert lr_at(55, d)[1] == pytest.approx(0.85 + 0.1 * (1 - math.cos(math.pi * 0.5)) / 2)
    d = depth_settings(protocol="dinov2_linear", iterations=101, warmup_iters=None, lr=1.0)
    assert lr_at(0, d)[0] == pytest.approx(1 / 25) and lr_at(29, d)[0] == pytest.approx(1.0)
    assert lr_at(100, d)[0] == pytest.approx(1 / 2500)


def png(array: np.ndarray, mode=None) -> dict:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def hf(images, targets, column="mask"):
    features = Features(image=ImageFeature(decode=False), **{column: ImageFeature(decode=False)})
    return Dataset.from_dict({"image": images, column: targets}, features=features)


def test_dense_dataset_keeps_the_own_size_and_reduces_zero_label():
    photo = grace_hopper()
    mask = np.zeros((600, 512), np.uint8)
    mask[:2, :4] = [[0, 1, 150, 255]] * 2
    item = DenseDataset(hf([png(photo)], [png(mask)]), "seg", image_column="image", target_column="mask",
                        num_classes=150, reduce_zero_label=True)[0]
    assert item["image"].shape == (600, 512, 3) and item["mask"].shape == (600, 512)
    assert item["mask"][0, :4].tolist() == [255, 0, 149, 255] and item["mask"][10, 10] == 255


def test_bad_inputs_are_one_line_errors_naming_the_file():
    photo = grace_hopper()
    small = np.zeros((300, 512), np.uint8)
    with pytest.raises(InputError, match=r"^eval: mask of row 0 is 512x300 but its image is 512x600") as error:
        DenseDataset(hf([png(photo)], [png(small)]), "seg", image_column="image", target_column="mask", num_classes=3)[0]
    assert "\n" not in str(error.value)
    bad = np.zeros((600, 512), np.uint8)
    bad[5, 5] = 7
    with pytest.raises(InputError, match=r"mask row 0 has label 7 outside \[0, 3\) and not 255"):
        DenseDataset(hf([png(photo)], [png(bad)]), "seg", image_column="image", target_column="mask", num_classes=3)[0]
    millimetres_as_metres = np.full((600, 512), 4000, np.uint16)
    with pytest.raises(InputError, match=r"depth row 0 reaches 4000 m with depth_scale=1.*wrong unit"):
        DenseDataset(hf([png(photo)], [png(millimetres_as_metres)], "depth"), "depth", image_column="image",
                     target_column="depth", depth_scale=1.0, max_depth=10.0)[0]
    eight_bit = np.full((600, 512), 40, np.uint8)
    with pytest.raises(InputError, match=r"depth row 0 must be a 16-bit or float single-channel image"):
        DenseDataset(hf([png(photo)], [png(eight_bit)], "depth"), "depth", image_column="image",
                     target_column="depth")[0]
    for images, masks, column in [([png(photo), None], [png(small)] * 2, "image"),
                                  ([png(photo)] * 2, [png(small), None], "mask")]:
        with pytest.raises(InputError, match=rf"^eval: row 1 has no {column} \(the value is null\)$"):
            DenseDataset(hf(images, masks), "seg", image_column="image", target_column="mask", num_classes=3)[1]
    with pytest.raises(InputError, match=r"eval.seg.protocol must be one of dinov2_linear \| dinov3_linear"):
        seg_settings(protocol="dinov1")


def test_images_are_normalised_with_the_backbones_mean_and_std():
    """resolve(..., mean, std) from the recipe's data.mean / data.std reaches the evaluated images: a grey level
    of 51 becomes (51 / 255 - 0.5) / 0.5 = -0.6 with timm's augreg statistics, and
    (51 / 255 - 0.485) / 0.229 with ImageNet's (the default)."""
    grey = np.full((20, 30, 3), 51, np.uint8)
    for mean, std, expected in (((0.5,) * 3, (0.5,) * 3, [-0.6] * 3),
                                (None, None, [(0.2 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])):
        stats = {} if mean is None else {"mean": mean, "std": std}
        seg = resolve(dict(load_config(ROOT / "recipes" / "default.yaml")["eval"]["seg"], num_classes=4,
                           scale=[30, 20], ratio_range=[1.0, 1.0], crop_size=[16, 16]), "seg", **stats)
        depth = resolve(dict(load_config(ROOT / "recipes" / "default.yaml")["eval"]["depth"], crop_size=[16, 16]),
                        "depth", **stats)
        assert seg.as_dict()["mean"] == list(mean or (0.485, 0.456, 0.406))  # recorded in eval.json's settings
        views = [T.seg_eval_view({"image": grey, "mask": np.zeros((20, 30), np.int64), "name": "g"}, seg)["images"][0],
                 T.depth_eval_view({"image": grey, "depth": np.ones((20, 30), np.float32), "name": "g"}, depth)["image"]]
        for image in views:  # (the training views distort the colours first, then normalise alike)
            assert torch.allclose(image, torch.tensor(expected).view(3, 1, 1).expand_as(image), atol=1e-5), image[:, 0, 0]
