"""The run directory lock (clsvit.runlock): a second holder is refused naming the owner, a killed
owner's lock is taken over, the record decides where the filesystem keeps no locks (same machine:
pid and start time; another machine: the heartbeat), and eval.py's snapshot of a live run.
The owners are real processes: the lock is a POSIX lock, which the kernel keeps per process."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.launchers import debug_launcher
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file

from clsvit import runlock
from clsvit.checkpoint import eval_snapshot
from clsvit.runlock import LOCK_FILE, RunDirectoryInUse, RunLock, hold_run_directory, live_owner
from trainer_utils import REPO

HOLDER = """
import signal, sys, time
from pathlib import Path
from clsvit.runlock import RunLock
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, even when the tests run under nohup
RunLock.acquire(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that takes tmp_path/run and keeps it; yields (run_dir, process)."""
    started = []

    def start(run_dir=tmp_path / "run"):
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(process)
        assert process.stdout.readline().strip() == "held", process.stderr.read()
        return run_dir, process

    yield start
    for process in started:
        process.kill()
        process.wait()


def record(run_dir) -> dict:
    return json.loads((run_dir / LOCK_FILE).read_text())


def test_a_second_holder_is_refused_in_one_line_naming_the_owner(holder):
    run_dir, process = holder()
    owner = record(run_dir)
    assert (owner["host"], owner["pid"]) == (socket.gethostname(), process.pid)
    with pytest.raises(RunDirectoryInUse) as refused:
        RunLock.acquire(run_dir)
    message = str(refused.value)
    assert message.startswith(f"run directory {run_dir} is in use by another launch (host {owner['host']}, "
                              f"pid {process.pid}, since {owner['since']})") and "\n" not in message
    assert live_owner(run_dir).pid == process.pid
    assert record(run_dir) == owner  # the refused attempt changed nothing


def test_a_sigkilled_owner_is_taken_over_and_a_clean_exit_empties_the_record(holder):
    run_dir, process = holder()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert record(run_dir)["pid"] == process.pid  # the dead owner's record stays ...
    assert live_owner(run_dir) is None  # ... but names nobody alive
    lock = RunLock.acquire(run_dir)
    try:
        # (not record(): a POSIX lock is dropped when its process closes any descriptor of the file)
        assert json.loads(os.pread(lock.fd, 4096, 0))["pid"] == os.getpid()
        assert live_owner(run_dir).pid == os.getpid()  # asking about itself keeps the lock
        other = subprocess.run([sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
                                "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(run_dir / LOCK_FILE)],
                               capture_output=True, text=True)
        assert other.returncode == 1 and "BlockingIOError" in other.stderr  # still held by this process
    finally:
        lock.release()
    assert (run_dir / LOCK_FILE).read_text() == "" and live_owner(run_dir) is None


def _record_sleeps(monkeypatch, then=lambda seconds: None) -> list[float]:
    """The time.sleep calls of this thread, recorded and handed to `then` (by default none waits);
    other threads (another test's workers) sleep as usual."""
    slept, real_sleep, this_thread = [], time.sleep, threading.current_thread()

    def sleep(seconds):
        if threading.current_thread() is not this_thread:
            return real_sleep(seconds)
        slept.append(seconds)
        then(seconds)
    monkeypatch.setattr(time, "sleep", sleep)
    return slept


def test_a_lock_held_without_a_record_is_refused_naming_no_owner(tmp_path, monkeypatch):
    """A process holds the lock but has written no record (a launch between its lock and its record,
    or another program): after 2 s of retries the refusal says so."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
              "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", script, str(run_dir / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        slept = _record_sleeps(monkeypatch)  # the holder keeps the lock: no need to wait
        with pytest.raises(RunDirectoryInUse) as refused:
            RunLock.acquire(run_dir)
        assert slept == [0.2] * 10  # ten tries 0.2 s apart
        assert live_owner(run_dir) == runlock.Owner(host="?", pid=-1, since="?")  # someone trains it: unknown
        (run_dir / LOCK_FILE).write_text('{"host": "node')  # a record being written: not yet JSON
        slept.clear()
        with pytest.raises(RunDirectoryInUse, match="a process that has not written its record yet"):
            RunLock.acquire(run_dir)
        assert slept == [0.05, 0.2] * 10  # read again once in each try
        ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        host, boot_id = runlock._machine()
        (run_dir / LOCK_FILE).write_text(json.dumps({"host": host, "boot_id": boot_id, "pid": int(ended.stdout),
                                                     "since": "then", "process_start": 1}))
        slept.clear()
        with pytest.raises(RunDirectoryInUse, match="a process that has not written its record yet"):
            RunLock.acquire(run_dir)  # the record of a dead owner: the holder is about to write its own
        assert slept == [0.2] * 10
        (run_dir / LOCK_FILE).write_text(json.dumps({"host": "other-node", "boot_id": "b", "pid": 1, "since": "then"}))
        os.utime(run_dir / LOCK_FILE, (time.time() - 3600,) * 2)  # its heartbeat stopped an hour ago
        slept.clear()
        with pytest.raises(RunDirectoryInUse, match=r"\(host other-node, pid 1, since then\)"):
            RunLock.acquire(run_dir)  # the kernel's lock is held: refused at once, whatever the record says
        assert slept == []
    finally:
        process.kill()
        process.wait()
    assert str(refused.value) == (f"run directory {run_dir} is in use by another launch (a process that has not "
                                  f"written its record yet); one launch trains a run at a time: wait for it to end or "
                                  f"stop it (lock file {run_dir / LOCK_FILE})")


def test_a_reader_reads_a_record_being_written_again_for_half_a_second(tmp_path, monkeypatch):
    """A record that is not (yet) JSON is read ten times 0.05 s apart, then counts as no record; an
    empty file is no record at once."""
    slept = _record_sleeps(monkeypatch)
    for text, retries in [("", 0), ("{", 10), ('{"host": "node7", "pid": 42', 10)]:
        (tmp_path / LOCK_FILE).write_text(text)
        slept.clear()
        assert live_owner(tmp_path) is None
        assert slept == [0.05] * retries, text


def _without_locks(monkeypatch):
    """A filesystem without POSIX locks (Lustre without `flock`): lockf fails with ENOLCK."""
    def lockf(fd, operation, *args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "lockf", lockf)


def test_without_locks_the_record_decides_on_this_machine(holder, monkeypatch, tmp_path):
    run_dir, process = holder()
    _without_locks(monkeypatch)
    with pytest.raises(RunDirectoryInUse, match=f"pid {process.pid}"):  # alive: refused
        RunLock.acquire(run_dir)
    assert live_owner(run_dir).pid == process.pid
    with pytest.raises(subprocess.TimeoutExpired):  # asking whether it runs sent it no signal
        process.wait(timeout=0.5)
    process.kill()
    process.wait()
    RunLock.acquire(run_dir).release()  # gone: taken over
    # a pid that runs but was started at another time is a reused pid: the owner is gone
    reused = tmp_path / "reused"
    reused.mkdir()
    host, boot_id = runlock._machine()
    parent = os.getppid()
    (reused / LOCK_FILE).write_text(json.dumps({"host": host, "boot_id": boot_id, "pid": parent, "since": "then",
                                                "process_start": runlock._process_start(parent) + 1}))
    assert live_owner(reused) is None
    RunLock.acquire(reused).release()


def test_without_locks_of_two_launches_starting_together_the_last_to_write_goes_on(tmp_path, monkeypatch):
    """With no locks to serialise on, a launch writes its record, waits 0.5 s and reads it again: if
    another launch wrote its own meanwhile, this one is refused naming it; else it holds the run."""
    _without_locks(monkeypatch)
    lock = RunLock.acquire(tmp_path / "alone")
    try:
        assert lock.os_lock is False and live_owner(tmp_path / "alone").pid == os.getpid()
    finally:
        lock.release()
    other = '{"host": "node7", "pid": 4242, "since": "2026-01-01 00:00:00 +0000", "boot_id": "b", "process_start": 9}'

    def another_launch_writes(seconds):  # while this one waits, the other launch writes its record
        (tmp_path / "contended" / LOCK_FILE).write_text(other)
    slept = _record_sleeps(monkeypatch, then=another_launch_writes)
    with pytest.raises(RunDirectoryInUse) as refused:
        RunLock.acquire(tmp_path / "contended")
    assert slept == [0.5]
    assert str(refused.value).startswith(f"run directory {tmp_path / 'contended'} is in use by another launch (host "
                                         "node7, pid 4242, since 2026-01-01 00:00:00 +0000); ")


def test_a_record_without_process_start_is_judged_by_its_pid(tmp_path):
    """A record on this machine without the process start (written where /proc is missing) names a
    live owner while its pid runs, and nobody once the pid is gone. A pid of another user's process
    counts as running: signalling it is refused (EPERM), which only a live process can refuse."""
    host, boot_id = runlock._machine()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert runlock._process_start(int(ended.stdout)) == -1
    for name, pid, alive in [("running", os.getppid(), True), ("ended", int(ended.stdout), False)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / LOCK_FILE).write_text(json.dumps({"host": host, "boot_id": boot_id, "pid": pid, "since": "then"}))
        assert (live_owner(tmp_path / name) is not None) is alive, name
    init = runlock.Owner(host=host, boot_id=boot_id, pid=1, since="then")  # pid 1: root's, in any container
    as_root = os.geteuid() == 0
    if as_root:  # become nobody (real and effective; root kept as the saved id to come back)
        os.setresuid(65534, 65534, 0)
    try:
        with pytest.raises(PermissionError):
            os.kill(1, 0)
        assert init.alive_here()
    finally:
        if as_root:
            os.setresuid(0, 0, 0)


def test_the_process_start_is_procs_for_any_command_name_and_a_zombie_has_ended(tmp_path):
    """Field 22 of /proc/<pid>/stat read after the command name, which may hold ') ' itself, checked
    against psutil's creation time; a process that has exited but was not yet waited for (a zombie)
    has ended: its record names nobody."""
    import psutil
    script = ("import ctypes, sys; ctypes.CDLL(None).prctl(15, b'x) 1 2 (y', 0, 0, 0); "  # PR_SET_NAME
              "print('named', flush=True); sys.stdin.read()")
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "named\n"
        assert open(f"/proc/{process.pid}/comm").read() == "x) 1 2 (y\n"
        ticks = (psutil.Process(process.pid).create_time() - psutil.boot_time()) * os.sysconf("SC_CLK_TCK")
        start = runlock._process_start(process.pid)
        assert abs(start - ticks) < 0.5, (start, ticks)
        host, boot_id = runlock._machine()
        (tmp_path / LOCK_FILE).write_text(json.dumps({"host": host, "boot_id": boot_id, "pid": process.pid,
                                                      "since": "then", "process_start": start}))
        assert live_owner(tmp_path).pid == process.pid
        process.stdin.close()  # it exits; not waited for, it stays a zombie
        deadline = time.monotonic() + 30
        while psutil.Process(process.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runlock._process_start(process.pid) == -1 and live_owner(tmp_path) is None
    finally:
        process.kill()
        process.wait()


def _elsewhere(run_dir, heartbeat_age: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({"host": "other-node", "boot_id": "x", "pid": os.getpid(), "since": "2026-01-01 00:00:00",
                                "process_start": 1}))
    os.utime(path, (time.time() - heartbeat_age,) * 2)


def test_an_owner_on_another_machine_is_gone_once_its_heartbeat_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "STALE_S", 1.0)
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.2)
    stale = tmp_path / "stale"
    _elsewhere(stale, heartbeat_age=5.0)
    assert live_owner(stale) is None
    RunLock.acquire(stale).release()  # at once: stopped for longer than STALE_S

    beating = tmp_path / "beating"
    _elsewhere(beating, heartbeat_age=0.0)
    assert live_owner(beating).host == "other-node"
    stop = threading.Event()

    def beat():  # the other machine's owner, alive: its heartbeat moves
        while not stop.wait(0.1):
            os.utime(beating / LOCK_FILE)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(RunDirectoryInUse) as refused:
            RunLock.acquire(beating)
        assert str(refused.value).startswith(f"run directory {beating} is in use by another launch (host other-node, "
                                             "pid ") and "since 2026-01-01 00:00:00; its heartbeat goes on); " in str(refused.value)
    finally:
        stop.set()
        thread.join()
    RunLock.acquire(beating).release()  # the heartbeat stopped: after STALE_S it is taken over
    assert (beating / LOCK_FILE).read_text() == ""


def test_another_machines_owner_is_waited_on_for_what_is_left_of_stale_s(tmp_path, monkeypatch):
    """The wait is STALE_S less the heartbeat's age when read: none for a heartbeat stopped longer
    ago, the whole STALE_S for a file whose time is ahead of this machine's clock (its age reads 0)."""
    monkeypatch.setattr(runlock, "STALE_S", 1.0)
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.2)
    slept = _record_sleeps(monkeypatch, then=time.sleep)
    stale = tmp_path / "stale"
    _elsewhere(stale, heartbeat_age=5.0)
    RunLock.acquire(stale).release()
    assert slept == []  # taken over at once
    ahead = tmp_path / "ahead"
    _elsewhere(ahead, heartbeat_age=-30.0)  # the other machine's clock is 30 s ahead
    assert live_owner(ahead).host == "other-node"  # its heartbeat reads 0 s old
    started = time.monotonic()
    RunLock.acquire(ahead).release()
    assert time.monotonic() - started >= 1.0 and set(slept) == {0.05}  # polled every HEARTBEAT_S / 4 ...
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 15.0)
    slept.clear()
    _elsewhere(ahead, heartbeat_age=-30.0)
    RunLock.acquire(ahead).release()
    assert slept == [1.0]  # ... and at least every second


