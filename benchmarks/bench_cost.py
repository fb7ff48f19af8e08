"""What does one training step cost on a GPU, op by op, without a GPU? Baseline vs specialized.

Counts every op of one DeiT-III training step (forward, BCE, backward, LAMB) of each variant
with a ``TorchDispatchMode`` on fake tensors (shapes and dtypes only, no arithmetic: a ViT-S step
at batch 256 counts in seconds), under bf16 autocast as train.py runs on a GPU, and reports:

- per op, its FLOPs (``torch.utils.flop_counter``'s formulas for the matrix products, convolutions
  and attention; elementwise and reduction ops are counted as memory traffic only) and the bytes it
  reads and writes (every tensor argument, counted once per distinct element, plus every output;
  views move nothing; an overwrite such as ``copy_`` does not read its destination);
- an H100 roofline estimate: per op the larger of its FLOPs at the dense bf16 peak and its bytes at
  the HBM bandwidth, summed over the step. NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989.4
  TFLOP/s dense BF16 (1,979 with sparsity), 3.35 TB/s HBM3. It is a lower bound: no launch gaps,
  no cache reuse between ops, every kernel at its roofline;
- ``--compiled``: the same estimate for ``torch.compile``, with the fusion measured instead of
  assumed: the forward + backward graph is compiled by inductor on the CPU, at two small batches,
  and ``torch._inductor``'s own per-kernel accounting (``GraphLowering.count_bytes``: the bytes
  each kernel reads and writes after fusion) is extrapolated linearly to ``--batch``: each library
  kernel (matrix product, attention; the same ones at any batch) with its FLOPs on its own, the
  generated (fused elementwise and reduction) kernels as one memory-bound total. The optimizer is
  not compiled by train.py and keeps its eager ops. Inductor's CPU backend fuses with the same
  scheduler as its GPU backend, but it is an approximation of the GPU's kernels, not a copy.

The step is train.py's: ``model(images)`` under ``torch.autocast(bfloat16)``, timm's
BinaryCrossEntropy, backward, timm's LAMB (``foreach``, its CUDA default) and ``zero_grad``. The
autocast is the CPU one run with CUDA's policy for the one op where they differ in a ViT:
LayerNorm runs in float32 (CUDA autocast's fp32 list) and returns float32.

    python benchmarks/bench_cost.py                          # ViT-S/16, batch 256, 224 px: eager
    python benchmarks/bench_cost.py --compiled               # + inductor (minutes: two compilations per variant)
    python benchmarks/bench_cost.py --top 25 --json cost.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy
from timm.optim import create_optimizer_v2
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.module_tracker import ModuleTracker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from clsvit import PAPER_DEFAULT, create_model  # noqa: E402
from clsvit.tracking import hardware  # noqa: E402

H100_BF16_TFLOPS = 989.4  # NVIDIA H100 Tensor Core GPU datasheet, SXM5, BF16 Tensor Core, dense
H100_HBM_TBPS = 3.35      # same datasheet, SXM5 GPU memory bandwidth (HBM3)
VARIANTS = {"baseline": None, "paper_default": dict(PAPER_DEFAULT)}
aten = torch.ops.aten
OVERWRITES = {aten.copy_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default}
NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
             aten.new_empty_strided.default, aten._unsafe_view.default, aten.lift_fresh.default}


def _cpu_flash_forward(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_flash_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# torch's FLOP formulas, plus the CPU kernels of scaled_dot_product_attention that it lacks
FLOPS = {**{packet: lambda *a, _f=function, out=None, **k: _f(*a, out_val=out, **k) for packet, function in
            flop_registry.items()},
         aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
         aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}


@dataclass
class Op:
    name: str       # aten op
    phase: str      # forward | backward | optimizer
    where: str      # forward: the class of the innermost module it ran in; backward: the autograd node
    flops: float
    bytes: float


def _is_view(func) -> bool:
    """Whether an op launches no kernel: a view, an allocation, or a metadata query (prim.*)."""
    returns = func._schema.returns
    return func in NO_KERNEL or func.namespace != "aten" or (
        bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns))


def _distinct_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor reads (an expanded dimension, stride 0, reads one)."""
    count = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        if stride != 0:
            count *= size
    return count * tensor.element_size()


