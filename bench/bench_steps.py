"""Benchmark training steps: each variant vs cross-entropy, XLA on vs off, precisions, and `fit` vs the step.

Run by hand (never a timed test):

    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_steps.py                      # every table
    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_steps.py --tables steps --configs lenet16
    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_steps.py --pause-train-jobs   # SIGSTOP a background
        # `train.py --dataset cifar10` job during each timed block only, SIGCONT right after

Tables (every row: measured value, a reference measured in the same process, their ratio):

- steps: one training step (`Model.train_step` inside `tf.function`, the body `fit` runs) of
  variants A-D vs the `ce` classifier step on the same network and batch (LeNet at batch 16 and
  128, AlexNet at batch 32), with XLA off and on. Reference: the `ce` step. DESIGN.md goal: D <= 1.10x.
  Row `D/xent` is D's network with cross-entropy in place of the pairwise losses: D / (D/xent) is
  what the pairwise losses cost, (D/xent) / ce what D's side branch (a second fc1) costs.
- xla: the same steps with XLA (`jit_compile=True`) vs without. Reference: without.
- precision: float32, mixed_bfloat16 and mixed_float16 steps (policy restored to float32 after),
  with the loss checked finite at every timed step. Reference: float32.
- fit: steady-state images/second of whole epochs of `model.fit` on in-memory data (a tf.data
  pipeline from arrays, and NumPy arrays) for several `steps_per_execution`, vs the images/second
  of the step alone, timed in pairs (a block of step-alone steps right before each epoch; the
  ratio is the median of the per-pair ratios). Goal: < 5% lost to the loop.

Variants are timed interleaved (one block of each in turn, per round), so background load hits
them alike; each figure is the median over rounds after warm-up. `ratio` is the ratio of the
medians; `paired` the median of the per-round ratios (steadier when the load drifts). Models are compiled without
metrics (loss only) and with the protocol's optimizer (SGD, momentum 0.9, weight decay 5e-4).
"""

import argparse
import contextlib
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_cwsn.optional import set_tensorflow_environment  # noqa: E402

set_tensorflow_environment()  # oneDNN on, as train.py has it

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_cwsn.models import build_model  # noqa: E402
from keras_cwsn.variants import VARIANTS, variant_levels  # noqa: E402
from keras_cwsn.training import recipe  # noqa: E402
from pause import PauseJobs  # noqa: E402  (bench_pipeline imports it from here too)
from timing import EpochTimer  # noqa: E402

NUM_FINE, NUM_COARSE = 10, 2
# name -> (arch, batch size, input shape)
CONFIGS = {
    "lenet16": ("lenet", 16, (32, 32, 3)),
    "lenet128": ("lenet", 128, (32, 32, 3)),
    "alexnet32": ("alexnet", 32, (224, 224, 3)),
}
# "D/xent": variant D's network and loss weights with sparse cross-entropy in place of every pairwise
# loss: it splits D's extra cost over ce into the network's (the fc1_side branch) and the losses'.
DECOMPOSITION = "D/xent"
STEP_VARIANTS = ("ce",) + tuple(VARIANTS) + (DECOMPOSITION,)
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
TABLES = ("steps", "xla", "precision", "fit")


# --- pausing a background training job during timed blocks only -----------------------------------

# --- models and steps ----------------------------------------------------------------------------------

def optimizer():
    return keras.optimizers.SGD(learning_rate=0.01, momentum=0.9, weight_decay=5e-4)


def compile_model(model, variant, jit_compile=False, steps_per_execution=1):
    """The protocol's compile recipe without metrics; the decomposition puts cross-entropy on D's taps."""
    pair_loss = (lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True)) if variant == DECOMPOSITION else None
    return recipe.compile_model(model, network_of(variant), optimizer(), jit_compile=jit_compile,
                                steps_per_execution=steps_per_execution, pair_loss=pair_loss, metrics=False)


def network_of(variant):
    return "D" if variant == DECOMPOSITION else variant


def make_model(arch, variant, input_shape, seed=0, jit_compile=False, steps_per_execution=1):
    keras.utils.set_random_seed(seed)
    model = build_model(arch, network_of(variant), NUM_FINE, NUM_COARSE, input_shape)
    return compile_model(model, variant, jit_compile, steps_per_execution)


