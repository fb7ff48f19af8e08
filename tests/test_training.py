"""The training loop's parts (clsvit.training): the batch split, the loop position, the micro-batch
stream, the collective skip decision, the gradient norm under a loss scale, the step helper and the
progress display."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import threading
import time

import pytest
import torch
from accelerate import Accelerator
from accelerate.launchers import debug_launcher
from accelerate.state import AcceleratorState

from clsvit.config import ConfigError
from clsvit.training import (LogWindow, MicroBatchStream, PreemptionSignals, PreparedAhead, Progress, ProgressDisplay,
                             gradient_norm, is_due, nonfinite_on_any_process, split_global_batch,
                             use_deterministic_algorithms)


@pytest.mark.parametrize("global_batch, cap, processes, even, expected", [
    (2048, 64, 8, True, (64, 4)),     # DeiT-III on one 8-GPU node: 256 per GPU in 4 micro-batches
    (2048, 64, 64, True, (32, 1)),    # 64 GPUs: 32 per GPU fits the cap at once
    (128, 128, 2, False, (64, 1)),    # the shapes recipe on 2 processes
    (128, 128, 1, False, (128, 1)),
    (32, 8, 2, False, (8, 2)),
    (200, 64, 2, False, (50, 2)),     # 100 per process: 2 x 50 is the fewest passes under 64
    (62, 32, 1, True, (2, 31)),       # 62 = 2 x 31: the only even split under the cap is 31 passes of 2
])
def test_split_global_batch_takes_the_fewest_passes_under_the_cap(global_batch, cap, processes, even, expected):
    split = split_global_batch(global_batch, cap, processes, even=even)
    assert (split.micro_batch, split.accumulation) == expected
    assert split.micro_batch * split.accumulation * processes == global_batch


def test_split_global_batch_errors_name_the_keys():
    with pytest.raises(ConfigError, match=r"train.global_batch=128 on 3 process\(es\) with "
                                          r"train.batch_per_device=64: the global batch is not divisible"):
        split_global_batch(128, 64, 3)
    with pytest.raises(ConfigError, match=r"^train.global_batch=31 on 1 process\(es\) with train.batch_per_device=32: "
                                          r"no equal even micro-batch of at most 32 images divides the 31 images per "
                                          r"process \(Mixup/CutMix need an even micro-batch\)$"):
        split_global_batch(31, 32, 1, even=True)


def test_a_split_describes_itself_and_takes_odd_micro_batches_unless_asked_even():
    split = split_global_batch(2048, 64, 8, even=True)
    assert (split.global_batch, split.processes) == (2048, 8)
    assert split.describe() == "8 process(es) x 64 images x 4 accumulation = 2048 images/step"
    assert (split_global_batch(6, 3, 1).micro_batch, split_global_batch(6, 3, 1).accumulation) == (3, 2)
    assert (split_global_batch(6, 3, 1, even=True).micro_batch, split_global_batch(6, 3, 1, even=True).accumulation) \
        == (2, 3)
    one = split_global_batch(3, 1, 1)  # a cap of one image: one image per pass, per_process passes
    assert (one.micro_batch, one.accumulation) == (1, 3)


def test_progress_refuses_a_position_of_another_layout():
    progress = Progress()
    assert progress.state_dict() == {"step": 0, "epoch": 0, "samples_in_epoch": 0, "skipped_nonfinite": 0}
    progress.load_state_dict({"step": 5, "epoch": 1, "samples_in_epoch": 64, "skipped_nonfinite": 0})
    assert (progress.step, progress.epoch, progress.samples_in_epoch) == (5, 1, 64)
    with pytest.raises(ValueError, match="batches_in_epoch"):
        progress.load_state_dict({"step": 5, "epoch": 1, "batches_in_epoch": 2, "skipped_nonfinite": 0})


class _Sampler:
    """Records what the stream asks of a sampler: its epoch and the start position."""

    def __init__(self, size: int):
        self.size, self.calls = size, []

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_start(self, start):
        self.start = start
        self.calls.append((self.epoch, start))

    def __iter__(self):
        return iter(range(self.epoch * 100 + self.start, self.epoch * 100 + self.size))


def test_micro_batch_stream_drops_the_incomplete_step_and_resumes_mid_epoch():
    sampler = _Sampler(size=10)  # 10 samples per epoch; micro-batch 2; steps of 2 micro-batches -> 8 used
    loader = _Batches(sampler, 2)
    progress = Progress()
    stream = MicroBatchStream(loader, sampler, progress, micro_batch=2, epoch_samples=8)
    first = [next(stream) for _ in range(5)]
    assert first == [[0, 1], [2, 3], [4, 5], [6, 7], [100, 101]]  # 8 and 9 dropped, epoch 1 begins
    assert (progress.epoch, progress.samples_in_epoch) == (1, 2)
    resumed = Progress()
    resumed.load_state_dict(progress.state_dict())
    again = MicroBatchStream(_Batches(sampler, 2), sampler, resumed, micro_batch=2, epoch_samples=8)
    assert next(again) == [102, 103] and sampler.calls[-1] == (1, 2)


def test_prepared_ahead_overlaps_the_step_and_keeps_order_and_position():
    """With ahead=True batch k+1 is prepared, on another thread, while the caller's step runs on
    batch k: each step waits for that preparation to start (prepared on the caller's thread, it
    would only start at the next `next` and the wait would time out). The batches, their order and
    the loop position after each are those of the stream without it, across an epoch boundary."""
    started, threads = [], []

    def prepare(batch):
        threads.append(threading.current_thread())
        started[len(threads) - 1].set()
        return [10 * value for value in batch]

    def run(ahead: bool) -> list:
        started[:], threads[:] = [threading.Event() for _ in range(9)], []
        sampler, progress = _Sampler(size=10), Progress()
        stream = MicroBatchStream(_Batches(sampler, 2), sampler, progress, micro_batch=2, epoch_samples=8,
                                  prepare=prepare, ahead=ahead)
        seen = []
        for step in range(7):
            seen.append((next(stream), progress.epoch, progress.samples_in_epoch))
            if ahead:  # the step on batch `step`: the next batch's preparation is under way meanwhile
                assert started[step + 1].wait(timeout=30), step
        return seen

    expected = run(ahead=False)
    assert expected[4] == ([1000, 1010], 1, 2)  # 8 and 9 dropped, epoch 1 begins
    assert run(ahead=True) == expected
    assert threading.current_thread() not in threads


def test_prepared_ahead_raises_a_preparation_error_at_its_batch():
    def prepare(batch):
        if batch[0] == 4:
            raise ValueError("broken batch")
        return batch

    sampler = _Sampler(size=10)
    stream = MicroBatchStream(_Batches(sampler, 2), sampler, Progress(), micro_batch=2, epoch_samples=8, prepare=prepare,
                              ahead=True)
    assert next(stream) == [0, 1] and next(stream) == [2, 3]
    with pytest.raises(ValueError, match="broken batch"):
        next(stream)


@pytest.mark.parametrize("items", [[], [1], [1, 2, 3]], ids=["none", "one", "three"])
def test_prepared_ahead_returns_every_item_of_a_finite_stream(items):
    """A finite stream ends after its last item, which is returned (drawing the next item ahead
    finds none), and stays ended: as the items' own iterator does."""
    prepared = PreparedAhead(items, lambda item: 10 * item)
    assert list(prepared) == [10 * item for item in items]
    with pytest.raises(StopIteration):
        next(prepared)


