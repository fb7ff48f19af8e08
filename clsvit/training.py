"""The parts of train.py's loop that are not the loop itself.

- :func:`split_global_batch`: the recipe's global batch on this many processes -> micro-batch and
  gradient accumulation, with ``train.batch_per_device`` as the memory cap.
- :class:`Progress`: the loop position saved in every checkpoint.
- :func:`is_due`: whether a step is one to log, evaluate or checkpoint at.
- :class:`MicroBatchStream`: the training batches, epoch after epoch, resuming mid-epoch, each
  prepared for the model (on the device) one batch ahead when asked (:class:`PreparedAhead`).
- :class:`LogWindow`: what is measured between two log steps (loss, throughput, data wait, broken
  files), reduced over the processes with one all-reduce.
- :class:`PreemptionSignals`: SIGTERM / SIGUSR1 -> "checkpoint at the next log step and exit".
- :class:`ProgressDisplay`: the progress on the console, a bar on a terminal, else a line per log step.
- :func:`gradient_norm`: the logged (and clipped) gradient norm, unscaled under fp16.
- :func:`nonfinite_on_any_process`: the collective decision to skip an update.
- :func:`use_deterministic_algorithms`: ``train.deterministic``, with the cuBLAS workspace CUDA needs.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_flatten
from tqdm import tqdm

from clsvit.config import ConfigError
from clsvit.errors import InputError


class TrainingError(InputError):
    """A run that cannot go on as its recipe and data make it (non-finite loss); reported in one line."""


@dataclass(frozen=True)
class BatchSplit:
    """How one optimizer step of ``global_batch`` images is computed on ``processes`` processes."""

    global_batch: int
    processes: int
    micro_batch: int  # images per forward pass per process
    accumulation: int  # forward/backward passes per optimizer step

    def describe(self) -> str:
        return (f"{self.processes} process(es) x {self.micro_batch} images x {self.accumulation} accumulation "
                f"= {self.global_batch} images/step")


def split_global_batch(global_batch: int, batch_cap: int, processes: int, even: bool = False) -> BatchSplit:
    """The split with the fewest accumulation steps whose micro-batch fits ``batch_cap``.

    Each process computes ``global_batch / processes`` images per optimizer step, in
    ``accumulation`` micro-batches of equal size: 2048 on 8 processes with a cap of 64 -> 64 x 4;
    128 on 2 processes with a cap of 128 -> 64 x 1. ``even`` asks for an even micro-batch (timm's
    batch-mode Mixup pairs each image with its mirror in the batch). A ConfigError names the keys
    when no split exists (e.g. 128 images on 3 processes)."""
    keys = f"train.global_batch={global_batch} on {processes} process(es) with train.batch_per_device={batch_cap}"
    if global_batch % processes:
        raise ConfigError(f"{keys}: the global batch is not divisible by the number of processes")
    per_process = global_batch // processes
    for accumulation in range(math.ceil(per_process / batch_cap), per_process + 1):
        micro, remainder = divmod(per_process, accumulation)
        if remainder == 0 and micro <= batch_cap and (micro % 2 == 0 or not even):
            return BatchSplit(global_batch, processes, micro, accumulation)
    raise ConfigError(f"{keys}: no equal{' even' if even else ''} micro-batch of at most {batch_cap} images "
                      f"divides the {per_process} images per process"
                      + (" (Mixup/CutMix need an even micro-batch)" if even else ""))


class Progress:
    """The loop's position, saved in every checkpoint: optimizer steps done, the epoch, the samples
    of this process's epoch order already consumed, and the updates skipped for a non-finite loss."""

    def __init__(self):
        self.step, self.epoch, self.samples_in_epoch, self.skipped_nonfinite = 0, 0, 0, 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(vars(self)):
            raise InputError(f"checkpoint: the loop position holds {sorted(state)}, expected {sorted(vars(self))}")
        vars(self).update(state)


def is_due(step: int, every: int, total: int, *, at_last: bool) -> bool:
    """Whether optimizer step `step` (counted from 1) of `total` is one of every `every` steps; the
    last step counts when `at_last` (logging) and never otherwise (the final evaluation and
    checkpoint come after the loop)."""
    if step == total:
        return at_last
    return step % every == 0


