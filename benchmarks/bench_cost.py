"""What does one training step cost on a GPU, op by op, without a GPU? Baseline vs specialized.

Counts every op of one DeiT-III training step (forward, BCE, backward, LAMB) of each variant
with a ``TorchDispatchMode`` on fake tensors (shapes and dtypes only, no arithmetic: a ViT-S step
at the real per-GPU batch of 256 counts in seconds on a CPU), under bf16 autocast as train.py runs
on a GPU, and reports:

- per op, its FLOPs (``torch.utils.flop_counter``'s formulas for the matrix products, convolutions
  and attention; elementwise ops and reductions are counted as memory traffic only) and the bytes
  it reads and writes (every tensor argument, counted once per distinct element, plus every
  output; views and allocations launch no kernel and move nothing; an overwrite such as ``copy_``
  does not read its destination);
- an H100 roofline estimate: per op the larger of its FLOPs at the dense bf16 peak and its bytes
  at the HBM bandwidth, summed over the step. NVIDIA H100 Tensor Core GPU datasheet, H100 SXM
  column: BF16 Tensor Core 1,979 TFLOPS with sparsity, 989 dense; GPU memory bandwidth 3.35 TB/s
  (HBM3). It is a lower bound: no launch gaps, no cache reuse between kernels, every kernel at its
  roofline;
- the same estimate compiled, under a stated model of what ``torch.compile`` fuses (not inductor's
  kernels): every op with FLOPs (matrix product, attention) stays one library kernel with its
  eager bytes; the FLOP-free ops of the forward (or of the backward) that lie behind the same
  number of library kernels on their longest chain of inputs form one fused kernel (so all the
  elementwise ops and reductions between two matrix products fuse, whatever order eager ran
  them in), which reads once each tensor it did not itself write and writes once each tensor it
  writes, as much of it as a later op outside it reads (what only the kernel itself reads stays
  in registers; rows sliced out later are written, not the whole tensor). The optimizer keeps
  its eager ops: train.py compiles the model, not the optimizer step;
- the extra bytes of the paper default, per op kind and per autograd node (backward) or module
  class (forward), and the eager roofline without the extra ops that autograd's backward of the
  row overwrite runs (the ``CopySlices`` and ``SliceBackward0`` nodes: the output gradient
  cloned and its rows zeroed, the slice's zero-filled input gradient, and the sum of that with
  the shared path's gradient): what removing the overwrite's backward passes would give.

The step is train.py's: ``model(images)`` under ``torch.autocast(bfloat16)``, timm's
BinaryCrossEntropy, backward, timm's LAMB (``foreach``, its CUDA default) and ``zero_grad``. The
autocast is the CPU one run with CUDA's policy for the one op where they differ in a ViT:
LayerNorm runs in float32 (CUDA autocast's fp32 list) and returns float32. The counts are exact
for the shapes; the activations' bytes and FLOPs grow linearly with the batch, the weights' and
the optimizer's do not.

    python benchmarks/bench_cost.py                    # ViT-S/16, batch 256, 224 px
    python benchmarks/bench_cost.py --arch deit3_base_patch16_224 --batch 256 --img-size 192
    python benchmarks/bench_cost.py --top 25 --json cost.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field
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

H100_BF16_TFLOPS = 989.0  # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM, BF16 Tensor Core, dense
H100_HBM_TBPS = 3.35      # same datasheet, H100 SXM, GPU memory bandwidth (HBM3)
VARIANTS = {"baseline": None, "paper_default": dict(PAPER_DEFAULT)}
OVERWRITE_NODES = ("torch::autograd::CopySlices", "SliceBackward0")  # autograd's nodes of a row overwrite
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
    name: str       # aten op, or "fused" for a fused run of ops
    phase: str      # forward | backward | optimizer
    where: str      # forward: the class of the innermost module it ran in; backward: the autograd node
    flops: float
    bytes: float
    reads: list = field(default_factory=list)   # (storage, bytes) of each tensor read
    writes: list = field(default_factory=list)  # (storage, bytes) of each tensor written


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
    caller sets and, in the forward, to the innermost module of `module_types` (module path ->
    class name) that `tracker` (a ModuleTracker, or None) reports, in the backward to the autograd
    node that runs it."""

    def __init__(self, tracker: ModuleTracker | None = None, module_types: dict[str, str] | None = None):
        super().__init__()
        self.tracker, self.module_types = tracker, module_types or {}
        self.phase, self.ops = "forward", []
        self._storages = []  # kept alive, so that no two tensors of the step share a storage address

    def _storage(self, tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        self._storages.append(storage)
        return storage._cdata

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_view(func):
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in OVERWRITES:
            inputs = inputs[1:]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        reads = [(self._storage(t), _distinct_bytes(t)) for t in inputs]
        writes = [(self._storage(t), t.numel() * t.element_size()) for t in outputs]
        counter = FLOPS.get(func._overloadpacket)
        flops = counter(*args, out=out, **kwargs) if counter is not None else 0
        where = ""
        if self.phase == "forward" and self.tracker is not None:
            parents = [p for p in self.tracker.parents if p in self.module_types]
            where = self.module_types[max(parents, key=len)] if parents else ""
        elif self.phase == "backward":
            node = torch._C._current_autograd_node()
            where = node.name() if node is not None else ""
        self.ops.append(Op(func._overloadpacket.__name__, self.phase, where, float(flops),
                           float(sum(b for _, b in reads) + sum(b for _, b in writes)), reads, writes))
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
                        drop_path=0.0, specialize=VARIANTS[name], report=None).train()


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
        # forward ops are attributed to the class a module was split from (GlobalTokenLayerNorm -> LayerNorm)
        types = {f"{type(model).__name__}.{path}" if path else type(model).__name__:
                 type(module).__name__.removeprefix("GlobalToken") for path, module in model.named_modules()}
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


