"""What a run does when things go wrong: pre-emption signals, non-finite losses, SIGKILL at
any point, a checkpoint that cannot be written, a failing process, broken files in the dataset.
Faults are injected from outside train.py (tests/fault_injection.py), never by hooks in its code."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainer_utils import REPO, free_port, read_jsonl, run_train, subprocess_env, write_tiny_recipe

pytestmark = pytest.mark.slow  # train.py as a subprocess, end to end


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(tmp_path_factory.mktemp("hf_cache"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_checkpoints_and_the_relaunch_continues(tmp_path, env, signum):
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(recipe),
                                "train.max_steps=400", "train.checkpoint_every=1000"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and read_jsonl(metrics)):
        time.sleep(0.2)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    assert "pre-empted" in out + err
    saved = sorted((tmp_path / "tiny" / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").is_file()
    stopped_at = int(saved[0].name.split("_")[1])
    assert 0 < stopped_at < 400 and stopped_at % 2 == 0  # at a log step (log.every=2)
    assert not (tmp_path / "tiny" / "model.safetensors").exists()  # not finished: no final export
    relaunch = run_train(recipe, f"train.max_steps={stopped_at + 4}", env=env)
    assert "resumed from" in relaunch.stdout + relaunch.stderr
    assert (tmp_path / "tiny" / "model.safetensors").is_file()


def test_a_second_sigterm_stops_at_once(tmp_path, env):
    """A launcher tearing a job down (torchrun after another process failed) sends SIGTERM, then
    waits: the first signal asks for a checkpoint at the next log step, a second one ends the process."""
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    pause_dir = tmp_path / "paused"
    pause_dir.mkdir()
    # the run stops itself before its 3rd optimizer step: in the step loop, its signal handlers installed
    process = launch(recipe, "train.max_steps=100000", "log.every=50000", "eval.every=100000",
                     env={**env, "CLSVIT_TEST_PAUSE_DIR": str(pause_dir)}, fault="pause:3")
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not (pause_dir / "rank0").exists():
        time.sleep(0.05)
    assert (pause_dir / "rank0").exists(), process.communicate()[0][-3000:]
    process.send_signal(signal.SIGTERM)  # pending while the process is stopped
    process.send_signal(signal.SIGCONT)
    time.sleep(1.0)
    assert process.poll() is None  # the first signal waits for the next log step
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGTERM
    assert not metrics.exists() or not read_jsonl(metrics)


def test_non_finite_loss_stops_with_the_step_range(tmp_path, env):
    """AdamW with lr 1e30 blows the weights up after the first update: the loss turns non-finite."""
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    result = run_train(recipe, "train.max_steps=20", "optim.lr=1e30", "schedule.warmup_epochs=0",
                       env=env, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: non-finite loss between steps 1 and 2"), last
    assert not (tmp_path / "tiny" / "model.safetensors").exists()


def test_skip_nonfinite_tolerates_then_stops(tmp_path, env):
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    result = run_train(recipe, "train.max_steps=20", "optim.lr=1e30", "schedule.warmup_epochs=0",
                       "train.skip_nonfinite=2", env=env, check=False)
    assert result.returncode == 2
    assert (result.stdout + result.stderr).count("update skipped") == 2
    assert "more than train.skip_nonfinite=2" in result.stderr.strip().splitlines()[-1]


def test_nonfinite_loss_on_one_process_is_skipped_by_every_process(tmp_path, env):
    """A NaN loss on process 1 only (its 3rd step): both processes skip that update together, the
    run finishes, and both hold the same finite weights (a process that stepped alone would apply
    the all-reduced NaN gradients, and the processes' collectives would part)."""
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    result = run_train(recipe, "train.max_steps=6", "train.skip_nonfinite=2", "log.every=1",
                       "train.batch_per_device=16", env={**env, "CLSVIT_TEST_WEIGHTS_DIR": str(weights_dir)},
                       processes=2, fault="nan-loss:3@1")
    assert (result.stdout + result.stderr).count("update skipped on every process (1/2)") == 1
    steps = [e["step"] for e in read_jsonl(tmp_path / "tiny" / "metrics.jsonl") if "train/loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6]  # 7 micro-batches per process, 6 updates
    rank0, rank1 = (torch.load(weights_dir / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.isfinite(rank0[key]).all(), key
        assert torch.equal(rank0[key], rank1[key]), key


# ---------------------------------------------------------------- killed at any point

def launch(recipe, *overrides, env, fault=None):
    """train.py as a child process (with a fault injected from outside when asked)."""
    prefix = [str(REPO / "tests" / "fault_injection.py"), fault] if fault else []
    return subprocess.Popen([sys.executable, *prefix, str(REPO / "train.py"), "--config", str(recipe), *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_step(metrics, since: float) -> int:
    """The last step in metrics.jsonl once the relaunched run has rewritten it (after `since`)."""
    try:
        if metrics.stat().st_mtime < since:
            return 0
        return max((event["step"] for event in read_jsonl(metrics)), default=0)
    except (FileNotFoundError, ValueError):  # not written yet, or a line being written
        return 0


def complete_steps(run_dir) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")
                  if (p / "COMPLETE").is_file())


def weights(path) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


def test_sigkill_at_random_points_loses_nothing(tmp_path, env):
    """SIGKILL at random steps and once in the middle of a checkpoint write; each relaunch resumes
    from the newest complete checkpoint and the final weights equal an uninterrupted run's."""
    overrides = ["train.max_steps=48", "train.checkpoint_every=3", "train.keep_checkpoints=2", "eval.every=10"]
    reference_recipe = write_tiny_recipe(tmp_path, tmp_path / "reference")
    run_train(reference_recipe, *overrides, env=env)
    reference = weights(tmp_path / "reference" / "tiny" / "model.safetensors")

    recipe = write_tiny_recipe(tmp_path, tmp_path / "killed")
    run_dir = tmp_path / "killed" / "tiny"
    env = {**env, "PYTHONUNBUFFERED": "1"}  # what was printed before a SIGKILL is not lost in a buffer
    rng = random.Random(5)
    kill_at = sorted(rng.sample(range(2, 46), 3))
    history = []
    for attempt, target in enumerate([*kill_at, "in-save", None]):
        before = complete_steps(run_dir)
        fault = "kill-in-save:1" if target == "in-save" else None
        started = time.time()
        process = launch(recipe, *overrides, env=env, fault=fault)
        if isinstance(target, int):
            while process.poll() is None and logged_step(run_dir / "metrics.jsonl", started) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
            process.kill()  # nothing to kill when the run has finished meanwhile
        output = process.communicate(timeout=300)[0]
        history.append((target, before, process.returncode))
        if before:  # a complete checkpoint existed: the relaunch must have resumed from the newest one
            assert f"resumed from {run_dir / 'checkpoints' / f'step_{before[-1]}'} " in output, output[-3000:]
        assert "train.py: error" not in output and "Traceback" not in output, output[-3000:]
        finished = process.returncode == 0
        if target is None or (isinstance(target, int) and finished):  # a run faster than the kill: it is done
            assert finished, output[-3000:]
        else:
            assert process.returncode == -signal.SIGKILL, (history, output[-3000:])
        # whatever was killed, every visible checkpoint is complete, its recipe included
        assert all((p / "COMPLETE").is_file() and (p / "config.yaml").is_file()
                   for p in (run_dir / "checkpoints").glob("step_*")), history
        if finished:
            break
    in_save = [before for target, before, _ in history if target == "in-save"]
    assert all(in_save), "the kill inside a checkpoint write must come after a complete checkpoint"
    final = weights(run_dir / "model.safetensors")
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[key], reference[key]) for key in reference), history
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [] and complete_steps(run_dir) == [45, 48]


# ---------------------------------------------------------------- a checkpoint that cannot be written

@pytest.mark.parametrize("processes", [1, 2])
def test_failed_checkpoint_write_stops_every_process_and_keeps_the_previous(tmp_path, env, processes):
    """The second checkpoint write fails with ENOSPC (on process 1 only, when there are two)."""
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    run_dir = tmp_path / "tiny"
    fault = "disk-full:2" if processes == 1 else "disk-full:2@1"
    # no process waits forever for the one that failed: a hang ends in TimeoutExpired
    result = run_train(recipe, "train.max_steps=20", f"train.batch_per_device={32 // processes}",
                       env=env, processes=processes, check=False, fault=fault, timeout=180)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error")]
    assert len(errors) == processes, result.stderr[-3000:]
    for line in errors:
        assert "the checkpoint for step 8 could not be written" in line and "No space left on device" in line
        assert f"{run_dir / 'checkpoints' / 'step_4'} is intact" in line
    assert complete_steps(run_dir) == [4]
    assert not any(p.name.startswith(".") for p in (run_dir / "checkpoints").iterdir())
    assert not (run_dir / "model.safetensors").exists()
    relaunch = run_train(recipe, "train.max_steps=20", f"train.batch_per_device={32 // processes}",
                         env=env, processes=processes)
    assert "resumed from" in relaunch.stdout + relaunch.stderr and (run_dir / "model.safetensors").is_file()


def test_one_failing_process_stops_the_other(tmp_path, env):
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    result = run_train(recipe, "train.max_steps=50", "train.batch_per_device=16", env=env, processes=2,
                       check=False, fault="raise:3@1", timeout=180)  # a hang ends in TimeoutExpired
    assert result.returncode != 0
    assert "RuntimeError: injected failure at optimizer step 3 on process 1" in result.stderr
    assert "closing signal" in result.stderr or "Connection closed" in result.stderr
    assert not (tmp_path / "tiny" / "model.safetensors").exists()


# ---------------------------------------------------------------- broken files in the dataset

def write_imagefolder(root, broken: bool = True):
    """train/{a,b,c}/ with 16 good images each (PNG and JPEG, RGB), the odd-but-valid files a real
    dataset has (CMYK, palette, greyscale, 16-bit PNG), and, when `broken`, undecodable files."""
    import numpy as np
    from PIL import Image

    from test_data import broken_images

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 16), ("val", 4)):
        for label, name in enumerate("abc"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                array = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                array[..., label] += 190  # a learnable colour cue
                Image.fromarray(array).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    odd = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    odd.convert("CMYK").save(root / "train" / "a" / "cmyk.jpg")
    odd.convert("P").save(root / "train" / "b" / "palette.png")
    odd.convert("L").save(root / "train" / "c" / "grey.png")
    Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 30).astype(np.uint16)).save(root / "train" / "c" / "deep16.png")
    if broken:
        for (name, data), folder in zip(broken_images().items(), "abca"):
            name = name.replace(".txt", ".jpg")  # imagefolder picks files by extension
            (root / "train" / folder / name).write_bytes(data)
    return root


