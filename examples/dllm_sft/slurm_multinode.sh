#!/bin/bash
# Multi-node DiffusionGemma SFT with blockdiff: one torchrun launcher per node, c10d rendezvous on the
# first node. The same YAML as one GPU; parallel.ep must divide the world size and the expert count.
#SBATCH --job-name=blockdiff-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; torchrun starts the per-GPU workers
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300            # blockdiff checkpoints and exits 0 on SIGUSR1/SIGTERM
set -euo pipefail

CONFIG=${CONFIG:-examples/dllm_sft/diffusion_gemma_sft.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
export OMP_NUM_THREADS=8
# train.output_dir must be on a filesystem every node sees (sharded checkpoints are written by all ranks)

srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_NNODES" --nproc-per-node="$GPUS_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID" \
  examples/dllm_sft/finetune.py -c "$CONFIG" --parallel.ep 8 "$@"
