"""Run a script under ``torch.cuda.set_sync_debug_mode("warn")`` and count what it synchronises.

    python benchmarks/sync_debug.py REPORT.json SCRIPT [ARGS ...]
    accelerate launch ... benchmarks/sync_debug.py REPORT.json train.py --config ...

SCRIPT runs as ``__main__`` (as ``python SCRIPT ARGS`` would run it). On CUDA, every operation that
makes the host wait for the device (``.item()``, ``.tolist()``, a blocking copy, a synchronising
kernel) warns; each warning is counted with its call site (the innermost frame outside torch) and
REPORT gets ``{"cuda": true, "warnings": N, "sites": {"file:line": count, ...}}`` when the script
ends (under several processes one report per rank: ``REPORT`` with ``.rank<R>`` before the suffix).
Without CUDA torch does not warn and the report says ``"cuda": false``. benchmarks/bench_gpu.sh runs each
of its stages so; a training step should add no warnings (the log, evaluation and checkpoint steps
synchronise on purpose).
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import runpy
import sys
import traceback
import warnings
from pathlib import Path

import torch

MESSAGE = "called a synchronizing CUDA operation"


def call_site() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith(("warnings.py", "sync_debug.py")):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def main() -> None:
    report, script, *args = sys.argv[1:]
    rank = os.environ.get("RANK")
    path = Path(report)
    if rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
    sites: collections.Counter = collections.Counter()
    cuda = torch.cuda.is_available()
    show = warnings.showwarning

    def count(message, category, filename, lineno, file=None, line=None):
        if MESSAGE in str(message):
            sites[call_site()] += 1
        else:
            show(message, category, filename, lineno, file, line)

    warnings.filterwarnings("always", message=MESSAGE)
    warnings.showwarning = count
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")

    @atexit.register
    def write() -> None:
        path.write_text(json.dumps({"cuda": cuda, "warnings": sum(sites.values()),
                                    "sites": dict(sites.most_common())}, indent=1) + "\n")

    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