@pytest.mark.parametrize("options", [{}, {"ahead": False}], ids=["default", "ahead=False"])
def test_micro_batch_stream_prepares_on_the_callers_thread_unless_ahead(options):
    """Without ``ahead`` (its default) a batch is prepared on the caller's thread when the caller asks
    for it: after three batches exactly those three were prepared, none ahead."""
    prepared = []

    def prepare(batch):
        prepared.append((batch, threading.current_thread()))
        return batch

    sampler = _Sampler(size=10)
    stream = MicroBatchStream(_Batches(sampler, 2), sampler, Progress(), micro_batch=2, epoch_samples=8, prepare=prepare,
                              **options)
    assert [next(stream) for _ in range(3)] == [[0, 1], [2, 3], [4, 5]]
    caller = threading.current_thread()
    assert prepared == [([0, 1], caller), ([2, 3], caller), ([4, 5], caller)]


class _SlowToFree:
    """An item that takes a while to release. PreparedAhead's thread drops the last reference to an
    item once it has prepared it, so that thread is still busy when the caller asks for the next."""

    def __init__(self, value: int):
        self.value = value

    def __del__(self):
        time.sleep(0.2)


def test_prepared_ahead_prepares_on_one_named_background_thread():
    """Every preparation runs on the one background thread of the PreparedAhead, named
    ``clsvit-prepare-ahead_0`` (what ``threading.enumerate()`` and a py-spy dump show), never on the
    caller's: also when that thread is still releasing the previous item as the caller asks for the
    next, the next preparation waits for it instead of starting a second thread."""
    threads = []

    def prepare(item):
        threads.append(threading.current_thread())
        return 10 * item.value

    ahead = PreparedAhead((_SlowToFree(k) for k in itertools.count()), prepare, device=torch.device("cpu"))
    assert [next(ahead) for _ in range(3)] == [0, 10, 20]
    assert {thread.name for thread in threads} == {"clsvit-prepare-ahead_0"} and len(set(threads)) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable CUDA device")
