"""train.py end to end, as a subprocess on a tiny shapes recipe: outputs, learning, resume,
two processes, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from trainer_utils import read_jsonl, run_train, subprocess_env, write_tiny_recipe

pytestmark = pytest.mark.slow  # train.py as a subprocess, end to end


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, env):
    """One 12-step run shared by the output checks."""
    root = tmp_path_factory.mktemp("runs")
    recipe = write_tiny_recipe(root, root)
    result = run_train(recipe, "train.max_steps=12", "eval.every=6", env=env)
    return root / "tiny", result


def test_run_directory_has_every_output(finished_run):
    run_dir, result = finished_run
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "provenance.json"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_12", "step_8"]  # keep 2
    assert (run_dir / "checkpoints" / "step_12" / "COMPLETE").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))  # one TensorBoard run per run directory
    events = read_jsonl(run_dir / "metrics.jsonl")
    assert all("step" in e for e in events)
    train_events = [e for e in events if "train/loss" in e]
    assert [e["step"] for e in train_events] == [2, 4, 6, 8, 10, 12]
    for key in ("train/lr", "train/grad_norm", "train/images_per_s", "train/data_wait", "train/epoch"):
        assert all(key in e for e in train_events), key
    evals = [e for e in events if "val/top1" in e]
    assert [e["step"] for e in evals] == [6, 12] and all(e["val/images"] == 50 for e in evals)
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["world_size"] == 1 and provenance["params"] > provenance["params_baseline"] > 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["num_classes"] == 10  # resolved from the dataset
    assert "val/top1" in result.stdout + result.stderr


def test_final_weights_rebuild_the_model(finished_run):
    from clsvit.model import load_run

    run_dir, _ = finished_run
    model, cfg = load_run(run_dir)
    state = load_file(run_dir / "model.safetensors")
    assert any(".global_copy." in k for k in state)  # the tiny recipe is the specialized shapes recipe
    assert cfg["run"]["name"] == "tiny" and model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_tensorboard_has_scalars_and_hparams(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = finished_run
    events = EventAccumulator(str(run_dir)).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/top1", "val/top5"} <= set(tags)
    assert [s.step for s in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    plugins = events.PluginTagToContent("hparams") if "hparams" in events.Tags().get("plugins", []) else {}
    assert plugins or any("hparams" in t for t in events.summary_metadata), "no HParams summary written"


def test_loss_decreases_on_a_learnable_task(tmp_path, env):
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    # 64 images without augmentation, 20 passes: a tiny ViT must at least fit them
    run_train(recipe, "train.max_steps=40", "log.every=5", "optim.lr=3e-3", "schedule.warmup_epochs=0",
              "data.shapes.num_train=64", "aug.crop_scale=[1.0,1.0]", "aug.hflip=0.0", "aug.color_jitter=0.0",
              env=env)
    losses = [e["train/loss"] for e in read_jsonl(tmp_path / "tiny" / "metrics.jsonl") if "train/loss" in e]
    assert losses[-1] < 0.85 * losses[0], losses


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, env):
    """Stop after 6 of 14 steps (mid-epoch: 8 steps per epoch), relaunch the same command: the final
    weights equal an uninterrupted run's exactly (data order, augmentation, RNG, optimizer, schedule)."""
    straight = write_tiny_recipe(tmp_path, tmp_path / "straight")
    run_train(straight, "train.max_steps=14", env=env)
    resumed = write_tiny_recipe(tmp_path, tmp_path / "resumed")
    run_train(resumed, "train.max_steps=6", env=env)
    second = run_train(resumed, "train.max_steps=14", env=env)
    assert "resumed from" in second.stdout + second.stderr
    a = load_file(tmp_path / "straight" / "tiny" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "tiny" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [e["step"] for e in read_jsonl(tmp_path / "resumed" / "tiny" / "metrics.jsonl") if "train/loss" in e]
    assert steps == sorted(set(steps))  # no duplicated events from the first attempt


def test_resume_refuses_changed_schedule(tmp_path, env):
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    run_train(recipe, "train.max_steps=2", env=env)
    result = run_train(recipe, "train.max_steps=4", "optim.lr=1e-2", env=env, check=False)
    assert result.returncode == 2
    assert "optim.lr" in result.stderr and "train.resume=false" in result.stderr
    run_train(recipe, "train.max_steps=4", "optim.lr=1e-2", "train.resume=false", env=env)
    moved = list((tmp_path / "tiny").glob("checkpoints.replaced-*/step_2/COMPLETE"))
    assert len(moved) == 1  # starting fresh keeps the earlier checkpoints, out of the way


def test_two_processes_match_one_process_eval(tmp_path, env):
    """`accelerate launch --num_processes 2 --cpu` (gloo), with gradient accumulation: trains, and
    its eval on an uneven split (50 images, 2 x 16 per batch) equals a one-process eval of the
    same weights."""
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    run_train(recipe, "train.max_steps=4", "train.batch_per_device=8", env=env, processes=2)
    run_dir = tmp_path / "tiny"
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["world_size"] == 2 and provenance["accum_steps"] == 2
    two = [e for e in read_jsonl(run_dir / "metrics.jsonl") if "val/top1" in e][-1]
    assert two["val/images"] == 50
    # the same weights evaluated by one process (a fresh run dir that only evaluates: max_steps=0)
    one_dir = tmp_path / "one"
    one_recipe = write_tiny_recipe(tmp_path, one_dir, extra="")
    run_train(one_recipe, "train.max_steps=0", f"model.pretrained={run_dir}", env=env)
    one = [e for e in read_jsonl(one_dir / "tiny" / "metrics.jsonl") if "val/top1" in e][-1]
    assert (one["val/top1"], one["val/top5"], one["val/images"]) == (two["val/top1"], two["val/top5"], 50)


@pytest.mark.parametrize("override, recipe_text, message", [
    ("optim.lrr=1", "", "unknown key 'optim.lrr' in override 'optim.lrr=1'; did you mean 'optim.lr'?"),
    ("", "train:\n  max_steps: 3\n  max_steps: 4\n", "duplicate key 'max_steps' in {recipe} line 4"),
    ("train.max_steps=many", "", "'train.max_steps' must be int, got 'many'"),
    ("", "train:\n  global_batch: 31\naug:\n  mixup: 0.8\n", "train.global_batch=31 on 1 process(es) with "
     "train.batch_per_device=32: no equal even micro-batch of at most 32 images divides the 31 images per process "
     "(Mixup/CutMix need an even micro-batch)"),
    ("", "base: {tmp}/missing.yaml\n", "recipe not found: {tmp}/missing.yaml (named as base by {recipe})"),
    ("model.specialize.qkv=1.5", "", "'model.specialize.qkv' must be a fraction in [0, 1]"),
    ("model.specialize.norm=[0,7]", "", "model.specialize.norm: block index 7 is not in [0, 1] (depth 2)"),
    ("model.arch=resnet50", "", "model.arch: 'resnet50'"),
    ("data.source=imagefolder", "", "data.path '/nonexistent/imagenet' does not exist"),
    ("data.label_column=nope", "", "data.label_column 'nope' not in split 'train'"),
])
def test_bad_input_is_one_line_before_heavy_work(tmp_path, override, recipe_text, message):
    """Recipe errors stop in one line naming the key and value; those that need no data stop before
    the dataset is even generated (a fresh cache stays empty)."""
    env = subprocess_env(tmp_path / "fresh_cache")
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    if recipe_text:
        recipe = tmp_path / "child.yaml"
        base = "" if recipe_text.startswith("base:") else f"base: {tmp_path / 'tiny.yaml'}\n"
        recipe.write_text(base + recipe_text.format(tmp=tmp_path))
    extra = ["data.path=/nonexistent/imagenet"] if "imagefolder" in override else []
    result = run_train(recipe, *filter(None, [override]), *extra, env=env, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    expected = message.format(tmp=tmp_path, recipe=recipe)
    assert lines[-1].startswith("train.py: error:") and expected in lines[-1], result.stderr[-2000:]
    needs_data = "label_column" in override
    assert needs_data or not (tmp_path / "fresh_cache").exists(), override
    assert "Traceback" not in result.stderr
