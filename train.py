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
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from safetensors.torch import save_file
from timm.utils import ModelEmaV3
from tqdm import tqdm

from clsvit.checkpoint import (CheckpointError, checkpoint_step, complete_checkpoints, latest_checkpoint,
                               remove_partial_checkpoints, save_checkpoint)
from clsvit.config import ConfigError, diff, error_line, flatten, load_config, save_config
from clsvit.data import (ImageClassDataset, TrainSampler, UndecodableImages, build_eval_loader,
                         build_eval_transform, build_train_loader, build_train_transform, load_splits)
from clsvit.deit3 import build_loss, build_mixup, build_optimizer, build_scheduler, one_hot_targets
from clsvit.evaluation import topk_accuracy
from clsvit.model import COMPONENTS, build_model, count_parameters, load_pretrained
from clsvit.tracking import RunLog, provenance

DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "shapes" / "specialized.yaml"
# Keys that define the optimisation trajectory: a resume with any of them changed is refused.
RESUME_LOCKED = ("model.arch", "model.img_size", "model.num_classes", "model.drop_path", "model.layerscale_init",
                 "model.reg_tokens", "model.specialize", "data.source", "data.path", "data.train_split", "aug", "optim", "schedule",
                 "train.global_batch", "train.loss", "train.bce_threshold", "train.ema", "run.seed")


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, bad batch geometry); reported in one line."""


class Progress:
    """The loop's position, saved in every checkpoint: optimizer steps done, and where in which
    epoch the data stream is (micro-batches consumed), so a resume continues mid-epoch."""

    def __init__(self):
        self.step, self.epoch, self.batches_in_epoch, self.skipped_nonfinite = 0, 0, 0, 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


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
    run_dir = Path(cfg["run"]["root"]) / cfg["run"]["name"]
    ckpt_dir = run_dir / "checkpoints"
    train_cfg, data_cfg = cfg["train"], cfg["data"]

    # ---- accelerator --------------------------------------------------------------------------
    compile_flag = train_cfg["compile"]
    accelerator = Accelerator(
        mixed_precision=train_cfg["mixed_precision"],  # None: `accelerate config` / launch flags decide
        dynamo_backend=None if compile_flag is None else ("inductor" if compile_flag else "no"),
        step_scheduler_with_optimizer=False,
    )
    world = accelerator.num_processes
    per_step = train_cfg["batch_per_device"] * world
    if train_cfg["global_batch"] % per_step:
        raise ConfigError(f"train.global_batch={train_cfg['global_batch']} is not a multiple of "
                          f"train.batch_per_device={train_cfg['batch_per_device']} x {world} processes")
    accum_steps = train_cfg["global_batch"] // per_step  # one recipe runs unchanged on 1, 8 or 64 GPUs
    main_proc = accelerator.is_main_process
    say = tqdm.write if main_proc else (lambda *a, **k: None)
    if train_cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    set_seed(cfg["run"]["seed"])  # same on every process: identical init; data seeds come from the sampler

    # ---- data ---------------------------------------------------------------------------------
    with accelerator.main_process_first():  # the main process generates/caches first, the rest reuse it
        train_hf, val_hf, num_classes = load_splits(data_cfg)
    if cfg["model"]["num_classes"] is None:
        cfg["model"]["num_classes"] = num_classes
    num_classes = cfg["model"]["num_classes"]
    columns = dict(num_classes=num_classes, image_column=data_cfg["image_column"], label_column=data_cfg["label_column"])
    train_set = ImageClassDataset(train_hf, build_train_transform(cfg), **columns)
    val_set = ImageClassDataset(val_hf, build_eval_transform(cfg), **columns)
    undecodable = UndecodableImages(len(train_set), data_cfg["max_bad_fraction"])  # broken files: skipped, counted
    # The train loader is NOT passed to accelerator.prepare: the sampler is already rank-aware
    # (repeated augmentation), and preparing would shard it a second time (accelerate #4075).
    sampler = TrainSampler(len(train_set), num_replicas=world, rank=accelerator.process_index,
                           seed=cfg["run"]["seed"], repeats=cfg["aug"]["repeated_aug"])
    train_loader = build_train_loader(train_set, sampler, train_cfg["batch_per_device"], data_cfg)
    val_loader = accelerator.prepare(build_eval_loader(val_set, cfg["eval"]["batch_per_device"], data_cfg))
    batches_per_epoch = len(sampler) // train_cfg["batch_per_device"]
    steps_per_epoch = batches_per_epoch // accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"train.global_batch={train_cfg['global_batch']} is larger than the "
                          f"{len(train_set)}-image training split")
    total_steps = steps_per_epoch * cfg["schedule"]["epochs"]
    if train_cfg["max_steps"] is not None:
        total_steps = min(total_steps, train_cfg["max_steps"])

    # ---- model --------------------------------------------------------------------------------
    model = build_model(cfg["model"], num_classes)
    if cfg["model"]["pretrained"]:
        not_loaded = load_pretrained(model, cfg["model"]["pretrained"])
        say(f"initialised from {cfg['model']['pretrained']} (not loaded: {not_loaded or 'none'})")
    if cfg["model"]["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    num_params = count_parameters(model)
    unspecialized = {**cfg["model"]["specialize"], **dict.fromkeys(COMPONENTS, 0.0), "final_norm": False}
    baseline_cfg = {**cfg["model"], "specialize": unspecialized}
    with torch.device("meta"):
        baseline_params = count_parameters(build_model(baseline_cfg, num_classes))

    # ---- optimizer, schedule, loss ------------------------------------------------------------
    optimizer = build_optimizer(model, cfg["optim"])
    scheduler = build_scheduler(optimizer, cfg["schedule"], steps_per_epoch)
    mixup = build_mixup(cfg["aug"], num_classes)
    criterion = build_loss(train_cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=train_cfg["ema_decay"]) if train_cfg["ema"] else None
    progress = Progress()
    accelerator.register_for_checkpointing(scheduler, progress, undecodable)
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
                          param_overhead_pct=100.0 * (num_params - baseline_params) / baseline_params,
                          accum_steps=accum_steps, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                          dynamo_backend=str(accelerator.state.dynamo_plugin.backend))
    log = RunLog(run_dir, enabled=main_proc, tensorboard=cfg["log"]["tensorboard"],
                 resume_step=progress.step if resume_from is not None else None)
    if main_proc:
        (run_dir / "provenance.json").write_text(json.dumps(run_info, indent=2) + "\n")
        say(f"run {run_dir}: {num_params:,} params ({run_info['param_overhead_pct']:+.2f}% vs baseline), "
            f"{world} process(es) x {train_cfg['batch_per_device']} x {accum_steps} accumulation = "
            f"{train_cfg['global_batch']} images/step, {total_steps} steps, "
            f"precision {accelerator.mixed_precision}, compile {run_info['dynamo_backend']}")

    stop_signal = []  # pre-emption: SIGTERM / SIGUSR1 (SLURM's warning) -> checkpoint and exit cleanly

    def on_signal(signum, frame):
        if stop_signal:  # a second signal: stop now (a launcher tearing the job down after a failure)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        stop_signal.append(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)

    def micro_batches():
        """The training stream: (images, labels, problems) batches forever, epoch after epoch,
        resuming mid-epoch. `progress` counts a batch as consumed when it is handed out, so a
        checkpoint taken after an optimizer step records exactly where the next step starts. The
        last batches of an epoch that do not fill an optimizer step are dropped."""
        batches_per_epoch = steps_per_epoch * accum_steps
        while True:
            if progress.batches_in_epoch >= batches_per_epoch:
                progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
            sampler.set_epoch(progress.epoch)
            sampler.set_start(progress.batches_in_epoch * train_cfg["batch_per_device"])
            for batch in train_loader:
                progress.batches_in_epoch += 1
                yield batch
                if progress.batches_in_epoch >= batches_per_epoch:
                    break

    def checkpoint() -> None:
        path = save_checkpoint(accelerator, ckpt_dir, progress.step, train_cfg["keep_checkpoints"])
        if main_proc:
            save_config(cfg, path / "config.yaml")

    # ---- step loop ----------------------------------------------------------------------------
    model.train()
    batches = micro_batches()
    bar = tqdm(total=total_steps, initial=progress.step, disable=not (main_proc and cfg["log"]["progress_bar"]),
               dynamic_ncols=True, desc="train")
    loss_sum = torch.zeros((), device=accelerator.device)
    window_start, window_steps, data_wait, last_log_step = time.perf_counter(), 0, 0.0, progress.step
    problems = []  # undecodable-image reports of this process since the last log step
    while progress.step < total_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(accum_steps):
            wait_start = time.perf_counter()
            images, labels, batch_problems = next(batches)
            data_wait += time.perf_counter() - wait_start
            problems += [problem for problem in batch_problems if problem]
            images = images.to(accelerator.device, non_blocking=True)
            labels = labels.to(accelerator.device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, labels)
            else:
                targets = one_hot_targets(labels, num_classes, cfg["aug"]["label_smoothing"])
            # DDP: all-reduce gradients only on the last micro-batch of the optimizer step
            with accelerator.no_sync(model) if micro < accum_steps - 1 else nullcontext():
                with accelerator.autocast():
                    loss = criterion(model(images), targets)
                accelerator.backward(loss / accum_steps)
            step_loss += loss.detach() / accum_steps

        if train_cfg["skip_nonfinite"] and not torch.isfinite(step_loss).item():  # a host sync, only when asked
            progress.skipped_nonfinite += 1
            if progress.skipped_nonfinite > train_cfg["skip_nonfinite"]:
                raise TrainingError(f"non-finite loss at step {progress.step + 1}: more than "
                                    f"train.skip_nonfinite={train_cfg['skip_nonfinite']} such steps")
            say(f"warning: non-finite loss at step {progress.step + 1}, update skipped "
                f"({progress.skipped_nonfinite}/{train_cfg['skip_nonfinite']})")
            optimizer.zero_grad(set_to_none=True)
            continue
        loss_sum += step_loss

        log_now = (progress.step + 1) % cfg["log"]["every"] == 0 or progress.step + 1 == total_steps
        grad_norm = None
        if cfg["optim"]["grad_clip"] is not None:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg["optim"]["grad_clip"])
        elif log_now:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        scheduler.step_update(num_updates=progress.step)
        if ema is not None:
            ema.update(accelerator.unwrap_model(model), step=progress.step)
        bar.update(1)
        window_steps += 1

        if log_now:  # the only host-device sync of a normal step: one all-reduce, read once
            local = torch.stack([loss_sum, torch.tensor(float(bool(stop_signal)), device=accelerator.device),
                                 torch.tensor(float(len(problems)), device=accelerator.device)])
            loss_total, stop_votes, num_problems = accelerator.reduce(local, reduction="sum").tolist()
            mean_loss = loss_total / world / window_steps
            if not math.isfinite(mean_loss):
                raise TrainingError(f"non-finite loss between steps {last_log_step + 1} and {progress.step}; "
                                    f"the last checkpoint before step {last_log_step + 1} is intact")
            if num_problems:  # every process takes part: they all see the same total
                new = undecodable.add(gather_object(problems))  # (on one process: `problems` itself)
                problems.clear()
                if new:
                    say(f"warning: {len(new)} undecodable image(s) in steps {last_log_step + 1}-{progress.step}, "
                        f"replaced by the next sample ({len(undecodable.names)} so far): " + "; ".join(new[:3])
                        + (" ..." if len(new) > 3 else ""))
                undecodable.check()
            elapsed = time.perf_counter() - window_start
            metrics = {
                "train/loss": mean_loss,
                "train/lr": optimizer.param_groups[0]["lr"],
                "train/grad_norm": float(grad_norm),
                "train/images_per_s": window_steps * train_cfg["global_batch"] / elapsed,
                "train/data_wait": data_wait / elapsed,
                "train/epoch": progress.epoch + progress.batches_in_epoch / (steps_per_epoch * accum_steps),
                "data/undecodable": len(undecodable.names),
            }
            log.log(progress.step, metrics)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{metrics['train/lr']:.2e}")
            loss_sum.zero_()
            window_start, window_steps, data_wait, last_log_step = time.perf_counter(), 0, 0.0, progress.step
            if stop_votes > 0:
                checkpoint()
                say(f"pre-empted (signal received): checkpoint saved at step {progress.step}; relaunch to resume")
                log.close()
                accelerator.end_training()
                return

        if progress.step % cfg["eval"]["every"] == 0 and progress.step < total_steps:
            report(progress.step, evaluate(model, val_loader, accelerator, cfg["eval"]["max_batches"]), log, say)
            model.train()
        if progress.step % train_cfg["checkpoint_every"] == 0 and progress.step < total_steps:
            checkpoint()
    bar.close()

    # ---- final checkpoint, eval and export ----------------------------------------------------
    if resume_from is None or checkpoint_step(resume_from) != progress.step:
        checkpoint()
    final = evaluate(model, val_loader, accelerator, cfg["eval"]["max_batches"])
    if ema is not None:
        final.update({f"val_ema/{k.split('/')[1]}": v for k, v in
                      evaluate(ema.module, val_loader, accelerator, cfg["eval"]["max_batches"]).items()})
    report(progress.step, final, log, say)
    if main_proc:
        export(accelerator.unwrap_model(model, keep_torch_compile=False), run_dir / "model.safetensors")
        if ema is not None:
            export(ema.module, run_dir / "model_ema.safetensors")
        log.hparams(flatten(cfg), {**final, "params": float(num_params)})
    log.close()
    accelerator.end_training()


def evaluate(model, loader, accelerator, max_batches) -> dict[str, float]:
    return {f"val/{key}": float(value) for key, value in topk_accuracy(model, loader, accelerator, max_batches).items()}


def report(step: int, metrics: dict, log: RunLog, say) -> None:
    log.log(step, metrics)
    counts = ("images", "undecodable")
    bad = int(metrics["val/undecodable"])
    say(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.split("/")[1] not in counts)
        + f" ({int(metrics['val/images'])} images" + (f", {bad} undecodable replaced)" if bad else ")"))


def export(model: torch.nn.Module, path: Path) -> None:
    """The final weights as float32 safetensors, written to a temp name and renamed (never half-written)."""
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, TrainingError, CheckpointError, OSError, ValueError) as error:
        if os.environ.get("CLSVIT_TRACEBACK"):
            raise
        print(error_line("train.py", error), file=sys.stderr)
        sys.exit(2)
