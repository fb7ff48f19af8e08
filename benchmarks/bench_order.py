"""Training from parquet shards against a folder of the same JPEGs, and the shuffle of the grouped order.

    python benchmarks/bench_order.py --photos DIR              # all measurements
    python benchmarks/bench_order.py --photos DIR --images 600 --reps 3 --skip quality
    python benchmarks/bench_order.py --sorted-shapes OUT       # only write the toy's class-sorted shards

``--photos DIR`` holds real photos (any size, any format PIL opens); matplotlib's ``grace_hopper.jpg``
is always among them. What benchmarks/README.md reports used scikit-image's sample photos as well,
taken from its wheel without installing it::

    pip download scikit-image --no-deps -d /tmp/wheels
    unzip -j /tmp/wheels/scikit_image-*.whl 'skimage/data/astronaut.png' 'skimage/data/chelsea.png' \\
        'skimage/data/coffee.png' 'skimage/data/hubble_deep_field.jpg' 'skimage/data/ihc.png' \\
        'skimage/data/motorcycle_*.png' 'skimage/data/retina.jpg' 'skimage/data/rocket.jpg' -d /tmp/photos

From them it writes ``--images`` distinct JPEGs (random crops of the photos, 500x375 or 375x500,
luminance grain, quality 95: about 110 KB each, ImageNet's mean) in 10 classes, once as an
imagefolder tree and once as hub-shaped parquet (``datasets``' ``Image`` and ``ClassLabel`` features,
row groups of 100 rows, the rows in a shuffled order as on the hub), and measures:

- **one worker's work per image** (one torch thread, CPU time of this process, which includes the
  system time of reading): ``build_image_dataset`` with ``build_train_sampler``'s order, as a
  DataLoader worker runs it (one process, one worker: the worker reads the whole order), for the
  folder (random order) and parquet (grouped order; the random order for contrast), on the
  ``augment_on: cpu`` and ``device`` paths and with ``decode_on: device`` (the worker reads the file
  and collates; the accelerator decodes). Variants are interleaved: each repetition continues every
  variant's order by ``--chunk`` images, in a rotating order; ratios are paired per repetition.
- **bytes read per image**: what the process read through read()/pread() (``/proc/self/io``, rchar)
  per image, against the mean JPEG's size.
- **peak memory of a DataLoader worker** reading the grouped order with the default window
  (``data.window``), its growth over a worker that has read one image, and that growth scaled to
  110 KB per image (ImageNet's mean): the window's memory at ImageNet's bytes.
- **memory-mapped or read**: file-backed resident memory (RssFile) after a pass over all shards,
  pyarrow's ``ParquetFile(memory_map=True)`` against ``False`` (what clsvit uses).
- **shuffle quality** (labels only, ImageNet's shape: 1,281,167 rows of 1000 classes in 294 shards
  of 100-row groups; rank 0 of 8 processes x 10 workers, micro-batch 256): distinct classes and row
  groups per micro-batch, and how far rows move from their stored place (mean |place in the epoch -
  place in storage| as a fraction of the split; a uniform permutation gives 1/3), for the grouped
  order at two windows and for a uniform random permutation, over shards in shuffled row order (as
  on the hub) and class-sorted shards (a naive conversion of a folder tree).

``--sorted-shapes OUT`` writes the embedded dataset (the shapes recipes' data) as parquet with the
training rows sorted by class, for the toy comparison of the two orders in docs/data.md.
"""

from __future__ import annotations

import argparse
import json
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

IMAGENET_KB = 110  # ImageNet-1k's mean training JPEG
CLASSES = 10


# ---------------------------------------------------------------- data

def load_photos(folder: str | None) -> list[Image.Image]:
    import matplotlib.cbook
    paths = [Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))]
    if folder:
        paths += sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != "grace_hopper.jpg")
    return [Image.open(p).convert("RGB") for p in paths]


