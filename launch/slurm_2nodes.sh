#!/usr/bin/env bash
#SBATCH --job-name=amortized3d
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
# Two nodes x eight GPUs: sbatch launch/slurm_2nodes.sh --corpus cp100k --output runs/cp100k
# One launcher per node (srun starts one task on each); each gets its node's rank and the first
# node's address. If one rank fails, the launchers stop the others (torch elastic), so the job ends.
set -euo pipefail
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
ARGS=$(printf ' %q' "$@")
srun bash -c "accelerate launch --config_file launch/accelerate_2nodes_8gpu.yaml \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_HOST --main_process_port 29500 \
  train.py$ARGS"
