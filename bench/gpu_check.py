"""GPU check without TensorFlow: training images/second of LeNet and AlexNet (variant D and ce), and the loss floor.

Meant for a machine with a GPU and JAX but no TensorFlow:

    KERAS_BACKEND=jax python bench/gpu_check.py
    KERAS_BACKEND=jax python bench/gpu_check.py --precision float32,mixed_bfloat16

and runs unchanged with the TensorFlow backend (the default) on a CPU, with tiny sizes:

    python bench/gpu_check.py --steps 3 --lenet-batch 16 --alexnet-batch 8 --loss-sizes 128x10 --repeats 3

For each network (LeNet 32x32 at --lenet-batch, AlexNet 224x224 at --alexnet-batch) and each of
variant D and `ce`, two figures, each next to the `ce` figure measured the same way in the same
process:

- step: `Model.train_step` compiled once (`jax.jit(model.train_step)` with the training state
  threaded through, as `fit` does on JAX; `tf.function` on TensorFlow, with XLA where --xla says)
  on one batch already on the device, --steps calls after --warmup.
- fit: `model.fit` on NumPy arrays of --steps batches: the second epoch (the first compiles).

Then the loss table: `PairwiseKLLoss` forward+backward vs its floor (one N x K x N product plus one
elementwise pass) vs a naive (N, N, K) version, the same three functions as bench/bench_loss.py,
written here in keras.ops with a backend-neutral gradient (bench_loss.py imports TensorFlow).

Only keras, numpy, keras_cwsn.losses and keras_cwsn.models are imported on the JAX path; the
TensorFlow backend imports TensorFlow lazily. Data are random: this measures speed, not accuracy.
"""

import argparse
import statistics
import sys
import time


import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from keras_cwsn.losses import PairwiseKLLoss  # noqa: E402
from keras_cwsn.training import recipe  # noqa: E402
from loss_variants import floor_loss, naive_loss, ours_loss  # noqa: E402
from keras_cwsn.models import build_model  # noqa: E402
from keras_cwsn.variants import variant_levels  # noqa: E402
from timing import EpochTimer  # noqa: E402

NUM_FINE, NUM_COARSE = 10, 2
SHAPES = {"lenet": (32, 32, 3), "alexnet": (224, 224, 3)}
LOSS_SIZES = ((128, 10), (1024, 34), (128, 4096), (1024, 4096))


# --- backend glue: the only place that knows JAX from TensorFlow ------------------------------------

def backend():
    return keras.backend.backend()


def _tf():
    import tensorflow as tf  # only on the TensorFlow backend

    return tf


def has_gpu():
    if backend() == "jax":
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    if backend() == "tensorflow":
        return bool(_tf().config.list_physical_devices("GPU"))
    return False


def device_line():
    if backend() == "jax":
        import jax

        devices = [f"{d.platform}:{getattr(d, 'device_kind', '')}" for d in jax.devices()]
        return f"Keras {keras.__version__}, backend jax {jax.__version__}, devices {devices}"
    if backend() == "tensorflow":
        tf = _tf()
        devices = [d.name for d in tf.config.list_physical_devices()]
        return f"Keras {keras.__version__}, backend tensorflow {tf.__version__}, devices {devices}"
    return f"Keras {keras.__version__}, backend {backend()}"


def resolve_xla(xla):
    """JAX always compiles with XLA; TensorFlow does where asked, and on `auto` where there is a GPU."""
    if backend() == "jax":
        return True
    return has_gpu() if xla == "auto" else xla == "on"


def to_device(tree):
    """Put NumPy arrays (nested in tuples, lists, dicts) on the default device once."""
    if backend() == "jax":
        import jax

        return jax.device_put(tree)
    return keras.tree.map_structure(ops.convert_to_tensor, tree)


def block(value):
    """Wait for a computation to finish (JAX dispatches asynchronously)."""
    if backend() == "jax":
        import jax

        return jax.block_until_ready(value)
    return keras.tree.map_structure(ops.convert_to_numpy, value)


def compiled_train_step(model, jit):
    """`run(x, y, steps) -> last loss` running the model's own `train_step` compiled, state kept on device."""
    if backend() == "jax":
        import jax

        step = jax.jit(model.train_step, donate_argnums=0)  # as `fit` compiles it on JAX
        copy = lambda variables: [jax.numpy.array(v.value, copy=True) for v in variables]  # noqa: E731 (donated)
        state = [copy(model.trainable_variables), copy(model.non_trainable_variables),
                 copy(model.optimizer.variables), copy(model.metrics_variables)]

        def run(x, y, steps):
            logs = None
            for _ in range(steps):
                logs, state[:] = step(tuple(state), (x, y))
            return block(logs["loss"])

        return run
    if backend() == "tensorflow":
        tf = _tf()
        step = tf.function(lambda x, y: model.train_step((x, y))["loss"], jit_compile=jit, reduce_retracing=True)

        def run(x, y, steps):
            loss = None
            for _ in range(steps):
                loss = step(x, y)
            return block(loss)

        return run
    raise RuntimeError(f"gpu_check needs the jax or tensorflow backend. Received: {backend()}")


