#!/usr/bin/env bash
# The CIFAR-10 / LeNet reproduction of docs/RESULTS.md: every variant x seed with one shortened
# schedule, skipping runs that already finished (and resuming an interrupted one), then the table.
#   [TAG=s6] scripts/reproduce_cifar10.sh DATA_DIR [OUT_DIR] [SCHEDULE_SCALE] [SEEDS]   (TAG names the run folders)
# DATA_DIR holds train/<class>/*.jpg (unpack ../shared/data/cifar10/cifar10-train-jpg.tar.gz).
set -uo pipefail
data_dir=${1:?usage: $0 DATA_DIR [OUT_DIR] [SCHEDULE_SCALE] [SEEDS]}
out=${2:-runs}
scale=${3:-0.0632}   # 6 of the paper's 95 epochs per phase
seeds=${4:-"0 1 2"}
tag=${TAG:-s6}
data_dir=$(realpath "$data_dir"); out=$(realpath -m "$out")   # absolute: the script changes folder
cd "$(dirname "$0")/.."
for seed in $seeds; do
  for variant in ce A B C D; do
    run="$out/cifar10-lenet-$tag-$variant/seed_$seed"
    [ -f "$run/metrics.json" ] && continue
    echo "=== $(date +%T) $variant seed $seed"
    python train.py --dataset cifar10 --data-dir "$data_dir" --variant "$variant" --seed "$seed" \
      --schedule-scale "$scale" --output-dir "$run" --quiet || exit $?
  done
done
python -m keras_cwsn.report "$out"/cifar10-lenet-"$tag"-*