def make_batch(batch, input_shape, variant, seed=0, count=None):
    """Random images (N, H, W, 3) float32 and the label dict a variant's model was compiled with."""
    rng = np.random.default_rng(seed)
    n = count or batch
    x = rng.standard_normal((n,) + tuple(input_shape)).astype(np.float32)
    fine = rng.integers(0, NUM_FINE, size=n).astype(np.int32)
    coarse = (fine % NUM_COARSE).astype(np.int32)
    by_level = {"fine": fine, "coarse": coarse}
    return x, {name: by_level[level] for name, level in variant_levels(network_of(variant)).items()}


def step_function(model, jit_compile):
    """One training step as `fit` runs it (`Model.train_step`), compiled as one `tf.function`."""

    @tf.function(jit_compile=jit_compile, reduce_retracing=True)
    def step(x, y):
        return model.train_step((x, y))["loss"]

    return step


class StepCase:
    """A model, a batch on the device and its compiled step, ready to time."""

    def __init__(self, arch, variant, batch, input_shape, jit_compile=False, precision="float32", seed=0):
        self.variant, self.jit, self.precision = variant, jit_compile, precision
        self.batch = batch
        previous = keras.mixed_precision.global_policy().name
        keras.mixed_precision.set_global_policy(precision)
        try:
            self.model = make_model(arch, variant, input_shape, seed)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        x, y = make_batch(batch, input_shape, variant, seed)
        self.model.train_on_batch(x, y)  # builds optimizer and loss state outside the traced step
        self.x = tf.constant(x)
        self.y = {k: tf.constant(v) for k, v in y.items()}
        self.step = step_function(self.model, jit_compile)
        self.losses = []

    def run(self, steps):
        loss = None
        for _ in range(steps):
            loss = self.step(self.x, self.y)
        value = float(loss.numpy())  # waits for the device
        self.losses.append(value)
        return value


def time_cases(cases, rounds, steps_per_block, warmup=2, pause=None):
    """Seconds per step of each case, timed interleaved: rounds x (one block of each case).

    Returns one list per case (one value per round); take the median.
    """
    for case in cases:
        for _ in range(warmup):
            case.run(steps_per_block)
    times = [[] for _ in cases]
    with PauseJobs(pause):
        for _ in range(rounds):
            for case, case_times in zip(cases, times):
                start = time.perf_counter()
                case.run(steps_per_block)
                case_times.append((time.perf_counter() - start) / steps_per_block)
    return times


def median_ratio(times, reference):
    """Median over rounds of the per-round ratio (robust to load that drifts between rounds)."""
    return statistics.median(t / r for t, r in zip(times, reference))


def warmup(arch):
    """Warm-up blocks before timing: two for LeNet, one (AlexNet) step."""
    return 1 if arch == "alexnet" else 2


