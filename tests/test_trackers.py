"""log.trackers: TensorBoard by default, accelerate's trackers by name; MLflow read back from its
local file store after a train.py run."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from clsvit.config import ConfigError
from clsvit.tracking import accelerate_trackers, provenance
from trainer_utils import read_jsonl, run_train, subprocess_env, write_tiny_recipe

ABSENT = next((name for name, module in (("comet_ml", "comet_ml"), ("swanlab", "swanlab"), ("aim", "aim"))
               if importlib.util.find_spec(module) is None), None)


def test_tensorboard_is_written_by_the_run_log_and_the_rest_by_accelerate():
    assert accelerate_trackers("tensorboard") == []
    assert accelerate_trackers("tensorboard, mlflow") == ["mlflow"]
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; choose from tensorboard, wandb, mlflow"):
        accelerate_trackers("tensorbord")


@pytest.mark.skipif(ABSENT is None, reason="every probed tracker package is installed")
def test_a_missing_tracker_package_is_one_line_naming_what_to_install(tmp_path):
    package = {"comet_ml": "comet-ml"}.get(ABSENT, ABSENT)
    with pytest.raises(ConfigError, match=f"log.trackers: {ABSENT} is not installed: pip install {package}$"):
        accelerate_trackers(f"tensorboard,{ABSENT}")
    env = subprocess_env(tmp_path / "hf_cache")  # train.py stops before any data work
    result = run_train(write_tiny_recipe(tmp_path, tmp_path), f"log.trackers=tensorboard,{ABSENT}", env=env, check=False)
    assert result.returncode == 2 and not (tmp_path / "hf_cache").exists()
    assert result.stderr.strip().splitlines()[-1] == \
        f"train.py: error: log.trackers: {ABSENT} is not installed: pip install {package}"


@pytest.mark.slow
def test_mlflow_gets_the_recipe_and_the_metrics_at_their_steps(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow's local file store, read back below
    store = f"file:{tmp_path / 'mlruns'}"
    env = {**subprocess_env(tmp_path / "hf_cache"), "MLFLOW_TRACKING_URI": store, "MLFLOW_ALLOW_FILE_STORE": "true"}
    root = tmp_path / "grid"
    run_train(write_tiny_recipe(tmp_path, root), "train.max_steps=4", "log.trackers=tensorboard,mlflow", env=env)
    run_dir = root / "tiny"
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("grid").experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model.specialize.qkv"] == "0.3333333333333333"
    events = read_jsonl(run_dir / "metrics.jsonl")
    for key in ("train/loss", "val/top1"):
        logged = [(e["step"], e[key]) for e in events if key in e]
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert logged and [step for step, _ in sorted(history)] == [step for step, _ in logged], key
        assert [value for _, value in sorted(history)] == pytest.approx([value for _, value in logged]), key
    assert list(run_dir.glob("events.out.tfevents.*"))  # TensorBoard stays on


def test_provenance_names_the_hardware():
    """The CPU model as the kernel reports it, torch's CPU kernel capability (results are
    bit-identical per capability), and the GPUs (none here)."""
    accelerator = Accelerator(cpu=True)
    found = provenance(accelerator)
    model_names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name")]
    assert found["cpu"] == model_names[0] and found["cpu_count"] == os.cpu_count()
    assert found["cpu_capability"] == torch.backends.cpu.get_cpu_capability() != ""
    assert (found["gpu"], found["gpu_count"]) == (None, torch.cuda.device_count())
    json.dumps(found)  # written to provenance.json as it is
