"""The entry points' way out (train.py, eval.py, clsvit.export, clsvit.sweep): bad input
(clsvit.errors.InputError) ends in one line and exit status 2; any other exception is a bug and
leaves with its full traceback."""

from __future__ import annotations

import os
import sys
from typing import Callable

from clsvit.errors import InputError

WORKER_TRACEBACK = "Original Traceback"  # how torch's re-raise of a DataLoader worker's error begins its traceback


def error_line(program: str, error: InputError) -> str:
    """The one line an entry point prints for bad input. An error raised in a DataLoader worker
    arrives with the worker's traceback in its message (torch's ``ExceptionWrapper``): its last line
    is ``module.Type: message``, and the message is what is shown. Under several processes the line
    names the process that raised."""
    text = str(error).strip()
    if WORKER_TRACEBACK in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f" (process {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""
    return f"{program}: error{where}: {text}"


def run(program: str, main: Callable[[], object]) -> None:
    """Call `main`; exit with its return value (an int status, else 0), or with status 2 and one
    line on stderr for bad input."""
    try:
        status = main()
    except InputError as error:
        # one write of the line and its newline: under PYTHONUNBUFFERED (scripts/slurm.sh) print() writes
        # them apart, and the processes of a launch that share one stderr would join their lines
        sys.stderr.write(error_line(program, error) + "\n")
        sys.stderr.flush()
        sys.exit(2)
    sys.exit(status if isinstance(status, int) else 0)
