#!/usr/bin/env bash
# GPU readiness check: bf16 training throughput, MFU and the specialized / baseline ratio of
# ViT-S/B/L at the DeiT-III per-GPU batches and training resolutions, compiled and eager, the peak
# memory of one ViT-L step with and without gradient checkpointing, and end-to-end training images/s
# with real JPEG loading (train.py on generated ImageNet-like JPEGs): data.augment_on cpu, device,
# data.decode_on device, and compiled under DDP with 2 processes.
#
#   bash benchmarks/bench_gpu.sh                     # on a CUDA machine (H100/H200: peak 989 TFLOP/s)
#   PEAK_TFLOPS=312 bash benchmarks/bench_gpu.sh     # A100 bf16 dense peak
#   DRY_RUN=1 bash benchmarks/bench_gpu.sh           # CPU: every stage, a tiny ViT, a few steps
#
# Every stage runs under benchmarks/sync_debug.py: torch.cuda.set_sync_debug_mode("warn"), each
# warning (an operation that makes the host wait for the GPU) counted with its call site; the
# `sync` column is the count, $OUT/sync_*.json the sites. A training step should add none: the log
# steps, the evaluation and the checkpoints synchronise on purpose (one each).
# Model stages are benchmarks/bench_model.py (interleaved repetitions, median of paired ratios);
# the JSON and text of each run land in $OUT, and a summary table is printed at the end.
# End to end: E2E_IMAGES generated 500x375 JPEGs (benchmarks/bench_data.py --write), train.py with the
# ViT-S recipe for E2E_STEPS steps, DATA_WORKERS DataLoader workers (default: all cores but two);
# images/s and the data-wait fraction are medians of metrics.jsonl's log windows. The DDP stage
# (needs 2 GPUs; gloo on CPU in the dry run) launches 2 processes with --dynamo_backend
# $DYNAMO_BACKEND and counts DDP's gradient all-reduces per optimizer step and bucket (1 is right).
# DeiT-III (facebookresearch/deit README_revenge.md): ViT-S 256 images/GPU at 224 px, ViT-B 256 at
# 192 px, ViT-L 64 at 192 px (global batch 2048). MFU counts the FLOPs of forward + backward
# (torch.utils.flop_counter on a meta copy) against PEAK_TFLOPS; the optimizer step is in the time.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}        # H100 / H200 SXM, bf16 dense
REPS=${REPS:-20}
WARMUP=${WARMUP:-5}                    # the first steps of a compiled model compile it
COMPILE_MODES=${COMPILE_MODES:-"full none"}  # full | regional | none
COMPILE_BACKEND=${COMPILE_BACKEND:-inductor}
DYNAMO_BACKEND=${DYNAMO_BACKEND:-inductor}   # the DDP stage's accelerate launch --dynamo_backend
VARIANTS=${VARIANTS:-baseline,paper_default}
OUT=${OUT:-runs/bench_gpu/$(date +%Y%m%d-%H%M%S)}  # runs/ is git-ignored
DRY_RUN=${DRY_RUN:-0}

# name  arch  train resolution  per-GPU batch
MODELS=(
  "vit_s deit3_small_patch16_224 224 256"
  "vit_b deit3_base_patch16_224 192 256"
  "vit_l deit3_large_patch16_224 192 64"
)
MEMORY_MODEL=vit_l

E2E_IMAGES=${E2E_IMAGES:-4096}
E2E_STEPS=${E2E_STEPS:-60}
DATA_WORKERS=${DATA_WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}

if [[ "$DRY_RUN" == 1 ]]; then
  DEVICE_ARGS=(--device cpu --threads 1)
  MODELS=("tiny vit_tiny_patch16_224 32 2")
  MEMORY_MODEL=tiny
  REPS=1 WARMUP=1 COMPILE_BACKEND=eager DYNAMO_BACKEND=eager
  MEMORY_BATCH=2
  E2E_IMAGES=16 E2E_STEPS=3 DATA_WORKERS=1
  E2E_ARGS=(model.img_size=32 "model.timm_kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}"
            train.global_batch=8 train.batch_per_device=2 train.mixed_precision=no log.every=1)
  MIXED_PRECISION=no GPUS=2 LAUNCH_ENV=(ACCELERATE_USE_CPU=1)
