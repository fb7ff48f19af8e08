"""Runs side by side, seeds grouped: mean, spread and a 95 % interval per metric, paired
differences to the baseline group.

    python eval.py --compare 'runs/shapes/*' [--baseline runs/shapes/shapes_baseline_seed0] [--out DIR]

A run's values come from its config.yaml (recipe name, specialization, seed), provenance.json
(parameter count), eval.json (top-1, mIoU, RMSE: written by eval.py) and metrics.jsonl (median
training images/s; the top-1 of train.py's final validation when eval.json has none). Runs whose recipes differ only in the seed (and in keys that do not change what
is learned: run.*, log.*, data loading, checkpointing) form one group. Per group and metric: mean,
sample standard deviation, n and a 95 % percentile-bootstrap interval of the mean. The baseline group
is the one holding `--baseline`, else the unspecialized one; every other group gets the paired
difference to it (per seed both have, other minus baseline) with the bootstrap interval of the mean
difference, marked "n.r." (not resolved) when that interval contains 0. Writes compare.md (the printed
markdown table), compare.csv (one row per group, every number) and compare.png (one panel per metric,
group means with their intervals as error bars and each seed as a dot).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import statistics
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from clsvit.config import flatten, load_config
from clsvit.errors import InputError
from clsvit.model import build_model, count_parameters, describe_specialization, is_specialized
from clsvit.tracking import read_metrics

CONFIDENCE = 0.95
EXACT_BOOTSTRAP_MAX = 6  # up to 6 values, every one of the n^n resamples is enumerated (6^6 = 46,656)
BOOTSTRAP_SAMPLES = 20_000  # more values: Monte Carlo resamples from a fixed seed (the same table every call)
# keys that do not change what a run learns: runs that differ only in these and the seed form one group
BOOKKEEPING_KEYS = ("run.", "log.", "data.num_workers", "data.pin_memory", "data.persistent_workers",
                    "data.prefetch_factor", "train.checkpoint_every", "train.keep_checkpoints", "train.resume",
                    "eval.every", "eval.tasks")
METRICS = ("top1", "miou", "rmse", "images_per_s")
COMPARED = ("top1", "miou", "rmse")  # the metrics with a paired difference to the baseline


def expand_runs(patterns: list[str]) -> list[Path]:
    runs = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for match in matches:
            path = Path(match)
            if (path / "config.yaml").is_file() and path not in runs:
                runs.append(path)
            elif not glob.has_magic(pattern):
                raise InputError(f"--compare: {path} is not a run directory (no config.yaml)")
    if not runs:
        raise InputError(f"--compare: no run directories match {' '.join(patterns)}")
    return runs


def run_summary(run_dir: Path) -> dict:
    """One run's raw values: from config.yaml, provenance.json, eval.json, metrics.jsonl."""
    cfg = load_config(run_dir / "config.yaml")
    spec = cfg["model"]["specialize"]
    results = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else {}
    provenance = run_dir / "provenance.json"
    params = json.loads(provenance.read_text()).get("params") if provenance.exists() else None
    if params is None:  # count without allocating: the architecture alone decides it
        with torch.device("meta"):
            params = count_parameters(build_model(cfg["model"], cfg["model"]["num_classes"] or 1000))
    events = read_metrics(run_dir)
    speeds = [line["train/images_per_s"] for line in events if "train/images_per_s" in line]
    final_top1 = [line["val/top1"] for line in events if "val/top1" in line][-1:]  # train.py's last validation
    learned = {k: v for k, v in flatten(cfg, stringify=False).items() if not k.startswith(BOOKKEEPING_KEYS)}
    return {"run": str(run_dir), "recipe": cfg["run"]["name"], "seed": cfg["run"]["seed"],
            "group_key": json.dumps(learned, sort_keys=True), "specialization": describe_specialization(spec),
            "unspecialized": not is_specialized(spec), "params": int(params),
            "top1": results.get("cls.top1", final_top1[0] if final_top1 else None), "miou": results.get("seg.miou"), "rmse": results.get("depth.rmse"),
            "images_per_s": statistics.median(speeds) if speeds else None}


# ---------------------------------------------------------------------------- statistics


