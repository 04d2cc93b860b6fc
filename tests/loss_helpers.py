"""What the pairwise-loss tests (test_losses.py, over both criteria) share, on any Keras backend.

- `make_inputs`: a seeded batch, labels or an (N, N) constraint matrix with unknown pairs, and logits
  or probabilities;
- `central_differences`: a float64 finite-difference gradient, for the NumPy references;
- `loss_and_grad`, `RUNNERS` (`eager`, `xla`), `to_numpy`: a loss's value and its gradient w.r.t.
  y_pred through the active backend (TensorFlow's tape or `jax.value_and_grad`), eager or compiled
  with XLA (`tf.function(jit_compile=True)` or `jax.jit`);
- `tensorflow_backend_only`, `tf_graph_ranks`: for the few checks that inspect a TensorFlow graph.

Nothing here imports TensorFlow at module level: the JAX environment has none.
"""

import keras
import numpy as np

from conftest import only_on_backend, softmax

N, K = 6, 5


def make_inputs(form, from_logits, seed=0, n=N, k=K, num_classes=3, scale=2.0):
    """(y_true, y_pred): `form` "labels" gives int32 labels (n,), "constraints" an (n, n) float32 matrix of
    1 (same class) / 0 / -1 (unknown, about 30% of the pairs); y_pred (n, k) float32 logits, or their
    softmax when not `from_logits`."""
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((n, k))).astype(np.float32)
    y_pred = logits if from_logits else softmax(logits).astype(np.float32)
    labels = rng.integers(0, num_classes, size=n)
    if form == "labels":
        return labels.astype(np.int32), y_pred
    constraints = (labels[:, None] == labels[None, :]).astype(np.float32)
    constraints[rng.random((n, n)) < 0.3] = -1.0
    assert (constraints == -1).any() and (constraints == 0).any() and (constraints == 1).any()
    return constraints, y_pred


def central_differences(f, x, h=1e-6):
    """d f(x) / d x (float64) by central differences, each coordinate stepped by h * max(1, |x|)."""
    x = np.asarray(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        step = h * max(1.0, abs(x[idx]))
        plus, minus = x.copy(), x.copy()
        plus[idx] += step
        minus[idx] -= step
        grad[idx] = (f(plus) - f(minus)) / (2 * step)
    return grad


def loss_and_grad(loss_fn, y_true, y_pred):
    """(value, d value / d y_pred) on the active backend (TensorFlow's tape or jax.value_and_grad)."""
    if keras.backend.backend() == "jax":
        import jax

        y_true = jax.numpy.asarray(y_true)
        return jax.value_and_grad(lambda x: loss_fn(y_true, x))(jax.numpy.asarray(y_pred))
    import tensorflow as tf

    x = tf.convert_to_tensor(y_pred)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss_fn(tf.convert_to_tensor(y_true), x)
    return value, tape.gradient(value, x)


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def xla(fn):
    """`fn` compiled with XLA on the active backend."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

    return tf.function(fn, jit_compile=True)


RUNNERS = {
    "eager": lambda fn: fn,
    "xla": xla,
}


def tensorflow_backend_only(reason):
    """Skip a test unless Keras runs on TensorFlow (which is then installed), with the reason in the report."""
    return only_on_backend("tensorflow", reason)


def tf_graph_ranks(loss, batch=16, classes=11):
    """The ranks of every tensor in the TensorFlow graph of `loss`'s forward and backward pass, for int32
    labels (batch,) and float32 logits (batch, classes). Needs the TensorFlow backend."""
    import tensorflow as tf

    @tf.function
    def fwd_bwd(y_true, y_pred):
        with tf.GradientTape() as tape:
            tape.watch(y_pred)
            value = loss(y_true, y_pred)
        return value, tape.gradient(value, y_pred)

    graph = fwd_bwd.get_concrete_function(
        tf.TensorSpec((batch,), tf.int32), tf.TensorSpec((batch, classes), tf.float32)).graph
    return {out.shape.rank for op in graph.get_operations() for out in op.outputs if out.shape.rank is not None}
