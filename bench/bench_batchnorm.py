"""What BatchNormalization costs the LeNet training step, and what a cheaper formulation would win back.

Run by hand (never a timed test):

    TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_batchnorm.py --batches 16,128 --pause-train-jobs

Issue 12 lever. The project's LeNet (the `ce` classifier of `build_model`) is cloned with its
BatchNormalization layers swapped, and one training step (`Model.train_step`, 50 per call in one
`tf.function`, SGD with coupled weight decay as in the protocol) is timed per case, interleaved
over rounds (the order reversed every other round); the step is the median per case, and "vs
keras" the median over rounds of that round's ratio, which holds still while this shared
machine's speed drifts from round to round (the Keras step alone measured 15-26 ms in one hour):

- `keras`: the model as the project builds it (Keras's BatchNormalization).
- `closed-form conv` / `closed-form all`: the conv (or every) BatchNormalization computed as
  `x * a + b`, its statistics by one matrix product with a ones vector, and its gradient in closed
  form (one more matrix product), instead of Keras's moments + autodiff. Same function: the script
  prints its largest difference to Keras's outputs and input gradients first.
- `fused conv` / `fused all`: `FusedBatchNormalization` below (TensorFlow's fused kernel in
  training, as tf.keras 2 had it) in the conv (or every) slot.
- `none conv` / `none all`: those layers removed (not the same network: the floor BN sits on; with
  it gone, TensorFlow fuses convolution, bias and ReLU).
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_cwsn.optional import set_tensorflow_environment  # noqa: E402

set_tensorflow_environment()  # oneDNN on, as train.py has it

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

from keras_cwsn.models import build_model  # noqa: E402
from keras_cwsn.optimizers import CoupledSGD  # noqa: E402
from keras_cwsn.training import recipe  # noqa: E402
from timing import time_interleaved, train_steps_call  # noqa: E402

STEPS_PER_CALL = 50
CASES = ("keras", "closed-form conv", "closed-form all", "fused conv", "fused all", "none conv", "none all")


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


def _fused_applies(layer, inputs, mask):
    if keras.backend.backend() != "tensorflow" or mask is not None:
        return False
    if layer.renorm or layer.synchronized or not (layer.center and layer.scale):
        return False
    rank = len(inputs.shape)
    return (rank in (2, 4) and isinstance(layer.axis, int) and layer.axis % rank == rank - 1
            and inputs.dtype == "float32" and layer.compute_dtype == "float32")


class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` whose training step uses TensorFlow's fused kernel, as tf.keras 2 did.

    Keras 3 computes it as separate moments and arithmetic ops (keras-team/keras-core#225). Same
    weights and results as the stock layer (moving statistics from the same biased variance);
    dense activations (N, C) go through the kernel as (N, 1, 1, C).
    """

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable and _fused_applies(self, inputs, mask)):
            return super().call(inputs, training=training, mask=mask)
        x = inputs if len(inputs.shape) == 4 else tf.reshape(inputs, (-1, 1, 1, inputs.shape[-1]))
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, self.gamma, self.beta, epsilon=self.epsilon, is_training=True)
        count = tf.cast(tf.size(x) // tf.shape(x)[-1], variance.dtype)
        # the kernel returns the Bessel-corrected variance; Keras keeps the biased one
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return y if len(inputs.shape) == 4 else tf.reshape(y, tf.shape(inputs))


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
            if kind == "fused":
                return FusedBatchNormalization.from_config(config)
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


def check_same_function(batch, other):
    """Largest |difference| of outputs and input gradients, case `other` vs Keras BatchNormalization (training mode)."""
    x = tf.constant(np.random.default_rng(1).standard_normal((batch, 32, 32, 3)).astype("float32"))
    results = []
    for case in ("keras", other):
        model = variant_model(case)
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = model(x, training=True)["probabilities"]
            loss = tf.reduce_sum(tf.sin(out))
        results.append((out.numpy(), tape.gradient(loss, x).numpy()))
    (out_a, grad_a), (out_b, grad_b) = results
    return float(np.abs(out_a - out_b).max()), float(np.abs(grad_a - grad_b).max() / np.abs(grad_a).max())


def time_cases(batch, cases, rounds, pause):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, 32, 32, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, batch).astype("int32"))
    calls = {case: train_steps_call(compiled(variant_model(case)), STEPS_PER_CALL) for case in cases}
    return time_interleaved(calls, (x, y), rounds, pause, per_call=STEPS_PER_CALL)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="16,128")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--pause-train-jobs", action="store_true",
                        help="SIGSTOP background `train.py --dataset cifar10` jobs during each timed block")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    args = parser.parse_args()
    cases = tuple(args.cases.split(","))
    unknown = sorted(set(cases) - set(CASES))
    if unknown or "keras" not in cases:
        parser.error(f"--cases: unknown {unknown} (choose from {', '.join(CASES)}; 'keras' is required)")
    cases = ("keras",) + tuple(c for c in cases if c != "keras")  # the reference the ratios are taken to
    for kind in ("closed-form", "fused"):
        out_diff, grad_diff = check_same_function(16, f"{kind} all")
        print(f"{kind} vs Keras BatchNormalization, batch 16: outputs max |diff| {out_diff:.2e}, "
              f"input gradients max relative diff {grad_diff:.2e}")
    print(f"\n{'batch':>5}  {'case':<18}{'step (ms)':>10}{'vs keras':>10}")
    for batch in (int(b) for b in args.batches.split(",")):
        medians, ratios = time_cases(batch, cases, args.rounds, "cifar10" if args.pause_train_jobs else None)
        for case in cases:
            print(f"{batch:>5}  {case:<18}{medians[case]:>10.2f}{ratios[case]:>10.2f}")


if __name__ == "__main__":
    main()
