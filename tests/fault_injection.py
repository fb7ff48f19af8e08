"""Run train.py with a fault injected from outside: `python tests/fault_injection.py FAULT train.py ...`.

The faults are monkeypatches applied before train.py runs (as `__main__`, exactly as `python
train.py` would run it), so the training code carries no test hooks. FAULT is one of

    kill-in-save:N        SIGKILL this process in the middle of its N-th checkpoint write (after the
                          first file of the checkpoint is on disk, before the rest)
    disk-full:N[@RANK]    the N-th checkpoint write fails with ENOSPC (on process RANK only)
    raise:STEP[@RANK]     the optimizer step STEP raises a RuntimeError (on process RANK only)
    bug:STEP[@RANK]       the optimizer step STEP raises a ValueError, as a bug inside torch, numpy or
                          clsvit would (on process RANK only)
    nan-loss:N[@RANK]     the N-th loss computed is NaN (on process RANK only)
    pause:N[@RANK]        before the optimizer step N, the process writes its pid to
                          $CLSVIT_TEST_PAUSE_DIR/rank<R> and stops itself (SIGSTOP; SIGCONT resumes it)
    node-local:0          every process works in the folder $CLSVIT_TEST_NODES/node<R> (its current
                          directory), so that a path under /proc/self/cwd/ names that folder's files: the
                          same path names another file on each process, as a path on each node's local
                          disk does (a node's own copy of a dataset, its own datasets cache)

    none                  no fault (the environment variables below still apply)

With CLSVIT_TEST_WEIGHTS_DIR set, every process saves its own final model weights there
(`rank<R>.pt`) when the run ends, so tests can compare the processes' copies of the model.
With CLSVIT_TEST_ALLREDUCE_DIR set, DDP's gradient all-reduces are counted by a comm hook (torch's
own `allreduce_hook` does the reduction) and every process writes `rank<R>.json` when the run ends:
one `[optimizer step, bucket index]` pair per all-reduce, the step counted from 0.
With CLSVIT_TEST_TRANSFERS_DIR set, every process writes `rank<R>.json` when the run ends: the
blocking host-to-device transfers (tests/host_transfers.py) made from the end of the first optimizer
step on, outside checkpoint writes (which copy to the host on purpose), on the training thread and
on the thread that prepares batches ahead, as `[function, call site]` pairs.
"""

from __future__ import annotations

import errno
import json
import os
import runpy
import signal
import sys

import accelerate
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook


def parse(fault: str) -> tuple[str, int, int | None]:
    kind, _, value = fault.partition(":")
    count, _, rank = value.partition("@")
    return kind, int(count or 0), int(rank) if rank else None


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
    elif kind in ("raise", "bug"):
        error = RuntimeError if kind == "raise" else ValueError

        def count_steps(optimizer, args, kwargs):
            steps[0] += 1
            if steps[0] == count:
                raise error(f"injected failure at optimizer step {count} on process {this_rank()}")

        register_optimizer_step_pre_hook(count_steps)
    elif kind == "pause":
        def pause_at_step(optimizer, args, kwargs):
            steps[0] += 1
            if steps[0] == count:
                with open(os.path.join(os.environ["CLSVIT_TEST_PAUSE_DIR"], f"rank{this_rank()}"), "w") as f:
                    f.write(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGSTOP)

        register_optimizer_step_pre_hook(pause_at_step)
    elif kind == "node-local":
        os.chdir(os.path.join(os.environ["CLSVIT_TEST_NODES"], f"node{this_rank()}"))
    elif kind == "nan-loss":
        import timm.loss

        for loss_class in (timm.loss.BinaryCrossEntropy, timm.loss.SoftTargetCrossEntropy):
            loss_class.forward = _nan_at_call(loss_class.forward, count)
    elif kind != "none":
        raise SystemExit(f"fault_injection.py: unknown fault {kind!r}")


def _nan_at_call(forward, count: int):
    calls = [0]

    def patched(self, *args, **kwargs):
        loss = forward(self, *args, **kwargs)
        calls[0] += 1
        return loss * float("nan") if calls[0] == count else loss

    return patched


