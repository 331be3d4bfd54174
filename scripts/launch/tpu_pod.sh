#!/bin/bash
# Training on a Cloud TPU pod slice: the same command on every worker VM at once.
# jax.distributed.initialize() (called by scripts/train.py) discovers the pod's workers itself.
#
#   scripts/launch/tpu_pod.sh my-tpu us-central2-b configs/train_tiny.py gs://bucket/runs/tiny
#
# The repository must be present at ~/lcv on every worker (e.g. `--worker=all --command "git clone
# ..."` once), with `pip install -e '.[tpu]'`. Use a gs:// workdir: orbax writes checkpoints there
# from every host, and a preempted (SIGTERM) slice saves before it goes.
set -euo pipefail

TPU=${1:?usage: tpu_pod.sh TPU_NAME ZONE CONFIG[:ARG] WORKDIR [--set k=v ...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
EXTRA="$*"

gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/lcv && python scripts/train.py --config '$CONFIG' --workdir '$WORKDIR' --no_progress $EXTRA"
