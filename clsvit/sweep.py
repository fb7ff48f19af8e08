"""Ablation grids: recipes x value lists x seeds, one run directory per cell, launched locally or
as one SLURM job array.

    python -m clsvit.sweep recipes/shapes/baseline.yaml recipes/shapes/specialized.yaml --seeds 0 1 2
    python -m clsvit.sweep recipes/ablations/*.yaml --seeds 0 1 --set optim.lr=2e-3,4e-3 --launcher slurm
    python -m clsvit.sweep RECIPES... [--seeds S...] [--set key=v1,v2 ...] [--name NAME]
                           [--launcher local|slurm] [--parallel N] [--dry-run] [section.key=value ...]

Every cell is one train.py run in `<run.root>/<sweep name>/<cell name>/`, the cell name made of the
recipe's run.name, the swept values and the seed (`shapes_specialized_lr0.002_seed1`), so the same
command always maps to the same directories: relaunching it skips finished cells (those with a
`model.safetensors`) and resumes unfinished ones from their newest checkpoint. The grid is recorded in
`<run.root>/<sweep name>/sweep.json` (every cell's recipe, values, seed, directory and command). The
sweep directory is the TensorBoard logdir of the grid: `tensorboard --logdir runs/<sweep name>`.

Launchers: `local` runs the cells one after another (`--parallel N`: N at a time, each with its own
share of the visible GPUs); `slurm` submits one job array of scripts/slurm.sh, one array task per
unfinished cell (`--parallel N`: at most N at once), with the same time-limit checkpoint and requeue
as a single job; sbatch options (nodes, GPUs, time, partition, account) come from `--sbatch "..."`
or SBATCH_* environment variables. Each cell's output goes to `<cell dir>/train.log`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from clsvit import cli
from clsvit.config import ConfigError, load_config, recipe_leaves
from clsvit.errors import InputError
from clsvit.ranges import index_ranges

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "train.py"
SLURM_SCRIPT = REPO / "scripts" / "slurm.sh"
MANIFEST = "sweep.json"
CELL_LOG = "train.log"
FINISHED_MARK = "model.safetensors"  # train.py writes it once, after the last step


@dataclass
class Cell:
    name: str
    recipe: str
    seed: int
    values: dict[str, str]  # swept key -> value as given on the command line
    run_dir: str
    overrides: list[str] = field(default_factory=list)  # train.py's overrides for this cell

    @property
    def train_args(self) -> list[str]:
        return ["--config", self.recipe, *self.overrides]

    @property
    def finished(self) -> bool:
        return (Path(self.run_dir) / FINISHED_MARK).is_file()

    @property
    def started(self) -> bool:
        return (Path(self.run_dir) / "checkpoints").is_dir()

    @property
    def log(self) -> Path:
        return Path(self.run_dir) / CELL_LOG

    @property
    def status(self) -> str:
        return "finished" if self.finished else "resumes" if self.started else "new"


def split_values(text: str) -> list[str]:
    """'1e-3,3e-3' -> ['1e-3', '3e-3']; commas inside [...] or {...} or quotes belong to the value
    ('[0,1],[0,1,2]' -> two block lists)."""
    values, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    if any(not v for v in values) or depth or quote:
        raise ConfigError(f"--set value list {text!r} is not of the form v1,v2,...")
    return values


def parse_set(items: list[str]) -> dict[str, list[str]]:
    swept = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not of the form section.key=v1,v2")
        if key in swept:
            raise ConfigError(f"--set {key} is given twice")
        swept[key.strip()] = split_values(values)
    return swept


def _label(key: str, swept: dict) -> str:
    """The short name of a swept key in cell names: its last part, unless two swept keys share it."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in swept) == 1 else key


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "empty"


def cell_name(run_name: str, values: dict[str, str], swept: dict, seed: int) -> str:
    parts = [run_name] + [f"{_label(key, swept)}{_slug(value)}" for key, value in values.items()] + [f"seed{seed}"]
    return "_".join(parts)


