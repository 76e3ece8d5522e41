#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node, all of its GPUs.
# jax.distributed.initialize() reads the SLURM environment (coordinator, ranks).
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh --config=configs/unet.py \
#     --workdir=/shared/runs/unet --config.batch_size=128
#SBATCH --ntasks-per-node=1
#SBATCH --job-name=cxr_jax
set -euo pipefail
srun python -m cxr_jax.main --multihost "$@"
