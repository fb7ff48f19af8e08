"""`python -m clsvit.export`: timm's hub layout, read back by timm itself (`local-dir:`, `hf-hub:`
from an offline Hugging Face cache, plain timm without clsvit for a baseline), and bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import clsvit  # noqa: F401 — registers the specialized twins in timm
from clsvit.errors import InputError
from clsvit.export import main as export_main
from clsvit.checkpoint import load_run
from clsvit.model import count_parameters, create_model, recorded_tokens, specialized_tokens
from model_utils import images, make_run

REPO = Path(__file__).resolve().parent.parent
SPECIALIZED = {"norm": 1.0, "layerscale": 1.0, "qkv": "[0]"}


def exported(tmp_path: Path, specialize: dict, name: str, overrides: tuple[str, ...] = ()) -> tuple[torch.nn.Module, dict, Path]:
    model, cfg = make_run(tmp_path / "runs" / name, specialize, seed=5, overrides=overrides)
    (tmp_path / "runs" / name / "eval.json").write_text(json.dumps({"cls.top1": 61.5, "cls.top5": 90.25,
                                                                    "seg.miou": 12.75, "analysis.x.input": [1.0]}))
    out = export_main([str(tmp_path / "runs" / name), str(tmp_path / "exports" / name)])
    return model, cfg, out


def offline_hub_repo(tmp_path: Path, monkeypatch, repo_id: str, files: Path) -> None:
    """`files` as huggingface_hub caches a downloaded repository snapshot; the hub offline."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "1" * 40
    shutil.copytree(files, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_a_specialized_export_is_rebuilt_by_timm_with_the_runs_logits(tmp_path, monkeypatch):
    model, cfg, out = exported(tmp_path, SPECIALIZED, "vit_s_retrofit")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "eval.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "deit3_small_patch16_224_clsvit" and config["num_classes"] == 10
    assert {k: config["pretrained_cfg"][k] for k in ("input_size", "interpolation", "crop_pct", "mean", "std")} == {
        "input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 1.0,  # the run's eval transform
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert config["model_args"]["specialize"] == {**cfg["model"]["specialize"]}
    assert config["model_args"]["embed_dim"] == 32 and config["model_args"]["init_values"] == 1e-4
    with torch.device("meta"):
        baseline = count_parameters(timm.create_model("deit3_small_patch16_224", img_size=32, num_classes=10,
                                                      embed_dim=32, depth=3, num_heads=2, init_values=1e-4))
    assert config["clsvit"] == {
        "specialization": cfg["model"]["specialize"], "specialization_text": "norm=1 layerscale=1 qkv=[0]",
        "recipe": "vit_s_retrofit", "params": count_parameters(model), "params_unspecialized": baseline,
        "param_overhead_pct": round(100 * (count_parameters(model) / baseline - 1), 2)}
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())

    card = (out / "README.md").read_text()
    recipe = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe) == cfg
    for text in ("library_name: timm", "| top-1 (%) | 61.5 |", "| top-5 (%) | 90.25 |",
                 "| segmentation mIoU (%), linear probe | 12.75 |", "`norm=1 layerscale=1 qkv=[0]`",
                 f"{count_parameters(model):,} (+{config['clsvit']['param_overhead_pct']:.2f} % over the unspecialized "
                 f"{baseline:,})", "import clsvit", 'timm.create_model("hf-hub:USER/vit_s_retrofit", pretrained=True)',
                 "eprint    = {2602.08626}", "eprint    = {2204.07118}"):
        assert text in card, text
    assert json.loads((out / "eval.json").read_text())["cls.top1"] == 61.5

    x = images()
    expected = model(x)
    local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert torch.equal(local(x), expected)
    offline_hub_repo(tmp_path, monkeypatch, "someone/vit_s_retrofit", out)
    hub = timm.create_model("hf-hub:someone/vit_s_retrofit", pretrained=True).eval()
    assert torch.equal(hub(x), expected)
    assert type(hub.blocks[0].attn.qkv).__name__ == "GlobalTokenLinear"


