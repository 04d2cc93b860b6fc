"""What BatchNormalization costs the LeNet training step, and what a cheaper formulation would win back.

Run by hand (never a timed test):

    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_batchnorm.py --batches 16,128 --pause-train-jobs

Issue 12 lever. The project's LeNet (the `ce` classifier of `build_model`) is cloned with its
BatchNormalization layers swapped, and one training step (`Model.train_step`, 50 per call in one
`tf.function`, SGD with coupled weight decay as in the protocol) is timed per case, interleaved
over rounds, median per case:

- `keras`: the model as the project builds it (Keras's BatchNormalization).
- `closed-form conv` / `closed-form all`: the conv (or every) BatchNormalization computed as
  `x * a + b`, its statistics by one matrix product with a ones vector, and its gradient in closed
  form (one more matrix product), instead of Keras's moments + autodiff. Same function: the script
  prints its largest difference to Keras's outputs and input gradients first.
- `none conv` / `none all`: those layers removed (not the same network: the floor BN sits on; with
  it gone, TensorFlow fuses convolution, bias and ReLU).
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

from keras_cwsn.models import build_model  # noqa: E402
from keras_cwsn.optimizers import CoupledSGD  # noqa: E402
from keras_cwsn.training import recipe  # noqa: E402
from pause import PauseJobs  # noqa: E402

STEPS_PER_CALL = 50


def _column_sums(rows):
    """Column sums of a (M, C) matrix as one (1, M) x (M, C) product (oneDNN), not a reduction."""
    return ops.matmul(ops.ones((1, ops.shape(rows)[0]), rows.dtype), rows)[0]


class ClosedFormBatchNorm(keras.layers.BatchNormalization):
    """Keras's BatchNormalization (channels last) with matrix-product statistics and a closed-form gradient."""

    def call(self, inputs, training=None, mask=None):
        if not training:
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        x = ops.reshape(inputs, (-1, channels))
        count = ops.cast(ops.shape(x)[0], x.dtype)
        sums = _column_sums(ops.concatenate([x, x * x], axis=-1))
        mean = sums[:channels] / count
        variance = ops.maximum(sums[channels:] / count - mean * mean, 0.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        y = _normalize(x, tf.identity(self.gamma), tf.identity(self.beta),  # tensors, not variables
                       ops.stop_gradient(mean), ops.stop_gradient(variance), self.epsilon)
        return ops.reshape(y, ops.shape(inputs))


class NoNorm(keras.layers.BatchNormalization):
    """A BatchNormalization slot that passes its input through (the floor): built without gamma or beta."""

    def call(self, inputs, training=None, mask=None):
        return inputs


def _normalize(x, gamma, beta, mean, variance, epsilon):
    """y = (x - mean) / sqrt(variance + eps) * gamma + beta, with the batch statistics' gradient in closed form."""

    @ops.custom_gradient
    def forward(x, gamma, beta, mean, variance):
        inv = ops.rsqrt(variance + epsilon)
        scale = gamma * inv
        y = x * scale + (beta - mean * scale)

        def grad(*args, upstream=None):
            dy = upstream if upstream is not None else args[0]
            count = ops.cast(ops.shape(x)[0], x.dtype)
            channels = x.shape[-1]
            sums = _column_sums(ops.concatenate([dy, dy * x], axis=-1))
            sum_dy, sum_dy_x = sums[:channels], sums[channels:]
            sum_dy_xhat = (sum_dy_x - mean * sum_dy) * inv
            c1 = -scale * inv * sum_dy_xhat / count
            c0 = -scale * sum_dy / count - mean * c1
            return dy * scale + (x * c1 + c0), sum_dy_xhat, sum_dy, ops.zeros_like(mean), ops.zeros_like(variance)

        return y, grad

    return forward(x, gamma, beta, mean, variance)


def variant_model(case):
    """The project's LeNet classifier with its BatchNormalization layers swapped as `case` says."""
    keras.utils.set_random_seed(0)
    model = build_model("lenet", "ce", 10, 2, (32, 32, 3))
    if case == "keras":
        return model
    kind, which = case.split()

    def swap(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization) and (which == "all" or layer.name.startswith("conv")):
            if kind == "none":
                return NoNorm.from_config({**config, "center": False, "scale": False})
            return ClosedFormBatchNorm.from_config(config)
        return layer.__class__.from_config(config)

    clone = keras.models.clone_model(model, clone_function=swap)
    if kind != "none":
        clone.set_weights(model.get_weights())
    return clone


def compiled(model):
    """The protocol's compile recipe for the classifier (losses only, no metrics)."""
    optimizer = CoupledSGD(learning_rate=0.01, momentum=0.9, coupled_weight_decay=5e-4)
    return recipe.compile_model(model, "ce", optimizer, metrics=False)


def check_same_function(batch):
    """Largest |difference| of outputs and input gradients, closed-form vs Keras BatchNormalization (training mode)."""
    x = tf.constant(np.random.default_rng(1).standard_normal((batch, 32, 32, 3)).astype("float32"))
    results = []
    for case in ("keras", "closed-form all"):
        model = variant_model(case)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = model(x, training=True)["probabilities"]
            loss = tf.reduce_sum(tf.sin(out))
        results.append((out.numpy(), tape.gradient(loss, x).numpy()))
    (out_a, grad_a), (out_b, grad_b) = results
    return float(np.abs(out_a - out_b).max()), float(np.abs(grad_a - grad_b).max() / np.abs(grad_a).max())


def many_steps(model):
    @tf.function
    def run(x, y):
        for _ in tf.range(STEPS_PER_CALL):
            model.train_step((x, y))
        return 0

    return run


def time_cases(batch, cases, rounds, pause):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, batch).astype("int32"))
    steps = {case: many_steps(compiled(variant_model(case))) for case in cases}
    for step in steps.values():
        step(x, y)  # trace and warm up
    times = {case: [] for case in cases}
    for _ in range(rounds):
        with PauseJobs(pause):
            for case, step in steps.items():
                start = time.perf_counter()
                step(x, y)
                times[case].append((time.perf_counter() - start) / STEPS_PER_CALL * 1000)
    return {case: statistics.median(t) for case, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="16,128")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--pause-train-jobs", action="store_true",
                        help="SIGSTOP background `train.py --dataset cifar10` jobs during each timed block")
    args = parser.parse_args()
    cases = ("keras", "closed-form conv", "closed-form all", "none conv", "none all")
    out_diff, grad_diff = check_same_function(16)
    print(f"closed-form vs Keras BatchNormalization, batch 16: outputs max |diff| {out_diff:.2e}, "
          f"input gradients max relative diff {grad_diff:.2e}")
    print(f"\n{'batch':>5}  {'case':<18}{'step (ms)':>10}{'vs keras':>10}")
    for batch in (int(b) for b in args.batches.split(",")):
        medians = time_cases(batch, cases, args.rounds, "cifar10" if args.pause_train_jobs else None)
        for case in cases:
            print(f"{batch:>5}  {case:<18}{medians[case]:>10.2f}{medians[case] / medians['keras']:>10.2f}")


if __name__ == "__main__":
    main()