def test_eval_snapshot_of_a_live_run_is_its_newest_complete_checkpoint(holder, tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    weights = {"module.blocks.0.norm1.weight": torch.ones(4), "module._orig_mod.head.bias": torch.arange(3.0)}
    for step in (4, 8):
        (checkpoints / f"step_{step}").mkdir(parents=True)
        save_file({k: v * step for k, v in weights.items()}, checkpoints / f"step_{step}" / "model.safetensors")
        (checkpoints / f"step_{step}" / "config.yaml").write_text(f"run:\n  name: at_step_{step}\n")
    (checkpoints / "step_4" / "COMPLETE").write_text("4\n")  # step_8 is being written: not complete
    (run_dir / "model.safetensors").write_text("weights of an earlier launch")

    assert eval_snapshot(run_dir).directory == run_dir and not eval_snapshot(run_dir).live  # not training
    _, process = holder(run_dir)
    snapshot = eval_snapshot(run_dir)
    assert snapshot.live and snapshot.step == 4 and snapshot.owner.pid == process.pid
    assert snapshot.description == (f"{run_dir} is training (host {socket.gethostname()}, pid {process.pid}, since "
                                    f"{snapshot.owner.since}): its newest complete checkpoint {checkpoints / 'step_4'} (step 4)")
    copied = load_file(snapshot.directory / "model.safetensors")  # a private copy: the wrappers' prefixes removed
    assert sorted(copied) == ["blocks.0.norm1.weight", "head.bias"]
    assert torch.equal(copied["head.bias"], torch.arange(3.0) * 4)
    assert (snapshot.directory / "config.yaml").read_text() == "run:\n  name: at_step_4\n"
    assert snapshot.directory != checkpoints / "step_4" and not snapshot.directory.is_relative_to(run_dir)
    assert snapshot.output_dir(run_dir) == run_dir / "eval_step_4" and (run_dir / "eval_step_4").is_dir()
    assert snapshot.output_dir(run_dir) == run_dir / "eval_step_4"  # a second evaluation of the same step

    (checkpoints / "step_4" / "COMPLETE").unlink()
    with pytest.raises(RunDirectoryInUse, match="is training .* and has no complete checkpoint yet"):
        eval_snapshot(run_dir)


def test_the_record_names_this_process_as_proc_describes_it(tmp_path, monkeypatch):
    """host, pid, since (local time, ISO 8601), the boot id (/proc/sys/kernel/random/boot_id) and the
    process start (field 22 of /proc/<pid>/stat, proc(5)); the heartbeat moves the file's mtime every
    HEARTBEAT_S; release() stops it, empties the record and lets the directory be taken again; so
    does the exit of a launch that never called it."""
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    run_dir = tmp_path / "runs" / "vit_s"  # created with its parents
    before = time.strftime("%Y-%m-%d %H:%M")
    umask = os.umask(0o022)
    try:
        lock = RunLock.acquire(run_dir)
    finally:
        os.umask(umask)
    assert oct(os.stat(run_dir / LOCK_FILE).st_mode & 0o777) == "0o644"  # rw-r--r--, as files are made
    assert lock.os_lock is True  # the kernel's lock: no waiting for other launches' records
    try:
        written = json.loads(os.pread(lock.fd, 4096, 0))
        stat = open(f"/proc/{os.getpid()}/stat").read()
        assert written == {"host": socket.gethostname(), "pid": os.getpid(), "since": written["since"],
                           "boot_id": open("/proc/sys/kernel/random/boot_id").read().strip(),
                           "process_start": int(stat[stat.rindex(")") + 2:].split()[19])}
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}", written["since"])
        assert written["since"][:16] >= before
        first = os.fstat(lock.fd).st_mtime
        deadline = time.monotonic() + 30
        while os.fstat(lock.fd).st_mtime == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.fstat(lock.fd).st_mtime > first  # the heartbeat, a thread named in stack dumps (py-spy, faulthandler)
        assert [t.name for t in threading.enumerate() if t.name.startswith("clsvit")] == ["clsvit-run-lock-heartbeat"]
        with pytest.raises(RunDirectoryInUse, match="is already held by this process"):
            RunLock.acquire(run_dir)
    finally:
        lock.release()
    assert lock.fd == -1 and not lock._heartbeat.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("clsvit")]
    assert (run_dir / LOCK_FILE).read_text() == "" and live_owner(run_dir) is None
    lock.release()  # a second release (atexit after an explicit one) does nothing
    RunLock.acquire(run_dir).release()

    # A launch that exits without release(): the heartbeat thread does not keep it alive (a daemon),
    # and the lock is released at exit. Its standard input is closed here, so its lock file gets
    # descriptor 0 (a launch detached from any terminal).
    script = ("import sys; from pathlib import Path; from clsvit.runlock import RunLock; "
              "print(RunLock.acquire(Path(sys.argv[1])).fd)")
    done = subprocess.run([sys.executable, "-c", script, str(run_dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=20, preexec_fn=lambda: os.close(0))
    assert done.returncode == 0 and done.stdout == "0\n", done.stderr
    assert (run_dir / LOCK_FILE).read_text() == "" and live_owner(run_dir) is None


def test_a_relative_run_directory_is_released_after_a_chdir(tmp_path, monkeypatch):
    """The lock remembers the directory it holds as resolved when taken: a launch that changes its
    working directory afterwards still releases it, and can take it again."""
    monkeypatch.chdir(tmp_path)
    lock = RunLock.acquire(Path("run"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    lock.release()
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""
    monkeypatch.chdir(tmp_path)
    RunLock.acquire(Path("run")).release()  # not "already held by this process"


def test_one_process_holds_its_run_directory_until_released(tmp_path):
    accelerator = Accelerator(cpu=True)
    lock = hold_run_directory(tmp_path / "run", accelerator)
    try:
        assert isinstance(lock, RunLock) and live_owner(tmp_path / "run").pid == os.getpid()
        with pytest.raises(RunDirectoryInUse, match="is already held by this process"):
            hold_run_directory(tmp_path / "run", accelerator)
    finally:
        lock.release()
    assert live_owner(tmp_path / "run") is None


def _two_process_hold(run_dir, results):
    """One of two processes of a launch: take the run directory and record the outcome."""
    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a one-process pytest
    accelerator = Accelerator(cpu=True)
    try:
        lock = hold_run_directory(run_dir, accelerator)
        outcome = ["held" if lock is not None else "waited", live_owner(run_dir).pid == os.getpid()]
        accelerator.wait_for_everyone()  # the main process keeps the lock until the other has looked
        if lock is not None:
            lock.release()
    except RunDirectoryInUse as error:
        outcome = ["refused", str(error)]
    except SystemExit as exited:
        outcome = ["exit", exited.code]
    (results / f"rank{accelerator.process_index}.json").write_text(json.dumps(outcome))


def test_of_two_processes_the_main_one_takes_the_lock_and_a_refusal_stops_both(holder, tmp_path):
    """The main process takes the lock, the other only waits for the outcome; when another launch
    owns the directory, the main process raises the one line and the other exits with status 2."""
    hold_run_directory(tmp_path / "alone", Accelerator(cpu=True)).release()  # one process: it holds the lock itself
    free = tmp_path / "free"
    results = tmp_path / "results"
    results.mkdir()
    debug_launcher(_two_process_hold, args=(free, results), num_processes=2)
    assert [json.loads((results / f"rank{rank}.json").read_text()) for rank in (0, 1)] == \
        [["held", True], ["waited", False]]
    assert live_owner(free) is None  # released

    run_dir, process = holder(tmp_path / "owned")
    debug_launcher(_two_process_hold, args=(run_dir, results), num_processes=2)
    main, other = (json.loads((results / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert main[0] == "refused" and f"pid {process.pid}" in main[1] and other == ["exit", 2]
