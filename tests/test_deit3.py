"""Each DeiT-III ingredient is configured as the reference says, checked against timm's own classes and
hand-computed values. The reference: Touvron et al., DeiT III: Revenge of the ViT (ECCV 2022,
arXiv 2204.07118), Section 3 (the training recipe: LAMB, BCE on binarised targets, 3-Augment,
LayerScale, uniform stochastic depth), and its training commands, facebookresearch/deit
README_revenge.md, "Training on ImageNet-1k" (the deit_small_patch16_LS command: --lr 4e-3,
--weight-decay 0.05, --warmup-epochs 5, --warmup-lr 1e-6, --mixup .8, --cutmix 1.0, --drop-path 0.05,
--bce-loss, --smoothing 0.0, --ThreeAugment, --color-jitter 0.3)."""

import math

import pytest
import timm
import torch
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lamb

from clsvit import PAPER_DEFAULT, create_model
from clsvit.config import load_config
from clsvit.deit3 import build_loss, build_mixup, build_optimizer, build_scheduler, one_hot_targets


@pytest.fixture(scope="module")
def cfg():
    return load_config("recipes/default.yaml")


def tiny_vit(**specialize):
    return create_model("deit3_small_patch16_224", img_size=32, embed_dim=32, depth=3, num_heads=2,
                        num_classes=10, layerscale_init=1e-4, specialize=specialize or None)


def test_lamb_param_groups_exclude_1d_pos_embed_and_cls_token(cfg):
    model = tiny_vit(**PAPER_DEFAULT)
    optimizer = build_optimizer(model, cfg["optim"])
    assert isinstance(optimizer, Lamb)
    assert optimizer.defaults["max_grad_norm"] == 1.0  # LAMB's internal clip, the reference's only one
    assert optimizer.defaults["lr"] == 4e-3 and optimizer.defaults["eps"] == 1e-8
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    expected_no_decay = {n for n, p in model.named_parameters() if p.ndim <= 1 or n in ("pos_embed", "cls_token")}
    assert no_decay == expected_no_decay
    assert decay == set(names.values()) - expected_no_decay
    assert "blocks.0.attn.qkv.global_copy.weight" in decay  # the QKV copy is decayed like its twin
    assert "blocks.0.norm1.global_copy.weight" in no_decay and "blocks.2.ls2.global_copy.gamma" in no_decay


def test_cosine_schedule_matches_the_closed_form(cfg):
    steps_per_epoch, base_lr = 10, cfg["optim"]["lr"]
    schedule = {**cfg["schedule"], "epochs": 20, "warmup_epochs": 5}
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    scheduler = build_scheduler(optimizer, schedule, steps_per_epoch)
    total, warmup = 20 * steps_per_epoch, 5 * steps_per_epoch
    for step in (0, 1, 25, 49, 50, 51, 120, 199):
        scheduler.step_update(num_updates=step)
        if step < warmup:  # linear from warmup_lr (1e-6) to the peak
            expected = 1e-6 + step * (base_lr - 1e-6) / warmup
        else:  # timm's cosine counts from step 0 (no warmup prefix), as in the DeiT-III code
            expected = 1e-5 + 0.5 * (base_lr - 1e-5) * (1 + math.cos(math.pi * step / total))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9), step


def test_constant_schedule_is_flat_after_warmup(cfg):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-5)
    schedule = {**cfg["schedule"], "name": "constant", "epochs": 20, "warmup_epochs": 5}
    scheduler = build_scheduler(optimizer, schedule, 10)
    scheduler.step_update(num_updates=0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)
    for step in (50, 120, 199):
        scheduler.step_update(num_updates=step)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_mixup_has_no_label_smoothing_so_bce_binarisation_keeps_two_classes(cfg):
    mixup = build_mixup(cfg["aug"], num_classes=10)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob) == (0.8, 1.0, 1.0, 0.5)
    assert mixup.label_smoothing == 0.0 and mixup.mode == "batch"
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8)
    _, targets = mixup(images, labels)
    binarised = (targets > 0.0).float()  # what BCE(target_threshold=0) trains on
    assert ((binarised.sum(1) >= 1) & (binarised.sum(1) <= 2)).all()
    # timm's default smoothing (0.1) would make every target > 0: all classes "present"
    smoothed = timm.data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10)
    assert (smoothed(images, labels)[1] > 0).all()


def test_mixup_off_gives_one_hot_targets_like_timm():
    aug = {"mixup": 0.0, "cutmix": 0.0}
    assert build_mixup(aug, 10) is None
    labels = torch.tensor([3, 0])
    expected = timm.data.mixup.one_hot(labels, 10, on_value=0.9 + 0.01, off_value=0.01)
    assert torch.allclose(one_hot_targets(labels, 10, smoothing=0.1), expected)


def test_losses(cfg):
    bce = build_loss(cfg["train"])
    assert isinstance(bce, BinaryCrossEntropy) and bce.target_threshold == 0.0 and bce.smoothing == 0.0
    logits, targets = torch.randn(4, 10), torch.rand(4, 10) * (torch.rand(4, 10) > 0.7)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, (targets > 0).float())
    assert torch.allclose(bce(logits, targets), expected)
    assert isinstance(build_loss({**cfg["train"], "loss": "soft_ce"}), SoftTargetCrossEntropy)


def test_default_recipe_is_the_deit3_vit_s_reference(cfg):
    model = cfg["model"]
    assert (model["arch"], model["img_size"], model["drop_path"], model["layerscale_init"]) == \
        ("deit3_small_patch16_224", 224, 0.05, 1e-4)
    assert (cfg["optim"]["name"], cfg["optim"]["lr"], cfg["optim"]["weight_decay"]) == ("lamb", 4e-3, 0.05)
    assert cfg["train"]["global_batch"] == 2048 and cfg["aug"]["repeated_aug"] == 3
    assert (cfg["schedule"]["epochs"], cfg["schedule"]["warmup_epochs"]) == (800, 5)
    assert (cfg["schedule"]["warmup_lr"], cfg["schedule"]["min_lr"]) == (1e-6, 1e-5)
    assert cfg["aug"]["three_augment"] and cfg["aug"]["color_jitter"] == 0.3 and cfg["aug"]["eval_crop_pct"] == 1.0
