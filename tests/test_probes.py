"""Tests of clsvit.probes: linear segmentation / depth probes on frozen features.

Run as a script (``accelerate launch tests/test_probes.py --worker OUT.json``) it is also the worker of
the two-process test, which must reproduce the single-process numbers.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clsvit import probes  # noqa: E402


def settings(**overrides) -> probes.ProbeSettings:
    values = dict(resolution=32, layers=1, iterations=200, batch_size=8, lr=0.1, weight_decay=0.0,
                  warmup_iters=10, slide_stride=32, eval_batch_size=16, max_val_images=0, num_workers=0)
    values.update(overrides)
    return probes.ProbeSettings(**values)


class OneHotBackbone(nn.Module):
    """A fake frozen backbone whose patch features are the one-hot of the integer that the image stores
    in channel 0 at each patch centre: features that encode the target perfectly."""

    def __init__(self, patch: int, levels: int, size: int):
        super().__init__()
        self.patch, self.levels = patch, levels
        self.patch_embed = SimpleNamespace(img_size=(size, size))

    def forward_intermediates(self, x, indices, norm, output_fmt, intermediates_only):
        assert norm and output_fmt == "NCHW" and intermediates_only
        centre = self.patch // 2
        level = x[:, 0, centre :: self.patch, centre :: self.patch].round().long().clamp(0, self.levels - 1)
        return [F.one_hot(level, self.levels).permute(0, 3, 1, 2).float()] * indices


def bilinear(grid: torch.Tensor, size: int) -> torch.Tensor:
    """[C, h, w] -> [C, size, size], the probe's own upsampling (float64 to avoid argmax ties)."""
    return F.interpolate(grid[None].double(), size=(size, size), mode="bilinear", align_corners=False)[0]


def grid_image(grid: torch.Tensor, patch: int) -> torch.Tensor:
    return grid.repeat_interleave(patch, 0).repeat_interleave(patch, 1).float()[None].repeat(3, 1, 1)


