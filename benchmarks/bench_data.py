"""Data pipeline throughput per worker core: the CPU path (``data.augment_on: cpu``) against the
device path (``data.augment_on: device``), measured side by side in one run.

Writes JPEGs (quality 90) of procedural photo-like content into temporary imagefolders (nothing is
downloaded): ``500x375`` like an average ImageNet photo (~105 KB) and ``1000x750``. For each set and
each output size (``--sizes``, default 224 and 192: DeiT-III's ViT-S and ViT-B/L resolutions) it
times, with one torch thread and the CPU time of this process, one DataLoader worker's work per
image — fetch the HF row, decode, transform — for:

- ``cpu``            clsvit.data.images.ImageClassDataset + timm's PIL transform (decode, RandomResizedCrop,
                     flip, 3-Augment, colour jitter 0.3, to-tensor, normalise): ``augment_on: cpu``.
- ``device``         clsvit.data.crops.CropDataset: read, header, the sample's draws, the crop decoded by
                     simplejpeg at the smallest DCT scale 1/2^k keeping it >= the output size: the
                     worker of ``augment_on: device``.
- ``device_pil``     the same with PIL's ``draft()`` for the DCT-scaled decode instead of simplejpeg.
- ``device_full``    the same with every crop decoded at full size (no DCT scaling).
- ``augment_cpu``    the device side run on this CPU: clsvit.data.augment.TrainAugment on batches of
                     ``--batch`` crops (resize, flip, 3-Augment, colour jitter, normalise), per image.

``device + augment_cpu`` is the device path with everything on one CPU core. Methods are
interleaved: each repetition runs every method on the same ``--chunk`` images and seeds in a
rotating order; a ratio is the median over repetitions of ``cpu``'s time / the method's (paired).
The decode step alone is compared too (PIL and simplejpeg, full size and 1/2, 5/8 to show that
libjpeg-turbo's non-power-of-two scales are slower). Worker-side rates leave out DataLoader
overheads common to both paths (inter-process transfer of the batch).

    python benchmarks/bench_data.py                       # 160 images per set, 6 repetitions of 32
    python benchmarks/bench_data.py --images 64 --reps 2 --json data.json
    python benchmarks/bench_data.py --write /tmp/jpegs --images 2048    # only write an imagefolder

Worker cores per GPU: a GPU training at R images/s needs ceil(R / images_per_s_per_core) cores
(``data.num_workers`` per process), printed for the measured rates of the 500x375 set and the
training rates of ``GPU_TRAIN_IMAGES_PER_S``; with ``augment_on: device`` the GPU also does the
augmentation (its cost there is measured by benchmarks/bench_gpu.sh).
"""

from __future__ import annotations

