"""Benchmark the input pipeline (`make_pipeline`) against the images/second a training step consumes.

Run by hand (never a timed test):

    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_pipeline.py --data-dir /work/cache
    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_pipeline.py --data-dir /work/cache --pause-train-jobs

Rows (each: the pipeline's images/second, the model's in the same process, their ratio):

- CIFAR-10 from a local folder (`DIR/train/<class>/*.jpg`): the first decode of every JPEG into
  memory (cold: a fresh, temporary `KERAS_CWSN_CACHE`), reloading the decoded cache, and a whole
  training epoch of `make_pipeline(..., training=True)` (shuffle, YUV normalisation, batches of 16,
  label dict of variant D), vs a LeNet variant-D training step at batch 16.
- Birdsnap layout at 224x224: a small fake tree of JPEGs (about 300x250, built in a temporary
  folder) decoded in tf.data (as TFDS hands Birdsnap over: one encoded JPEG per example) and pushed
  through `make_pipeline`'s 224 path (`resize_images`, or `random_crop_flip` with augmentation,
  then ImageNet normalisation), vs an AlexNet variant-D training step.
- End to end: `fit` images/second fed by the pipeline vs fed by the same batches held in memory
  (paired rounds, ratio = median of per-round ratios; goal >= 0.95). On this 2-core machine the
  pipeline and the step share the cores, so this row is the one that says whether training is
  input-bound.

DESIGN.md goal: the pipeline delivers >= 4x the images/second the model consumes.
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_cwsn.optional import set_tensorflow_environment  # noqa: E402

set_tensorflow_environment()  # oneDNN on, as train.py has it

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import bench_steps  # noqa: E402
from bench_steps import PauseJobs, StepCase, time_cases  # noqa: E402
from keras_cwsn.data import pipeline  # noqa: E402
from keras_cwsn.variants import variant_levels  # noqa: E402

VARIANT = "D"


def write_fake_birdsnap(root, count=200, size=(250, 300), num_classes=34, seed=0):
    """A Birdsnap-like tree root/images/<species>/<n>.jpg of smooth random photos; returns (paths, labels)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    info = pipeline.dataset_info("birdsnap34")
    paths, labels = [], []
    for i in range(count):
        label = int(rng.integers(0, num_classes))
        height = size[0] + int(rng.integers(-30, 31))
        width = size[1] + int(rng.integers(-30, 31))
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.int16)
        image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)  # some texture
        folder = os.path.join(root, "images", info.fine_names[label])
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{i:04d}.jpg")
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
        labels.append(label)
    return paths, np.asarray(labels, np.int64)


def jpeg_split(paths, labels, name="birdsnap34"):
    """A `Split` of encoded JPEG files decoded in tf.data, as the Birdsnap TFDS source delivers them."""
    info = pipeline.dataset_info(name)

    def decode(path, label):
        return tf.io.decode_jpeg(tf.io.read_file(path), channels=3), label

    dataset = tf.data.Dataset.from_tensor_slices((list(paths), labels)).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return pipeline.Split(name, "train", dataset, labels, info)


def iterate_images_per_second(dataset, epochs, max_batches=None, pause=None):
    """Images/second of whole passes over a batched dataset: median over `epochs` passes after one warm-up."""

    def one_pass():
        count = 0
        for i, batch in enumerate(dataset):
            images = batch[0] if isinstance(batch, tuple) else batch
            count += int(images.shape[0])
            if max_batches is not None and i + 1 >= max_batches:
                break
        return count

    one_pass()
    rates = []
    with PauseJobs(pause):
        for _ in range(epochs):
            start = time.perf_counter()
            count = one_pass()
            rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def model_images_per_second(arch, batch, shape, rounds, pause=None):
    """Images/second a variant-D training step (XLA off, as on CPU) consumes."""
    case = StepCase(arch, VARIANT, batch, shape)
    seconds = statistics.median(time_cases([case], rounds, bench_steps.block_steps(arch, batch), warmup=1, pause=pause)[0])
    del case
    keras.backend.clear_session()
    return batch / seconds


