"""Predictions per second through the exported SavedModel's signatures on this machine.

```shell
python bench/bench_serving.py                                # a fresh untrained LeNet export, 10 classes
python bench/bench_serving.py --model runs/RUN/classifier    # an exported run
python bench/bench_serving.py --input-size 64                # clients' images bigger: resize in the graph
```

The model is loaded with `tf.saved_model.load` (as TF Serving or `keras_cwsn.predict` would) and
called through `serving_default` (uint8 arrays) and `serve_jpeg` (JPEG bytes, quality 95, decoded in
the graph). For each signature and batch size: warm-up calls, then `--repeats` timed rounds of
enough calls to last about `--min-round-s`; the table shows the median round (and the spread).
Run it by hand: the numbers depend on the CPU and on whatever else runs on it.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_cwsn.optional import set_tensorflow_environment  # noqa: E402

set_tensorflow_environment()  # oneDNN on, as train.py has it

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402



def export_untrained(folder, num_classes=10, size=32):
    """Export an untrained LeNet classifier (speed does not depend on the weights)."""
    import keras

    from keras_cwsn.export import export_classifier
    from keras_cwsn.models import build_model

    keras.utils.set_random_seed(0)
    classifier = build_model("lenet", "ce", num_fine=num_classes, input_shape=(size, size, 3))
    stats = {"normalization": "yuv", "uv_mean": [0.0, 0.0], "uv_std": [0.1, 0.1]}
    path = os.path.join(folder, "classifier")
    export_classifier(classifier, path, [f"class_{i}" for i in range(num_classes)], (size, size), stats,
                      metadata={"dataset": "benchmark", "variant": "untrained"})
    return path


def time_rounds(call, warmup, repeats, min_round_s):
    """Median, min and max seconds per call over `repeats` rounds, after `warmup` calls."""
    for _ in range(warmup):
        call()
    start = time.perf_counter()
    call()
    calls = max(1, int(min_round_s / max(time.perf_counter() - start, 1e-6)))
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call), min(per_call), max(per_call), calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="SavedModel folder (default: export an untrained LeNet to a temp folder)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--input-size", type=int, default=None,
                        help="side of the images sent (default: the model's input size, no resize)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-round-s", type=float, default=0.3)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as scratch:
        model_dir = args.model or export_untrained(scratch)
        loaded = tf.saved_model.load(model_dir)
        images_fn, jpeg_fn = loaded.signatures["serving_default"], loaded.signatures["serve_jpeg"]
        num_classes = images_fn.structured_outputs["probabilities"].shape[-1]
        size = args.input_size or _model_size(model_dir)
        rng = np.random.default_rng(0)
        rows = []
        for batch in args.batch_sizes:
            arrays = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            uint8 = tf.constant(arrays)
            jpegs = tf.constant([tf.io.encode_jpeg(a, quality=95).numpy() for a in arrays])
            for name, call in (("serving_default", lambda: images_fn(images=uint8)["probabilities"].numpy()),
                               ("serve_jpeg", lambda: jpeg_fn(image_bytes=jpegs)["probabilities"].numpy())):
                median, low, high, calls = time_rounds(call, args.warmup, args.repeats, args.min_round_s)
                rows.append((name, batch, median * 1e3, low * 1e3, high * 1e3, batch / median, calls))

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}; "
          f"{num_classes} classes, {size}x{size} inputs; median of {args.repeats} rounds after {args.warmup} "
          f"warm-up calls")
    header = ("signature", "batch", "ms/call (median)", "ms/call (min-max)", "images/s", "calls/round")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, batch, median, low, high, rate, calls in rows:
        print(f"| {name} | {batch} | {median:.2f} | {low:.2f}-{high:.2f} | {rate:,.0f} | {calls} |")
    return 0


def _model_size(model_dir):
    import json

    path = os.path.join(model_dir, "assets", "cwsn_model_info.json")
    if os.path.isfile(path):
        with open(path) as f:
            return int(json.load(f)["image_size"][0])
    return 32


if __name__ == "__main__":
    sys.exit(main())
