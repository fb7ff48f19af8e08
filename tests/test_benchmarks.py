"""The benchmark scripts run to their end, so their keys and options cannot rot: bench_gpu.sh's
CPU dry run (every stage, a tiny ViT, a few steps), sync_debug.py's counting of the
synchronising operations that torch reports under set_sync_debug_mode("warn"), and bench_cost.py's
op counting against hand-computed FLOPs and bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer_utils import REPO, subprocess_env

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_cost  # noqa: E402


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


def test_bench_cost_counts_a_linear_and_an_elementwise_op_by_hand():
    """One Linear on (B, N, in) float32 rows: one kernel of 2*B*N*in*out FLOPs reading the input,
    weight and bias and writing the output; a broadcast add of a (out,) vector: no FLOPs, reads the
    output and the vector once, writes the sum. Views and allocations count nothing."""
    batch, tokens, width, out = 2, 5, 6, 4
    layer, x, shift = nn.Linear(width, out), torch.randn(batch, tokens, width), torch.randn(out)
    with torch.no_grad(), bench_cost.CountOps() as counter:
        y = layer(x)
        z = y + shift
        z.view(-1).t()
    linear, add = counter.ops
    assert (linear.flops, add.flops) == (2 * batch * tokens * width * out, 0)
    assert linear.bytes == 4 * (batch * tokens * width + width * out + out + batch * tokens * out)
    assert add.bytes == 4 * (2 * batch * tokens * out + out)
    assert bench_cost.roofline_seconds(linear.flops, linear.bytes, peak_tflops=1e-12, hbm_tbps=1) == linear.flops


def test_bench_cost_fuses_the_elementwise_ops_between_two_matrix_products():
    """Linear, GELU, times 2, Linear under the fusion model: the two matrix products as they are,
    GELU and the multiply one kernel that reads the first product's output once and writes its
    own once (GELU's output, read only inside the kernel, is never written)."""
    batch, tokens, width, hidden = 2, 5, 6, 8
    first, second, x = nn.Linear(width, hidden), nn.Linear(hidden, width), torch.randn(batch, tokens, width)
    with torch.no_grad(), bench_cost.CountOps() as counter:
        second(torch.nn.functional.gelu(first(x)) * 2)
    assert [op.name for op in counter.ops] == ["addmm", "gelu", "mul", "addmm"]
    kernels = bench_cost.compiled(counter.ops)
    assert [op.name for op in kernels] == ["addmm", "fused", "addmm"]
    assert kernels[1].bytes == 2 * 4 * batch * tokens * hidden and kernels[1].where == "2 ops"
    assert [op.bytes for op in (kernels[0], kernels[2])] == [counter.ops[0].bytes, counter.ops[3].bytes]


def test_bench_cost_runs_to_its_table_on_a_tiny_vit(tmp_path, capsys):
    """bench_cost.py end to end on ViT-Ti at 32 px, batch 2 (fake tensors): every row of the table,
    the paper default with more FLOPs and bytes than the baseline (its copies' work), the compiled
    step moving fewer bytes than the eager one, and the overwrite's backward counted."""
    report = bench_cost.main(["--arch", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "2",
                              "--json", str(tmp_path / "cost.json")])
    table = capsys.readouterr().out
    for row in report["rows"]:
        assert f"\n{row} " in table, table
    rows = report["rows"]
    for row in ("GFLOP", "GB moved, eager", "GB moved, compiled"):
        assert rows[row]["paper_default"] > rows[row]["baseline"], row
    for name in bench_cost.VARIANTS:
        assert rows["GB moved, compiled"][name] < rows["GB moved, eager"][name]
    assert report["overwrite_backward"]["bytes"] > 0
    assert json.loads((tmp_path / "cost.json").read_text())["ops"]["baseline"]


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
