"""train.py end to end, as a subprocess on a tiny shapes recipe: outputs, learning, resume,
two processes, one-line errors for bad input, one launch per run directory (with eval.py on a
run that is training), and the README's 2-process CPU command as written."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from trainer_utils import REPO, read_jsonl, run_train, subprocess_env, train_command, write_tiny_recipe

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
    assert provenance["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and provenance["cpu"]
    assert provenance["threads"] == 1 and provenance["kernel_env"]["OMP_NUM_THREADS"] == "1"  # subprocess_env's
    data = provenance["data"]  # each split's size and digest (the shapes shards' footers), the classes
    assert {split: entry["rows"] for split, entry in data["splits"].items()} == {"train": 256, "validation": 50}
    assert all(re.fullmatch("[0-9a-f]{64}", entry["digest"]) for entry in data["splits"].values())
    assert data["num_classes"] == 10
    assert (f"data: train 256 images (digest {data['splits']['train']['digest'][:12]}), validation 50 images "
            f"(digest {data['splits']['validation']['digest'][:12]}), 10 classes") in result.stdout + result.stderr
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["num_classes"] == 10  # resolved from the dataset
    assert "val/top1" in result.stdout + result.stderr


def test_final_weights_rebuild_the_model(finished_run):
    from clsvit.checkpoint import load_run

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


def test_compiled_two_processes_all_reduce_once_per_bucket_per_optimizer_step(tmp_path, env):
    """`accelerate launch --dynamo_backend eager` (torch.compile, no code generation), 2 processes,
    accumulation 2: DDP all-reduces each gradient bucket once per optimizer step, on the last
    micro-batch (counted by a comm hook around torch's allreduce_hook), so the set-up's and the
    EMA's unwrapping leaves the compiled model's DDP wrapper in place; the EMA weights are saved
    without wrapper prefixes."""
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    counts = tmp_path / "allreduce"
    counts.mkdir()
    steps = 6
    run_train(recipe, f"train.max_steps={steps}", "train.batch_per_device=8", "train.ema=true",
              env={**env, "CLSVIT_TEST_ALLREDUCE_DIR": str(counts)}, processes=2, fault="none",
              dynamo_backend="eager")
    run_dir = tmp_path / "tiny"
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert (provenance["world_size"], provenance["accum_steps"], provenance["dynamo_backend"]) == (2, 2, "EAGER")
    for rank in (0, 1):
        calls = json.loads((counts / f"rank{rank}.json").read_text())
        buckets = sorted({bucket for _, bucket in calls})
        assert buckets and len(calls) == steps * len(buckets), calls
        for step in range(steps):
            assert sorted(bucket for at, bucket in calls if at == step) == buckets, (step, calls)
    ema_keys, model_keys = (set(load_file(run_dir / name)) for name in ("model_ema.safetensors", "model.safetensors"))
    assert ema_keys == model_keys and not any("_orig_mod" in key or key.startswith("module.") for key in ema_keys)


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_the_step_loop_builds_no_tensor_from_python_data_on_the_device(tmp_path, env, augment_on):
    """From the end of the first optimizer step to the end of the run (steps with EMA, log steps,
    an evaluation in between and at the end; checkpoint writes left out), no tensor is built from
    Python numbers on the accelerator's device and nothing is copied to it without non_blocking:
    each would stall a GPU's host (counted on the CPU, where the device is `cpu`:
    tests/host_transfers.py)."""
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    transfers = tmp_path / "transfers"
    transfers.mkdir()
    run_train(recipe, "train.max_steps=6", "eval.every=3", "train.ema=true", f"data.augment_on={augment_on}",
              env={**env, "CLSVIT_TEST_TRANSFERS_DIR": str(transfers)}, fault="none")
    assert json.loads((transfers / "rank0.json").read_text()) == []


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
    ("model.specialize.tokens=[4,0]", "", "model.specialize.tokens: patch position [4, 0] is outside the 4x4 patch grid"),
    ("model.specialize.tokens=registers", "", "model.specialize.tokens: registers, but the model has no registers"),
    ("model.arch=resnet50", "", "model.arch: 'resnet50'"),
    ("", "train:\n  loss: bce\naug:\n  label_smoothing: 0.1\n",
     "train.loss='bce' with aug.label_smoothing=0.1: BCE binarises its targets"),
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


# ---------------------------------------------------------------- one launch per run directory

def start_paused(recipe, *overrides, env, pause_dir: Path, step: int, processes: int = 1) -> tuple:
    """train.py started in the background that stops itself (SIGSTOP) before optimizer step `step`
    on every process; returns (launch, [pid of rank 0, rank 1, ...]) once all have stopped."""
    pause_dir.mkdir()
    command, env = train_command(recipe, *overrides, env={**env, "CLSVIT_TEST_PAUSE_DIR": str(pause_dir)},
                                 processes=processes, fault=f"pause:{step}")
    launch = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    files = [pause_dir / f"rank{rank}" for rank in range(processes)]
    while not all(f.exists() and f.read_text() for f in files):  # the subprocess timeout catches a hang
        assert launch.poll() is None, launch.communicate()[0][-3000:]
        time.sleep(0.1)
    pids = [int(f.read_text()) for f in files]
    for pid in pids:
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.05)
    return launch, pids


def resume(launch, pids) -> str:
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    output = launch.communicate(timeout=600)[0]
    assert launch.returncode == 0, output[-3000:]
    return output


def files_of(run_dir: Path) -> dict:
    """Every file under the run directory with its size and modification time."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*")}


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def refusal(run_dir: Path, pid: int) -> str:
    owner = json.loads((run_dir / "run.lock").read_text())
    assert owner["pid"] == pid
    return (f"run directory {run_dir} is in use by another launch (host {socket.gethostname()}, pid {pid}, "
            f"since {owner['since']}); one launch trains a run at a time: wait for it to end or stop it "
            f"(lock file {run_dir / 'run.lock'})")


