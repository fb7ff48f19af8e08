"""scripts/slurm.sh and `clsvit.sweep --launcher slurm` under a real SLURM: a one-node cluster of
Debian's slurm-wlm on this machine (scripts/slurm_local_cluster.sh), CPU processes.

    bash scripts/slurm_local_cluster.sh install      # once, as root (apt-get)
    python -m pytest -m slurm                        # starts the daemons if none answer, stops them after

Cases: a job submitted from a directory outside the repository; a time limit whose warning signal
(SIGUSR1) makes train.py checkpoint, the job requeue itself and resume, ending with the weights of an
uninterrupted run; a 2-cell job array from the sweep launcher.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer_utils import REPO, subprocess_env, write_tiny_recipe

pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("sbatch") is None,
                                 reason="SLURM is not installed (sbatch not found): "
                                        "bash scripts/slurm_local_cluster.sh install")]
CLUSTER = ["bash", str(REPO / "scripts" / "slurm_local_cluster.sh")]


def _answers() -> bool:
    return subprocess.run(["sinfo", "--noheader"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def cluster():
    """A responding cluster: the one already running, or this machine's one-node cluster, started
    here and stopped at the end."""
    started = False
    if not _answers():
        result = subprocess.run([*CLUSTER, "start"], capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            pytest.fail(f"could not start the local SLURM cluster:\n{result.stdout}\n{result.stderr}")
        started = True
    yield
    if started:
        subprocess.run([*CLUSTER, "stop"], capture_output=True, timeout=120)


@pytest.fixture
def job_env(tmp_path):
    """What a user exports before sbatch: the venv first on PATH, CPU processes (gloo), no GPUs."""
    env = subprocess_env(tmp_path / "hf_cache")
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", ACCELERATE_USE_CPU="1",
               PROCESSES_PER_NODE="1", MIXED_PRECISION="no", PYTHONUNBUFFERED="1")
    env.pop("CLSVIT_REPO", None)
    return env


CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1"]


def sbatch(args: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(["sbatch", "--parsable", *CPU_JOB, *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_fields(job: str) -> list[dict]:
    """scontrol's view of a job (every task of an array), or [] once SLURM forgot it."""
    result = subprocess.run(["scontrol", "--oneliner", "show", "job", job], capture_output=True, text=True)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in result.stdout.splitlines() if line.strip()]


def wait_for(job: str, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = job_fields(job)
        if tasks and all(t["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                           "OUT_OF_MEMORY") for t in tasks):
            return tasks
        time.sleep(2)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout} s: {job_fields(job)}")


def test_a_job_submitted_outside_the_repository_trains_in_its_submit_directory(cluster, job_env, tmp_path):
    submit_dir = tmp_path / "experiments"
    submit_dir.mkdir()
    write_tiny_recipe(submit_dir, Path("runs"))  # relative run.root: relative to the submit directory
    job = sbatch([str(REPO / "scripts" / "slurm.sh"), "tiny.yaml", "train.max_steps=4"], submit_dir, job_env)
    [task] = wait_for(job, 300)
    log = (submit_dir / f"slurm-{job}.out").read_text()
    assert task["JobState"] == "COMPLETED", log[-3000:]
    assert (submit_dir / "runs" / "tiny" / "model.safetensors").is_file(), log[-3000:]
    assert not (REPO / "runs" / "tiny").exists()


def test_time_limit_checkpoints_requeues_and_resumes_to_the_uninterrupted_weights(cluster, job_env, tmp_path):
    """--time=2 with the warning 30 s before the limit: SLURM signals 60-90 s after the start (it checks
    every 30 s) while train.py is in its 1500 steps. A fast machine would finish them first, so the job's
    processes sleep 0.08 s before each optimizer step (a sitecustomize hook, the training code untouched):
    the run lasts over 2 minutes on any machine. Once the job is requeued the test raises its time limit,
    so that a slow machine needs one resume, not a chain of them."""
    steps = ["train.max_steps=1500", "schedule.epochs=190", "train.checkpoint_every=2000", "log.every=10"]
    recipe = write_tiny_recipe(tmp_path, tmp_path / "runs")
    hook = tmp_path / "slow_steps"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time\n"
        "from torch.optim.optimizer import register_optimizer_step_pre_hook\n"
        "register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: time.sleep(0.08))\n")
    slow_env = {**job_env, "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), job_env.get("PYTHONPATH")]))}
    job = sbatch(["--time=2", "--signal=B:USR1@30", str(REPO / "scripts" / "slurm.sh"), str(recipe), *steps],
                 tmp_path, slow_env)
    reference = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(recipe), *steps,
                                  "run.name=uninterrupted"], cwd=REPO, env=job_env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    deadline, raised = time.monotonic() + 900, False
    while time.monotonic() < deadline:
        [task] = job_fields(job)
        if not raised and int(task["Restarts"]) >= 1:
            subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True)
            raised = True
        if task["JobState"] not in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING"):
            break
        time.sleep(2)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert task["JobState"] == "COMPLETED" and int(task["Restarts"]) == 1, (task, log[-3000:])
    assert "time-limit warning" in log and "pre-empted (signal received): checkpoint saved" in log
    assert re.search(r"resumed from \S+step_\d+", log), log[-3000:]
    interrupted = load_file(tmp_path / "runs" / "tiny" / "model.safetensors")
    uninterrupted = load_file(tmp_path / "runs" / "uninterrupted" / "model.safetensors")
    assert interrupted.keys() == uninterrupted.keys()
    assert all(torch.equal(interrupted[k], uninterrupted[k]) for k in interrupted)


def test_sweep_submits_one_job_array_with_a_log_per_cell(cluster, job_env, tmp_path):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "runs")
    result = subprocess.run([sys.executable, "-m", "clsvit.sweep", str(recipe), "--seeds", "0", "1", "--name", "grid",
                             "--launcher", "slurm", f"--sbatch={' '.join(CPU_JOB)}", "train.max_steps=4"],
                            cwd=REPO, env=job_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    job = re.search(r"submitted job array (\d+)", result.stdout).group(1)
    tasks = wait_for(job, 300)
    grid = tmp_path / "runs" / "grid"
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"]
    for seed in (0, 1):
        cell = grid / f"tiny_seed{seed}"
        log = (cell / "train.log").read_text()
        assert (cell / "model.safetensors").is_file(), log[-3000:]
        assert f"job {job}_{seed}" in log and "step 4: val/top1" in log
    assert all(t["JobState"] == "COMPLETED" for t in tasks)
    # relaunching submits nothing: both cells are finished
    again = subprocess.run([sys.executable, "-m", "clsvit.sweep", str(recipe), "--seeds", "0", "1", "--name", "grid",
                            "--launcher", "slurm", "train.max_steps=4"], cwd=REPO, env=job_env, capture_output=True,
                           text=True, timeout=120)
    assert "2 cells, 2 finished, 0 to run" in again.stdout and "submitted" not in again.stdout