import argparse
import io
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
    soft-edged objects and sensor grain. JPEG-compresses like a photo (~105 KB at 500x375,
    quality 90; ImageNet train averages ~110 KB) rather than like white noise or flat colour."""
    luminance = sum(weight * _smooth_noise(rng, width, height, cells, 1)
                    for cells, weight in ((3, 1.0), (10, 0.7), (30, 0.6), (90, 1.0), (250, 1.25)))
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


def write_imagefolder(root: Path, num_images: int, size: tuple[int, int], seed: int = 0) -> float:
    """train/<class>/*.jpg (two classes) and val/ with one image each; returns the mean file size in KB.
    A quarter of the images is portrait (``size`` transposed), as in ImageNet."""
    rng = np.random.default_rng(seed)
    total = 0
    for split, count in (("train", num_images), ("val", 2)):
        for i in range(count):
            folder = root / split / f"class_{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            width, height = size if rng.random() < 0.75 else size[::-1]
            path = folder / f"{split}_{i:05d}.jpg"
            natural_image(rng, width, height).save(path, quality=90)
            total += path.stat().st_size if split == "train" else 0
    return total / num_images / 1000


def decode_crop_pil(data: bytes, image, box, min_side):
    """clsvit.data.crops.decode_crop with PIL's draft() (1/2, 1/4, 1/8) instead of simplejpeg."""
    import clsvit.data.crops as crops
    from clsvit.data.images import to_rgb
    header = Image.open(io.BytesIO(data)) if image is None else image
    top, left, height, width = (int(v) for v in box)
    scale = crops.dct_scale(height, width, min_side)
    if header.format == "JPEG" and scale > 1:
        header.draft("RGB", (header.size[0] // scale, header.size[1] // scale))
    pixels = np.asarray(to_rgb(header))
    scale = round(header.size[0] / pixels.shape[1]) if header.format == "JPEG" else 1
    rows = crops._scaled_span(top, height, scale, pixels.shape[0])
    cols = crops._scaled_span(left, width, scale, pixels.shape[1])
    crop = np.require(pixels[rows[0]:rows[1], cols[0]:cols[1]], requirements=["C", "W"])
    return crop, (0, 0, crop.shape[0], crop.shape[1])


class Patched:
    """Run a method with a module attribute replaced (restored afterwards)."""

    def __init__(self, module, name, value, method):
        self.module, self.name, self.value, self.method = module, name, value, method

    def __call__(self, *args):
        original = getattr(self.module, self.name)
        setattr(self.module, self.name, self.value)
        try:
            return self.method(*args)
        finally:
            setattr(self.module, self.name, original)


def build_methods(root: Path, img_size: int, batch: int):
    """name -> (prepare(indices, seeds) untimed, run(prepared) timed, images per run)."""
    import clsvit.data.crops as crops
    import clsvit.data as data
    from clsvit.config import load_config

    cfg = load_config(REPO / "recipes" / "default.yaml",
                      ["data.source=imagefolder", f"data.path={root}", f"model.img_size={img_size}"])
    train, _, num_classes = data.load_splits(cfg["data"])
    cpu = data.build_image_dataset(train, cfg, train=True, num_classes=num_classes)
    cfg["data"]["augment_on"] = "device"
    device = data.build_image_dataset(train, cfg, train=True, num_classes=num_classes)

    def per_sample(get):
        return lambda indices, seeds: list(zip(indices, seeds)), lambda pairs: [get(key) for key in pairs]

    def augment_prepare(indices, seeds):
        samples = [device[(i, seed)] for i, seed in zip(indices, seeds)]
        return [device.collate(samples[start:start + batch])[0] for start in range(0, len(samples), batch)]

    augment = device.batch_transform("cpu")
    methods = {
        "cpu": per_sample(cpu.__getitem__),
        "device": per_sample(device.__getitem__),
        "device_pil": per_sample(Patched(crops, "decode_crop", decode_crop_pil, device.__getitem__)),
        "device_full": per_sample(Patched(crops, "dct_scale", lambda *a: 1, device.__getitem__)),
        "augment_cpu": (augment_prepare, lambda batches: [augment(b) for b in batches]),
    }
    paths = [value["path"] for value in device.dataset[:len(device)]["image"]]
    return methods, paths, device


def build_decoders(paths: list[str]):
    import simplejpeg
    files = [Path(p).read_bytes() for p in paths]

    def pil(i, scale):
        image = Image.open(io.BytesIO(files[i]))
        if scale < 1:
            image.draft("RGB", (int(image.size[0] * scale), int(image.size[1] * scale)))
        return np.asarray(image.convert("RGB"))

    def turbo(i, scale):
        width, height = Image.open(io.BytesIO(files[i])).size
        return simplejpeg.decode_jpeg(files[i], min_width=math.ceil(width * scale), min_height=math.ceil(height * scale))

    def method(decode, scale):
        return lambda indices, seeds: indices, lambda indices: [decode(i, scale) for i in indices]

    return {"decode_pil": method(pil, 1.0), "decode_simplejpeg": method(turbo, 1.0),
            "decode_pil_1/2": method(pil, 0.5), "decode_simplejpeg_1/2": method(turbo, 0.5),
            "decode_simplejpeg_5/8": method(turbo, 0.625)}


def time_methods(methods: dict, size: int, reps: int, chunk: int) -> dict:
    """Interleaved repetitions; per method the median images/s (CPU time) and, per repetition, its
    time per image (for paired ratios)."""
    names = list(methods)
    per_image = {name: [] for name in names}
    for name in names:  # warm-up: imports, file cache, first-call costs
        prepare, run = methods[name]
        run(prepare(list(range(min(4, size))), list(range(4))))
    for rep in range(reps):
        start = (rep * chunk) % max(1, size - chunk)
        indices = list(range(start, start + min(chunk, size)))
        seeds = [7919 * rep + i for i in indices]
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            prepare, run = methods[name]
            prepared = prepare(indices, seeds)
            begin = time.process_time()
            run(prepared)
            per_image[name].append((time.process_time() - begin) / len(indices))
        print(f"\rrep {rep + 1}/{reps}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return per_image


def summarise(per_image: dict, reference: str) -> dict:
    out = {}
    for name, times in per_image.items():
        ratios = [r / t for r, t in zip(per_image[reference], times)]
        out[name] = {"images_per_s": 1 / statistics.median(times), "ms_per_image": 1000 * statistics.median(times),
                     "ratio": statistics.median(ratios),
                     "ratio_q1_q3": statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else ratios * 2}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=160, help="images per set")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 192])
    parser.add_argument("--sets", nargs="+", default=["500x375", "1000x750"])
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--chunk", type=int, default=32, help="images per method per repetition")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the device side (augment_cpu)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--write", metavar="DIR", help="only write --images JPEGs of the first set into DIR "
                        "(an imagefolder: train/, val/), e.g. for bench_gpu.sh's end-to-end run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    if args.write:
        width, height = (int(v) for v in args.sets[0].split("x"))
        kb = write_imagefolder(Path(args.write), args.images, (width, height))
        print(f"wrote {args.images} {args.sets[0]} JPEGs ({kb:.0f} KB each on average) into {args.write}")
        return

    import PIL
    import simplejpeg
    import torchvision
    report = {"config": vars(args) | {"torch": torch.__version__, "torchvision": torchvision.__version__,
                                      "pillow": PIL.__version__, "simplejpeg": simplejpeg.__version__,
                                      "load_average": os.getloadavg()},
              "runs": {}}
    with tempfile.TemporaryDirectory(prefix="clsvit_bench_data_") as tmp:
        import datasets
        datasets.config.HF_DATASETS_CACHE = Path(tmp) / "hf_cache"  # no Arrow cache left behind
        datasets.disable_progress_bars()
        for image_set in args.sets:
            width, height = (int(v) for v in image_set.split("x"))
            root = Path(tmp) / image_set
            kb = write_imagefolder(root, args.images, (width, height))
            print(f"{image_set}: {args.images} JPEGs, {kb:.0f} KB each on average", file=sys.stderr)
            for img_size in args.sizes:
                methods, paths, device = build_methods(root, img_size, args.batch)
                per_image = time_methods(methods, len(paths), args.reps, args.chunk)
                per_image["device+augment_cpu"] = [a + b for a, b in zip(per_image["device"], per_image["augment_cpu"])]
                scales = [_decode_scale(device, i, 1000 + i) for i in range(min(64, len(paths)))]
                report["runs"][f"{image_set}@{img_size}"] = {
                    "mean_kb": kb, "pipelines": summarise(per_image, "cpu"),
                    "dct_scale_share": {f"1/{k}": scales.count(k) / len(scales) for k in (1, 2, 4, 8)}}
            decoders = time_methods(build_decoders(paths), len(paths), args.reps, args.chunk)
            report["runs"][f"{image_set}@decode"] = {"mean_kb": kb, "decode": summarise(decoders, "decode_pil")}
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def _decode_scale(device, index: int, seed: int) -> int:
    """The DCT scale the device path decodes sample (index, seed) at."""
    import clsvit.data.augment as augment
    import clsvit.data.crops as crops
    from clsvit.data.images import seeded_rngs
    width, height, _ = crops.open_image(crops.read_bytes(device.dataset[index][device.image_column]))
    with seeded_rngs(seed, numpy=False):
        top, left, height, width = device.transform.draw(width, height)[augment.BOX]
    return crops.dct_scale(height, width, device.transform.decode_min_side)


def workers_table(rates: dict) -> list[dict]:
    """Worker cores per GPU: ViT-S at 224, ViT-B/L at 192 (DeiT-III), per path."""
    rows = []
    for (model, gpu), gpu_rate in GPU_TRAIN_IMAGES_PER_S.items():
        size = 224 if "@224" in model else 192
        if size not in rates:
            continue
        row = {"model": model, "gpu": gpu, "gpu_train_images_per_s": gpu_rate}
        for path, per_core in rates[size].items():
            row[path] = math.ceil(gpu_rate / per_core)
        rows.append(row)
    return rows


def print_report(report: dict) -> None:
    config = report["config"]
    print(f"torch {config['torch']}, torchvision {config['torchvision']}, Pillow {config['pillow']}, simplejpeg "
          f"{config['simplejpeg']}; 1 thread, CPU time; reps {config['reps']} x {config['chunk']} images; "
          f"load average at start {config['load_average'][0]:.2f}")
    rates = {}
    for name, run in report["runs"].items():
        table = run.get("pipelines") or run["decode"]
        print(f"\n{name} (JPEGs ~{run['mean_kb']:.0f} KB)" + (
            "  DCT scales: " + ", ".join(f"{k} {v:.0%}" for k, v in run["dct_scale_share"].items())
            if "dct_scale_share" in run else ""))
        print(f"  {'method':<22} {'img/s/core':>10} {'ms/img':>8} {'ratio [q1-q3]':>22}")
        for method, r in table.items():
            q1, q3 = r["ratio_q1_q3"]
            print(f"  {method:<22} {r['images_per_s']:10.1f} {r['ms_per_image']:8.2f} {r['ratio']:9.2f}x [{q1:.2f}-{q3:.2f}]")
        if name.startswith("500x375@") and "pipelines" in run:
            pipes = run["pipelines"]
            rates[int(name.split("@")[1])] = {"cpu": pipes["cpu"]["images_per_s"], "device": pipes["device"]["images_per_s"],
                                              "device+augment_cpu": pipes["device+augment_cpu"]["images_per_s"]}
    report["workers_per_gpu"] = workers_table(rates)
    print(f"\nworker cores per GPU (500x375 rates; GPU images/s at an assumed {ASSUMED_MFU:.0%} MFU, see "
          f"GPU_TRAIN_IMAGES_PER_S): cpu path | device path (workers only) | device path, augmentation on CPU cores")
    for row in report["workers_per_gpu"]:
        print(f"  {row['model']:<14} {row['gpu']:<5} {row['gpu_train_images_per_s']:7.0f} img/s -> "
              f"{row['cpu']:4d} | {row['device']:4d} | {row['device+augment_cpu']:4d}")


if __name__ == "__main__":
    main()
