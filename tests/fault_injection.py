"""Run train.py with a fault injected from outside: `python tests/fault_injection.py FAULT train.py ...`.

The faults are monkeypatches applied before train.py runs (as `__main__`, exactly as `python
train.py` would run it), so the training code carries no test hooks. FAULT is one of

    kill-in-save:N        SIGKILL this process in the middle of its N-th checkpoint write (after the
                          first file of the checkpoint is on disk, before the rest)
    disk-full:N[@RANK]    the N-th checkpoint write fails with ENOSPC (on process RANK only)
    raise:STEP[@RANK]     the optimizer step STEP raises a RuntimeError (on process RANK only)
"""

from __future__ import annotations

import errno
import os
import runpy
import signal
import sys

import accelerate
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


def parse(fault: str) -> tuple[str, int, int | None]:
    kind, _, value = fault.partition(":")
    count, _, rank = value.partition("@")
    return kind, int(count), int(rank) if rank else None


def this_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def inject(kind: str, count: int, rank: int | None) -> None:
    if rank is not None and rank != this_rank():
        return
    saves, steps = [0], [0]
    original_save_state, original_torch_save = accelerate.Accelerator.save_state, torch.save

    def save_state(self, *args, **kwargs):
        saves[0] += 1
        return original_save_state(self, *args, **kwargs)

    def torch_save(obj, f, *args, **kwargs):
        if saves[0] == count and kind == "disk-full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        result = original_torch_save(obj, f, *args, **kwargs)
        if saves[0] == count and kind == "kill-in-save":
            os.kill(os.getpid(), signal.SIGKILL)  # one file written, the others not
        return result

    if kind in ("kill-in-save", "disk-full"):
        accelerate.Accelerator.save_state = save_state
        torch.save = torch_save
    elif kind == "raise":
        def count_steps(optimizer, args, kwargs):
            steps[0] += 1
            if steps[0] == count:
                raise RuntimeError(f"injected failure at optimizer step {count} on process {this_rank()}")

        register_optimizer_step_pre_hook(count_steps)
    else:
        raise SystemExit(f"fault_injection.py: unknown fault {kind!r}")


if __name__ == "__main__":
    fault, script, *rest = sys.argv[1:]
    inject(*parse(fault))
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
