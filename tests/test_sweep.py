"""clsvit.sweep: the grid (cells, names, overrides), the dry run, the cells file slurm.sh reads, the
HParams columns every cell shows first, a 2-recipe x 2-seed sweep of the shapes recipes run end to
end, relaunched and compared, and a 2-cell sweep read back from a served TensorBoard."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest

from clsvit.config import ConfigError, load_config
from clsvit.sweep import build_grid, cell_name, hparams_first, main, parse_set, split_values, write_cells_file
from clsvit.tracking import hparams_columns
from tensorboard_server import served_tensorboard
from trainer_utils import REPO, subprocess_env

BASELINE, SPECIALIZED = str(REPO / "recipes/shapes/baseline.yaml"), str(REPO / "recipes/shapes/specialized.yaml")
# the keys in which the two shapes recipes differ (recipes/shapes/specialized.yaml, "differs in")
SHAPES_DIFFER = ["model.specialize.norm", "model.specialize.layerscale", "model.specialize.qkv"]


def tiny(root):
    """Overrides for a sweep of the shapes recipes that trains each cell for 4 steps in seconds."""
    return ["model.timm_kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}", "data.num_workers=0",
            "data.shapes={num_train: 256, num_val: 50, image_size: 32}", "train.global_batch=32",
            "train.batch_per_device=32", "train.max_steps=4", "log.every=2", "log.progress_bar=false",
            "eval.batch_per_device=50", f"run.root={root}"]


def test_value_lists_split_at_top_level_commas_only():
    assert split_values("1e-3,3e-3") == ["1e-3", "3e-3"]
    assert split_values("[0, 1],[0,1,2], 0.5") == ["[0, 1]", "[0,1,2]", "0.5"]
    assert split_values("'a,b',{x: 1, y: 2}") == ["'a,b'", "{x: 1, y: 2}"]
    for bad in ("1,,2", "[0,1", "'a"):
        with pytest.raises(ConfigError, match="v1,v2"):
            split_values(bad)
    with pytest.raises(ConfigError, match="given twice"):
        parse_set(["optim.lr=1,2", "optim.lr=3"])


def test_cell_names_are_readable_and_unambiguous():
    swept = {"optim.lr": ["1e-3"], "model.specialize.qkv": ["[0, 1]"]}
    assert cell_name("shapes_baseline", {"optim.lr": "1e-3", "model.specialize.qkv": "[0, 1]"}, swept, 2) \
        == "shapes_baseline_lr1e-3_qkv0-1_seed2"
    clash = {"optim.lr": ["1"], "eval.seg.lr": ["1"]}  # same last part: the full key names the value
    assert cell_name("r", {"optim.lr": "1", "eval.seg.lr": "2"}, clash, 0) == "r_optim.lr1_eval.seg.lr2_seed0"


def test_grid_is_the_product_with_one_directory_per_cell(tmp_path):
    sweep_dir, cells = build_grid([BASELINE, SPECIALIZED], [0, 1], parse_set(["optim.lr=1e-3,2e-3"]),
                                  [f"run.root={tmp_path}", "train.max_steps=3"], "grid")
    assert sweep_dir == tmp_path / "grid" and len(cells) == 2 * 2 * 2
    assert [c.name for c in cells[:4]] == ["shapes_baseline_lr1e-3_seed0", "shapes_baseline_lr1e-3_seed1",
                                           "shapes_baseline_lr2e-3_seed0", "shapes_baseline_lr2e-3_seed1"]
    assert len({c.run_dir for c in cells}) == 8 and all(c.status == "new" for c in cells)
    cell = cells[-1]
    assert cell.train_args == ["--config", SPECIALIZED, f"run.root={tmp_path}", "train.max_steps=3", "optim.lr=2e-3",
                               "run.seed=1", f"run.root={tmp_path / 'grid'}", "run.name=shapes_specialized_lr2e-3_seed1",
                               f"log.hparams_first={','.join(SHAPES_DIFFER)},optim.lr,run.seed"]
    # without --seeds: the recipe's own seed
    _, cells = build_grid([BASELINE], None, {}, [f"run.root={tmp_path}"], "grid")
    assert [c.name for c in cells] == ["shapes_baseline_seed0"]


def test_bad_grids_fail_in_one_line_before_launching(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        build_grid([BASELINE], [0], parse_set(["optim.lrr=1,2"]), [f"run.root={tmp_path}"], "grid")
    with pytest.raises(ConfigError, match="optim.lr"):  # a value of the wrong type, in one cell only
        build_grid([BASELINE], [0], parse_set(["optim.lr=1e-3,fast"]), [f"run.root={tmp_path}"], "grid")
    with pytest.raises(ConfigError, match="both named 'shapes_baseline_seed0'"):
        build_grid([BASELINE, BASELINE], [0], {}, [f"run.root={tmp_path}"], "grid")
    assert not (tmp_path / "grid").exists()


def test_every_cell_shows_the_swept_keys_and_seed_first_in_tensorboard(tmp_path):
    """Every cell gets the same log.hparams_first: the keys in which the recipes differ, the --set keys,
    run.seed; the HParams layout shows exactly their columns first, few enough here for TensorBoard to
    tick them all (it ticks five)."""
    _, cells = build_grid([BASELINE, SPECIALIZED], [0, 1], parse_set(["optim.lr=1e-3,2e-3"]),
                          [f"run.root={tmp_path}"], "grid")
    expected = f"log.hparams_first={','.join(SHAPES_DIFFER)},optim.lr,run.seed"
    assert len(cells) == 8 and all(cell.overrides[-1] == expected for cell in cells)
    cfg = load_config(cells[-1].recipe, cells[-1].overrides)
    assert [c.name for c in hparams_columns(cfg, depth=4) if c.first] == [
        "01 model.specialize.norm", "02 model.specialize.layerscale", "03 model.specialize.qkv", "15 run.seed",
        "optim.lr"]
    # one recipe: the seed only; a key swept inside a mapping is the mapping's key, a section its keys
    base = load_config(BASELINE)
    assert hparams_first([base], {}) == "run.seed"
    assert hparams_first([base, base], {"model.timm_kwargs.depth": ["2", "4"], "aug.mixup": ["0.8"]}) \
        == "model.timm_kwargs,aug.mixup,run.seed"
    assert hparams_first([base], {"eval.analysis": ["{num_images: 8}"]}) \
        == "eval.analysis.num_images,eval.analysis.pca_images,run.seed"
    # an explicit log.hparams_first among the overrides stands
    _, cells = build_grid([BASELINE, SPECIALIZED], [0], {}, [f"run.root={tmp_path}", "log.hparams_first=optim.lr"],
                          "grid")
    assert {load_config(c.recipe, c.overrides)["log"]["hparams_first"] for c in cells} == {"optim.lr"}


def test_dry_run_prints_cells_and_the_job_array_of_unfinished_cells(tmp_path, capsys):
    args = [BASELINE, SPECIALIZED, "--seeds", "0", "1", "--name", "grid", f"run.root={tmp_path}", "--dry-run"]
    finished = tmp_path / "grid" / "shapes_baseline_seed1"
    finished.mkdir(parents=True)
    (finished / "model.safetensors").touch()
    assert main([*args, "--launcher", "slurm", "--parallel", "2", "--sbatch=--time=1:00:00 --partition=local"]) == 0
    out = capsys.readouterr().out
    assert "4 cells, 1 finished, 3 to run" in out
    assert "shapes_baseline_seed1" in out and "finished" in out
    assert f"{REPO / 'train.py'} --config {SPECIALIZED}" in out and "run.name=shapes_specialized_seed1" in out
    assert "--array=0,2-3%2" in out and "--time=1:00:00" in out and f"{REPO / 'scripts/slurm.sh'} --cells" in out
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["shapes_baseline_seed1"]  # nothing written
    # recipes and overrides may follow the seeds
    assert main(["--name", "grid", "--seeds", "0", "1", BASELINE, f"run.root={tmp_path}", "--dry-run"]) == 0
    assert "2 cells, 1 finished, 1 to run" in capsys.readouterr().out


def test_parallel_cells_get_disjoint_gpu_shares(monkeypatch):
    import torch

    from clsvit.sweep import _gpu_slots, _launch_prefix

    assert _gpu_slots(2) == [[], []] and _launch_prefix([], 0)[0] == [sys.executable]  # this CPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # what an 8-GPU node reports
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert _gpu_slots(4) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    launch, env = _launch_prefix(["2", "3"], 1)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and launch[-3:] == ["--multi_gpu", "--main_process_port", "29501"]
    assert "--num_processes" in launch and launch[launch.index("--num_processes") + 1] == "2"
    with pytest.raises(ConfigError, match="--parallel 9 needs at least 9 GPUs, 8 are visible"):
        _gpu_slots(9)


def test_cells_file_lines_give_slurm_sh_the_exact_arguments(tmp_path):
    _, cells = build_grid([SPECIALIZED], [0], parse_set(["model.specialize.qkv=[0, 1],0.5"]),
                          [f"run.root={tmp_path / 'runs dir'}", "run.name=it's"], "grid")
    path = tmp_path / "cells.sh"
    write_cells_file(path, cells)
    for index, cell in enumerate(cells):  # the way slurm.sh reads its line
        line = path.read_text().splitlines()[index]
        shell = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\n" "$@"', "bash", line],
                               capture_output=True, text=True, check=True)
        assert shell.stdout.splitlines() == [str(cell.log.resolve()), cell.recipe, *cell.overrides]


@pytest.mark.slow
def test_two_recipes_two_seeds_run_relaunch_and_compare(tmp_path):
    env = subprocess_env(tmp_path / "hf_cache")
    sweep = [sys.executable, "-m", "clsvit.sweep", BASELINE, SPECIALIZED, "--seeds", "0", "1", "--name", "grid",
             *tiny(tmp_path)]
    first = subprocess.run(sweep, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    grid = tmp_path / "grid"
    names = ["shapes_baseline_seed0", "shapes_baseline_seed1", "shapes_specialized_seed0", "shapes_specialized_seed1"]
    for name in names:
        assert (grid / name / "model.safetensors").is_file(), (grid / name / "train.log").read_text()[-2000:]
    manifest = json.loads((grid / "sweep.json").read_text())
    assert sorted(manifest["cells"]) == names and manifest["cells"][names[3]]["seed"] == 1
    assert [load_config(grid / n / "config.yaml")["run"]["seed"] for n in names] == [0, 1, 0, 1]

    # an unfinished cell (no final weights) resumes from its checkpoint; finished cells are skipped
    (grid / names[2] / "model.safetensors").unlink()
    second = subprocess.run(sweep, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "4 cells, 3 finished, 1 to run" in second.stdout
    log = (grid / names[2] / "train.log").read_text()
    assert log.count("====") == 2 and "resumed from" in log.split("====")[-1]
    assert (grid / names[0] / "train.log").read_text().count("====") == 1

    # the comparison (top-1 of the final validations): one row per recipe, its two seeds, intervals
    compare = subprocess.run([sys.executable, "eval.py", "--compare", str(grid / "*")], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    with open(grid / "compare.csv") as f:
        rows = {row["recipe"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["shapes_baseline", "shapes_specialized"], rows
    for row in rows.values():
        assert row["n"] == "2" and row["seeds"] == "0 1" and row["top1_lo"] and row["top1_hi"]
    assert rows["shapes_specialized"]["d_top1_n"] == "2" and rows["shapes_specialized"]["d_top1_lo"]


@pytest.mark.slow
def test_tensorboard_of_a_sweep_has_one_run_per_cell_with_the_swept_keys_first(tmp_path):
    """`tensorboard --logdir <sweep dir>` of a 2-cell sweep (the two shapes recipes, one --set value, one
    seed), read back over HTTP: the runs are the cells, the columns shown first (and ticked) are those of
    the keys the cells were swept over and the seed, with each cell's values."""
    env = subprocess_env(tmp_path / "hf_cache")
    sweep = [sys.executable, "-m", "clsvit.sweep", BASELINE, SPECIALIZED, "--seeds", "3", "--set", "optim.lr=2e-3",
             "--name", "grid", "--parallel", "2", *tiny(tmp_path)]
    result = subprocess.run(sweep, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    cells = ["shapes_baseline_lr2e-3_seed3", "shapes_specialized_lr2e-3_seed3"]
    with served_tensorboard(tmp_path / "grid") as tensorboard:
        groups = tensorboard.wait_for(lambda tb: len(tb.session_groups()) == 2 and tb.session_groups())
        assert sorted(tensorboard.get("/data/runs")) == cells and sorted(groups) == cells
        served = [(info["name"], bool(info.get("differs"))) for info in tensorboard.experiment()["hparamInfos"]]
    first = [name for name, differs in served if differs]
    assert [name for name, _ in served[:len(first)]] == first and len(first) <= 5  # all of them ticked
    assert [re.sub(r"^\d\d ", "", name) for name in first] == [*SHAPES_DIFFER, "run.seed", "optim.lr"]
    # norm, layerscale, qkv fractions (recipes/shapes/*.yaml), seed, lr
    for cell, values in zip(cells, ([0.0, 0.0, 0.0, 3, 2e-3], [1.0, 1.0, 1 / 3, 3, 2e-3])):
        assert [groups[cell]["hparams"][name] for name in first] == pytest.approx(values), cell
