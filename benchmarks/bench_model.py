"""What does [CLS]/patch specialization cost at run time? Baseline vs specialized ViT, side by side.

Times a training step (forward + backward + optimizer step) and inference (`torch.inference_mode`)
for three models built from the same seed: the timm baseline, `clsvit.PAPER_DEFAULT`, and every
component specialized in every block plus the final norm. The variants are *interleaved*: each
repetition times every variant once, in a rotating order, so a busy machine or a thermal drift
slows all of them alike. The ratio reported is the median over repetitions of the per-repetition
ratio variant/baseline (paired), which is what stays meaningful on a shared machine; the spread
is its inter-quartile range.

    python benchmarks/bench_model.py                         # ViT-S/16, batch 32, 224 px, CPU
    python benchmarks/bench_model.py --batch 16 --reps 15 --threads 2 --json bench.json
    python benchmarks/bench_model.py --device cuda --batch 256 --compile

Targets (issue #2): PAPER_DEFAULT <= 1.02x the baseline train step, <= 1.01x inference.

On a CPU shared with other jobs, prefer --threads 1: with more intra-op threads than free cores,
every op waits for a descheduled thread (~10 ms), so the times measure the number of ops rather
than the work, and the specialized models (more, smaller ops) look far slower than they are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from timm.optim import create_optimizer_v2
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from clsvit import PAPER_DEFAULT, create_model  # noqa: E402
from clsvit.model import count_parameters  # noqa: E402

VARIANTS = {
    "baseline": None,
    "paper_default": dict(PAPER_DEFAULT),
    "everything": {"norm": 1.0, "layerscale": 1.0, "qkv": 1.0, "proj": 1.0, "mlp": 1.0, "final_norm": True},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit3_small_patch16_224", help="timm ViT name")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--img-size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions of each variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model first")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda runs under bf16 autocast")
    parser.add_argument("--optimizer", default="lamb", choices=("lamb", "adamw"))
    parser.add_argument("--drop-path", type=float, default=0.0, help="uniform stochastic depth rate")
    parser.add_argument("--modes", default="train,infer", help="comma list of train, infer")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print torch.profiler's top ops of one train step per variant")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' = stdout)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--reps and --batch must be >= 1, --warmup >= 0")
    args.modes = args.modes.split(",")
    args.variants = args.variants.split(",")
    for mode in args.modes:
        if mode not in ("train", "infer"):
            parser.error(f"--modes: unknown mode {mode!r} (train, infer)")
    for name in args.variants:
        if name not in VARIANTS:
            parser.error(f"--variants: unknown variant {name!r} ({', '.join(VARIANTS)})")
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")  # ratios need it
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    return args


class Bench:
    """One variant: its model, optimizer and the two timed callables."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device):
        torch.manual_seed(0)  # every variant starts from the same shared weights
        model = create_model(args.arch, img_size=args.img_size, num_classes=1000, layerscale_init=1e-4,
                             drop_path=args.drop_path, specialize=VARIANTS[name]).to(device)
        self.name, self.model, self.device = name, model, device
        self.params = count_parameters(model)
        self.optimizer = create_optimizer_v2(model, args.optimizer, lr=1e-4, weight_decay=0.05)
        self.forward = torch.compile(model) if args.compile else model
        self.loss_fn = nn.BCEWithLogitsLoss()  # DeiT-III's loss
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else contextlib.nullcontext())

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """One optimizer step; returns the seconds of forward+backward and of the optimizer."""
        self.model.train()
        self.sync()
        start = time.perf_counter()
        with self.autocast:
            loss = self.loss_fn(self.forward(images).float(), targets)
        loss.backward()
        self.sync()
        middle = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sync()
        end = time.perf_counter()
        return {"train": end - start, "train.fwd_bwd": middle - start, "train.optimizer": end - middle}

    def infer(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        self.model.eval()
        self.sync()
        start = time.perf_counter()
        with torch.inference_mode(), self.autocast:
            self.forward(images)
        self.sync()
        return {"infer": time.perf_counter() - start}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    benches = [Bench(name, args, device) for name in args.variants]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=generator).to(device)
    targets = (torch.rand(args.batch, 1000, generator=generator) < 0.002).float().to(device)
    steps: list[Callable[[Bench], dict[str, float]]] = []
    if "train" in args.modes:
        steps.append(lambda bench: bench.train_step(images, targets))
    if "infer" in args.modes:
        steps.append(lambda bench: bench.infer(images, targets))

    for bench in benches:  # compile, allocator and oneDNN warm-up, not timed
        for _ in range(args.warmup):
            for step in steps:
                step(bench)

    times: dict[str, dict[str, list[float]]] = {bench.name: {} for bench in benches}
    for rep in range(args.reps):
        shift = rep % len(benches)  # rotate who goes first
        for bench in benches[shift:] + benches[:shift]:
            for step in steps:
                for key, seconds in step(bench).items():
                    times[bench.name].setdefault(key, []).append(seconds)
        print(f"\rrep {rep + 1}/{args.reps}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    baseline = times["baseline"]
    results = {}
    for bench in benches:
        own = times[bench.name]
        entry = {"params": bench.params, "param_overhead_pct": 100 * (bench.params / benches[0].params - 1)}
        for key, seconds in own.items():
            ratios = [a / b for a, b in zip(seconds, baseline[key])]
            r1, r2, r3 = quartiles(ratios)
            entry[key] = {"ms_median": 1e3 * statistics.median(seconds),
                          "images_per_s": args.batch / statistics.median(seconds),
                          "ratio_median": r2, "ratio_q1": r1, "ratio_q3": r3, "seconds": seconds}
        results[bench.name] = entry
    return {"config": {k: v for k, v in vars(args).items() if k != "json"} | {
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"},
            "results": results}


def print_table(report: dict) -> None:
    config, results = report["config"], report["results"]
    print(f"{config['arch']}  batch {config['batch']}  {config['img_size']} px  {config['device_name']}  "
          f"threads {config['threads']}  reps {config['reps']}  compile {config['compile']}  "
          f"optimizer {config['optimizer']}  torch {config['torch']}")
    keys = [k for k in ("train", "train.fwd_bwd", "train.optimizer", "infer") if k in results["baseline"]]
    header = f"{'variant':<14} {'params':>16} " + " ".join(f"{k:>34}" for k in keys)
    print(header)
    print(f"{'':<14} {'':>16} " + " ".join(f"{'ms  img/s  ratio [q1-q3]':>34}" for _ in keys))
    for name, entry in results.items():
        params = f"{entry['params'] / 1e6:.2f}M (+{entry['param_overhead_pct']:.2f}%)"
        cells = []
        for key in keys:
            r = entry[key]
            cells.append(f"{r['ms_median']:8.1f} {r['images_per_s']:6.1f}  "
                         f"{r['ratio_median']:.3f} [{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}]")
        print(f"{name:<14} {params:>16} " + " ".join(f"{c:>34}" for c in cells))


def profile(args: argparse.Namespace) -> None:
    """Where a train step's time goes, per variant: torch.profiler's ops by self time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    device = torch.device(args.device)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size).to(device)
    targets = torch.zeros(args.batch, 1000).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in args.variants:
        bench = Bench(name, args, device)
        for _ in range(args.warmup):
            bench.train_step(images, targets)
        with torch_profile(activities=activities) as prof:
            bench.train_step(images, targets)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\n== {name}: one train step, top ops by self time")
        print(prof.key_averages().table(sort_by=sort, row_limit=18))


def main(argv=None) -> None:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    if args.json:
        text = json.dumps(report, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.profile:
        profile(args)


if __name__ == "__main__":
    main()
