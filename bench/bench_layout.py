"""Channels-last (the project's) vs channels-first convolutions for the LeNet training step, TensorFlow on a CPU.

Run by hand (never a timed test):

    python bench/bench_layout.py --batches 16,128 --rounds 11 --pause-train-jobs

Issue 12 lever. PyTorch's peer runs NCHW; TensorFlow's oneDNN kernels take either layout. Both
cases are the same LeNet (models.py's conv5x5(20)-BN-ReLU-pool, conv5x5(50)-BN-ReLU-pool,
fc500-BN-ReLU, fc128-BN-ReLU, fc10), written out here because build_model only builds
channels-last; the channels-first one transposes its input once with a Permute layer. One
`Model.train_step` (SGD with momentum, 30 per call in one `tf.function`) is timed per case,
interleaved over rounds with the order reversed every other round; "first / last" is the median
over rounds of that round's ratio.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_cwsn.optional import set_tensorflow_environment  # noqa: E402

set_tensorflow_environment()  # oneDNN on, as train.py has it

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

from timing import time_interleaved, train_steps_call  # noqa: E402

STEPS_PER_CALL = 30
LAYOUTS = ("channels_last", "channels_first")


def lenet(data_format, num_classes=10):
    """The project's LeNet classifier in the given layout (NHWC input either way)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = layers.Permute((3, 1, 2))(inputs) if data_format == "channels_first" else inputs
    channel_axis = 1 if data_format == "channels_first" else -1
    for filters in (20, 50):
        x = layers.Conv2D(filters, 5, data_format=data_format)(x)
        x = layers.BatchNormalization(axis=channel_axis)(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D(2, data_format=data_format)(x)
    x = layers.Flatten()(x)
    for units in (500, 128):
        x = layers.ReLU()(layers.BatchNormalization()(layers.Dense(units)(x)))
    model = keras.Model(inputs, layers.Dense(num_classes)(x))
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    return model


def time_layouts(batch, rounds, pause):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, batch).astype("int32"))
    calls = {layout: train_steps_call(lenet(layout), STEPS_PER_CALL) for layout in LAYOUTS}
    medians, ratios = time_interleaved(calls, (x, y), rounds, pause, per_call=STEPS_PER_CALL)
    return medians, ratios["channels_first"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="16,128")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--pause-train-jobs", action="store_true",
                        help="SIGSTOP background `train.py --dataset cifar10` jobs during each timed block")
    args = parser.parse_args()
    print(f"{'batch':>5}{'last (ms)':>11}{'first (ms)':>12}{'first / last':>14}")
    for batch in (int(b) for b in args.batches.split(",")):
        medians, ratio = time_layouts(batch, args.rounds, "cifar10" if args.pause_train_jobs else None)
        print(f"{batch:>5}{medians['channels_last']:>11.2f}{medians['channels_first']:>12.2f}{ratio:>14.2f}", flush=True)


if __name__ == "__main__":
    main()
