#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, each starting one process per GPU.
#
#   sbatch --nodes=8 scripts/slurm.sh recipes/deit3/vit_b_800ep_specialized.yaml [section.key=value ...]
#
# Pre-emption: SLURM sends SIGUSR1 90 s before the time limit (--signal below); train.py then saves a
# checkpoint at the next log step and exits cleanly, and `--requeue` relaunches the same command, which
# resumes from that checkpoint. The recipe's global batch is kept whatever the node count
# (gradient accumulation is derived), so a requeued job may land on a different number of nodes.
#SBATCH --job-name=clsvit
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=80
#SBATCH --signal=USR1@90
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
RECIPE=${1:?usage: sbatch scripts/slurm.sh RECIPE.yaml [section.key=value ...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
cd "$(dirname "$0")/.."
# `srun` starts one launcher per node; SLURM_NODEID gives each its machine rank. `exec` lets the
# launcher receive SLURM's signals, which it forwards to the training processes.
srun --kill-on-bad-exit=1 bash -c "exec accelerate launch \
  --multi_gpu --mixed_precision bf16 \
  --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_HOST --main_process_port $MAIN_PORT \
  --same_network \
  train.py --config $RECIPE $*"
