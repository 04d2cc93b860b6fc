"""Tests for keras_cwsn.losses: values and gradients against a slow float64 NumPy reference."""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import softmax, tiny_clusterer  # noqa: E402
from keras_cwsn.losses import (  # noqa: E402
    EPSILON,
    PairwiseKLLoss,
    pairwise_kl_divergence,
    pairwise_kl_loss,
    pairwise_similarity,
)
from loss_helpers import (  # noqa: E402
    RUNNERS,
    K,
    N,
    central_differences,
    loss_and_grad,
    make_inputs,
    tensorflow_backend_only,
    tf_graph_ranks,
    to_numpy,
)

LOG_EPS = math.log(EPSILON)
MARGIN = 2.0


# ---------------------------------------------------------------------------------------------
# Slow float64 reference
# ---------------------------------------------------------------------------------------------


def ref_log_p(y_pred, from_logits):
    """log P (N, K) in float64, clamped at log(eps) exactly as the implementation does."""
    x = np.asarray(y_pred, dtype=np.float64)
    if from_logits:
        shifted = x - x.max(axis=-1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    else:
        probs = x / np.maximum(x.sum(axis=-1, keepdims=True), EPSILON)
        log_p = np.log(np.clip(probs, EPSILON, 1.0))
    return np.maximum(log_p, LOG_EPS)


def ref_pairs(y_true, n):
    """(similar, valid) as nested Python lists of 0/1, from labels (N,) or an (N, N) constraint matrix."""
    y = np.asarray(y_true)
    if y.ndim == 1:
        return [[float(y[i] == y[j]) for j in range(n)] for i in range(n)], [[1.0] * n for _ in range(n)]
    return ([[float(y[i, j] == 1) for j in range(n)] for i in range(n)],
            [[float(y[i, j] >= 0) for j in range(n)] for i in range(n)])


def ref_loss(y_true, y_pred, margin=MARGIN, from_logits=True, target_log_p=None):
    """Mean over valid ordered pairs of S*KL + (1-S)*max(0, margin-KL), KL(T_i || P_j), by a double loop.

    `target_log_p` holds the target side T fixed (stop_gradient) while y_pred is perturbed.
    """
    log_p = ref_log_p(y_pred, from_logits)
    log_t = log_p if target_log_p is None else target_log_p
    t = np.exp(log_t)
    n = log_p.shape[0]
    similar, valid = ref_pairs(y_true, n)
    total, count = 0.0, 0.0
    for i in range(n):
        for j in range(n):
            if not valid[i][j]:
                continue
            kl = float(np.sum(t[i] * (log_t[i] - log_p[j])))
            s = similar[i][j]
            total += s * kl + (1.0 - s) * max(0.0, margin - kl)
            count += 1.0
    return total / count if count else 0.0


def ref_grad(y_true, y_pred, margin=MARGIN, from_logits=True, h=1e-6):
    """Central finite differences (float64) of ref_loss w.r.t. y_pred, the target side T held fixed."""
    fixed = ref_log_p(y_pred, from_logits)
    return central_differences(lambda x: ref_loss(y_true, x, margin, from_logits, fixed), y_pred, h)


def naive_kl(y_pred, from_logits=True):
    """KL[i, j] through an explicit (N, N, K) tensor: the formula the matrix product must equal."""
    log_p = ref_log_p(y_pred, from_logits)
    t = np.exp(log_p)
    return np.sum(t[:, None, :] * (log_p[:, None, :] - log_p[None, :, :]), axis=-1)


# ---------------------------------------------------------------------------------------------
# The losses under test (inputs, gradients and runners: loss_helpers.py)
# ---------------------------------------------------------------------------------------------


def class_loss(margin=MARGIN, from_logits=True):
    loss = PairwiseKLLoss(margin=margin, from_logits=from_logits)
    return lambda y_true, y_pred: loss(y_true, y_pred)


def function_loss(margin=MARGIN, from_logits=True):
    return lambda y_true, y_pred: keras.ops.mean(pairwise_kl_loss(y_true, y_pred, margin, from_logits))


# ---------------------------------------------------------------------------------------------
# Value and gradient against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("form", ["labels", "constraints"])
@pytest.mark.parametrize("api", ["class", "function"])
def test_value_and_gradient_match_reference(api, form, from_logits, runner):
    y_true, y_pred = make_inputs(form, from_logits, seed=4 * (api == "class") + 2 * (form == "labels") + from_logits)
    expected = ref_loss(y_true, y_pred, from_logits=from_logits)
    expected_grad = ref_grad(y_true, y_pred, from_logits=from_logits)
    make = class_loss if api == "class" else function_loss
    run = RUNNERS[runner](lambda yt, yp: loss_and_grad(make(from_logits=from_logits), yt, yp))
    value, grad = run(y_true, y_pred)
    assert expected > 0.1  # a meaningful case: hinge and KL terms both active
    np.testing.assert_allclose(float(value), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(grad), expected_grad, rtol=1e-3, atol=2e-6)


def test_reference_case_has_active_and_inactive_hinges():
    """The random case above exercises both sides of the hinge (else the gradient check is weak)."""
    y_true, y_pred = make_inputs("labels", True, seed=1)
    kl = naive_kl(y_pred)
    dissimilar = y_true[:, None] != y_true[None, :]
    assert (kl[dissimilar] < MARGIN).any() and (kl[dissimilar] > MARGIN).any()


@pytest.mark.parametrize("margin", [0.5, 5.0])
def test_margin_is_used(margin):
    y_true, y_pred = make_inputs("labels", True, seed=3)
    value = PairwiseKLLoss(margin=margin)(y_true, y_pred)
    np.testing.assert_allclose(float(value), ref_loss(y_true, y_pred, margin=margin), rtol=1e-5)


def test_per_anchor_values_average_to_pair_mean_and_respect_sample_weight():
    y_true, y_pred = make_inputs("constraints", True, seed=4)
    per_anchor = to_numpy(pairwise_kl_loss(y_true, y_pred))
    assert per_anchor.shape == (N,)
    np.testing.assert_allclose(per_anchor.mean(), ref_loss(y_true, y_pred), rtol=1e-5)
    weights = np.arange(N, dtype=np.float32)
    weighted = PairwiseKLLoss()(y_true, y_pred, sample_weight=weights)
    np.testing.assert_allclose(float(weighted), np.sum(per_anchor * weights) / N, rtol=1e-5)


def test_labels_as_column_vector_equal_flat_labels():
    y_true, y_pred = make_inputs("labels", True, seed=5)
    flat = PairwiseKLLoss()(y_true, y_pred)
    column = PairwiseKLLoss()(y_true[:, None], y_pred)
    np.testing.assert_allclose(float(flat), float(column), rtol=1e-6)


def test_all_unknown_constraints_give_zero_not_nan():
    _, y_pred = make_inputs("labels", True, seed=6)
    value, grad = loss_and_grad(class_loss(), -np.ones((N, N), np.float32), y_pred)
    assert float(value) == 0.0
    assert np.all(to_numpy(grad) == 0.0)


def test_pairwise_similarity_forms():
    similar, valid = pairwise_similarity(np.array([0, 1, 0]))
    np.testing.assert_array_equal(to_numpy(similar), [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert valid is None  # labels: every pair counts, no mask to apply
    similar, valid = pairwise_similarity(np.array([[1, 0, -1], [0, 1, 1], [-1, 1, 1]]))
    np.testing.assert_array_equal(to_numpy(similar), [[1, 0, 0], [0, 1, 1], [0, 1, 1]])
    np.testing.assert_array_equal(to_numpy(valid), [[1, 1, 0], [1, 1, 1], [0, 1, 1]])


# ---------------------------------------------------------------------------------------------
# No (N, N, K) tensor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("from_logits", [True, False])
def test_pairwise_kl_divergence_equals_naive_all_pairs_formula(from_logits):
    _, y_pred = make_inputs("labels", from_logits, seed=7, n=9, k=7)
    kl = to_numpy(pairwise_kl_divergence(y_pred, from_logits=from_logits))
    assert kl.shape == (9, 9)
    np.testing.assert_allclose(kl, naive_kl(y_pred, from_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.diag(kl), 0.0, atol=1e-5)


@tensorflow_backend_only("inspects a tf.function graph")
def test_graph_has_no_rank_3_tensor():
    """Forward and backward graph of the loss: every intermediate is at most 2-D (no N x N x K)."""
    ranks = tf_graph_ranks(PairwiseKLLoss())
    assert ranks and max(ranks) <= 2, ranks


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("form", ["labels", "constraints"])
def test_single_example_gives_zero_loss_and_finite_gradient(form, from_logits):
    y_pred = np.array([[0.2, 0.3, 0.5]], np.float32)
    y_true = np.array([1], np.int32) if form == "labels" else np.ones((1, 1), np.float32)
    for runner in RUNNERS.values():
        value, grad = runner(lambda yt, yp: loss_and_grad(class_loss(from_logits=from_logits), yt, yp))(
            y_true, y_pred)
        assert abs(float(value)) < 1e-6  # KL(P || P): zero up to float32 rounding of the matrix product
        assert grad.shape == (1, 3) and np.all(np.isfinite(to_numpy(grad)))
        np.testing.assert_allclose(to_numpy(grad), 0.0, atol=1e-6)


def test_all_labels_equal_is_mean_kl():
    _, y_pred = make_inputs("labels", True, seed=8)
    y_true = np.zeros(N, np.int32)
    value, grad = loss_and_grad(class_loss(), y_true, y_pred)
    np.testing.assert_allclose(float(value), naive_kl(y_pred).mean(), rtol=1e-5)
    np.testing.assert_allclose(to_numpy(grad), ref_grad(y_true, y_pred), rtol=1e-3, atol=2e-6)


def test_all_labels_different():
    _, y_pred = make_inputs("labels", True, seed=9)
    y_true = np.arange(N, dtype=np.int32)
    value, grad = loss_and_grad(class_loss(), y_true, y_pred)
    np.testing.assert_allclose(float(value), ref_loss(y_true, y_pred), rtol=1e-5)
    np.testing.assert_allclose(to_numpy(grad), ref_grad(y_true, y_pred), rtol=1e-3, atol=2e-6)
    # Identical predictions: every off-diagonal (dissimilar) pair pays the full margin.
    same = np.zeros((N, K), np.float32)
    np.testing.assert_allclose(float(PairwiseKLLoss()(y_true, same)), MARGIN * (N - 1) / N, rtol=1e-6)


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("form", ["labels", "constraints"])
def test_extreme_logits_stay_finite(form, runner):
    y_true, _ = make_inputs(form, True, seed=10)
    rng = np.random.default_rng(10)
    y_pred = rng.choice([-1e4, -1.0, 0.0, 1.0, 1e4], size=(N, K)).astype(np.float32)
    y_pred[0] = 1e4  # a row saturated everywhere
    y_pred[1] = -1e4
    value, grad = RUNNERS[runner](lambda yt, yp: loss_and_grad(class_loss(), yt, yp))(y_true, y_pred)
    assert np.isfinite(float(value)) and np.all(np.isfinite(to_numpy(grad)))
    np.testing.assert_allclose(float(value), ref_loss(y_true, y_pred), rtol=1e-4)
    # Softmax probabilities at exactly 0 and 1 (from_logits=False) are clamped too.
    probs = softmax(y_pred.astype(np.float64)).astype(np.float32)
    value, grad = loss_and_grad(class_loss(from_logits=False), y_true, probs)
    assert np.isfinite(float(value)) and np.all(np.isfinite(to_numpy(grad)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("form", ["labels", "constraints"])
def test_low_precision_inputs_close_to_float32(dtype, from_logits, form):
    y_true, y_pred = make_inputs(form, from_logits, seed=11)
    low = keras.ops.cast(y_pred, dtype)
    rounded = to_numpy(keras.ops.cast(low, "float32"))  # the float32 values the low-precision input holds
    loss = lambda yt, yp: keras.ops.mean(pairwise_kl_loss(yt, yp, MARGIN, from_logits))  # noqa: E731
    for runner in RUNNERS.values():
        value, grad = runner(lambda yt, yp: loss_and_grad(loss, yt, yp))(y_true, low)
        assert str(grad.dtype) == str(low.dtype)
        assert np.isfinite(float(value)) and np.all(np.isfinite(to_numpy(keras.ops.cast(grad, "float32"))))
        # The loss works in float32 inside: same result as float32 on the rounded input...
        np.testing.assert_allclose(float(value), ref_loss(y_true, rounded, from_logits=from_logits), rtol=1e-4)
        # ...and close to the float32 result on the original input.
        np.testing.assert_allclose(float(value), ref_loss(y_true, y_pred, from_logits=from_logits),
                                   rtol=0.05, atol=0.02)
    # Extreme low-precision logits stay finite too.
    if from_logits:
        extreme = keras.ops.cast(np.where(y_pred > 0, 1e4, -1e4), dtype)
        value, grad = loss_and_grad(loss, y_true, extreme)
        assert np.isfinite(float(value)) and np.all(np.isfinite(to_numpy(keras.ops.cast(grad, "float32"))))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_model_trains_without_nan(policy, float32_policy):
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = tiny_clusterer()
    assert model.get_layer("fc3").compute_dtype == policy.split("_")[1]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss={"fine_fc3": PairwiseKLLoss()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    y = {"fine_fc3": rng.integers(0, 3, size=8)}
    before = [to_numpy(w).copy() for w in model.trainable_weights]
    for _ in range(2):
        logs = model.train_on_batch(x, y, return_dict=True)
        assert np.isfinite(logs["loss"]) and logs["loss"] > 0
    after = model.trainable_weights
    assert all(np.all(np.isfinite(to_numpy(w))) for w in after)
    assert any(not np.allclose(b, to_numpy(w)) for b, w in zip(before, after))


# ---------------------------------------------------------------------------------------------
# Compiled training (XLA): value and gradient pinned through a one-layer model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("form", ["labels", "constraints"])
def test_compiled_xla_training_matches_reference(form, from_logits, float32_policy):
    """model.compile(jit_compile=True): the first step's loss is the reference loss and the SGD update
    of a bias-free Dense layer is -lr * x^T dL/dlogits with the reference gradient."""
    y_true, _ = make_inputs(form, True, seed=12)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((N, 4)).astype(np.float32)
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(K, use_bias=False, name="fc3")
    out = dense(inputs)
    if not from_logits:
        out = keras.layers.Softmax(name="softmax")(out)
    model = keras.Model(inputs, {"fine_fc3": out})
    kernel = (rng.standard_normal((4, K))).astype(np.float32)
    dense.set_weights([kernel])
    lr = 0.5
    model.compile(optimizer=keras.optimizers.SGD(lr), jit_compile=True,
                  loss={"fine_fc3": PairwiseKLLoss(from_logits=from_logits)})
    logits = (x @ kernel).astype(np.float64)
    y_pred = logits if from_logits else softmax(logits)
    logs = model.train_on_batch(x, {"fine_fc3": y_true}, return_dict=True)
    np.testing.assert_allclose(logs["loss"], ref_loss(y_true, y_pred, from_logits=from_logits), rtol=1e-4)
    grad_pred = ref_grad(y_true, y_pred, from_logits=from_logits)
    if from_logits:
        grad_logits = grad_pred
    else:  # back through the softmax: J^T g with J = diag(p) - p p^T
        grad_logits = y_pred * (grad_pred - np.sum(grad_pred * y_pred, axis=-1, keepdims=True))
    expected_kernel = kernel - lr * x.astype(np.float64).T @ grad_logits
    np.testing.assert_allclose(dense.get_weights()[0], expected_kernel, rtol=1e-4, atol=1e-5)
    for _ in range(3):
        logs = model.train_on_batch(x, {"fine_fc3": y_true}, return_dict=True)
        assert np.isfinite(logs["loss"])


# ---------------------------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------------------------


def test_serialization_round_trip_keeps_options():
    loss = PairwiseKLLoss(margin=3.5, from_logits=False, check_finite=False)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, PairwiseKLLoss)
    assert (restored.margin, restored.from_logits, restored.check_finite) == (3.5, False, False)
    assert restored.name == loss.name and restored.reduction == loss.reduction
    clone = PairwiseKLLoss.from_config(loss.get_config())
    y_true, y_pred = make_inputs("labels", False, seed=13)
    np.testing.assert_allclose(float(clone(y_true, y_pred)), float(loss(y_true, y_pred)))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_labels_length_mismatch_raises():
    with pytest.raises(ValueError, match="5 labels for 6 predictions"):
        PairwiseKLLoss()(np.zeros(5, np.int32), np.zeros((6, 3), np.float32))


def test_labels_of_rank_3_raise():
    with pytest.raises(ValueError, match="rank 3"):
        PairwiseKLLoss()(np.zeros((6, 6, 1), np.float32), np.zeros((6, 3), np.float32))


def test_non_square_constraint_matrix_raises():
    with pytest.raises(ValueError, match="must be N x N"):
        PairwiseKLLoss()(np.zeros((6, 4), np.float32), np.zeros((6, 3), np.float32))


def test_constraint_matrix_of_wrong_size_raises():
    with pytest.raises(ValueError, match="4 x 4 for 6 predictions"):
        PairwiseKLLoss()(np.zeros((4, 4), np.float32), np.zeros((6, 3), np.float32))


def test_y_pred_of_wrong_rank_raises():
    with pytest.raises(ValueError, match="y_pred must be"):
        pairwise_kl_loss(np.zeros(6, np.int32), np.zeros((6, 3, 2), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_raise_eagerly(bad):
    y_pred = np.zeros((4, 3), np.float32)
    y_pred[1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        PairwiseKLLoss()(np.zeros(4, np.int32), y_pred)


@pytest.mark.parametrize("margin", [0.0, -1.0, float("nan"), float("inf"), "two"])
def test_bad_margin_raises(margin):
    with pytest.raises(ValueError, match="margin must be"):
        PairwiseKLLoss(margin=margin)