def block_steps(arch, batch):
    """Steps per timed block: about 50-100 ms for LeNet, one step for AlexNet."""
    if arch == "alexnet":
        return 1
    return max(1, 320 // batch)


# --- tables ------------------------------------------------------------------------------------------------

def run_steps(configs, xla_modes, rounds, alexnet_rounds, pause=None, variants=STEP_VARIANTS, log=print):
    """Step time of every variant (and ce) per config and XLA mode; returns row dicts."""
    rows = []
    for name in configs:
        arch, batch, shape = CONFIGS[name]
        for jit in xla_modes:
            t0 = time.perf_counter()
            cases = [StepCase(arch, v, batch, shape, jit_compile=jit) for v in variants]
            n_rounds = alexnet_rounds if arch == "alexnet" else rounds
            times = time_cases(cases, n_rounds, block_steps(arch, batch), warmup=warmup(arch), pause=pause)
            seconds = [statistics.median(t) for t in times]
            ce_times = times[variants.index("ce")]
            ce = statistics.median(ce_times)
            for case, s, t in zip(cases, seconds, times):
                rows.append({"config": name, "arch": arch, "batch": batch, "xla": jit, "variant": case.variant,
                             "step_ms": s * 1e3, "ce_ms": ce * 1e3, "ratio": s / ce, "paired": median_ratio(t, ce_times),
                             "rounds": n_rounds, "finite": bool(np.all(np.isfinite(case.losses)))})
            log(f"[steps] {name} xla={'on' if jit else 'off'}: "
                + ", ".join(f"{c.variant} {s * 1e3:.1f} ms" for c, s in zip(cases, seconds))
                + f" ({time.perf_counter() - t0:.0f} s)")
            del cases
            keras.backend.clear_session()
    return rows


def xla_rows(step_rows):
    """XLA on vs off for the same (config, variant), from the steps table."""
    index = {(r["config"], r["variant"], r["xla"]): r for r in step_rows}
    rows = []
    for (config, variant, jit), r in index.items():
        off = index.get((config, variant, False))
        if jit and off is not None:
            rows.append({"config": config, "variant": variant, "on_ms": r["step_ms"], "off_ms": off["step_ms"],
                         "ratio": r["step_ms"] / off["step_ms"]})
    return rows


def run_precision(configs, variants, rounds, alexnet_rounds, pause=None, log=print):
    """float32 vs mixed_bfloat16 vs mixed_float16 steps (XLA off), loss checked finite; returns row dicts."""
    rows = []
    for name in configs:
        arch, batch, shape = CONFIGS[name]
        t0 = time.perf_counter()
        cases = [StepCase(arch, v, batch, shape, precision=p) for v in variants for p in PRECISIONS]
        n_rounds = alexnet_rounds if arch == "alexnet" else rounds
        times = time_cases(cases, n_rounds, block_steps(arch, batch), warmup=warmup(arch), pause=pause)
        seconds = [statistics.median(t) for t in times]
        reference = {c.variant: (s, t) for c, s, t in zip(cases, seconds, times) if c.precision == "float32"}
        for case, s, t in zip(cases, seconds, times):
            f32, f32_times = reference[case.variant]
            rows.append({"config": name, "variant": case.variant, "precision": case.precision, "step_ms": s * 1e3,
                         "f32_ms": f32 * 1e3, "ratio": s / f32, "paired": median_ratio(t, f32_times),
                         "loss": case.losses[-1], "finite": bool(np.all(np.isfinite(case.losses)))})
        log(f"[precision] {name}: " + ", ".join(f"{c.variant}/{c.precision} {s * 1e3:.1f} ms"
                                                 for c, s in zip(cases, seconds))
            + f" ({time.perf_counter() - t0:.0f} s)")
        del cases
        keras.backend.clear_session()
    return rows


def fit_epoch_seconds(model, data, batch):
    """Wall time of one `fit` epoch (from the epoch's start to its end callback)."""
    x, y = data
    timer = EpochTimer()
    if isinstance(x, tf.data.Dataset):
        model.fit(x, epochs=1, verbose=0, callbacks=[timer])
    else:
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[timer])
    return timer.seconds[-1]


