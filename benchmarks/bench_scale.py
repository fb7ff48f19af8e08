"""ImageNet-scale rehearsal without ImageNet: what every launch pays before its first step.

    python benchmarks/bench_scale.py                    # full size: 1,281,167 train + 50,000 val rows
    python benchmarks/bench_scale.py --small            # 1 % of it, a quick check of the plumbing
    python benchmarks/bench_scale.py --sources parquet hub --skip checkpoint

Builds under ``--root`` (kept between runs; rebuilt only when the size changes):

- ``folder/``: ImageNet's layout, ``train/<wnid>/<wnid>_<k>.JPEG`` and ``val/<wnid>/ILSVRC2012_val_<k>.JPEG``
  in timm's 1000 ImageNet synset folders, 1,281 or 1,282 train files per class and 50 val files,
  every file a hard link to one of 64 small real JPEGs (ext4 allows 65,000 links per file);
- ``parquet/data/``: the hub's ``ILSVRC/imagenet-1k`` layout, ``train-XXXXX-of-00294.parquet`` and
  ``validation-XXXXX-of-00014.parquet``, the same rows (column ``image`` = {bytes, path}, ``label`` a
  ``ClassLabel`` of the 1000 synsets), written in ``datasets``' row groups of 100 rows, small images;
- ``hub_cache/``: huggingface_hub's cache layout for ``ILSVRC/imagenet-1k`` (refs/main, a snapshot of
  symlinks to those shards, as ``snapshot_download`` leaves it), for ``data.source: hub`` offline.

For each source (``imagefolder``, ``parquet``, ``hub``) and 1 and 2 processes (``ACCELERATE_USE_CPU=1
accelerate launch --multi_gpu --num_processes 2``) it launches ``train.py`` on the shapes baseline
recipe's tiny ViT over that data, with a fresh HF_HOME, and measures the seconds from the launch to the
first optimizer step: the first ``train/loss`` line of ``metrics.jsonl`` (``log.every=1``, flushed
per line), on the first launch (2 steps, a checkpoint at the end) and on the second launch (resumes,
one more step); then ``eval.py --run`` (``--tasks cls eval.max_batches=1``) from launch to its exit
after one batch. Peak memory is the largest VmHWM (peak RSS) among the launch's training processes
(its DataLoader workers apart); cache bytes are what HF_HOME holds after both launches.

In this process, at full size: the parquet shards' footers (all a parquet launch reads before its
first batch), the TrainSampler's per-epoch index (repeated augmentation 3 on rank 0
of 8, and one process; random and grouped order), the set-up of a validation pass (the eval dataset and loader to the first
batch), the save time and size of a ViT-L/16 checkpoint with its full training state (LAMB, through
clsvit.checkpoint.save_checkpoint), resume discovery among 1,000 checkpoints, and, at real bytes
(one shard of 4,358 rows of 110 KB incompressible payloads, ImageNet's mean JPEG size), parquet reading in
place (one random row, a sequential pass) and ``datasets.load_dataset("parquet")``'s Arrow conversion,
which clsvit does not use; its time and bytes per shard x 294 shards extrapolate to ImageNet.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TRAIN_ROWS, VAL_ROWS, CLASSES = 1_281_167, 50_000, 1000
TRAIN_SHARDS, VAL_SHARDS = 294, 14  # ILSVRC/imagenet-1k's parquet shards
IMAGENET_MEAN_JPEG = 110_000  # bytes: ImageNet-1k is ~140 GB over 1.33M JPEGs
SOURCE_JPEGS = 64  # distinct files behind the hard links
HUB_ID, HUB_COMMIT = "ILSVRC/imagenet-1k", "0" * 40


# ---------------------------------------------------------------- building the data

def small_jpegs(count: int) -> list[bytes]:
    """``count`` distinct 64x48 photo-like JPEGs (gradient + noise, quality 90)."""
    rng = np.random.default_rng(0)
    jpegs = []
    for k in range(count):
        y, x = np.mgrid[0:48, 0:64]
        base = np.stack([(x * (k + 3)) % 256, (y * (k + 5)) % 256, ((x + y) * 7 + 11 * k) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def synsets() -> list[str]:
    from timm.data import ImageNetInfo
    return list(ImageNetInfo().label_names())


def rows(train: int, val: int):
    """{split: [(file name, label)]}: ImageNet's names, train rows spread evenly over the classes."""
    names = synsets()
    per_class = [train // CLASSES + (c < train % CLASSES) for c in range(CLASSES)]
    train_rows = [(f"{names[c]}_{k}.JPEG", c) for c in range(CLASSES) for k in range(per_class[c])]
    val_rows = [(f"ILSVRC2012_val_{k + 1:08d}.JPEG", k % CLASSES) for k in range(val)]
    return {"train": train_rows, "validation": val_rows}


def built(folder: Path, signature: dict) -> bool:
    marker = folder / "BUILT.json"
    return marker.is_file() and json.loads(marker.read_text()) == signature


def build_folder(root: Path, by_split: dict, jpegs: list[bytes]) -> Path:
    folder, signature = root / "folder", {k: len(v) for k, v in by_split.items()}
    if built(folder, signature):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    sources = root / "jpegs"
    sources.mkdir(parents=True, exist_ok=True)
    for k, jpeg in enumerate(jpegs):
        (sources / f"{k}.JPEG").write_bytes(jpeg)
    names = synsets()
    for split, directory in (("train", "train"), ("validation", "val")):
        for name in names:
            (folder / directory / name).mkdir(parents=True)
        for k, (file_name, label) in enumerate(by_split[split]):
            os.link(sources / f"{k % len(jpegs)}.JPEG", folder / directory / names[label] / file_name)
    (folder / "BUILT.json").write_text(json.dumps(signature))
    return folder


def hub_schema():
    import datasets
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=synsets()))
    return features.arrow_schema  # with the "huggingface" metadata that names the classes