def test_broken_files_are_skipped_counted_and_named(tmp_path, env):
    data = write_imagefolder(tmp_path / "data")
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    common = ["data.source=imagefolder", f"data.path={data}", "data.num_workers=2", "train.max_steps=8",
              "log.every=1"]
    result = run_train(recipe, *common, "data.max_bad_fraction=0.1", env=env)
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if "undecodable image(s) in steps" in line]
    assert warnings, output[-3000:]
    named = " ".join(warnings)
    for name in ("truncated.jpg", "empty.jpg", "notes.jpg", "bomb.png"):
        assert name in named or "..." in named, named  # at most three names per line
    events = read_jsonl(tmp_path / "tiny" / "metrics.jsonl")
    assert max(e.get("data/undecodable", 0) for e in events) == 4  # each file once, whatever the epochs
    assert not any(name in named for name in ("cmyk", "palette", "grey", "deep16"))  # odd modes decode

    strict = run_train(recipe, *common, "data.max_bad_fraction=0.01", "train.resume=false", env=env, check=False)
    assert strict.returncode == 2
    assert re.match(r"train\.py: error: \d+ of 56 images cannot be decoded, more than "
                    r"data\.max_bad_fraction=0\.01 allows; first: \S+\.(jpg|png) \(row \d+\)",
                    strict.stderr.strip().splitlines()[-1]), strict.stderr[-2000:]


