#!/usr/bin/env bash
# One device-machine call: the GPU speed check, then one dataset's runs sized to what time is left.
#
# The lent GPU machines have JAX but no TensorFlow or Keras, start bare, allow one command 10
# minutes and return at most 8 files, so everything a session needs is in this one script:
#   1. install the carried wheels (.whl/: keras, namex, optree; README "On JAX");
#   2. unpack the carried archive(s) of DATASET and decode them into the shared cache, on the CPU, while
#      bench/gpu_check.py has the GPU to itself (capped at CHECK_SECONDS);
#   3. scripts/gpu_reproduce.py: RUNS at once, one process per variant whose seeds train together in
#      one compiled program (train.py --seeds; TRAIN_ARGS can't undo that, SEPARATE=1 does), epochs
#      per phase sized to BUDGET seconds; its summary has one line per run. The default RUNS is the
#      paper's Table 3 with 5 seeds per setting.
# Settings (environment): DATASET (default cifar10; cub42 for the birds), ARCHIVE (space-separated
# .tar.gz files; default the dataset's archives under carry/: cifar10-train-jpg.tar.gz, cub42-jpg.tar.gz;
# add carry/cifar10-test-jpg.tar.gz for the official CIFAR-10 test split), RUNS, SEPARATE, BUDGET
# (s for step 3), CHECK_SECONDS, CHECK_ARGS (gpu_check.py flags), MAX_EPOCHS, TRAIN_ARGS (flags for
# every train.py, e.g. "--set alexnet_bn=true" for the birds), WHEELS (default .whl), WORK, PYTHON.
# What comes back (OUT): gpu_check.txt, reproduce.txt, results.tar.gz (every run's small files
# and plan.json), logs.tar.gz (every run's train.log), machine.txt.
#
#   bash scripts/gpu_session.sh "$OUT"                       # on the device machine
#   RUNS=A:0,ce:0 BUDGET=200 CHECK_ARGS="--steps 3 ..." TRAIN_ARGS="--batch-size 8" ARCHIVE=tiny.tar.gz \
#     bash scripts/gpu_session.sh /tmp/out                  # a dry run here (TRAIN_ARGS go to every train.py)
set -uo pipefail
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
out=$(realpath "$out")
cd "$(dirname "$0")/.."
work=${WORK:-/tmp/cwsn-gpu}
runs=${RUNS:-$(for v in ce A B C D; do for s in 0 1 2 3 4; do printf '%s:%s,' "$v" "$s"; done; done)}
budget=${BUDGET:-400}
check_seconds=${CHECK_SECONDS:-130}
dataset=${DATASET:-cifar10}
python=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    || { echo "error: cannot install the carried wheels in $wheels/" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONUNBUFFERED=1 KERAS_CWSN_CACHE=$work/cache
# the archives: ARCHIVE, else the dataset's defaults as gpu_reproduce.py names them; all checked before the GPU is used
default_archives=$("$python" -c "import sys; sys.path.insert(0, 'scripts'); import gpu_reproduce
print(' '.join(gpu_reproduce.default_archives(sys.argv[1])))" "$dataset") || exit 2
archive_flags=()
for a in ${ARCHIVE:-$default_archives}; do
  [ -f "$a" ] || { echo "error: $a: no such file (copy its archive from ../shared/data/ to carry/ and carry it)" >&2; exit 2; }
  archive_flags+=(--archive "$a")
done
[ ${#archive_flags[@]} -gt 0 ] || { echo "error: DATASET=$dataset has no default archive: name it with ARCHIVE" >&2; exit 2; }

{ date -u; nproc; if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1 | head -15; else echo "no nvidia-smi"; fi
  "$python" -c "import keras; print('keras', keras.__version__, 'backend', keras.backend.backend())
if keras.backend.backend() == 'jax':
    import jax; print('jax', jax.__version__, jax.devices())"; } > "$out/machine.txt" 2>&1

# 2. data on the CPU while the GPU check runs alone on the GPU
"$python" scripts/gpu_reproduce.py --dataset "$dataset" "${archive_flags[@]}" --data-dir "$work/data" --out "$work/runs" --prepare-only \
  > "$out/data.txt" 2>&1 &
data_pid=$!
start=$(date +%s)
timeout "$check_seconds" "$python" bench/gpu_check.py ${CHECK_ARGS:-} > "$out/gpu_check.txt" 2>&1
echo "gpu_check exit $? after $(( $(date +%s) - start )) s" >> "$out/gpu_check.txt"
wait "$data_pid" || { echo "error: the $dataset archive(s) did not unpack or decode; see data.txt" >&2; cat "$out/data.txt" >&2; exit 2; }

# 3. the runs
"$python" scripts/gpu_reproduce.py --dataset "$dataset" "${archive_flags[@]}" --data-dir "$work/data" --out "$work/runs" --runs "$runs" \
  --budget-seconds "$budget" ${MAX_EPOCHS:+--max-epochs $MAX_EPOCHS} ${SEPARATE:+--separate-seeds} --collect "$out/results.tar.gz" ${TRAIN_ARGS:+-- $TRAIN_ARGS} > "$out/reproduce.txt" 2>&1
status=$?
(cd "$work/runs" && find . -name train.log -print0 | tar -czf "$out/logs.tar.gz" --null -T -)
cat "$out/gpu_check.txt" "$out/reproduce.txt"
exit $status
