#!/usr/bin/env bash
# The CIFAR-10 / LeNet reproduction of docs/RESULTS.md: every variant x seed with one schedule,
# skipping runs that already finished (and resuming an interrupted one), then the table.
#   [TAG=s6] [RUNS="C:0 A:0 ce:0 ..."] [COPY_TO=results] [ARGS="--criterion mcl"] \
#     scripts/reproduce_cifar10.sh DATA_DIR [OUT_DIR] [SCHEDULE_SCALE] [SEEDS]
# DATA_DIR holds train/<class>/*.jpg (unpack ../shared/data/cifar10/cifar10-train-jpg.tar.gz).
# RUNS sets the order (variant:seed pairs; default every variant for each seed of SEEDS); COPY_TO
# receives each finished run's small files (metrics.json, cluster_result.json, histories); ARGS are
# more train.py flags for every run (give the runs their own TAG).
set -uo pipefail
data_dir=${1:?usage: $0 DATA_DIR [OUT_DIR] [SCHEDULE_SCALE] [SEEDS]}
out=${2:-runs}
scale=${3:-0.0632}   # 6 of the paper's 95 epochs per phase; 1.0 is the paper's schedule
seeds=${4:-"0 1 2"}
tag=${TAG:-s6}
runs=${RUNS:-$(for s in $seeds; do for v in ce A B C D; do printf '%s:%s ' "$v" "$s"; done; done)}
data_dir=$(realpath "$data_dir"); out=$(realpath -m "$out")   # absolute: the script changes folder
copy_to=${COPY_TO:+$(realpath -m "$COPY_TO")}
cd "$(dirname "$0")/.."
for pair in $runs; do
  variant=${pair%%:*}; seed=${pair##*:}
  run="$out/cifar10-lenet-$tag-$variant/seed_$seed"
  if [ ! -f "$run/metrics.json" ]; then
    echo "=== $(date +%T) $variant seed $seed"
    python train.py --dataset cifar10 --data-dir "$data_dir" --variant "$variant" --seed "$seed" \
      --schedule-scale "$scale" --output-dir "$run" ${ARGS:-} || exit $?
  fi
  if [ -n "$copy_to" ]; then
    dest="$copy_to/cifar10-lenet-$tag-$variant/seed_$seed"
    mkdir -p "$dest"
    cp "$run"/metrics.json "$run"/*_history.csv "$dest"/ && { cp "$run"/cluster_result.json "$dest"/ 2>/dev/null || true; }
  fi
done
python -m keras_cwsn.report "$out"/cifar10-lenet-"$tag"-*