def test_label_out_of_range_is_an_error_naming_the_file(tmp_path, env):
    data = write_imagefolder(tmp_path / "data", broken=False)
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    result = run_train(recipe, "data.source=imagefolder", f"data.path={data}", "data.num_workers=2",
                       "model.num_classes=2", "train.max_steps=8", env=env, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(rf"train\.py: error: sample {data}/train/c/\S+ \(row \d+\): label 2 is outside \[0, 2\)", last), last


# ---------------------------------------------------------------- every process the same data

def test_processes_that_see_different_trees_stop_in_one_line(tmp_path, env):
    """Each of 2 processes has its own tree at data.path and its own datasets cache, as nodes with
    local copies do; process 1's tree is one image longer: the launch stops before any step, one
    line naming both processes and what each loaded, on train.py and on eval.py."""
    import timm
    from PIL import Image

    for node, extra in ((0, 0), (1, 1)):
        for split, per_class in (("train", 4), ("val", 2)):
            for name in "abc":
                folder = tmp_path / "nodes" / f"node{node}" / "imagenet" / split / name
                folder.mkdir(parents=True)
                for i in range(per_class + (extra if (split, name) == ("train", "b") else 0)):
                    Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    data = ["data.source=imagefolder", "data.path=/proc/self/cwd/imagenet"]  # each process: its own node's
    nodes = {**env, "CLSVIT_TEST_NODES": str(tmp_path / "nodes"), "HF_DATASETS_CACHE": "/proc/self/cwd/hf_cache"}
    trained = run_train(recipe, *data, "train.max_steps=4", env=nodes, processes=2, check=False,
                        fault="node-local:0", timeout=300)
    weights = tmp_path / "tiny.pth"
    torch.save(timm.create_model("deit3_small_patch16_224", img_size=32, num_classes=3, patch_size=8, depth=2,
                                 embed_dim=32, num_heads=2).state_dict(), weights)
    evaluated = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1", "--num_processes",
         "2", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(REPO / "tests" / "fault_injection.py"), "node-local:0", str(REPO / "eval.py"), "--weights", str(weights),
         "--arch", "deit3_small_patch16_224", "--config", str(recipe), "--out", str(tmp_path / "evaluated"),
         "--tasks", "cls", *data, *(f"model.specialize.{c}=0.0" for c in ("norm", "layerscale", "qkv"))],
        cwd=REPO, env={**nodes, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=300)
    expected = re.compile(
        r"(train|eval)\.py: error \(process 0 of 2\): the processes loaded different data from data\.source="
        r"imagefolder data\.path='/proc/self/cwd/imagenet': process 0: train 12 images \(digest \w{12}\), "
        r"validation 6 images \(digest \w{12}\), 3 classes; process 1: train 13 images \(digest \w{12}\), "
        r"validation 6 images \(digest \w{12}\), 3 classes; every process must see the same files \(.*\)")
    for result in (trained, evaluated):
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if "loaded different data" in line]
        assert len(lines) == 1 and expected.fullmatch(lines[0]), result.stderr[-3000:]
        assert "Traceback" not in result.stderr.split("loaded different data")[0], result.stderr[-3000:]
    assert not list((tmp_path / "tiny").glob("checkpoints/step_*")) and not (tmp_path / "evaluated" / "eval.json").exists()
