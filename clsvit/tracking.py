"""What a run writes about itself: metrics.jsonl, TensorBoard events, provenance.

`metrics.jsonl` holds one JSON object per log or eval event, always with `step`, flushed as written
(`tail -f` works). Only the main process writes.

TensorBoard. The event files lie at the top of the run directory, so `tensorboard --logdir <run.root>`
shows one TensorBoard run per run directory, named after it (a sweep's root: one run per cell). What it
shows, and the rules that keep it right:

- Scalars: the metrics.jsonl keys as tags (`train/loss`, `val/top1`, ...), each at the optimizer step
  it describes; the final validation at the final step. A tag is never written at a step lower than
  one already written: TensorBoard's data server drops every point of a tag at or after a step that
  arrives again (tensorboard/data/server/reservoir.rs, "Preemption"), so one value logged at step 0
  after training erases the curve. `RunLog.log` refuses such a write. A resume appends a new event
  file: the killed attempt's points past the checkpoint are superseded as the steps come again
  (`purge_step` does the same for TensorBoard's Python loader, `--load_fast=false`); the points up to
  the checkpoint stay. A launch that starts from step 0 moves earlier event files and metrics.jsonl
  into `logs.replaced-<time>/` (a TensorBoard run of its own), since TensorBoard keeps the first
  HParams summary of a run.
- HParams (`hparams_columns`, `METRICS`): one session per run, grouped under the run name, written when
  the run starts (so a run in progress is in the table, its metrics the latest values) and marked
  finished at the end. TensorBoard keeps the first summary of each tag's metadata
  (tensorboard/data/server/run.rs, `RunLoaderData::read_event`): a resume shows the recipe of the
  launch that started the run. TensorBoard takes the experiment definition (columns, metrics, which
  are shown first) from one run of the logdir (backend_context.py, `_find_experiment_tag`); every run
  writes the same one, up to `log.hparams_first`, and the column names do not depend on it.
- eval.py's results (`write_eval_events`): an event file of its own in the run directory, never the
  training's; probe metrics and figures at the run's last training step, the token analysis per block.
- A custom-scalars layout (`CUSTOM_SCALARS`): top-1, training loss, mIoU and depth RMSE of every run on
  one page, and the token analysis by block.

Other trackers: `log.trackers` names them. `tensorboard` is written here; every other name (wandb,
mlflow, aim, comet_ml, ...) is one of accelerate's trackers, started with `Accelerator(log_with=...)` and
fed through `accelerator.init_trackers` / `accelerator.log`: the flattened recipe as its config, the same
metrics at the same steps. Project (experiment) = the name of `run.root` (a sweep's name), run = run.name.

provenance(): where a result came from (code version, libraries, hardware, parallelism).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import accelerate
import datasets
import timm
import torch
from accelerate.tracking import get_available_trackers

from clsvit.config import DEFAULT_RECIPE, NULLABLE_TYPES, ConfigError, load_config, recipe_leaves
from clsvit.model import COMPONENTS, block_indices, describe_tokens
from clsvit.ranges import index_ranges

# TensorBoard's modules are imported inside the functions that write events, for start-up time: they
# add 0.1-0.2 s to every program that imports this one (eval.py --compare, a run without TensorBoard).

METRICS_FILE = "metrics.jsonl"
REPLACED_PREFIX = "logs.replaced-"


@dataclass(frozen=True)
class Metric:
    tag: str  # the scalar tag; its latest value is the HParams cell
    display: str
    description: str


# HParams metric columns, in order. TensorBoard ticks the first five when the tab opens
# (tensorboard/plugins/hparams/tf_hparams_query_pane/tf-hparams-query-pane.ts, _computeMetrics).
# A run eval.py has not probed yet has no seg/depth value: the cell is empty; the header names eval.py.
# Counters (val/images, val/undecodable, model/params, ...) are scalars only.
METRICS = (
    Metric("val/top1", "top-1 %", "validation top-1 (train.py), latest evaluation"),
    Metric("val/top5", "top-5 %", "validation top-5 (train.py), latest evaluation"),
    Metric("seg/miou", "mIoU % (eval.py)", "linear segmentation mIoU; empty until eval.py --tasks seg"),
    Metric("depth/rmse", "RMSE m (eval.py)", "linear depth RMSE; empty until eval.py --tasks depth"),
    Metric("depth/delta1", "δ1 (eval.py)", "depth delta < 1.25 (fraction); empty until eval.py --tasks depth"),
    Metric("train/median_images_per_s", "images/s", "median training throughput over the run (global)"),
    Metric("model/param_overhead_pct", "params +%", "parameters added by specialization, % of the baseline"),
    Metric("cls/top1", "top-1 % (eval.py)", "eval.py --tasks cls top-1"),
    Metric("cls/top5", "top-5 % (eval.py)", "eval.py --tasks cls top-5"),
    Metric("depth/abs_rel", "abs rel (eval.py)", "depth absolute relative error"),
    Metric("depth/sq_rel", "sq rel (eval.py)", "depth squared relative error"),
    Metric("depth/rmse_log", "RMSE log (eval.py)", "depth RMSE of log depth"),
    Metric("depth/log10", "log10 (eval.py)", "depth mean |log10 error|"),
    Metric("depth/delta2", "δ2 (eval.py)", "depth delta < 1.25^2 (fraction)"),
    Metric("depth/delta3", "δ3 (eval.py)", "depth delta < 1.25^3 (fraction)"),
    Metric("val_ema/top1", "EMA top-1 %", "validation top-1 of the EMA weights (train.ema)"),
    Metric("val_ema/top5", "EMA top-5 %", "validation top-5 of the EMA weights (train.ema)"),
    Metric("train/loss", "train loss", "training loss of the last log window"),
)

# One page for an ablation: every run's curve in each chart (tag regexes; the custom_scalars plugin
# merges the layouts of all runs by category title).
CUSTOM_SCALARS = {
    "ablation at a glance": {
        "val/top1": ["Multiline", [r"^val/top1$"]],
        "train/loss": ["Multiline", [r"^train/loss$"]],
        "seg/miou (eval.py)": ["Multiline", [r"^seg/miou$"]],
        "depth/rmse (eval.py)": ["Multiline", [r"^depth/rmse$"]],
    },
    "token analysis (step = block index)": {
        "[CLS]-patch cosine: block input, after norm1": ["Multiline", [r"^analysis/cos_cls_patch/(input|norm1)$"]],
        "patch-patch cosine: block input, after norm1": ["Multiline", [r"^analysis/cos_patch_patch/(input|norm1)$"]],
        "[CLS]-dominant channels: block input, after norm1": ["Multiline",
                                                              [r"^analysis/cls_dominant_dims/(input|norm1)$"]],
    },
}


# ============================================================================ HParams columns
#
# TensorBoard orders hparam columns by (`differs` first, then name) (tensorboard/plugins/hparams/
# backend_context.py, _sort_and_reduce_to_hparams_limit) and ticks the first five (tf-hparams-query-pane.ts,
# _computeHParams). So the comparison columns carry their position in their name ("03 model.specialize.qkv";
# the headers show the display name, "specialized qkv"), the rest of the recipe keeps its keys
# ("optim.lr"), and `differs` marks the columns shown first: `log.hparams_first` (recipe keys, e.g. a
# sweep's swept keys), or by default the five specialization fractions.


@dataclass(frozen=True)
class HParamColumn:
    name: str  # the key in TensorBoard's session hparams (its HTTP API, the download)
    display: str  # the column header
    value: bool | float | str  # float NaN: no value (a null number); TensorBoard shows an empty cell
    first: bool  # shown first when the tab opens (flagged `differs` for TensorBoard)
    description: str = ""


IDENTITY_KEYS = ("model.arch", "run.name", "run.seed", "train.global_batch", "schedule.epochs")


def hparams_columns(cfg: Mapping[str, Any], depth: int) -> list[HParamColumn]:
    """A run's HParams columns in the order TensorBoard shows them:

      `differs` group (ticked first): the columns of `log.hparams_first` (of a model.specialize key:
             its fraction), by default the five fractions
      01-05  model.specialize.<component>         fraction of the `depth` blocks (a list: its length / depth)
      06     model.specialize.tokens              who gets the copies, as text: "global", "cls", "registers", "[7, 7]"
      07     model.specialize.final_norm          bool
      08-12  model.specialize.<component> blocks  the block indices as text: "0-3", "0,2,5", "none"
      13-17  model.arch, run.name, run.seed, train.global_batch, schedule.epochs
      then   every other recipe key, by name (its type from recipes/default.yaml; null numbers empty)
    """
    specialize = cfg["model"]["specialize"]
    compare: list[tuple[str, str, Any, str]] = []  # (recipe key, display, value, description)
    blocks = {c: block_indices(specialize[c], depth, f"model.specialize.{c}") for c in COMPONENTS}
    for c in COMPONENTS:
        value = specialize[c]
        fraction = len(blocks[c]) / depth if isinstance(value, list) else float(value)
        compare.append((f"model.specialize.{c}", f"specialized {c}", fraction,
                        f"model.specialize.{c} as a fraction of the {depth} blocks"))
    compare.append(("model.specialize.tokens", "specialized tokens", describe_tokens(specialize["tokens"]),
                    "the tokens that get the copies: global ([CLS] + registers), cls, registers or a patch [row, col]"))
    compare.append(("model.specialize.final_norm", "specialized final_norm", bool(specialize["final_norm"]),
                    "the final norm has a global-token copy"))
    for c in COMPONENTS:
        compare.append((f"model.specialize.{c} blocks", f"specialized {c} blocks", index_ranges(blocks[c]) or "none",
                        f"the blocks model.specialize.{c} selects"))
    leaves = dict(recipe_leaves(cfg))
    for key in IDENTITY_KEYS:
        compare.append((key, key, _hparam_value(key, leaves[key]), ""))

    first_keys = hparams_first_keys(cfg)
    columns = []
    for rank, (key, display, value, description) in enumerate(compare, start=1):
        # a specialization key is shown first by its fraction; its block list follows among the next
        # columns (TensorBoard ticks five: one column per key leaves room for a sweep's keys and seed)
        first = key in first_keys if first_keys else rank <= len(COMPONENTS)
        columns.append(HParamColumn(f"{rank:02d} {key}", display, value, first, description))
    shown = {key.removesuffix(" blocks") for key, *_ in compare}
    for key, value in recipe_leaves(cfg):
        if key not in shown:
            columns.append(HParamColumn(key, key, _hparam_value(key, value), key in first_keys))
    return sorted(columns, key=lambda column: (not column.first, column.name))


def hparams_first_keys(cfg: Mapping[str, Any]) -> list[str]:
    """The recipe keys of `log.hparams_first` (comma-separated); an unknown key is a ConfigError."""
    keys = [key.strip() for key in cfg["log"]["hparams_first"].split(",") if key.strip()]
    known = {key for key, _ in recipe_leaves(cfg)}
    for key in keys:
        if key not in known:
            raise ConfigError(f"log.hparams_first: {key!r} is not a recipe key")
    return keys


@lru_cache(maxsize=1)
def _column_kinds() -> dict[str, str]:
    """"number", "bool" or "text" for every recipe key, from the type recipes/default.yaml gives it
    (config.NULLABLE_TYPES for keys that may be null)."""
    kinds = {}
    for key, default in recipe_leaves(load_config(DEFAULT_RECIPE)):
        kind = NULLABLE_TYPES.get(key, type(default))
        kinds[key] = ("number" if kind in (int, float) else
                      "bool" if kind is bool and key not in NULLABLE_TYPES else "text")
    return kinds


def _hparam_value(key: str, value: Any) -> bool | float | str:
    """One type per column in every run, since TensorBoard's filters compare the values of a column:
    a number (null: NaN, shown as an empty cell), a bool, or text."""
    kind = _column_kinds().get(key, "text")
    if kind == "number":
        return math.nan if value is None else float(value)
    if kind == "bool":
        return bool(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def _hparams_summaries(columns: list[HParamColumn], group: str):
    """The experiment definition and the session start, as TensorBoard summaries."""
    from tensorboard.plugins.hparams import api_pb2, summary_v2  # start-up time (see the imports)

    infos = []
    for column in columns:
        kind = (api_pb2.DATA_TYPE_BOOL if isinstance(column.value, bool) else
                api_pb2.DATA_TYPE_FLOAT64 if isinstance(column.value, float) else api_pb2.DATA_TYPE_STRING)
        info = api_pb2.HParamInfo(name=column.name, display_name=column.display, description=column.description,
                                  type=kind, differs=column.first)
        if kind == api_pb2.DATA_TYPE_BOOL:
            info.domain_discrete.extend([False, True])
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m.tag), display_name=m.display,
                                  description=m.description) for m in METRICS]
    experiment = _plugin_summary("experiment", api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics))
    start = summary_v2.hparams_pb({column.name: column.value for column in columns}, trial_id=group)
    return experiment, start


def _plugin_summary(field: str, message):
    """A summary holding one field of the HParams plugin data (experiment / session_end_info)."""
    from tensorboard.compat.proto.summary_pb2 import Summary  # start-up time (see the imports)
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2  # start-up time (see the imports)

    tag = {"experiment": metadata.EXPERIMENT_TAG, "session_end_info": metadata.SESSION_END_INFO_TAG}[field]
    data = plugin_data_pb2.HParamsPluginData(**{field: message})
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data),
                                        tensor=metadata.NULL_TENSOR)])


# ============================================================================ the training run's log

# accelerate's tracker names -> the package that provides each (what to pip install)
TRACKER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "aim": "aim", "comet_ml": "comet-ml", "clearml": "clearml",
                    "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def parse_trackers(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def accelerate_trackers(text: str) -> list[str]:
    """The trackers of `log.trackers` that accelerate starts (all but tensorboard), each checked:
    an unknown name or a package that is not installed is a one-line ConfigError."""
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
        self.last_step: dict[str, int] = {}
        self.accelerator = accelerator if accelerator is not None and accelerator.log_with else None
        if not enabled:
            return
        self.run_dir, self.resume_step = Path(run_dir), resume_step
        if self.accelerator is not None:  # the other trackers: one run each, named after the run directory
            self.accelerator.init_trackers(self.run_dir.parent.name, config=dict(config or {}), init_kwargs={
                "wandb": {"name": self.run_dir.name, "dir": str(self.run_dir)},
                "mlflow": {"run_name": self.run_dir.name}, "swanlab": {"experiment_name": self.run_dir.name}})
        self.path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            _drop_events_after(self.path, resume_step)  # events of the killed attempt past the checkpoint
        else:
            _move_earlier_attempt_aside(self.run_dir)
        self.file = open(self.path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # start-up time (see the imports)
            self.writer = SummaryWriter(str(self.run_dir),
                                        purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One log or eval event: a metrics.jsonl line and the TensorBoard scalars."""
        if not self.enabled:
            return
        self._add_scalars(step, metrics)
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def start_session(self, cfg: Mapping[str, Any], *, depth: int, params: int, param_overhead_pct: float) -> None:
        """The run's HParams session (its columns: `hparams_columns`), the custom-scalars layout, and,
        on a fresh start, the scalars `model/params` and `model/param_overhead_pct` at step 0."""
        if not self.enabled or self.writer is None:
            return
        if self.resume_step is None:
            self._add_scalars(0, {"model/params": params, "model/param_overhead_pct": param_overhead_pct})
        for summary in _hparams_summaries(hparams_columns(cfg, depth), group=cfg["run"]["name"]):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_custom_scalars(CUSTOM_SCALARS)
        self.writer.flush()

    def end_session(self, step: int) -> None:
        """After the final evaluation: the median training throughput of the run (metrics.jsonl, all
        launches) as `train/median_images_per_s` at the final step, and the HParams session marked finished."""
        if not self.enabled or self.writer is None:
            return
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2  # start-up time (see the imports)

        speeds = [line["train/images_per_s"] for line in read_metrics(self.run_dir) if "train/images_per_s" in line]
        if speeds:
            self._add_scalars(step, {"train/median_images_per_s": statistics.median(speeds)})
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
        self.writer.file_writer.add_summary(_plugin_summary("session_end_info", end))
        self.writer.flush()

    def _add_scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key in metrics:
            if step < self.last_step.get(key, step):
                raise ValueError(f"RunLog: {key} at step {step} after step {self.last_step[key]}; "
                                 f"TensorBoard would drop the later points")
        self.last_step.update(dict.fromkeys(metrics, step))
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

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