def photo_jpeg(photos: list[Image.Image], rng: np.random.Generator) -> bytes:
    """A random crop of a random photo at 500x375 (a quarter portrait), luminance grain, quality 95."""
    import io
    photo = photos[rng.integers(len(photos))]
    width, height = photo.size
    scale = rng.uniform(0.5, 1.0)
    crop_w, crop_h = int(width * scale), int(height * scale)
    left, top = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
    size = (500, 375) if rng.random() < 0.75 else (375, 500)
    pixels = np.asarray(photo.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.BICUBIC), np.float32)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    pixels = pixels + rng.normal(0.0, 6.0, pixels.shape[:2])[..., None]  # sensor grain
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_sources(root: Path, photos, count: int) -> float:
    """``folder/train/class_k/*.jpg`` and ``parquet/train-*.parquet`` (+ one-image val splits) of the
    same JPEGs; returns their mean size in bytes."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    rng = np.random.default_rng(0)
    jpegs = [photo_jpeg(photos, rng) for _ in range(count)]
    labels = [i % CLASSES for i in range(count)]
    for split, indices in (("train", range(count)), ("val", range(CLASSES))):
        for i in indices:
            path = root / "folder" / split / f"class_{labels[i]}" / f"{split}_{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpegs[i])
    features = Features(image=ImageFeature(), label=ClassLabel(names=[f"class_{k}" for k in range(CLASSES)]))
    order = rng.permutation(count)  # the hub's rows come shuffled
    (root / "parquet").mkdir()
    for split, rows, shards in (("train", order.tolist(), 2), ("validation", [0], 1)):
        for k, part in enumerate(np.array_split(np.array(rows), shards)):
            Dataset.from_dict({"image": [{"bytes": jpegs[i], "path": f"{i:05d}.jpg"} for i in part],
                               "label": [labels[i] for i in part]}, features=features).to_parquet(
                str(root / "parquet" / f"{split}-{k:05d}-of-{shards:05d}.parquet"), batch_size=100)
    return float(np.mean([len(j) for j in jpegs]))


# ---------------------------------------------------------------- one worker

def rchar() -> int:
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar")))


def variants(root: Path, paths=("cpu", "device", "decode")) -> dict:
    """name -> (dataset, an endless iterator over its order's keys, the epoch's length), for each
    path and source."""
    import clsvit.data as data
    from clsvit.config import load_config
    out = {}
    for path in paths:
        for source, order in (("imagefolder", "auto"), ("parquet", "auto"), ("parquet", "random")):
            if order == "random" and path not in ("cpu", "decode"):
                continue
            folder = root / ("folder" if source == "imagefolder" else "parquet")
            overrides = [f"data.source={source}", f"data.path={folder}", f"data.order={order}", "data.num_workers=1",
                         "model.img_size=224"]
            if path != "cpu":
                overrides += ["data.augment_on=device"]
            if path == "decode":
                overrides += ["data.decode_on=device"]
            cfg = load_config(REPO / "recipes" / "default.yaml", overrides)
            train, _, num_classes = data.load_splits(cfg["data"])
            dataset = data.build_image_dataset(train, cfg, train=True, num_classes=num_classes)
            sampler = data.build_train_sampler(dataset, cfg, num_replicas=1, rank=0, micro_batch=32)

            def keys(sampler=sampler):
                epoch = 0
                while True:
                    sampler.set_epoch(epoch)
                    yield from sampler
                    epoch += 1

            name = f"{path}/{'folder' if source == 'imagefolder' else 'parquet'}"
            out[name + ("/random" if order == "random" else "")] = (dataset, keys(), len(sampler))
    return out


def bytes_read(root: Path, mean_bytes: float) -> dict:
    """Bytes read per image over a whole epoch (the grouped order opens a window of row groups at a
    time, so a part of an epoch would not tell), on the ``decode_on: device`` path (no decoding);
    the random order on parquet over 100 images."""
    out = {}
    for name, (dataset, keys, epoch) in variants(root, paths=("decode",)).items():
        count = 100 if name.endswith("random") else epoch
        read = rchar()
        for _ in range(count):
            dataset[next(keys)]
        out[name.split("/", 1)[1]] = (rchar() - read) / count / mean_bytes
    return out


def time_workers(methods: dict, reps: int, chunk: int) -> dict:
    """Per method and repetition: seconds (CPU) per image, ``chunk`` images each."""
    names = list(methods)
    result = {name: {"s": []} for name in names}
    for name in names:  # warm-up: imports, first reads
        dataset, keys, _ = methods[name]
        dataset.collate([dataset[next(keys)] for _ in range(4)])
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            dataset, keys, _ = methods[name]
            batch = [next(keys) for _ in range(chunk)]
            begin = time.process_time()
            for start in range(0, chunk, 32):
                dataset.collate([dataset[key] for key in batch[start:start + 32]])
            result[name]["s"].append((time.process_time() - begin) / chunk)
        print(f"\rrep {rep + 1}/{reps}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return result


def summarise(times: dict) -> dict:
    out = {}
    for name, r in times.items():
        reference = times[name.replace("parquet/random", "folder").replace("parquet", "folder")]["s"]
        ratios = [a / b for a, b in zip(reference, r["s"])]
        out[name] = {"images_per_s": 1 / statistics.median(r["s"]), "ratio_to_folder": statistics.median(ratios),
                     "ratio_q1_q3": statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else ratios * 2}
    return out


# ---------------------------------------------------------------- memory

def worker_memory(root: Path, images: int) -> dict:
    """Peak RSS of one DataLoader worker reading the grouped order (the default window), and after
    one image."""
    import clsvit.data as data
    from clsvit.config import load_config
    cfg = load_config(REPO / "recipes" / "default.yaml",
                      [f"data.source=parquet", f"data.path={root / 'parquet'}", "data.num_workers=1",
                       "data.prefetch_factor=1", "data.augment_on=device", "data.decode_on=device",
                       "data.persistent_workers=false", "data.pin_memory=false"])
    train, _, num_classes = data.load_splits(cfg["data"])
    dataset = data.build_image_dataset(train, cfg, train=True, num_classes=num_classes)
    sampler = data.build_train_sampler(dataset, cfg, num_replicas=1, rank=0, micro_batch=1)
    loader = data.build_train_loader(dataset, sampler, 1, cfg["data"])

    def status(pid):
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM", "RssFile")}

    iterator = iter(loader)
    next(iterator)
    pid = iterator._workers[0].pid
    first = status(pid)
    for _ in range(min(images, len(sampler)) - 1):
        next(iterator)
    last = status(pid)
    del iterator
    window = cfg["data"]["window"]
    largest = int(dataset.dataset.row_groups().max())
    return {"window": window, "row_group": largest, "after_one_image_mb": first["VmRSS"], "peak_mb": last["VmHWM"],
            "growth_mb": last["VmHWM"] - first["VmRSS"], "file_backed_mb": last["RssFile"],
            "rows_held": window + largest}


def mapped_or_read(root: Path) -> dict:
    """File-backed RSS after reading every row of every shard, mapped and read."""
    import subprocess
    code = """
