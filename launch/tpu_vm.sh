#!/usr/bin/env bash
# Train on a Cloud TPU VM (one host or a pod slice: every worker runs the same command).
#
#   TPU=my-tpu ZONE=us-central2-b CONFIG=configs/unet.py WORKDIR=gs://my-bucket/runs/unet \
#     DATA_DIR=gs://my-bucket/tfds MANUAL_DIR=gs://my-bucket/chest-xray-masks-and-labels \
#     bash launch/tpu_vm.sh [--config.KEY=VALUE ...]
#
# WORKDIR and DATA_DIR are gs:// URLs (or one filesystem every worker mounts): Orbax writes
# one checkpoint from all hosts; each host keeps its own local copy of the prepared dataset
# (~/.cache/cxr_jax). With MANUAL_DIR set, worker 0 first prepares the dataset into DATA_DIR
# (once: a prepared DATA_DIR is reused), then every worker trains.
# Every path and argument reaches the workers quoted (printf %q): spaces and shell
# characters in them stay part of the path.
set -euo pipefail
: "${TPU:?name of the TPU VM}" "${ZONE:?its zone}" "${WORKDIR:?run directory}"
CONFIG=${CONFIG:-configs/unet.py}
DATA_DIR=${DATA_DIR:?TFDS data dir (gs:// or shared), prepared once}
setup="cd ~/cxr_jax && pip install -q -e '.[gcs]' 'jax[tpu]'"
if [[ -n "${MANUAL_DIR:-}" ]]; then
  prepare=(python -m cxr_jax.data.prepare "--dataset=${DATASET:-kaggle}"
    "--manual_dir=$MANUAL_DIR" "--data_dir=$DATA_DIR")
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=0 \
    --command "$setup && $(printf '%q ' "${prepare[@]}")"
fi
train=(python -m cxr_jax.main --multihost "--config=$CONFIG" "--workdir=$WORKDIR"
  "--config.data.data_dir=$DATA_DIR" "--config.data.manual_dir=${MANUAL_DIR:-}" "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
  --command "$setup && $(printf '%q ' "${train[@]}")"
