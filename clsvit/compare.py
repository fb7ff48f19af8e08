"""Runs side by side: one row per run directory, deltas to the baseline run.

    python eval.py --compare 'runs/shapes_*' [--baseline runs/shapes_baseline] [--out DIR]

A row's values come from the run's config.yaml (recipe name, specialization), provenance.json
(parameter count), eval.json (top-1, mIoU, RMSE: written by eval.py) and metrics.jsonl (median
training images/s). The baseline is `--baseline` or the run without specialization. Writes
compare.md (the printed markdown table), compare.csv and compare.png (one panel per metric).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import statistics
from pathlib import Path

import torch

from clsvit.config import load_config
from clsvit.model import build_model, count_parameters, describe_specialization, is_specialized
from clsvit.tracking import read_metrics


def expand_runs(patterns: list[str]) -> list[Path]:
    runs = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for match in matches:
            path = Path(match)
            if (path / "config.yaml").is_file() and path not in runs:
                runs.append(path)
            elif not glob.has_magic(pattern):
                raise ValueError(f"--compare: {path} is not a run directory (no config.yaml)")
    if not runs:
        raise ValueError(f"--compare: no run directories match {' '.join(patterns)}")
    return runs


def run_summary(run_dir: Path) -> dict:
    """One comparison row's raw values: from config.yaml, provenance.json, eval.json, metrics.jsonl."""
    cfg = load_config(run_dir / "config.yaml")
    spec = cfg["model"]["specialize"]
    results = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").exists() else {}
    provenance = run_dir / "provenance.json"
    params = json.loads(provenance.read_text()).get("params") if provenance.exists() else None
    if params is None:  # count without allocating: the architecture alone decides it
        with torch.device("meta"):
            params = count_parameters(build_model(cfg["model"], cfg["model"]["num_classes"] or 1000))
    speeds = [line["train/images_per_s"] for line in read_metrics(run_dir) if "train/images_per_s" in line]
    return {"run": str(run_dir), "recipe": cfg["run"]["name"], "specialization": describe_specialization(spec),
            "unspecialized": not is_specialized(spec), "params": int(params),
            "top1": results.get("cls.top1"), "miou": results.get("seg.miou"), "rmse": results.get("depth.rmse"),
            "images_per_s": statistics.median(speeds) if speeds else None}


def _delta(value, reference):
    return None if value is None or reference is None else value - reference


def compare(patterns: list[str], baseline: str | None = None, out: str | None = None) -> dict:
    runs = expand_runs(patterns)
    rows = [run_summary(run) for run in runs]
    if baseline is not None:
        matches = [r for r in rows if Path(r["run"]).resolve() == Path(baseline).resolve()]
        if not matches:
            rows.append(run_summary(Path(baseline)))
            matches = rows[-1:]
        base = matches[0]
    else:
        base = next((r for r in rows if r["unspecialized"]), None)
    for row in rows:
        row["baseline"] = row is base
        ref = base or {}
        row["params_pct"] = (100.0 * (row["params"] / ref["params"] - 1)) if base else None
        for key in ("top1", "miou", "rmse"):
            row[f"d_{key}"] = _delta(row[key], ref.get(key))
    out_dir = Path(out) if out else Path(os.path.commonpath([str(Path(r["run"]).resolve().parent) for r in rows]))
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    print(table)
    (out_dir / "compare.md").write_text(table + "\n")
    write_csv(rows, out_dir / "compare.csv")
    bar_chart(rows, out_dir / "compare.png")
    print(f"\nwritten {out_dir / 'compare.md'}, compare.csv, compare.png")
    return {"rows": rows, "out": str(out_dir)}


def _fmt(value, spec: str, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, ("+" if signed else "") + spec)


def markdown_table(rows: list[dict]) -> str:
    header = ["recipe", "specialization", "params", "Δ params", "top-1 %", "Δ top-1", "mIoU %", "Δ mIoU",
              "RMSE m", "Δ RMSE", "images/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        name = f"**{r['recipe']}** (baseline)" if r["baseline"] else r["recipe"]
        cells = [name, r["specialization"], f"{r['params'] / 1e6:.2f}M", _fmt(r["params_pct"], ".2f", True) + " %",
                 _fmt(r["top1"], ".2f"), _fmt(r["d_top1"], ".2f", True), _fmt(r["miou"], ".2f"),
                 _fmt(r["d_miou"], ".2f", True), _fmt(r["rmse"], ".3f"), _fmt(r["d_rmse"], ".3f", True),
                 _fmt(r["images_per_s"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_COLUMNS = ("run", "recipe", "specialization", "baseline", "params", "params_pct", "top1", "d_top1", "miou",
               "d_miou", "rmse", "d_rmse", "images_per_s")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def bar_chart(rows: list[dict], path: Path) -> None:
    """One panel per metric, one bar per run; the baseline's bar is grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("top1", "top-1 % (higher is better)"), ("miou", "mIoU % (higher is better)"),
               ("rmse", "RMSE m (lower is better)")]
    fig, axes = plt.subplots(1, 3, figsize=(4 + 1.1 * len(rows) * 3, 3.6), constrained_layout=True)
    names = [r["recipe"] for r in rows]
    colours = ["0.6" if r["baseline"] else "tab:blue" for r in rows]
    for ax, (key, title) in zip(axes, metrics):
        values = [r[key] if r[key] is not None else 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colours)
        ax.bar_label(bars, labels=[_fmt(r[key], ".3g").replace("–", "n/a") for r in rows], fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
