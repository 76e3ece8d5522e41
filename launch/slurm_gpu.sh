#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one task (process) per GPU, every GPU of every node.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh --config=configs/unet.py \
#     --workdir=/shared/runs/unet --config.batch_size=128
#
# cxr_jax.main detects the SLURM job and starts jax.distributed by itself (coordinator, ranks;
# a host that does not join within --init_timeout_s is an error, not a hang). Each task sees
# its own GPU, which CUDA numbers 0 in that task (CUDA_VISIBLE_DEVICES '3', or '0' after
# cgroup renumbering): cxr_jax passes jax.distributed that GPU, not JAX's default
# [SLURM_LOCALID], an ordinal the task cannot see (jax-ml/jax#23452). --expect_devices makes
# a run that sees fewer GPUs than the job has stop at once.
#SBATCH --job-name=cxr_jax
set -euo pipefail
gpus_per_node=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}
gpus_per_node=${gpus_per_node##*:}  # 'h100:8' -> 8
nodes=${SLURM_JOB_NUM_NODES:-1}
srun --ntasks-per-node="$gpus_per_node" --gpus-per-task=1 --cpus-per-task="${CPUS_PER_TASK:-8}" \
  python -m cxr_jax.main --expect_devices="$((nodes * gpus_per_node))" "$@"