def run_fit(configs, variant, spe_values, epoch_images, epochs, pause=None, sources=("tf.data", "numpy"),
            reference_images=2048, log=print):
    """`fit` images/second per steps_per_execution and input kind vs the step alone (XLA off); row dicts.

    Paired rounds: in each of `epochs` rounds, for every (steps_per_execution, input) in turn, first
    `reference_images` images' worth of steps of the step alone, then one `fit` epoch; the ratio is taken per round
    (median over rounds), so both halves of a ratio see the same background load.
    """
    rows = []
    for name in configs:
        arch, batch, shape = CONFIGS[name]
        num = (epoch_images // batch) * batch
        x, y = make_batch(batch, shape, variant, seed=1, count=num)
        case = StepCase(arch, variant, batch, shape)
        reference_steps = max(1, reference_images // batch)
        for _ in range(warmup(arch)):
            case.run(block_steps(arch, batch))
        setups = []
        for spe in spe_values:
            for source in sources:
                model = make_model(arch, variant, shape, steps_per_execution=spe)
                if source == "tf.data":
                    data = (tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)
                            .prefetch(tf.data.AUTOTUNE), None)
                else:
                    data = (x, y)
                fit_epoch_seconds(model, data, batch)  # traces and warms up
                setups.append((spe, source, model, data, [], []))
        for _ in range(epochs):
            with PauseJobs(pause):
                for spe, source, model, data, step_rates, fit_rates in setups:
                    start = time.perf_counter()
                    case.run(reference_steps)
                    step_rates.append(batch * reference_steps / (time.perf_counter() - start))
                    fit_rates.append(num / fit_epoch_seconds(model, data, batch))
        for spe, source, model, data, step_rates, fit_rates in setups:
            ratio = statistics.median(f / s for f, s in zip(fit_rates, step_rates))
            rows.append({"config": name, "variant": variant, "spe": spe, "source": source,
                         "fit_ips": statistics.median(fit_rates), "step_ips": statistics.median(step_rates),
                         "ratio": ratio, "lost_pct": 100 * (1 - ratio), "epoch_images": num, "rounds": epochs})
            log(f"[fit] {name} {variant} steps_per_execution={spe} {source}: {statistics.median(fit_rates):.0f} img/s "
                f"(step alone {statistics.median(step_rates):.0f} img/s, paired ratio {ratio:.3f})")
        del setups, case
        keras.backend.clear_session()
    return rows


def format_steps(rows):
    header = f"{'config':<10} {'xla':>4} {'variant':>7} {'step (ms)':>10} {'ce step (ms)':>13} {'ratio':>6} " \
             f"{'paired':>7} {'goal <=1.10':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        goal = ""
        if r["variant"] == "D":
            goal = "met" if r["ratio"] <= 1.10 else "MISSED"
        lines.append(f"{r['config']:<10} {'on' if r['xla'] else 'off':>4} {r['variant']:>7} {r['step_ms']:10.2f} "
                     f"{r['ce_ms']:13.2f} {r['ratio']:6.2f} {r['paired']:7.2f} {goal:>11}")
    return "\n".join(lines)


def format_xla(rows):
    header = f"{'config':<10} {'variant':>7} {'xla on (ms)':>12} {'xla off (ms)':>13} {'ratio':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['config']:<10} {r['variant']:>7} {r['on_ms']:12.2f} {r['off_ms']:13.2f} {r['ratio']:6.2f}")
    return "\n".join(lines)


def format_precision(rows):
    header = f"{'config':<10} {'variant':>7} {'precision':>15} {'step (ms)':>10} {'float32 (ms)':>13} {'ratio':>6} " \
             f"{'paired':>7} {'mean loss':>10} {'finite':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['config']:<10} {r['variant']:>7} {r['precision']:>15} {r['step_ms']:10.2f} "
                     f"{r['f32_ms']:13.2f} {r['ratio']:6.2f} {r['paired']:7.2f} {r['loss']:10.4f} "
                     f"{'yes' if r['finite'] else 'NO':>7}")
    return "\n".join(lines)


def format_fit(rows):
    header = f"{'config':<10} {'variant':>7} {'spe':>4} {'input':>8} {'fit (img/s)':>12} {'step alone (img/s)':>19} " \
             f"{'paired ratio':>12} {'lost':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['config']:<10} {r['variant']:>7} {r['spe']:>4} {r['source']:>8} {r['fit_ips']:12.0f} "
                     f"{r['step_ips']:19.0f} {r['ratio']:12.3f} {r['lost_pct']:6.1f}%")
    return "\n".join(lines)


def machine_line():
    model_name = "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    devices = [d.device_type for d in tf.config.list_logical_devices()]
    return (f"{model_name}, {os.cpu_count()} cores, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
            f"devices {devices}, load average {os.getloadavg()[0]:.1f}")


def run(tables=TABLES, configs=tuple(CONFIGS), xla_modes=(False, True), rounds=15, alexnet_rounds=3,
        fit_configs=("lenet16",), fit_variant="D", spe_values=(1, 4, 16, 64), epoch_images=8192, fit_epochs=3,
        precision_configs=("lenet128",), precision_variants=("D", "ce"), pause=None, variants=STEP_VARIANTS, log=print):
    """Every requested table as row dicts (a `run(args)` that returns its figures, for tests and docs)."""
    results = {}
    if "steps" in tables or "xla" in tables:
        results["steps"] = run_steps(configs, xla_modes, rounds, alexnet_rounds, pause=pause, variants=variants, log=log)
        results["xla"] = xla_rows(results["steps"])
    if "precision" in tables:
        results["precision"] = run_precision(precision_configs, precision_variants, rounds, alexnet_rounds,
                                             pause=pause, log=log)
    if "fit" in tables:
        results["fit"] = run_fit(fit_configs, fit_variant, spe_values, epoch_images, fit_epochs, pause=pause, log=log)
    return results