def _move_earlier_attempt_aside(run_dir: Path) -> None:
    """A launch from step 0 into a run directory with events of an earlier attempt (train.resume=false,
    or killed before its first checkpoint): their metrics.jsonl and event files go to
    `logs.replaced-<time>/`, nothing is deleted."""
    earlier = [*run_dir.glob("events.out.tfevents.*"), *run_dir.glob(METRICS_FILE)]
    if not earlier:
        return
    aside = run_dir / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir(exist_ok=True)
    for path in earlier:
        path.rename(aside / path.name)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ============================================================================ eval.py's results


def write_eval_events(run_dir: Path, results: Mapping[str, Any], figures: Mapping[str, Any],
                      images: Mapping[str, Any], step: int | None = None) -> None:
    """eval.py's results in the run's TensorBoard, in a new event file (never the training's own):
    numbers at `step` (default: the run's last training step, 0 without metrics.jsonl), tags = eval.json keys with the
    first "." as "/" (cls.top1 -> cls/top1, counters such as cls/images too); the token analysis as
    `analysis/<statistic>/<site>` with the block index as the step, so runs overlay block by block;
    figures and images (HWC uint8) at the last step."""
    from torch.utils.tensorboard import SummaryWriter  # start-up time (see the imports)

    if step is None:
        step = max((line["step"] for line in read_metrics(run_dir)), default=0)
    with SummaryWriter(str(run_dir)) as writer:
        for key, value in results.items():
            if key.startswith("analysis.") and isinstance(value, list):
                for block, number in enumerate(value):
                    writer.add_scalar(key.replace(".", "/"), number, block)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key.replace(".", "/", 1), value, step)
        for tag, figure in figures.items():
            writer.add_figure(tag, figure, step)  # closes the figure
        for tag, image in images.items():
            writer.add_image(tag, image, step, dataformats="HWC")


# ============================================================================ provenance


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform.processor()` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The environment variables that choose torch's CPU kernels and thread count (docs/reproducibility.md).
KERNEL_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY",
              "ONEDNN_MAX_CPU_ISA")


def hardware() -> dict:
    """The machine a number came from: the CPU model, the instruction set torch's CPU kernels
    dispatch to (`torch.backends.cpu.get_cpu_capability()`: CPU results are bit-identical per
    capability only), the logical cores, torch's threads and the kernel settings of the environment
    (`KERNEL_ENV`: what a CPU result's bits depend on), and the GPUs' name and count."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "kernel_env": {name: os.environ[name] for name in KERNEL_ENV if name in os.environ},
            "gpu": torch.cuda.get_device_name(0) if gpus else None, "gpu_count": gpus}


def provenance(accelerator, **extra: Any) -> dict:
    """Where a result came from: code version, libraries, hardware (:func:`hardware`), parallelism."""
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
        **hardware(),
        **extra,
    }