@pytest.mark.parametrize("device", ["cuda", torch.device("cuda", 0)], ids=str)
def test_preparing_ahead_for_cuda_needs_a_cuda_device(device):
    """Preparing ahead for a CUDA device creates the preparation's stream on that device at once:
    without a usable CUDA device the batch stream fails when it is built (torch.cuda.Stream raises),
    instead of preparing on the host without the overlap."""
    sampler = _Sampler(size=10)
    with pytest.raises(RuntimeError):
        MicroBatchStream(_Batches(sampler, 2), sampler, Progress(), micro_batch=2, epoch_samples=8, ahead=True,
                         device=device)


class _Batches:
    def __init__(self, sampler, size):
        self.sampler, self.size = sampler, size

    def __iter__(self):
        items = list(self.sampler)
        return iter([items[i:i + self.size] for i in range(0, len(items) - self.size + 1, self.size)])


def test_deterministic_training_sets_the_cublas_workspace_or_refuses_another(monkeypatch):
    """train.deterministic on CUDA needs CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8) before cuBLAS
    starts, else every matmul raises: it is set when absent, kept when valid, refused otherwise."""
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda flag: calls.append(flag))
    calls = []
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    use_deterministic_algorithms()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and calls == [True]
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    use_deterministic_algorithms()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(ConfigError, match=r"CUBLAS_WORKSPACE_CONFIG=:4096:8 or :16:8 .* sets ':0:0'"):
        use_deterministic_algorithms()
    assert calls == [True, True]


def test_nonfinite_decision_on_one_process():
    accelerator = Accelerator(cpu=True)
    assert nonfinite_on_any_process(torch.tensor(float("nan")), accelerator)
    assert nonfinite_on_any_process(torch.tensor(float("inf")), accelerator)
    assert not nonfinite_on_any_process(torch.tensor(3.0), accelerator)


