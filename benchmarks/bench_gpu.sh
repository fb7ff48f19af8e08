#!/usr/bin/env bash
# GPU readiness check: bf16 training throughput, MFU and the specialized / baseline ratio of
# ViT-S/B/L at the DeiT-III per-GPU batches and training resolutions, compiled and eager, the peak
# memory of one ViT-L step with and without gradient checkpointing, and end-to-end training images/s
# with real JPEG loading (train.py on generated ImageNet-like JPEGs, data.augment_on cpu and device).
#
#   bash benchmarks/bench_gpu.sh                     # on a CUDA machine (H100/H200: peak 989 TFLOP/s)
#   PEAK_TFLOPS=312 bash benchmarks/bench_gpu.sh     # A100 bf16 dense peak
#   SMOKE=1 bash benchmarks/bench_gpu.sh             # CPU, tiny images, 1 repetition: checks the plumbing
#
# Every run is benchmarks/bench_model.py (interleaved repetitions, median of paired ratios); the
# JSON and text of each run land in $OUT, and a summary table is printed at the end.
# End to end: E2E_IMAGES generated 500x375 JPEGs (benchmarks/bench_data.py --write), train.py with the
# ViT-S recipe for E2E_STEPS steps per data.augment_on, DATA_WORKERS DataLoader workers (default: all
# cores but two); images/s and the data-wait fraction are medians of metrics.jsonl's log windows.
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
VARIANTS=${VARIANTS:-baseline,paper_default}
OUT=${OUT:-runs/bench_gpu/$(date +%Y%m%d-%H%M%S)}  # runs/ is git-ignored
SMOKE=${SMOKE:-0}

# name  arch  train resolution  per-GPU batch
MODELS=(
  "vit_s deit3_small_patch16_224 224 256"
  "vit_b deit3_base_patch16_224 192 256"
  "vit_l deit3_large_patch16_224 192 64"
)

E2E_IMAGES=${E2E_IMAGES:-4096}
E2E_STEPS=${E2E_STEPS:-60}
DATA_WORKERS=${DATA_WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}

if [[ "$SMOKE" == 1 ]]; then
  DEVICE_ARGS=(--device cpu --threads 1)
  SIZE_OVERRIDE=64 BATCH_OVERRIDE=2 REPS=1 WARMUP=1
  COMPILE_MODES=${SMOKE_COMPILE_MODES:-none}
  MEMORY_BATCH=2
  E2E_IMAGES=16 E2E_STEPS=2 DATA_WORKERS=1
  E2E_ARGS=(model.img_size=64 train.global_batch=4 train.batch_per_device=4 train.mixed_precision=no log.every=1)
else
  if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench_gpu.sh: no CUDA device (SMOKE=1 runs the plumbing on CPU)" >&2
    exit 1
  fi
  DEVICE_ARGS=(--device cuda)
  SIZE_OVERRIDE="" BATCH_OVERRIDE=""
  MEMORY_BATCH=64
  E2E_ARGS=(train.global_batch=256 train.batch_per_device=256 train.mixed_precision=bf16 log.every=10)
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee /dev/stderr >/dev/null || true
fi
mkdir -p "$OUT"
echo "results in $OUT" >&2

for compile in $COMPILE_MODES; do
  for row in "${MODELS[@]}"; do
    read -r name arch size batch <<<"$row"
    size=${SIZE_OVERRIDE:-$size}
    batch=${BATCH_OVERRIDE:-$batch}
    compile_args=()
    [[ "$compile" != none ]] && compile_args=(--compile "$compile")
    echo "== $name  $arch  ${size}px  batch $batch  compile $compile" >&2
    "$PYTHON" benchmarks/bench_model.py "${DEVICE_ARGS[@]}" "${compile_args[@]}" \
      --arch "$arch" --img-size "$size" --batch "$batch" --reps "$REPS" --warmup "$WARMUP" \
      --variants "$VARIANTS" --peak-tflops "$PEAK_TFLOPS" \
      --json "$OUT/${name}_${compile}.json" | tee "$OUT/${name}_${compile}.txt"
  done
