"""What a run writes about itself: metrics.jsonl, TensorBoard events, HParams, provenance.

`metrics.jsonl` holds one JSON object per log or eval event, always with `step`, flushed as written
(`tail -f` works). TensorBoard scalars use the same keys as tags (`train/loss`, `val/top1`, ...).
The HParams summary is written into the run's own event file with the flattened recipe and the
final metrics — accelerate's `init_trackers(config=...)` would reject nested values and put the
HParams into a separate run without the metrics. Only the main process writes.

`log.trackers` names the trackers: `tensorboard` is written here; every other name (wandb, mlflow,
aim, comet_ml, ...) is one of accelerate's trackers, started with `Accelerator(log_with=...)` and fed
through `accelerator.init_trackers` / `accelerator.log`: the flattened recipe as its config, the same
metrics at the same steps. Project (experiment) = the name of `run.root` (a sweep's name), run = run.name.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.jsonl"
# accelerate's tracker names -> the package that provides each (what to pip install)
TRACKER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "aim": "aim", "comet_ml": "comet-ml", "clearml": "clearml",
                    "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
# scalars eval.py writes into a run's TensorBoard (its eval.json keys with the first "." as "/")
EVAL_METRICS = ("cls/top1", "cls/top5", "seg/miou", "depth/rmse", "depth/abs_rel", "depth/delta1")


def parse_trackers(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def accelerate_trackers(text: str) -> list[str]:
    """The trackers of `log.trackers` that accelerate starts (all but tensorboard), each checked:
    an unknown name or a package that is not installed is a one-line ConfigError."""
    from accelerate.tracking import get_available_trackers

    from clsvit.config import ConfigError

    names = [name for name in parse_trackers(text) if name != "tensorboard"]
    available = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ConfigError(f"log.trackers: unknown tracker {name!r}; choose from tensorboard, "
                              f"{', '.join(TRACKER_PACKAGES)}")
        if name not in available:
            raise ConfigError(f"log.trackers: {name} is not installed: pip install {TRACKER_PACKAGES[name]}")
    return names


class RunLog:
    """Main-process writer of metrics.jsonl, TensorBoard and accelerate's trackers; a no-op on other processes."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int | None,
                 accelerator=None, config: Mapping[str, Any] | None = None):
        self.enabled = enabled
        self.writer = None
        self.accelerator = accelerator if accelerator is not None and accelerator.log_with else None
        if not enabled:
            return
        if self.accelerator is not None:  # the other trackers: one run each, named after the run directory
            self.accelerator.init_trackers(run_dir.parent.name, config=dict(config or {}), init_kwargs={
                "wandb": {"name": run_dir.name, "dir": str(run_dir)}, "mlflow": {"run_name": run_dir.name},
                "swanlab": {"experiment_name": run_dir.name}})
        self.path = run_dir / METRICS_FILE
        if resume_step is not None:
            _drop_events_after(self.path, resume_step)  # events of the killed attempt past the checkpoint
        elif self.path.exists():
            self.path.unlink()
        self.file = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR),
                                        purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def hparams(self, flat_config: Mapping[str, Any], final_metrics: Mapping[str, float]) -> None:
        """One HParams entry per run: the flattened recipe and its final metrics, in the run's own
        event file so TensorBoard's HParams tab lines ablations up against their curves. The
        metrics eval.py adds later (EVAL_METRICS, same tags) are declared now, so they join the table."""
        if not self.enabled or self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        declared = {**{tag: float("nan") for tag in EVAL_METRICS}, **final_metrics}
        for summary in hparams(dict(flat_config), declared):
            self.writer.file_writer.add_summary(summary)
        for key, value in final_metrics.items():
            self.writer.add_scalar(key, value)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _drop_events_after(path: Path, step: int) -> None:
    """Keep the events up to the checkpoint's step; a line torn by a kill mid-write is dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def provenance(accelerator, **extra: Any) -> dict:
    """Where a result came from: code version, libraries, hardware, parallelism."""
    import accelerate
    import datasets
    import timm

    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain")
    device = accelerator.device
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "command": " ".join(sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or device.type,
        "device_type": device.type,
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        **extra,
    }
