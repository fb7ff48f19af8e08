"""The one error type for bad input: a recipe, an override, a data path or layout, a checkpoint, a run
directory in use. Entry points catch only this type and print its message as one line; every other
exception is a bug and keeps its traceback."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user; the message is one line naming the key, file or value."""
