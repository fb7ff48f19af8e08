"""scripts/kernel_trace.py, the tool behind docs/reproducibility.md: two runs under the same settings
record the same bits op by op, and pinning MKL's code path (MKL_CBWR=COMPATIBLE, its SSE2 branch)
changes exactly the GEMM of an nn.Linear first, while every op before it stays equal."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = """
import torch
torch.manual_seed(0)
x = torch.nn.functional.layer_norm(torch.randn(256, 65, 128), (128,))
y = torch.nn.functional.gelu(torch.nn.Linear(128, 384)(x))
"""

pytestmark = pytest.mark.slow  # python subprocesses


def record(tmp_path: Path, name: str, **settings: str) -> Path:
    out = tmp_path / f"{name}.tsv"
    env = {key: value for key, value in os.environ.items() if key not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY")}
    subprocess.run([sys.executable, str(REPO / "scripts" / "kernel_trace.py"), "record", str(out), "--",
                    str(tmp_path / "script.py")], env={**env, **settings}, check=True, timeout=300)
    return out


def compare(a: Path, b: Path) -> list[str]:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "kernel_trace.py"), "compare", str(a), str(b)],
                          capture_output=True, text=True, check=True, timeout=300)
    return done.stdout.splitlines()


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch without MKL")
def test_the_first_differing_op_is_the_kernel_a_setting_changes(tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    default, again = record(tmp_path, "default"), record(tmp_path, "again")
    compatible = record(tmp_path, "compatible", MKL_CBWR="COMPATIBLE")
    ops = [line.split("\t")[1] for line in default.read_text().splitlines()]
    assert ops[:3] == ["aten.randn.default", "aten.native_layer_norm.default", "aten.uniform_.default"]
    assert default.read_text() == again.read_text()
    assert compare(default, again) == [f"{len(ops)} / {len(ops)} ops, 0 differ"]
    report = compare(default, compatible)
    # the Linear's GEMM first (6 equal ops before it: the input, the norm, the Linear's init), then what reads it
    assert report[0] == f"{len(ops)} / {len(ops)} ops, 3 differ", report
    assert [line.split()[:3] for line in report[1:]] == [["op", "7", "aten.addmm.default:"],
                                                         ["op", "8", "aten.view.default:"], ["op", "9", "aten.gelu.default:"]]
