"""How to split a token-wise module between global tokens and patches: the designs, per module.

Each specialized module computes `out[:, :n] = copy(x[:, :n])`, `out[:, n:] = shared(x[:, n:])`.
This script times forward + backward (and forward alone under `torch.inference_mode`) of one module
at ViT shapes for every way of computing that, against the unspecialized timm module, and checks
that each design computes the same function:

- `overwrite`  clsvit's split of norms and linears (`GlobalTokenSplit`): the shared module on every
               row, then the global rows overwritten in place (autograd's CopySlices clones the
               output gradient in backward). LayerScale was split this way before issue #6.
- `per_token`  one op with per-token parameters, (N, D) built by `cat` from the copy's and the
               shared vector: LayerScale `x * gamma_tok` (clsvit's GlobalTokenLayerScale, which
               overwrites instead when autograd does not record: inference has no backward);
               LayerNorm `addcmul(b_tok, layer_norm(x), w_tok)` (normalisation without affine).
- `subtract`   a custom autograd.Function: the shared backward on every row, the global rows' share
               of the shared weights' gradient subtracted, their input gradient replaced.

Columns: `err` = max |out - timm| and max |grad(shared) + grad(copy) - grad(timm)|, each relative
to the max |timm value| (clone init:
the split must add up to timm's gradient); `zeros` = whether a shared gradient that must be exactly
zero (output gradient zero on every patch row, as in the last block of a [CLS]-pooled model) is
exactly zero. Times are CPU time of the one compute thread (`--threads 1`), interleaved over
designs, median of the per-repetition ratio to the timm module; `extra` is the median paired
difference in ms.

    python benchmarks/bench_split.py                 # B=16, N=197, D=384 (ViT-S/16 at 224), eager
    python benchmarks/bench_split.py --compile       # each design under torch.compile (inductor)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, LayerScale
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clsvit.model import GlobalTokenLayerScale, GlobalTokenSplit, _add_global_copy  # noqa: E402


def specialized(module: nn.Module, n: int) -> nn.Module:
    module = copy.deepcopy(module)
    _add_global_copy(module, "bench", n, "clone", "")
    return module


class OverwriteLayerScale(GlobalTokenSplit, LayerScale):
    """LayerScale split like the other modules (the design before issue #6)."""
    _split_base = LayerScale


def ls_overwrite(base: LayerScale, n: int) -> nn.Module:
    module = specialized(base, n)
    assert isinstance(module, GlobalTokenLayerScale)
    module.__class__ = OverwriteLayerScale
    return module


class PerTokenAffineLayerNorm(LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, rest = self.num_global_tokens, x.shape[1] - self.num_global_tokens
        weight = torch.cat([self.global_copy.weight.expand(n, -1), self.weight.expand(rest, -1)])
        bias = torch.cat([self.global_copy.bias.expand(n, -1), self.bias.expand(rest, -1)])
        return torch.addcmul(bias, F.layer_norm(x, self.normalized_shape, None, None, self.eps), weight)


class _SubtractLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, copy_weight, copy_bias, n: int, eps: float):
        shape = (x.shape[-1],)
        out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        out[:, :n] = F.layer_norm(x[:, :n], shape, copy_weight, copy_bias, eps)
        ctx.save_for_backward(x, weight, bias, copy_weight, copy_bias, mean, rstd)
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, copy_weight, copy_bias, mean, rstd = ctx.saved_tensors
        n, shape, mask = ctx.n, (x.shape[-1],), [True, True, True]
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(grad, x, shape, mean, rstd, weight, bias, mask)
        g, xg, mg, rg = (t[:, :n].contiguous() for t in (grad, x, mean, rstd))
        dxg, dwg, dbg = torch.ops.aten.native_layer_norm_backward(g, xg, shape, mg, rg, copy_weight, copy_bias, mask)
        dw = dw - (g * (xg - mg) * rg).sum((0, 1))  # the global rows' share, computed with the shared weight
        db = db - g.sum((0, 1))
        dx[:, :n] = dxg
        return dx, dw, db, dwg, dbg, None, None


class SubtractLayerNorm(LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SubtractLayerNorm.apply(x, self.weight, self.bias, self.global_copy.weight,
                                        self.global_copy.bias, self.num_global_tokens, self.eps)


def swapped(base: nn.Module, n: int, cls: type) -> nn.Module:
    module = specialized(base, n)
    module.__class__ = cls
    return module


def designs(dim: int, n: int) -> dict[str, dict[str, nn.Module]]:
    torch.manual_seed(0)
    ls, ln, qkv = LayerScale(dim, 0.3), LayerNorm(dim), nn.Linear(dim, 3 * dim)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.1), ln.bias.normal_(0.0, 0.1)
    return {
        "layerscale": {"timm": ls, "overwrite": ls_overwrite(ls, n), "per_token": specialized(ls, n)},
        "layernorm": {"timm": ln, "overwrite": specialized(ln, n),
                      "per_token": swapped(ln, n, PerTokenAffineLayerNorm),
                      "subtract": swapped(ln, n, SubtractLayerNorm)},
        "qkv": {"timm": qkv, "overwrite": specialized(qkv, n)},
    }


def shared_and_copy_grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """name -> grad of the shared weight (+ the copy's, when there is one)."""
    out = {}
    for name, param in module.named_parameters():
        if name.startswith("global_copy."):
            continue
        grad = param.grad.clone()
        if hasattr(module, "global_copy"):
            grad += module.global_copy.get_parameter(name).grad
        out[name] = grad
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check(variants: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, n: int) -> dict[str, tuple]:
    ref = variants["timm"]
    result = {}
    xr = x.detach().requires_grad_()
    out_ref = ref(xr)
    out_ref.backward(grad)
    grads_ref = shared_and_copy_grads(ref)
    for name, module in variants.items():
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        out = module(xi)
        out.backward(grad)
        err_out = rel_err(out, out_ref)
        err_grad = max([rel_err(xi.grad, xr.grad)]
                       + [rel_err(g, grads_ref[k]) for k, g in shared_and_copy_grads(module).items()])
        zeros = "-"
        if name != "timm":
            module.zero_grad(set_to_none=True)
            only_global = grad.clone()
            only_global[:, n:] = 0
            module(x.detach().requires_grad_()).backward(only_global)
            shared = [p.grad for k, p in module.named_parameters() if not k.startswith("global_copy.")]
            zeros = "yes" if all(g is None or not g.any() for g in shared) else "NO"
        module.zero_grad(set_to_none=True)
        result[name] = (err_out, err_grad, zeros)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=197, help="sequence length N (global + patches)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--global-tokens", type=int, default=1)
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="torch.compile every module first")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = args.global_tokens
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.tokens, args.dim, generator=generator)
    print(f"B={args.batch} N={args.tokens} D={args.dim} n={n}  threads {torch.get_num_threads()}  "
          f"compile {args.compile}  reps {args.reps}  torch {torch.__version__}")
    print(f"{'module':<11} {'design':<10} {'err out/grad':>18} {'zeros':>5}  "
          f"{'train ms':>9} {'ratio':>6} {'extra':>7}  {'infer ms':>9} {'ratio':>6} {'extra':>7}")
    for component, variants in designs(args.dim, n).items():
        out_dim = 3 * args.dim if component == "qkv" else args.dim
        grad = torch.randn(args.batch, args.tokens, out_dim, generator=generator)
        errors = check(variants, x, grad, n)
        calls = {name: torch.compile(m) if args.compile else m for name, m in variants.items()}
        xg = x.detach().requires_grad_()

        def train(name, calls=calls, variants=variants, xg=xg, grad=grad):
            start = time.thread_time()
            calls[name](xg).backward(grad)
            seconds = time.thread_time() - start
            variants[name].zero_grad(set_to_none=True)
            xg.grad = None
            return seconds

        def infer(name, calls=calls):
            start = time.thread_time()
            with torch.inference_mode():
                calls[name](x)
            return time.thread_time() - start

        names = list(variants)
        times = {mode: {name: [] for name in names} for mode in ("train", "infer")}
        for rep in range(-3, args.reps):  # 3 warm-up repetitions (compilation, allocator)
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                for mode, fn in (("train", train), ("infer", infer)):
                    seconds = fn(name)
                    if rep >= 0:
                        times[mode][name].append(seconds)
        for name in names:
            cells = []
            for mode in ("train", "infer"):
                own, base = times[mode][name], times[mode]["timm"]
                ratio = statistics.median(a / b for a, b in zip(own, base))
                extra = statistics.median(a - b for a, b in zip(own, base))
                cells.append(f"{1e3 * statistics.median(own):9.3f} {ratio:6.3f} {1e3 * extra:+7.3f}")
            err_out, err_grad, zeros = errors[name]
            print(f"{component:<11} {name:<10} {err_out:8.1e}/{err_grad:8.1e} {zeros:>5}  {cells[0]}  {cells[1]}")


if __name__ == "__main__":
    main()