class CountOps(TorchDispatchMode):
    """Records an :class:`Op` per dispatched op that launches a kernel, attributed to the phase the
    caller sets and, in the forward, to the innermost module ModuleTracker reports, in the backward
    to the autograd node that runs it."""

    def __init__(self, tracker: ModuleTracker, module_types: dict[str, str]):
        super().__init__()
        self.tracker, self.module_types = tracker, module_types
        self.phase, self.ops = "forward", []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_view(func):
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in OVERWRITES:
            inputs = inputs[1:]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        moved = sum(_distinct_bytes(t) for t in inputs) + sum(t.numel() * t.element_size() for t in outputs)
        counter = FLOPS.get(func._overloadpacket)
        flops = counter(*args, out=out, **kwargs) if counter is not None else 0
        if self.phase == "forward":
            parents = [p for p in self.tracker.parents if p in self.module_types]
            where = self.module_types[max(parents, key=len)] if parents else ""
        else:
            node = torch._C._current_autograd_node()
            where = node.name() if node is not None else ""
        self.ops.append(Op(func._overloadpacket.__name__, self.phase, where, float(flops), float(moved)))
        return out


@contextlib.contextmanager
def cuda_autocast_policy():
    """CPU bf16 autocast with CUDA autocast's policy for LayerNorm: float32 in, float32 out."""
    layer_norm = F.layer_norm

    def float32_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        with torch.autocast("cpu", enabled=False):
            return layer_norm(input.float(), normalized_shape, None if weight is None else weight.float(),
                              None if bias is None else bias.float(), eps)

    with mock.patch.object(F, "layer_norm", float32_layer_norm), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


def build(name: str, args: argparse.Namespace) -> torch.nn.Module:
    return create_model(args.arch, img_size=args.img_size, num_classes=1000, layerscale_init=1e-4,
                        drop_path=0.0, specialize=VARIANTS[name]).train()


def count_step(name: str, args: argparse.Namespace) -> list[Op]:
    """The ops of one training step of variant `name` at `args.batch` (fake tensors)."""
    model, mode = build(name, args), FakeTensorMode()  # built for real: timm's initialisation reads values
    for module in model.modules():
        for key, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None:
                (module._parameters if key in module._parameters else module._buffers)[key] = mode.from_tensor(tensor)
    with mode:
        optimizer = create_optimizer_v2(model, "lamb", lr=1e-3, weight_decay=0.05, foreach=True)
        images = torch.randn(args.batch, 3, args.img_size, args.img_size)
        targets = torch.zeros(args.batch, 1000)
        loss_fn = BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0)
        types = {f"{type(model).__name__}.{path}" if path else type(model).__name__: type(module).__name__
                 for path, module in model.named_modules()}
        counter = CountOps(None, types)
        with mock.patch("timm.optim.lamb._get_value", lambda step: 1.0):  # a fake step count has no value
            for counted in (False, True):  # the first step creates the optimizer's state: not counted
                with ModuleTracker() as tracker, counter if counted else contextlib.nullcontext():
                    counter.tracker, counter.phase = tracker, "forward"
                    with cuda_autocast_policy():
                        loss = loss_fn(model(images), targets)
                    counter.phase = "backward"
                    loss.backward()
                    counter.phase = "optimizer"
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
    return counter.ops


def roofline_seconds(flops: float, moved: float, args: argparse.Namespace) -> float:
    return max(flops / (args.peak_tflops * 1e12), moved / (args.hbm_tbps * 1e12))


# ---------------------------------------------------------------------- compiled (inductor)

@dataclass
class Kernel:
    name: str       # inductor's node name and kind
    extern: bool    # a library kernel (matrix product, attention) rather than generated code
    flops: float
    bytes: float


def _extern_flops(node) -> float:
    """FLOPs of a library kernel: inductor's estimate (matrix products, convolutions), or for the
    attention kernels (which it does not estimate) torch.utils.flop_counter's formulas."""
    kernel = str(getattr(node.node, "python_kernel_name", ""))
    if "scaled_dot_product" not in kernel:
        return float(node.estimate_flops() or 0)
    sizes = [[int(dim) for dim in buffer.get_size()] for buffer in node.node.inputs]
    if "backward" in kernel:  # grad_out, query, key, value, ...
        return float(sdpa_backward_flop_count(*sizes[:4]))
    return float(sdpa_flop_count(*sizes[:3]))


class _CountEveryGraph:
    """Stands in for inductor's metrics logger, enabled and silent: inductor counts the bytes of a
    graph's kernels (GraphLowering.count_bytes) only when that logger is enabled."""

    def isEnabledFor(self, level) -> bool:  # noqa: N802 (logging.Logger's name)
        return True

    def info(self, *args, **kwargs) -> None:
        pass