def overwrite_backward(ops: list[Op]) -> list[Op]:
    """The ops that autograd's backward of a row overwrite runs: those of its ``CopySlices`` and
    ``SliceBackward0`` nodes, and each backward ``add`` that sums a slice's zero-filled input
    gradient (a ``slice_backward`` output) into another path's (autograd runs that sum in whichever
    of the two nodes delivers its gradient second)."""
    zero_filled = {storage for op in ops if op.name == "slice_backward" for storage, _ in op.writes}
    return [op for op in ops if op.phase == "backward" and (
        op.where in OVERWRITE_NODES or op.name == "add" and any(s in zero_filled for s, _ in op.reads))]


def roofline_seconds(flops: float, moved: float, peak_tflops: float = H100_BF16_TFLOPS,
                     hbm_tbps: float = H100_HBM_TBPS) -> float:
    """One kernel at its roofline: the larger of its FLOPs at the peak and its bytes at the bandwidth."""
    return max(flops / (peak_tflops * 1e12), moved / (hbm_tbps * 1e12))


def compiled(ops: list[Op]) -> list[Op]:
    """The step as the fusion model of the module docstring sees it: each op with FLOPs (a library
    kernel) as it is; the FLOP-free ops of the forward (or of the backward) grouped by their depth,
    the number of library kernels on the longest chain of ops that leads to them within the phase,
    each group one "fused" op; optimizer ops as they are. A group reads once every storage it reads
    before writing it, and writes once each storage it writes, as much of it as an op outside the
    group reads afterwards (the largest such read: rows sliced out later are written, not the whole
    tensor; what only the group itself reads stays in registers)."""
    depth, groups, step = {}, {}, []  # depth: storage -> (phase, depth of its last write)
    for index, op in enumerate(ops):
        if op.phase == "optimizer":
            step.append(op)
            continue
        level = max((depth[s][1] for s, _ in op.reads if s in depth and depth[s][0] == op.phase), default=0)
        if op.flops:
            step.append(op)
            level += 1
        elif (op.phase, level) in groups:
            groups[op.phase, level].append(index)
        else:
            groups[op.phase, level] = [index]
            step.append(groups[op.phase, level])
        for storage, _ in op.writes:
            depth[storage] = (op.phase, level)
    read_by = collections.defaultdict(list)  # storage -> (index, bytes) of every read
    for index, op in enumerate(ops):
        for storage, size in op.reads:
            read_by[storage].append((index, size))
    return [_fused(members, ops, read_by) if isinstance(members, list) else members for members in step]