class MicroBatchStream:
    """Micro-batches forever, epoch after epoch, resuming mid-epoch: each loader batch through
    ``prepare`` (the move to the device and the batched device transform; None: as it comes).

    A batch counts as consumed when it is handed out, so a checkpoint taken after an optimizer
    step records exactly where the next step starts. An epoch is ``epoch_samples`` samples of this
    process's order (whole optimizer steps); the samples left over after them are dropped.

    ``ahead``: the next batch is prepared while the caller's step runs on the current one, on a
    background thread, and on CUDA on that thread's own stream (:class:`PreparedAhead`): the
    device decode and augmentation of ``data.augment_on: device`` overlap the step before them.
    The batches and the loop position are the same as without it."""

    def __init__(self, loader, sampler, progress: Progress, micro_batch: int, epoch_samples: int,
                 prepare=None, ahead: bool = False, device=None):
        self.loader, self.sampler, self.progress = loader, sampler, progress
        self.micro_batch, self.epoch_samples = micro_batch, epoch_samples
        prepare = prepare or (lambda batch: batch)
        positioned = lambda item: (prepare(item[0]), item[1])  # noqa: E731
        stream = self._stream()
        self._batches = PreparedAhead(stream, positioned, device) if ahead else map(positioned, stream)

    def __iter__(self):
        return self

    def __next__(self):
        batch, (self.progress.epoch, self.progress.samples_in_epoch) = next(self._batches)
        return batch

    def _stream(self):
        """(loader batch, loop position once it is consumed)."""
        epoch, samples = self.progress.epoch, self.progress.samples_in_epoch
        while True:
            if samples >= self.epoch_samples:
                epoch, samples = epoch + 1, 0
            self.sampler.set_epoch(epoch)
            self.sampler.set_start(samples)
            for batch in self.loader:
                samples += self.micro_batch
                yield batch, (epoch, samples)
                if samples >= self.epoch_samples:
                    break


_NO_MORE_ITEMS = object()  # PreparedAhead.pending once the items are exhausted


class PreparedAhead:
    """``prepare(item)`` for each item of ``items``, one item ahead: while the caller uses item k,
    a background thread prepares item k+1 (the items themselves are drawn on the caller's thread).
    On CUDA the thread works on its own stream; the caller's stream waits for an event recorded
    after the preparation before it touches the result, and the result's tensors are recorded as
    used on the caller's stream (so the caching allocator does not reuse them early). An error in
    the preparation is raised by the ``next`` that would have returned the item."""

    def __init__(self, items, prepare, device=None):
        self.items, self.prepare = iter(items), prepare
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clsvit-prepare-ahead")
        self.pending = None

    def __iter__(self):
        return self

    def _prepare(self, item):
        if self.stream is None:
            return self.prepare(item), None
        with torch.cuda.stream(self.stream):
            prepared = self.prepare(item)
            done = torch.cuda.Event()
            done.record(self.stream)
        return prepared, done

    def __next__(self):
        if self.pending is None:
            self.pending = self.pool.submit(self._prepare, next(self.items))
        if self.pending is _NO_MORE_ITEMS:
            raise StopIteration
        prepared, done = self.pending.result()
        item = next(self.items, _NO_MORE_ITEMS)  # prepared while the caller uses `prepared`
        self.pending = item if item is _NO_MORE_ITEMS else self.pool.submit(self._prepare, item)
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            for tensor in tree_flatten(prepared)[0]:
                if isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda":
                    tensor.record_stream(stream)
        return prepared


class LogWindow:
    """What happens between two log steps: the summed step losses (on the device, no host sync),
    optimizer steps, seconds spent waiting for data, and this process's broken-file reports.

    :meth:`reduce` is the one host-device synchronisation of the loop: loss sum, pre-emption vote
    and broken-file count of every process in one all-reduce."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.problems: list = []
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.steps, self.data_wait, self.start = 0, 0.0, time.perf_counter()

    def next_batch(self, batches):
        """The next micro-batch, timing the wait and keeping its broken-file reports."""
        start = time.perf_counter()
        images, labels, problems = next(batches)
        self.data_wait += time.perf_counter() - start
        self.problems += [problem for problem in problems if problem]
        return images, labels

    def add_step(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def reduce(self, stop_requested: bool) -> dict:
        """Every process calls this at the same step; returns the window's global figures."""
        counts = torch.tensor([float(stop_requested), float(len(self.problems))])  # host -> device without blocking
        local = torch.cat([self.loss_sum.view(1), counts.to(self.accelerator.device, non_blocking=True)])
        loss_total, stop_votes, problems = self.accelerator.reduce(local, reduction="sum").tolist()
        elapsed = time.perf_counter() - self.start
        return {"mean_loss": loss_total / self.accelerator.num_processes / max(self.steps, 1),
                "stop": stop_votes > 0, "problems": int(problems), "elapsed": elapsed,
                "data_wait": self.data_wait / elapsed}