else
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench_gpu.sh: no CUDA device (DRY_RUN=1 runs every stage on the CPU)" >&2
    exit 1
  fi
  DEVICE_ARGS=(--device cuda)
  MEMORY_BATCH=64
  E2E_ARGS=(train.global_batch=512 train.batch_per_device=128 train.mixed_precision=bf16 log.every=10)
  MIXED_PRECISION=bf16 LAUNCH_ENV=()
  GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee /dev/stderr >/dev/null || true
fi
mkdir -p "$OUT"
echo "results in $OUT" >&2
SYNC=(benchmarks/sync_debug.py)

for compile in $COMPILE_MODES; do
  for row in "${MODELS[@]}"; do
    read -r name arch size batch <<<"$row"
    compile_args=()
    [[ "$compile" != none ]] && compile_args=(--compile "$compile" --compile-backend "$COMPILE_BACKEND")
    echo "== $name  $arch  ${size}px  batch $batch  compile $compile" >&2
    "$PYTHON" "${SYNC[@]}" "$OUT/sync_${name}_${compile}.json" benchmarks/bench_model.py "${DEVICE_ARGS[@]}" \
      "${compile_args[@]}" --arch "$arch" --img-size "$size" --batch "$batch" --reps "$REPS" --warmup "$WARMUP" \
      --variants "$VARIANTS" --peak-tflops "$PEAK_TFLOPS" \
      --json "$OUT/${name}_${compile}.json" | tee "$OUT/${name}_${compile}.txt"
  done
done

# ViT-L memory: one eager step, baseline vs specialized, without and with gradient checkpointing
for row in "${MODELS[@]}"; do
  read -r name arch size _ <<<"$row"
  [[ "$name" == "$MEMORY_MODEL" ]] || continue
  echo "== $name memory  batch $MEMORY_BATCH" >&2
  "$PYTHON" "${SYNC[@]}" "$OUT/sync_memory.json" benchmarks/bench_model.py "${DEVICE_ARGS[@]}" --modes memory \
    --arch "$arch" --img-size "$size" --batch "$MEMORY_BATCH" --variants "$VARIANTS" \
    --json "$OUT/memory.json" | tee "$OUT/memory.txt"
done

# End to end with real JPEG loading (ViT-S/16 recipe, 224 px unless DRY_RUN)
echo "== end to end: $E2E_IMAGES JPEGs, $DATA_WORKERS workers, $E2E_STEPS steps" >&2
"$PYTHON" benchmarks/bench_data.py --write "$OUT/jpegs" --images "$E2E_IMAGES" >&2
COMMON=(--config recipes/deit3/vit_s_800ep.yaml data.source=imagefolder data.path="$OUT/jpegs"
        data.num_workers="$DATA_WORKERS" train.max_steps="$E2E_STEPS" "${E2E_ARGS[@]}" train.checkpoint_every=1000000
        eval.every=1000000 eval.max_batches=1 log.progress_bar=false "log.trackers=''" run.root="$OUT/e2e")
run_e2e() {  # name, then train.py overrides: one process
  local name=$1
  shift
  echo "== end to end  $name" >&2
  "$PYTHON" "${SYNC[@]}" "$OUT/sync_e2e_$name.json" train.py "${COMMON[@]}" run.name="$name" train.compile=false \
    "$@" > "$OUT/e2e_$name.txt" 2>&1 || { tail -20 "$OUT/e2e_$name.txt" >&2; exit 1; }
}
run_e2e augment_cpu data.augment_on=cpu
run_e2e augment_device data.augment_on=device
run_e2e decode_device data.augment_on=device data.decode_on=device
if (( GPUS >= 2 )); then
  echo "== end to end  ddp2_compiled (--dynamo_backend $DYNAMO_BACKEND)" >&2
  mkdir -p "$OUT/allreduce"
  port=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  env "${LAUNCH_ENV[@]}" CLSVIT_TEST_ALLREDUCE_DIR="$OUT/allreduce" "$PYTHON" -m accelerate.commands.launch --multi_gpu \
    --num_machines 1 --num_processes 2 --mixed_precision "$MIXED_PRECISION" --dynamo_backend "$DYNAMO_BACKEND" \
    --main_process_port "$port" "${SYNC[@]}" "$OUT/sync_e2e_ddp2_compiled.json" tests/fault_injection.py none train.py \
    "${COMMON[@]}" run.name=ddp2_compiled data.augment_on=device > "$OUT/e2e_ddp2_compiled.txt" 2>&1 \
    || { tail -20 "$OUT/e2e_ddp2_compiled.txt" >&2; exit 1; }