def fit_rates(arch, ds, batch, shape, steps, rounds=3, pause=None):
    """`fit` images/second fed by `ds` vs by its first `steps` batches cached in memory.

    Paired rounds: each round runs one epoch of `steps` steps from each source in turn; figures are
    medians over rounds, the ratio the median of the per-round ratios.
    """
    cached = ds.take(steps).cache()
    for _ in cached:  # fill the cache
        pass
    sources = {"pipeline": ds, "in-memory": cached.repeat()}
    models = {}
    for source, data in sources.items():
        models[source] = bench_steps.make_model(arch, VARIANT, shape)
        models[source].fit(data, epochs=1, steps_per_epoch=2, verbose=0)  # trace
    rates = {source: [] for source in sources}
    for _ in range(rounds):
        with PauseJobs(pause):
            for source, data in sources.items():
                timer = bench_steps.EpochTimer()
                models[source].fit(data, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
                rates[source].append(steps * batch / timer.seconds[-1])
    del models
    keras.backend.clear_session()
    figures = {source: statistics.median(r) for source, r in rates.items()}
    figures["paired_ratio"] = statistics.median(p / m for p, m in zip(rates["pipeline"], rates["in-memory"]))
    return figures


def run_cifar(data_dir, batch=16, epochs=2, rounds=15, fit_steps=400, cold=True, pause=None, log=print):
    rows = []
    levels = variant_levels(VARIANT)
    model_ips = model_images_per_second("lenet", batch, (32, 32, 3), rounds, pause)
    log(f"[cifar10] LeNet {VARIANT} step at batch {batch}: {model_ips:.0f} img/s")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
        if cold:
            start = time.perf_counter()
            with PauseJobs(pause):
                train = pipeline.load_split("cifar10", "train", data_dir=data_dir, cache_dir=cache, verbose=False)
            seconds = time.perf_counter() - start
            decoded = train.report.get("decoded", len(train))
            rows.append({"dataset": "cifar10 32x32", "stage": "first decode (cold cache)", "batch": "",
                         "ips": decoded / seconds, "model_ips": model_ips, "note": f"{decoded} JPEGs in {seconds:.1f} s"})
            log(f"[cifar10] cold decode: {decoded} images in {seconds:.1f} s")
        start = time.perf_counter()
        train = pipeline.load_split("cifar10", "train", data_dir=data_dir, cache_dir=cache, verbose=False)
        seconds = time.perf_counter() - start
        rows.append({"dataset": "cifar10 32x32", "stage": "reload decoded cache" if cold else "load (cache state unknown)",
                     "batch": "", "ips": 50_000 / seconds, "model_ips": model_ips, "note": f"{seconds:.2f} s"})
        stats = pipeline.preprocessing_stats(train, cache_dir=cache, verbose=False)
        ds = pipeline.make_pipeline(train, stats, batch, levels, training=True, seed=0)
        ips = iterate_images_per_second(ds, epochs, pause=pause)
        rows.append({"dataset": "cifar10 32x32", "stage": "make_pipeline epoch (in memory)", "batch": batch,
                     "ips": ips, "model_ips": model_ips, "note": f"{len(train)} images/epoch"})
        log(f"[cifar10] pipeline epoch: {ips:.0f} img/s")
        if fit_steps:
            rates = fit_rates("lenet", ds.repeat(), batch, (32, 32, 3), fit_steps, pause=pause)
            rows.append({"dataset": "cifar10 32x32", "stage": "fit fed by pipeline (end to end)", "batch": batch,
                         "ips": rates["pipeline"], "model_ips": rates["in-memory"], "ratio": rates["paired_ratio"],
                         "note": f"reference: fit on in-memory batches; {fit_steps} steps x 3 paired rounds"})
            log(f"[cifar10] fit: pipeline {rates['pipeline']:.0f} img/s, in-memory {rates['in-memory']:.0f} img/s")
    for r in rows:
        r.setdefault("ratio", r["ips"] / r["model_ips"])
    return rows


def run_birdsnap(count=200, batch=32, epochs=3, rounds=3, fit_steps=6, pause=None, log=print):
    rows = []
    levels = variant_levels(VARIANT)
    model_ips = model_images_per_second("alexnet", batch, (224, 224, 3), rounds, pause)
    log(f"[birdsnap] AlexNet {VARIANT} step at batch {batch}: {model_ips:.1f} img/s")
    with tempfile.TemporaryDirectory(prefix="bench-birdsnap-") as root:
        paths, labels = write_fake_birdsnap(root, count)
        split = jpeg_split(paths, labels)
        stats = pipeline.preprocessing_stats(split, verbose=False)
        for augment in (False, True):
            ds = pipeline.make_pipeline(split, stats, batch, levels, training=True, seed=0, augment=augment)
            ips = iterate_images_per_second(ds, epochs, pause=pause)
            stage = "decode + random_crop_flip + normalise" if augment else "decode + resize_images + normalise"
            rows.append({"dataset": "birdsnap-like 224", "stage": stage, "batch": batch, "ips": ips,
                         "model_ips": model_ips, "note": f"{count} JPEGs ~300x250, re-decoded every epoch"})
            log(f"[birdsnap] pipeline ({'augment' if augment else 'resize'}): {ips:.0f} img/s")
        if fit_steps:
            ds = pipeline.make_pipeline(split, stats, batch, levels, training=True, seed=0).repeat()
            rates = fit_rates("alexnet", ds, batch, (224, 224, 3), fit_steps, pause=pause)
            rows.append({"dataset": "birdsnap-like 224", "stage": "fit fed by pipeline (end to end)", "batch": batch,
                         "ips": rates["pipeline"], "model_ips": rates["in-memory"], "ratio": rates["paired_ratio"],
                         "note": f"reference: fit on in-memory batches; {fit_steps} steps x 3 paired rounds"})
            log(f"[birdsnap] fit: pipeline {rates['pipeline']:.1f} img/s, in-memory {rates['in-memory']:.1f} img/s")
    for r in rows:
        r.setdefault("ratio", r["ips"] / r["model_ips"])
    return rows


def format_table(rows):
    header = f"{'dataset':<18} {'stage':<40} {'batch':>5} {'pipeline (img/s)':>17} {'model (img/s)':>14} " \
             f"{'ratio':>7} {'goal':>6}  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        end_to_end = r["stage"].startswith("fit")
        goal = ("met" if r["ratio"] >= 0.95 else "MISSED") if end_to_end else ("met" if r["ratio"] >= 4 else "MISSED")
        lines.append(f"{r['dataset']:<18} {r['stage']:<40} {str(r['batch']):>5} {r['ips']:17.0f} "
                     f"{r['model_ips']:14.1f} {r['ratio']:7.2f} {goal:>6}  {r['note']}")
    lines.append("goal: ratio >= 4 for pipeline rows; >= 0.95 for end-to-end rows (fit fed by the pipeline vs "
                 "fed by in-memory batches)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None,
                        help="CIFAR-10 folder with train/<class>/*.jpg (e.g. /work/cache); without it, CIFAR is skipped.")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold first decode of CIFAR-10.")
    parser.add_argument("--cifar-batch", type=int, default=16, help="CIFAR batch size (LeNet). Default 16.")
    parser.add_argument("--birdsnap-batch", type=int, default=32, help="224 batch size (AlexNet). Default 32.")
    parser.add_argument("--birdsnap-images", type=int, default=200, help="fake 224 JPEGs. Default 200.")
    parser.add_argument("--epochs", type=int, default=3, help="timed passes over each pipeline (median). Default 3.")
    parser.add_argument("--rounds", type=int, default=15, help="timed LeNet step rounds. Default 15.")
    parser.add_argument("--alexnet-rounds", type=int, default=3, help="timed AlexNet steps. Default 3.")
    parser.add_argument("--cifar-fit-steps", type=int, default=400, help="end-to-end fit steps (0: skip). Default 400.")
    parser.add_argument("--birdsnap-fit-steps", type=int, default=6, help="end-to-end fit steps (0: skip). Default 6.")
    parser.add_argument("--skip-birdsnap", action="store_true", help="CIFAR rows only.")
    parser.add_argument("--pause-train-jobs", action="store_true",
                        help="SIGSTOP `train.py --dataset cifar10` jobs during each timed block, SIGCONT after.")
    args = parser.parse_args(argv)
    pause = "cifar10" if args.pause_train_jobs else None
    print(bench_steps.machine_line())
    rows = []
    if args.data_dir:
        rows += run_cifar(args.data_dir, args.cifar_batch, args.epochs, args.rounds, args.cifar_fit_steps,
                          cold=not args.no_cold, pause=pause)
    if not args.skip_birdsnap:
        rows += run_birdsnap(args.birdsnap_images, args.birdsnap_batch, args.epochs, args.alexnet_rounds,
                             args.birdsnap_fit_steps, pause=pause)
    print("\nInput pipeline vs training-step consumption (variant D, XLA off)")
    print(format_table(rows))
    if pause:
        print(f"\n[pause] background jobs paused {PauseJobs.pauses} times, {PauseJobs.paused_total_s:.0f} s in all")
    return rows


if __name__ == "__main__":
    main()
