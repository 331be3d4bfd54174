#!/bin/bash
# Two processes on one machine, 4 emulated CPU devices each: a multi-host run without a cluster
# (the set-up of tests/train/test_resume.py::test_two_processes_match_one).
#
#   scripts/launch/local_multiprocess.sh configs/train_tiny.py runs/multiprocess
set -euo pipefail

CONFIG=${1:?usage: local_multiprocess.sh CONFIG[:ARG] WORKDIR [--set k=v ...]}
WORKDIR=${2:?workdir}
shift 2
PORT=${PORT:-12355}

for i in 0 1; do
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
    python scripts/train.py --config "$CONFIG" --workdir "$WORKDIR" --no_progress \
    --coordinator "localhost:$PORT" --num_processes 2 --process_id "$i" "$@" &
done
wait
