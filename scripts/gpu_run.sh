#!/usr/bin/env bash
# One window on a lent GPU machine: CUDA checks, benchmarks, and training of the shipped model,
# everything (and a summary) written to $OUT. Each stage runs even when an earlier one failed,
# and the whole run ends within BUDGET seconds.
#
#   scripts/gpu_run.sh            # from anywhere; it works in the repository root
#
# Stages (docs/training.md, "A GPU window"):
#   checks  scripts/gpu_checks.py: the official parity fixtures on the device, bf16 and SDPA
#           attention paths, one training step of every architecture, nlsr.train with amp /
#           channels-last / EMA / resume, and the shipped config's iterations per second
#   bench   nlsr bench against the released approach (BENCH_JOBS), one JSON per job
#   train   nlsr train configs/ship/dlsn_s_x2.yaml, warm-started from the shipped weights, with
#           a GPU batch and bf16 autocast, for the remaining time; it stops with a checkpoint
#           (SIGINT) before the budget, and a stopped run is resumed at its own step to export
#           final/ema weights
#   eval    nlsr eval on Set5 of the warm-start weights and of the new EMA weights
#   package $OUT: summary.json, summary.txt, checks.json, bench.json, results.tar.gz (logs,
#           per-job bench JSON and tables, the run's config.yaml, log.jsonl, final.safetensors,
#           eval JSON), checkpoint.pt, ema.safetensors, best.safetensors: 8 files, each under
#           the 16 MiB the run tool brings back
#
# Before the first window, on this machine (once; about 4 CPU minutes, 11 on the loaded 2 cores):
#   PYTHONPATH=src python scripts/pack_gpu_data.py     # .data/gpu: fixtures, Set5, T91+BSD200
# which prints the payload (measured 2026-12-04: working tree 10.1 MiB + .data/gpu 46.4 MiB =
# 56.5 MiB of the 64 MiB a call may take). The call (the `run` tool of the device machine):
#   command: bash scripts/gpu_run.sh
#   carry:   [".data/gpu"]
#   timeout_s: 600
# The defaults fill a 600 s command: BUDGET=540 leaves a minute for the tool's own copying.
# To continue from a window's weights in the next one, put its ema.safetensors at
# .data/gpu/warm.safetensors (used as the warm start when present).
#
# Knobs (environment variables):
#   DEVICE=cuda|cpu        the device of every stage (default cuda)
#   BUDGET=540             seconds for the whole script
#   OUT=/tmp/nlsr_gpu_out  where the results go (the run tool sets it)
#   DATA=.data/gpu         the packed data (layout of ../shared: NLSR_SHARED points here)
#   PYTHON=python3         the interpreter (the package need not be installed: PYTHONPATH=src)
#   THREADS=               torch CPU threads for checks and training (default: torch's choice)
#   CHECKS_SECONDS=120     cap of the checks stage; CHECKS_ARGS: extra gpu_checks.py options
#   BENCH_SECONDS=120      cap of the bench stage; each job gets the time left in proportion
#                          to its SHARE among the jobs still to run
#   BENCH_JOBS=            "NAME SHARE nlsr-bench-options...;NAME SHARE ...": the default
#                          measures NLSA/GLA and HSPA at C = 64 (48..384), at the paper widths
#                          (batch 16), and the paper DLSN, NLSN and HSPAN, all against
#                          --baseline released
#   TRAIN_CONFIG=configs/ship/dlsn_s_x2.yaml   BATCH=64   WORKERS=12   LR=2e-4
#   WARM_START=            weights to start from (default .data/gpu/warm.safetensors if present,
#                          else the shipped x2 weights; "none": from scratch)
#   TRAIN_ITERS=           iterations (default: from the rate the checks measured, or
#                          TRAIN_RATE it/s, so that training ends inside its time)
#   TRAIN_ARGS=            extra key=value overrides of nlsr train
#   TRAIN_SECONDS=         cap of the training time (default: what the budget leaves)
#   LOAD_SECONDS=30        expected start-up of nlsr train before the first step (data, CUDA)
#   MARGIN=75              seconds kept after training: stop, export, eval, packaging
#   TRAIN_MIN_SECONDS=30   skip training when less time than this is left for it
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
OUT=${OUT:-/tmp/nlsr_gpu_out}
DATA=${DATA:-.data/gpu}
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-}
CHECKS_SECONDS=${CHECKS_SECONDS:-120}
CHECKS_ARGS=${CHECKS_ARGS:-}
BENCH_SECONDS=${BENCH_SECONDS:-120}
# Each job is one nlsr bench process; a job cut by its time limit loses its JSON (its progress
# lines stay in bench/NAME.txt), hence several smaller jobs.
c="--mode infer,train --baseline released --repeat 3 --max-memory 40G"
defaults="linear 30 --blocks nlsa,gla --channels 64 --sizes 48,96,192,384 --max-seconds 5 $c"
defaults+=";hspa 15 --blocks hspa --channels 64 --sizes 48,96,192,384 --max-seconds 3 $c"
defaults+=";paper 15 --blocks nlsa,gla --channels 256 --sizes 48 --batch 16 --max-seconds 10 $c"
defaults+=";hspa192 10 --blocks hspa --channels 192 --sizes 48 --batch 16 --max-seconds 10 $c"
defaults+=";networks 30 --models dlsn,nlsn,hspan --config paper --sizes 48,96 --max-seconds 10 $c"
BENCH_JOBS=${BENCH_JOBS:-$defaults}
TRAIN_CONFIG=${TRAIN_CONFIG:-configs/ship/dlsn_s_x2.yaml}
BATCH=${BATCH:-64}
WORKERS=${WORKERS:-12}
LR=${LR:-2e-4}
WARM_START=${WARM_START:-}
TRAIN_ITERS=${TRAIN_ITERS:-}
TRAIN_RATE=${TRAIN_RATE:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
TRAIN_SECONDS=${TRAIN_SECONDS:-}
LOAD_SECONDS=${LOAD_SECONDS:-30}
MARGIN=${MARGIN:-75}
TRAIN_MIN_SECONDS=${TRAIN_MIN_SECONDS:-30}

START=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/nlsr_gpu_run.XXXXXX")
mkdir -p "$OUT" "$WORK/logs" "$WORK/bench"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 NLSR_SHARED=$PWD/$DATA
[[ $DATA = /* ]] && NLSR_SHARED=$DATA
RUN=$WORK/train
STAGES=$WORK/stages.tsv
: >"$STAGES"

left() { echo $((BUDGET - (SECONDS - START))); }
min() { if (($1 < $2)); then echo "$1"; else echo "$2"; fi; }
# record NAME STATUS SECONDS NOTE: one line of the summary's stage table
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >>"$STAGES"; }
# limited SECONDS LOG COMMAND...: run with a time limit (SIGINT, then SIGKILL 15 s later: the
# trainer and DataLoader workers treat SIGINT as a clean stop), output to LOG; its status
limited() {
  local limit=$(($1 > 1 ? $1 : 1)) log=$2
  shift 2
  timeout -s INT -k 15 "$limit" "$@" >>"$log" 2>&1
}
# status RC: ok, timeout or failed
status() { case $1 in 0) echo ok ;; 124 | 130 | 137) echo timeout ;; *) echo failed ;; esac; }

echo "gpu_run: DEVICE=$DEVICE BUDGET=${BUDGET}s OUT=$OUT DATA=$DATA work=$WORK"

# ------------------------------------------------------------------ environment
t0=$SECONDS
{
  echo "date: $(date -u +%FT%TZ)"
  echo "host: $(uname -a)"
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PYTHON" - "$WORK/env.json" <<'EOF'
import importlib.util, json, sys
need = ["torch", "numpy", "PIL", "yaml", "safetensors", "tqdm"]
optional = ["imagecodecs", "matplotlib", "tensorboard", "pytest"]
env = {
    "python": sys.version.split()[0],
    "missing": [m for m in need if importlib.util.find_spec(m) is None],
    "missing_optional": [m for m in optional if importlib.util.find_spec(m) is None],
}
print("python", env["python"], sys.executable)
print("missing required modules:", ", ".join(env["missing"]) or "none")
print("missing optional modules:", ", ".join(env["missing_optional"]) or "none")
try:
    import torch
    import nlsr.models
    env.update(torch=torch.__version__, cuda=torch.cuda.is_available())
    print("torch", torch.__version__, "CUDA available:", env["cuda"])
except Exception as exc:
    env["import_error"] = repr(exc)
    print("cannot import torch / nlsr:", repr(exc))
with open(sys.argv[1], "w") as fh:
    json.dump(env, fh)
sys.exit(1 if env["missing"] or "import_error" in env else 0)
EOF
} >"$WORK/logs/env.log" 2>&1
rc=$?
grep -h "missing\|^python\|^torch\|cannot import" "$WORK/logs/env.log"
record env "$(status $rc)" $((SECONDS - t0)) \
  "$(grep -h 'missing required\|cannot import' "$WORK/logs/env.log")"
if [[ ! -d $DATA ]]; then
  echo "gpu_run: no $DATA: pack it with scripts/pack_gpu_data.py and carry it" >&2
fi

# ------------------------------------------------------------------ (a) checks
t0=$SECONDS
limit=$(min "$CHECKS_SECONDS" "$(($(left) - MARGIN))")
if ((limit < 10)); then
  record checks skipped 0 "no time left"
else
  echo "=== checks (at most ${limit}s)"
  # The trainer check turns deterministic algorithms on; cuBLAS needs this before it starts.
  # shellcheck disable=SC2086
  CUBLAS_WORKSPACE_CONFIG=:4096:8 limited "$limit" "$WORK/logs/checks.log" \
    "$PYTHON" scripts/gpu_checks.py --device "$DEVICE" --json "$WORK/checks.json" \
    --deadline $((limit - 10)) --ship-batch "$BATCH" --ship-config "$TRAIN_CONFIG" \
    ${THREADS:+--threads "$THREADS"} $CHECKS_ARGS
  rc=$?
  grep -h "^check " "$WORK/logs/checks.log"
  record checks "$(status $rc)" $((SECONDS - t0)) "exit status $rc"
fi

# ------------------------------------------------------------------ (b) bench
t0=$SECONDS
bench_end=$((SECONDS + $(min "$BENCH_SECONDS" "$(($(left) - MARGIN))")))
IFS=';' read -ra jobs <<<"$BENCH_JOBS"
shares=0
for job in "${jobs[@]}"; do
  read -r name share args <<<"$job"
  shares=$((shares + ${share:-0}))
done
done_jobs=()
failed_jobs=()
for job in "${jobs[@]}"; do
  read -r name share args <<<"$job"
  [[ -n ${name:-} ]] || continue
  limit=$(((bench_end - SECONDS) * share / (shares > 0 ? shares : 1)))
  shares=$((shares - share))
  if ((limit < 5)); then
    failed_jobs+=("$name(no time)")
    continue
  fi
  echo "=== bench $name (at most ${limit}s): $args"
  # shellcheck disable=SC2086
  limited "$limit" "$WORK/bench/$name.txt" "$PYTHON" -m nlsr bench --device "$DEVICE" $args \
    --json "$WORK/bench/$name.json"
  rc=$?
  if ((rc == 0)); then done_jobs+=("$name"); else failed_jobs+=("$name($(status $rc) $rc)"); fi
done
files=()
for name in "${done_jobs[@]}"; do files+=("$WORK/bench/$name.json"); done
if ((${#files[@]} == 1)); then
  cp "${files[0]}" "$WORK/bench.json"
elif ((${#files[@]} > 1)); then
  # All jobs in one table and one JSON (and a log-log plot where matplotlib is there).
  plot=()
  grep -q matplotlib "$WORK/env.json" 2>/dev/null || plot=(--plot "$WORK/bench/scaling.png")
  "$PYTHON" -m nlsr bench --from-json "${files[@]}" --json "$WORK/bench.json" "${plot[@]}" \
    >"$WORK/bench/all.txt" 2>&1
fi
note="done: ${done_jobs[*]:-none}; not done: ${failed_jobs[*]:-none}"
if ((${#jobs[@]} == 0)); then
  record bench skipped 0 "no jobs"
elif ((${#failed_jobs[@]} == 0)); then
  record bench ok $((SECONDS - t0)) "$note"
else
  record bench failed $((SECONDS - t0)) "$note"
fi

# ------------------------------------------------------------------ (c) train
t0=$SECONDS
warm=$WARM_START
[[ -z $warm && -f $DATA/warm.safetensors ]] && warm=$DATA/warm.safetensors
[[ -z $warm ]] && warm=src/nlsr/weights/nlsr-dlsn-s-x2.safetensors
limit=$(($(left) - MARGIN))
[[ -n $TRAIN_SECONDS ]] && limit=$(min "$limit" "$TRAIN_SECONDS")
if ((limit < TRAIN_MIN_SECONDS)); then
  record train skipped 0 "only ${limit}s left for it"
else
  dirs=$(find "$DATA/datasets/train" -mindepth 1 -maxdepth 1 -type d | sort | paste -sd, -)
  plan=$("$PYTHON" scripts/gpu_report.py plan --checks "$WORK/checks.json" --device "$DEVICE" \
    --seconds $((limit - LOAD_SECONDS)) ${TRAIN_RATE:+--rate "$TRAIN_RATE"} \
    ${TRAIN_ITERS:+--iterations "$TRAIN_ITERS"})
  # iterations, amp, channels_last, rate, rate_source, every, checkpoint_every, log_every; the
  # defaults stand if the plan could not be made
  iterations=${TRAIN_ITERS:-1000} amp=false channels_last=false every=0 checkpoint_every=100
  log_every=10
  eval "$plan"
  echo "=== train (at most ${limit}s): $plan"
  args=("run_dir=$RUN" "data.train_dirs=[$dirs]" "val.data_root=$DATA/datasets/benchmark"
    "train.device=$DEVICE" "data.workers=$WORKERS" "data.batch_size=$BATCH" "optim.lr=$LR"
    "train.iterations=$iterations" "train.amp=$amp" "train.channels_last=$channels_last"
    "train.threads=${THREADS:-null}" "val.every=$every" "train.checkpoint_every=$checkpoint_every"
    "train.log_every=$log_every")
  [[ $warm != none ]] && args+=("train.warm_start=$warm")
  # shellcheck disable=SC2206
  args+=($TRAIN_ARGS)
  limited "$limit" "$WORK/logs/train.log" \
    "$PYTHON" -m nlsr train --config "$TRAIN_CONFIG" "${args[@]}"
  rc=$?
  tail -n 3 "$WORK/logs/train.log"
  note="exit status $rc; $plan"
  if [[ ! -f $RUN/final.safetensors && -f $RUN/checkpoint.pt ]]; then
    # Stopped early: resume at the checkpoint's own step, which exports final/ema at once. The
    # trainer prints that step after saving; else (killed) read it from the checkpoint.
    step=$(sed -n 's/.*stopped by [A-Z]* at step \([0-9]*\);.*/\1/p' "$WORK/logs/train.log")
    [[ -n $step ]] || step=$("$PYTHON" -c "import sys, torch
print(torch.load(sys.argv[1], weights_only=True)['step'])" "$RUN/checkpoint.pt")
    echo "=== export at step $step"
    limited $(($(left) - 15)) "$WORK/logs/train.log" "$PYTHON" -m nlsr train --resume "$RUN" \
      "train.iterations=$step" "data.workers=$WORKERS"
    note="$note; stopped at step $step, exported (exit status $?)"
  fi
  if [[ -f $RUN/final.safetensors ]]; then
    record train ok $((SECONDS - t0)) "$note"
  else
    record train failed $((SECONDS - t0)) "$note"
  fi
fi

# ------------------------------------------------------------------ eval
t0=$SECONDS
evals=()
eval_status=ok
mkdir -p "$RUN"
for w in warm ema; do
  file=$RUN/ema.safetensors
  [[ $w = warm ]] && file=$warm
  [[ -f $file ]] || continue
  if (($(left) < 20)); then
    evals+=("$w: no time")
    eval_status=failed
    continue
  fi
  limited $(($(left) - 15)) "$WORK/logs/eval.log" "$PYTHON" -m nlsr eval --weights "$file" \
    --data Set5 --scale 2 --data-root "$DATA/datasets/benchmark" --device "$DEVICE" \
    --json "$RUN/eval_$w.json"
  rc=$?
  evals+=("$w: $(status $rc)")
  ((rc == 0)) || eval_status=failed
done
if ((${#evals[@]} == 0)); then
  record eval skipped 0 "no weights to evaluate"
else
  record eval "$eval_status" $((SECONDS - t0)) "${evals[*]}"
fi

# ------------------------------------------------------------------ (d) package
t0=$SECONDS
[[ -f $WORK/checks.json ]] && cp "$WORK/checks.json" "$OUT/"
[[ -f $WORK/bench.json ]] && cp "$WORK/bench.json" "$OUT/"
for f in checkpoint.pt ema.safetensors best.safetensors; do
  [[ -f $RUN/$f ]] && cp "$RUN/$f" "$OUT/"
done
(
  cd "$WORK" || exit 1
  members=(logs bench stages.tsv)
  for f in env.json checks.json bench.json; do [[ -f $f ]] && members+=("$f"); done
  for f in config.yaml log.jsonl final.safetensors eval_warm.json eval_ema.json tb; do
    [[ -e train/$f ]] && members+=("train/$f")
  done
  tar -czf "$OUT/results.tar.gz" "${members[@]}"
)
record package "$(status $?)" $((SECONDS - t0)) "results.tar.gz: logs, bench tables, run files"
"$PYTHON" scripts/gpu_report.py summary --work "$WORK" --out "$OUT" --budget "$BUDGET" \
  --elapsed $((SECONDS - START)) || cat "$STAGES"
echo "gpu_run: done in $((SECONDS - START))s of ${BUDGET}s; results in $OUT"
