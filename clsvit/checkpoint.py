"""A run's weights on disk: checkpoints that are never half-written, finding the one to resume from,
the exported weights file, and reading a run back (`load_run`; `eval_snapshot`, also while it trains).

A checkpoint is `accelerator.save_state` (model, optimizer, grad scaler, every process's RNG
states, plus the objects registered with `register_for_checkpointing`: LR schedule, EMA, the
trainer's progress) and the resolved recipe (config.yaml, which a resume is checked against) written into `checkpoints/.step_<N>.partial/`, completed with a `COMPLETE`
marker, and only then renamed to `checkpoints/step_<N>/`. A rename within one directory is atomic,
so a run killed at any moment leaves either the previous checkpoints or the new one — never a
directory that looks complete and is not. Old checkpoints are renamed to `.step_<N>.removing`
before they are deleted, for the same reason. Leftover hidden directories are deleted on start.

A write that fails (a full disk, a lost mount) on any process fails on every process: the
processes agree on the outcome with one collective, the partial directory is removed, and
:class:`CheckpointError` names the process and the error. The run then stops — it never goes on
believing it saved — and the previous checkpoints are untouched.

eval.py on a run that is training reads a consistent snapshot (`eval_snapshot`): the newest complete
checkpoint (its weights and the config it was trained with, copied out at once, before the training
rotates it away), never the run's `model.safetensors` (left by an earlier, finished launch), and
writes its results into `<run>/eval_step_<N>/`, not into the training's `eval.json` and TensorBoard
events. Whether the run trains right now, the run's lock says (`clsvit.runlock.live_owner`).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load, save_file
from torch import nn

from clsvit.config import load_config, save_config
from clsvit.errors import InputError
from clsvit.model import build_model, is_specialized, specialized_tokens, tokens_metadata, weights_path
from clsvit.runlock import Owner, RunDirectoryInUse, live_owner

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


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


class CheckpointError(InputError):
    """A checkpoint could not be written on some process for a reason of the environment (an OSError:
    a full disk, a quota, permissions); the earlier checkpoints are intact."""


def remove_partial_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Delete what a killed save or clean-up left behind (main process only)."""
    if not checkpoint_dir.is_dir():
        return []
    partial = [p for p in checkpoint_dir.iterdir()
               if p.name.startswith(".step_") or (_STEP_DIR.match(p.name) and not (p / COMPLETE_MARKER).is_file())]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, step: int, keep: int,
                    config: dict | None = None) -> Path:
    """Save the full training state for `step` atomically; keep the newest `keep` checkpoints.
    `config` (the resolved recipe) is saved inside it as config.yaml, before it is marked complete.

    Every process takes part (each saves its own RNG state). If the write fails on any process,
    every process raises :class:`CheckpointError` and the previous checkpoints are untouched."""
    final = checkpoint_dir / f"step_{step}"
    if final in complete_checkpoints(checkpoint_dir):  # this very state is already on disk (resumed at the end)
        return final
    partial = checkpoint_dir / f".step_{step}.partial"

    def write(action) -> None:
        """Run `action` (on the processes that have one), then agree with the others on the outcome."""
        error, failure = None, None
        try:
            if action is not None:
                action()
        except Exception as caught:  # noqa: BLE001 — the others must learn of any failure, then it is raised
            failure = caught
            error = (f"process {accelerator.process_index}: {type(caught).__name__}: {caught}",
                     isinstance(caught, OSError))
        failed = accelerator.reduce(torch.tensor(float(error is not None)).to(accelerator.device, non_blocking=True),
                                    "sum")
        if failed.item() == 0:
            return
        errors = [e for e in gather_object([error]) if e]
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        previous = latest_checkpoint(checkpoint_dir)
        message = (f"the checkpoint for step {step} could not be written ({errors[0][0]}); "
                   f"{f'{previous} is intact' if previous else 'no earlier checkpoint exists'}: "
                   f"fix the cause and relaunch to resume")
        if all(environment for _, environment in errors):
            raise CheckpointError(message)
        if failure is not None and not isinstance(failure, OSError):
            raise failure  # a bug: its own traceback
        raise RuntimeError(message)

    def prepare() -> None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)

    def save_state() -> None:
        accelerator.save_state(str(partial))
        if main and config is not None:
            save_config(config, partial / "config.yaml")

    main = accelerator.is_main_process
    write(prepare if main else None)  # each write() ends in a collective: it is also the barrier
    write(save_state)
    write((lambda: _publish(partial, final, checkpoint_dir, step)) if main else None)
    if main:
        for old in complete_checkpoints(checkpoint_dir)[:-keep]:
            _remove(old)
    return final


def _publish(partial: Path, final: Path, checkpoint_dir: Path, step: int) -> None:
    """Mark the partial directory complete, flush it, and rename it into place."""
    (partial / COMPLETE_MARKER).write_text(f"{step}\n")
    _fsync_dir(partial)
    os.replace(partial, final)
    _fsync_dir(checkpoint_dir)


