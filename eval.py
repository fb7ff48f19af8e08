"""Evaluate a trained run, or any public checkpoint, the way the paper does; compare runs side by side.

    python eval.py --run runs/shapes_specialized [--tasks cls,seg,depth,analysis] [section.key=value ...]
    python eval.py --run RUN --tasks seg --recipe recipes/eval/ade20k_linear.yaml eval.seg.path=/data/ADEChallengeData2016
    python eval.py --weights SOURCE --arch NAME --out DIR [--config RECIPE] [--recipe ...] [section.key=value ...]
    accelerate launch eval.py --run <run dir> ...          (several processes; same numbers)
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 eval.py --run ...   (CPU processes)
    python eval.py --compare 'runs/shapes_*' [--baseline runs/shapes_baseline] [--out DIR]

--weights takes what `model.pretrained` takes (a checkpoint file of timm, official DeiT-III or
DINOv2 layout, a run or export directory, hf-hub:ORG/NAME, a timm pretrained tag), converted by
timm, on the model of --config (default recipes/default.yaml) with model.arch = --arch; overrides
`model.specialize.*=...` retrofit it (the copies are cloned). The model keeps the checkpoint's class
count unless model.num_classes is set. DIR receives config.yaml (run.name: DIR's name), eval.json and
TensorBoard, like a run, so --compare takes it too.

Tasks (recipe keys under `eval:` in recipes/default.yaml; --recipe files, then overrides, apply over the
run's config.yaml or --config):
  cls       top-1 / top-5 (%) on the validation split with the DeiT-III eval transform
  seg       linear segmentation on frozen patch tokens, DINOv2/DINOv3 protocol -> mIoU (%)   (clsvit.dense)
  depth     linear depth on frozen patch tokens -> RMSE (m), abs-rel, sq-rel, RMSE-log, log10, delta<1.25^k
  analysis  [CLS]/patch cosine similarities and dimension separation per block, PCA maps (clsvit.analysis)

Writes `<run or DIR>/eval.json` (flat, stable keys: cls.top1, cls.top5, seg.miou, seg.pixels, depth.rmse,
depth.abs_rel, depth.delta1, depth.pixels, ...; under dinov3_linear also seg.miou_best, seg.best_step,
seg.evaluated_steps, seg.evaluated_miou: DINOv3's best of its periodic evaluations; <task>.protocol
and <task>.settings (the resolved protocol settings), analysis.<statistic>.<site> = one value per
block; results of earlier calls for other tasks are kept), TensorBoard events in the run directory (clsvit.tracking.write_eval_events:
scalars cls/top1, seg/miou, depth/rmse, ... at the run's last step, analysis/<statistic>/<site> with
the block index as the step, figures), `<run>/analysis_token_statistics.png` and
`<run>/analysis_pca.png`, and a summary on stdout.
`--compare` writes compare.md, compare.csv and compare.png (default: next to the runs; clsvit.compare).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.data import Subset

from clsvit import analysis, cli, dense
from clsvit.checkpoint import eval_snapshot, same_snapshot_on_every_process
from clsvit.compare import compare
from clsvit.config import CHOICE_LISTS, DEFAULT_RECIPE, load_config, save_config
from clsvit.data import build_eval_loader, build_eval_transform, load_splits_on_every_process
from clsvit.data.agreement import on_every_process
from clsvit.dense.engine import DEPTH_METRICS
from clsvit.errors import InputError
from clsvit.evaluation import topk_accuracy
from clsvit.data.images import ImageClassDataset
from clsvit.model import build_model, describe_specialization, normalisation_note, weights_path
from clsvit.tracking import write_eval_events

TASKS = CHOICE_LISTS["eval.tasks"]  # cls, seg, depth, analysis


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--run", help="run directory (config.yaml + model.safetensors)")
    mode.add_argument("--weights", metavar="SOURCE", help="a checkpoint to evaluate without a run (needs --arch, --out)")
    mode.add_argument("--compare", nargs="+", metavar="RUN", help="run directories or globs to tabulate")
    parser.add_argument("--arch", help="--weights: the timm architecture name (model.arch)")
    parser.add_argument("--config", default=str(DEFAULT_RECIPE), help="--weights: the recipe (default: %(default)s)")
    parser.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASKS)} (default: eval.tasks)")
    parser.add_argument("--recipe", action="append", default=[], metavar="YAML",
                        help="--run, --weights: an evaluation recipe (recipes/eval/*.yaml) applied over the run's "
                             "config or --config, before the overrides; may be repeated")
    parser.add_argument("--baseline", help="--compare: the run the deltas refer to (default: the unspecialized run)")
    parser.add_argument("--out", help="--weights: the results directory; --compare: directory for "
                                      "compare.md/.csv/.png (default: the runs' parent)")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value (YAML values)")
    args = parser.parse_args(argv)
    if args.weights and not (args.arch and args.out):
        parser.error("--weights needs --arch and --out")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare, baseline=args.baseline, out=args.out)
    if args.run:
        run_dir = Path(args.run)
        snapshot = eval_snapshot(run_dir)  # a run that is training: its newest complete checkpoint, copied out
        weights = weights_path(snapshot.directory)  # a missing model.safetensors is a one-line error before anything loads
        cfg = load_config(snapshot.directory / "config.yaml", args.overrides, overlays=args.recipe)
        return evaluate(cfg, weights, run_dir, args.tasks, snapshot=snapshot)
    cfg = load_config(args.config, [*args.overrides, f"model.arch={args.arch}"], overlays=args.recipe)
    cfg["model"]["pretrained"], cfg["run"]["name"] = args.weights, Path(args.out).name
    return evaluate(cfg, args.weights, Path(args.out), args.tasks, write_config=True)


# ============================================================================ one model


def evaluate(cfg: dict, weights, out_dir: Path, tasks_arg: str | None, snapshot=None, write_config: bool = False) -> dict:
    """The tasks on the model of `cfg["model"]` with `weights`; results into `out_dir` (a run's
    `snapshot`: into its eval_step_<N>/ while it trains; a checkpoint without a run: with its config)."""
    tasks = parse_tasks(tasks_arg or cfg["eval"]["tasks"])
    accelerator = Accelerator(mixed_precision=cfg["train"]["mixed_precision"])
    if snapshot is not None:
        same_snapshot_on_every_process(snapshot, accelerator)
        if accelerator.is_main_process:
            print(f"evaluating {snapshot.description}")
    say = print if accelerator.is_main_process else None
    model = build_model(cfg["model"], pretrained=weights, report=say).to(accelerator.device).eval()
    if say and write_config and (note := normalisation_note(cfg)):  # --weights: another input normalisation
        say(note)
    if cfg["model"]["num_classes"] is None:  # --weights: the checkpoint's class count
        cfg["model"]["num_classes"] = model.num_classes
    if "cls" in tasks and not model.num_classes:
        raise InputError(f"cls: {weights} has no classifier (model.num_classes is 0); "
                         f"choose other --tasks or set model.num_classes")
    if write_config and accelerator.is_main_process:
        save_config(cfg, out_dir / "config.yaml")
    seed = cfg["run"]["seed"]

    results, figures, images = {}, {}, {}
    if "cls" in tasks:
        results.update(classification(model, cfg, accelerator))
    for task in ("seg", "depth"):
        if task in tasks:
            results.update(_dense_probe(model, cfg, task, seed, accelerator))
    if "analysis" in tasks:
        stats, pca = token_analysis(model, cfg, accelerator)
        results.update({f"analysis.{name}.{site}": values for name, per_site in stats.items()
                        for site, values in per_site.items()})
        if accelerator.is_main_process:
            figures["analysis/token_statistics"] = analysis.plot_token_statistics(stats, title=cfg["run"]["name"])
            if pca is not None:
                images["analysis/pca"] = pca

    if accelerator.is_main_process:  # a live run's results go to <run>/eval_step_<N>/, not to the training's files
        target = out_dir if snapshot is None else snapshot.output_dir(out_dir)
        write_results(target, results, figures, images, None if snapshot is None else snapshot.step)
        print_summary(target, cfg, results, tasks)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group: exiting without it can abort (gloo threads)
    return results


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise InputError(f"unknown task {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(TASKS)}")
    return tasks


# ---------------------------------------------------------------------------- cls


def _classification_val_set(cfg: dict, accelerator):
    data_cfg = cfg["data"]
    _, val_hf, found_classes, _ = load_splits_on_every_process(data_cfg, accelerator)  # the same on every process
    return ImageClassDataset(val_hf, build_eval_transform(cfg),
                             num_classes=cfg["model"]["num_classes"] or found_classes,
                             image_column=data_cfg["image_column"], label_column=data_cfg["label_column"],
                             max_pixels=data_cfg["max_image_pixels"])


def classification(model, cfg: dict, accelerator) -> dict:
    """Top-1/top-5 (%) over the validation split (exact under several processes)."""
    loader = build_eval_loader(_classification_val_set(cfg, accelerator), cfg["eval"]["batch_per_device"], cfg["data"],
                               num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    accuracy = topk_accuracy(model, loader, accelerator, cfg["eval"]["max_batches"])
    undecodable = accuracy.pop("undecodable")
    if undecodable and accelerator.is_main_process:
        print(f"warning: {undecodable} validation images could not be decoded and were replaced by the next one",
              file=sys.stderr)
    return {f"cls.{key}": value for key, value in accuracy.items()}


# ---------------------------------------------------------------------------- seg / depth


def _dense_probe(model, cfg: dict, task: str, seed: int, accelerator) -> dict:
    """Train and measure the linear head of eval.<task> on its protocol; eval.json keys <task>.*."""
    section = dict(cfg["eval"][task])
    if task == "seg" and section["source"] == "shapes":  # shapes masks: 0 = background, k + 1 = class k
        section["num_classes"] = cfg["data"]["shapes"]["num_classes"] + 1
    settings = dense.resolve(section, task, mean=cfg["data"]["mean"], std=cfg["data"]["std"])
    target = section["mask_column"] if task == "seg" else section["depth_column"]

    def load(listings):  # the main process first; the same rows on every process, else one line
        splits = dense.load_dense_splits(section, cfg["data"], f"eval.{task}", target, listings)
        return splits, dict(zip(("train", "val"), splits)), None

    (train, val), _ = on_every_process(accelerator, load,
                                       f"eval.{task}.source={section['source']} eval.{task}.path={section['path']!r}")
    options = dict(image_column=section["image_column"], target_column=target, name=f"eval.{task}")
    if task == "seg":
        options.update(num_classes=settings.num_classes, reduce_zero_label=section["reduce_zero_label"])
    else:
        options.update(depth_scale=section["depth_scale"], max_depth=settings.max_depth)
    result = dense.run_probe(model, dense.DenseDataset(train, task, **options), dense.DenseDataset(val, task, **options),
                             settings, seed=seed)
    metrics = {"miou": 100.0 * result["miou"]} if task == "seg" else {k: result[k] for k in DEPTH_METRICS}
    if "best" in result:  # DINOv3's segmentation reports the best of its periodic evaluations
        metrics.update(miou_best=100.0 * result["best"]["miou"], best_step=result["best"]["step"],
                       evaluated_steps=[e["step"] for e in result["evaluations"]],
                       evaluated_miou=[100.0 * e["miou"] for e in result["evaluations"]])
    return {**{f"{task}.{key}": value for key, value in metrics.items()}, f"{task}.pixels": result["pixels"],
            f"{task}.images": result["images"], f"{task}.protocol": settings.protocol,
            f"{task}.settings": settings.as_dict()}


# ---------------------------------------------------------------------------- analysis


def token_analysis(model, cfg: dict, accelerator):
    """Token statistics over the first eval.analysis.num_images validation images (sharded over
    processes, sums reduced), and the PCA grid of the first pca_images (main process)."""
    section = cfg["eval"]["analysis"]
    val_set = _classification_val_set(cfg, accelerator)
    count = min(section["num_images"], len(val_set))
    shard = Subset(val_set, range(accelerator.process_index, count, accelerator.num_processes))
    loader = build_eval_loader(shard, cfg["eval"]["batch_per_device"], cfg["data"])
    stats = analysis.analyze_tokens(model, (images for images, _, _ in loader))
    pca = None
    if accelerator.is_main_process and section["pca_images"] > 0:
        shown = torch.stack([val_set[i][0] for i in range(min(section["pca_images"], len(val_set)))])
        pca = analysis.pca_grid(shown, analysis.pca_maps(model, shown.to(accelerator.device)))
    return stats, pca


# ---------------------------------------------------------------------------- outputs


def write_results(run_dir: Path, results: dict, figures: dict, images: dict, step: int | None = None) -> None:
    """eval.json (merged with earlier results), PNG files named after their tags, TensorBoard (at
    `step`: the evaluated checkpoint's for a live run, else the run's last training step)."""
    path = run_dir / "eval.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(results)
    tmp = path.with_name(".eval.json.tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, path)
    for tag, figure in figures.items():
        figure.savefig(run_dir / f"{tag.replace('/', '_')}.png", dpi=110)
    for tag, image in images.items():
        Image.fromarray(image).save(run_dir / f"{tag.replace('/', '_')}.png")
    write_eval_events(run_dir, results, figures, images, step)  # closes the figures


def print_summary(run_dir: Path, cfg: dict, results: dict, tasks: list[str]) -> None:
    print(f"eval {run_dir}  ({cfg['run']['name']}, {describe_specialization(cfg['model']['specialize'])})")
    if "cls" in tasks:
        print(f"  cls       top-1 {results['cls.top1']:6.2f} %   top-5 {results['cls.top5']:6.2f} %"
              f"   ({results['cls.images']} images)")
    if "seg" in tasks:
        print(f"  seg       mIoU  {results['seg.miou']:6.2f} %   ({results['seg.protocol']}, "
              f"{results['seg.images']} images, {results['seg.pixels']} labelled pixels at their own size)")
    if "depth" in tasks:
        print(f"  depth     RMSE  {results['depth.rmse']:6.3f} m   abs-rel {results['depth.abs_rel']:.3f}"
              f"   sq-rel {results['depth.sq_rel']:.3f}   RMSE-log {results['depth.rmse_log']:.3f}"
              f"   log10 {results['depth.log10']:.3f}")
        print(f"            delta<1.25 {results['depth.delta1']:.3f} / {results['depth.delta2']:.3f} /"
              f" {results['depth.delta3']:.3f}   ({results['depth.protocol']}, {results['depth.images']} images,"
              f" {results['depth.pixels']} pixels)")
    if "analysis" in tasks:
        depth = len(results["analysis.cos_cls_patch.input"])
        every = math.ceil(depth / 12)  # keep a line short for deep models
        print(f"  analysis  by block{f' (every {every}th)' if every > 1 else ''}, block input -> after norm1:")
        for name in ("cos_cls_patch", "cos_patch_patch", "cls_dominant_dims"):
            for site in ("input", "norm1"):
                values = " ".join(f"{v:+.2f}" for v in results[f"analysis.{name}.{site}"][::every])
                print(f"    {name:<18} {site:<6} {values}")
        print(f"  figures   {run_dir / 'analysis_token_statistics.png'}, {run_dir / 'analysis_pca.png'}")
    print(f"  written   {run_dir / 'eval.json'}")


if __name__ == "__main__":
    cli.run("eval.py", main)
