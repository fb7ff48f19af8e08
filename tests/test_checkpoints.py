"""Starting from public checkpoints: every layout against timm's own loader, bad inputs, the
Hugging Face cache offline, and the specialized twins in timm's registry.

The checkpoints are tiny timm models with random weights, saved the way each publisher saves them:
official DeiT-III (facebookresearch/deit models_v2.py `Layer_scale_init_Block.gamma_1/gamma_2`,
main.py saves `{"model": state_dict}`), timm's own (.pth / .bin / .safetensors), official DINOv2
(facebookresearch/dinov2 dinov2/models/vision_transformer.py: `cls_token`, a `pos_embed` that
holds the [CLS] position, `register_tokens`, `mask_token`, no head), and a clsvit run. The
reference is always `timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=...))`.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

import clsvit
from clsvit import PAPER_DEFAULT
from clsvit.config import DEFAULT_RECIPE, load_config
from clsvit.errors import InputError
from clsvit.checkpoint import load_run
from clsvit.model import (block_indices, build_model, is_specialized, normalisation_note, paper_default_for,
                          read_pretrained, specialized_modules, specialized_name)
from model_utils import TINY, images, make_run, randomize_

def random_model(arch: str, img_size: int, seed: int = 0, **kwargs) -> torch.nn.Module:
    return randomize_(timm.create_model(arch, img_size=img_size, **TINY, **kwargs), seed).eval()


def official_deit3(model) -> dict:
    return {"model": {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v for k, v in model.state_dict().items()}}


def official_dinov2(model) -> dict:
    """timm's DINOv2 model -> the layout of DINOv2's own hub checkpoints."""
    state = dict(model.state_dict())
    generator = torch.Generator().manual_seed(9)
    state["mask_token"] = torch.randn(1, model.embed_dim, generator=generator)
    if "reg_token" in state:  # timm folds the [CLS] position into cls_token (no_embed_class)
        cls_position = 0.02 * torch.randn(1, 1, model.embed_dim, generator=generator)
        state["pos_embed"] = torch.cat([cls_position, state["pos_embed"]], dim=1)
        state["cls_token"] = state["cls_token"] - cls_position
        state["register_tokens"] = state.pop("reg_token")
    return state


# name: (arch, source image size, timm kwargs, writer(model, directory) -> SOURCE)
LAYOUTS = {
    "deit3-official-pth": ("deit3_small_patch16_224", 32, {"num_classes": 10},
                           lambda m, d: _saved(torch.save, official_deit3(m), d / "deit_3_small_224_1k.pth")),
    "timm-pth-cls+reg": ("vit_small_patch16_224", 32, {"num_classes": 10, "reg_tokens": 2, "init_values": 0.1},
                         lambda m, d: _saved(torch.save, m.state_dict(), d / "model.pth")),
    "timm-bin": ("deit3_small_patch16_224", 32, {"num_classes": 10},
                 lambda m, d: _saved(torch.save, m.state_dict(), d / "pytorch_model.bin")),
    "timm-safetensors-reg-avgpool": ("vit_little_patch16_reg4_gap_256", 32, {"num_classes": 10, "init_values": 0.1},
                                     lambda m, d: _saved(save_file, m.state_dict(), d / "model.safetensors")),
    "dinov2-official": ("vit_small_patch14_dinov2", 28, {"num_classes": 0},
                        lambda m, d: _saved(torch.save, official_dinov2(m), d / "dinov2_vits14_pretrain.pth")),
    "dinov2-official-registers": ("vit_small_patch14_reg4_dinov2", 28, {"num_classes": 0},
                                  lambda m, d: _saved(torch.save, official_dinov2(m), d / "dinov2_vits14_reg4.pth")),
}


def _saved(save, state, path: Path) -> Path:
    save(state, str(path))
    return path


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("resize", [False, True], ids=["same-size", "other-size"])
def test_clone_retrofit_computes_what_timm_loads(tmp_path, layout, resize):
    """clsvit.create_model(arch, specialize=PAPER_DEFAULT, pretrained=SOURCE) at clone init gives
    the logits and features of timm.create_model(arch, pretrained=True, overlay file=SOURCE)."""
    arch, size, kwargs = LAYOUTS[layout][:3]
    source = LAYOUTS[layout][3](random_model(arch, size, **kwargs), tmp_path)
    if resize:  # a 3x3 grid instead of 2x2: timm resizes the position embeddings
        size += 14 if "patch14" in arch else 16
    kwargs = {**TINY, **kwargs, "img_size": size}
    reference = timm.create_model(arch, pretrained=True, **kwargs, pretrained_cfg_overlay=dict(
        file=str(source), num_classes=kwargs["num_classes"])).eval()
    lines = []
    model = clsvit.create_model(arch, specialize=paper_default_for(reference), pretrained=source, report=lines.append,
                                **{k: v for k, v in kwargs.items() if k != "num_classes"}).eval()
    assert len(lines) == 1 and ("resized" in lines[0]) == resize, lines
    assert model.num_classes == kwargs["num_classes"]  # the checkpoint's class count
    assert sum(".global_copy." in key for key in model.state_dict()) > 0
    x = images(size)
    with torch.no_grad():
        for name in ("forward", "forward_features"):
            expected = getattr(reference, name)(x)
            assert expected.abs().max() > 1e-2
            torch.testing.assert_close(getattr(model, name)(x), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_the_summary_line_says_what_was_loaded_converted_resized_and_left_fresh(tmp_path):
    source = LAYOUTS["deit3-official-pth"][3](random_model("deit3_small_patch16_224", 32, num_classes=10), tmp_path)
    lines = []
    clsvit.create_model("deit3_small_patch16_224", specialize=PAPER_DEFAULT, pretrained=source, report=lines.append,
                        img_size=48, num_classes=5, **TINY)
    # 3 blocks x 14 tensors + cls_token, pos_embed, patch_embed (2), norm (2) = 48, less the 6 gammas
    # timm renames; the head (2) is replaced. Copies: norm1/norm2 (4) + ls1/ls2 (2) per block, QKV (2) in block 0.
    assert lines == [f"pretrained {source} (official DeiT-III layout) -> deit3_small_patch16_224: 42 tensors loaded, "
                     f"6 converted by timm's checkpoint filter (blocks.0.gamma_1, blocks.0.gamma_2, ...), "
                     f"pos_embed resized 2x2 -> 3x3, head left fresh (10 -> 5 classes), "
                     f"20 global-token copies cloned from the shared weights"]


def test_runs_load_as_they_were_trained_and_retrofit_as_timm_loads_them(tmp_path):
    specialized, cfg = make_run(tmp_path / "specialized", {"norm": 1.0, "qkv": "[1]"}, seed=1)
    baseline, _ = make_run(tmp_path / "baseline", {}, seed=2)
    x = images()
    for source in (tmp_path / "specialized", tmp_path / "specialized" / "model.safetensors"):  # its copies load
        model = build_model(cfg["model"], pretrained=source, report=None).eval()
        assert torch.equal(model(x), specialized(x))
    reference = timm.create_model("deit3_small_patch16_224", pretrained=True, img_size=32, num_classes=10,
                                  init_values=1e-4, **TINY, pretrained_cfg_overlay=dict(
                                      file=str(tmp_path / "baseline" / "model.safetensors"), num_classes=10)).eval()
    retrofit = clsvit.create_model("deit3_small_patch16_224", specialize=PAPER_DEFAULT, pretrained=tmp_path / "baseline",
                                   report=None, img_size=32, layerscale_init=1e-4, **TINY).eval()
    torch.testing.assert_close(retrofit(x), reference(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(baseline(x), reference(x), rtol=0, atol=0)


class TrainerState:
    """An object a training script might pickle into a checkpoint."""


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_sources_are_one_line_errors(tmp_path):
    small = random_model("deit3_small_patch16_224", 32, num_classes=10)
    source = LAYOUTS["deit3-official-pth"][3](small, tmp_path)
    make = dict(report=None, img_size=32)
    with pytest.raises(ValueError) as excinfo:  # another width
        clsvit.create_model("deit3_small_patch16_224", pretrained=source, embed_dim=64, depth=3, num_heads=2, **make)
    assert re.match(rf"pretrained: {source} does not fit deit3_small_patch16_224: cls_token \(1, 1, 32\) in the file, "
                    r"\(1, 1, 64\) in the model; ", one_line_error(excinfo))
    with pytest.raises(ValueError) as excinfo:  # another depth
        clsvit.create_model("deit3_small_patch16_224", pretrained=source, embed_dim=32, depth=4, num_heads=2, **make)
    assert one_line_error(excinfo).endswith("does not fit deit3_small_patch16_224: 3 blocks in the file, 4 in the model")

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(source.read_bytes()[:2000])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    pickled = tmp_path / "training_state.pth"
    torch.save({"model": small.state_dict(), "trainer": TrainerState()}, pickled)  # code weights_only will not run
    for bad in (truncated, garbage, pickled):
        with pytest.raises(ValueError) as excinfo:
            clsvit.create_model("deit3_small_patch16_224", pretrained=bad, **TINY, **make)
        assert one_line_error(excinfo).startswith(f"pretrained: {bad} cannot be read as a checkpoint (")
    with pytest.raises(InputError, match=r"^model.pretrained: runs/nothing is not a file, a run directory, "):
        build_model({**load_config("recipes/default.yaml")["model"], "pretrained": "runs/nothing"}, 10,
                    pretrained="runs/nothing")

    specialized, cfg = make_run(tmp_path / "run", {"mlp": "[0]"}, seed=3)
    with pytest.raises(ValueError) as excinfo:  # the run's copies have nowhere to go
        build_model({**cfg["model"], "specialize": {**cfg["model"]["specialize"], "mlp": 0.0}},
                    pretrained=tmp_path / "run", report=None)
    assert one_line_error(excinfo).startswith(
        f"model.pretrained: {tmp_path / 'run'} has global-token copies this model does not (blocks.0.mlp.global_copy.")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache that holds timm/deit3_small_patch16_224.fb_in1k (random
    weights), laid out as huggingface_hub writes it."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = cache / "models--timm--deit3_small_patch16_224.fb_in1k"
    revision = "0" * 40
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    model = random_model("deit3_small_patch16_224", 32, num_classes=1000)
    save_file(model.state_dict(), repo / "snapshots" / revision / "model.safetensors")
    return model


def test_weights_trained_on_other_input_statistics_get_a_note_naming_the_keys(tmp_path):
    """timm's pretrained_cfg (its registry, nothing downloaded) says how a tag's weights were fed:
    timm's augreg ViTs with 0.5 / 0.5, DeiT-III and DINOv2 with ImageNet's statistics (the default)."""
    def note(arch, pretrained, *overrides):
        return normalisation_note(load_config(DEFAULT_RECIPE, [f"model.arch={arch}", f"model.pretrained={pretrained}",
                                                               *overrides]))

    assert note("vit_tiny_patch16_224", "augreg_in21k") == (
        "note: timm vit_tiny_patch16_224.augreg_in21k was trained on inputs normalised with mean [0.5,0.5,0.5], "
        "std [0.5,0.5,0.5], this recipe normalises with data.mean=[0.485,0.456,0.406] data.std=[0.229,0.224,0.225]; "
        "set data.mean=[0.5,0.5,0.5] data.std=[0.5,0.5,0.5] to feed it as it was trained")
    assert note("vit_tiny_patch16_224", "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k").startswith(
        "note: timm vit_tiny_patch16_224.augreg_in21k was trained")
    assert note("vit_tiny_patch16_224", "augreg_in21k", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]") is None
    assert note("deit3_small_patch16_224", "fb_in1k") is None
    assert note("vit_small_patch14_reg4_dinov2", "hf-hub:timm/vit_small_patch14_reg4_dinov2.lvd142m") is None
    checkpoint = tmp_path / "weights.safetensors"  # a file does not say how it was trained: no note
    save_file({"cls_token": torch.zeros(1, 1, 192)}, checkpoint)
    assert note("vit_tiny_patch16_224", checkpoint) is None


def test_hub_references_read_the_cache_offline(hub_cache):
    x = images()
    kwargs = dict(img_size=32, **TINY)
    reference = timm.create_model("deit3_small_patch16_224.fb_in1k", pretrained=True, **kwargs).eval()
    torch.testing.assert_close(reference(x), hub_cache(x), rtol=0, atol=0)  # timm itself reads the same file
    for source in ("hf-hub:timm/deit3_small_patch16_224.fb_in1k", "deit3_small_patch16_224.fb_in1k", "fb_in1k"):
        model = clsvit.create_model("deit3_small_patch16_224", specialize=PAPER_DEFAULT, pretrained=source,
                                    report=None, **kwargs).eval()
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
    twin = timm.create_model("deit3_small_patch16_224_clsvit.fb_in1k", pretrained=True, **kwargs).eval()
    torch.testing.assert_close(twin(x), reference(x), rtol=1e-5, atol=1e-6)  # the retrofit through timm alone

    for source in ("hf-hub:timm/vit_small_patch16_224.augreg_in21k", "augreg_in21k_ft_in1k"):
        with pytest.raises(ValueError) as excinfo:
            clsvit.create_model("vit_small_patch16_224", pretrained=source, report=None, **kwargs)
        assert re.match(r"pretrained: .* is not in the Hugging Face cache \(.*\) and the hub is offline "
                        r"\(HF_HUB_OFFLINE=1\); fetch it once online$", one_line_error(excinfo))
    with pytest.raises(InputError, match="not_a_tag is not a file, a run directory, an hf-hub: reference"):
        read_pretrained("not_a_tag", "deit3_small_patch16_224")


def test_every_timm_vit_has_a_specialized_twin_in_timm_registry():
    bases = timm.list_models(module=["vision_transformer", "deit", "vision_transformer_hybrid"])
    assert set(timm.list_models("*_clsvit")) == {specialized_name(base) for base in bases}
    assert specialized_name("deit3_base_patch16_224.fb_in1k") == "deit3_base_patch16_224_clsvit"
    assert not timm.list_pretrained("*_clsvit")  # no weights of their own: they load a checkpoint
    cfg = timm.models.get_pretrained_cfg("deit3_base_patch16_224_clsvit")
    base = timm.models.get_pretrained_cfg("deit3_base_patch16_224")
    assert (cfg.architecture, cfg.input_size, cfg.mean, cfg.crop_pct) == (
        "deit3_base_patch16_224_clsvit", base.input_size, base.mean, base.crop_pct)

    kwargs = dict(img_size=32, **TINY)
    twin = timm.create_model("deit3_small_patch16_224_clsvit", **kwargs)
    expected = clsvit.create_model("deit3_small_patch16_224", specialize=PAPER_DEFAULT, **kwargs)
    assert twin.state_dict().keys() == expected.state_dict().keys()
    no_layerscale = timm.create_model("vit_tiny_patch16_224_clsvit", **kwargs)  # the paper default less LayerScale
    assert paper_default_for(no_layerscale) == {**PAPER_DEFAULT, "layerscale": 0.0}
    assert {name.rsplit(".", 1)[-1] for name, m in no_layerscale.named_modules() if hasattr(m, "global_copy")} == {
        "norm1", "norm2", "qkv"}
    chosen = timm.create_model("vit_tiny_patch16_224_clsvit", specialize={"mlp": [2]}, **kwargs)
    assert [name for name, m in chosen.named_modules() if hasattr(m, "global_copy")] == ["blocks.2.mlp"]
    for tokens, rows in (("cls", (0, 1)), ("registers", (1, 5)), ([1, 0], (5 + 2, 5 + 3))):  # [CLS], 4 registers, 2x2
        twin = timm.create_model("vit_small_patch14_reg4_dinov2_clsvit", specialize={**PAPER_DEFAULT, "tokens": tokens},
                                 img_size=28, **TINY)
        assert twin.specialized_tokens == tokens
        assert {(m.row_start, m.row_stop) for m in specialized_modules(twin).values()} == {rows}
    with pytest.raises(TypeError):  # timm's contract: unknown arguments raise TypeError
        timm.create_model("deit3_small_patch16_224_clsvit", not_a_model_arg=1)


def test_load_run_and_the_twin_agree_with_the_original_weights(tmp_path):
    """A run's weights loaded through the twin's timm path give the run's logits."""
    model, cfg = make_run(tmp_path / "run", {"norm": 1.0, "layerscale": 1.0, "qkv": "[0]"}, seed=4)
    loaded, _ = load_run(tmp_path / "run")
    twin = timm.create_model("deit3_small_patch16_224_clsvit", pretrained=True, img_size=32, num_classes=10,
                             init_values=1e-4, **TINY, specialize=cfg["model"]["specialize"],
                             pretrained_cfg_overlay=dict(file=str(tmp_path / "run" / "model.safetensors"),
                                                         num_classes=10)).eval()
    x = images()
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(twin(x), model(x))


