"""Find the first op whose output differs between two runs of a script, e.g. under two kernel settings.

    MKL_CBWR=COMPATIBLE python scripts/kernel_trace.py record compat.tsv --ops 6000 -- train.py train.max_steps=2
    python scripts/kernel_trace.py record default.tsv --ops 6000 -- train.py train.max_steps=2
    python scripts/kernel_trace.py compare default.tsv compat.tsv

`record` runs the script (with its arguments, as `python SCRIPT ARGS` would) under a TorchDispatchMode
that writes one line per aten op of the main process: its index, its name, and the shape and a hash of
each CPU tensor it returns; after `--ops` ops it stops the script. `compare` prints the first ops
whose outputs differ. Ops that only allocate (`empty*`) are skipped. Two runs of the same command
under the same settings give identical files, so the first differing op, whose inputs are still
equal, is the kernel that computes differently (docs/reproducibility.md).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import runpy
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class HashOutputs(TorchDispatchMode):
    def __init__(self, out: Path, max_ops: int):
        super().__init__()
        self.file, self.max_ops, self.count, self.pid = out.open("w"), max_ops, 0, os.getpid()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if os.getpid() != self.pid or "empty" in func.__name__:  # DataLoader workers; uninitialised memory
            return result
        digests = []
        for tensor in tree_leaves(result):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.layout == torch.strided:
                with torch._C._DisableTorchDispatch():
                    data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                digests.append(f"{tuple(tensor.shape)}:{hashlib.sha1(data).hexdigest()[:12]}")
        if digests:
            self.count += 1
            self.file.write(f"{self.count}\t{func}\t{' '.join(digests)}\n")
            if self.count >= self.max_ops:
                self.file.close()
                os._exit(0)  # enough ops: stop the script here, workers and all
        return result


def record(out: Path, max_ops: int, script: str, script_args: list[str]) -> None:
    sys.argv = [script, *script_args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    with HashOutputs(out, max_ops):
        runpy.run_path(script, run_name="__main__")


def compare(a: Path, b: Path, show: int) -> None:
    lines_a, lines_b = ([line.rstrip("\n").split("\t") for line in path.open()] for path in (a, b))
    differing = [(x, y) for x, y in zip(lines_a, lines_b) if x[1:] != y[1:]]
    print(f"{len(lines_a)} / {len(lines_b)} ops, {len(differing)} differ")
    for x, y in differing[:show]:
        print(f"op {x[0]} {x[1]}: {x[2]}  vs  {y[2]}" if x[1] == y[1] else f"op {x[0]}: {x[1]} vs {y[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="run SCRIPT ARGS, hashing every op's output into OUT")
    rec.add_argument("out", type=Path)
    rec.add_argument("--ops", type=int, default=10000, help="stop after this many ops")
    rec.add_argument("script")
    rec.add_argument("script_args", nargs=argparse.REMAINDER)
    cmp = commands.add_parser("compare", help="the first ops whose outputs differ between two records")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    cmp.add_argument("--show", type=int, default=5)
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, args.ops, args.script, args.script_args)
    else:
        compare(args.a, args.b, args.show)


if __name__ == "__main__":
    main()
