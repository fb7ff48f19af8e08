"""What the dense probes' design choices cost on the offline shapes demo, side by side in one run.

Times, on the shapes demo's model shape (recipes/shapes/baseline.yaml: ViT dim 128, depth 4, patch 4 at
32 px; random weights, the cost does not depend on them) and synthetic 32 px images:

- one head training step (forward + backward + AdamW) on a batch of 16 cached feature maps (ratios
  to the first of each group):
  `seg`             DINOv2's segmentation head (BatchNorm + 1x1 conv, logits resized to 32 px),
  `depth_dinov2_ref` DINOv2's depth head in the reference order: tokens ([CLS] concatenated) upsampled
                    x4, then the 1x1 conv to 256 bins,
  `depth_dinov2`    the same head as clsvit computes it: conv, then the upsampling (the same depths),
  `depth_dinov3`    DINOv3's depth head (BatchNorm + conv at token resolution, depth resized);
- evaluating `--images` validation images (backbone, head, metric): `eval_per_image` one image per
  backbone forward vs `eval_batched` `eval_batch_size` 128 (consecutive same-size images stacked).

Variants are interleaved (each repetition times every variant once, in a rotating order); ratios are
medians over repetitions of the per-repetition ratio to the first variant of the group, which stays
meaningful on a shared machine. On a CPU shared with other jobs, use --threads 1: with more intra-op
threads than free cores every small op waits for a descheduled thread, and the times count ops, not work.

    python benchmarks/bench_dense.py                    # 20 head steps, 256 images, 5 repetitions
    python benchmarks/bench_dense.py --threads 1 --reps 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

from clsvit.config import load_config  # noqa: E402
from clsvit.dense import engine, resolve  # noqa: E402
from clsvit.dense.heads import LinearDepthHead, LinearSegHead, depth_bin_centres, segmentation_loss, sig_loss  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def settings(task: str, **overrides):
    section = dict(load_config(ROOT / "recipes" / "shapes" / "baseline.yaml")["eval"][task])
    if task == "seg":
        section["num_classes"] = 11  # the shapes masks: background + 10 classes
    section.update(overrides)
    return resolve(section, task)


class ReferenceOrderDepthHead(LinearDepthHead):
    """DINOv2's order: upsample the tokens, then the conv (dinov2/hub/depthers.py)."""

    def scores(self, features):
        return self.conv(self.bn(self._up(features)))


def head_step_variants(batch: int):
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 11, (batch, 32, 32), generator=g)
    depth = torch.rand(batch, 32, 32, generator=g) * 3 + 1
    centres = depth_bin_centres(256, 1e-3, 10.0, "linear")
    d2, d3 = settings("depth", protocol="dinov2_linear"), settings("depth", protocol="dinov3_linear")
    cases = {
        "seg": (LinearSegHead(128, 11, settings("seg")), torch.randn(batch, 128, 8, 8), mask, segmentation_loss),
        "depth_dinov2_ref": (ReferenceOrderDepthHead(256, centres, d2), torch.randn(batch, 256, 8, 8), depth, None),
        "depth_dinov2": (LinearDepthHead(256, centres, d2), torch.randn(batch, 256, 8, 8), depth, None),
        "depth_dinov3": (LinearDepthHead(128, centres, d3), torch.randn(batch, 128, 8, 8), depth, None),
    }
    steps = {"seg head step": {}, "depth head step": {}}
    for name, (head, features, target, loss_fn) in cases.items():
        optimizer = torch.optim.AdamW(head.train().parameters(), lr=1e-3)

        def step(head=head, features=features, target=target, loss_fn=loss_fn, optimizer=optimizer):
            out = head(features, target.shape[-2:])
            loss = loss_fn(out, target) if loss_fn else sig_loss(out.squeeze(1), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        steps["seg head step" if name == "seg" else "depth head step"][name] = step
    return steps


def eval_variants(images: int):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=128, depth=4,
                              num_heads=4, num_classes=10)
    backbone = engine.frozen_backbone(model)
    rng = np.random.default_rng(0)
    items = [{"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
              "mask": rng.integers(0, 11, (32, 32)).astype(np.int64), "name": f"row {i}"} for i in range(images)]
    out = {}
    for name, budget in (("eval_per_image", 1), ("eval_batched", 128)):
        s = settings("seg", eval_batch_size=budget)
        head = engine.build_head(backbone, s, seed=0).eval()
        out[name] = lambda s=s, head=head: engine.evaluate_segmentation(backbone, head, items, s)
    return out


def timed(groups: dict, reps: int, repeat: dict) -> dict:
    """{group: {variant: [seconds per repetition]}}, variants interleaved in a rotating order."""
    times = {group: {name: [] for name in variants} for group, variants in groups.items()}
    for rep in range(reps + 1):  # repetition 0 warms up
        for group, variants in groups.items():
            names = list(variants)
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                start = time.perf_counter()
                for _ in range(repeat[group]):
                    variants[name]()
                if rep:
                    times[group][name].append((time.perf_counter() - start) / repeat[group])
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="head steps timed per repetition")
    parser.add_argument("--images", type=int, default=256, help="validation images per evaluation")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each variant")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    groups = {**head_step_variants(16), "evaluation": eval_variants(args.images)}
    times = timed(groups, args.reps, {"seg head step": args.steps, "depth head step": args.steps, "evaluation": 1})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.reps} repetitions")
    for group, variants in times.items():
        first = next(iter(variants))
        unit, scale = ("ms/step", 1e3) if group.endswith("step") else (f"s/{args.images} images", 1.0)
        print(f"\n{group:<18} {unit:>16} {'ratio':>8}  (to {first}, median of paired ratios)")
        for name, values in variants.items():
            ratio = statistics.median(v / f for v, f in zip(values, variants[first]))
            print(f"  {name:<16} {statistics.median(values) * scale:16.2f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