else
  echo "== end to end  ddp2_compiled: skipped, $GPUS GPU(s) (DDP needs one per process)" >&2
fi

"$PYTHON" - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])


def sync(name: str) -> str:
    reports = [json.loads(p.read_text()) for p in sorted(out.glob(f"sync_{name}*.json"))]
    if not reports:
        return "-"
    return str(sum(r["warnings"] for r in reports)) if all(r["cuda"] for r in reports) else "no cuda"


print(f"\n{'run':<16} {'variant':<15} {'train img/s':>11} {'MFU':>6} {'train ratio [q1-q3]':>22} {'infer ratio':>11} {'sync':>8}")
for path in sorted(out.glob("*_*.json")):
    if path.stem.startswith(("sync_", "memory")) or "results" not in (report := json.loads(path.read_text())):
        continue
    for variant, entry in report["results"].items():
        train, infer = entry["train"], entry.get("infer", {})
        mfu = f"{100 * train['mfu']:.1f}%" if "mfu" in train else "-"
        print(f"{path.stem:<16} {variant:<15} {train['images_per_s']:11.1f} {mfu:>6} "
              f"{train['ratio_median']:8.3f} [{train['ratio_q1']:.3f}-{train['ratio_q3']:.3f}] "
              f"{infer.get('ratio_median', float('nan')):11.3f} {sync(path.stem):>8}")
memory = json.loads((out / "memory.json").read_text())["memory"]
key = "cuda_max_allocated" if "cuda_max_allocated" in memory["baseline"] else "params_plus_peak"
print(f"\nmemory ({key}; sync {sync('memory')}):")
for variant, entry in memory.items():
    print(f"  {variant:<28} {entry[key] / 2**30:7.2f} GiB  {entry['ratio_to_baseline'][key]:.3f}x baseline  "
          f"{entry['ratio_to_no_ckpt'][key]:.3f}x without checkpointing")
print(f"\nend to end, real JPEG loading (train.py, ViT-S recipe):\n  {'run':<16} {'img/s':>9} {'data wait':>9} "
      f"{'sync':>8} {'all-reduces per step and bucket':>32}")
for name in ("augment_cpu", "augment_device", "decode_device", "ddp2_compiled"):
    metrics = out / "e2e" / name / "metrics.jsonl"
    if not metrics.is_file():
        print(f"  {name:<16} skipped")
        continue
    windows = [e for e in map(json.loads, metrics.read_text().splitlines()) if "train/images_per_s" in e]
    windows = windows[1:] or windows  # the first window holds the start-up (and compilation)
    allreduce = "-"
    if name == "ddp2_compiled":
        per = {}  # (rank, optimizer step, bucket) -> all-reduces
        for rank, path in enumerate(sorted((out / "allreduce").glob("rank*.json"))):
            for step, bucket in json.loads(path.read_text()):
                per[rank, step, bucket] = per.get((rank, step, bucket), 0) + 1
        allreduce = f"min {min(per.values())} max {max(per.values())}" if per else "none counted"
    print(f"  {name:<16} {statistics.median(e['train/images_per_s'] for e in windows):9.1f} "
          f"{statistics.median(e['train/data_wait'] for e in windows):9.0%} {sync('e2e_' + name):>8} {allreduce:>32}")
EOF