# --- retrofit recipes ---------------------------------------------------------------------------

RETROFITS = sorted(Path(__file__).resolve().parent.parent.glob("recipes/retrofit/*.yaml"))


def test_retrofit_recipes_pair_the_paper_default_with_an_unspecialized_twin():
    names = {recipe.stem for recipe in RETROFITS}
    assert {"deit3_s_ft", "deit3_b_ft", "deit3_l_ft", "dinov2_s14_reg4_ft"} <= names
    for recipe in RETROFITS:
        model_cfg = load_config(recipe)["model"]
        # timm's copy of the public weights of exactly this architecture
        assert model_cfg["pretrained"].startswith(f"hf-hub:timm/{model_cfg['arch']}."), recipe.name
        spec, stem = model_cfg["specialize"], recipe.stem
        if spec["tokens"] != "global":  # `<twin>_specialized_cls` / `_registers`: the copies for those tokens alone
            assert spec["tokens"] in ("cls", "registers") and stem.endswith(f"_specialized_{spec['tokens']}")
            stem = stem.removesuffix(f"_{spec['tokens']}")
            assert stem in names and model_cfg["reg_tokens"] is None and "_reg" in model_cfg["arch"], recipe.name
        if not stem.endswith("_specialized"):
            assert not is_specialized(spec), recipe.name
            continue
        assert stem.removesuffix("_specialized") in names
        with torch.device("meta"):
            depth = len(timm.create_model(model_cfg["arch"]).blocks)
        for component, value in PAPER_DEFAULT.items():
            assert block_indices(spec[component], depth, component) == block_indices(value, depth, component)
        assert spec["final_norm"] is False and spec["init"] == "clone"


