"""Tests of eval.py: evaluating a run dir, eval.json / TensorBoard outputs, --compare, bad input."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clsvit.checkpoint import load_run
from clsvit.config import load_config, save_config
from clsvit.data import build_eval_transform, load_splits
from clsvit.data.images import ImageClassDataset
from clsvit.model import build_model, count_parameters

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "model.arch=vit_tiny_patch16_224", "model.img_size=32", "model.num_classes=4",
    "model.timm_kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}",
    "data.source=shapes", "data.num_workers=0", "data.persistent_workers=false", "data.pin_memory=false",
    "data.shapes={num_train: 24, num_val: 10, image_size: 32, num_classes: 4}", "eval.batch_per_device=4",
    "eval.seg.scale=[32, 32]", "eval.seg.crop_size=[32, 32]", "eval.seg.slide_stride=[16, 16]",
    "eval.seg.iterations=4", "eval.seg.batch_size=4", "eval.depth.crop_size=[32, 32]", "eval.depth.iterations=4",
    "eval.depth.batch_size=4", "eval.depth.n_bins=16", "eval.analysis.num_images=6", "eval.analysis.pca_images=2",
]
SPECIALIZED = ["model.specialize.norm=1.0", "model.specialize.layerscale=1.0", "model.specialize.qkv=0.5"]


@pytest.fixture(scope="module", autouse=True)
def shapes_cache(tmp_path_factory):
    """The embedded dataset is generated into a private cache, not the user's HF cache."""
    cache = tmp_path_factory.mktemp("hf_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        yield cache


def make_run(run_dir: Path, overrides=(), seed=0, eval_results=None, speeds=(100.0,)) -> Path:
    """A run directory as train.py writes it, with a tiny untrained model."""
    cfg = load_config(ROOT / "recipes" / "default.yaml", [*TINY, f"run.name={run_dir.name}", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg["model"])
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"))
    (run_dir / "provenance.json").write_text(json.dumps({"params": count_parameters(model), "world_size": 1}))
    lines = [{"step": 10 * (i + 1), "train/loss": 1.0, "train/images_per_s": s} for i, s in enumerate(speeds)]
    lines.append({"step": 10 * len(speeds), "val/top1": 1.0, "val/top5": 2.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if eval_results is not None:
        (run_dir / "eval.json").write_text(json.dumps(eval_results))
    return run_dir


def reference_top1(run_dir: Path) -> float:
    """Top-1 (%) by a plain loop over the validation split, one image at a time."""
    model, cfg = load_run(run_dir)
    _, val, _ = load_splits(cfg["data"])
    dataset = ImageClassDataset(val, build_eval_transform(cfg), num_classes=4)
    with torch.no_grad():
        samples = [dataset[i] for i in range(len(dataset))]  # (iterating would wrap around forever)
        hits = [int(model(image[None]).argmax(1).item() == label) for image, label, _ in samples]
    return 100.0 * sum(hits) / len(hits)


def scalar_tags(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload()
    return {"scalars": {t: events.Scalars(t)[-1] for t in events.Tags()["scalars"]},
            "images": events.Tags()["images"]}


# ----------------------------------------------------------------------------- one run


def test_eval_all_tasks_writes_json_tensorboard_and_pngs(eval_script, tmp_path, capsys):
    run = make_run(tmp_path / "base")
    results = eval_script.main(["--run", str(run)])  # default tasks: eval.tasks = all four
    saved = json.loads((run / "eval.json").read_text())
    for key in ("cls.top1", "cls.top5", "seg.miou", "depth.rmse", "depth.abs_rel", "depth.delta1"):
        assert math.isfinite(saved[key]) and saved[key] == pytest.approx(results[key])
    assert saved["cls.top1"] == pytest.approx(reference_top1(run)) and saved["cls.images"] == 10
    assert 0 <= saved["seg.miou"] <= 100 and 0 <= saved["depth.delta1"] <= 1
    for name in ("cos_cls_patch", "cos_patch_patch", "cls_dominant_dims", "patch_dominant_dims"):
        for site in ("input", "norm1", "pre_norm2", "norm2"):
            assert len(saved[f"analysis.{name}.{site}"]) == 2  # one value per block
    for png in ("analysis_token_statistics.png", "analysis_pca.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    tb = scalar_tags(run)
    assert tb["scalars"]["cls/top1"].value == pytest.approx(saved["cls.top1"])
    assert tb["scalars"]["seg/miou"].step == 10  # the run's last training step
    assert {"depth/rmse", "depth/abs_rel", "depth/delta1"} <= set(tb["scalars"])
    assert "analysis/pca" in tb["images"] and "analysis/token_statistics" in tb["images"]
    out = capsys.readouterr().out
    assert "top-1" in out and "mIoU" in out and "RMSE" in out and len(out.splitlines()) < 25


def test_later_tasks_merge_into_eval_json_and_overrides_apply(eval_script, tmp_path):
    run = make_run(tmp_path / "base", eval_results={"cls.top1": 12.5})
    eval_script.main(["--run", str(run), "--tasks", "seg", "eval.seg.layers=2", "eval.seg.iterations=2"])
    saved = json.loads((run / "eval.json").read_text())
    assert saved["cls.top1"] == 12.5 and "seg.miou" in saved and "depth.rmse" not in saved


def test_specialized_run_evaluates(eval_script, tmp_path):
    run = make_run(tmp_path / "spec", SPECIALIZED)
    results = eval_script.main(["--run", str(run), "--tasks", "cls,analysis"])
    assert results["cls.top1"] == pytest.approx(reference_top1(run))
    assert len(results["analysis.cos_cls_patch.norm1"]) == 2


# ----------------------------------------------------------------------------- comparison


def test_compare_rows_deltas_csv_and_chart(eval_script, tmp_path, capsys):
    runs = tmp_path / "runs"
    base = make_run(runs / "a_base", eval_results={"cls.top1": 80.0, "seg.miou": 40.0, "depth.rmse": 0.50},
                    speeds=(100.0, 300.0, 200.0))
    spec_run = make_run(runs / "b_spec", SPECIALIZED, eval_results={"cls.top1": 81.5, "seg.miou": 42.25,
                                                                    "depth.rmse": 0.45}, speeds=(150.0,))
    result = eval_script.main(["--compare", str(runs / "*")])
    rows = {r["recipe"]: r for r in result["rows"]}
    assert rows["a_base"]["baseline"] and not rows["b_spec"]["baseline"]
    base_params = count_parameters(load_run(base)[0])
    spec_params = count_parameters(load_run(spec_run)[0])
    assert rows["b_spec"]["params"] == spec_params
    assert rows["b_spec"]["params_pct"] == pytest.approx(100 * (spec_params / base_params - 1))
    assert rows["b_spec"]["d_top1"] == pytest.approx(1.5)
    assert rows["b_spec"]["d_miou"] == pytest.approx(2.25)
    assert rows["b_spec"]["d_rmse"] == pytest.approx(-0.05)
    assert rows["a_base"]["images_per_s"] == 200.0  # median of the logged throughput
    assert rows["b_spec"]["specialization"] == "norm=1 layerscale=1 qkv=0.5"
    table = (runs / "compare.md").read_text()
    assert table.strip() == capsys.readouterr().out.split("\n\nwritten")[0].strip()
    lines = table.strip().splitlines()
    assert len(lines) == 4 and "**a_base** (baseline)" in lines[2]
    assert "| +1.50 |" in lines[3] and "| +2.25 |" in lines[3] and "| -0.050 |" in lines[3]
    with open(runs / "compare.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["recipe"] for r in csv_rows] == ["a_base", "b_spec"] and float(csv_rows[1]["d_top1"]) == 1.5
    assert (runs / "compare.png").read_bytes()[:4] == b"\x89PNG"

    # an explicit --baseline wins; a run without eval.json shows training's final top-1 and dashes, not zeros
    other = make_run(tmp_path / "elsewhere" / "c_new", ["model.specialize.norm=1.0"])
    result = eval_script.main(["--compare", str(base), str(spec_run), str(other), "--baseline", str(spec_run),
                               "--out", str(tmp_path / "cmp")])
    rows = {r["recipe"]: r for r in result["rows"]}
    assert rows["b_spec"]["baseline"] and rows["a_base"]["d_top1"] == pytest.approx(-1.5)
    assert rows["c_new"]["top1"] == 1.0 and rows["c_new"]["miou"] is None  # metrics.jsonl's last val/top1
    assert "| – |" in (tmp_path / "cmp" / "compare.md").read_text()


# ----------------------------------------------------------------------------- bad input


def _cli(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_run_without_weights_is_a_one_line_error(tmp_path):
    run = make_run(tmp_path / "base")
    (run / "model.safetensors").unlink()
    proc = _cli("--run", str(run))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"eval.py: error: no model weights at {run / 'model.safetensors'}"]


def test_unknown_task_and_bad_compare_are_errors(eval_script, tmp_path):
    run = make_run(tmp_path / "base")
    with pytest.raises(ValueError, match=r"^unknown task 'segm'; choose from cls, seg, depth, analysis$"):
        eval_script.main(["--run", str(run), "--tasks", "cls,segm"])
    with pytest.raises(ValueError, match="no run directories match"):
        eval_script.main(["--compare", str(tmp_path / "nothing*")])
    with pytest.raises(ValueError, match="not a run directory"):
        eval_script.main(["--compare", str(tmp_path)])
    with pytest.raises(ValueError, match="'eval.depth.source' must be one of"):
        eval_script.main(["--run", str(run), "--tasks", "depth", "eval.depth.source=nowhere"])


def test_seg_on_dataset_without_masks_is_an_error(eval_script, tmp_path):
    folder = tmp_path / "no_masks"
    folder.mkdir()
    rgb = np.zeros((8, 8, 3), np.uint8)
    for split in ("train", "validation"):
        datasets.Dataset.from_dict({"image": [Image.fromarray(rgb)] * 2, "label": [0, 1]},
                                   features=datasets.Features(image=datasets.Image(), label=datasets.Value("int64"))
                                   ).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    run = make_run(tmp_path / "base")
    with pytest.raises(ValueError, match=r"^eval.seg.mask_column 'mask' is not a column of parquet dataset .* "
                                         r"split 'train' \(columns: image, label\)$"):
        eval_script.main(["--run", str(run), "--tasks", "seg", "eval.seg.source=parquet", f"eval.seg.path={folder}"])


# ----------------------------------------------------------------------------- two processes


@pytest.mark.slow  # launches eval.py on two processes
def test_two_processes_give_the_single_process_numbers(eval_script, tmp_path, shapes_cache):
    """Uneven shards (10 validation images, batches of 4, 2 processes) must not change any number; the
    segmentation probe draws fresh views every step and has dropout (DINOv3's protocol)."""
    online = ["eval.seg.protocol=dinov3_linear", "eval.seg.cache_features=false"]
    single = make_run(tmp_path / "single", online)
    double = make_run(tmp_path / "double", online)
    eval_script.main(["--run", str(single)])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "ACCELERATE_USE_CPU": "true", "HF_DATASETS_CACHE": str(shapes_cache)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(ROOT / "eval.py"), "--run", str(double)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((run / "eval.json").read_text()) for run in (single, double))
    assert set(one) == set(two) and one["cls.images"] == two["cls.images"] == 10
    for key, value in one.items():
        if isinstance(value, (dict, str)):  # <task>.settings, <task>.protocol
            assert two[key] == value, key
        else:
            assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
