"""Tests of clsvit.analysis: [CLS]/patch statistics, hook positions, PCA maps, plots."""

import numpy as np
import pytest
import timm
import torch

from clsvit import analysis


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=3,
                              num_heads=2, num_classes=10, init_values=0.5, **kwargs)
    return model.eval()


def test_cosines_on_constructed_tokens():
    channels = 6
    eye = torch.eye(channels)
    # [CLS] equal to every patch -> both cosines 1 (scale does not matter)
    same = torch.stack([eye[0] * 3, eye[0], eye[0] * 2, eye[0] * 0.5])[None]
    assert analysis.cls_patch_cosine(same, 1).item() == pytest.approx(1.0)
    assert analysis.patch_patch_cosine(same, 1).item() == pytest.approx(1.0)
    # [CLS] orthogonal to all patches, patches mutually orthogonal -> 0 and 0
    orthogonal = eye[:4][None]
    assert analysis.cls_patch_cosine(orthogonal, 1).item() == pytest.approx(0.0)
    assert analysis.patch_patch_cosine(orthogonal, 1).item() == pytest.approx(0.0)
    # one register token (index 1) is skipped: patches are tokens 2.. ; [CLS] = patch 2, orthogonal to patch 3
    with_register = torch.stack([eye[0], eye[5], eye[0], eye[1]])[None]
    assert analysis.cls_patch_cosine(with_register, 2).item() == pytest.approx(0.5)
    assert analysis.patch_patch_cosine(with_register, 2).item() == pytest.approx(0.0)


def test_patch_patch_cosine_matches_pairwise_loop():
    tokens = torch.randn(2, 7, 5)
    for b in range(2):
        patches = torch.nn.functional.normalize(tokens[b, 1:], dim=-1)
        sims = patches @ patches.T
        expected = (sims.sum() - sims.diag().sum()) / (6 * 5)
        assert analysis.patch_patch_cosine(tokens, 1)[b].item() == pytest.approx(expected.item(), abs=1e-6)


def test_dimension_separation_shares():
    stats = analysis.TokenStatistics(depth=1, channels=10, num_prefix_tokens=1, device="cpu")
    tokens = torch.ones(2, 5, 10)
    tokens[:, 0, 0] = 100.0  # [CLS] dominates channel 0 by 100x
    tokens[:, 0, 1] = 11.0  # ... and channel 1 by 11x
    tokens[:, 1:, 2] = -50.0  # patches dominate channel 2 (magnitudes, sign ignored)
    tokens[:, 1:, 3] = 9.0  # 9x: not beyond 10x
    for site in analysis.SITES:
        stats.update(0, site, tokens)
    result = stats.result()
    assert result["cls_dominant_dims"]["norm1"] == [pytest.approx(0.2)]
    assert result["patch_dominant_dims"]["input"] == [pytest.approx(0.1)]


def test_hook_sites_are_the_block_tensors():
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    captured = {}
    with torch.no_grad(), analysis.hooked_sites(model, lambda b, s, t: captured.__setitem__((b, s), t.clone())):
        model.forward_features(images)
    assert len(captured) == len(model.blocks) * len(analysis.SITES)
    with torch.no_grad():  # manual recomputation of a pre-norm timm block
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for i, blk in enumerate(model.blocks):
            torch.testing.assert_close(captured[i, "input"], x)
            n1 = blk.norm1(x)
            torch.testing.assert_close(captured[i, "norm1"], n1)
            x1 = x + blk.ls1(blk.attn(n1))
            torch.testing.assert_close(captured[i, "pre_norm2"], x1)
            n2 = blk.norm2(x1)
            torch.testing.assert_close(captured[i, "norm2"], n2)
            x = x1 + blk.ls2(blk.mlp(n2))
            assert not torch.allclose(x1, captured[i, "input"])  # sites really differ
    # hooks are removed afterwards
    captured.clear()
    with torch.no_grad():
        model.forward_features(images)
    assert not captured


