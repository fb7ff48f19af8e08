"""The one error type for bad input: a recipe, an override, a data path or layout, a checkpoint, a run
directory in use, and what the environment refuses (a full disk under a checkpoint, a hub upload).
Entry points catch only this type (clsvit.cli) and print its message as one line; every other
exception is a bug and keeps its traceback."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user; the message is one line naming the key, file or value.

    A subclass takes the message as its one argument: torch re-raises an error of a DataLoader
    worker in the main process by calling its type with one string (``ExceptionWrapper.reraise`` in
    torch/_utils.py), and a type that cannot be built so arrives as a RuntimeError, a bug's type."""


def quote_error(error: BaseException) -> str:
    """Another error as a part of a one-line message: its type and the first line of its text, cut at
    200 characters (``OSError: image file is truncated``), or its type alone when it says nothing."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__