def save_weights_per_process(directory: str) -> None:
    """Keep the prepared model; save its weights from every process at end_training."""
    models = []
    original_prepare, original_end = accelerate.Accelerator.prepare, accelerate.Accelerator.end_training

    def prepare(self, *args, **kwargs):
        prepared = original_prepare(self, *args, **kwargs)
        models.extend(m for m in (prepared if isinstance(prepared, tuple) else (prepared,))
                      if isinstance(m, torch.nn.Module))
        return prepared

    def end_training(self):
        model = self.unwrap_model(models[0])
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   os.path.join(directory, f"rank{this_rank()}.pt"))
        return original_end(self)

    accelerate.Accelerator.prepare, accelerate.Accelerator.end_training = prepare, end_training


def count_allreduces(directory: str) -> None:
    """Register a counting comm hook on the DDP model that accelerate prepares (under a torch.compile
    wrapper when the launch compiles); write the (step, bucket) pairs at end_training."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    calls, steps = [], [0]
    original_prepare, original_end = accelerate.Accelerator.prepare, accelerate.Accelerator.end_training

    def hook(state, bucket):
        calls.append((steps[0], bucket.index()))
        return allreduce_hook(state, bucket)

    def prepare(self, *args, **kwargs):
        prepared = original_prepare(self, *args, **kwargs)
        for module in prepared if isinstance(prepared, tuple) else (prepared,):
            ddp = getattr(module, "_orig_mod", module)
            if isinstance(ddp, DistributedDataParallel):
                ddp.register_comm_hook(None, hook)
        return prepared

    def end_training(self):
        with open(os.path.join(directory, f"rank{this_rank()}.json"), "w") as file:
            json.dump(calls, file)
        return original_end(self)

    register_optimizer_step_post_hook(lambda optimizer, args, kwargs: steps.__setitem__(0, steps[0] + 1))
    accelerate.Accelerator.prepare, accelerate.Accelerator.end_training = prepare, end_training


def count_blocking_transfers(directory: str) -> None:
    import clsvit.training
    from host_transfers import BlockingTransfers

    state = {}
    original_prepare, original_end = accelerate.Accelerator.prepare, accelerate.Accelerator.end_training
    original_save, original_ahead = accelerate.Accelerator.save_state, clsvit.training.PreparedAhead._prepare

    def prepare(self, *args, **kwargs):
        state.setdefault("device", self.device)
        return original_prepare(self, *args, **kwargs)

    def after_first_step(optimizer, args, kwargs):
        if "mode" not in state:
            state["mode"] = BlockingTransfers(state["device"]).__enter__()

    def save_state(self, *args, **kwargs):
        mode = state.get("mode")
        if mode is None:
            return original_save(self, *args, **kwargs)
        mode.__exit__(None, None, None)
        try:
            return original_save(self, *args, **kwargs)
        finally:
            mode.__enter__()

    def prepare_ahead(self, item):
        mode = state.get("mode")
        if mode is None:
            return original_ahead(self, item)
        with mode:  # this thread's own mode stack
            return original_ahead(self, item)

    def end_training(self):
        mode = state.pop("mode", None)
        if mode is not None:
            mode.__exit__(None, None, None)
        with open(os.path.join(directory, f"rank{this_rank()}.json"), "w") as file:
            json.dump(mode.calls if mode is not None else None, file)
        return original_end(self)

    register_optimizer_step_post_hook(after_first_step)
    accelerate.Accelerator.prepare, accelerate.Accelerator.end_training = prepare, end_training
    accelerate.Accelerator.save_state = save_state
    clsvit.training.PreparedAhead._prepare = prepare_ahead


if __name__ == "__main__":
    fault, script, *rest = sys.argv[1:]
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    inject(*parse(fault))
    if os.environ.get("CLSVIT_TEST_WEIGHTS_DIR"):
        save_weights_per_process(os.environ["CLSVIT_TEST_WEIGHTS_DIR"])
    if os.environ.get("CLSVIT_TEST_ALLREDUCE_DIR"):
        count_allreduces(os.environ["CLSVIT_TEST_ALLREDUCE_DIR"])
    if os.environ.get("CLSVIT_TEST_TRANSFERS_DIR"):
        count_blocking_transfers(os.environ["CLSVIT_TEST_TRANSFERS_DIR"])
    runpy.run_path(script, run_name="__main__")
