"""Benchmark PairwiseKLLoss and PairwiseMCLLoss fwd+bwd against the floor and a naive all-pairs KL.

Run by hand (never a timed test):

    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_loss.py            # with and without XLA
    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_loss.py --xla --repeats 20

Each variant computes a scalar loss and its gradient w.r.t. the (N, K) logits under
`tf.GradientTape`, inside one `tf.function` (jit_compile as selected):

- ours:  `PairwiseKLLoss()(labels, logits)`: labels -> (N, N) similarity, log_softmax, one
  (N, K) x (K, N) product, hinge over (N, N); the backward pass is one (N, N) x (N, K) product.
- floor: the work no implementation can skip: an N x K x N matrix product (target side
  stop-gradiented, as in ours) plus one elementwise pass over (N, N), fwd+bwd.
- naive: KL through a materialised (N, N, K) tensor, then the same hinge (skipped where that
  tensor would exceed --naive-limit-gb).
- mcl: `PairwiseMCLLoss()(labels, logits)`, the second criterion: softmax, one (N, K) x (K, N)
  product P P^T, clamp, one log over (N, N); both sides carry gradient, so its backward pass is two
  (N, N) x (N, K) products. Reported beside ours, against the same floor.

DESIGN.md's goal: ours within 1.5x of the floor at (1024, 34) and (128, 4096), at least 5x
faster than naive. Times are the median over --repeats calls after --warmup calls, in microseconds.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_cwsn.optional import set_tensorflow_environment  # noqa: E402

set_tensorflow_environment()  # oneDNN on, as train.py has it

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from loss_variants import floor_loss, mcl_loss, naive_loss, ours_loss  # noqa: E402

SIZES = ((128, 10), (1024, 34), (128, 4096), (1024, 4096))


def fwd_bwd(loss_fn, jit_compile):
    @tf.function(jit_compile=jit_compile)
    def step(labels, logits):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            value = loss_fn(labels, logits)
        return value, tape.gradient(value, logits)

    return step


def check_agreement(jit_compile, n=16, k=8, seed=0):
    """Ours and naive give the same value and gradient (else the comparison means nothing)."""
    rng = np.random.default_rng(seed)
    logits = tf.constant(rng.standard_normal((n, k)).astype(np.float32) * 3.0)
    labels = tf.constant(rng.integers(0, 3, size=n).astype(np.int32))
    ours_value, ours_grad = fwd_bwd(ours_loss(), jit_compile)(labels, logits)
    naive_value, naive_grad = fwd_bwd(naive_loss, jit_compile)(labels, logits)
    np.testing.assert_allclose(ours_value.numpy(), naive_value.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours_grad.numpy(), naive_grad.numpy(), rtol=1e-3, atol=1e-6)


def time_us(step, labels, logits, warmup, repeats):
    """Median wall time of one call in microseconds, results pulled to the host each call."""
    for _ in range(warmup):
        value, grad = step(labels, logits)
        value.numpy(), grad.numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value, grad = step(labels, logits)
        value.numpy(), grad.numpy()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def run(sizes=SIZES, xla_modes=(False, True), repeats=10, warmup=3, naive_limit_gb=2.0, seed=0):
    """Time every (N, K) in every XLA mode; returns a list of row dicts (and prints nothing)."""
    rng = np.random.default_rng(seed)
    rows = []
    for jit in xla_modes:
        check_agreement(jit)
        for n, k in sizes:
            logits = tf.constant(rng.standard_normal((n, k)).astype(np.float32) * 3.0)
            labels = tf.constant(rng.integers(0, min(k, 10), size=n).astype(np.int32))
            ours = time_us(fwd_bwd(ours_loss(), jit), labels, logits, warmup, repeats)
            floor = time_us(fwd_bwd(floor_loss, jit), labels, logits, warmup, repeats)
            mcl = time_us(fwd_bwd(mcl_loss(), jit), labels, logits, warmup, repeats)
            naive_gb = n * n * k * 4 / 1e9
            naive = None
            if naive_gb <= naive_limit_gb:
                naive = time_us(fwd_bwd(naive_loss, jit), labels, logits, warmup, max(3, repeats // 2))
            rows.append({"xla": jit, "N": n, "K": k, "ours_us": ours, "floor_us": floor,
                         "ratio": ours / floor, "naive_us": naive,
                         "speedup": None if naive is None else naive / ours, "naive_gb": naive_gb,
                         "mcl_us": mcl, "mcl_ratio": mcl / floor})
    return rows


def format_table(rows):
    header = f"{'xla':>5} {'N':>6} {'K':>6} {'ours (us)':>11} {'floor (us)':>11} {'ratio':>6} " \
             f"{'naive (us)':>12} {'speed-up vs naive':>18} {'mcl (us)':>10} {'mcl ratio':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        naive = f"{r['naive_us']:12.0f}" if r["naive_us"] is not None else f"{'skipped':>12}"
        speedup = f"{r['speedup']:17.1f}x" if r["speedup"] is not None else \
            f"{'(N*N*K=' + format(r['naive_gb'], '.0f') + ' GB)':>18}"
        lines.append(f"{'on' if r['xla'] else 'off':>5} {r['N']:>6} {r['K']:>6} {r['ours_us']:11.0f} "
                     f"{r['floor_us']:11.0f} {r['ratio']:6.2f} {naive} {speedup} {r['mcl_us']:10.0f} "
                     f"{r['mcl_ratio']:9.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case (median). Default 10.")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first. Default 3.")
    parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=None,
                        help="--xla: jit_compile=True only; --no-xla: False only; default: both.")
    parser.add_argument("--naive-limit-gb", type=float, default=2.0,
                        help="skip naive where the (N, N, K) float32 tensor exceeds this. Default 2.")
    parser.add_argument("--sizes", default=None,
                        help='comma-separated NxK list, e.g. "128x10,1024x34". Default: the four DESIGN sizes.')
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    sizes = SIZES
    if args.sizes:
        sizes = tuple(tuple(int(v) for v in item.lower().split("x")) for item in args.sizes.split(","))
    xla_modes = (False, True) if args.xla is None else (args.xla,)
    devices = [d.device_type for d in tf.config.list_logical_devices()]
    print(f"TensorFlow {tf.__version__}, devices {devices}, intra-op threads "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()}, "
          f"median of {args.repeats} after {args.warmup} warm-up calls, fwd+bwd w.r.t. logits")
    rows = run(sizes, xla_modes, args.repeats, args.warmup, args.naive_limit_gb)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
