#!/usr/bin/env bash
#SBATCH --job-name=amortized3d
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
# One node, eight GPUs: sbatch launch/slurm_8gpu.sh --corpus df415 --output runs/df415
set -euo pipefail
srun accelerate launch --config_file launch/accelerate_8gpu.yaml train.py "$@"
