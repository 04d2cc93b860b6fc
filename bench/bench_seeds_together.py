"""Run-epochs per second of `train.py --seeds`: the seeds together (one compiled program per epoch, JAX)
against the same seeds one after another through `fit`, in one invocation; with `--memory`, device
memory per seed of the together program for LeNet and AlexNet at Appendix B's batch sizes.

Both paths run `keras_cwsn.training.run_seeds` (what train.py runs: the same data path, per-epoch
figures, checkpoints, writers) on the embedded 32x32 dataset with LeNet at the paper's batch 16.
The speed is read from the runs' own histories: `epoch_seconds` of every epoch after a phase's first
(which compiles), so a seed's epoch counts once; together, one shared epoch is `seeds` run-epochs.
The wall time of each whole invocation (start-up, compiles and writers included) is printed beside.

    KERAS_BACKEND=jax python bench/bench_seeds_together.py                       # CPU-JAX, a minute or two
    KERAS_BACKEND=jax python bench/bench_seeds_together.py --train-size 50000 --epochs 4 --memory   # a GPU
"""

import argparse
import csv
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_cwsn.config import load_config, set_value  # noqa: E402
from keras_cwsn.models import build_model  # noqa: E402
from keras_cwsn.training import build_optimizer, compile_model, run_seeds  # noqa: E402
from keras_cwsn.variants import variant_levels  # noqa: E402

# Appendix B's batch sizes: LeNet (CIFAR-10) 16 in both phases; AlexNet (Birdsnap34) clustering 128
# (B-D; 1024 for A) and classification 16.
MEMORY_CASES = (("lenet", "D", 16, (32, 32, 3)), ("lenet", "ce", 16, (32, 32, 3)),
                ("alexnet", "D", 128, (224, 224, 3)), ("alexnet", "ce", 16, (224, 224, 3)))


def epoch_rates(out, seeds, together):
    """Run-epochs per second of each phase after its first epoch, from the seeds' histories."""
    rates = {}
    for phase in ("cluster", "classify"):
        if not os.path.exists(os.path.join(out, f"seed_{seeds[0]}", f"{phase}_history.csv")):
            continue  # `ce` has no clustering phase
        seconds = []
        for seed in seeds:
            with open(os.path.join(out, f"seed_{seed}", f"{phase}_history.csv")) as f:
                seconds.append([float(r["epoch_seconds"]) for r in csv.DictReader(f)][1:])
        if together:  # every seed logs the shared epoch's time: one epoch of it is len(seeds) run-epochs
            rates[phase] = len(seeds) / statistics.median(seconds[0])
        else:
            rates[phase] = 1 / statistics.median([s for per_seed in seconds for s in per_seed])
    return rates


def time_path(config, seeds, together):
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_seeds(config, seeds, out, quiet=True, together=together)
        wall = time.perf_counter() - start
        return epoch_rates(out, seeds, together), wall


def device_memory(arch, variant, batch, shape, seeds):
    """Bytes XLA plans for one compiled epoch program of `seeds` stacked models (arguments, outputs and
    temporaries, data excepted: the program is lowered over one batch of images)."""
    from keras_cwsn.training.stacked import StackedTrainer, stack_state

    models = []
    for seed in range(seeds):
        keras.utils.set_random_seed(seed)
        model = build_model(arch, variant, 10, 2, shape)
        settings = {"learning_rate": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
        models.append(compile_model(model, variant, build_optimizer(settings), jit_compile=True))
    levels = {name: np.zeros(batch, np.int32) for name in variant_levels(variant)}  # the outputs' dict keys
    trainer = StackedTrainer(models[0], variant, "kcl", 2.0, np.zeros((batch,) + shape, np.float32), levels,
                             seed_axis="vmap", block=None)  # the accelerator layout
    order = np.zeros((seeds, 1, batch), np.int32)
    import jax.numpy as jnp

    lowered = trainer._epoch.lower(stack_state(models), trainer.images, trainer.labels, jnp.asarray(order), None,
                                   jnp.float32(0.01))
    analysis = lowered.compile().memory_analysis()
    data = trainer.images.nbytes + sum(v.nbytes for v in trainer.labels.values())
    return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes - data)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--variant", default="A")
    p.add_argument("--train-size", type=int, default=1024)
    p.add_argument("--eval-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3, help="epochs per phase (the first of each is not timed)")
    p.add_argument("--memory", action="store_true", help="also device memory per seed, LeNet and AlexNet")
    args = p.parse_args(argv)
    if keras.backend.backend() != "jax":
        sys.exit("error: run with KERAS_BACKEND=jax (the seeds-together trainer is JAX's)")
    import jax

    seeds = [int(s) for s in args.seeds.split(",")]
    config = load_config(dataset="synthetic")
    for key, value in {"variant": args.variant, "synthetic.train_size": args.train_size,
                       "synthetic.eval_size": args.eval_size, "embedding_sample": 0}.items():
        config = set_value(config, key, value)
    for phase in ("cluster", "classify"):
        config = set_value(config, f"{phase}.batch_size", args.batch_size)
        config = set_value(config, f"{phase}.epochs", args.epochs)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, JAX {jax.__version__} "
          f"on {jax.devices()[0].device_kind}; keras {keras.__version__}")
    print(f"LeNet variant {args.variant}, batch {args.batch_size}, {args.train_size} training images "
          f"({args.train_size // args.batch_size} steps per epoch), seeds {args.seeds}, {args.epochs} epochs per phase")
    results = {}
    print(f"{'path':<20}{'cluster run-epochs/s':>22}{'classify run-epochs/s':>23}{'whole invocation s':>20}",
          flush=True)
    for name, together in (("together", True), ("one after another", False)):
        rates, wall = results[name] = time_path(config, seeds, together)
        cluster = f"{rates['cluster']:.2f}" if "cluster" in rates else "-"
        print(f"{name:<20}{cluster:>22}{rates['classify']:>23.2f}{wall:>20.1f}", flush=True)
    (fast, fast_wall), (slow, slow_wall) = results["together"], results["one after another"]
    print("ratio together / one after another: " +
          ", ".join(f"{phase} {fast[phase] / slow[phase]:.2f}x" for phase in fast) +
          f", whole invocation {slow_wall / fast_wall:.2f}x")
    if args.memory:
        print(f"{'model':<16}{'batch':>6}{'1 seed MiB':>12}{'2 seeds MiB':>13}{'per seed MiB':>14}")
        for arch, variant, batch, shape in MEMORY_CASES:
            one, two = (device_memory(arch, variant, batch, shape, n) for n in (1, 2))
            print(f"{arch + ' ' + variant:<16}{batch:>6}{one / 2**20:>12.1f}{two / 2**20:>13.1f}"
                  f"{(two - one) / 2**20:>14.1f}")


if __name__ == "__main__":
    main()