def _fused(members: list[int], ops: list[Op], read_by: dict) -> Op:
    """One fused kernel of the ops at `members` (see `compiled`)."""
    inside, reads, writes = set(members), {}, {}  # writes: storage -> (index of the last write, bytes)
    for index in members:
        for storage, size in ops[index].reads:
            if storage not in writes:
                reads[storage] = max(reads.get(storage, 0), size)
        for storage, size in ops[index].writes:
            writes[storage] = (index, max(writes.get(storage, (0, 0))[1], size))
    stored = sum(min(size, max((read for index, read in read_by[storage] if index > last and index not in inside),
                               default=0)) for storage, (last, size) in writes.items())
    return Op("fused", ops[members[0]].phase, f"{len(members)} ops", 0.0, float(sum(reads.values()) + stored))


# ---------------------------------------------------------------------- report

def summarise(ops: list[Op], args: argparse.Namespace) -> dict:
    """Kernels, FLOPs, bytes and roofline seconds per phase and in total."""
    by_phase = collections.defaultdict(lambda: {"ops": 0, "flops": 0.0, "bytes": 0.0, "seconds": 0.0})
    for op in ops:
        entry = by_phase[op.phase]
        entry["ops"] += 1
        entry["flops"] += op.flops
        entry["bytes"] += op.bytes
        entry["seconds"] += roofline_seconds(op.flops, op.bytes, args.peak_tflops, args.hbm_tbps)
    total = {key: sum(entry[key] for entry in by_phase.values()) for key in ("ops", "flops", "bytes", "seconds")}
    return {"total": total, **by_phase}


def grouped(ops: list[Op], key, args: argparse.Namespace) -> dict:
    groups = collections.defaultdict(lambda: {"ops": 0, "flops": 0.0, "bytes": 0.0, "seconds": 0.0})
    for op in ops:
        group = groups[key(op)]
        group["ops"] += 1
        group["flops"] += op.flops
        group["bytes"] += op.bytes
        group["seconds"] += roofline_seconds(op.flops, op.bytes, args.peak_tflops, args.hbm_tbps)
    return groups


def difference(ops: dict[str, list[Op]], key, args: argparse.Namespace) -> dict[str, dict]:
    """paper_default - baseline per group of `key`: ops, FLOPs, bytes, roofline seconds."""
    base, own = grouped(ops["baseline"], key, args), grouped(ops["paper_default"], key, args)
    empty = {"ops": 0, "flops": 0.0, "bytes": 0.0, "seconds": 0.0}
    return {name: {stat: own.get(name, empty)[stat] - base.get(name, empty)[stat] for stat in empty}
            for name in set(base) | set(own)}


