#!/usr/bin/env bash
# The reproductions of docs/RESULTS.md: every variant x seed of one dataset with one schedule and
# today's defaults (ARGS="--set init=keras" for the rows labelled keras-init), skipping runs that
# already finished (and resuming an interrupted one), then the table.
#   [DATASET=cifar10|cub42|...] [TAG=s6] [RUNS="C:0 A:0 ce:0 ..."] [COPY_TO=results] [ARGS="--criterion mcl"] \
#     scripts/reproduce.sh DATA_DIR [OUT_DIR] [SCHEDULE_SCALE] [SEEDS]
# DATA_DIR holds train/<class>/*.jpg (and test/<class>/*.jpg for the figures on the official test
# split), e.g. the CIFAR-10 or cub42 archives unpacked. Runs are named OUT_DIR/DATASET-NET-TAG-VARIANT/seed_S
# (NET: lenet for cifar10/cifar100, else alexnet; NET=... to say otherwise, e.g. with ARGS="--arch lenet").
# RUNS sets the order (variant:seed pairs; default every variant for each seed of SEEDS); COPY_TO
# receives each finished run's small files (metrics.json, cluster_result.json, histories); ARGS are
# more train.py flags for every run (give the runs their own TAG). STREAMS=N deals the runs out
# round-robin to N copies of this script running at once, each TensorFlow process on one thread
# (unless TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS say otherwise), each logging to
# OUT_DIR/stream-K.log: on 2 cores, two one-thread runs train about 1.5x the images per second of
# one two-thread run (docs/BENCHMARKS.md, section 0). RETRIES=N reruns a run up to N times when it is
# killed by SIGKILL (exit 137: the kernel's out-of-memory killer), resuming from its last checkpoint;
# any other failure stops the script. PYTHON names the interpreter (default python).
set -uo pipefail
data_dir=${1:?usage: $0 DATA_DIR [OUT_DIR] [SCHEDULE_SCALE] [SEEDS]}
out=${2:-runs}
scale=${3:-0.0632}   # 6 of the paper's 95 CIFAR-10 epochs per phase; 1.0 is the paper's schedule
seeds=${4:-"0 1 2"}
tag=${TAG:-s6}
dataset=${DATASET:-cifar10}
case "$dataset" in cifar10|cifar100|synthetic) net=${NET:-lenet} ;; *) net=${NET:-alexnet} ;; esac
prefix="$dataset-$net-$tag"
runs=${RUNS:-$(for s in $seeds; do for v in ce A B C D; do printf '%s:%s ' "$v" "$s"; done; done)}
data_dir=$(realpath "$data_dir"); out=$(realpath -m "$out")   # absolute: the script changes folder
copy_to=${COPY_TO:+$(realpath -m "$COPY_TO")}
python=${PYTHON:-python}
streams=${STREAMS:-1}
case "$streams" in ''|*[!0-9]*|0) echo "error: STREAMS must be a whole number >= 1; got '$streams'" >&2; exit 2 ;; esac
retries=${RETRIES:-0}
case "$retries" in ''|*[!0-9]*) echo "error: RETRIES must be a whole number >= 0; got '$retries'" >&2; exit 2 ;; esac
script=$(realpath "$0")
cd "$(dirname "$0")/.."
if [ "$streams" -gt 1 ]; then
  parts=(); i=0
  for pair in $runs; do parts[$((i % streams))]+="$pair "; i=$((i + 1)); done
  mkdir -p "$out"; pids=()
  for k in "${!parts[@]}"; do
    echo "=== stream $k: ${parts[$k]}(log: $out/stream-$k.log)"
    STREAMS=1 RUNS="${parts[$k]}" NO_TABLE=1 TF_NUM_INTRAOP_THREADS=${TF_NUM_INTRAOP_THREADS:-1} \
      TF_NUM_INTEROP_THREADS=${TF_NUM_INTEROP_THREADS:-1} bash "$script" "$@" > "$out/stream-$k.log" 2>&1 &
    pids+=($!)
  done
  status=0
  for k in "${!pids[@]}"; do wait "${pids[$k]}" || { status=$?; echo "stream $k failed (exit $status): see $out/stream-$k.log" >&2; }; done
  [ "$status" = 0 ] || exit "$status"
  exec "$python" -m keras_cwsn.report "$out"/"$prefix"-*
fi
for pair in $runs; do
  variant=${pair%%:*}; seed=${pair##*:}
  run="$out/$prefix-$variant/seed_$seed"
  if [ ! -f "$run/metrics.json" ]; then
    echo "=== $(date +%T) $variant seed $seed"
    attempt=0
    until "$python" train.py --dataset "$dataset" --data-dir "$data_dir" --variant "$variant" --seed "$seed" \
      --schedule-scale "$scale" --output-dir "$run" ${ARGS:-}; do
      status=$?
      if [ "$status" != 137 ] || [ "$attempt" -ge "$retries" ]; then exit "$status"; fi
      attempt=$((attempt + 1))
      echo "=== $(date +%T) $variant seed $seed killed (exit 137); resuming, retry $attempt of $retries"
    done
  fi
  if [ -n "$copy_to" ]; then
    dest="$copy_to/$prefix-$variant/seed_$seed"
    mkdir -p "$dest"
    cp "$run"/metrics.json "$run"/*_history.csv "$dest"/ && { cp "$run"/cluster_result.json "$dest"/ 2>/dev/null || true; }
  fi
done
[ -n "${NO_TABLE:-}" ] || "$python" -m keras_cwsn.report "$out"/"$prefix"-*
