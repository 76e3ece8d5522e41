#!/usr/bin/env bash
# Train on a Cloud TPU VM (one host or a pod slice: every worker runs the same command).
#
#   TPU=my-tpu ZONE=us-central2-b CONFIG=configs/unet.py WORKDIR=/mnt/shared/runs/unet \
#     DATA_DIR=/mnt/shared/tfds MANUAL_DIR=/data/chest-xray-masks-and-labels \
#     bash launch/tpu_vm.sh [--config.KEY=VALUE ...]
#
# WORKDIR and DATA_DIR are local paths. On a pod slice they must be one shared filesystem
# seen by every worker (Filestore/NFS, or a gcsfuse mount): Orbax writes one checkpoint from
# all hosts. Prepare the dataset once first, on one worker:
#   python -m cxr_jax.data.prepare --dataset=kaggle --manual_dir=$MANUAL_DIR --data_dir=$DATA_DIR
# Every path and argument reaches the workers quoted (printf %q): spaces and shell
# characters in them stay part of the path.
set -euo pipefail
: "${TPU:?name of the TPU VM}" "${ZONE:?its zone}" "${WORKDIR:?run directory}"
CONFIG=${CONFIG:-configs/unet.py}
DATA_DIR=${DATA_DIR:?shared TFDS data dir, prepared once}
train=(python -m cxr_jax.main --multihost "--config=$CONFIG" "--workdir=$WORKDIR"
  "--config.data.data_dir=$DATA_DIR" "--config.data.manual_dir=${MANUAL_DIR:-}" "$@")
remote="cd ~/cxr_jax && pip install -q -e . 'jax[tpu]' && $(printf '%q ' "${train[@]}")"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$remote"