@pytest.mark.slow
def test_a_retrofit_runs_step_0_evaluation_equals_the_checkpoints(tmp_path):
    """train.py with model.pretrained = an official DeiT-III checkpoint and the paper default:
    its evaluation at step 0 (train.max_steps=0) equals eval.py's of the checkpoint itself."""
    from trainer_utils import REPO, read_jsonl, run_train, subprocess_env, write_tiny_recipe

    arch_kwargs = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    source = tmp_path / "deit_3_tiny.pth"
    torch.save(official_deit3(randomize_(timm.create_model(
        "deit3_small_patch16_224", img_size=32, num_classes=10, **arch_kwargs), seed=7)), source)
    env = subprocess_env(tmp_path / "hf_cache")
    recipe = write_tiny_recipe(tmp_path, tmp_path / "runs")  # the specialized shapes recipe, tiny
    model = ["model.arch=deit3_small_patch16_224", f"model.pretrained={source}"]
    result = run_train(recipe, *model, "train.max_steps=0", env=env)
    assert "pretrained" in result.stdout + result.stderr and "global-token copies cloned" in result.stdout + result.stderr
    retrofit = next(event for event in read_jsonl(tmp_path / "runs" / "tiny" / "metrics.jsonl") if "val/top1" in event)

    unspecialized = [f"model.specialize.{c}=0.0" for c in ("norm", "layerscale", "qkv")]
    subprocess.run([sys.executable, str(REPO / "eval.py"), "--weights", str(source), "--arch", "deit3_small_patch16_224",
                    "--config", str(recipe), "--out", str(tmp_path / "checkpoint"), "--tasks", "cls", *unspecialized],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    checkpoint = json.loads((tmp_path / "checkpoint" / "eval.json").read_text())
    assert retrofit["step"] == 0 and retrofit["val/images"] == checkpoint["cls.images"] == 50
    assert (retrofit["val/top1"], retrofit["val/top5"]) == (checkpoint["cls.top1"], checkpoint["cls.top5"])
    assert load_config(tmp_path / "checkpoint" / "config.yaml")["model"]["pretrained"] == str(source)
