#!/usr/bin/env bash
# Launches a lit_navit config on every worker of a Cloud TPU VM pod slice.
#
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE 'configs/siglip_navit.py:variant=B/16,batch=4096,path=gs://b/webli-*.tfrecord' gs://b/runs/siglip_b16 [--config.total_steps=50000 ...]
#
# Every worker runs the same command; jax.distributed finds the other hosts by
# itself on TPU, so no coordinator flags are needed. The workdir must be on
# storage all workers share (a GCS bucket). Untested here: no TPU was available.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,9p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
TPU=(gcloud compute tpus tpu-vm --zone "$ZONE")

# Ship this checkout (committed files) to every worker, install, train.
ARCHIVE=$(mktemp --suffix=.tar.gz)
git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$ARCHIVE" HEAD
"${TPU[@]}" scp "$ARCHIVE" "$TPU_NAME":lit_navit.tar.gz --worker=all
"${TPU[@]}" ssh "$TPU_NAME" --worker=all --command "
  set -e
  mkdir -p lit_navit && tar -xzf lit_navit.tar.gz -C lit_navit && cd lit_navit
  [ -d .venv ] || python3 -m venv .venv
  .venv/bin/pip install -q -e . 'jax[tpu]'
  .venv/bin/python -m lit_navit.train --config '$CONFIG' --workdir '$WORKDIR' $*
"