def default_name(recipes: list[str]) -> str:
    """The recipes' common directory name (`recipes/ablations/*.yaml` -> 'ablations'), else 'sweep'."""
    parents = {Path(r).resolve().parent for r in recipes}
    return parents.pop().name if len(parents) == 1 else "sweep"


def hparams_first(bases: list[dict], swept: dict) -> str:
    """`log.hparams_first` of every cell, the columns TensorBoard's HParams tab shows first: the
    recipe keys in which the sweep's recipes differ (run.name aside: the run is named after the cell),
    then the swept keys, then run.seed. A swept key inside a mapping (model.timm_kwargs.depth) counts
    as the mapping's key, a swept section as its keys."""
    leaves = [dict(recipe_leaves(base)) for base in bases]
    keys = [key for key in leaves[0] if key not in ("run.name", "log.hparams_first")
            and any(other[key] != leaves[0][key] for other in leaves[1:])]
    for swept_key in [*swept, "run.seed"]:
        keys += [key for key in leaves[0] if key == swept_key or swept_key.startswith(key + ".")
                 or key.startswith(swept_key + ".")]
    return ",".join(dict.fromkeys(keys))


def build_grid(recipes: list[str], seeds: list[int] | None, swept: dict[str, list[str]], overrides: list[str],
               name: str) -> tuple[Path, list[Cell]]:
    """Every cell of recipes x swept values x seeds, each config validated (a bad key or value fails
    here, in one line, before anything is launched)."""
    if not recipes:
        raise ConfigError("no recipe given")
    cells, roots, bases = [], set(), []
    for recipe in recipes:
        base = load_config(recipe, overrides)
        bases.append(base)
        roots.add(base["run"]["root"])
        for combination in itertools.product(*swept.values()):
            values = dict(zip(swept, combination))
            for seed in seeds if seeds is not None else [base["run"]["seed"]]:
                cell_overrides = [*overrides, *(f"{key}={value}" for key, value in values.items()),
                                  f"run.seed={seed}"]
                cfg = load_config(recipe, cell_overrides)
                cells.append(Cell(name=cell_name(cfg["run"]["name"], values, swept, seed), recipe=recipe, seed=seed,
                                  values=values, run_dir="", overrides=cell_overrides))
    if len(roots) > 1:
        raise ConfigError(f"the recipes name different run.root ({', '.join(sorted(roots))}); pass run.root=DIR")
    sweep_dir = Path(roots.pop()) / name
    # one HParams layout for the whole sweep (TensorBoard takes it from one run of the logdir); an
    # explicit log.hparams_first among the overrides stands
    columns = [] if any(o.split("=", 1)[0].strip() == "log.hparams_first" for o in overrides) else \
        [f"log.hparams_first={hparams_first(bases, swept)}"]
    seen = {}
    for cell in cells:
        if cell.name in seen:
            raise ConfigError(f"two cells are both named {cell.name!r} ({seen[cell.name]} and {cell.recipe}): "
                              f"give the recipes distinct run.name")
        seen[cell.name] = cell.recipe
        cell.run_dir = str(sweep_dir / cell.name)
        cell.overrides += [f"run.root={sweep_dir}", f"run.name={cell.name}", *columns]
    return sweep_dir, cells


def write_manifest(sweep_dir: Path, cells: list[Cell], command: list[str]) -> Path:
    """sweep.json: the grid's cells by name (merged with the cells of earlier launches of this sweep)."""
    path = sweep_dir / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {"cells": {}, "launches": []}
    manifest["launches"].append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": shlex.join(command)})
    for cell in cells:
        manifest["cells"][cell.name] = {**asdict(cell), "command": shlex.join(train_command(cell))}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def train_command(cell: Cell, launch: list[str] | None = None) -> list[str]:
    return [*(launch or [sys.executable]), str(TRAIN), *cell.train_args]


