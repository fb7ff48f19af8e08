"""What does [CLS]/patch specialization cost at run time? Baseline vs specialized ViT, side by side.

Times a training step (forward + backward + optimizer step) and inference (`torch.inference_mode`)
for models built from the same seed: the timm baseline, `clsvit.PAPER_DEFAULT`, and every
component specialized in every block plus the final norm. The variants are *interleaved*: each
repetition times every variant once, in a rotating order, so a busy machine or a thermal drift
slows all of them alike. The ratio reported is the median over repetitions of the per-repetition
ratio variant/baseline (paired), which is what stays meaningful on a shared machine; the spread
is its inter-quartile range. Each step is timed twice: wall clock, and the process's CPU time
(`cpu` columns; on a CPU run with --threads 1 it leaves out the time the thread waited for a core).

    python benchmarks/bench_model.py                         # ViT-S/16, batch 32, 224 px, CPU
    python benchmarks/bench_model.py --batch 16 --reps 15 --threads 1 --json bench.json
    python benchmarks/bench_model.py --compile --batch 16 --threads 1       # torch.compile, CPU inductor
    python benchmarks/bench_model.py --compile regional ...  # block.compile() on every block instead
    python benchmarks/bench_model.py --modes memory --arch deit3_large_patch16_224 --batch 4
    python benchmarks/bench_model.py --device cuda --batch 256 --compile --peak-tflops 989

Targets: PAPER_DEFAULT <= 1.02x the baseline train step, <= 1.01x inference, <= 1.10x the
baseline's peak memory at the same batch (the paper: "no extra FLOPs").

`--modes memory` runs one eager training step (forward + backward) per variant, without and with
`set_grad_checkpointing(True)`, and reports (1) the bytes autograd saves for backward (distinct
storages seen by `torch.autograd.graph.saved_tensors_hooks`, parameters left out; with
checkpointing the blocks' own activations are not among them), (2) the peak of the bytes allocated
by the step's own ops (every tensor an op returns, until it is freed: a `TorchDispatchMode` tracks
storages; activations, temporaries and gradients; device independent), (3) that peak plus the
parameters (what a GPU holds at the peak of a step, less the optimizer state: 2x the parameters
for LAMB/AdamW), and on CUDA (4) `torch.cuda.max_memory_allocated` above the level before the step.

`--peak-tflops` (H100 / H200 SXM dense bf16: 989) adds model FLOPs utilisation: the FLOPs of one
training forward + backward, counted once per variant by `torch.utils.flop_counter.FlopCounterMode`
on a meta-device copy (shape arithmetic, every matmul and attention counted, optimizer not), over
the measured train step time.

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
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from clsvit import PAPER_DEFAULT, create_model  # noqa: E402
from clsvit.model import count_parameters  # noqa: E402
from clsvit.tracking import hardware  # noqa: E402

VARIANTS = {
    "baseline": None,
    "paper_default": dict(PAPER_DEFAULT),
    "everything": {"norm": 1.0, "layerscale": 1.0, "qkv": 1.0, "proj": 1.0, "mlp": 1.0, "final_norm": True},
}
DEFAULT_VARIANTS = ("baseline", "paper_default", "everything")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit3_small_patch16_224", help="timm ViT name")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--img-size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions of each variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--compile", nargs="?", const="full", default=None, choices=("full", "regional"),
                        help="torch.compile every model first (full), or each of its blocks (regional)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of --compile (eager: Dynamo's capture only, a quick check)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda runs under bf16 autocast")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="timed models recompute block activations in backward")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak TFLOP/s at the run's precision: adds MFU (H100/H200 bf16: 989)")
    parser.add_argument("--optimizer", default="lamb", choices=("lamb", "adamw"))
    parser.add_argument("--drop-path", type=float, default=0.0, help="uniform stochastic depth rate")
    parser.add_argument("--modes", default="train,infer", help="comma list of train, infer, memory")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print torch.profiler's top ops of one train step per variant")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' = stdout)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--reps and --batch must be >= 1, --warmup >= 0")
    args.modes = args.modes.split(",")
    args.variants = args.variants.split(",")
    for mode in args.modes:
        if mode not in ("train", "infer", "memory"):
            parser.error(f"--modes: unknown mode {mode!r} (train, infer, memory)")
    for name in args.variants:
        if name not in VARIANTS:
            parser.error(f"--variants: unknown variant {name!r} ({', '.join(VARIANTS)})")
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")  # ratios need it
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    return args


def build(name: str, args: argparse.Namespace, device: torch.device | str) -> nn.Module:
    torch.manual_seed(0)  # every variant starts from the same shared weights
    model = create_model(args.arch, img_size=args.img_size, num_classes=1000, layerscale_init=1e-4,
                         drop_path=args.drop_path, specialize=VARIANTS[name]).to(device)
    return model


def train_flops_per_image(name: str, args: argparse.Namespace) -> int:
    """FLOPs of one training forward + backward of one image, counted on a meta-device copy."""
    with torch.device("meta"):
        model = build(name, args, "meta").train()
        images = torch.randn(1, 3, args.img_size, args.img_size)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return counter.get_total_flops()


class Bench:
    """One variant: its model, optimizer and the two timed callables."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device):
        model = build(name, args, device)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.name, self.model, self.device = name, model, device
        self.params = count_parameters(model)
        self.optimizer = create_optimizer_v2(model, args.optimizer, lr=1e-4, weight_decay=0.05)
        if args.compile == "regional":
            for block in model.blocks:
                block.compile(backend=args.compile_backend)
            self.forward = model
        else:
            self.forward = torch.compile(model, backend=args.compile_backend) if args.compile else model
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
        start, cpu_start = time.perf_counter(), time.process_time()
        with self.autocast:
            loss = self.loss_fn(self.forward(images).float(), targets)
        loss.backward()
        self.sync()
        middle = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sync()
        end, cpu_end = time.perf_counter(), time.process_time()
        return {"train": end - start, "train.fwd_bwd": middle - start, "train.optimizer": end - middle,
                "train.cpu": cpu_end - cpu_start}

    def infer(self, images: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        self.model.eval()
        self.sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.inference_mode(), self.autocast:
            self.forward(images)
        self.sync()
        return {"infer": time.perf_counter() - start, "infer.cpu": time.process_time() - cpu_start}


class PeakBytes(TorchDispatchMode):
    """Peak of the bytes held by storages that ops return inside the mode (until freed)."""

    def __init__(self):
        super().__init__()
        self.live: dict[tuple[int, int], int] = {}
        self.current = self.peak = 0

    def _free(self, key) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                # a view or an in-place result shares an input's storage: nothing was allocated
                # (this also keeps out the weights, which `t()` and `detach()` return views of)
                if key[0] and key[0] not in inputs and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


def memory_of_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, autocast) -> dict[str, int]:
    """Bytes of one eager training forward + backward (see the module docstring)."""
    model.train()
    loss_fn = nn.BCEWithLogitsLoss()
    model.zero_grad(set_to_none=True)
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:  # Linear saves its weight: not an activation
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    result = {}
    if images.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with PeakBytes() as peak:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
            loss = loss_fn(model(images).float(), targets)
        loss.backward()
    if images.device.type == "cuda":
        torch.cuda.synchronize()
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated() - before
    model.zero_grad(set_to_none=True)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"saved_for_backward": sum(saved.values()), "peak_step_allocations": peak.peak,
            "params_plus_peak": param_bytes + peak.peak, **result}