def test_a_second_launch_is_refused_untouched_and_the_first_finishes_as_a_lone_run(tmp_path, env, finished_run):
    """The same command launched twice: the second stops with one line naming the owner, before
    touching anything (metrics.jsonl, config.yaml, checkpoints, TensorBoard); the first ends with
    the weights of the same run launched alone (finished_run)."""
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    run_dir = tmp_path / "tiny"
    overrides = ("train.max_steps=12", "eval.every=6")
    first, (pid,) = start_paused(recipe, *overrides, env=env, pause_dir=tmp_path / "paused", step=6)
    before = files_of(run_dir)
    assert "checkpoints/step_4/COMPLETE" in before and "metrics.jsonl" in before
    second = run_train(recipe, *overrides, env=env, check=False)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines()[-1] == f"train.py: error: {refusal(run_dir, pid)}"
    assert files_of(run_dir) == before
    resume(first, [pid])
    assert_same_weights(run_dir, finished_run[0])
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert [e["step"] for e in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in e] == [2, 4, 6, 8, 10, 12]
    assert (run_dir / "run.lock").read_text() == ""  # a clean exit leaves no owner


def test_two_processes_take_the_lock_once_eval_reads_the_newest_checkpoint_and_a_relaunch_after_sigkill_resumes(
        tmp_path, env):
    """A 2-process (gloo) launch: process 0 holds the run, the other process never competes for
    it (the launch would not reach step 6 otherwise). A second 2-process launch is refused in one
    line, none of its processes touching the directory. eval.py meanwhile evaluates the newest
    complete checkpoint (DDP-wrapped weights) into eval_step_4/, leaving the training's files alone:
    its top-1 is the one the training measured at that step. Then the owner is SIGKILLed: the
    next launch takes the run over and resumes from that checkpoint."""
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    run_dir = tmp_path / "tiny"
    overrides = ("train.max_steps=8", "train.batch_per_device=16", "eval.every=4")
    first, pids = start_paused(recipe, *overrides, env=env, pause_dir=tmp_path / "paused", step=6, processes=2)
    before = files_of(run_dir)
    second = run_train(recipe, *overrides, env=env, processes=2, check=False)
    assert second.returncode != 0
    refused = [line for line in second.stderr.splitlines() if "in use by another launch" in line]
    assert refused == [f"train.py: error (process 0 of 2): {refusal(run_dir, pids[0])}"]
    assert files_of(run_dir) == before

    evaluation = subprocess.run([sys.executable, str(REPO / "eval.py"), "--run", str(run_dir), "--tasks", "cls"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    owner = json.loads((run_dir / "run.lock").read_text())
    assert (f"evaluating {run_dir} is training (host {owner['host']}, pid {pids[0]}, since {owner['since']}): "
            f"its newest complete checkpoint {run_dir / 'checkpoints' / 'step_4'} (step 4)") in evaluation.stdout
    result = json.loads((run_dir / "eval_step_4" / "eval.json").read_text())
    trained = next(e for e in read_jsonl(run_dir / "metrics.jsonl") if e["step"] == 4 and "val/top1" in e)
    assert (result["cls.top1"], result["cls.images"]) == (trained["val/top1"], 50)
    assert {k: v for k, v in files_of(run_dir).items() if not k.startswith("eval_step_4")} == before

    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    first.communicate(timeout=120)
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == pids[0]  # the dead owner's record is left
    relaunch = run_train(recipe, *overrides, env=env, processes=2)
    assert f"resumed from {run_dir / 'checkpoints' / 'step_4'}" in relaunch.stdout + relaunch.stderr
    assert (run_dir / "model.safetensors").is_file() and not (run_dir / "eval.json").exists()
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2  # first launch + relaunch


# ---------------------------------------------------------------- the README's commands

def readme_command(text: str) -> str:
    """The line of a ```bash block of README.md that contains `text`, without its comment."""
    block, found = False, []
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            block = line == "```bash"
        elif block and text in line:
            found.append(line.split(" #", 1)[0].strip())
    assert len(found) == 1, f"README.md documents {len(found)} commands with {text!r}: {found}"
    return found[0]


def training_processes(marker: str) -> list[int]:
    """The training processes of a launch whose environment holds `marker`: they have a RANK,
    their parent (the launcher) has none (DataLoader workers inherit the environment, RANK included)."""
    def environ(pid):
        try:
            return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return []

    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and marker.encode() in environ(entry.name) and any(
                v.startswith(b"RANK=") for v in environ(entry.name)):
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if not any(v.startswith(b"RANK=") for v in environ(parent)):
                found.append(int(entry.name))
    return found


def test_readme_two_cpu_process_command_trains_the_default_recipe(tmp_path):
    """The README's 2-process CPU command, run as written by bash from a directory whose
    train.py is this repository's (so run.root `runs` lands there), trains the default recipe
    (recipes/shapes/specialized.yaml, global batch 128 = 2 x 64): the split is printed, and SIGTERM
    to the two training processes (what SLURM sends) takes the pre-emption path: a checkpoint at
    the next log step and a clean exit of the launch."""
    command = readme_command("ACCELERATE_USE_CPU=1")
    assert "--num_processes 2" in command
    (tmp_path / "train.py").symlink_to(REPO / "train.py")
    marker = f"CLSVIT_TEST_LAUNCH={tmp_path}"
    env = {**subprocess_env(tmp_path / "hf_cache"), "CLSVIT_TEST_LAUNCH": str(tmp_path),
           "HF_HOME": str(tmp_path / "hf_home"),  # no `accelerate config` of this machine applies
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "launch.log"
    with open(log, "w") as out:
        launch = subprocess.Popen(["bash", "-c", command], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        split = "2 process(es) x 64 images x 1 accumulation = 128 images/step"
        while split not in log.read_text():  # the dataset is generated first; the subprocess timeout catches a hang
            assert launch.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        workers = training_processes(marker)
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        launch.wait(timeout=600)
    output = log.read_text()
    assert launch.returncode == 0, output[-3000:]
    run_dir = tmp_path / "runs" / "shapes_specialized"
    stopped = re.search(r"pre-empted \(signal received\): checkpoint saved at step (\d+)", output)
    assert stopped and int(stopped.group(1)) % 20 == 0, output[-3000:]  # at a log step (log.every=20)
    assert (run_dir / "checkpoints" / f"step_{stopped.group(1)}" / "COMPLETE").is_file()
    assert json.loads((run_dir / "provenance.json").read_text())["world_size"] == 2