def bootstrap_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean: the (1-c)/2 and (1+c)/2 quantiles of the mean of n
    values drawn with replacement, each the smallest resample mean whose cumulative probability
    reaches its level (inverted CDF). Exact for n <= EXACT_BOOTSTRAP_MAX (all n^n resamples, equally
    likely), Monte Carlo from a fixed seed beyond. None for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n < 2:
        return None
    if n <= EXACT_BOOTSTRAP_MAX:
        means = x[np.indices((n,) * n).reshape(n, -1)].mean(axis=0)
    else:
        means = x[np.random.default_rng(0).integers(0, n, size=(BOOTSTRAP_SAMPLES, n))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail], method="inverted_cdf")
    return float(low), float(high)


def describe(values: list[float]) -> dict:
    """mean, sample standard deviation (n - 1), n, and the bootstrap interval of the mean (lo, hi)."""
    interval = bootstrap_interval(values) or (None, None)
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values),
            "lo": interval[0], "hi": interval[1]}


def paired_difference(runs: list[dict], base_runs: list[dict], metric: str) -> dict:
    """Per seed that both groups have: run minus baseline; described like a metric, plus `resolved`
    (the interval excludes 0; None without an interval). Without a shared seed: the difference of the
    group means (n = 0, no interval)."""
    base = {r["seed"]: r[metric] for r in base_runs if r[metric] is not None}
    differences = [r[metric] - base[r["seed"]] for r in runs if r[metric] is not None and r["seed"] in base]
    result = describe(differences)
    if not differences:
        mean = statistics.fmean([r[metric] for r in runs if r[metric] is not None] or [math.nan]) \
            - statistics.fmean(list(base.values()) or [math.nan])
        result["mean"] = None if math.isnan(mean) else mean
    result["resolved"] = None if result["lo"] is None else not result["lo"] <= 0.0 <= result["hi"]
    return result


def group_runs(runs: list[dict]) -> list[dict]:
    """Runs with the same learning-relevant recipe, in order of first appearance; a group is named
    after its runs' name without the `_seed<k>` ending (when that leaves one name)."""
    by_key: dict[str, list[dict]] = {}
    for run in runs:
        by_key.setdefault(run["group_key"], []).append(run)
    groups = []
    for members in by_key.values():
        names = {re.sub(rf"_seed{r['seed']}$", "", r["recipe"]) for r in members}
        group = {"recipe": names.pop() if len(names) == 1 else members[0]["recipe"], "runs": members,
                 "seeds": [r["seed"] for r in members], "n": len(members),
                 **{key: members[0][key] for key in ("specialization", "unspecialized", "params")}}
        for metric in METRICS:
            stats = describe([r[metric] for r in members if r[metric] is not None])
            group.update({metric: stats["mean"], **{f"{metric}_{k}": stats[k] for k in ("std", "n", "lo", "hi")}})
        groups.append(group)
    return groups


# ---------------------------------------------------------------------------- comparison


def compare(patterns: list[str], baseline: str | None = None, out: str | None = None) -> dict:
    runs = [run_summary(run) for run in expand_runs(patterns)]
    if baseline is not None and not any(Path(r["run"]).resolve() == Path(baseline).resolve() for r in runs):
        runs.append(run_summary(Path(baseline)))
    groups = group_runs(runs)
    if baseline is not None:
        base = next(g for g in groups if any(Path(r["run"]).resolve() == Path(baseline).resolve() for r in g["runs"]))
    else:
        base = next((g for g in groups if g["unspecialized"]), None)
    for group in groups:
        group["baseline"] = group is base
        group["params_pct"] = (100.0 * (group["params"] / base["params"] - 1)) if base else None
        for metric in COMPARED:
            diff = paired_difference(group["runs"], base["runs"], metric) if base else describe([])
            group.update({f"d_{metric}": diff["mean"], f"d_{metric}_resolved": diff.get("resolved"),
                          **{f"d_{metric}_{k}": diff[k] for k in ("n", "lo", "hi")}})
    out_dir = Path(out) if out else Path(os.path.commonpath([str(Path(r["run"]).resolve().parent) for r in runs]))
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(groups)
    print(table)
    (out_dir / "compare.md").write_text(table + "\n")
    write_csv(groups, out_dir / "compare.csv")
    error_bar_chart(groups, out_dir / "compare.png")
    print(f"\nwritten {out_dir / 'compare.md'}, compare.csv, compare.png")
    return {"rows": groups, "out": str(out_dir)}


def _fmt(value, spec: str, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, ("+" if signed else "") + spec)


