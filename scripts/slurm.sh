#!/usr/bin/env bash
# Training under SLURM: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch --nodes=8 scripts/slurm.sh recipes/deit3/vit_b_800ep_specialized.yaml [section.key=value ...]
#   sbatch --array=0-3 scripts/slurm.sh --cells runs/<sweep>/cells.sh       (what `clsvit.sweep --launcher slurm` submits)
#
# Paths are those of the submit directory: the job runs train.py in $SLURM_SUBMIT_DIR (SLURM executes a
# spooled copy of this script, so the repository is found from the submitted script's path, or
# $CLSVIT_REPO). Activate the environment with accelerate before sbatch: sbatch exports it to the job.
#
# Time limit: SLURM sends SIGUSR1 to this script 90 s before the limit (--signal=B:USR1@90). It passes the
# signal on to the training processes (train.py saves a checkpoint at the next log step and exits
# cleanly), then requeues the job (`scontrol requeue`: --requeue alone never requeues a job that reaches
# its time limit); the requeued job resumes from that checkpoint. The launchers (accelerate, torchrun)
# ignore SIGUSR1 and SIGTERM so that they wait for train.py to finish its checkpoint. A job pre-empted by
# the scheduler is requeued by SLURM (--requeue) and resumes from its newest periodic checkpoint. The
# recipe's global batch is kept whatever the node count (gradient accumulation is derived), so a
# requeued job may land on a different number of nodes.
#
# Environment: PROCESSES_PER_NODE (default: the GPUs SLURM gives the node; 1 without GPUs), MIXED_PRECISION
# (default bf16), MAIN_PORT (rendezvous port), ACCELERATE_USE_CPU=1 for CPU processes (gloo) with
# `--gpus-per-node=0` (what the tests do on a one-node CPU cluster).
#SBATCH --job-name=clsvit
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=80
#SBATCH --signal=B:USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?run this script with sbatch}"

if [ "${1:-}" = --cells ]; then  # array task: line SLURM_ARRAY_TASK_ID+1 of the cells file = log file, recipe, overrides
  line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "${2:?usage: slurm.sh --cells CELLS_FILE}")
  eval "set -- $line"  # the file is written by clsvit.sweep with shell quoting
  exec >>"$1" 2>&1
  shift
  echo "==== $(date '+%F %T') job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} ($SLURM_JOB_ID), restart ${SLURM_RESTART_COUNT:-0}"
fi
RECIPE=${1:?usage: sbatch scripts/slurm.sh RECIPE.yaml [section.key=value ...]}
shift

if [ -z "${CLSVIT_REPO:-}" ]; then  # the path this script was submitted from (relative to the submit directory)
  script=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)
  CLSVIT_REPO=$(cd "$(dirname "$script")/.." && pwd)
fi
[ -f "$CLSVIT_REPO/train.py" ] || { echo "slurm.sh: no train.py in $CLSVIT_REPO; set CLSVIT_REPO" >&2; exit 2; }

gpus=${SLURM_GPUS_ON_NODE:-0}  # unset in a job without GPUs (--gpus-per-node=0)
PROCESSES_PER_NODE=${PROCESSES_PER_NODE:-$((gpus > 0 ? gpus : 1))}
NUM_PROCESSES=$((SLURM_NNODES * PROCESSES_PER_NODE))
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # array tasks sharing a node need distinct ports
LAUNCH="--num_machines $SLURM_NNODES --num_processes $NUM_PROCESSES --mixed_precision ${MIXED_PRECISION:-bf16}"
if [ "$NUM_PROCESSES" -gt 1 ]; then
  LAUNCH="$LAUNCH --multi_gpu --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_HOST \
    --main_process_port $MAIN_PORT --same_network"
fi
export PYTHONUNBUFFERED=1  # the log shows progress as it happens

time_limit_warning=0
on_time_limit_warning() {
  time_limit_warning=1
  echo "slurm.sh: time-limit warning: train.py checkpoints and stops, then the job is requeued"
  # every job step's processes (not this script); the launchers ignore it
  scancel --signal=USR1 "$SLURM_JOB_ID" || echo "slurm.sh: could not signal the job steps" >&2
}
trap on_time_limit_warning USR1

# `srun` starts one launcher per node; SLURM_NODEID gives each its machine rank. The launcher ignores
# SIGUSR1/SIGTERM (torchrun handles only SIGINT here), train.py installs its own handlers for both.
srun --kill-on-bad-exit=1 bash -c "trap '' USR1 TERM; export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT; \
  exec accelerate launch $LAUNCH $(printf '%q ' "$CLSVIT_REPO/train.py" --config "$RECIPE" "$@")" &
srun_pid=$!
status=0
while :; do  # `wait` returns early when the trap runs; wait again until srun has exited
  wait "$srun_pid" && status=0 || status=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done

if [ "$time_limit_warning" = 1 ] && [ "$status" = 0 ]; then
  echo "slurm.sh: requeueing job $SLURM_JOB_ID to resume"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