def inductor_kernels(name: str, args: argparse.Namespace, batch: int) -> list[Kernel]:
    """The kernels inductor generates for the forward and backward of variant `name` at `batch`,
    each with the bytes inductor counts for it (after fusion) and its FLOPs."""
    import torch._inductor.compile_fx as compile_fx
    import torch._inductor.graph as graph_module

    kernels: list[Kernel] = []
    original = graph_module.GraphLowering.count_bytes

    def count_bytes(graph):
        total, counts, runtimes = original(graph)
        for node, _ in counts:
            extern = type(node).__name__ == "ExternKernelSchedulerNode"
            kernels.append(Kernel(f"{type(node).__name__}:{node.get_name()}", extern,
                                  _extern_flops(node) if extern else 0.0, float(node.get_read_write_buffers_sizes())))
        return total, counts, runtimes

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(name, args)
    forward = torch.compile(model, fullgraph=True)
    images = torch.randn(batch, 3, args.img_size, args.img_size)
    targets = torch.zeros(batch, 1000)
    try:
        with mock.patch.object(graph_module.GraphLowering, "count_bytes", count_bytes), \
                mock.patch.object(compile_fx, "inductor_metrics_log", _CountEveryGraph()), \
                torch._inductor.config.patch(force_disable_caches=True):  # a graph from the cache is not counted
            with cuda_autocast_policy():
                loss = BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0)(forward(images), targets)
            loss.backward()  # compiles the backward graph
    finally:
        torch._dynamo.reset()
    return [kernel for kernel in kernels if kernel.bytes or kernel.flops]


def extrapolated(small: list[Kernel], large: list[Kernel], small_batch: int, large_batch: int,
                 batch: int) -> list[Kernel]:
    """The kernels at `batch` from two compilations, linear in the batch: each library kernel
    (matrix product, attention: the same ones at any batch) on its own, the generated kernels as
    one memory-bound total (inductor may fuse a few differently at another batch)."""
    scale = (batch - small_batch) / (large_batch - small_batch)
    line = lambda a, b: a + (b - a) * scale  # noqa: E731
    small_extern, large_extern = [k for k in small if k.extern], [k for k in large if k.extern]
    if len(small_extern) != len(large_extern):
        raise SystemExit(f"inductor called different library kernels at batch {small_batch} and {large_batch}: "
                         f"choose other --compile-batches")
    generated = Kernel(f"{sum(not k.extern for k in large)} generated kernels", False, 0.0,
                       line(sum(k.bytes for k in small if not k.extern), sum(k.bytes for k in large if not k.extern)))
    return [Kernel(a.name, True, line(a.flops, b.flops), line(a.bytes, b.bytes))
            for a, b in zip(small_extern, large_extern)] + [generated]


# ---------------------------------------------------------------------- report

def summarise(ops: list[Op], args: argparse.Namespace) -> dict:
    by_phase = collections.defaultdict(lambda: {"ops": 0, "flops": 0.0, "bytes": 0.0, "seconds": 0.0})
    for op in ops:
        entry = by_phase[op.phase]
        entry["ops"] += 1
        entry["flops"] += op.flops
        entry["bytes"] += op.bytes
        entry["seconds"] += roofline_seconds(op.flops, op.bytes, args)
    total = {key: sum(entry[key] for entry in by_phase.values()) for key in ("ops", "flops", "bytes", "seconds")}
    return {"total": total, **by_phase}


def grouped(ops: list[Op], key) -> dict:
    groups = collections.defaultdict(lambda: {"ops": 0, "flops": 0.0, "bytes": 0.0})
    for op in ops:
        group = groups[key(op)]
        group["ops"] += 1
        group["flops"] += op.flops
        group["bytes"] += op.bytes
    return groups


