#!/usr/bin/env bash
# N processes on this machine, each with its own CPU devices: the multi-host code path
# (jax.distributed, per-process data shards, global arrays) without a cluster.
#
#   N=2 DEVICES_PER_PROCESS=2 bash launch/multihost_cpu.sh --config=configs/unet.py:smoke \
#     --workdir=/tmp/cxr_multihost
set -euo pipefail
N=${N:-2}
PORT=${PORT:-12355}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1}
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
  JAX_PLATFORMS=cpu python -m cxr_jax.main --coordinator_address="127.0.0.1:$PORT" \
    --num_processes="$N" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