def _remove(checkpoint: Path) -> None:
    """Hide a checkpoint with one atomic rename, then delete it: a kill mid-delete leaves no
    half-deleted directory that still carries its COMPLETE marker."""
    hidden = checkpoint.with_name(f".{checkpoint.name}.removing")
    os.replace(checkpoint, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """A model's weights as float32 safetensors, written to a hidden name and renamed into place
    (never half-written): the run's exported `model.safetensors`. Its metadata records the tokens a
    specialized model's copies are for (clsvit.model.TOKENS_METADATA)."""
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=tokens_metadata(specialized_tokens(model)))
    os.replace(tmp, path)


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


# ---------------------------------------------------------------- reading a run back


def load_run(run_dir: str | Path, overrides: tuple[str, ...] | list[str] = (), device: str | torch.device = "cpu",
             report: Callable[[str], Any] | None = None, overlays: tuple = ()) -> tuple[nn.Module, dict]:
    """Rebuild a trained model from its run directory (config.yaml + model.safetensors), with
    `overlays` (partial recipes) and command-line `overrides` applied to its config
    (`model.img_size=384` resizes the position embeddings; a `model.specialize` the run did not use
    clones the copies it lacks)."""
    run_dir = Path(run_dir)
    weights = weights_path(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides, overlays=overlays)
    model = build_model(cfg["model"], pretrained=weights, report=report)
    return model.to(device).eval(), cfg


@dataclass(frozen=True)
class EvalSnapshot:
    """What eval.py evaluates: `directory` holds config.yaml and model.safetensors."""

    directory: Path
    description: str  # one line for the user: which weights, from where
    owner: Owner | None = None  # the launch training the run, when it is live
    step: int | None = None  # the checkpoint's step (live runs)

    @property
    def live(self) -> bool:
        return self.owner is not None

    def output_dir(self, run_dir: Path) -> Path:
        """Where eval.py writes: the run directory, or for a live run `<run>/eval_step_<N>/` (its own
        eval.json, figures and TensorBoard events; the run's belong to the training until it ends)."""
        if not self.live:
            return Path(run_dir)
        directory = Path(run_dir) / f"eval_step_{self.step}"
        directory.mkdir(exist_ok=True)
        return directory


def eval_snapshot(run_dir: Path) -> EvalSnapshot:
    """The final weights of a run that is not training; for one that is, a private copy of its
    newest complete checkpoint's weights and config (the training keeps `train.keep_checkpoints`
    and deletes older ones, so the copy is taken at once, again if the chosen one has just gone)."""
    run_dir = Path(run_dir)
    owner = live_owner(run_dir)
    if owner is None:
        return EvalSnapshot(run_dir, f"the final weights {run_dir / 'model.safetensors'}")
    for _ in range(5):
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            raise RunDirectoryInUse(f"run directory {run_dir} is training ({owner.describe()}) and has no complete "
                                    f"checkpoint yet; evaluate it after its first checkpoint (train.checkpoint_every)")
        try:
            copy = _copy_checkpoint_weights(checkpoint)
        except FileNotFoundError:  # rotated away meanwhile: take the newest again
            continue
        step = checkpoint_step(checkpoint)
        return EvalSnapshot(copy, f"{run_dir} is training ({owner.describe()}): its newest complete checkpoint "
                                  f"{checkpoint} (step {step})", owner=owner, step=step)
    raise RunDirectoryInUse(f"run directory {run_dir}: its checkpoints were replaced faster than they could be read")


def _copy_checkpoint_weights(checkpoint: Path) -> Path:
    """config.yaml and the model's weights of an accelerate checkpoint, in a private temporary
    directory (removed at exit), with the wrappers' key prefixes (DDP `module.`, torch.compile
    `_orig_mod.`, in either order: accelerate compiles the DDP-wrapped model) removed and the tokens
    of its copies recorded (as `save_weights` records them), so that load_run reads it like a
    finished run."""
    config = (checkpoint / "config.yaml").read_bytes()
    spec = load_config(checkpoint / "config.yaml")["model"]["specialize"]
    state = load((checkpoint / "model.safetensors").read_bytes())
    clean = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        clean[key] = value
    directory = Path(tempfile.mkdtemp(prefix=f"clsvit-eval-{checkpoint.name}-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    (directory / "config.yaml").write_bytes(config)
    save_file(clean, str(directory / "model.safetensors"),
              metadata=tokens_metadata(spec["tokens"] if is_specialized(spec) else None))
    return directory


def same_snapshot_on_every_process(snapshot: EvalSnapshot, accelerator) -> None:
    """Under several eval processes, each chose its snapshot on its own: a checkpoint published
    in between would make them evaluate different weights. One gather checks they agree."""
    if accelerator.num_processes == 1:
        return
    steps = gather_object([snapshot.step])
    if len(set(steps)) > 1:
        raise RunDirectoryInUse(f"the eval processes read different checkpoints of the training run (steps {steps}); "
                                f"a checkpoint was published while they started: run eval.py again")
