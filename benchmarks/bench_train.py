"""train.py's steady-state throughput against a bare training loop on the same model and batches.

    python benchmarks/bench_train.py [--config recipes/shapes/specialized.yaml] [--steps 30] [--reps 3]

The bare loop is the least a training step can be: the recipe's model, LAMB and BCE, on batches
already in memory — no data loading, logging, EMA, progress bar or checkpointing. train.py runs as a
subprocess (exactly as users run it) with `train.max_steps`, and its images/s is read from
metrics.jsonl, skipping the first log window (start-up, first-batch latency). The two alternate
`--reps` times so machine noise hits both alike; the ratio of medians is the result (target >= 0.95).
It also reports the data pipeline's images/s per worker with the recipe's augmentation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clsvit.config import load_config  # noqa: E402
from clsvit.data import TrainSampler, build_train_loader, build_train_transform, load_splits  # noqa: E402
from clsvit.deit3 import build_loss, build_optimizer, one_hot_targets  # noqa: E402
from clsvit.data.images import ImageClassDataset  # noqa: E402
from clsvit.model import build_model  # noqa: E402


def bare_loop_images_per_s(cfg, batches, steps: int) -> float:
    """The recipe's model, optimizer and loss on `batches`: a list held in memory, or a DataLoader
    (then the data pipeline shares the CPU with the model, as it does in train.py)."""
    torch.manual_seed(0)
    num_classes = cfg["model"]["num_classes"]
    model = build_model(cfg["model"], num_classes).train()
    optimizer = build_optimizer(model, cfg["optim"])
    criterion = build_loss(cfg["train"])
    stream = itertools.cycle(batches) if isinstance(batches, list) else iter(batches)
    start, seen = None, 0
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            start = time.perf_counter()
        images, labels, _ = next(stream)
        loss = criterion(model(images), one_hot_targets(labels, num_classes, 0.0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += images.shape[0] if step >= 2 else 0
    return seen / (time.perf_counter() - start)


def train_py_images_per_s(config: str, steps: int, log_every: int, workdir: Path) -> float:
    run_name = f"bench_{time.time_ns()}"
    command = [sys.executable, str(REPO / "train.py"), "--config", config, f"run.root={workdir}",
               f"run.name={run_name}", f"train.max_steps={steps + log_every}", f"log.every={log_every}",
               "eval.every=1000000", "train.checkpoint_every=1000000", "eval.max_batches=1",
               "log.progress_bar=false"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    events = [json.loads(line) for line in (workdir / run_name / "metrics.jsonl").read_text().splitlines()]
    windows = [e["train/images_per_s"] for e in events if "train/images_per_s" in e][1:]  # skip start-up
    return statistics.median(windows), statistics.median(
        [e["train/data_wait"] for e in events if "train/data_wait" in e][1:])


def data_images_per_s(cfg, dataset, workers: int, num_batches: int) -> float:
    data_cfg = {**cfg["data"], "num_workers": workers, "persistent_workers": False}
    batch = cfg["train"]["batch_per_device"]
    sampler = TrainSampler(len(dataset), num_replicas=1, rank=0, seed=0, repeats=1)
    loader = build_train_loader(dataset, sampler, batch, data_cfg)
    iterator = iter(loader)
    next(iterator)  # worker start-up
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return num_batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "recipes" / "shapes" / "specialized.yaml"))
    parser.add_argument("--steps", type=int, default=30, help="measured optimizer steps per repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()

    cfg = load_config(args.config)
    train_hf, _, num_classes = load_splits(cfg["data"])
    cfg["model"]["num_classes"] = cfg["model"]["num_classes"] or num_classes
    if cfg["train"]["global_batch"] != cfg["train"]["batch_per_device"]:
        sys.exit("bench_train.py compares one process without accumulation: use a recipe with "
                 "train.global_batch == train.batch_per_device")
    dataset = ImageClassDataset(train_hf, build_train_transform(cfg), num_classes=num_classes)
    batch = cfg["train"]["batch_per_device"]
    sampler = TrainSampler(len(dataset), num_replicas=1, rank=0, seed=0, repeats=1)
    loader = build_train_loader(dataset, sampler, batch, {**cfg["data"], "num_workers": 0})
    batches = [b for b, _ in zip(loader, range(4))]

    bare, fed, trainer, wait = [], [], [], []
    with tempfile.TemporaryDirectory() as workdir:
        for rep in range(args.reps):
            bare.append(bare_loop_images_per_s(cfg, batches, args.steps))
            sampler.set_epoch(rep)
            fed.append(bare_loop_images_per_s(cfg, build_train_loader(dataset, sampler, batch, cfg["data"]),
                                              args.steps))
            images_per_s, data_wait = train_py_images_per_s(args.config, args.steps, max(args.steps // 3, 1),
                                                            Path(workdir))
            trainer.append(images_per_s)
            wait.append(data_wait)
            print(f"rep {rep}: bare {bare[-1]:.1f} img/s, bare + DataLoader {fed[-1]:.1f} img/s, "
                  f"train.py {trainer[-1]:.1f} img/s "
                  f"(data wait {data_wait:.1%}), ratio {trainer[-1] / bare[-1]:.3f}", flush=True)
    print(f"\n{Path(args.config).name}, batch {batch}, {torch.get_num_threads()} threads, {args.reps} reps")
    print("| loop | images/s (median) | ratio |\n|---|---|---|")
    print(f"| bare timm loop (batches in memory) | {statistics.median(bare):.1f} | 1.000 |")
    print(f"| bare loop fed by the recipe's DataLoader | {statistics.median(fed):.1f} | "
          f"{statistics.median(fed) / statistics.median(bare):.3f} |")
    print(f"| train.py (data, logging, everything) | {statistics.median(trainer):.1f} | "
          f"{statistics.median(trainer) / statistics.median(bare):.3f} |")
    print(f"\ntrain.py vs the bare loop with the same DataLoader (the loop's own overhead): "
          f"{statistics.median(trainer) / statistics.median(fed):.3f}")
    print(f"\ndata pipeline ({'3-Augment' if cfg['aug']['three_augment'] else 'no 3-Augment'}, "
          f"{cfg['model']['img_size']} px):")
    for workers in args.workers:
        rate = data_images_per_s(cfg, dataset, workers, num_batches=8)
        print(f"  {workers} worker(s): {rate:.0f} images/s, {rate / workers:.0f} images/s per worker")


if __name__ == "__main__":
    main()
