#!/usr/bin/env bash
# Train for a bounded time on a lent GPU machine (the workplace's `device` tool), resuming the run
# kept in .runs/NAME, and copy the results to $OUT.
#
#   scripts/device_train.sh NAME SECONDS CONFIG [KEY=VALUE ...]
#
# Run it from the repository root on the device machine. Before the first call, on this machine:
#   mkdir -p .data/train .data/benchmark
#   cp -r ../shared/datasets/train/{T91,BSD200} .data/train/
#   cp -r ../shared/datasets/benchmark/Set5 .data/benchmark/
# and name `.data` in the call's carry (/.data/ is git-ignored; it is about 60 MB of the 64 MiB a
# call may carry). .runs/NAME stays on the machine between calls while it is warm; to continue a
# run on a fresh machine, carry .runs/NAME too (copy checkpoint.pt and config.yaml back into it
# first). DEVICE (default cuda) and WORKERS (default 8) override the device and loader workers.
# Training stops with a checkpoint at SIGTERM, so `timeout` never loses more than the
# iterations since the last checkpoint_every.
set -euo pipefail
name=$1
seconds=$2
config=$3
shift 3
run=.runs/$name
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
common=("train.device=${DEVICE:-cuda}" "data.workers=${WORKERS:-8}" val.data_root=.data/benchmark)
if [[ -f $run/checkpoint.pt ]]; then
  timeout -s TERM "$seconds" python3 -m nlsr train --resume "$run" "${common[@]}" "$@" || true
else
  mkdir -p .runs
  timeout -s TERM "$seconds" python3 -m nlsr train --config "$config" run_dir="$run" \
    "data.train_dirs=[.data/train/T91,.data/train/BSD200]" "${common[@]}" "$@" || true
fi
out=${OUT:-/tmp/device_train_out}
mkdir -p "$out"
for f in checkpoint.pt config.yaml log.jsonl ema.safetensors best.safetensors final.safetensors; do
  [[ -f $run/$f ]] && cp "$run/$f" "$out/"
done
tail -n 3 "$run/log.jsonl"
