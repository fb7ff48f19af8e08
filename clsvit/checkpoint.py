"""Checkpoints that are never half-written, and finding the one to resume from.

A checkpoint is `accelerator.save_state` (model, optimizer, grad scaler, every process's RNG
states, plus the objects registered with `register_for_checkpointing`: LR schedule, EMA, the
trainer's progress) written into `checkpoints/.step_<N>.partial/`, completed with a `COMPLETE`
marker, and only then renamed to `checkpoints/step_<N>/`. A rename within one directory is atomic,
so a run killed at any moment leaves either the previous checkpoints or the new one — never a
directory that looks complete and is not. Leftover `.partial` directories are deleted on start.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = complete_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def remove_partial_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Delete what a killed save left behind (main process only)."""
    if not checkpoint_dir.is_dir():
        return []
    partial = [p for p in checkpoint_dir.iterdir()
               if p.name.endswith(".partial") or (_STEP_DIR.match(p.name) and not (p / COMPLETE_MARKER).is_file())]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, step: int, keep: int) -> Path:
    """Save the full training state for `step` atomically; keep the newest `keep` checkpoints.

    Every process takes part (each saves its own RNG state). Raises if the write fails on any
    process — the previous checkpoints are untouched in that case."""
    final = checkpoint_dir / f"step_{step}"
    partial = checkpoint_dir / f".step_{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / COMPLETE_MARKER).write_text(f"{step}\n")
        _fsync_dir(partial)
        if final.exists():  # a checkpoint for this step already exists (e.g. the final one again)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(checkpoint_dir)
        for old in complete_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk so a rename survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