def build_parquet(root: Path, by_split: dict, jpegs: list[bytes], shards: dict) -> Path:
    folder, signature = root / "parquet", {k: [len(v), shards[k]] for k, v in by_split.items()}
    if built(folder, signature):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "data").mkdir(parents=True)
    schema = hub_schema()
    for split, split_rows in by_split.items():
        order = list(range(len(split_rows)))
        random.Random(0).shuffle(order)  # the hub's shards mix the classes
        for shard, part in enumerate(np.array_split(np.array(order), shards[split])):
            table = pa.table({"image": [{"bytes": jpegs[i % len(jpegs)], "path": split_rows[i][0]} for i in part],
                              "label": [split_rows[i][1] for i in part]}, schema=schema)
            pq.write_table(table, folder / "data" / f"{split}-{shard:05d}-of-{shards[split]:05d}.parquet",
                           row_group_size=100)  # datasets' row groups for image datasets
    (folder / "BUILT.json").write_text(json.dumps(signature))
    return folder


def build_hub_cache(root: Path, parquet: Path) -> Path:
    """huggingface_hub's cache layout: refs/main names a snapshot of symlinks to the shards."""
    cache = root / "hub_cache"
    shutil.rmtree(cache, ignore_errors=True)
    repo = cache / f"datasets--{HUB_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    snapshot = repo / "snapshots" / HUB_COMMIT / "data"
    snapshot.mkdir(parents=True)
    for shard in sorted((parquet / "data").glob("*.parquet")):
        (snapshot / shard.name).symlink_to(shard)
    return cache


# ---------------------------------------------------------------- launches

def _vm_hwm_mb(process: psutil.Process) -> float:
    try:
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _logged(metrics: Path, step: int) -> bool:
    """Whether ``metrics`` (metrics.jsonl) holds the training log line of ``step``."""
    if not metrics.is_file():
        return False
    for line in metrics.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if entry.get("step") == step and "train/loss" in entry:
            return True
    return False


