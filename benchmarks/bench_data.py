"""Data pipeline throughput per worker: clsvit's HF-datasets path vs torchvision's ImageFolder, and
PIL vs torchvision JPEG decoding, on the same JPEGs with the same DeiT-III 3-Augment transform.

Writes `--images` JPEGs (default 500, 500x375 like an average ImageNet photo, quality 90) of
procedural natural-looking content (multi-octave smooth noise, soft shapes, grain) into a
temporary imagefolder (train/<class>/, val/<class>/; nothing is downloaded), then times one
DataLoader worker's work — fetch + decode + transform of one sample, in this process, with one
torch thread — for:

- `hf_clsvit`     clsvit.data: load_splits(source imagefolder) + ImageClassDataset (undecoded HF
                  rows, PIL decode, `to_rgb`, per-sample seeded transform) — what train.py runs.
- `tv_imagefolder` torchvision.datasets.ImageFolder with the same timm transform (PIL loader).
- `hf_tv_decode`  the clsvit path with `decode_image` swapped for torchvision.io.decode_jpeg
                  (file bytes -> uint8 tensor -> PIL image), the rest unchanged.

and the decode step alone: `decode_pil` (Image.open + convert RGB), `decode_tv` (decode_jpeg to a
tensor), `decode_tv_pil` (decode_jpeg, then to a PIL image, which timm's PIL transforms need).

Methods are interleaved: each repetition runs every method on the same `--chunk` images in a
rotating order; the ratio is the median over repetitions of method/hf_clsvit (paired). CPU time of
the process is reported next to wall time. Transform: recipes/default.yaml (3-Augment, colour jitter
0.3, RandomResizedCrop 0.08-1 bicubic, flip) at `--img-size`.

    python benchmarks/bench_data.py                  # 500 images, 224 px, 8 repetitions of 64
    python benchmarks/bench_data.py --images 200 --reps 4 --json data.json

Workers per GPU: a GPU training at R images/s needs ceil(R / images_per_s_per_worker) workers,
plus headroom (the table printed at the end uses the measured hf_clsvit rate and the training
rates of `GPU_TRAIN_IMAGES_PER_S`, see there for their source).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Training images/s of one GPU for DeiT-III at its training resolution, bf16: estimated as
# MFU x peak / (3 x forward FLOPs) with MFU 0.40 (to be replaced by benchmarks/bench_gpu.sh's
# measured MFU). Forward FLOPs = 2 x MACs; MACs at 224 from facebookresearch/deit
# README_revenge.md (ViT-S 4.6G, ViT-B 17.5G, ViT-L 61.6G), scaled to the DeiT-III training
# resolution (S 224, B and L 192: 145 instead of 197 tokens, x0.72 for B, x0.72 for L).
# Peaks: A100 bf16 dense 312 TFLOP/s, H100/H200 SXM 989 TFLOP/s.
ASSUMED_MFU = 0.40
FORWARD_GFLOPS = {"ViT-S/16 @224": 2 * 4.6, "ViT-B/16 @192": 2 * 17.5 * 0.72, "ViT-L/16 @192": 2 * 61.6 * 0.72}
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0}
GPU_TRAIN_IMAGES_PER_S = {
    (model, gpu): ASSUMED_MFU * peak * 1e12 / (3 * gflops * 1e9)
    for model, gflops in FORWARD_GFLOPS.items() for gpu, peak in PEAK_TFLOPS.items()}


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int, channels: int) -> np.ndarray:
    """Zero-mean unit-variance noise with about `cells` features across the width (bicubic upsampling)."""
    small = rng.normal(0.0, 1.0, (max(2, height * cells // width), cells, channels)).astype(np.float32)
    layers = [np.asarray(Image.fromarray(small[..., c]).resize((width, height), Image.BICUBIC))
              for c in range(channels)]
    field = np.stack(layers, axis=-1)
    return (field - field.mean()) / (field.std() + 1e-6)


def natural_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Photo-like statistics: luminance detail at every scale (1/f-like octaves), smooth colour,
    soft-edged objects and sensor grain. JPEG-compresses like a photo (~90 KiB at 500x375,
    quality 90; ImageNet train averages ~110 KiB) rather than like white noise or flat colour."""
    luminance = sum(weight * _smooth_noise(rng, width, height, cells, 1)
                    for cells, weight in ((3, 1.0), (10, 0.7), (30, 0.6), (90, 0.7), (250, 0.9)))
    chroma = _smooth_noise(rng, width, height, 4, 3)
    canvas = 120 + 40 * luminance + 25 * chroma + rng.uniform(-30, 30, 3)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(3, 8)):  # soft-edged ellipses: object boundaries
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(20, height / 2), rng.uniform(20, width / 2)
        mask = np.clip(4 * (1 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2), 0, 1)[..., None]
        canvas = canvas * (1 - mask) + mask * (rng.uniform(30, 220, 3) + 30 * luminance)
    canvas += rng.normal(0.0, 4.0, canvas.shape)  # sensor grain
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def write_imagefolder(root: Path, num_images: int, num_classes: int, seed: int = 0) -> int:
    """train/<class>/*.jpg with num_images images, val/<class>/ with one per class; returns bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for split, count in (("train", num_images), ("val", num_classes)):
        for i in range(count):
            folder = root / split / f"class_{i % num_classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            width, height = (500, 375) if rng.random() < 0.7 else (375, 500)
            path = folder / f"{split}_{i:05d}.jpg"
            natural_image(rng, width, height).save(path, quality=90)
            total += path.stat().st_size if split == "train" else 0
    return total


def decode_pil(path: str) -> Image.Image:
    image = Image.open(path)
    return image.convert("RGB")  # convert() loads (decodes) the pixels


def decode_tv(path: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)


def decode_tv_pil(path: str) -> Image.Image:
    return Image.fromarray(decode_tv(path).permute(1, 2, 0).numpy())


def tv_decode_image(value) -> Image.Image:
    """A drop-in for clsvit.data.decode_image that decodes JPEG bytes with torchvision."""
    from torchvision.io import ImageReadMode, read_file
    from torchvision.io import decode_image as tv_decode
    if isinstance(value, Image.Image):
        return value
    data = (torch.frombuffer(bytearray(value["bytes"]), dtype=torch.uint8) if value.get("bytes") is not None
            else read_file(value["path"]))
    return Image.fromarray(tv_decode(data, mode=ImageReadMode.RGB).permute(1, 2, 0).numpy())


def build_methods(root: Path, img_size: int):
    from torchvision.datasets import ImageFolder

    import clsvit.data as data
    from clsvit.config import load_config

    cfg = load_config(REPO / "recipes" / "default.yaml",
                      ["data.source=imagefolder", f"data.path={root}", f"model.img_size={img_size}"])
    train, _, num_classes = data.load_splits(cfg["data"])
    transform = data.build_train_transform(cfg)
    hf = data.ImageClassDataset(train, transform, num_classes=num_classes)
    tv = ImageFolder(str(root / "train"), transform=transform)
    assert len(hf) == len(tv)
    paths = [path for path, _ in tv.samples]
    original_decode = data.decode_image

    def hf_tv_decode(i, seed):
        data.decode_image = tv_decode_image
        try:
            return hf[(i, seed)][0]
        finally:
            data.decode_image = original_decode

    def tv_imagefolder(i, seed):
        with data.seeded_rngs(seed):  # same augmentation draws as the seeded clsvit path
            return tv[i][0]

    pipelines = {
        "hf_clsvit": lambda i, seed: hf[(i, seed)][0],
        "tv_imagefolder": tv_imagefolder,
        "hf_tv_decode": hf_tv_decode,
    }
    decoders = {
        "decode_pil": lambda i, seed: decode_pil(paths[i]),
        "decode_tv": lambda i, seed: decode_tv(paths[i]),
        "decode_tv_pil": lambda i, seed: decode_tv_pil(paths[i]),
    }
    return pipelines, decoders, len(hf), transform


def check_same_pixels(pipelines: dict, decoders: dict, count: int = 8) -> dict:
    """The three pipelines give the same tensor for the same (index, seed) when decoders agree;
    libjpeg-turbo in PIL and in torchvision may round the IDCT differently: report the difference."""
    out = {}
    for i in range(count):
        reference = pipelines["hf_clsvit"](i, 1000 + i)
        for name in ("tv_imagefolder", "hf_tv_decode"):
            diff = (pipelines[name](i, 1000 + i) - reference).abs().max().item()
            out[name] = max(out.get(name, 0.0), diff)
        pixels = np.asarray(decoders["decode_pil"](i, 0), dtype=np.int16)
        tv_pixels = decoders["decode_tv"](i, 0).permute(1, 2, 0).numpy().astype(np.int16)
        out["decode_tv_vs_pil_max_abs_u8"] = max(out.get("decode_tv_vs_pil_max_abs_u8", 0),
                                                 int(np.abs(pixels - tv_pixels).max()))
    return out


def time_methods(methods: dict, size: int, reps: int, chunk: int, reference: str) -> dict:
    names = list(methods)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for name in names:  # warm-up: imports, file cache, first-call costs
        for i in range(min(8, size)):
            methods[name](i, i)
    for rep in range(reps):
        start_index = (rep * chunk) % max(1, size - chunk)
        indices = range(start_index, start_index + min(chunk, size))
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            t0, c0 = time.perf_counter(), time.process_time()
            for i in indices:
                methods[name](i, 7919 * rep + i)
            wall[name].append(len(indices) / (time.perf_counter() - t0))
            cpu[name].append(len(indices) / (time.process_time() - c0))
        print(f"\rrep {rep + 1}/{reps}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    results = {}
    for name in names:
        ratios = [a / b for a, b in zip(wall[name], wall[reference])]
        cpu_ratios = [a / b for a, b in zip(cpu[name], cpu[reference])]
        results[name] = {"images_per_s": statistics.median(wall[name]),
                         "images_per_s_cpu": statistics.median(cpu[name]),
                         "speed_ratio": statistics.median(ratios), "speed_ratio_cpu": statistics.median(cpu_ratios),
                         "speed_ratio_q1_q3": statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else ratios * 2}
    return results


def workers_table(per_worker: float) -> list[dict]:
    rows = []
    for (model, gpu), rate in GPU_TRAIN_IMAGES_PER_S.items():
        rows.append({"model": model, "gpu": gpu, "gpu_train_images_per_s": rate,
                     "workers": math.ceil(rate / per_worker),
                     "workers_with_25pct_headroom": math.ceil(1.25 * rate / per_worker)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=64, help="images per method per repetition")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker

    with tempfile.TemporaryDirectory(prefix="clsvit_bench_data_") as tmp:
        os.environ["HF_DATASETS_CACHE"] = str(Path(tmp) / "hf_cache")  # no Arrow cache left behind
        import datasets
        datasets.config.HF_DATASETS_CACHE = Path(tmp) / "hf_cache"
        datasets.disable_progress_bars()
        root = Path(tmp) / "imagefolder"
        t0 = time.perf_counter()
        total_bytes = write_imagefolder(root, args.images, args.classes)
        print(f"wrote {args.images} JPEGs ({total_bytes / args.images / 1024:.0f} KiB each on average) "
              f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        pipelines, decoders, size, transform = build_methods(root, args.img_size)
        agreement = check_same_pixels(pipelines, decoders)
        pipeline_results = time_methods(pipelines, size, args.reps, args.chunk, "hf_clsvit")
        decode_results = time_methods(decoders, size, args.reps, args.chunk, "decode_pil")

    import PIL
    import torchvision
    report = {"config": vars(args) | {"torch": torch.__version__, "torchvision": torchvision.__version__,
                                      "pillow": PIL.__version__, "mean_jpeg_kib": total_bytes / args.images / 1024,
                                      "transform": repr(transform)},
              "agreement": agreement, "pipelines": pipeline_results, "decode": decode_results,
              "workers_per_gpu": workers_table(pipeline_results["hf_clsvit"]["images_per_s_cpu"])}
    print(f"{args.images} JPEGs ~{report['config']['mean_jpeg_kib']:.0f} KiB, transform at {args.img_size} px "
          f"(3-Augment), 1 thread, reps {args.reps} x {args.chunk} images; torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}")
    for title, results in (("per-worker pipeline", pipeline_results), ("decode only", decode_results)):
        print(f"\n{title:<16} {'img/s':>8} {'img/s (cpu)':>12} {'speed vs first [q1-q3]':>24} {'cpu ratio':>10}")
        for name, r in results.items():
            q1, q3 = r["speed_ratio_q1_q3"]
            print(f"{name:<16} {r['images_per_s']:8.1f} {r['images_per_s_cpu']:12.1f} "
                  f"{r['speed_ratio']:9.3f} [{q1:.3f}-{q3:.3f}] {r['speed_ratio_cpu']:10.3f}")
    print(f"\nmax |difference| of the output tensors vs hf_clsvit (same index + seed): "
          f"tv_imagefolder {agreement['tv_imagefolder']:.2e}, hf_tv_decode {agreement['hf_tv_decode']:.2e}; "
          f"decoded pixels torchvision vs PIL: max {agreement['decode_tv_vs_pil_max_abs_u8']} / 255")
    print(f"\nworkers per GPU at {report['pipelines']['hf_clsvit']['images_per_s_cpu']:.0f} img/s per worker "
          f"(hf_clsvit, CPU time; GPU rates: {ASSUMED_MFU:.0%} MFU estimates, see GPU_TRAIN_IMAGES_PER_S)")
    for row in report["workers_per_gpu"]:
        print(f"  {row['model']:<14} {row['gpu']:<5} {row['gpu_train_images_per_s']:7.0f} img/s  "
              f"-> {row['workers']:3d} workers ({row['workers_with_25pct_headroom']} with 25 % headroom)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
