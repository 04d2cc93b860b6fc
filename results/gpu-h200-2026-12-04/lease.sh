#!/usr/bin/env bash
# One GPU lease: the seeds-together benchmark, the bird table (cub42, 5 settings x 3 seeds), then
# CIFAR-10 Table 3 (5 x 5 seeds, official test split), each sized to its share of the call.
# usage: bash carry/lease.sh OUT   (env: END seconds for everything, BENCH_S, BIRDS_S, BENCH_ARGS,
#        BIRD_ARCHIVE, CIFAR_ARCHIVES, BIRD_RUNS, CIFAR_RUNS, EXTRA for every train.py)
set -uo pipefail
out=$1; start=$(date +%s); end=$((start + ${END:-560}))
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -z "${SKIP_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site:$PWD
else export PYTHONPATH=$PWD; fi
w=/tmp/cwsn; [ -d /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2{print $4}')" -gt 30000000 ] && w=/dev/shm/cwsn
mkdir -p $w
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 KERAS_CWSN_CACHE=$w/cache JAX_COMPILATION_CACHE_DIR=$w/jaxcache
{ date -u; echo "work $w"; nproc; free -g | head -2; nvidia-smi 2>&1 | head -15
  "$python" -c "import keras, jax; print('keras', keras.__version__, 'jax', jax.__version__, jax.devices())"; } > $out/machine.txt 2>&1
t() { echo "[lease] $* at $(( $(date +%s) - start )) s"; }
bird_archive=${BIRD_ARCHIVE:-carry/cub42-jpg.tar.gz}
cifar_archives=${CIFAR_ARCHIVES:-"carry/cifar10-train-jpg.tar.gz carry/cifar10-test-jpg.tar.gz"}
cifar_flags=(); for a in $cifar_archives; do cifar_flags+=(--archive "$a"); done
( t data start
  "$python" scripts/gpu_reproduce.py --dataset cub42 --archive "$bird_archive" --data-dir $w/cub --out $w/birds --prepare-only
  t birds decoded
  "$python" scripts/gpu_reproduce.py --dataset cifar10 "${cifar_flags[@]}" --data-dir $w/cifar --out $w/cifar10 --prepare-only
  t cifar decoded ) > $out/data.txt 2>&1 &
data_pid=$!
( t bench start; timeout ${BENCH_S:-150} "$python" bench/bench_seeds_together.py ${BENCH_ARGS:---train-size 4000 --epochs 3 --memory}
  echo "bench exit $?"; t bench end ) > $out/bench.txt 2>&1
wait $data_pid
( t birds start; "$python" scripts/gpu_reproduce.py --dataset cub42 --data-dir $w/cub --out $w/birds \
    --runs ${BIRD_RUNS:-ce:0,ce:1,ce:2,A:0,A:1,A:2,B:0,B:1,B:2,C:0,C:1,C:2,D:0,D:1,D:2} --budget-seconds ${BIRDS_S:-230} \
    --collect $out/birds.tar.gz -- --set metrics_every=2 --set alexnet_bn=true ${EXTRA:-}; echo "birds exit $?"; t birds end ) > $out/birds.txt 2>&1
cifar_s=$(( end - $(date +%s) - 10 ))
( t cifar start "budget $cifar_s"; "$python" scripts/gpu_reproduce.py --dataset cifar10 --data-dir $w/cifar --out $w/cifar10 \
    --runs ${CIFAR_RUNS:-$(for v in ce A B C D; do for s in 0 1 2 3 4; do printf '%s:%s,' $v $s; done; done)} \
    --budget-seconds $cifar_s --collect $out/cifar.tar.gz ${EXTRA:+-- $EXTRA}; echo "cifar exit $?"; t cifar end ) > $out/cifar.txt 2>&1
(cd $w && find birds cifar10 -name train.log -print0 | tar -czf $out/logs.tar.gz --null -T -)
cat $out/bench.txt $out/birds.txt $out/cifar.txt