def value_and_grad(loss_fn, jit):
    """Compiled `f(labels, logits) -> (loss, d loss / d logits)`."""
    if backend() == "jax":
        import jax

        return jax.jit(jax.value_and_grad(lambda logits, labels: loss_fn(labels, logits)))

    tf = _tf()

    @tf.function(jit_compile=jit)
    def step(logits, labels):
        with tf.GradientTape() as tape:
            tape.watch(logits)
            value = loss_fn(labels, logits)
        return value, tape.gradient(value, logits)

    return step


# --- models -------------------------------------------------------------------------------------------

def make_model(arch, variant, jit, seed=0):
    keras.utils.set_random_seed(seed)
    model = build_model(arch, variant, NUM_FINE, NUM_COARSE, SHAPES[arch])
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9, weight_decay=5e-4)
    return recipe.compile_model(model, variant, optimizer, jit_compile=jit, metrics=False,
                                pair_loss=lambda: PairwiseKLLoss(check_finite=False))


def make_data(arch, variant, count, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count,) + SHAPES[arch]).astype(np.float32)
    fine = rng.integers(0, NUM_FINE, size=count).astype(np.int32)
    by_level = {"fine": fine, "coarse": (fine % NUM_COARSE).astype(np.int32)}
    return x, {name: by_level[level] for name, level in variant_levels(variant).items()}


def train_rates(arch, variant, batch, steps, warmup, jit, precision="float32"):
    """(step images/s, fit images/s, last loss) of one network and variant."""
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = make_model(arch, variant, jit)
        x, y = make_data(arch, variant, batch * steps)
        model.train_on_batch(x[:batch], keras.tree.map_structure(lambda a: a[:batch], y))  # builds all state
        model.reset_metrics()  # the loss below: mean over the warm-up and timed steps
        run = compiled_train_step(model, jit)
        xb, yb = to_device((x[:batch], keras.tree.map_structure(lambda a: a[:batch], y)))
        run(xb, yb, max(1, warmup))
        start = time.perf_counter()
        loss = float(run(xb, yb, steps))
        step_ips = batch * steps / (time.perf_counter() - start)

        fit_model = make_model(arch, variant, jit)
        timer = EpochTimer()
        history = fit_model.fit(x, y, batch_size=batch, epochs=2, verbose=0, callbacks=[timer])
        fit_ips = batch * steps / timer.seconds[-1]
        fit_loss = float(history.history["loss"][-1])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return step_ips, fit_ips, loss, fit_loss


def run_training(archs, batches, variants, steps, warmup, jit, precisions=("float32",), log=print):
    rows = []
    for arch in archs:
        for precision in precisions:
            figures = {}
            for variant in variants:
                figures[variant] = train_rates(arch, variant, batches[arch], steps, warmup, jit, precision)
                step_ips, fit_ips, loss, fit_loss = figures[variant]
                log(f"[train] {arch} {variant} {precision} batch {batches[arch]}: step {step_ips:.1f} img/s, "
                    f"fit {fit_ips:.1f} img/s, loss {loss:.4f} / {fit_loss:.4f}")
                keras.backend.clear_session()
            reference = figures.get("ce", figures[variants[0]])
            for variant, (step_ips, fit_ips, loss, fit_loss) in figures.items():
                for path, ips, ref in (("jit step", step_ips, reference[0]), ("fit numpy", fit_ips, reference[1])):
                    rows.append({"arch": arch, "batch": batches[arch], "precision": precision, "variant": variant,
                                 "path": path, "ips": ips, "ce_ips": ref, "ratio": ref / ips,
                                 "loss": loss if path == "jit step" else fit_loss,
                                 "finite": bool(np.isfinite(loss) and np.isfinite(fit_loss))})
    return rows


# --- loss floor -------------------------------------------------------------------------------------