def difference(ops: dict[str, list[Op]], key, top: int) -> list[tuple]:
    base, own = grouped(ops["baseline"], key), grouped(ops["paper_default"], key)
    rows = [(name, own.get(name, {}).get("bytes", 0) - base.get(name, {}).get("bytes", 0),
             own.get(name, {}).get("ops", 0) - base.get(name, {}).get("ops", 0),
             own.get(name, {}).get("flops", 0) - base.get(name, {}).get("flops", 0)) for name in set(base) | set(own)]
    return sorted(rows, key=lambda row: -abs(row[1]))[:top]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit3_small_patch16_224")
    parser.add_argument("--batch", type=int, default=256, help="images per step (DeiT-III ViT-S: 256 per GPU)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="dense bf16 peak, TFLOP/s")
    parser.add_argument("--hbm-tbps", type=float, default=H100_HBM_TBPS, help="memory bandwidth, TB/s")
    parser.add_argument("--compiled", action="store_true", help="also estimate torch.compile with inductor (slow)")
    parser.add_argument("--compile-batches", type=int, nargs=2, default=(2, 4), metavar=("B1", "B2"),
                        help="the two batches inductor compiles at (the kernels' bytes are extrapolated from them)")
    parser.add_argument("--top", type=int, default=12, help="rows of the op and module differences")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    ops = {name: count_step(name, args) for name in VARIANTS}
    report = {"config": {**vars(args), "torch": torch.__version__, **hardware()}, "eager": {}, "compiled": {}}
    for name, variant_ops in ops.items():
        report["eager"][name] = summarise(variant_ops, args)
    base, spec = report["eager"]["baseline"]["total"], report["eager"]["paper_default"]["total"]
    print(f"{args.arch}, batch {args.batch}, {args.img_size} px, bf16 autocast; roofline at {args.peak_tflops:g} "
          f"TFLOP/s and {args.hbm_tbps:g} TB/s\n")
    print(f"eager, one training step   {'ops':>7} {'GFLOP':>9} {'GB moved':>9} {'roofline ms':>12}")
    for name in VARIANTS:
        for phase in ("forward", "backward", "optimizer", "total"):
            entry = report["eager"][name][phase]
            print(f"  {name:<14} {phase:<9} {entry['ops']:7d} {entry['flops'] / 1e9:9.1f} {entry['bytes'] / 1e9:9.3f} "
                  f"{1e3 * entry['seconds']:12.3f}")
    print(f"  paper_default / baseline: ops {spec['ops'] / base['ops']:.3f}x, FLOPs {spec['flops'] / base['flops']:.4f}x, "
          f"bytes {spec['bytes'] / base['bytes']:.4f}x (+{(spec['bytes'] - base['bytes']) / 1e6:.0f} MB), "
          f"roofline {spec['seconds'] / base['seconds']:.4f}x")
    print("\n  extra bytes by op (paper_default - baseline):  MB    ops   GFLOP")
    for name, moved, count, flops in difference(ops, lambda op: f"{op.phase}:{op.name}", args.top):
        print(f"    {name:<46} {moved / 1e6:8.1f} {count:6d} {flops / 1e9:7.2f}")
    print("\n  extra bytes by module (forward) and autograd node (backward):  MB    ops")
    for name, moved, count, _ in difference(ops, lambda op: f"{op.phase}:{op.where or '-'}", args.top):
        print(f"    {name:<46} {moved / 1e6:8.1f} {count:6d}")
    report["eager_extra_bytes"] = spec["bytes"] - base["bytes"]

    if args.compiled:
        b1, b2 = args.compile_batches
        print(f"\ncompiled (inductor's kernels at batch {b1} and {b2}, extrapolated to {args.batch}; the optimizer eager)")
        print(f"  {'variant':<14} {'kernels':>7} {'GFLOP':>9} {'GB moved':>9} {'roofline ms':>12}")
        for name in VARIANTS:
            kernels = extrapolated(inductor_kernels(name, args, b1), inductor_kernels(name, args, b2), b1, b2, args.batch)
            optimizer = report["eager"][name]["optimizer"]
            count = sum(k.extern for k in kernels) + int(kernels[-1].name.split()[0])
            entry = {"kernels": count + optimizer["ops"],
                     "flops": sum(k.flops for k in kernels) + optimizer["flops"],
                     "bytes": sum(k.bytes for k in kernels) + optimizer["bytes"],
                     "seconds": sum(roofline_seconds(k.flops, k.bytes, args) for k in kernels) + optimizer["seconds"],
                     "forward_backward_bytes": sum(k.bytes for k in kernels)}
            report["compiled"][name] = entry
            print(f"  {name:<14} {entry['kernels']:7d} {entry['flops'] / 1e9:9.1f} {entry['bytes'] / 1e9:9.3f} "
                  f"{1e3 * entry['seconds']:12.3f}")
        base, spec = report["compiled"]["baseline"], report["compiled"]["paper_default"]
        print(f"  paper_default / baseline: bytes {spec['bytes'] / base['bytes']:.4f}x "
              f"(+{(spec['bytes'] - base['bytes']) / 1e6:.0f} MB), roofline {spec['seconds'] / base['seconds']:.4f}x")
    if args.json:
        report["ops"] = {name: [asdict(op) for op in variant_ops] for name, variant_ops in ops.items()}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
