"""The entry points' way out (clsvit.cli): bad input ends in one line and exit status 2, also when a
DataLoader worker raised it; every other exception is a bug and keeps its full traceback."""

from __future__ import annotations

import importlib
import io
import os
import pkgutil
import subprocess
import sys

import pytest
from torch.utils.data import DataLoader, Dataset

import clsvit
from clsvit import cli
from clsvit.config import ConfigError
from clsvit.errors import InputError
from trainer_utils import run_train, subprocess_env, write_tiny_recipe


def exit_of(main, capsys) -> tuple[int, str]:
    """(exit status, stderr) of cli.run("train.py", main)."""
    with pytest.raises(SystemExit) as exited:
        cli.run("train.py", main)
    return exited.value.code, capsys.readouterr().err


def raising(error):
    def main():
        raise error
    return main


def test_bad_input_is_one_line_with_status_2(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    error = ConfigError("unknown key 'optim.lrr' in override 'optim.lrr=1'; did you mean 'optim.lr'?")
    assert exit_of(raising(error), capsys) == (2, f"train.py: error: {error}\n")


def test_the_line_names_the_process_under_several(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert exit_of(raising(InputError("data.path 'x' does not exist")), capsys) == \
        (2, "train.py: error (process 1 of 2): data.path 'x' does not exist\n")


class Writes(io.RawIOBase):
    """A raw stream that records the bytes of each write call it gets (each a write(2) on a real file)."""
    def __init__(self):
        self.calls = []

    def writable(self):
        return True

    def write(self, data):
        self.calls.append(bytes(data))
        return len(data)


@pytest.mark.parametrize("unbuffered", [True, False])
def test_the_line_and_its_newline_reach_stderr_in_one_write(monkeypatch, unbuffered):
    """Under several processes sharing one stderr, each line must be one write, or two processes'
    lines join into one. The stream is built as Python builds sys.stderr, with and without
    PYTHONUNBUFFERED (read from a subprocess: a write-through wrapper over the unbuffered file, or a
    line-buffered one over a buffered writer)."""
    probe = "import sys; e = sys.stderr; print(e.write_through, e.line_buffering, type(e.buffer).__name__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | (
        {"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    layout = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                            check=True).stdout.split()
    assert layout == (["True", "False", "FileIO"] if unbuffered else ["False", "True", "BufferedWriter"])
    raw = Writes()
    stream = io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding="utf-8",
                              write_through=unbuffered, line_buffering=not unbuffered)
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        cli.run("train.py", raising(InputError("data.path 'x' does not exist")))
    assert raw.calls == [b"train.py: error (process 1 of 2): data.path 'x' does not exist\n"]


def test_a_finished_main_exits_with_its_status(capsys):
    assert exit_of(lambda: 1, capsys) == (1, "")
    assert exit_of(lambda: {"cls.top1": 50.0}, capsys) == (0, "")  # eval.py's main returns its results


@pytest.mark.parametrize("bug", [ValueError("a bug in the code"), OSError("No such file: /tmp/x"),
                                 KeyError("model")])
def test_any_other_exception_is_not_caught(bug):
    with pytest.raises(type(bug)) as raised:
        cli.run("train.py", raising(bug))
    assert raised.value is bug  # the very exception, with its traceback


class Raising(Dataset):
    def __init__(self, error):
        self.error = error

    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise self.error


def first_batch(error):
    return lambda: next(iter(DataLoader(Raising(error), num_workers=1)))


def clsvit_input_errors() -> list[type]:
    """InputError and every subclass clsvit defines (all its modules imported)."""
    for module in pkgutil.walk_packages(clsvit.__path__, "clsvit."):
        importlib.import_module(module.name)
    found, todo = [], [InputError]
    while todo:
        kind = todo.pop()
        found.append(kind)
        todo.extend(kind.__subclasses__())
    return sorted(found, key=lambda kind: kind.__name__)


@pytest.mark.parametrize("kind", clsvit_input_errors(), ids=lambda kind: kind.__name__)
def test_bad_input_raised_in_a_dataloader_worker_is_one_line(kind, capsys, monkeypatch):
    """torch re-raises a worker's error in the main process as its own type built from one string
    (the worker's traceback); a type that cannot be built so would arrive as a RuntimeError."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    message = "sample /data/train/c/7.png (row 33): label 2 is outside [0, 2)"
    assert exit_of(first_batch(kind(message)), capsys) == (2, f"train.py: error: {message}\n")


def test_a_bug_in_a_dataloader_worker_keeps_the_workers_traceback():
    with pytest.raises(ValueError, match=r"(?s)Caught ValueError in DataLoader worker process 0\.\n"
                                         r"Original Traceback .*__getitem__.*ValueError: a bug$"):
        cli.run("train.py", first_batch(ValueError("a bug")))


@pytest.mark.slow
def test_train_py_shows_the_traceback_of_an_internal_error(tmp_path):
    """A ValueError raised inside the optimizer step (as a bug in torch or numpy would) is not bad
    input: train.py ends with Python's traceback, not with its one-line error."""
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    result = run_train(recipe, "train.max_steps=4", env=subprocess_env(tmp_path / "hf_cache"), check=False,
                       fault="bug:2")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback (most recent call last):" in result.stderr and "in main" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "ValueError: injected failure at optimizer step 2 on process 0"
    assert "train.py: error" not in result.stderr
