"""One launch per run directory: the lock a launch holds on its run directory, and who holds it.

A run directory is owned by one launch at a time. The launch's main process holds an exclusive
POSIX lock (``fcntl.lockf``) on ``<run>/run.lock`` from before anything in the directory is touched
until it exits. The kernel drops the lock when the process ends, however it ends (SIGKILL
included), so a crash never leaves a stale lock. (A POSIX lock also ends when its process closes
*any* descriptor of the file: only this module opens it, and never a second time in the owner.)
The file's content names the owner as JSON: host, pid, the process's start time (kernel ticks since
boot, and the boot's id) and since when it holds the run; the file's modification time is the
owner's heartbeat, touched every ``HEARTBEAT_S`` seconds. The file is never deleted (deleting a lock
file races with a process about to lock it); a clean exit empties it.

A second launch is refused in one line naming the run directory and the owner. The decision:

1. Another process holds the lock: refused at once. NFS, GPFS and Lustre mounted with ``flock``
   show the lock on every node.
2. The lock is granted, or the filesystem keeps no locks (Lustre without ``flock``, NFS mounted
   ``nolock``: then the record alone decides, and a launch reads the record again after writing it,
   so that of two launches starting together only the last writer goes on). If the record names a
   previous owner:
   - on this machine (same host name and boot id), it is taken over when that pid is gone or now
     belongs to a process started at another time (a reused pid), and refused while it runs;
   - on another machine, whose pids cannot be checked and whose locks may be invisible here (Lustre
     ``localflock``, NFS ``local_lock``), the heartbeat decides: taken over once it has stopped for
     ``STALE_S`` seconds (a relaunch on another node right after a node loss or a SIGKILL waits for
     that, at most ``STALE_S``), refused as soon as it moves.

So a relaunch after the owner died resumes as any relaunch does. Only the main process of a launch
takes the lock; the others wait for its outcome (one broadcast), so no process of a refused launch
touches the directory.

:func:`live_owner` tells a reader (eval.py, through :func:`clsvit.checkpoint.eval_snapshot`) whether a
launch trains the run right now, without disturbing it.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import broadcast_object_list

from clsvit.errors import InputError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 15.0  # the owner touches the lock file this often
STALE_S = 60.0  # an owner on another machine whose heartbeat stopped this long is gone
_HELD = (errno.EAGAIN, errno.EACCES)  # lockf: another process holds the lock
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # the filesystem keeps no locks
_HELD_HERE: dict[Path, "RunLock"] = {}  # run directories this process holds: it must not open their lock files again


class RunDirectoryInUse(InputError):
    """Another launch owns the run directory; the message is one line naming it and the owner."""


# ---------------------------------------------------------------- who owns a run directory


def _machine() -> tuple[str, str | None]:
    """(host name, boot id): two machines, or two boots of one machine, never share both."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = None
    return socket.gethostname(), boot_id


def _process_start(pid: int) -> int | None:
    """The kernel's start time of `pid` (ticks since boot; field 22 of /proc/<pid>/stat); -1 for a
    process that has ended (a zombie waiting for its parent included), None where /proc is missing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return -1
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces; fields 3.. follow ")"
    return -1 if fields[0] in ("Z", "X") else int(fields[19])


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


@dataclass(frozen=True)
class Owner:
    """The record in a run's lock file."""

    host: str
    pid: int
    since: str  # local time the launch took the run, ISO 8601
    boot_id: str | None = None
    process_start: int | None = None
    heartbeat_age: float | None = None  # seconds since the owner last touched the lock file (when read)

    @classmethod
    def this_process(cls) -> "Owner":
        host, boot_id = _machine()
        return cls(host=host, pid=os.getpid(), since=time.strftime("%Y-%m-%d %H:%M:%S %z"),
                   boot_id=boot_id, process_start=_process_start(os.getpid()))

    def to_json(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "since": self.since, "boot_id": self.boot_id,
                           "process_start": self.process_start}) + "\n"

    @classmethod
    def from_file(cls, fd: int) -> "Owner | None":
        """The record behind `fd`; None when the file is empty (no owner) or not a record (being
        written: the caller reads again)."""
        data = os.pread(fd, 4096, 0)
        if not data.strip():
            return None
        try:
            record = json.loads(data)
            return cls(host=str(record["host"]), pid=int(record["pid"]), since=str(record["since"]),
                       boot_id=record.get("boot_id"), process_start=record.get("process_start"),
                       heartbeat_age=max(0.0, time.time() - os.fstat(fd).st_mtime))
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def on_this_machine(self) -> bool:
        return (self.host, self.boot_id) == _machine()

    def alive_here(self) -> bool:
        """On this machine: the pid runs and is the same process (not a reused pid)."""
        if not _pid_exists(self.pid):
            return False
        start = _process_start(self.pid)
        return start is None or self.process_start is None or start == self.process_start

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.since}"


def _refusal(run_dir: Path, owner: Owner | None, detail: str = "") -> RunDirectoryInUse:
    who = owner.describe() if owner else "a process that has not written its record yet"
    return RunDirectoryInUse(f"run directory {run_dir} is in use by another launch ({who}{detail}); "
                             f"one launch trains a run at a time: wait for it to end or stop it "
                             f"(lock file {run_dir / LOCK_FILE})")


# ---------------------------------------------------------------- the owner's side


