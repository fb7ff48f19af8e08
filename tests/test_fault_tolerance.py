"""What a run does when things go wrong: pre-emption signals and non-finite losses (issue #5)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from trainer_utils import REPO, read_jsonl, run_train, subprocess_env, write_tiny_recipe


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
    assert f"resumed from" in relaunch.stdout + relaunch.stderr
    assert (tmp_path / "tiny" / "model.safetensors").is_file()


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