def time_us(fn, labels, logits, warmup, repeats):
    for _ in range(warmup):
        block(fn(logits, labels))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn(logits, labels))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def run_loss_table(sizes, jit, repeats, warmup, naive_limit_gb=2.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    ours_fn, floor_fn, naive_fn = (value_and_grad(f, jit) for f in (ours_loss(), floor_loss, naive_loss))
    for n, k in sizes:
        logits = to_device(rng.standard_normal((n, k)).astype(np.float32) * 3.0)
        labels = to_device(rng.integers(0, min(k, 10), size=n).astype(np.int32))
        ours = time_us(ours_fn, labels, logits, warmup, repeats)
        floor = time_us(floor_fn, labels, logits, warmup, repeats)
        naive_gb = n * n * k * 4 / 1e9
        naive = time_us(naive_fn, labels, logits, warmup, max(3, repeats // 2)) if naive_gb <= naive_limit_gb else None
        rows.append({"N": n, "K": k, "ours_us": ours, "floor_us": floor, "ratio": ours / floor, "naive_us": naive,
                     "speedup": None if naive is None else naive / ours, "naive_gb": naive_gb})
    return rows


# --- output -------------------------------------------------------------------------------------------

def format_training(rows):
    header = f"{'arch':<8} {'batch':>5} {'precision':>15} {'variant':>7} {'path':>10} {'img/s':>10} " \
             f"{'ce img/s':>10} {'time ratio':>10} {'loss':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['arch']:<8} {r['batch']:>5} {r['precision']:>15} {r['variant']:>7} {r['path']:>10} "
                     f"{r['ips']:10.1f} {r['ce_ips']:10.1f} {r['ratio']:10.2f} {r['loss']:9.4f}")
    return "\n".join(lines)


def format_loss(rows):
    header = f"{'N':>6} {'K':>6} {'ours (us)':>11} {'floor (us)':>11} {'ratio':>6} {'naive (us)':>12} " \
             f"{'speed-up vs naive':>18}"
    lines = [header, "-" * len(header)]
    for r in rows:
        naive = f"{r['naive_us']:12.0f}" if r["naive_us"] is not None else f"{'skipped':>12}"
        speedup = f"{r['speedup']:17.1f}x" if r["speedup"] is not None else \
            f"{'(N*N*K=' + format(r['naive_gb'], '.0f') + ' GB)':>18}"
        lines.append(f"{r['N']:>6} {r['K']:>6} {r['ours_us']:11.0f} {r['floor_us']:11.0f} {r['ratio']:6.2f} "
                     f"{naive} {speedup}")
    return "\n".join(lines)


def parse_sizes(text):
    try:
        return tuple(tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a list like "128x10,1024x34". Received: {text!r}') from None


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="timed training steps (and fit batches). Default 50.")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first. Default 5.")
    parser.add_argument("--lenet-batch", type=int, default=128, help="LeNet batch size. Default 128.")
    parser.add_argument("--alexnet-batch", type=int, default=128, help="AlexNet batch size. Default 128.")
    parser.add_argument("--archs", default="lenet,alexnet", help="comma-separated networks. Default lenet,alexnet.")
    parser.add_argument("--variants", default="D,ce", help="comma-separated variants. Default D,ce.")
    parser.add_argument("--precision", default="float32",
                        help="comma-separated policies among float32, mixed_bfloat16, mixed_float16. Default float32.")
    parser.add_argument("--xla", choices=("auto", "on", "off"), default="auto",
                        help="TensorFlow backend only (JAX always compiles): auto = on with a GPU. Default auto.")
    parser.add_argument("--loss-sizes", type=parse_sizes, default=LOSS_SIZES,
                        help='NxK list for the loss table, e.g. "128x10,1024x34"; "" skips it. Default: the four DESIGN sizes.')
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per loss case (median). Default 20.")
    parser.add_argument("--naive-limit-gb", type=float, default=2.0, help="skip naive above this (N, N, K) size.")
    args = parser.parse_args(argv)
    if min(args.steps, args.lenet_batch, args.alexnet_batch, args.repeats) < 1 or args.warmup < 0:
        parser.error("--steps, --lenet-batch, --alexnet-batch and --repeats must be >= 1, --warmup >= 0")
    archs = tuple(a for a in args.archs.split(",") if a)
    variants = tuple(v for v in args.variants.split(",") if v)
    precisions = tuple(p for p in args.precision.split(",") if p)
    if any(a not in SHAPES for a in archs):
        parser.error(f"--archs must name lenet and/or alexnet. Received: {args.archs}")
    jit = resolve_xla(args.xla)
    log(device_line())
    log(f"XLA: {'on' if jit else 'off'}; {args.steps} timed steps after {args.warmup} warm-up; random data")
    results = {"device": device_line(), "backend": backend(), "xla": jit}
    results["training"] = run_training(archs, {"lenet": args.lenet_batch, "alexnet": args.alexnet_batch}, variants,
                                       args.steps, args.warmup, jit, precisions, log=log)
    log("\nTraining images/second (time ratio = this variant's time per image / ce's, same path)")
    log(format_training(results["training"]))
    if args.loss_sizes:
        results["loss"] = run_loss_table(args.loss_sizes, jit, args.repeats, 3, args.naive_limit_gb)
        log(f"\nPairwiseKLLoss forward+backward vs floor vs naive (median of {args.repeats}, XLA {'on' if jit else 'off'})")
        log(format_loss(results["loss"]))
    results["tensorflow_imported"] = "tensorflow" in sys.modules
    log(f"\nTensorFlow imported: {'yes' if results['tensorflow_imported'] else 'no'}")
    return results


if __name__ == "__main__":
    main()
