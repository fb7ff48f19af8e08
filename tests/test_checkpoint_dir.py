"""A run's checkpoints directory (clsvit.checkpoint), in process with a real accelerate Accelerator on
CPU: which folders are complete checkpoints and in which order, the rotation that keeps the newest
`keep`, the clean-up of what a killed save or clean-up left behind, a failed write that leaves the
previous checkpoints untouched, the exported weights file, and eval.py's copy of a checkpoint's
weights under the wrappers' key prefixes. The end-to-end runs of train.py (kill, pre-emption, a
failing process of two) are in test_fault_tolerance.py and test_train.py."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from accelerate import Accelerator
from accelerate.launchers import debug_launcher
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file

from clsvit.checkpoint import (COMPLETE_MARKER, CheckpointError, EvalSnapshot, _copy_checkpoint_weights,
                               checkpoint_step, complete_checkpoints, eval_snapshot, latest_checkpoint, load_run,
                               remove_partial_checkpoints, same_snapshot_on_every_process, save_checkpoint,
                               save_weights)
from clsvit.errors import InputError
from clsvit.model import recorded_tokens
from clsvit.runlock import Owner, RunDirectoryInUse, RunLock
from clsvit.training import Progress
from model_utils import images, make_run
from trainer_utils import REPO


def complete(directory, step):
    """A folder that looks like a published checkpoint of `step`."""
    path = directory / f"step_{step}"
    path.mkdir(parents=True)
    (path / COMPLETE_MARKER).write_text(f"{step}\n")
    return path


def listing(directory) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_complete_checkpoints_are_ordered_by_step_number_not_by_name(tmp_path):
    for step in (10, 2, 9, 100):
        complete(tmp_path, step)
    (tmp_path / "step_11").mkdir()  # being written by an older clsvit or copied half-way: no marker
    (tmp_path / ".step_12.partial").mkdir()
    (tmp_path / ".step_1.removing").mkdir()
    for name in ("step_x", "step_3.bak", "old_step_4", "step_"):
        complete(tmp_path, 0).rename(tmp_path / name)  # a COMPLETE marker, but not a checkpoint's name
    (tmp_path / "step_5").write_text("a file, not a folder")
    found = complete_checkpoints(tmp_path)
    assert [path.name for path in found] == ["step_2", "step_9", "step_10", "step_100"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_100"
    assert [checkpoint_step(path) for path in found] == [2, 9, 10, 100]


def test_no_checkpoints_yet(tmp_path):
    assert complete_checkpoints(tmp_path / "checkpoints") == [] and latest_checkpoint(tmp_path / "checkpoints") is None
    (tmp_path / "checkpoints").mkdir()
    assert complete_checkpoints(tmp_path / "checkpoints") == [] and latest_checkpoint(tmp_path / "checkpoints") is None
    (tmp_path / "checkpoints" / "step_3").mkdir()  # incomplete
    assert latest_checkpoint(tmp_path / "checkpoints") is None


def test_what_a_killed_save_or_clean_up_left_is_removed_and_nothing_else(tmp_path):
    """A kill during a save leaves `.step_<N>.partial`; during the rotation, `.step_<N>.removing`
    (renamed, not yet deleted); a copy that lost its marker is a `step_<N>` without COMPLETE."""
    kept = [complete(tmp_path, 4), complete(tmp_path, 8)]
    for name, content in ((".step_12.partial", "model.safetensors"), (".step_4.removing", "optimizer.bin"),
                          (".step_0.removing", None), ("step_12", "model.safetensors")):
        (tmp_path / name).mkdir()
        if content:
            (tmp_path / name / content).write_bytes(b"\0" * 64)
    (tmp_path / ".step_2.partial" / "sub").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / ".hidden").mkdir()  # not ours either
    removed = remove_partial_checkpoints(tmp_path)
    assert sorted(path.name for path in removed) == [".step_0.removing", ".step_12.partial", ".step_2.partial",
                                                     ".step_4.removing", "step_12"]
    assert listing(tmp_path) == [".hidden", "notes.txt", "step_4", "step_8"]
    assert complete_checkpoints(tmp_path) == kept
    assert remove_partial_checkpoints(tmp_path) == []  # nothing left to remove
    assert remove_partial_checkpoints(tmp_path / "absent") == []


class Counter:
    """A stateful object registered for checkpointing (like the loop's Progress); `fail` makes its
    state_dict raise, which accelerate's save_state calls while the checkpoint is being written."""

    def __init__(self):
        self.value, self.fail = 0, None

    def state_dict(self):
        if self.fail is not None:
            raise self.fail
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


@pytest.fixture
def training(tmp_path):
    """(accelerator, model, progress, counter, checkpoints directory): a prepared model and optimizer
    whose weights hold the step number, and two registered objects."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress, counter = Progress(), Counter()
    accelerator.register_for_checkpointing(progress, counter)
    return accelerator, model, progress, counter, tmp_path / "checkpoints"


def advance(model, progress, counter, step):
    with torch.no_grad():
        model.weight.fill_(step)
    progress.step = counter.value = step


def test_rotation_keeps_the_newest_checkpoints_each_complete_with_its_config(training):
    accelerator, model, progress, counter, checkpoints = training
    config = {"run": {"name": "tiny", "seed": 3}, "train": {"keep_checkpoints": 2}}
    for step in (3, 6, 9, 12):
        advance(model, progress, counter, step)
        path = save_checkpoint(accelerator, checkpoints, step, keep=2, config=config)
        assert path == checkpoints / f"step_{step}"
        assert (path / COMPLETE_MARKER).read_text() == f"{step}\n"
        assert yaml.safe_load((path / "config.yaml").read_text()) == config
    assert listing(checkpoints) == ["step_12", "step_9"]  # nothing hidden left behind either
    assert torch.equal(load_file(checkpoints / "step_9" / "model.safetensors")["weight"], torch.full((2, 3), 9.0))

    advance(model, progress, counter, 0)
    accelerator.load_state(str(latest_checkpoint(checkpoints)))
    assert (progress.step, counter.value) == (12, 12)
    assert torch.equal(model.weight, torch.full((2, 3), 12.0))


def test_keep_one_and_a_checkpoint_without_config(training):
    accelerator, model, progress, counter, checkpoints = training
    for step in (1, 2):
        advance(model, progress, counter, step)
        save_checkpoint(accelerator, checkpoints, step, keep=1)
    assert listing(checkpoints) == ["step_2"]
    assert not (checkpoints / "step_2" / "config.yaml").exists()


def test_rotation_counts_steps_not_names(training):
    """step_10 is newer than step_9 although it sorts before it as text: the rotation keeps it."""
    accelerator, model, progress, counter, checkpoints = training
    for step in (8, 9, 10):
        advance(model, progress, counter, step)
        save_checkpoint(accelerator, checkpoints, step, keep=2)
    assert listing(checkpoints) == ["step_10", "step_9"]


def test_a_step_already_on_disk_is_not_written_again(training):
    """A run resumed from its last checkpoint saves that step again at the end: the files stay."""
    accelerator, model, progress, counter, checkpoints = training
    advance(model, progress, counter, 5)
    first = save_checkpoint(accelerator, checkpoints, 5, keep=2)
    weights = (first / "model.safetensors").read_bytes()
    advance(model, progress, counter, 7)  # the state in memory differs: still the same checkpoint
    assert save_checkpoint(accelerator, checkpoints, 5, keep=2) == first
    assert (first / "model.safetensors").read_bytes() == weights and listing(checkpoints) == ["step_5"]


def test_a_partial_left_by_a_killed_save_of_the_same_step_is_replaced(training):
    accelerator, model, progress, counter, checkpoints = training
    stale = checkpoints / ".step_4.partial"
    stale.mkdir(parents=True)
    (stale / "stale.bin").write_bytes(b"half")
    advance(model, progress, counter, 4)
    path = save_checkpoint(accelerator, checkpoints, 4, keep=2)
    assert not (path / "stale.bin").exists() and listing(checkpoints) == ["step_4"]


def test_a_full_disk_during_the_save_keeps_the_previous_checkpoints_and_leaves_no_partial(training):
    accelerator, model, progress, counter, checkpoints = training
    for step in (2, 4):
        advance(model, progress, counter, step)
        save_checkpoint(accelerator, checkpoints, step, keep=2)
    advance(model, progress, counter, 6)
    counter.fail = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(CheckpointError) as failed:
        save_checkpoint(accelerator, checkpoints, 6, keep=2)
    assert str(failed.value) == (
        f"the checkpoint for step 6 could not be written (process 0: OSError: [Errno 28] No space left on device); "
        f"{checkpoints / 'step_4'} is intact: fix the cause and relaunch to resume")
    assert isinstance(failed.value, InputError)  # the entry points print it as one line
    assert listing(checkpoints) == ["step_2", "step_4"]
    assert (checkpoints / "step_4" / COMPLETE_MARKER).read_text() == "4\n"

    counter.fail = None  # the disk has room again: the same step saves
    save_checkpoint(accelerator, checkpoints, 6, keep=2)
    assert listing(checkpoints) == ["step_4", "step_6"]


def test_a_failed_first_save_says_there_is_no_earlier_checkpoint(training):
    accelerator, model, progress, counter, checkpoints = training
    counter.fail = PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(CheckpointError, match=r"^the checkpoint for step 1 could not be written \(process 0: "
                                              r"PermissionError: \[Errno 13\] Permission denied\); no earlier "
                                              r"checkpoint exists: fix the cause and relaunch to resume$"):
        save_checkpoint(accelerator, checkpoints, 1, keep=2)
    assert listing(checkpoints) == []


def test_a_bug_during_the_save_keeps_its_own_type_and_leaves_no_partial(training):
    accelerator, model, progress, counter, checkpoints = training
    advance(model, progress, counter, 1)
    save_checkpoint(accelerator, checkpoints, 1, keep=2)
    counter.fail = KeyError("value")
    with pytest.raises(KeyError) as failed:
        save_checkpoint(accelerator, checkpoints, 2, keep=2)
    assert not isinstance(failed.value, InputError)
    assert listing(checkpoints) == ["step_1"]


def test_a_config_that_cannot_be_written_publishes_nothing(training):
    """config.yaml is written before the COMPLETE marker: a checkpoint without it is never published."""
    accelerator, model, progress, counter, checkpoints = training
    with pytest.raises(yaml.representer.RepresenterError):
        save_checkpoint(accelerator, checkpoints, 1, keep=2, config={"run": {"name": object()}})
    assert listing(checkpoints) == []


def test_a_failed_rename_into_place_keeps_the_previous_checkpoint(training):
    """The publication itself fails (here a file already holds the final name)."""
    accelerator, model, progress, counter, checkpoints = training
    advance(model, progress, counter, 1)
    save_checkpoint(accelerator, checkpoints, 1, keep=2)
    (checkpoints / "step_2").write_text("in the way")
    with pytest.raises(CheckpointError, match=r"^the checkpoint for step 2 could not be written \(process 0: "
                                              r"NotADirectoryError: .*\); .*step_1 is intact"):
        save_checkpoint(accelerator, checkpoints, 2, keep=2)
    assert listing(checkpoints) == ["step_1", "step_2"] and (checkpoints / "step_2").is_file()


def test_a_checkpoints_path_that_is_a_file_is_a_checkpoint_error(training):
    accelerator, model, progress, counter, checkpoints = training
    checkpoints.write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"^the checkpoint for step 3 could not be written \(process 0: "
                                              r"(FileExistsError|NotADirectoryError): .*no earlier checkpoint exists"):
        save_checkpoint(accelerator, checkpoints, 3, keep=2)
    assert checkpoints.read_text() == "not a folder"


def test_exported_weights_are_float32_and_never_half_written(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(torch.bfloat16)
    model[0].weight.data = model[0].weight.data.t().contiguous().t()  # a non-contiguous view
    path = tmp_path / "model.safetensors"
    path.write_text("the previous launch's weights")
    save_weights(model, path)
    state = load_file(path)
    assert set(state) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for key, value in model.state_dict().items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], value.float())
    assert listing(tmp_path) == ["model.safetensors"]


@pytest.fixture
def one_process_group(tmp_path):
    """A real one-process gloo process group, so that DistributedDataParallel can wrap a model."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_eval_copy_of_a_checkpoint_drops_the_ddp_and_compile_prefixes(tmp_path, one_process_group):
    """accelerate wraps DDP first and compiles last, so a compiled multi-GPU run saves
    `_orig_mod.module.<key>`; DDP alone `module.<key>`, compile alone `_orig_mod.<key>`. Each copy
    holds the plain model's keys and values, as a finished run's model.safetensors does."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    wrapped = {"ddp": torch.nn.parallel.DistributedDataParallel(plain),
               "compiled": torch.compile(plain, backend="eager"),
               "compiled-ddp": torch.compile(torch.nn.parallel.DistributedDataParallel(plain), backend="eager"),
               "plain": plain}
    for name, model in wrapped.items():
        checkpoint = tmp_path / name / "step_4"
        checkpoint.mkdir(parents=True)
        save_file(model.state_dict(), checkpoint / "model.safetensors")
        (checkpoint / "config.yaml").write_text(f"run:\n  name: {name}\n")
        copy = _copy_checkpoint_weights(checkpoint)
        state = load_file(copy / "model.safetensors")
        assert sorted(state) == sorted(plain.state_dict()), name
        for key, value in plain.state_dict().items():
            assert torch.equal(state[key], value), (name, key)
        assert (copy / "config.yaml").read_text() == f"run:\n  name: {name}\n"
        assert not copy.is_relative_to(tmp_path)  # a private copy: the training may rotate the checkpoint away
        assert copy.name.startswith("clsvit-eval-step_4-")  # a leftover of a killed eval.py says what it is


@pytest.mark.parametrize("specialize, recorded", [
    ({"tokens": "global"}, None),  # a baseline: no copies, nothing recorded
    ({"tokens": "cls", "norm": 0.5}, "cls"),
    ({"tokens": [2, 3], "qkv": [0]}, [2, 3]),
    ({"tokens": "registers", "final_norm": True}, "registers"),
], ids=["baseline", "cls", "patch position", "final norm only"])
def test_eval_copy_of_a_checkpoint_records_the_tokens_of_its_copies(tmp_path, specialize, recorded):
    """The copy eval.py reads records which tokens the checkpoint's copies are for, as a finished
    run's model.safetensors does (read back by clsvit.model.recorded_tokens); a baseline's records none."""
    checkpoint = tmp_path / "step_4"
    checkpoint.mkdir()
    save_file({"weight": torch.ones(2)}, checkpoint / "model.safetensors")
    (checkpoint / "config.yaml").write_text(yaml.safe_dump({"model": {"specialize": specialize}}))
    assert recorded_tokens(_copy_checkpoint_weights(checkpoint) / "model.safetensors") == recorded


COPY_THEN_EXIT = """
import shutil, sys
from pathlib import Path
from clsvit.checkpoint import _copy_checkpoint_weights
copies = [_copy_checkpoint_weights(Path(sys.argv[1])) for _ in range(2)]
shutil.rmtree(copies[1])  # a temporary-files cleaner was faster
print(*copies)
"""


def test_eval_copies_are_removed_when_the_process_exits(tmp_path):
    checkpoint = tmp_path / "step_4"
    checkpoint.mkdir()
    save_file({"weight": torch.ones(2)}, checkpoint / "model.safetensors")
    (checkpoint / "config.yaml").write_text("run:\n  name: x\n")
    done = subprocess.run([sys.executable, "-c", COPY_THEN_EXIT, str(checkpoint)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    copies = [Path(path) for path in done.stdout.split()]
    assert len(copies) == 2 and not any(path.exists() for path in copies)
    assert _copy_checkpoint_weights(checkpoint).is_dir()  # in this process: there until it exits


@pytest.fixture
def undeletable(tmp_path):
    """Makes a file undeletable, even by root (the immutable attribute: what an NFS server's busy
    `.nfs*` file or a snapshot does to a deletion); lifted again with `undeletable(path, False)` and
    from everything under tmp_path after the test."""
    def mark(path, immutable=True):
        if shutil.which("chattr") is None or subprocess.run(
                ["chattr", "+i" if immutable else "-i", str(path)], capture_output=True).returncode:
            pytest.skip("this filesystem has no immutable attribute")
    yield mark
    subprocess.run(["chattr", "-R", "-i", str(tmp_path)], capture_output=True)


def test_an_old_checkpoint_that_cannot_be_deleted_is_hidden_and_the_save_succeeds(training, undeletable):
    """The rotation renames an old checkpoint out of sight before deleting it: when the deletion
    fails, the new checkpoint still stands, the old one is no longer listed, and the next launch's
    clean-up removes it (also failing quietly while it cannot)."""
    accelerator, model, progress, counter, checkpoints = training
    advance(model, progress, counter, 1)
    save_checkpoint(accelerator, checkpoints, 1, keep=1)
    stuck = checkpoints / "step_1" / "stuck.bin"
    stuck.write_bytes(b"busy")
    undeletable(stuck)
    advance(model, progress, counter, 2)
    assert save_checkpoint(accelerator, checkpoints, 2, keep=1) == checkpoints / "step_2"
    assert listing(checkpoints) == [".step_1.removing", "step_2"]
    assert listing(checkpoints / ".step_1.removing") == ["stuck.bin"]  # the rest was deleted
    assert complete_checkpoints(checkpoints) == [checkpoints / "step_2"]
    assert remove_partial_checkpoints(checkpoints) == [checkpoints / ".step_1.removing"]
    undeletable(checkpoints / ".step_1.removing" / "stuck.bin", False)
    remove_partial_checkpoints(checkpoints)
    assert listing(checkpoints) == ["step_2"]


# ---------------------------------------------------------------- two processes (gloo, forked)

def _two_process_save(checkpoints, failures, results):
    """One of two processes: save step 2 with `failures[rank]` injected (None, "disk" or "bug")
    and record what it raised."""
    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a one-process pytest
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    model, counter = accelerator.prepare(torch.nn.Linear(3, 2)), Counter()
    accelerator.register_for_checkpointing(counter)
    counter.fail = {None: None, "disk": OSError(errno.ENOSPC, "No space left on device"),
                    "bug": KeyError("value")}[failures[rank]]
    try:
        save_checkpoint(accelerator, checkpoints, 2, keep=2)
        raised = None
    except Exception as error:  # noqa: BLE001 — recorded for the test
        raised = [type(error).__name__, str(error)]
    (results / f"rank{rank}.json").write_text(json.dumps(raised))


def test_two_processes_agree_on_the_outcome_of_a_failed_write(training, tmp_path):
    """Each process saves its own RNG state, so each can fail alone: a full disk on one process is a
    CheckpointError on both, naming it; a bug keeps its own type where it happened and is a
    RuntimeError on the other; either way nothing is published and step 1 stays the newest."""
    accelerator, model, progress, counter, checkpoints = training
    advance(model, progress, counter, 1)
    save_checkpoint(accelerator, checkpoints, 1, keep=2)  # the previous checkpoint, from one process
    intact = f"{checkpoints / 'step_1'} is intact: fix the cause and relaunch to resume"
    disk = "OSError: [Errno 28] No space left on device"
    cases = {
        (None, None): [None, None],
        (None, "disk"): [["CheckpointError", f"the checkpoint for step 2 could not be written (process 1: {disk}); "
                                             f"{intact}"]] * 2,
        ("disk", "disk"): [["CheckpointError", f"the checkpoint for step 2 could not be written (process 0: {disk}); "
                                               f"{intact}"]] * 2,
        ("bug", "disk"): [["KeyError", "'value'"],
                          ["RuntimeError", f"the checkpoint for step 2 could not be written (process 0: KeyError: "
                                           f"'value'); {intact}"]],
        (None, "bug"): [["RuntimeError", f"the checkpoint for step 2 could not be written (process 1: KeyError: "
                                         f"'value'); {intact}"], ["KeyError", "'value'"]],
    }
    for failures, expected in cases.items():
        results = tmp_path / "-".join(map(str, failures))
        results.mkdir()
        shutil.rmtree(checkpoints / "step_2", ignore_errors=True)
        debug_launcher(_two_process_save, args=(checkpoints, failures, results), num_processes=2)
        outcome = [json.loads((results / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        assert outcome == expected, failures
        assert listing(checkpoints) == (["step_1", "step_2"] if expected == [None, None] else ["step_1"]), failures


def _two_process_snapshot(steps, results):
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    snapshot = EvalSnapshot(results, "a live run", owner=Owner(host="h", pid=1, since="now"), step=steps[rank])
    try:
        same_snapshot_on_every_process(snapshot, accelerator)
        raised = None
    except RunDirectoryInUse as error:
        raised = str(error)
    (results / f"rank{rank}.json").write_text(json.dumps(raised))


def test_eval_processes_that_read_different_checkpoints_stop(tmp_path):
    one = EvalSnapshot(tmp_path, "a live run", owner=Owner(host="h", pid=1, since="now"), step=4)
    same_snapshot_on_every_process(one, Accelerator(cpu=True))  # one process always agrees with itself
    for steps in ((4, 4), (4, 8)):
        results = tmp_path / f"{steps[0]}-{steps[1]}"
        results.mkdir()
        debug_launcher(_two_process_snapshot, args=(steps, results), num_processes=2)
        expected = None if steps == (4, 4) else (
            "the eval processes read different checkpoints of the training run (steps [4, 8]); a checkpoint was "
            "published while they started: run eval.py again")
        assert [json.loads((results / f"rank{rank}.json").read_text()) for rank in (0, 1)] == [expected] * 2


def test_load_run_applies_the_overlays_then_the_overrides_and_reports_what_it_loaded(tmp_path):
    """eval.py reads a run as load_run(run, overrides, overlays=(recipes/eval/X.yaml,)): the overlay
    over the run's config.yaml, the command line over both; 2x2 -> 4x4 patches resizes pos_embed."""
    trained, cfg = make_run(tmp_path / "run", {"norm": 1.0}, seed=1)
    overlay = tmp_path / "eval.yaml"
    overlay.write_text("model:\n  img_size: 48\neval:\n  max_batches: 3\n")
    lines = []
    model, loaded = load_run(tmp_path / "run", ["model.img_size=64"], overlays=(overlay,), report=lines.append)
    assert (loaded["model"]["img_size"], loaded["eval"]["max_batches"]) == (64, 3)
    assert model.patch_embed.img_size == (64, 64) and not model.training
    assert len(lines) == 1 and "pos_embed resized 2x2 -> 4x4" in lines[0], lines
    same, _ = load_run(tmp_path / "run")
    assert next(load_run(tmp_path / "run", device="meta")[0].parameters()).is_meta  # the device asked for
    assert loaded["model"]["specialize"] == cfg["model"]["specialize"]
    with torch.no_grad():
        assert torch.equal(same(images()), trained(images()))


def test_a_run_that_is_not_training_is_evaluated_from_its_final_weights(tmp_path):
    run_dir = tmp_path / "run"
    complete(run_dir / "checkpoints", 4)  # checkpoints are for resuming: a finished run is read whole
    snapshot = eval_snapshot(run_dir)
    assert snapshot == EvalSnapshot(run_dir, f"the final weights {run_dir / 'model.safetensors'}")
    assert not snapshot.live and snapshot.output_dir(run_dir) == run_dir
    assert not (run_dir / "eval_step_4").exists()


def test_a_live_run_whose_newest_checkpoint_cannot_be_read_is_refused_in_one_line(tmp_path):
    """eval.py takes the newest checkpoint again while it vanishes under it; when it keeps failing,
    one line says so (here the training is this very process, holding the run's lock)."""
    run_dir = tmp_path / "run"
    lock = RunLock.acquire(run_dir)
    try:
        (complete(run_dir / "checkpoints", 4) / "config.yaml").write_text("run:\n  name: x\n")  # no weights
        with pytest.raises(RunDirectoryInUse) as refused:
            eval_snapshot(run_dir)
        assert str(refused.value) == (f"run directory {run_dir}: its checkpoints were replaced faster than they "
                                      f"could be read")
    finally:
        lock.release()