import sys, pyarrow.parquet as pq
from pathlib import Path
def file_kb():
    return int(next(l.split()[1] for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssFile")))
before, total, handles = file_kb(), 0, []
for path in sorted(Path(sys.argv[1]).glob("train-*.parquet")):
    handles.append(pq.ParquetFile(path, memory_map=sys.argv[2] == "1"))
    for group in range(handles[-1].num_row_groups):
        table = handles[-1].read_row_group(group)
        total += sum(len(row["image"]["bytes"]) for row in table.to_pylist())
print(total / 1e6, (file_kb() - before) / 1e3)
"""
    out = {}
    for mapped in ("1", "0"):
        result = subprocess.run([sys.executable, "-c", code, str(root / "parquet"), mapped], capture_output=True,
                                text=True, check=True)
        read_mb, growth_mb = (float(v) for v in result.stdout.split())
        out["memory_map" if mapped == "1" else "read"] = {"read_mb": read_mb, "file_backed_growth_mb": growth_mb}
    return out


# ---------------------------------------------------------------- shuffle quality

def imagenet_labels(sorted_by_class: bool) -> np.ndarray:
    labels = np.repeat(np.arange(1000), 1282)[:1_281_167]
    return labels if sorted_by_class else np.random.default_rng(0).permutation(labels)


def hub_row_groups(rows: int, shards: int = 294, group: int = 100) -> list[int]:
    sizes = []
    for part in np.array_split(np.arange(rows), shards):
        sizes += [group] * (len(part) // group) + ([len(part) % group] if len(part) % group else [])
    return sizes


def shuffle_quality(windows=(1000, 5000), processes=8, workers=10, batch=256) -> dict:
    from clsvit.data.sampler import TrainSampler
    groups = np.array(hub_row_groups(1_281_167))
    group_of = np.repeat(np.arange(len(groups)), groups)
    out = {}
    for layout in ("shuffled", "class-sorted"):
        labels = imagenet_labels(layout == "class-sorted")
        orders = {f"grouped, window {w}": TrainSampler(len(labels), num_replicas=processes, rank=0, seed=0, repeats=1,
                                                       row_groups=groups, workers=workers, batch_size=batch, window=w)
                  for w in windows}
        orders["uniform random"] = TrainSampler(len(labels), num_replicas=processes, rank=0, seed=0, repeats=1)
        for name, sampler in orders.items():
            rows = np.array([index for index, _ in sampler])
            usable = len(rows) // batch * batch
            batches = rows[:usable].reshape(-1, batch)
            # place in the epoch: this rank's micro-batch k is the epoch's step k, of which the rank holds 1/processes
            place = np.arange(usable) / usable
            out[f"{layout} / {name}"] = {
                "classes_per_batch": float(np.mean([len(np.unique(labels[b])) for b in batches])),
                "groups_per_batch": float(np.mean([len(np.unique(group_of[b])) for b in batches])),
                "displacement": float(np.mean(np.abs(place - rows[:usable] / len(labels))))}
    return out


# ---------------------------------------------------------------- the toy's class-sorted shards

def write_sorted_shapes(out: Path) -> None:
    import shutil

    from datasets import Dataset

    from clsvit.config import load_config
    from clsvit.data.shapes import ROW_GROUP, ensure_shapes_dataset
    cfg = load_config(REPO / "recipes" / "shapes" / "specialized.yaml")
    source = ensure_shapes_dataset(**cfg["data"]["shapes"])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        train = Dataset.from_parquet(str(source / "train-00000-of-00001.parquet"), cache_dir=cache)
        train.sort("label").to_parquet(str(out / "train-00000-of-00001.parquet"), batch_size=ROW_GROUP)
    shutil.copy(source / "validation-00000-of-00001.parquet", out)
    print(f"wrote {out}: the shapes training split sorted by class ({len(train)} rows), its validation split as it is")


# ---------------------------------------------------------------- main

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", help="a folder of extra real photos (grace_hopper.jpg is always used)")
    parser.add_argument("--images", type=int, default=1800, help="JPEGs written (about 110 KB each)")
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=224, help="images per variant per repetition")
    parser.add_argument("--skip", nargs="*", default=[], choices=["workers", "bytes", "memory", "quality"])
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--sorted-shapes", metavar="OUT", help="only write the toy's class-sorted parquet into OUT")
    args = parser.parse_args(argv)
    if args.sorted_shapes:
        write_sorted_shapes(Path(args.sorted_shapes))
        return
    torch.set_num_threads(1)  # as in a DataLoader worker
    report = {"config": vars(args) | {"torch": torch.__version__, "load_average": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="clsvit_bench_order_") as tmp:
        import datasets
        datasets.config.HF_DATASETS_CACHE = Path(tmp) / "hf_cache"
        datasets.disable_progress_bars()
        root = Path(tmp)
        if {"workers", "bytes", "memory"} - set(args.skip):
            mean_bytes = write_sources(root, load_photos(args.photos), args.images)
            report["mean_jpeg_kb"] = mean_bytes / 1000
            print(f"{args.images} JPEGs, {mean_bytes / 1000:.0f} KB on average", file=sys.stderr)
        if "bytes" not in args.skip:
            report["bytes_read"] = bytes_read(root, mean_bytes)
        if "workers" not in args.skip:
            report["workers"] = summarise(time_workers(variants(root), args.reps, args.chunk))
        if "memory" not in args.skip:
            report["worker_memory"] = worker_memory(root, min(args.images, 1500))
            report["mapped_or_read"] = mapped_or_read(root)
    if "quality" not in args.skip:
        report["quality"] = shuffle_quality()
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def print_report(report: dict) -> None:
    config = report["config"]
    print(f"torch {config['torch']}; 1 thread, CPU time; {config['reps']} reps x {config['chunk']} images per variant; "
          f"load average at start {config['load_average'][0]:.2f}")
    if "workers" in report:
        print(f"\none worker, {config['images']} JPEGs of {report['mean_jpeg_kb']:.0f} KB: images/s per core, ratio to "
              f"the folder on the same path [q1-q3]")
        for name, r in report["workers"].items():
            q1, q3 = r["ratio_q1_q3"]
            print(f"  {name:<22} {r['images_per_s']:8.1f} img/s  {r['ratio_to_folder']:5.2f}x [{q1:.2f}-{q3:.2f}]")
    if "bytes_read" in report:
        print("\nbytes read per image over an epoch / the JPEG's bytes: " +
              ", ".join(f"{name} {ratio:.2f}x" for name, ratio in report["bytes_read"].items()))
    if "worker_memory" in report:
        m = report["worker_memory"]
        per_row_kb = m["growth_mb"] * 1024 / m["rows_held"]
        imagenet_mb = m["growth_mb"] * IMAGENET_KB / report["mean_jpeg_kb"]  # the growth scales with the bytes
        print(f"\nworker memory, grouped order, window {m['window']} rows (+ a {m['row_group']}-row group): after one "
              f"image {m['after_one_image_mb']:.0f} MB, peak {m['peak_mb']:.0f} MB (+{m['growth_mb']:.0f} MB, "
              f"{per_row_kb:.0f} KB per row held), file-backed {m['file_backed_mb']:.0f} MB; at ImageNet's "
              f"{IMAGENET_KB} KB: +{imagenet_mb:.0f} MB per worker")
        for name, r in report["mapped_or_read"].items():
            print(f"  {name:<10} pass over {r['read_mb']:.0f} MB of images: file-backed RSS +{r['file_backed_growth_mb']:.0f} MB")
    if "quality" in report:
        print("\nshuffle quality, ImageNet's shape, rank 0 of 8 x 10 workers, micro-batch 256: classes per batch, "
              "row groups per batch, displacement (uniform: 0.33)")
        for name, r in report["quality"].items():
            print(f"  {name:<38} {r['classes_per_batch']:6.1f} {r['groups_per_batch']:6.1f} {r['displacement']:6.3f}")


if __name__ == "__main__":
    main()