done

# ViT-L memory: one eager step, baseline vs specialized, without and with gradient checkpointing
read -r _ arch size _ <<<"${MODELS[2]}"
echo "== vit_l memory  batch $MEMORY_BATCH" >&2
"$PYTHON" benchmarks/bench_model.py "${DEVICE_ARGS[@]}" --modes memory --arch "$arch" \
  --img-size "${SIZE_OVERRIDE:-$size}" --batch "$MEMORY_BATCH" --variants "$VARIANTS" \
  --json "$OUT/vit_l_memory.json" | tee "$OUT/vit_l_memory.txt"

# End to end with real JPEG loading (ViT-S/16 recipe, 224 px unless SMOKE)
echo "== end to end: $E2E_IMAGES JPEGs, $DATA_WORKERS workers, $E2E_STEPS steps" >&2
"$PYTHON" benchmarks/bench_data.py --write "$OUT/jpegs" --images "$E2E_IMAGES" >&2
for augment_on in cpu device; do
  echo "== end to end  data.augment_on=$augment_on" >&2
  "$PYTHON" train.py --config recipes/deit3/vit_s_800ep.yaml data.source=imagefolder data.path="$OUT/jpegs" \
    data.augment_on=$augment_on data.num_workers="$DATA_WORKERS" train.max_steps="$E2E_STEPS" "${E2E_ARGS[@]}" \
    train.compile=false train.checkpoint_every=1000000 eval.every=1000000 log.progress_bar=false \
    log.tensorboard=false run.root="$OUT/e2e" run.name="$augment_on" > "$OUT/e2e_$augment_on.txt" 2>&1 \
    || { tail -20 "$OUT/e2e_$augment_on.txt" >&2; exit 1; }
done

"$PYTHON" - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
print(f"\n{'run':<16} {'variant':<15} {'train img/s':>11} {'MFU':>6} {'train ratio [q1-q3]':>22} {'infer ratio':>11}")
for path in sorted(out.glob("vit_[slb]_*.json")):
    if path.stem.endswith("memory"):
        continue
    results = json.loads(path.read_text())["results"]
    for variant, entry in results.items():
        train, infer = entry["train"], entry.get("infer", {})
        mfu = f"{100 * train['mfu']:.1f}%" if "mfu" in train else "-"
        print(f"{path.stem:<16} {variant:<15} {train['images_per_s']:11.1f} {mfu:>6} "
              f"{train['ratio_median']:8.3f} [{train['ratio_q1']:.3f}-{train['ratio_q3']:.3f}] "
              f"{infer.get('ratio_median', float('nan')):11.3f}")
memory = json.loads((out / "vit_l_memory.json").read_text())["memory"]
key = "cuda_max_allocated" if "cuda_max_allocated" in memory["baseline"] else "params_plus_peak"
print(f"\nViT-L memory ({key}):")
for variant, entry in memory.items():
    print(f"  {variant:<28} {entry[key] / 2**30:7.2f} GiB  {entry['ratio_to_baseline'][key]:.3f}x baseline  "
          f"{entry['ratio_to_no_ckpt'][key]:.3f}x without checkpointing")
print("\nend to end, real JPEG loading (train.py, ViT-S recipe):")
for augment_on in ("cpu", "device"):
    lines = (out / "e2e" / augment_on / "metrics.jsonl").read_text().splitlines()
    windows = [e for e in map(json.loads, lines) if "train/images_per_s" in e][1:] or \
              [e for e in map(json.loads, lines) if "train/images_per_s" in e]
    print(f"  data.augment_on={augment_on:<7} {statistics.median(e['train/images_per_s'] for e in windows):9.1f} img/s  "
          f"data wait {statistics.median(e['train/data_wait'] for e in windows):.0%}")
EOF
