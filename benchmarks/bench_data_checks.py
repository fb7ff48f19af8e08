"""What the data checks add to a launch, at ImageNet's size (clsvit.data.imagefolder's whole-index
check, clsvit.data.agreement's comparison across processes).

    python benchmarks/bench_data_checks.py                 # 1,281,167 + 50,000 files, 294 + 14 shards
    python benchmarks/bench_data_checks.py --small         # 1 % of it

Builds (or finds) ``bench_scale.py``'s ImageNet-shaped trees under ``--root`` and measures, each
variant timed in turn within every repetition (medians of ``--reps``, ratios per repetition):

- a launch that finds the folder index current: the checks it always made (the folders' times, the
  index's header) and the memory map of the index, against the same plus the row count and the
  SHA-256 digest of the listing (what serving an index costs now);
- the first launch: scanning both splits and writing the index, the digest's share of it;
- parquet: reading the 308 shards' footers (``ParquetRows``), against hashing their footers again;
- 2 processes (gloo, as ``accelerate launch`` starts them): ``main_process_first`` + ``load_splits``
  on each process, against :func:`clsvit.data.load_splits_on_every_process` (the main process's
  listing handed over, opened and verified by the other, one gather), per process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_scale  # noqa: E402  (the trees are bench_scale's)


def interleaved(variants: dict, reps: int) -> dict:
    """{name: [seconds per repetition]}, every variant once per repetition, in a rotating order."""
    times = {name: [] for name in variants}
    names = list(variants)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict, numerator: str, denominator: str) -> str:
    ratios = sorted(a / b for a, b in zip(times[numerator], times[denominator]))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{statistics.median(ratios):.2f}x [{quartiles[0]:.2f}-{quartiles[2]:.2f}]"


def median(values) -> float:
    return statistics.median(values)


def folder_checks(folder: Path, cache: Path, reps: int) -> dict:
    import datasets
    import datasets.config

    from clsvit.data import imagefolder
    datasets.config.HF_DATASETS_CACHE = cache
    shutil.rmtree(cache, ignore_errors=True)
    first = []
    for _ in range(max(1, reps // 2)):  # the first launch: scan, digest, write (a fresh cache each time)
        shutil.rmtree(cache, ignore_errors=True)
        start = time.perf_counter()
        splits = imagefolder.load_folder_splits(str(folder), "train", "validation", "class_folders")
        first.append(time.perf_counter() - start)
    train_index = Path(imagefolder.listing_of(splits["train"]).path)
    val_index = Path(imagefolder.listing_of(splits["validation"]).path)
    root = str(folder)

    def unchecked():  # what serving an index always cost: the folders' times, the header, the memory map
        for index in (train_index, val_index):
            assert imagefolder._index_is_current(index, root)
            datasets.Dataset.from_file(str(index))

    def checked():
        imagefolder.load_folder_splits(root, "train", "validation", "class_folders")

    def digest_only():
        for index in (train_index, val_index):
            imagefolder.listing_digest(datasets.Dataset.from_file(str(index)).data.table)

    times = interleaved({"unchecked": unchecked, "checked": checked, "digest": digest_only}, reps)
    return {"first_launch_s": median(first), "served_unchecked_s": median(times["unchecked"]),
            "served_checked_s": median(times["checked"]), "digest_s": median(times["digest"]),
            "served_ratio": ratio(times, "checked", "unchecked"),
            "index_mb": (train_index.stat().st_size + val_index.stat().st_size) / 1e6}


def parquet_checks(parquet: Path, reps: int) -> dict:
    from clsvit.data.agreement import split_digest
    from clsvit.data.parquet import ParquetRows
    shards = {split: sorted((parquet / "data").glob(f"{split}-*.parquet")) for split in ("train", "validation")}
    splits = {split: ParquetRows([str(f) for f in files]) for split, files in shards.items()}
    times = interleaved({"footers": lambda: [ParquetRows([str(f) for f in files]) for files in shards.values()],
                         "digest": lambda: [split_digest(rows) for rows in splits.values()]}, reps)
    return {"shards": sum(map(len, shards.values())), "footers_s": median(times["footers"]),
            "digest_s": median(times["digest"]), "digest_over_footers": ratio(times, "digest", "footers")}


TWO_PROCESSES = """
import json, sys, time
from accelerate import PartialState
from clsvit.data import load_splits, load_splits_on_every_process
state = PartialState(cpu=True)
cfg = dict(source=sys.argv[1], path=sys.argv[2], train_split="train", val_split="validation",
           val_layout="class_folders", image_column="image", label_column="label")
times = {"main_process_first": [], "on_every_process": []}
for rep in range(int(sys.argv[3])):
    for name in (list(times) if rep % 2 == 0 else list(times)[::-1]):
        state.wait_for_everyone()
        start = time.perf_counter()
        if name == "main_process_first":
            with state.main_process_first():
                load_splits(cfg)
        else:
            load_splits_on_every_process(cfg, state)
        times[name].append(time.perf_counter() - start)
print("TIMES", state.process_index, json.dumps(times), flush=True)
state.destroy_process_group()
"""


def two_processes(source: str, path: str, cache: Path, reps: int) -> dict:
    """{process: {variant: median seconds}, "ratio": ...} of TWO_PROCESSES (the index already written)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, source, path, str(reps)], cwd=REPO,
                                  env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in (0, 1)]
    result = {}
    for rank, process in enumerate(processes):
        output = process.communicate(timeout=3600)[0]
        line = next((line for line in output.splitlines() if line.startswith("TIMES")), None)
        if line is None:
            raise SystemExit(output[-3000:])
        times = json.loads(line.split(" ", 2)[2])
        result[f"process {rank}"] = {name: median(values) for name, values in times.items()}
        result[f"process {rank} ratio"] = ratio(times, "on_every_process", "main_process_first")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="1 %% of ImageNet's rows")
    parser.add_argument("--root", default="/tmp/bench_scale", help="bench_scale.py's trees (built when missing)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=["folder", "parquet", "processes"])
    args = parser.parse_args(argv)
    import datasets
    datasets.disable_progress_bars()
    scale = 0.01 if args.small else 1.0
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    by_split = bench_scale.rows(round(bench_scale.TRAIN_ROWS * scale),
                                max(bench_scale.CLASSES, round(bench_scale.VAL_ROWS * scale)))
    jpegs = bench_scale.small_jpegs(bench_scale.SOURCE_JPEGS)
    report = {"rows": {split: len(rows) for split, rows in by_split.items()}, "load_average": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench_data_checks-") as scratch:
        cache = Path(scratch) / "hf_datasets_cache"
        if "folder" not in args.skip or "processes" not in args.skip:
            folder = bench_scale.build_folder(root, by_split, jpegs)
            settled = time.time() - 3600  # a tree just built is too recent to be served from its index
            for directory, _, _ in os.walk(folder):
                os.utime(directory, (settled, settled))
        if "folder" not in args.skip:
            report["folder"] = folder_checks(folder, cache, args.reps)
        if "parquet" not in args.skip:
            shards = {"train": max(1, round(bench_scale.TRAIN_SHARDS * scale)),
                      "validation": max(1, round(bench_scale.VAL_SHARDS * scale))}
            report["parquet"] = parquet_checks(bench_scale.build_parquet(root, by_split, jpegs, shards), args.reps)
        if "processes" not in args.skip:
            report["two_processes"] = two_processes("imagefolder", str(folder), cache, args.reps)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
