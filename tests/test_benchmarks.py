"""The benchmark scripts run to their end, so their keys and options cannot rot: bench_gpu.sh's
CPU dry run (every stage, a tiny ViT, a few steps) and sync_debug.py's counting of the
synchronising operations that torch reports under set_sync_debug_mode("warn")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_utils import REPO, subprocess_env


def test_sync_debug_counts_the_warnings_and_their_call_sites(tmp_path):
    """torch reports a synchronising CUDA operation as a UserWarning with this message (CUDA only):
    a script that raises it twice from one line and once from another is reported line by line,
    and its other warnings still reach the console."""
    script = tmp_path / "script.py"
    script.write_text("import warnings\n"
                      "for _ in range(2):\n"
                      "    warnings.warn('called a synchronizing CUDA operation')\n"
                      "warnings.warn('called a synchronizing CUDA operation')\n"
                      "warnings.warn('something else')\n")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sync_debug.py"), str(tmp_path / "report.json"),
                             str(script)], capture_output=True, text=True, timeout=120, check=True)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["warnings"] == 3 and report["sites"] == {f"{script}:3": 2, f"{script}:4": 1}
    assert "something else" in result.stderr and "synchronizing" not in result.stderr


@pytest.mark.slow
def test_bench_gpu_dry_run_runs_every_stage_to_its_summary(tmp_path):
    """DRY_RUN=1 bash benchmarks/bench_gpu.sh: bench_model.py compiled (eager backend) and eager,
    the memory stage, and train.py end to end on generated JPEGs with augment_on cpu and device,
    decode_on device, and compiled under DDP with 2 gloo processes, whose all-reduces are one per
    bucket per optimizer step; the summary table lists every stage."""
    env = {**subprocess_env(tmp_path / "hf_cache"), "DRY_RUN": "1", "OUT": str(tmp_path / "out"),
           "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "benchmarks/bench_gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout[result.stdout.index("\nrun "):]
    for run in ("tiny_full", "tiny_none"):
        assert summary.count(f"\n{run} ") == 2, summary  # baseline and paper_default
    assert "memory (params_plus_peak; sync no cuda)" in summary and "paper_default+grad_ckpt" in summary
    rows = {line.split()[0]: line.split() for line in summary[summary.index("end to end"):].splitlines()[2:]}
    assert set(rows) == {"augment_cpu", "augment_device", "decode_device", "ddp2_compiled"}, summary
    for name, cells in rows.items():
        assert float(cells[1]) > 0 and cells[3:5] == ["no", "cuda"], summary
    assert rows["ddp2_compiled"][5:] == ["min", "1", "max", "1"], summary