def _names(text, allowed, what):
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; expected a comma-separated subset of {list(allowed)}")
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", default=",".join(TABLES), type=lambda s: _names(s, TABLES, "table"),
                        help=f"comma-separated subset of {','.join(TABLES)}. Default: all.")
    parser.add_argument("--configs", default="lenet16,lenet128,alexnet32",
                        type=lambda s: _names(s, CONFIGS, "config"), help="step-table configs. Default: all three.")
    parser.add_argument("--variants", default=",".join(STEP_VARIANTS),
                        type=lambda s: _names(s, STEP_VARIANTS, "variant"),
                        help="step-table variants (must include ce, the reference). Default: all.")
    parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=None,
                        help="--xla: XLA only; --no-xla: without only; default: both.")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds for LeNet (median). Default 15.")
    parser.add_argument("--alexnet-rounds", type=int, default=3, help="timed rounds for AlexNet. Default 3.")
    parser.add_argument("--precision-configs", default="lenet128", type=lambda s: _names(s, CONFIGS, "config"),
                        help="configs of the precision table. Default lenet128.")
    parser.add_argument("--fit-configs", default="lenet16", type=lambda s: _names(s, CONFIGS, "config"),
                        help="configs of the fit table. Default lenet16.")
    parser.add_argument("--spe", default="1,4,16,64", help="steps_per_execution values for the fit table.")
    parser.add_argument("--epoch-images", type=int, default=8192, help="images per timed fit epoch. Default 8192.")
    parser.add_argument("--fit-epochs", type=int, default=3, help="timed fit rounds (median). Default 3.")
    parser.add_argument("--pause-train-jobs", action="store_true",
                        help="SIGSTOP `train.py --dataset cifar10` jobs during each timed block, SIGCONT after.")
    args = parser.parse_args(argv)
    if min(args.rounds, args.alexnet_rounds, args.epoch_images, args.fit_epochs) < 1:
        parser.error("--rounds, --alexnet-rounds, --epoch-images and --fit-epochs must be >= 1")
    if "ce" not in args.variants:
        parser.error("--variants must include ce (the reference of the step table)")
    xla_modes = (False, True) if args.xla is None else (args.xla,)
    spe_values = tuple(int(v) for v in args.spe.split(","))
    pause = "cifar10" if args.pause_train_jobs else None
    print(machine_line())
    print(f"Step: Model.train_step in one tf.function, median over rounds of interleaved blocks "
          f"(LeNet {args.rounds} rounds, AlexNet {args.alexnet_rounds}), loss only, SGD momentum 0.9 wd 5e-4")
    results = run(args.tables, args.configs, xla_modes, args.rounds, args.alexnet_rounds, args.fit_configs, "D",
                  spe_values, args.epoch_images, args.fit_epochs, args.precision_configs, ("D", "ce"), pause,
                  args.variants)
    if "steps" in results and "steps" in args.tables:
        print("\nTraining step per variant vs the ce step (same network, batch, XLA mode)")
        print(format_steps(results["steps"]))
    if "xla" in args.tables and results.get("xla"):
        print("\nXLA on vs off (same step)")
        print(format_xla(results["xla"]))
    if "precision" in results:
        print("\nPrecision policies vs float32 (XLA off)")
        print(format_precision(results["precision"]))
    if "fit" in results:
        print("\nmodel.fit steady-state epoch vs the step alone (XLA off)")
        print(format_fit(results["fit"]))
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if pause:
        print(f"\n[pause] background jobs paused {PauseJobs.pauses} times, {PauseJobs.paused_total_s:.0f} s in all")
    return results


if __name__ == "__main__":
    main()