# ---------------------------------------------------------------------------- local


def _gpu_slots(parallel: int) -> list[list[str]]:
    """The visible GPUs split into `parallel` contiguous shares ([] each on a machine without GPUs)."""
    count = torch.cuda.device_count()
    if count == 0:
        return [[] for _ in range(parallel)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(count)]
    if parallel > len(devices):
        raise ConfigError(f"--parallel {parallel} needs at least {parallel} GPUs, {len(devices)} are visible")
    share = len(devices) // parallel
    return [devices[i * share:(i + 1) * share] for i in range(parallel)]


def _launch_prefix(gpus: list[str], slot: int) -> tuple[list[str], dict]:
    """How one cell is started in a slot: plain python without GPUs; `accelerate launch` (the user's
    `accelerate config` applies) with one process per GPU of the slot, its own rendezvous port."""
    if not gpus:
        return [sys.executable], dict(os.environ)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
              "--num_processes", str(len(gpus))]
    if len(gpus) > 1:
        launch += ["--multi_gpu", "--main_process_port", str(29500 + slot)]
    return launch, {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)}


def run_local(cells: list[Cell], parallel: int) -> list[tuple[Cell, int]]:
    """Runs the cells, `parallel` at a time; each one's output is appended to its train.log."""
    slots = _gpu_slots(parallel)
    queue, running, results = list(cells), {}, []
    while queue or running:
        while queue and len(running) < parallel:
            slot = next(i for i in range(parallel) if i not in running)
            cell = queue.pop(0)
            launch, env = _launch_prefix(slots[slot], slot)
            Path(cell.run_dir).mkdir(parents=True, exist_ok=True)
            log = open(cell.log, "a")
            log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(train_command(cell, launch))}\n")
            log.flush()
            process = subprocess.Popen(train_command(cell, launch), cwd=os.getcwd(), env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
            running[slot] = (cell, process, log)
            print(f"[{len(cells) - len(queue)}/{len(cells)}] {cell.name}: {cell.status}, log {cell.log}", flush=True)
        time.sleep(0.5)
        for slot, (cell, process, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[slot]
                results.append((cell, process.returncode))
                outcome = "finished" if process.returncode == 0 and cell.finished else f"exit {process.returncode}"
                print(f"  {cell.name}: {outcome}", flush=True)
                if process.returncode != 0:
                    tail = cell.log.read_text(errors="replace").splitlines()[-5:]
                    print("    " + "\n    ".join(tail), flush=True)
    return results


# ---------------------------------------------------------------------------- slurm


def sbatch_command(sweep_dir: Path, cells: list[Cell], all_cells: list[Cell], parallel: int | None,
                   extra: list[str]) -> tuple[list[str], Path]:
    """One job array of scripts/slurm.sh: task i runs line i+1 of cells.sh (its log file, recipe,
    overrides), for the indices of `cells` in the full grid."""
    cells_file = sweep_dir / "cells.sh"
    array = index_ranges([all_cells.index(cell) for cell in cells]) + (f"%{parallel}" if parallel else "")
    command = ["sbatch", "--parsable", f"--job-name={sweep_dir.name}", f"--array={array}",
               f"--output={sweep_dir.resolve() / 'slurm'}/%A_%a.out", *extra,
               str(SLURM_SCRIPT), "--cells", str(cells_file.resolve())]
    return command, cells_file


def write_cells_file(path: Path, all_cells: list[Cell]) -> None:
    lines = [shlex.join([str(Path(c.log).resolve()), c.recipe, *c.overrides]) for c in all_cells]
    path.write_text("\n".join(lines) + "\n")


def submit_slurm(sweep_dir: Path, cells: list[Cell], all_cells: list[Cell], parallel: int | None,
                 extra: list[str]) -> str:
    command, cells_file = sbatch_command(sweep_dir, cells, all_cells, parallel, extra)
    write_cells_file(cells_file, all_cells)
    (sweep_dir / "slurm").mkdir(parents=True, exist_ok=True)
    for cell in cells:
        Path(cell.run_dir).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CLSVIT_REPO": str(REPO)}
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise InputError(f"--launcher slurm: {command[0]} is not on PATH (no SLURM here?)") from None
    if result.returncode != 0:
        raise InputError(f"sbatch failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


# ---------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clsvit.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="RECIPE|section.key=value",
                        help="recipe files, then overrides applied to every cell")
    parser.add_argument("--seeds", nargs="+", metavar="SEED", help="run.seed values (default: each recipe's run.seed)")
    parser.add_argument("--set", dest="swept", action="append", default=[], metavar="KEY=V1,V2",
                        help="sweep a key over values (YAML values; repeatable: the product is taken)")
    parser.add_argument("--name", help="sweep name: the directory under run.root (default: the recipes' directory)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--parallel", type=int, help="cells at once (local: default 1; slurm: array throttle)")
    parser.add_argument("--sbatch", default="", help="extra sbatch options, e.g. --sbatch=\"--nodes=2 --time=24:00:00\"")
    parser.add_argument("--dry-run", action="store_true", help="print the cells and their commands, launch nothing")
    args = parser.parse_intermixed_args(argv)
    if args.seeds:  # recipes or overrides written after `--seeds 0 1 2` arrive among the seeds
        args.items += [item for item in args.seeds if not re.fullmatch(r"-?[0-9]+", item)]
        args.seeds = [int(item) for item in args.seeds if re.fullmatch(r"-?[0-9]+", item)]
        if not args.seeds:
            parser.error("--seeds needs at least one integer")
    args.recipes = [item for item in args.items if "=" not in item]
    args.overrides = [item for item in args.items if "=" in item]
    if not args.recipes:
        parser.error("no recipe given")
    if args.parallel is not None and args.parallel < 1:
        parser.error("--parallel must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    name = args.name or default_name(args.recipes)
    if _slug(name) != name:
        raise ConfigError(f"--name {name!r}: use letters, digits and . + - only")
    sweep_dir, cells = build_grid(args.recipes, args.seeds, parse_set(args.swept), args.overrides, name)
    todo = [cell for cell in cells if not cell.finished]
    print(f"sweep {sweep_dir}: {len(cells)} cells, {len(cells) - len(todo)} finished, {len(todo)} to run "
          f"({args.launcher})")
    if args.dry_run:
        for cell in cells:
            print(f"  {cell.name:<48} {cell.status:<9} {shlex.join(train_command(cell))}")
        if args.launcher == "slurm" and todo:
            command, _ = sbatch_command(sweep_dir, todo, cells, args.parallel, shlex.split(args.sbatch))
            print(f"  {shlex.join(command)}")
        return 0
    if not TRAIN.is_file():  # an installed clsvit (pip install .) has no train.py: sweeps run from a checkout
        raise InputError(f"clsvit.sweep launches train.py from a clsvit checkout, and {TRAIN} does not exist; "
                         f"run it from a clone (pip install -e . there)")
    write_manifest(sweep_dir, cells, [sys.executable, "-m", "clsvit.sweep", *(argv if argv is not None else sys.argv[1:])])
    if not todo:
        return 0
    if args.launcher == "slurm":
        job = submit_slurm(sweep_dir, todo, cells, args.parallel, shlex.split(args.sbatch))
        print(f"submitted job array {job}: {len(todo)} tasks; logs: <cell>/{CELL_LOG}; squeue -j {job}")
        return 0
    results = run_local(todo, args.parallel or 1)
    failed = [cell.name for cell, code in results if code != 0 or not cell.finished]
    print(f"sweep {sweep_dir}: {len(cells) - len(failed)} of {len(cells)} cells finished"
          + (f"; not finished: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run("clsvit.sweep", main)