def launch(command: list[str], env: dict, metrics: Path | None, first_step: int | None, log: Path) -> dict:
    """Run ``command``; seconds to the ``train/loss`` line of step ``first_step`` in ``metrics``
    (None: to the exit), and the peak RSS of its main processes (not DataLoader workers)."""
    start = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        root, peaks, first = psutil.Process(process.pid), {}, None
        while True:
            try:  # a DataLoader worker is a fork: the same command line as its parent
                for child in [root, *root.children(recursive=True)]:
                    command_line, parent = child.cmdline(), child.parent()
                    if any(s in " ".join(command_line) for s in ("train.py", "eval.py")) and (
                            parent is None or parent.cmdline() != command_line):
                        peaks[child.pid] = max(peaks.get(child.pid, 0.0), _vm_hwm_mb(child))
            except psutil.Error:
                pass
            if first is None and first_step is not None and _logged(metrics, first_step):
                first = time.perf_counter() - start
            if process.poll() is not None:
                break
            time.sleep(0.25)
        process.wait()
    total = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}); see {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-15:]))
    if first is None and first_step is not None:
        raise RuntimeError(f"{' '.join(command)} never logged step {first_step}; see {log}")
    return {"seconds": first if first_step is not None else total, "total_s": total,
            "peak_rss_mb": max(peaks.values(), default=0.0), "processes": len(peaks)}


def du(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def measure_source(source: str, data_path: str, processes: int, root: Path, hub_cache: Path) -> dict:
    """First launch, second launch, eval.py: seconds, peak RSS per process, bytes written to HF_HOME."""
    name = f"{source}_{processes}p"
    hf_home = root / "hf_home" / name
    shutil.rmtree(hf_home, ignore_errors=True)
    shutil.rmtree(root / "runs" / name, ignore_errors=True)
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    start = [sys.executable, "train.py"]
    if processes > 1:
        start = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                 str(processes), "train.py"]
        env["ACCELERATE_USE_CPU"] = "1"
    train = [*start, "--config", "recipes/shapes/baseline.yaml", f"data.source={source}", f"data.path={data_path}",
             "data.val_split=validation", f"run.root={root / 'runs'}", f"run.name={name}", "log.every=1",
             "log.progress_bar=false", "eval.every=1000000", "eval.max_batches=1", "train.checkpoint_every=1000000"]
    run_dir = root / "runs" / name
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    first = launch([*train, "train.max_steps=2"], env, run_dir / "metrics.jsonl", 1, logs / f"{name}_first.log")
    second = launch([*train, "train.max_steps=3"], env, run_dir / "metrics.jsonl", 3, logs / f"{name}_second.log")
    evaluate = [*start[:-1], "eval.py", "--run", str(run_dir), "--tasks", "cls", "eval.max_batches=1"]
    evaluation = launch(evaluate, env, None, None, logs / f"{name}_eval.log")
    return {"first": first, "second": second, "eval": evaluation, "cache_bytes": du(hf_home)}


# ---------------------------------------------------------------- in this process