class ProgressDisplay:
    """The training's progress on the main process (`log.progress_bar`): tqdm's bar when `stream` is a
    terminal; otherwise (a SLURM job's slurm-<id>.out, a sweep cell's train.log) one line per log
    step, since a bar writes thousands of carriage-return updates onto one line of a file."""

    def __init__(self, total: int, initial: int, enabled: bool, stream=None):
        stream = sys.stderr if stream is None else stream
        terminal = stream.isatty()
        self.total, self.lines = total, enabled and not terminal
        self.bar = tqdm(total=total, initial=initial, disable=not (enabled and terminal), file=stream,
                        dynamic_ncols=True, desc="train")

    def step(self) -> None:
        self.bar.update(1)

    def log_step(self, step: int, loss: float, lr: float, images_per_s: float) -> None:
        if self.lines:
            tqdm.write(f"train step {step}/{self.total}: loss {loss:.4f}, lr {lr:.2e}, {images_per_s:.0f} images/s")
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def close(self) -> None:
        self.bar.close()


def gradient_norm(accelerator, model, max_norm: float | None) -> torch.Tensor:
    """The global norm of the gradients as the optimizer will see them, clipped to `max_norm` when
    given: fp16's loss scale is divided out first (accelerate unscales once per step; the optimizer
    step then knows), and under FSDP the norm is taken over every shard."""
    return accelerator.clip_grad_norm_(model.parameters(), math.inf if max_norm is None else max_norm)


def nonfinite_on_any_process(loss: torch.Tensor, accelerator) -> bool:
    """Whether the step's loss is non-finite on any process (one all-reduce).

    Every process must skip the same updates: under DDP the gradients are already all-reduced, so a
    process that stepped would apply non-finite gradients, and the processes' step counters and
    collectives would part."""
    flag = (~torch.isfinite(loss)).float().reshape(())
    return accelerator.reduce(flag, reduction="sum").item() > 0


CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # the workspaces torch accepts (aten Context.cpp, checkCuBLASConfigDeterministic)


def use_deterministic_algorithms() -> None:
    """``torch.use_deterministic_algorithms(True)`` for ``train.deterministic``. On CUDA a
    deterministic cuBLAS matmul needs a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read by cuBLAS when
    it starts; NVIDIA's cuBLAS docs, "Results reproducibility"), else every matmul raises: set to
    ``:4096:8`` here unless the environment chose one of torch's accepted values; another value is
    refused in one line. Call it before the first CUDA matmul (train.py: before the accelerator)."""
    value = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC[0])
    if value not in CUBLAS_DETERMINISTIC:
        raise ConfigError(f"train.deterministic=true needs CUBLAS_WORKSPACE_CONFIG={' or '.join(CUBLAS_DETERMINISTIC)} "
                          f"(deterministic cuBLAS matmuls), the environment sets {value!r}: unset it or choose one")
    torch.use_deterministic_algorithms(True)


class PreemptionSignals:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask the run to checkpoint at the
    next log step and exit cleanly. A second signal ends the process at once: that is what a
    launcher tearing a failed job down sends. Copies of one signal that arrive within
    ``REPEAT_WINDOW_S`` of the first count as that one: under SLURM a pre-empted job's processes get
    SIGTERM from slurmstepd and again forwarded by srun, milliseconds apart."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    REPEAT_WINDOW_S = 0.5

    def __init__(self):
        self.received: list[int] = []
        self.first_at = 0.0
        for signum in self.SIGNALS:
            signal.signal(signum, self._on_signal)

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def _on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received and now - self.first_at > self.REPEAT_WINDOW_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if not self.received:
            self.first_at = now
        self.received.append(signum)