def test_logged_grad_norm_is_of_the_unscaled_gradients():
    """fp16 training scales the loss (GradScaler); the logged norm must be the true gradient norm.
    accelerate creates its GradScaler on accelerators only, so a CPU GradScaler stands in for it
    here, attached exactly where accelerate keeps it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    inputs, reference = torch.randn(8, 4), torch.nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    reference(inputs).square().mean().backward()
    true_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])

    accelerator = Accelerator(cpu=True)
    accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**10), True
    accelerator.state._mixed_precision = "fp16"
    try:
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        accelerator.backward(model(inputs).square().mean())
        scaled = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        logged = float(gradient_norm(accelerator, model, None))
        assert logged == pytest.approx(scaled / 2.0**10, rel=1e-6)  # the scale divided out (a power of 2: exact)
        assert logged == pytest.approx(float(true_norm), rel=1e-3)  # the float32 norm, up to fp16 autocast
        optimizer.step()  # the scaler knows the gradients are unscaled already
        assert torch.isfinite(model.weight).all()
    finally:
        accelerator.state._mixed_precision = "no"


def test_copies_of_one_signal_are_one_request():
    """SLURM pre-emption: slurmstepd's SIGTERM and srun's forwarded copy arrive milliseconds apart;
    they ask for one checkpoint, they do not end the process (a later second signal does: tested
    end to end in test_fault_tolerance.py)."""
    previous = {signum: signal.getsignal(signum) for signum in PreemptionSignals.SIGNALS}
    try:
        signals = PreemptionSignals()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.requested and signals.received == [signal.SIGUSR1, signal.SIGUSR1]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_second_signal_after_the_repeat_window_ends_the_process():
    """The first signal is a request and the process goes on; one arriving later than
    REPEAT_WINDOW_S after it ends the process by that signal (in a forked child here)."""
    previous = {signum: signal.getsignal(signum) for signum in PreemptionSignals.SIGNALS}
    try:
        signals = PreemptionSignals()
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.requested and signals.received == [signal.SIGTERM]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            PreemptionSignals()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(PreemptionSignals.REPEAT_WINDOW_S + 0.3)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_is_due_every_n_steps_and_at_the_last_only_for_logging():
    due = lambda at_last: [step for step in range(1, 11) if is_due(step, 4, 10, at_last=at_last)]  # noqa: E731
    assert due(at_last=True) == [4, 8, 10]  # log steps: the last one too
    assert due(at_last=False) == [4, 8]  # eval / checkpoint steps: the last one is the loop's end
    assert [s for s in range(1, 9) if is_due(s, 4, 8, at_last=False)] == [4]


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()], ids=["file", "terminal"])
def test_progress_is_a_bar_on_a_terminal_and_a_line_per_log_step_elsewhere(stream, capsys):
    display = ProgressDisplay(total=6, initial=0, enabled=True, stream=stream)
    for step in range(1, 7):
        display.step()
        if step % 3 == 0:
            display.log_step(step, 1.5 / step, 4e-3, 120.0)
    display.close()
    lines = capsys.readouterr().out.splitlines()
    if isinstance(stream, Terminal):
        assert lines == [] and "\r" in stream.getvalue() and "6/6" in stream.getvalue()
    else:
        assert stream.getvalue() == ""  # no bar in a file
        assert lines == ["train step 3/6: loss 0.5000, lr 4.00e-03, 120 images/s",
                         "train step 6/6: loss 0.2500, lr 4.00e-03, 120 images/s"]


def test_progress_goes_to_stderr_by_default(capsys):
    """Under pytest stderr is captured (not a terminal): a line per log step, no bar."""
    display = ProgressDisplay(total=2, initial=0, enabled=True)
    display.step()
    display.log_step(1, 2.0, 1e-3, 10.0)
    display.close()
    captured = capsys.readouterr()
    assert captured.out == "train step 1/2: loss 2.0000, lr 1.00e-03, 10 images/s\n" and captured.err == ""


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()], ids=["file", "terminal"])
def test_no_progress_output_when_disabled(stream, capsys):
    display = ProgressDisplay(total=2, initial=0, enabled=False, stream=stream)
    display.step()
    display.log_step(1, 1.0, 1e-3, 10.0)
    display.close()
    assert stream.getvalue() == "" and capsys.readouterr().out == ""


def test_a_resumed_bar_starts_at_its_step_and_shows_the_loss_and_lr():
    terminal = Terminal()
    display = ProgressDisplay(total=6, initial=4, enabled=True, stream=terminal)
    display.step()
    display.log_step(5, 0.25, 4e-3, 120.0)
    display.step()
    display.close()
    last = terminal.getvalue().replace("\n", "\r").strip("\r").split("\r")[-1]
    assert last.startswith("train: 100%") and " 6/6 " in last and "loss=0.2500, lr=4.00e-03" in last, last


def test_gradient_norm_clips_to_max_norm_and_returns_the_norm_before():
    """torch.nn.utils.clip_grad_norm_'s definition: the total 2-norm before clipping is returned, the
    gradients are scaled to max_norm when above it."""
    model = torch.nn.Linear(2, 1, bias=False)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    model.weight.grad = torch.tensor([[3.0, 4.0]])  # norm 5
    assert float(gradient_norm(accelerator, model, None)) == 5.0 and model.weight.grad.tolist() == [[3.0, 4.0]]
    assert float(gradient_norm(accelerator, model, 1.0)) == 5.0
    torch.testing.assert_close(model.weight.grad, torch.tensor([[0.6, 0.8]]), rtol=1e-5, atol=1e-6)


def test_log_window_sums_the_window_and_reports_its_means(tmp_path):
    """Two optimizer steps of losses 2.0 and 4.0 -> mean 3.0 (one process); the broken-file reports
    of the batches are kept (empty ones dropped) and counted; data waits are a fraction of the window."""
    def batches():
        for problems in (["", "a.jpg: truncated"], [None], ["b.png: not an image", "c.png: not an image"]):
            time.sleep(0.2)  # a loader that keeps the step waiting
            yield torch.zeros(2, 3), torch.tensor([0, 1]), problems

    window = LogWindow(Accelerator(cpu=True))
    stream = batches()
    for loss in (2.0, 4.0):
        images, labels = window.next_batch(stream)
        assert images.shape == (2, 3) and labels.tolist() == [0, 1]
        window.add_step(torch.tensor(loss))
    window.next_batch(stream)
    assert window.problems == ["a.jpg: truncated", "b.png: not an image", "c.png: not an image"]
    summary = window.reduce(stop_requested=False)
    assert (summary["mean_loss"], summary["stop"], summary["problems"]) == (3.0, False, 3)
    assert summary["elapsed"] >= 0.6 and 0.5 < summary["data_wait"] <= 1.0
    assert window.reduce(stop_requested=True)["stop"] is True

    window.reset()
    assert (window.steps, window.data_wait, float(window.loss_sum)) == (0, 0.0, 0.0)
    assert window.reduce(stop_requested=False)["mean_loss"] == 0.0  # an empty window divides by one step
    window.add_step(torch.tensor(5.0))
    assert window.reduce(stop_requested=False)["mean_loss"] == 5.0

    debug_launcher(_two_process_window, args=(tmp_path,), num_processes=2)
    for rank in (0, 1):  # every process sees the same global figures
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [2.25, True, 3]


def _two_process_window(results):
    """Process r adds the step losses r + 1 and r + 2.5 and saw r + 1 broken files; process 1 got a
    signal: the mean loss over 2 processes x 2 steps is (1 + 2.5 + 2 + 3.5) / 4 = 2.25, 3 broken files."""
    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a one-process pytest
    window = LogWindow(Accelerator(cpu=True))
    rank = window.accelerator.process_index
    window.add_step(torch.tensor(rank + 1.0))
    window.add_step(torch.tensor(rank + 2.5))
    window.problems += ["x.jpg: truncated"] * (rank + 1)
    summary = window.reduce(stop_requested=rank == 1)
    (results / f"rank{rank}.json").write_text(json.dumps([summary["mean_loss"], summary["stop"], summary["problems"]]))