def print_difference(title: str, rows: dict[str, dict], top: int) -> None:
    print(f"\n{title:<52} {'MB':>9} {'ops':>6} {'GFLOP':>7}")
    for name, row in sorted(rows.items(), key=lambda item: -abs(item[1]["bytes"]))[:top]:
        print(f"  {name:<50} {row['bytes'] / 1e6:9.1f} {row['ops']:6d} {row['flops'] / 1e9:7.2f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit3_small_patch16_224")
    parser.add_argument("--batch", type=int, default=256, help="images per step (DeiT-III ViT-S: 256 per GPU)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="dense bf16 peak, TFLOP/s")
    parser.add_argument("--hbm-tbps", type=float, default=H100_HBM_TBPS, help="memory bandwidth, TB/s")
    parser.add_argument("--top", type=int, default=12, help="rows of the tables of extra bytes")
    parser.add_argument("--json", metavar="PATH", help="write the report and every op to this file")
    args = parser.parse_args(argv)

    ops = {name: count_step(name, args) for name in VARIANTS}
    eager = {name: summarise(variant_ops, args) for name, variant_ops in ops.items()}
    fused = {name: summarise(compiled(variant_ops), args) for name, variant_ops in ops.items()}
    removed = {name: summarise(overwrite_backward(variant_ops), args)["total"] for name, variant_ops in ops.items()}
    removed = {stat: removed["paper_default"][stat] - removed["baseline"][stat] for stat in ("ops", "bytes", "seconds")}
    rows = {  # name: (baseline, paper_default, format)
        "kernels, eager": (eager["baseline"]["total"]["ops"], eager["paper_default"]["total"]["ops"], "{:.0f}"),
        "kernels, compiled": (fused["baseline"]["total"]["ops"], fused["paper_default"]["total"]["ops"], "{:.0f}"),
        "GFLOP": (eager["baseline"]["total"]["flops"] / 1e9, eager["paper_default"]["total"]["flops"] / 1e9, "{:.1f}"),
        "GB moved, eager": (eager["baseline"]["total"]["bytes"] / 1e9, eager["paper_default"]["total"]["bytes"] / 1e9,
                            "{:.2f}"),
        "GB moved, compiled": (fused["baseline"]["total"]["bytes"] / 1e9,
                               fused["paper_default"]["total"]["bytes"] / 1e9, "{:.2f}"),
        "roofline ms, eager": (1e3 * eager["baseline"]["total"]["seconds"],
                               1e3 * eager["paper_default"]["total"]["seconds"], "{:.2f}"),
        "roofline ms, compiled": (1e3 * fused["baseline"]["total"]["seconds"],
                                  1e3 * fused["paper_default"]["total"]["seconds"], "{:.2f}"),
        "roofline ms, eager, overwrite's backward removed": (
            1e3 * eager["baseline"]["total"]["seconds"],
            1e3 * (eager["paper_default"]["total"]["seconds"] - removed["seconds"]), "{:.2f}"),
    }
    print(f"{args.arch}, batch {args.batch}, {args.img_size} px, one training step (forward, BCE, backward, LAMB), "
          f"bf16 autocast; roofline at {args.peak_tflops:g} TFLOP/s and {args.hbm_tbps:g} TB/s\n")
    print(f"{'':<49} {'baseline':>10} {'paper_default':>14} {'ratio':>8}")
    for name, (base, own, form) in rows.items():
        print(f"{name:<49} {form.format(base):>10} {form.format(own):>14} {own / base:7.4f}x")
    print(f"\nper phase{'':<16} {'kernels':>7} {'GFLOP':>8} {'GB eager':>9} {'ms eager':>9} {'GB compiled':>12} "
          f"{'ms compiled':>12}")
    for name in VARIANTS:
        for phase in ("forward", "backward", "optimizer"):
            one, two = eager[name][phase], fused[name][phase]
            print(f"  {name:<14} {phase:<9} {one['ops']:7d} {one['flops'] / 1e9:8.1f} {one['bytes'] / 1e9:9.2f} "
                  f"{1e3 * one['seconds']:9.2f} {two['bytes'] / 1e9:12.2f} {1e3 * two['seconds']:12.2f}")
    extra = eager["paper_default"]["total"]["bytes"] - eager["baseline"]["total"]["bytes"]
    print(f"\nthe overwrite's backward ({', '.join(OVERWRITE_NODES)}, and the sums of zero-filled slice gradients): "
          f"{removed['ops']} more kernels, {removed['bytes'] / 1e6:+.0f} MB of the {extra / 1e6:+.0f} MB eager")
    print_difference("extra bytes eager, by op (paper_default - baseline)",
                     difference(ops, lambda op: f"{op.phase}: {op.name}", args), args.top)
    print_difference("extra bytes eager, by module class (forward) or autograd node",
                     difference(ops, lambda op: f"{op.phase}: {op.where or '-'}", args), args.top)
    report = {"config": {**vars(args), "torch": torch.__version__, **hardware()},
              "rows": {name: {"baseline": base, "paper_default": own} for name, (base, own, _) in rows.items()},
              "eager": eager, "compiled": fused, "overwrite_backward": removed}
    if args.json:
        report["ops"] = {name: [{k: v for k, v in asdict(op).items() if k not in ("reads", "writes")}
                                for op in variant_ops] for name, variant_ops in ops.items()}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
