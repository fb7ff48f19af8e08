"""Train a baseline or [CLS]/patch-specialized ViT with the DeiT-III recipe.

    accelerate launch train.py --config recipes/deit3/vit_s_800ep_specialized.yaml [section.key=value ...]
    python train.py                          # the embedded shapes dataset, on CPU, in minutes

Reads top to bottom: config -> accelerator -> data -> model -> optimizer/schedule -> resume ->
step loop -> final eval and export. Relaunching the same command resumes from the newest complete
checkpoint in the run directory.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from timm.utils import ModelEmaV3
from tqdm import tqdm

from clsvit import cli
from clsvit.checkpoint import (checkpoint_step, complete_checkpoints, latest_checkpoint,
                               remove_partial_checkpoints, save_checkpoint, save_weights)
from clsvit.config import ConfigError, diff, flatten, load_config, save_config
from clsvit.data import (build_eval_loader, build_image_dataset, build_train_loader, build_train_sampler,
                         load_splits_on_every_process)
from clsvit.deit3 import build_loss, build_mixup, build_optimizer, build_scheduler, one_hot_targets
from clsvit.evaluation import format_metrics, validation_metrics
from clsvit.data.images import UndecodableImages
from clsvit.model import (baseline_model_config, build_model, check_pretrained, count_parameters,
                          normalisation_note, param_overhead_pct)
from clsvit.runlock import hold_run_directory
from clsvit.tracking import RunLog, accelerate_trackers, hparams_first_keys, parse_trackers, provenance
from clsvit.training import (LogWindow, MicroBatchStream, PreemptionSignals, Progress, ProgressDisplay, TrainingError,
                             gradient_norm, is_due, nonfinite_on_any_process, split_global_batch,
                             use_deterministic_algorithms)

DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "shapes" / "specialized.yaml"
# Keys that define the optimisation trajectory: a resume with any of them changed is refused.
RESUME_LOCKED = ("model.arch", "model.img_size", "model.num_classes", "model.drop_path", "model.layerscale_init",
                 "model.reg_tokens", "model.specialize", "data.source", "data.path", "data.train_split", "aug", "optim", "schedule",
                 "train.global_batch", "train.loss", "train.bce_threshold", "train.ema", "run.seed")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_RECIPE), help="recipe YAML (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, section.key=value (YAML values)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()

    # ---- config -------------------------------------------------------------------------------
    cfg = load_config(args.config, args.overrides)
    with torch.device("meta"):  # a model the recipe cannot build fails here, in one line, before any data work
        build_model(cfg["model"], cfg["model"]["num_classes"] or 1)
    hparams_first_keys(cfg)  # so does a log.hparams_first that names no recipe key
    check_pretrained(cfg["model"])  # so does a pretrained source that does not exist
    run_dir = Path(cfg["run"]["root"]) / cfg["run"]["name"]
    ckpt_dir = run_dir / "checkpoints"
    train_cfg, data_cfg = cfg["train"], cfg["data"]

    # ---- accelerator --------------------------------------------------------------------------
    if train_cfg["deterministic"]:  # before CUDA starts: sets CUBLAS_WORKSPACE_CONFIG
        use_deterministic_algorithms()
    compile_flag = train_cfg["compile"]
    accelerator = Accelerator(
        mixed_precision=train_cfg["mixed_precision"],  # None: `accelerate config` / launch flags decide
        dynamo_backend=None if compile_flag is None else ("inductor" if compile_flag else "no"),
        step_scheduler_with_optimizer=False,
        log_with=accelerate_trackers(cfg["log"]["trackers"]) or None,  # tensorboard: RunLog writes it itself
        project_dir=str(run_dir),
    )
    world = accelerator.num_processes
    mixing = cfg["aug"]["mixup"] > 0 or cfg["aug"]["cutmix"] > 0
    # one recipe runs unchanged on 1, 8 or 64 GPUs: micro-batch and accumulation are derived
    batch = split_global_batch(train_cfg["global_batch"], train_cfg["batch_per_device"], world, even=mixing)
    hold_run_directory(run_dir, accelerator)  # one launch per run directory: a second one stops here, untouched
    main_proc = accelerator.is_main_process
    say = tqdm.write if main_proc else (lambda *a, **k: None)
    set_seed(cfg["run"]["seed"])  # same on every process: identical init; data seeds come from the sampler

    # ---- data ---------------------------------------------------------------------------------
    # the main process loads (scans, caches) first and hands its listing over; every process checks
    # that all of them hold the same rows, else the launch stops here in one line
    train_hf, val_hf, num_classes, data_identity = load_splits_on_every_process(data_cfg, accelerator)
    say(f"data: {data_identity.describe()}")
    if cfg["model"]["num_classes"] is None:
        cfg["model"]["num_classes"] = num_classes
    num_classes = cfg["model"]["num_classes"]
    columns = dict(num_classes=num_classes, image_column=data_cfg["image_column"], label_column=data_cfg["label_column"])
    train_set = build_image_dataset(train_hf, cfg, train=True, **columns)  # data.augment_on: cpu | device
    val_set = build_image_dataset(val_hf, cfg, train=False, **columns)
    to_model_input = train_set.batch_transform(accelerator.device)  # loader batch -> model input on the device
    to_val_input = val_set.batch_transform(accelerator.device)
    undecodable = UndecodableImages(len(train_set), data_cfg["max_bad_fraction"])  # broken files: skipped, counted
    # Neither loader is passed to accelerator.prepare: both samplers are already rank-aware (data.order,
    # repeated augmentation; every validation row once), and preparing would shard again (accelerate #4075).
    sampler = build_train_sampler(train_set, cfg, num_replicas=world, rank=accelerator.process_index,
                                  micro_batch=batch.micro_batch)
    train_loader = build_train_loader(train_set, sampler, batch.micro_batch, data_cfg)
    val_loader = build_eval_loader(val_set, cfg["eval"]["batch_per_device"], data_cfg, num_replicas=world,
                                   rank=accelerator.process_index)
    steps_per_epoch = sampler.steps_per_epoch(batch.micro_batch, batch.accumulation)  # an error when none
    epoch_samples = steps_per_epoch * batch.accumulation * batch.micro_batch  # per process; the rest is dropped
    if sampler.note():
        say(sampler.note())
    total_steps = steps_per_epoch * cfg["schedule"]["epochs"]
    if train_cfg["max_steps"] is not None:
        total_steps = min(total_steps, train_cfg["max_steps"])

    # ---- model --------------------------------------------------------------------------------
    model = build_model(cfg["model"], num_classes, pretrained=cfg["model"]["pretrained"], report=say)
    if note := normalisation_note(cfg):
        say(note)  # weights trained on inputs normalised otherwise than data.mean / data.std
    if cfg["model"]["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    num_params = count_parameters(model)
    with torch.device("meta"):
        baseline_params = count_parameters(build_model(baseline_model_config(cfg["model"]), num_classes))
    overhead_pct = param_overhead_pct(num_params, baseline_params)

    # ---- optimizer, schedule, loss ------------------------------------------------------------
    optimizer = build_optimizer(model, cfg["optim"])
    scheduler = build_scheduler(optimizer, cfg["schedule"], steps_per_epoch)
    mixup = build_mixup(cfg["aug"], num_classes)
    criterion = build_loss(train_cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The bare ViT, unwrapped once. keep_torch_compile=False: accelerate's default (True) rebinds the
    # compiled wrapper's _orig_mod to the bare model in place, which drops DDP, and with it no_sync.
    bare_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    ema = ModelEmaV3(bare_model, decay=train_cfg["ema_decay"]) if train_cfg["ema"] else None
    progress = Progress()
    accelerator.register_for_checkpointing(scheduler, progress, undecodable, sampler)  # sampler: its layout
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # ---- resume -------------------------------------------------------------------------------
    set_seed(cfg["run"]["seed"] + accelerator.process_index)  # per-process mixup/drop-path draws; a resume restores them
    if main_proc:
        remove_partial_checkpoints(ckpt_dir)
    accelerator.wait_for_everyone()
    resume_from = latest_checkpoint(ckpt_dir) if train_cfg["resume"] else None
    if resume_from is not None:
        changed = diff(load_config(resume_from / "config.yaml"), cfg, RESUME_LOCKED)
        if changed:
            raise ConfigError(f"{resume_from} was trained with different {', '.join(changed)}; "
                              f"restore them or start fresh with train.resume=false (or a new run.name)")
        accelerator.load_state(str(resume_from))
        scheduler.step_update(num_updates=progress.step)
        say(f"resumed from {resume_from} (step {progress.step}, epoch {progress.epoch})")
    elif main_proc and complete_checkpoints(ckpt_dir):  # train.resume=false: keep them, out of the way
        moved = ckpt_dir.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        ckpt_dir.rename(moved)
        say(f"train.resume=false: the earlier checkpoints were moved to {moved}")
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    run_info = provenance(accelerator, params=num_params, params_baseline=baseline_params,
                          param_overhead_pct=overhead_pct,
                          micro_batch=batch.micro_batch, accum_steps=batch.accumulation,
                          steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                          dynamo_backend=str(accelerator.state.dynamo_plugin.backend), data=data_identity.as_dict())
    log = RunLog(run_dir, enabled=main_proc, tensorboard="tensorboard" in parse_trackers(cfg["log"]["trackers"]),
                 resume_step=progress.step if resume_from is not None else None,
                 accelerator=accelerator, config=flatten(cfg))
    log.start_session(cfg, depth=len(bare_model.blocks), params=num_params,
                      param_overhead_pct=overhead_pct)
    if main_proc:
        (run_dir / "provenance.json").write_text(json.dumps(run_info, indent=2) + "\n")
        say(f"run {run_dir}: {num_params:,} params ({overhead_pct:+.2f}% vs baseline), "
            f"{batch.describe()}, {total_steps} steps, "
            f"precision {accelerator.mixed_precision}, compile {run_info['dynamo_backend']}")

    def checkpoint() -> None:
        save_checkpoint(accelerator, ckpt_dir, progress.step, train_cfg["keep_checkpoints"], config=cfg)

    # ---- step loop ----------------------------------------------------------------------------
    preemption = PreemptionSignals()  # SIGTERM / SIGUSR1: checkpoint at the next log step, exit cleanly
    def to_device(loader_batch):
        """A loader batch -> the model's input and the labels on the device (data.augment_on: device
        decodes and augments it here)."""
        images, labels, problems = loader_batch
        return to_model_input(images), labels.to(accelerator.device, non_blocking=True), problems

    # data.augment_on: device prepares the next micro-batch on a background thread (CUDA: its own
    # stream) while the step runs on the current one
    batches = MicroBatchStream(train_loader, sampler, progress, batch.micro_batch, epoch_samples, prepare=to_device,
                               ahead=data_cfg["augment_on"] == "device", device=accelerator.device)
    window = LogWindow(accelerator)
    display = ProgressDisplay(total_steps, progress.step, enabled=main_proc and cfg["log"]["progress_bar"])
    model.train()
    while progress.step < total_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(batch.accumulation):
            images, labels = window.next_batch(batches)
            if mixup is not None:
                images, targets = mixup(images, labels)
            else:
                targets = one_hot_targets(labels, num_classes, cfg["aug"]["label_smoothing"])
            # DDP: all-reduce gradients only on the last micro-batch of the optimizer step
            with accelerator.no_sync(model) if micro < batch.accumulation - 1 else nullcontext():
                with accelerator.autocast():
                    loss = criterion(model(images), targets)
                accelerator.backward(loss / batch.accumulation)
            step_loss += loss.detach() / batch.accumulation

        if train_cfg["skip_nonfinite"] and nonfinite_on_any_process(step_loss, accelerator):  # only when asked
            progress.skipped_nonfinite += 1
            if progress.skipped_nonfinite > train_cfg["skip_nonfinite"]:
                raise TrainingError(f"non-finite loss at step {progress.step + 1}: more than "
                                    f"train.skip_nonfinite={train_cfg['skip_nonfinite']} such steps")
            say(f"warning: non-finite loss at step {progress.step + 1}, update skipped on every process "
                f"({progress.skipped_nonfinite}/{train_cfg['skip_nonfinite']})")
            optimizer.zero_grad(set_to_none=True)
            continue
        window.add_step(step_loss)

        log_now = is_due(progress.step + 1, cfg["log"]["every"], total_steps, at_last=True)
        grad_norm = None
        if cfg["optim"]["grad_clip"] is not None or log_now:
            grad_norm = gradient_norm(accelerator, model, cfg["optim"]["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        scheduler.step_update(num_updates=progress.step)
        if ema is not None:
            ema.update(bare_model, step=progress.step)
        display.step()

        if log_now:  # the only host-device sync of a normal step: one all-reduce
            summary = window.reduce(preemption.requested)
            if not math.isfinite(summary["mean_loss"]):
                first = progress.step - window.steps + 1
                raise TrainingError(f"non-finite loss between steps {first} and {progress.step}; "
                                    f"the last checkpoint before step {first} is intact")
            if summary["problems"]:  # every process takes part: they all see the same total
                new = undecodable.add(gather_object(window.problems))
                window.problems.clear()
                if new:
                    say(f"warning: {len(new)} undecodable image(s) in steps {progress.step - window.steps + 1}-"
                        f"{progress.step}, replaced by the next sample ({len(undecodable.names)} so far): "
                        + "; ".join(map(str, new[:3])) + (" ..." if len(new) > 3 else ""))
                undecodable.check()
            images_per_s = window.steps * train_cfg["global_batch"] / summary["elapsed"]
            log.log(progress.step, {
                "train/loss": summary["mean_loss"],
                "train/lr": optimizer.param_groups[0]["lr"],
                "train/grad_norm": float(grad_norm),
                "train/images_per_s": images_per_s,
                "train/data_wait": summary["data_wait"],
                "train/epoch": progress.epoch + progress.samples_in_epoch / epoch_samples,
                "data/undecodable": len(undecodable.names),
            })
            display.log_step(progress.step, summary["mean_loss"], optimizer.param_groups[0]["lr"], images_per_s)
            window.reset()
            if summary["stop"]:
                checkpoint()
                say(f"pre-empted (signal received): checkpoint saved at step {progress.step}; relaunch to resume")
                log.close()
                accelerator.end_training()
                return

        if is_due(progress.step, cfg["eval"]["every"], total_steps, at_last=False):
            report(progress.step, validation_metrics(model, val_loader, accelerator, cfg["eval"]["max_batches"],
                                                     to_input=to_val_input), log, say)
            model.train()
        if is_due(progress.step, train_cfg["checkpoint_every"], total_steps, at_last=False):
            checkpoint()
    display.close()

    # ---- final checkpoint, eval and export ----------------------------------------------------
    if resume_from is None or checkpoint_step(resume_from) != progress.step:
        checkpoint()
    final = validation_metrics(model, val_loader, accelerator, cfg["eval"]["max_batches"], to_input=to_val_input)
    if ema is not None:
        final.update(validation_metrics(ema.module, val_loader, accelerator, cfg["eval"]["max_batches"],
                                        prefix="val_ema", to_input=to_val_input))
    report(progress.step, final, log, say)
    if main_proc:
        save_weights(bare_model, run_dir / "model.safetensors")
        if ema is not None:
            save_weights(ema.module, run_dir / "model_ema.safetensors")
    log.end_session(progress.step)
    log.close()
    accelerator.end_training()


def report(step: int, metrics: dict, log: RunLog, say) -> None:
    log.log(step, metrics)
    say(f"step {step}: {format_metrics(metrics)}")


if __name__ == "__main__":
    cli.run("train.py", main)