def run_memory(args: argparse.Namespace, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=generator).to(device)
    targets = (torch.rand(args.batch, 1000, generator=generator) < 0.002).float().to(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    results: dict[str, dict] = {}
    for name in args.variants:
        model = build(name, args, device)
        for checkpointing in (False, True):
            model.set_grad_checkpointing(checkpointing)
            key = f"{name}+grad_ckpt" if checkpointing else name
            results[key] = memory_of_step(model, images, targets, autocast)
        del model
    for key, entry in results.items():
        base = results["baseline+grad_ckpt" if key.endswith("+grad_ckpt") else "baseline"]
        no_ckpt = results[key.removesuffix("+grad_ckpt")]
        entry["ratio_to_baseline"] = {k: v / base[k] for k, v in entry.items() if isinstance(v, int)}
        entry["ratio_to_no_ckpt"] = {k: v / no_ckpt[k] for k, v in entry.items() if isinstance(v, int)}
    return results


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = {k: v for k, v in vars(args).items() if k != "json"} | {
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", **hardware()}
    report = {"config": config}
    timed = [mode for mode in args.modes if mode in ("train", "infer")]
    if timed:
        report["results"] = run_timing(args, device, timed)
    if "memory" in args.modes:
        report["memory"] = run_memory(args, device)
    return report


def run_timing(args: argparse.Namespace, device: torch.device, modes: list[str]) -> dict:
    benches = [Bench(name, args, device) for name in args.variants]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=generator).to(device)
    targets = (torch.rand(args.batch, 1000, generator=generator) < 0.002).float().to(device)
    steps: list[Callable[[Bench], dict[str, float]]] = []
    if "train" in modes:
        steps.append(lambda bench: bench.train_step(images, targets))
    if "infer" in modes:
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
        if args.peak_tflops:
            entry["train_flops_per_image"] = train_flops_per_image(bench.name, args)
        for key, seconds in own.items():
            ratios = [a / b for a, b in zip(seconds, baseline[key])]
            r1, r2, r3 = quartiles(ratios)
            entry[key] = {"ms_median": 1e3 * statistics.median(seconds),
                          "images_per_s": args.batch / statistics.median(seconds),
                          "ratio_median": r2, "ratio_q1": r1, "ratio_q3": r3, "seconds": seconds}
        if args.peak_tflops and "train" in entry:
            achieved = entry["train_flops_per_image"] * entry["train"]["images_per_s"]
            entry["train"]["mfu"] = achieved / (args.peak_tflops * 1e12)
        results[bench.name] = entry
    return results


def print_table(report: dict) -> None:
    config = report["config"]
    print(f"{config['arch']}  batch {config['batch']}  {config['img_size']} px  {config['device_name']}  "
          f"threads {config['threads']}  reps {config['reps']}  compile {config['compile']}  "
          f"grad ckpt {config['grad_checkpointing']}  optimizer {config['optimizer']}  torch {config['torch']}")
    print(f"CPU {config['cpu']} ({config['cpu_capability']}, {config['cpu_count']} cores)"
          + (f", {config['gpu_count']} x {config['gpu']}" if config["gpu_count"] else ""))
    if "results" in report:
        print_timing(report["results"], config)
    if "memory" in report:
        print_memory(report["memory"])


def print_timing(results: dict, config: dict) -> None:
    keys = [k for k in ("train", "train.cpu", "train.fwd_bwd", "train.optimizer", "infer", "infer.cpu")
            if k in results["baseline"]]
    width = max(len(name) for name in results) + 1
    print(f"{'variant':<{width}} {'params':>16} " + " ".join(f"{k:>34}" for k in keys)
          + ("  train TFLOP/s  MFU" if config["peak_tflops"] else ""))
    print(f"{'':<{width}} {'':>16} " + " ".join(f"{'ms  img/s  ratio [q1-q3]':>34}" for _ in keys))
    for name, entry in results.items():
        params = f"{entry['params'] / 1e6:.2f}M (+{entry['param_overhead_pct']:.2f}%)"
        cells = []
        for key in keys:
            r = entry[key]
            cells.append(f"{r['ms_median']:8.1f} {r['images_per_s']:6.1f}  "
                         f"{r['ratio_median']:.3f} [{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}]")
        mfu = ""
        if "mfu" in entry.get("train", {}):
            tflops = entry["train_flops_per_image"] * entry["train"]["images_per_s"] / 1e12
            mfu = f"  {tflops:13.1f}  {100 * entry['train']['mfu']:.1f}%"
        print(f"{name:<{width}} {params:>16} " + " ".join(f"{c:>34}" for c in cells) + mfu)


def print_memory(memory: dict) -> None:
    keys = [k for k in ("saved_for_backward", "peak_step_allocations", "params_plus_peak", "cuda_max_allocated")
            if k in memory["baseline"]]
    width = max(len(name) for name in memory) + 1
    print("\nmemory of one eager training step (MiB; ratio to the baseline with the same checkpointing; "
          "ratio to the same variant without checkpointing)")
    print(f"{'variant':<{width}} " + " ".join(f"{k:>36}" for k in keys))
    for name, entry in memory.items():
        cells = [f"{entry[k] / 2**20:10.1f} {entry['ratio_to_baseline'][k]:7.3f}x {entry['ratio_to_no_ckpt'][k]:7.3f}x"
                 for k in keys]
        print(f"{name:<{width}} " + " ".join(f"{c:>36}" for c in cells))


def profile(args: argparse.Namespace, steps: int = 3) -> None:
    """Where a train step's time goes, per variant: torch.profiler's ops by self time, then each
    variant's per-op difference from the baseline (self time per step, mean of `steps` steps): a
    finer view than the whole-step ratio when the machine's noise hides a 1 % difference."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = torch.device(args.device)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size).to(device)
    targets = torch.zeros(args.batch, 1000).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    per_op: dict[str, dict[str, float]] = {}
    for name in args.variants:
        bench = Bench(name, args, device)
        for _ in range(max(1, args.warmup)):
            bench.train_step(images, targets)
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                bench.train_step(images, targets)
        averages = prof.key_averages()
        print(f"\n== {name}: {steps} train steps, top ops by self time")
        print(averages.table(sort_by=sort, row_limit=18))
        per_op[name] = {e.key: getattr(e, sort) / steps / 1e3 for e in averages}  # ms per step
        del bench
    base = per_op["baseline"]
    for name in args.variants[1:]:
        own = per_op[name]
        diffs = sorted(((own.get(k, 0.0) - base.get(k, 0.0), k) for k in set(own) | set(base)), reverse=True)
        total, base_total = sum(own.values()), sum(base.values())
        print(f"\n== {name} minus baseline, ms of self time per train step (sum over ops: "
              f"{total:.1f} vs {base_total:.1f}, {total / base_total:.4f}x)")
        for diff, key in diffs[:10] + [d for d in diffs[-5:] if d not in diffs[:10]]:
            print(f"  {diff:+9.2f}  {key[:60]}")


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