def test_hooks_see_the_specialized_global_token_rows():
    """With [CLS]-specialized norms, the norm1/norm2 sites must hold the rows the block really uses:
    [CLS] normalised by its own copy, patches by the shared weights."""
    from clsvit.model import create_model

    torch.manual_seed(0)
    model = create_model("vit_small_patch16_224", specialize={"norm": 1.0}, img_size=32, patch_size=8,
                         embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        for blk in model.blocks:
            for norm in (blk.norm1, blk.norm2):
                norm.global_copy.weight.normal_()
                norm.global_copy.bias.normal_()
    captured = {}
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), analysis.hooked_sites(model, lambda b, s, t: captured.__setitem__((b, s), t.clone())):
        model.forward_features(images)
    for i, blk in enumerate(model.blocks):
        for norm, before, after in ((blk.norm1, "input", "norm1"), (blk.norm2, "pre_norm2", "norm2")):
            x = captured[i, before]
            shared = torch.nn.functional.layer_norm(x, (32,), norm.weight, norm.bias, norm.eps)
            own = torch.nn.functional.layer_norm(x[:, :1], (32,), norm.global_copy.weight, norm.global_copy.bias,
                                                 norm.eps)
            torch.testing.assert_close(captured[i, after][:, 1:], shared[:, 1:])
            torch.testing.assert_close(captured[i, after][:, :1], own)
            assert not torch.allclose(own, shared[:, :1])


def test_analyze_tokens_matches_direct_computation_and_shapes():
    model = tiny_vit(reg_tokens=2)
    images = torch.randn(4, 3, 32, 32)
    result = analysis.analyze_tokens(model, [images[:3], images[3:]])
    assert set(result) == {"cos_cls_patch", "cos_patch_patch", "cls_dominant_dims", "patch_dominant_dims"}
    for per_site in result.values():
        assert set(per_site) == set(analysis.SITES) and all(len(v) == 3 for v in per_site.values())
    captured = {}
    with torch.no_grad(), analysis.hooked_sites(model, lambda b, s, t: captured.__setitem__((b, s), t)):
        model.forward_features(images)
    tokens = captured[1, "norm1"]
    assert model.num_prefix_tokens == 3
    expected = analysis.cls_patch_cosine(tokens, 3).mean().item()
    assert result["cos_cls_patch"]["norm1"][1] == pytest.approx(expected, abs=1e-6)
    ratio = tokens[:, 0].abs().mean(0) / tokens[:, 3:].abs().mean((0, 1))
    assert result["cls_dominant_dims"]["norm1"][1] == pytest.approx((ratio > 10).float().mean().item())


def test_analysis_rejects_model_without_cls_token():
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1,
                              num_heads=2, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="CLS"):
        analysis.analyze_tokens(model, [torch.randn(1, 3, 32, 32)])


def test_pca_maps_and_grid():
    model = tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    maps = analysis.pca_maps(model, images)
    assert maps.shape == (3, 3, 4, 4) and maps.min() >= 0 and maps.max() <= 1
    for c in range(3):  # each component spans [0, 1] over all images together
        assert maps[:, c].min().item() == pytest.approx(0.0, abs=1e-6)
        assert maps[:, c].max().item() == pytest.approx(1.0, abs=1e-6)
    # first component = projection on the top right-singular vector (up to sign)
    (features,) = model.forward_intermediates(images, indices=1, norm=True, intermediates_only=True)
    flat = features.permute(0, 2, 3, 1).reshape(-1, 32).double()
    flat = flat - flat.mean(0)
    top = torch.linalg.svd(flat, full_matrices=False)[2][0]
    first = maps[:, 0].reshape(-1).double()
    corr = torch.corrcoef(torch.stack([first, flat @ top]))[0, 1].abs()
    assert corr.item() == pytest.approx(1.0, abs=1e-5)
    grid = analysis.pca_grid(images, maps, min_side=32)
    assert grid.shape == (64, 96, 3) and grid.dtype == np.uint8
    assert (grid[32:40, :8] == grid[32, 0]).all()  # one patch of image 0's map: one colour
    assert analysis.pca_grid(images, maps, min_side=128).shape == (256, 384, 3)


def test_plot_writes_png(tmp_path):
    stats = analysis.analyze_tokens(tiny_vit(), [torch.randn(2, 3, 32, 32)])
    fig = analysis.plot_token_statistics(stats, title="tiny")
    path = tmp_path / "analysis.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [len(ax.get_lines()) for ax in fig.axes] == [4, 4, 4, 4]