def test_a_patch_control_keeps_its_token_through_run_export_and_timm_and_refuses_other_tokens(tmp_path):
    """The token choice travels with the weights: the run's and the export's model.safetensors record
    it, config.json's model_args rebuild it in timm (`local-dir:`), and weights whose copies are for
    one token are refused, in one line naming both, by a model that gives them to another."""
    model, cfg, out = exported(tmp_path, {**SPECIALIZED, "tokens": "[1, 0]"}, "patch_control")
    run = tmp_path / "runs" / "patch_control"
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["specialize"]["tokens"] == [1, 0] == cfg["model"]["specialize"]["tokens"]
    assert config["clsvit"]["specialization_text"] == "norm=1 layerscale=1 qkv=[0] tokens=[1, 0]"
    assert recorded_tokens(out / "model.safetensors") == [1, 0] == recorded_tokens(run / "model.safetensors")
    assert "One patch token (row 1, column 0 of the patch grid" in (out / "README.md").read_text()
    x = images()
    local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert specialized_tokens(local) == [1, 0] and torch.equal(local(x), model(x))
    loaded, _ = load_run(run)
    assert specialized_tokens(loaded) == [1, 0] and torch.equal(loaded(x), model(x))

    refusal = (r"^model.pretrained: {source} has copies for tokens \[1, 0\], this model for tokens {ours} "
               r"\(model.specialize.tokens\); build it with tokens \[1, 0\], or start from unspecialized weights$")
    for ours in ("global", "[0, 1]"):
        with pytest.raises(InputError, match=refusal.format(source=re.escape(str(run / "model.safetensors")),
                                                           ours=re.escape(ours))):
            load_run(run, [f"model.specialize.tokens={ours}"])
    with pytest.raises(InputError, match=rf"^pretrained: {re.escape(str(out))} has copies for tokens \[1, 0\], this "
                                         r"model for tokens global \(model.specialize.tokens\)"):
        create_model("deit3_small_patch16_224", pretrained=out, specialize={"norm": 1.0, "layerscale": 1.0, "qkv": [0]},
                     img_size=32, embed_dim=32, depth=3, num_heads=2, report=None)
    bare = tmp_path / "bare.safetensors"  # the same tensors, saved by hand: no record, so taken as the paper's
    save_file(load_file(run / "model.safetensors"), bare)
    with pytest.raises(InputError, match=r"^pretrained: .*bare.safetensors has copies for tokens global, this model "
                                         r"for tokens \[1, 0\]"):
        create_model("deit3_small_patch16_224", pretrained=bare, img_size=32, embed_dim=32, depth=3, num_heads=2,
                     specialize={"norm": 1.0, "layerscale": 1.0, "qkv": [0], "tokens": [1, 0]}, report=None)
    # the paper's weights into a patch control: refused the other way round; a baseline's: the copies are cloned
    make_run(tmp_path / "runs" / "specialized", SPECIALIZED, seed=6)
    with pytest.raises(InputError, match=r"has copies for tokens global, this model for tokens \[1, 0\]"):
        load_run(tmp_path / "runs" / "specialized", ["model.specialize.tokens=[1,0]"])
    baseline, _ = make_run(tmp_path / "runs" / "baseline", {}, seed=7)
    retrofit, _ = load_run(tmp_path / "runs" / "baseline", [f"model.specialize.{k}={v}" for k, v in SPECIALIZED.items()]
                           + ["model.specialize.tokens=[1,0]"])
    assert specialized_tokens(retrofit) == [1, 0]
    assert (retrofit(x) - baseline(x)).abs().max() <= 1e-5


@pytest.mark.slow
def test_a_baseline_export_loads_in_plain_timm(tmp_path):
    model, _, out = exported(tmp_path, {}, "vit_s_baseline")
    assert json.loads((out / "config.json").read_text())["architecture"] == "deit3_small_patch16_224"
    assert "import timm  # plain timm: no clsvit needed" in (out / "README.md").read_text()
    x = images()
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, timm, torch\n"
              "torch.set_num_threads(1)\n"  # as the test process: the same summation order, the same bits
              f"model = timm.create_model('local-dir:{out}', pretrained=True).eval()\n"
              "assert not any(name.startswith('clsvit') for name in sys.modules)\n"
              f"torch.save(model(torch.load('{tmp_path / 'x.pt'}')), '{tmp_path / 'y.pt'}')\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""},
                   timeout=300)
    assert torch.equal(torch.load(tmp_path / "y.pt"), model(x))


def test_the_export_carries_the_runs_input_normalisation(tmp_path):
    """A run trained with timm's augreg statistics (data.mean = data.std = 0.5) exports them in its
    pretrained_cfg, which timm's resolve_data_config hands to whoever builds the model's transform."""
    _, _, out = exported(tmp_path, {}, "augreg_stats", overrides=("data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"))
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5] and config["pretrained_cfg"]["std"] == [0.5, 0.5, 0.5]
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert tuple(timm.data.resolve_data_config({}, model=model)["mean"]) == (0.5, 0.5, 0.5)


def test_an_occupied_directory_is_refused_before_anything_is_written(tmp_path):
    make_run(tmp_path / "run", SPECIALIZED, seed=6)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=f"^{taken} exists and is not empty; export into a new directory$"):
        export_main([str(tmp_path / "run"), str(taken)])
    assert [p.name for p in tmp_path.iterdir()] == ["run", "taken"] and (taken / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_push_that_fails_is_one_line_and_leaves_the_export_whole(tmp_path):
    make_run(tmp_path / "run", SPECIALIZED, seed=6)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "clsvit.export", str(tmp_path / "run"), str(tmp_path / "out"),
                             "--push-to-hub", "someone/model"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("clsvit.export: error: --push-to-hub someone/model: OfflineModeIsEnabled: ")
    assert result.stderr.count("\n") == 1 and f"the export in {tmp_path / 'out'} is complete" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]