class RunLock:
    """The exclusive hold of one run directory by this process, until it exits or :meth:`release`."""

    def __init__(self, run_dir: Path, fd: int, os_lock: bool):
        self.run_dir, self.path, self.fd, self.os_lock = run_dir, run_dir / LOCK_FILE, fd, os_lock
        self._held_as = run_dir.resolve()  # resolved now: a relative run_dir means another path after a chdir
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="clsvit-run-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        _HELD_HERE[self._held_as] = self
        atexit.register(self.release)

    @classmethod
    def acquire(cls, run_dir: Path, *, attempts: int = 10) -> "RunLock":
        """Take `run_dir` for this process, or raise RunDirectoryInUse naming the owner. Creates
        the directory and its lock file, and nothing else, before the decision."""
        run_dir = Path(run_dir)
        if run_dir.resolve() in _HELD_HERE:
            raise RunDirectoryInUse(f"run directory {run_dir} is already held by this process")
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os_lock = _lock(fd, run_dir, attempts)
            previous = _read_record(fd)
            if previous is not None and not (previous.on_this_machine and previous.pid == os.getpid()):
                _check_gone(previous, run_dir)
            me = Owner.this_process()
            _write_record(fd, me)
            if not os_lock:  # no lock to serialise on: of launches starting together, the last to write wins
                time.sleep(0.5)
                now = _read_record(fd)
                if now is None or (now.host, now.pid) != (me.host, me.pid):
                    raise _refusal(run_dir, now)
        except BaseException:
            os.close(fd)  # releases the lock, if this process took it
            raise
        return cls(run_dir, fd, os_lock)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.fd)
            except OSError:
                pass

    def release(self) -> None:
        """Empty the record and drop the lock (at exit; a killed process's lock is dropped by the
        kernel, and its record is recognised as stale)."""
        if self.fd < 0 or os.getpid() != self.pid:  # a forked child (DataLoader worker) owns nothing
            return
        self._stop.set()
        self._heartbeat.join(timeout=5)
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1
        del _HELD_HERE[self._held_as]


def _lock(fd: int, run_dir: Path, attempts: int) -> bool:
    """Exclusive lock on `fd`: True when held, False when the filesystem has no locks. While
    another process holds it, a few short retries cover a launch that has just taken the lock but
    not yet written its record (and eval.py's brief shared lock); then RunDirectoryInUse."""
    owner = None
    for _ in range(attempts):
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as error:
            if error.errno in _NO_LOCKS:
                return False
            if error.errno not in _HELD:
                raise
        owner = _read_record(fd, retries=1)
        if owner is not None and owner.on_this_machine and not owner.alive_here():
            owner = None  # the record of a dead owner: the new one is about to write its own
        if owner is not None:
            break
        time.sleep(0.2)
    raise _refusal(run_dir, owner)


def _read_record(fd: int, retries: int = 10) -> Owner | None:
    """The record, reading again while it is being written (a torn record is not JSON)."""
    for _ in range(retries):
        owner = Owner.from_file(fd)
        if owner is not None or not os.pread(fd, 1, 0):
            return owner
        time.sleep(0.05)
    return None


def _check_gone(previous: Owner, run_dir: Path) -> None:
    """Raise RunDirectoryInUse unless the owner named in the record is provably gone."""
    if previous.on_this_machine:
        if previous.alive_here():
            raise _refusal(run_dir, previous)
        return
    # Another machine: gone once its heartbeat has stopped for STALE_S. The file is stat-ed by path:
    # opening and closing a second descriptor would drop this process's POSIX lock.
    path = run_dir / LOCK_FILE
    first_mtime = path.stat().st_mtime
    deadline = time.monotonic() + max(0.0, STALE_S - (previous.heartbeat_age or 0.0))
    while time.monotonic() < deadline:
        if path.stat().st_mtime != first_mtime:
            raise _refusal(run_dir, previous, "; its heartbeat goes on")
        time.sleep(min(1.0, HEARTBEAT_S / 4))


def _write_record(fd: int, owner: Owner) -> None:
    data = owner.to_json().encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def hold_run_directory(run_dir: Path, accelerator) -> RunLock | None:
    """Called by every process of a launch before any of them touches `run_dir`: the main process
    takes the lock (held until it exits), the others wait for the outcome. A refused launch raises
    RunDirectoryInUse on the main process (the one line to print) and exits with status 2 on the
    others, silently."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock.acquire(run_dir)
        except Exception as caught:  # noqa: BLE001 — the others must learn of any failure, then it is re-raised
            error = caught
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list([error is not None])
        if outcome[0] and not accelerator.is_main_process:
            raise SystemExit(2)
    if error is not None:
        raise error
    return lock


# ---------------------------------------------------------------- the reader's side


def live_owner(run_dir: Path) -> Owner | None:
    """The owner of a launch training `run_dir` right now, or None. Never blocks the owner: the
    shared lock that probes the exclusive one is dropped at once."""
    held = _HELD_HERE.get(Path(run_dir).resolve())
    if held is not None:  # this process: opening the file again would drop its lock
        return Owner.from_file(held.fd)
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.lockf(fd, fcntl.LOCK_UN)
        except OSError as error:
            if error.errno in _HELD:  # the exclusive lock is held: a launch owns the run
                return _read_record(fd) or Owner(host="?", pid=-1, since="?")
            if error.errno not in _NO_LOCKS:
                raise
        owner = _read_record(fd)  # no lock held (or no locks): the record decides, as for a launch
        if owner is None:
            return None
        if owner.on_this_machine:
            return owner if owner.alive_here() else None
        return owner if (owner.heartbeat_age or 0.0) < STALE_S else None
    finally:
        os.close(fd)
