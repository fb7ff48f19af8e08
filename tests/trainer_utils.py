"""Helpers for the end-to-end tests: a tiny shapes recipe and train.py run as a subprocess,
exactly as a user runs it (plain python or `accelerate launch`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A ViT small enough to train for a few steps in seconds on 2 CPU cores, on a small shapes dataset.
TINY_RECIPE = """\
base: {repo}/recipes/shapes/specialized.yaml
run:
  name: tiny
  root: {root}
model:
  img_size: 32
  timm_kwargs: {{patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}}
data:
  num_workers: 0
  shapes: {{num_train: 256, num_val: 50, image_size: 32}}
train:
  global_batch: 32
  batch_per_device: 32
  checkpoint_every: 4
  deterministic: true
eval:
  every: 1000
  batch_per_device: 16
log:
  every: 2
  progress_bar: false
"""


def write_tiny_recipe(directory: Path, root: Path, extra: str = "") -> Path:
    path = directory / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(repo=REPO, root=root) + extra)
    return path


def subprocess_env(cache: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_DATASETS_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0")
    return env


def train_command(recipe: Path, *overrides: str, env: dict, processes: int = 1,
                  fault: str | None = None, dynamo_backend: str = "no") -> tuple[list[str], dict]:
    """(command, environment) of train.py, under `accelerate launch` for several processes (with
    `--dynamo_backend`); `fault` runs it through tests/fault_injection.py with that fault."""
    script = [str(REPO / "tests" / "fault_injection.py"), fault, str(REPO / "train.py")] if fault else [str(REPO / "train.py")]
    if processes == 1:
        return [sys.executable, *script, "--config", str(recipe), *overrides], env
    # accelerate 1.15: `--cpu` starts ONE process; several CPU processes (gloo) are torchrun's
    # `--multi_gpu` launcher with ACCELERATE_USE_CPU=1, which the Accelerator reads.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
            "--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend", dynamo_backend,
            "--main_process_port", str(free_port()), *script, "--config", str(recipe), *overrides], \
        {**env, "ACCELERATE_USE_CPU": "1"}


def run_train(recipe: Path, *overrides: str, env: dict, processes: int = 1, check: bool = True,
              timeout: int = 600, fault: str | None = None, dynamo_backend: str = "no") -> subprocess.CompletedProcess:
    """train.py run to its end (see train_command)."""
    command, env = train_command(recipe, *overrides, env=env, processes=processes, fault=fault,
                                 dynamo_backend=dynamo_backend)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