def timed(function, reps: int = 3):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def sampler_index(train_rows: int) -> dict:
    """The random order's epoch, and the grouped order's first epoch of a cycle (which deals the
    cycle's row groups: 100-row groups, 10 loader workers per process, micro-batch 256)."""
    from clsvit.data import TrainSampler
    out = {}
    for label, replicas in (("rank 0 of 8, repeated_aug 3", 8), ("1 process", 1)):
        sampler = TrainSampler(train_rows, num_replicas=replicas, rank=0, seed=0, repeats=3)
        sampler.set_epoch(1)
        out[label], _ = timed(lambda: list(iter(sampler)))
    groups = [100] * (train_rows // 100) + ([train_rows % 100] if train_rows % 100 else [])
    for label, replicas in (("grouped, rank 0 of 8 x 10 workers, repeated_aug 3", 8), ("grouped, 1 process x 10 workers", 1)):
        def cycle(replicas=replicas):
            return list(TrainSampler(train_rows, num_replicas=replicas, rank=0, seed=0, repeats=3, row_groups=groups,
                                     workers=10, batch_size=256))
        out[label], _ = timed(cycle)
    return out


def parquet_footers(parquet: Path) -> float:
    """ParquetRows over every shard of both splits: what a parquet launch reads before its first batch."""
    from clsvit.data.parquet import ParquetRows
    return timed(lambda: [ParquetRows(sorted((parquet / "data").glob(f"{split}-*.parquet")))
                          for split in ("train", "validation")])[0]


def validation_setup(source: str, data_path: str) -> float:
    """From the split in hand to the eval loader's first batch (2 workers)."""
    from clsvit.config import load_config
    from clsvit.data import build_eval_loader, build_image_dataset, load_splits
    cfg = load_config(str(REPO / "recipes" / "shapes" / "baseline.yaml"),
                      [f"data.source={source}", f"data.path={data_path}", "data.num_workers=2"])
    _, val, num_classes = load_splits(cfg["data"])

    def first_batch():
        dataset = build_image_dataset(val, cfg, train=False, num_classes=num_classes)
        return next(iter(build_eval_loader(dataset, cfg["eval"]["batch_per_device"], cfg["data"])))
    return timed(first_batch)[0]


def vit_l_checkpoint(folder: Path) -> dict:
    """ViT-L/16 with LAMB state, saved by clsvit.checkpoint.save_checkpoint (accelerate save_state)."""
    import timm
    import torch
    from accelerate import Accelerator

    from clsvit.checkpoint import save_checkpoint
    from clsvit.deit3 import build_optimizer
    accelerator = Accelerator(cpu=True)
    model = timm.create_model("vit_large_patch16_224", num_classes=1000)
    optimizer = build_optimizer(model, {"name": "lamb", "lr": 3e-3, "weight_decay": 0.02, "betas": [0.9, 0.999],
                                        "eps": 1e-8, "grad_clip": None})
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # creates the optimizer state
    model, optimizer = accelerator.prepare(model, optimizer)
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    path = save_checkpoint(accelerator, folder, 1, keep=1)
    seconds = time.perf_counter() - start
    size = du(path)
    shutil.rmtree(folder, ignore_errors=True)
    return {"seconds": seconds, "bytes": size, "params": sum(p.numel() for p in model.parameters())}


def resume_discovery(folder: Path, count: int = 1000) -> float:
    from clsvit.checkpoint import COMPLETE_MARKER, latest_checkpoint
    shutil.rmtree(folder, ignore_errors=True)
    for step in range(1, count + 1):
        (folder / f"step_{step * 100}").mkdir(parents=True)
        (folder / f"step_{step * 100}" / COMPLETE_MARKER).write_text(f"{step * 100}\n")
    seconds, found = timed(lambda: latest_checkpoint(folder))
    assert found.name == f"step_{count * 100}"
    shutil.rmtree(folder, ignore_errors=True)
    return seconds


def real_bytes_shard(root: Path) -> tuple[Path, int]:
    """One hub shard at ImageNet's bytes: 4,358 rows (1,281,167 / 294) of 110 KB incompressible payloads."""
    folder = root / "real_bytes" / "data"
    rows_per_shard = -(-TRAIN_ROWS // TRAIN_SHARDS)
    path = folder / "train-00000-of-00001.parquet"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        with pq.ParquetWriter(path, hub_schema()) as writer:  # distinct payloads: nothing to deduplicate
            for first in range(0, rows_per_shard, 100):
                batch = range(first, min(first + 100, rows_per_shard))
                writer.write_table(pa.table({"image": [{"bytes": rng.bytes(IMAGENET_MEAN_JPEG), "path": f"{i}.JPEG"}
                                                       for i in batch],
                                             "label": [i % CLASSES for i in batch]}, schema=hub_schema()),
                                   row_group_size=100)
        shutil.copy(path, folder / "validation-00000-of-00001.parquet")
    return path, rows_per_shard


def parquet_reading(path: Path, rows: int) -> dict:
    """ms per row of ParquetRows: random rows (each reads its row group) and a sequential pass."""
    from clsvit.data.parquet import ParquetRows
    from datasets import Image as ImageFeature
    shard = ParquetRows([str(path)]).cast_column("image", ImageFeature(decode=False))  # as training reads it
    order = random.Random(0).sample(range(rows), 200)
    start = time.perf_counter()
    for i in order:
        shard[i]
    random_ms = 1000 * (time.perf_counter() - start) / len(order)
    shard = ParquetRows([str(path)]).cast_column("image", ImageFeature(decode=False))
    start = time.perf_counter()
    for i in range(rows):
        shard[i]
    sequential_ms = 1000 * (time.perf_counter() - start) / rows
    return {"random_ms": random_ms, "sequential_ms": sequential_ms,
            "row_group_mb": pq.ParquetFile(path).metadata.row_group(0).total_byte_size / 1e6}


def arrow_conversion(folder: Path, cache: Path) -> dict:
    """``datasets.load_dataset("parquet")`` on the real-bytes shard: seconds and cache bytes."""
    import datasets
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    datasets.load_dataset("parquet", data_files={"train": str(folder / "train-00000-of-00001.parquet")},
                          cache_dir=str(cache))
    seconds = time.perf_counter() - start
    size = du(cache)
    shutil.rmtree(cache, ignore_errors=True)
    return {"seconds": seconds, "bytes": size}


# ---------------------------------------------------------------- report

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of ImageNet's rows (default: 1)")
    parser.add_argument("--small", action="store_true", help="--scale 0.01")
    parser.add_argument("--root", default="/tmp/bench_scale", help="where the trees and runs go (kept)")
    parser.add_argument("--sources", nargs="+", default=["imagefolder", "parquet", "hub"])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip", nargs="*", default=[], choices=["launches", "sampler", "validation",
                                                                  "checkpoint", "resume", "real_bytes"])
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    import datasets
    datasets.disable_progress_bars()
    scale = 0.01 if args.small else args.scale
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    train_rows, val_rows = round(TRAIN_ROWS * scale), max(CLASSES, round(VAL_ROWS * scale))
    shards = {"train": max(1, round(TRAIN_SHARDS * scale)), "validation": max(1, round(VAL_SHARDS * scale))}
    report = {"config": {"train_rows": train_rows, "val_rows": val_rows, "shards": shards,
                         "load_average": os.getloadavg(), "cpus": os.cpu_count()}}

    start = time.perf_counter()
    jpegs = small_jpegs(SOURCE_JPEGS)
    by_split = rows(train_rows, val_rows)
    paths = {"imagefolder": build_folder(root, by_split, jpegs) if "imagefolder" in args.sources else None,
             "parquet": build_parquet(root, by_split, jpegs, shards)}
    hub_cache = build_hub_cache(root, paths["parquet"])
    paths["hub"] = HUB_ID
    small_bytes = sum(map(len, jpegs)) / len(jpegs)
    print(f"data: {train_rows:,} train + {val_rows:,} val rows, {len(jpegs)} JPEGs of {small_bytes / 1e3:.1f} KB "
          f"behind them, built or found in {time.perf_counter() - start:.0f} s under {root}", file=sys.stderr)

    if "launches" not in args.skip:
        report["launches"] = {}
        for source in args.sources:
            for processes in args.processes:
                print(f"launching {source} x{processes} ...", file=sys.stderr)
                report["launches"][f"{source} x{processes}"] = measure_source(
                    source, str(paths[source]), processes, root, hub_cache)
                if args.json:  # a long run keeps what it measured
                    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if "sampler" not in args.skip:
        report["sampler_s"] = sampler_index(train_rows)
    if "parquet" in args.sources or "hub" in args.sources:
        report["parquet_footers_s"] = parquet_footers(paths["parquet"])
    if "validation" not in args.skip:
        os.environ.update(HF_HOME=str(root / "hf_home" / "validation"), HF_HUB_CACHE=str(hub_cache),
                          HF_HUB_OFFLINE="1")
        report["validation_setup_s"] = {s: validation_setup(s, str(paths[s])) for s in args.sources if s != "hub"}
    if "checkpoint" not in args.skip:
        report["vit_l_checkpoint"] = vit_l_checkpoint(root / "checkpoint")
    if "resume" not in args.skip:
        report["resume_discovery_s"] = resume_discovery(root / "discovery")
    if "real_bytes" not in args.skip:
        shard, shard_rows = real_bytes_shard(root)
        report["real_bytes"] = {"rows": shard_rows, **parquet_reading(shard, shard_rows),
                                "arrow_conversion": arrow_conversion(shard.parent, root / "arrow_cache")}
    print_table(report, scale, small_bytes)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def print_table(report: dict, scale: float, small_bytes: float) -> None:
    rows_note = f"{report['config']['train_rows']:,} + {report['config']['val_rows']:,} rows"
    print(f"\n### bench_scale: {rows_note} (scale {scale:g}), load average at start "
          f"{report['config']['load_average'][0]:.1f}, {report['config']['cpus']} CPUs\n")
    if "launches" in report:
        print("| source | first launch to step 1 | second launch to its step | eval.py --run, 1 batch | "
              "peak RSS per process (1st / 2nd / eval) | written to HF_HOME |")
        print("|---|---|---|---|---|---|")
        for name, r in report["launches"].items():
            rss = " / ".join(f"{r[k]['peak_rss_mb']:.0f}" for k in ("first", "second", "eval"))
            print(f"| {name} | {r['first']['seconds']:.1f} s | {r['second']['seconds']:.1f} s | "
                  f"{r['eval']['seconds']:.1f} s | {rss} MiB | {r['cache_bytes'] / 1e6:.1f} MB |")
        print()
    lines = []
    if "sampler_s" in report:
        lines += [f"TrainSampler epoch index, {k}: {v:.2f} s" for k, v in report["sampler_s"].items()]
    if "parquet_footers_s" in report:
        lines.append(f"reading the footers of all {sum(report['config']['shards'].values())} parquet shards: "
                     f"{report['parquet_footers_s']:.2f} s")
    if "validation_setup_s" in report:
        lines += [f"validation pass set-up to the first batch, {k}: {v:.2f} s"
                  for k, v in report["validation_setup_s"].items()]
    if "vit_l_checkpoint" in report:
        c = report["vit_l_checkpoint"]
        lines.append(f"ViT-L/16 checkpoint with LAMB state ({c['params'] / 1e6:.0f}M params): "
                     f"{c['seconds']:.1f} s, {c['bytes'] / 1e9:.2f} GB")
    if "resume_discovery_s" in report:
        lines.append(f"resume discovery among 1,000 checkpoints: {1000 * report['resume_discovery_s']:.1f} ms")
    if "real_bytes" in report:
        r = report["real_bytes"]
        conversion = r["arrow_conversion"]
        lines += [f"parquet in place at ImageNet's bytes ({r['row_group_mb']:.1f} MB row groups): one random row "
                  f"{r['random_ms']:.2f} ms, a sequential pass {r['sequential_ms']:.3f} ms per row",
                  f"datasets.load_dataset('parquet') (not used), one {r['rows']:,}-row shard: "
                  f"{conversion['seconds']:.1f} s, {conversion['bytes'] / 1e9:.2f} GB of Arrow cache; x {TRAIN_SHARDS} "
                  f"train shards: {conversion['seconds'] * TRAIN_SHARDS / 60:.0f} min, "
                  f"{conversion['bytes'] * TRAIN_SHARDS / 1e9:.0f} GB"]
    for line in lines:
        print(f"- {line}")
    if "launches" in report:
        ratio = IMAGENET_MEAN_JPEG / small_bytes
        note = (f"\nAt ImageNet's bytes ({IMAGENET_MEAN_JPEG / 1e3:.0f} KB per image, {ratio:.0f}x these): nothing a "
                f"launch does before its first batch reads an image (the folder scan and the parquet footers do not "
                f"depend on file sizes), and cache bytes grow {ratio:.0f}x only where they hold images. The first "
                f"batch itself reads its images")
        if "real_bytes" in report:
            note += (f"; from parquet each random row reads its row group: {report['real_bytes']['random_ms']:.1f} ms "
                     f"per image above, {128 * report['real_bytes']['random_ms'] / 1e3:.1f} s for a 128-image batch "
                     f"on one worker")
        print(note + ".")


if __name__ == "__main__":
    main()