def _metric_cell(group: dict, metric: str, spec: str) -> str:
    """'47.50' for one run; '47.50 ± 0.40 [47.10, 47.90]' (mean ± std [interval]) for several."""
    text = _fmt(group[metric], spec)
    if group[f"{metric}_lo"] is not None:
        text += f" ± {_fmt(group[f'{metric}_std'], spec)} [{_fmt(group[f'{metric}_lo'], spec)}, " \
                f"{_fmt(group[f'{metric}_hi'], spec)}]"
    return text


def _difference_cell(group: dict, metric: str, spec: str) -> str:
    """'+1.50' (no interval), '+1.50 [+1.00, +2.00]', or '+0.20 [-0.30, +0.70] n.r.' (not resolved)."""
    text = _fmt(group[f"d_{metric}"], spec, signed=True)
    if group[f"d_{metric}_lo"] is not None and not group["baseline"]:
        text += f" [{_fmt(group[f'd_{metric}_lo'], spec, True)}, {_fmt(group[f'd_{metric}_hi'], spec, True)}]"
        if not group[f"d_{metric}_resolved"]:
            text += " n.r."
    return text


def markdown_table(groups: list[dict]) -> str:
    header = ["recipe", "specialization", "n", "params", "Δ params", "top-1 %", "Δ top-1", "mIoU %", "Δ mIoU",
              "RMSE m", "Δ RMSE", "images/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        name = f"**{g['recipe']}** (baseline)" if g["baseline"] else g["recipe"]
        cells = [name, g["specialization"], str(g["n"]), f"{g['params'] / 1e6:.2f}M",
                 _fmt(g["params_pct"], ".2f", True) + " %",
                 _metric_cell(g, "top1", ".2f"), _difference_cell(g, "top1", ".2f"),
                 _metric_cell(g, "miou", ".2f"), _difference_cell(g, "miou", ".2f"),
                 _metric_cell(g, "rmse", ".3f"), _difference_cell(g, "rmse", ".3f"), _fmt(g["images_per_s"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    if any(g["n"] > 1 for g in groups):
        lines += ["", f"n runs (seeds) per group: mean ± sample std [{CONFIDENCE:.0%} bootstrap interval of the mean]; "
                  "Δ: per seed minus the baseline's, mean [its interval]; n.r.: not resolved (the interval contains 0)."]
    return "\n".join(lines)


CSV_COLUMNS = ("recipe", "specialization", "baseline", "n", "seeds", "runs", "params", "params_pct",
               *(f"{m}{suffix}" for m in METRICS for suffix in ("", "_std", "_n", "_lo", "_hi")),
               *(f"d_{m}{suffix}" for m in COMPARED for suffix in ("", "_n", "_lo", "_hi", "_resolved")))


def write_csv(groups: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for group in groups:
            writer.writerow({**group, "seeds": " ".join(map(str, group["seeds"])),
                             "runs": " ".join(r["run"] for r in group["runs"])})


def error_bar_chart(groups: list[dict], path: Path) -> None:
    """One panel per metric: a bar per group at its mean with the bootstrap interval as error bar,
    and each run as a dot; the baseline's bar is grey."""
    metrics = [("top1", "top-1 % (higher is better)"), ("miou", "mIoU % (higher is better)"),
               ("rmse", "RMSE m (lower is better)")]
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.1 * len(groups) * 3, 3.6), constrained_layout=True)
    names = [g["recipe"] for g in groups]
    colours = ["0.6" if g["baseline"] else "tab:blue" for g in groups]
    for ax, (key, title) in zip(axes, metrics):
        means = [g[key] if g[key] is not None else 0.0 for g in groups]
        errors = np.array([[g[key] - g[f"{key}_lo"], g[f"{key}_hi"] - g[key]] if g[f"{key}_lo"] is not None
                           else [0.0, 0.0] for g in groups]).T
        bars = ax.bar(range(len(groups)), means, color=colours, yerr=errors, capsize=4, ecolor="black")
        for i, group in enumerate(groups):
            values = [r[key] for r in group["runs"] if r[key] is not None]
            ax.plot([i] * len(values), values, "o", color="black", markersize=3, zorder=3)
        ax.bar_label(bars, labels=[_fmt(g[key], ".3g").replace("–", "n/a") + (f" (n={g[f'{key}_n']})" if
                                   g[f"{key}_n"] > 1 else "") for g in groups], fontsize=8, padding=2)
        ax.set_xticks(range(len(groups)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