def perfect_seg_dataset(n, num_classes, size=32, patch=4, seed=0):
    """Random class per patch; the mask is what bilinearly upsampled one-hot logits give (so a linear
    head on one-hot features can be exactly right), with a band of ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        grid = torch.randint(0, num_classes, (size // patch, size // patch), generator=g)
        mask = bilinear(F.one_hot(grid, num_classes).permute(2, 0, 1), size).argmax(0)
        mask[:, :3] = probes.IGNORE_INDEX
        items.append({"image": grid_image(grid, patch), "mask": mask})
    return items


def perfect_depth_dataset(n, depths, size=32, patch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        grid = torch.randint(0, len(depths), (size // patch, size // patch), generator=g)
        depth = bilinear(depths[grid][None], size)[0].float()
        depth[:2] = 0.0  # invalid rows
        items.append({"image": grid_image(grid, patch), "depth": depth})
    return items


def random_dense_dataset(n, size, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(3, size, size, generator=g),
             "mask": torch.randint(0, num_classes, (size, size), generator=g),
             "depth": torch.rand(size, size, generator=g) * 3 + 0.5} for _ in range(n)]


def tiny_vit(img_size=32):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", img_size=img_size, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, num_classes=10)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("cache", [False, True], ids=["online", "cached"])
def test_perfect_features_reach_miou_one(cache):
    result = probes.run_segmentation_probe(
        OneHotBackbone(4, 5, 32), perfect_seg_dataset(64, 5), perfect_seg_dataset(32, 5, seed=1), 5,
        settings(cache_features=cache, max_train_images=48),
    )
    assert result["miou"] > 0.99


@pytest.mark.parametrize("cache", [False, True], ids=["online", "cached"])
def test_perfect_features_reach_rmse_zero(cache):
    depths = torch.tensor([1.0, 2.0, 3.0])
    result = probes.run_depth_probe(
        OneHotBackbone(4, 3, 32), perfect_depth_dataset(64, depths), perfect_depth_dataset(32, depths, seed=1),
        settings(cache_features=cache, max_train_images=48), n_bins=8, min_depth=0.5, max_depth=4.0,
    )
    assert result["rmse"] < 0.01 and result["abs_rel"] < 0.005 and result["delta1"] == 1.0


def test_random_backbone_gives_finite_metrics_and_is_reproducible():
    vit = tiny_vit()
    train, val = random_dense_dataset(16, 40, 4), random_dense_dataset(6, 40, 4, seed=1)
    fast = settings(iterations=5, batch_size=4, slide_stride=16, layers=2)
    seg = probes.run_segmentation_probe(vit, train, val, 4, fast)
    assert 0.0 <= seg["miou"] <= 1.0
    assert seg["head"].conv.in_channels == 2 * 32  # last two blocks concatenated
    again = probes.run_segmentation_probe(vit, train, val, 4, fast)
    assert again["miou"] == seg["miou"]
    depth = probes.run_depth_probe(vit, train, val, fast, n_bins=16, min_depth=0.1, max_depth=5.0,
                                   bin_spacing="log")
    assert all(math.isfinite(depth[k]) for k in ("rmse", "abs_rel", "delta1"))


def test_probe_resolution_other_than_model_leaves_model_untouched():
    vit = tiny_vit(img_size=32)
    pos_embed = vit.pos_embed.detach().clone()
    resized = probes.backbone_at_resolution(vit, 48)
    assert resized is not vit and tuple(resized.patch_embed.img_size) == (48, 48)
    assert probes.patch_features(resized, torch.randn(2, 3, 48, 48), 1).shape == (2, 32, 6, 6)
    assert torch.equal(vit.pos_embed, pos_embed) and tuple(vit.patch_embed.img_size) == (32, 32)
    assert probes.backbone_at_resolution(vit, 32) is vit and not vit.training


def test_patch_features_are_timm_final_normed_tokens():
    vit = tiny_vit().eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = vit.forward_features(images)[:, vit.num_prefix_tokens :]  # final norm applied
    expected = tokens.reshape(2, 4, 4, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(probes.patch_features(vit, images, 1), expected)


# ----------------------------------------------------------------------------- metrics by hand


class PixelClassBackbone(OneHotBackbone):
    def __init__(self, num_classes, size):
        super().__init__(patch=1, levels=num_classes, size=size)


class UpsampleHead(nn.Module):
    def forward(self, features, size):
        return F.interpolate(features, size=size, mode="nearest")


def test_miou_accumulates_over_split_ignores_255_and_skips_absent_classes():
    # Two 2x2 images; predictions are stored in the image, targets in the mask (pixel order row-major).
    preds = [[0, 1, 1, 1], [3, 0, 2, 0]]
    targets = [[0, 0, 1, 1], [255, 2, 255, 0]]
    dataset = [{"image": torch.tensor(p, dtype=torch.float).reshape(1, 2, 2).repeat(3, 1, 1),
                "mask": torch.tensor(t).reshape(2, 2)} for p, t in zip(preds, targets)]
    # Over the split, ignoring pixels labelled 255: class 0: I=2 (pixels 0, 7), U=4 (0, 1, 5, 7) -> 1/2;
    # class 1: I=2, U=3 -> 2/3; class 2: target only -> 0; class 3 only predicted on an ignored pixel and
    # class 4 never seen -> excluded. mIoU = (1/2 + 2/3 + 0) / 3. (Per-image averaging would give 5/12.)
    expected = (0.5 + 2 / 3 + 0.0) / 3
    miou = probes.evaluate_segmentation(PixelClassBackbone(5, 2), UpsampleHead(), dataset, 5,
                                        settings(resolution=2, slide_stride=2, eval_batch_size=1))
    assert miou == pytest.approx(expected, abs=1e-6)


def test_per_image_depth_errors_by_hand():
    target = torch.tensor([[[1.0, 2.0], [0.0, 4.0]], [[2.0, 2.0], [2.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]])
    pred = torch.tensor([[[2.0, 2.0], [9.0, 4.0]], [[2.0, 2.0], [2.0, 3.0]], [[1.0, 1.0], [1.0, 1.0]]])
    errors = probes.per_image_depth_errors(pred, target)
    # image 1: valid pixels 1,2,4 -> errors 1,0,0; image 2: errors 0,0,0,1; image 3 has no valid pixel.
    torch.testing.assert_close(errors["rmse"], torch.tensor([math.sqrt(1 / 3), math.sqrt(1 / 4)]))
    torch.testing.assert_close(errors["abs_rel"], torch.tensor([1 / 3, 0.5 / 4]))
    torch.testing.assert_close(errors["delta1"], torch.tensor([2 / 3, 3 / 4]))


def test_sig_loss_formula_and_scale_tolerance():
    target = torch.tensor([[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]])
    pred = torch.tensor([[1.5, 1.0, 7.0], [3.0, 6.0, 2.0]])
    g = torch.log(pred[target > 0] + 1e-3) - torch.log(target[target > 0] + 1e-3)
    n = g.numel()
    expected = torch.sqrt(g.var() + 0.15 * g.mean() ** 2)
    torch.testing.assert_close(probes.sig_loss(pred, target), expected)
    # == sqrt(mean(g^2) - 0.85 mean(g)^2) with the unbiased variance
    alt = (g.pow(2).sum() - n * g.mean() ** 2) / (n - 1) + 0.15 * g.mean() ** 2
    torch.testing.assert_close(probes.sig_loss(pred, target) ** 2, alt)
    # a pure scale error costs sqrt(0.15) * |log scale|
    scaled = probes.sig_loss(2 * target[target > 0], target[target > 0], eps=0.0)
    assert float(scaled) == pytest.approx(math.sqrt(0.15) * math.log(2), rel=1e-5)


def test_depth_head_prediction_stays_between_bins():
    centres = probes.depth_bin_centres(5, 0.1, 10.0, "log")
    torch.testing.assert_close(centres[[0, 2, 4]], torch.tensor([0.1, 1.0, 10.0]))
    head = probes.LinearDepthHead(3, centres).eval()
    with torch.no_grad():
        out = head(torch.randn(2, 3, 4, 4) * 100, (8, 8))
    assert out.shape == (2, 8, 8) and out.min() >= 0.1 and out.max() <= 10.0


@pytest.mark.parametrize("height,width", [(5, 7), (3, 3), (8, 4)])
def test_slide_predict_reassembles_the_image(height, width):
    images = torch.randn(2, 3, height, width)
    calls = []

    def identity(crops):
        calls.append(crops.shape)
        assert crops.shape[-2:] == (4, 4)
        return crops

    torch.testing.assert_close(probes.slide_predict(identity, images, crop=4, stride=3), images)
    assert len(calls) == (max(height - 4 + 2, 0) // 3 + 1) * (max(width - 4 + 2, 0) // 3 + 1)


def test_training_crops_keep_image_and_targets_aligned():
    image = torch.arange(5 * 6, dtype=torch.float).reshape(1, 5, 6).repeat(3, 1, 1)
    item = {"image": image, "mask": image[0].long(), "depth": image[0] + 1, "label": 3}
    crop = probes._crop_and_flip(item, 0.99, 0.5, True, 4)
    assert set(crop) == {"image", "mask", "depth"}
    assert torch.equal(crop["mask"], crop["image"][0].long()) and torch.equal(crop["depth"], crop["image"][0] + 1)
    assert torch.equal(crop["image"][0], image[0, 1:5, 1:5].flip(-1))
    padded = probes._crop_and_flip(item, 0.0, 0.0, False, 8)
    assert padded["mask"][5:].eq(255).all() and padded["depth"][:, 6:].eq(0).all()


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="eval.seg: missing probe key"):
        probes.ProbeSettings.from_config({"resolution": 32}, "eval.seg")
    assert not probes.ProbeSettings.from_config(vars(settings()), "eval.seg").cache_features
    with pytest.raises(ValueError, match="eval.depth.iterations"):
        probes.ProbeSettings.from_config({**vars(settings()), "iterations": 0}, "eval.depth")
    with pytest.raises(ValueError, match="bin_spacing"):
        probes.depth_bin_centres(4, 0.1, 1.0, "cubic")


# ----------------------------------------------------------------------------- two processes


def _worker_metrics() -> dict:
    """Seg + depth probes on a tiny random ViT with a batch and a val split that do not divide by 2."""
    vit = tiny_vit()
    train, val = random_dense_dataset(12, 40, 3), random_dense_dataset(7, 40, 3, seed=1)
    fast = settings(iterations=6, batch_size=5, slide_stride=16, eval_batch_size=2)
    seg = probes.run_segmentation_probe(vit, train, val, 3, fast)
    depth = probes.run_depth_probe(vit, train, val, fast, n_bins=8, min_depth=0.1, max_depth=4.0)
    cached = settings(iterations=6, batch_size=5, slide_stride=16, eval_batch_size=3, cache_features=True,
                      max_train_images=11)
    seg_cached = probes.run_segmentation_probe(vit, train, val, 3, cached)
    return {"miou": seg["miou"], **{k: depth[k] for k in ("rmse", "abs_rel", "delta1")},
            "head": seg["head"].conv.weight.sum().item(), "miou_cached": seg_cached["miou"],
            "head_cached": seg_cached["head"].conv.weight.sum().item()}


def test_two_processes_match_one(tmp_path):
    single = _worker_metrics()
    out = tmp_path / "metrics.json"
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is set up; torchrun's
    # launcher (--multi_gpu) + ACCELERATE_USE_CPU (read by Accelerator()) gives two CPU processes on gloo.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
           "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           __file__, "--worker", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    double = json.loads(out.read_text())
    for key, value in single.items():
        assert double[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


if __name__ == "__main__" and "--worker" in sys.argv:
    from accelerate import Accelerator

    accelerator = Accelerator()  # sets up the process group as eval.py does
    assert accelerator.num_processes == 2
    metrics = _worker_metrics()
    if accelerator.is_main_process:
        Path(sys.argv[sys.argv.index("--worker") + 1]).write_text(json.dumps(metrics))
    accelerator.end_training()  # destroy the process group before exit (else gloo may abort at exit)
