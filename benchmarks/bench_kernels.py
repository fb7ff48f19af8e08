"""Which CPU kernel settings change a training run's bits, and what pinning the kernels costs.

    python benchmarks/bench_kernels.py [--config recipes/shapes/specialized.yaml] [--steps 20] [--reps 5] [--threads 1]

torch picks its CPU kernels at start-up from the CPU it finds: ATen's vectorised kernels from the CPU
capability (`torch.backends.cpu.get_cpu_capability()`: AVX512, AVX2, ...; `ATEN_CPU_CAPABILITY` caps
it), MKL's GEMM (nn.Linear) from the CPU's vendor and model (`MKL_CBWR` pins one code path), oneDNN's
convolution and GELU from its ISA and caches (`ONEDNN_MAX_CPU_ISA` caps the ISA), and the split of
every parallel reduction from the thread count (`OMP_NUM_THREADS`). Each variant below is a set of
these environment variables, so each runs in a process of its own: it loads the same initial weights
and the same batches (written by this script), trains the recipe's model with the recipe's optimizer
and loss for `--steps` steps after two warm-up steps, and reports its images per second of wall
time and of its CPU time, and a hash of its final weights. The variants interleave, in a rotating
order per repetition; the result is the median of the per-repetition ratios to `default` [quartiles],
and whether the weights equal default's bit for bit. On a machine shared with other jobs, `--threads
1` (every variant on one thread, unless it sets OMP_NUM_THREADS itself) and the CPU-time ratio measure
the kernels rather than the wait for a free core. docs/reproducibility.md reads the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clsvit.config import load_config  # noqa: E402
from clsvit.deit3 import build_loss, build_optimizer, one_hot_targets  # noqa: E402
from clsvit.model import build_model  # noqa: E402
from clsvit.tracking import KERNEL_ENV  # noqa: E402

PORTABLE = "MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"
VARIANTS = ("default", "OMP_NUM_THREADS=1", "ATEN_CPU_CAPABILITY=avx2", "ONEDNN_MAX_CPU_ISA=AVX2",
            "MKL_CBWR=COMPATIBLE", "MKL_CBWR=AVX2", "MKL_ENABLE_INSTRUCTIONS=AVX2", PORTABLE)


def model_and_loss(cfg):
    num_classes = cfg["model"]["num_classes"] or 10
    return build_model(cfg["model"], num_classes).train(), build_loss(cfg["train"]), num_classes


def child(config: str, state_file: str, steps: int) -> None:
    """One variant: train from the saved weights on the saved batches; print images/s and the weights' hash."""
    cfg = load_config(config)
    model, criterion, num_classes = model_and_loss(cfg)
    state = torch.load(state_file, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer = build_optimizer(model, cfg["optim"])
    batches = state["batches"]
    start, cpu_start, seen = None, None, 0
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            start, cpu_start = time.perf_counter(), time.process_time()
        images, labels = batches[step % len(batches)]
        loss = criterion(model(images), one_hot_targets(labels, num_classes, 0.0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += images.shape[0] if step >= 2 else 0
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    print(json.dumps({"images_per_s": seen / elapsed, "images_per_cpu_s": seen / cpu, "weights": digest.hexdigest()[:16],
                      "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}))


def run_variant(variant: str, config: str, state_file: Path, steps: int, threads: int | None) -> dict:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
           **dict(item.split("=", 1) for item in variant.split() if variant != "default")}
    for key in KERNEL_ENV:
        if key not in variant and not (key == "OMP_NUM_THREADS" and threads):
            env.pop(key, None)  # each variant sets exactly its own settings
    done = subprocess.run([sys.executable, __file__, "--child", "--config", config, "--state", str(state_file),
                           "--steps", str(steps)], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "recipes" / "shapes" / "specialized.yaml"))
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per process")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of every variant that does not set it")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        help="environment settings to compare, each 'VAR=value [VAR=value ...]' (default: %(default)s)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.config, args.state, args.steps)

    cfg = load_config(args.config)
    torch.manual_seed(cfg["run"]["seed"])
    model, _, num_classes = model_and_loss(cfg)
    batch, size = cfg["train"]["batch_per_device"], cfg["model"]["img_size"]
    rng = np.random.default_rng(0)  # numpy's generator: the batches do not depend on torch's RNG kernels
    batches = [(torch.from_numpy(rng.standard_normal((batch, 3, size, size), dtype=np.float32)),
                torch.from_numpy(rng.integers(0, num_classes, batch))) for _ in range(4)]
    variants = tuple(dict.fromkeys(["default", *args.variants]))  # the reference first, once
    results: dict[str, list[dict]] = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory() as workdir:
        state_file = Path(workdir) / "state.pt"
        torch.save({"model": model.state_dict(), "batches": batches}, state_file)
        for rep in range(args.reps):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for variant in order:
                results[variant].append(run_variant(variant, args.config, state_file, args.steps, args.threads))
            print(f"rep {rep}: " + ", ".join(f"{v}: {results[v][-1]['images_per_s']:.0f}" for v in variants), flush=True)

    base = results["default"]
    print(f"\n{Path(args.config).name}, batch {batch}, {args.steps} steps per process, {args.reps} reps, "
          f"CPU capability {base[0]['capability']}, {base[0]['threads']} thread(s) in default")
    print("| variant | images/s (median) | ratio to default [quartiles] | images per CPU-s | ratio [quartiles] | "
          "weights after the steps |\n|---|---|---|---|---|---|")
    for variant, runs in results.items():
        cells = []
        for key in ("images_per_s", "images_per_cpu_s"):
            ratios = [run[key] / ref[key] for run, ref in zip(runs, base)]
            q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
            cells += [f"{statistics.median(run[key] for run in runs):.0f}", f"{median:.3f} [{q1:.3f}–{q3:.3f}]"]
        hashes = {run["weights"] for run in runs}
        same = ("varies between runs" if len(hashes) > 1 else
                "= default" if hashes == {base[0]["weights"]} else "differ from default")
        print(f"| {variant} | {' | '.join(cells)} | {same} ({runs[0]['weights']}) |")


if __name__ == "__main__":
    main()
