"""Tests for keras_cwsn.losses, both criteria (KCL: PairwiseKLLoss, MCL: PairwiseMCLLoss): values and gradients
against slow float64 NumPy double loops, edge cases, precision, XLA, serialization, bad input, the factory and
the config's `criterion` key.

Each check that holds for both criteria is one test parametrised over `criterion`; what only one criterion has
(KCL's margin and KL matrix, MCL's same-cluster probability) is tested for that one. On the active Keras
backend (TensorFlow, or JAX where TensorFlow is not installed), through loss_helpers.py; the TensorFlow graph
inspection and the tf.distribute replicas are skipped elsewhere.
"""

import dataclasses
import json
import math
import os
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import TWO_CPU_REPLICAS, child_results, softmax, tiny_clusterer  # noqa: E402
from keras_cwsn.config import ConfigError, load_config, set_value, validate  # noqa: E402
from keras_cwsn.constants import CRITERIA  # noqa: E402
from keras_cwsn.losses import (  # noqa: E402
    EPSILON,
    LOSSES,
    PairwiseKLLoss,
    PairwiseMCLLoss,
    pairwise_kl_divergence,
    pairwise_kl_loss,
    pairwise_loss,
    pairwise_mcl_loss,
    pairwise_same_cluster_probability,
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
# MCL's clamp's upper end as float32 holds it (1 - 1e-7 rounds to 1 - 2**-23 * 1.0).
UPPER = float(np.float32(1.0 - EPSILON))


# ---------------------------------------------------------------------------------------------
# Slow float64 references
# ---------------------------------------------------------------------------------------------


def ref_log_p(y_pred, from_logits):
    """log P (N, K) in float64, clamped at log(eps) exactly as KCL does."""
    x = np.asarray(y_pred, dtype=np.float64)
    if from_logits:
        shifted = x - x.max(axis=-1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    else:
        probs = x / np.maximum(x.sum(axis=-1, keepdims=True), EPSILON)
        log_p = np.log(np.clip(probs, EPSILON, 1.0))
    return np.maximum(log_p, LOG_EPS)


def ref_probs(y_pred, from_logits):
    """P (N, K) in float64, as MCL computes it."""
    x = np.asarray(y_pred, dtype=np.float64)
    if from_logits:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return x / np.maximum(x.sum(axis=-1, keepdims=True), EPSILON)


def ref_pairs(y_true, n):
    """(similar, valid) as (N, N) 0/1 arrays, from labels (N,) or (N, 1), or an (N, N) constraint matrix."""
    y = np.asarray(y_true)
    if y.ndim == 2 and y.shape[1] == 1 and n != 1:
        y = y[:, 0]
    if y.ndim == 1:
        return (y[:, None] == y[None, :]).astype(float), np.ones((n, n))
    return (y == 1).astype(float), (y >= 0).astype(float)


def pair_mean(y_true, n, term):
    """The mean of `term(i, j, similar)` over the valid ordered pairs (i, j), by a double loop; 0 without any."""
    similar, valid = ref_pairs(y_true, n)
    terms = [term(i, j, similar[i][j]) for i in range(n) for j in range(n) if valid[i][j]]
    return sum(terms) / len(terms) if terms else 0.0


def kcl_ref_loss(y_true, y_pred, from_logits=True, margin=MARGIN, target_log_p=None):
    """Mean over valid ordered pairs of S*KL + (1-S)*max(0, margin-KL), KL(T_i || P_j).

    `target_log_p` holds the target side T fixed (stop_gradient) while y_pred is perturbed.
    """
    log_p = ref_log_p(y_pred, from_logits)
    log_t = log_p if target_log_p is None else target_log_p
    t = np.exp(log_t)

    def term(i, j, similar):
        kl = float(np.sum(t[i] * (log_t[i] - log_p[j])))
        return similar * kl + (1.0 - similar) * max(0.0, margin - kl)

    return pair_mean(y_true, log_p.shape[0], term)


def kcl_ref_grad(y_true, y_pred, from_logits=True, margin=MARGIN, h=1e-6):
    """Central finite differences (float64) of the KCL reference w.r.t. y_pred, the target side T held fixed."""
    fixed = ref_log_p(y_pred, from_logits)
    return central_differences(lambda x: kcl_ref_loss(y_true, x, from_logits, margin, fixed), y_pred, h)


def naive_kl(y_pred, from_logits=True):
    """KL[i, j] through an explicit (N, N, K) tensor: the formula the matrix product must equal."""
    log_p = ref_log_p(y_pred, from_logits)
    t = np.exp(log_p)
    return np.sum(t[:, None, :] * (log_p[:, None, :] - log_p[None, :, :]), axis=-1)


def mcl_ref_loss(y_true, y_pred, from_logits=True):
    """Mean over valid ordered pairs (diagonal included) of -[S log s + (1 - S) log(1 - s)], s = P_i . P_j."""
    p = ref_probs(y_pred, from_logits)

    def term(i, j, similar):
        s = min(max(float(np.dot(p[i], p[j])), EPSILON), UPPER)
        return -np.log(s) if similar else -np.log(1.0 - s)

    return pair_mean(y_true, p.shape[0], term)


def mcl_ref_grad(y_true, y_pred, from_logits=True, h=1e-6):
    """Central finite differences (float64) of the MCL reference w.r.t. y_pred (both sides of each pair move)."""
    return central_differences(lambda x: mcl_ref_loss(y_true, x, from_logits), y_pred, h)


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One criterion under test: its class, its per-anchor function, its references and figures only it has."""

    name: str
    cls: type
    per_anchor: object  # (y_true, y_pred, from_logits) -> (N,) values
    ref_loss: object  # (y_true, y_pred, from_logits) -> float
    ref_grad: object  # (y_true, y_pred, from_logits) -> (N, K)
    options: dict  # constructor options other than the defaults, for the serialization round trip
    uniform_all_different: float  # the loss of identical (all-zero) logits for N labels all different

    def loss(self, from_logits=True):
        loss = self.cls(from_logits=from_logits)
        return lambda y_true, y_pred: loss(y_true, y_pred)

    def function(self, from_logits=True):
        return lambda y_true, y_pred: keras.ops.mean(self.per_anchor(y_true, y_pred, from_logits))


CRITERIA_UNDER_TEST = {
    "kcl": Criterion("PairwiseKLLoss", PairwiseKLLoss,
                     lambda yt, yp, from_logits=True: pairwise_kl_loss(yt, yp, MARGIN, from_logits),
                     kcl_ref_loss, kcl_ref_grad, {"margin": 3.5, "from_logits": False, "check_finite": False},
                     MARGIN * (N - 1) / N),  # every off-diagonal (dissimilar) pair pays the full margin
    "mcl": Criterion("PairwiseMCLLoss", PairwiseMCLLoss,
                     lambda yt, yp, from_logits=True: pairwise_mcl_loss(yt, yp, from_logits),
                     mcl_ref_loss, mcl_ref_grad,
                     {"from_logits": False, "check_finite": False, "reduction": "sum", "name": "mcl_fc3"},
                     # s = 1/K for every pair; N diagonal pairs similar, N^2 - N dissimilar.
                     (N * -np.log(1.0 / K) + (N * N - N) * -np.log(1.0 - 1.0 / K)) / (N * N)),
}


@pytest.fixture(params=sorted(CRITERIA_UNDER_TEST))
def criterion(request):
    return CRITERIA_UNDER_TEST[request.param]


# ---------------------------------------------------------------------------------------------
# Value and gradient against the reference (both criteria)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("form", ["labels", "constraints"])
@pytest.mark.parametrize("api", ["class", "function"])
def test_value_and_gradient_match_reference(criterion, api, form, from_logits, runner):
    y_true, y_pred = make_inputs(form, from_logits, seed=4 * (api == "class") + 2 * (form == "labels") + from_logits)
    expected = criterion.ref_loss(y_true, y_pred, from_logits)
    expected_grad = criterion.ref_grad(y_true, y_pred, from_logits)
    make = criterion.loss if api == "class" else criterion.function
    run = RUNNERS[runner](lambda yt, yp: loss_and_grad(make(from_logits=from_logits), yt, yp))
    value, grad = run(y_true, y_pred)
    assert expected > 0.1 and np.abs(expected_grad).max() > 1e-3  # a meaningful case (KCL: both hinge sides)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(grad), expected_grad, rtol=1e-3, atol=2e-6)


def test_per_anchor_values_average_to_pair_mean_and_respect_sample_weight(criterion):
    y_true, y_pred = make_inputs("constraints", True, seed=4)
    per_anchor = to_numpy(criterion.per_anchor(y_true, y_pred))
    assert per_anchor.shape == (N,)
    np.testing.assert_allclose(per_anchor.mean(), criterion.ref_loss(y_true, y_pred), rtol=1e-5)
    weights = np.arange(N, dtype=np.float32)
    weighted = criterion.cls()(y_true, y_pred, sample_weight=weights)
    np.testing.assert_allclose(float(weighted), np.sum(per_anchor * weights) / N, rtol=1e-5)


def test_sum_reduction_is_n_times_the_mean(criterion):
    y_true, y_pred = make_inputs("labels", True, seed=5)
    total = criterion.cls(reduction="sum")(y_true, y_pred)
    np.testing.assert_allclose(float(total), N * criterion.ref_loss(y_true, y_pred), rtol=1e-5)


def test_labels_as_column_vector_equal_flat_labels(criterion):
    y_true, y_pred = make_inputs("labels", True, seed=5)
    np.testing.assert_allclose(float(criterion.cls()(y_true[:, None], y_pred)),
                               float(criterion.cls()(y_true, y_pred)), rtol=1e-6)


def test_constraint_matrix_equal_to_labels_gives_the_same_loss(criterion):
    labels, y_pred = make_inputs("labels", True, seed=6)
    matrix = (labels[:, None] == labels[None, :]).astype(np.float32)
    np.testing.assert_allclose(float(criterion.cls()(matrix, y_pred)), float(criterion.cls()(labels, y_pred)),
                               rtol=1e-6)


def test_any_negative_constraint_is_unknown(criterion):
    y_true, y_pred = make_inputs("constraints", True, seed=7)
    flipped = y_true.copy()
    flipped[y_true == -1] = -2.0
    assert float(criterion.cls()(flipped, y_pred)) == pytest.approx(float(criterion.cls()(y_true, y_pred)), rel=1e-6)


def test_all_unknown_constraints_give_zero_not_nan(criterion):
    _, y_pred = make_inputs("labels", True, seed=8)
    for runner in RUNNERS.values():
        value, grad = runner(lambda yt, yp: loss_and_grad(criterion.loss(), yt, yp))(-np.ones((N, N), np.float32),
                                                                                      y_pred)
        assert float(value) == 0.0
        assert np.all(to_numpy(grad) == 0.0)


def test_all_labels_different(criterion):
    _, y_pred = make_inputs("labels", True, seed=9)
    y_true = np.arange(N, dtype=np.int32)
    value, grad = loss_and_grad(criterion.loss(), y_true, y_pred)
    np.testing.assert_allclose(float(value), criterion.ref_loss(y_true, y_pred), rtol=1e-5)
    np.testing.assert_allclose(to_numpy(grad), criterion.ref_grad(y_true, y_pred), rtol=1e-3, atol=2e-6)
    same = np.zeros((N, K), np.float32)  # identical predictions
    np.testing.assert_allclose(float(criterion.cls()(y_true, same)), criterion.uniform_all_different, rtol=1e-6)


@tensorflow_backend_only("inspects a tf.function graph")
def test_graph_has_no_rank_3_tensor(criterion):
    """Forward and backward graph of the loss: every intermediate is at most 2-D (no N x N x K)."""
    ranks = tf_graph_ranks(criterion.cls())
    assert ranks and max(ranks) <= 2, ranks


# ---------------------------------------------------------------------------------------------
# Extreme and low-precision inputs, compiled training (both criteria)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("form", ["labels", "constraints"])
def test_extreme_logits_stay_finite(criterion, form, runner):
    seed = 10 if criterion.cls is PairwiseKLLoss else 11
    y_true, _ = make_inputs(form, True, seed=seed)
    rng = np.random.default_rng(seed)
    y_pred = rng.choice([-1e4, -1.0, 0.0, 1.0, 1e4], size=(N, K)).astype(np.float32)
    y_pred[0] = 1e4  # a row saturated everywhere
    y_pred[1] = -1e4
    value, grad = RUNNERS[runner](lambda yt, yp: loss_and_grad(criterion.loss(), yt, yp))(y_true, y_pred)
    assert np.isfinite(float(value)) and np.all(np.isfinite(to_numpy(grad)))
    np.testing.assert_allclose(float(value), criterion.ref_loss(y_true, y_pred), rtol=1e-4)
    if criterion.cls is PairwiseMCLLoss:
        assert float(value) <= -np.log(EPSILON) + 1e-3  # the clamp bounds every pair's term
    # Probabilities at exactly 0 and 1 (from_logits=False: softmax of the extremes, one-hot rows) are clamped too.
    one_hot = np.eye(K, dtype=np.float32)[rng.integers(0, K, size=N)]
    for probs in (softmax(y_pred.astype(np.float64)).astype(np.float32), one_hot):
        value, grad = loss_and_grad(criterion.loss(from_logits=False), y_true, probs)
        assert np.isfinite(float(value)) and np.all(np.isfinite(to_numpy(grad)))
        np.testing.assert_allclose(float(value), criterion.ref_loss(y_true, probs, False), rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("form", ["labels", "constraints"])
def test_low_precision_inputs_are_computed_in_float32(criterion, dtype, from_logits, form):
    y_true, y_pred = make_inputs(form, from_logits, seed=11 if criterion.cls is PairwiseKLLoss else 12)
    low = keras.ops.cast(y_pred, dtype)
    rounded = to_numpy(keras.ops.cast(low, "float32"))  # the float32 values the low-precision input holds
    loss = criterion.function(from_logits)
    for runner in RUNNERS.values():
        value, grad = runner(lambda yt, yp: loss_and_grad(loss, yt, yp))(y_true, low)
        assert keras.backend.standardize_dtype(value.dtype) == "float32"
        assert keras.backend.standardize_dtype(grad.dtype) == dtype
        assert np.isfinite(float(value)) and np.all(np.isfinite(to_numpy(keras.ops.cast(grad, "float32"))))
        # The loss works in float32 inside: same result as float32 on the rounded input...
        np.testing.assert_allclose(float(value), criterion.ref_loss(y_true, rounded, from_logits), rtol=1e-4)
        # ...and close to the float32 result on the original input.
        np.testing.assert_allclose(float(value), criterion.ref_loss(y_true, y_pred, from_logits), rtol=0.05,
                                   atol=0.02)
    if from_logits:  # extreme low-precision logits stay finite too
        extreme = keras.ops.cast(np.where(y_pred > 0, 1e4, -1e4), dtype)
        value, grad = loss_and_grad(loss, y_true, extreme)
        assert np.isfinite(float(value)) and np.all(np.isfinite(to_numpy(keras.ops.cast(grad, "float32"))))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_model_trains_without_nan(criterion, policy, float32_policy):
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = tiny_clusterer()
    assert model.get_layer("fc3").compute_dtype == policy.split("_")[1]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss={"fine_fc3": criterion.cls()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    y = {"fine_fc3": rng.integers(0, 3, size=8)}
    before = [to_numpy(w).copy() for w in model.trainable_weights]
    for _ in range(2):
        logs = model.train_on_batch(x, y, return_dict=True)
        assert np.isfinite(logs["loss"]) and logs["loss"] > 0
    assert all(np.all(np.isfinite(to_numpy(w))) for w in model.trainable_weights)
    assert any(not np.allclose(b, to_numpy(w)) for b, w in zip(before, model.trainable_weights))


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("form", ["labels", "constraints"])
def test_compiled_xla_training_matches_reference(criterion, form, from_logits, float32_policy):
    """model.compile(jit_compile=True): the first step's loss is the reference loss and the SGD update
    of a bias-free Dense layer is -lr * x^T dL/dlogits with the reference gradient."""
    seed = 12 if criterion.cls is PairwiseKLLoss else 13
    y_true, _ = make_inputs(form, True, seed=seed)
    rng = np.random.default_rng(seed)
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
                  loss={"fine_fc3": criterion.cls(from_logits=from_logits)})
    logits = x.astype(np.float64) @ kernel
    y_pred = logits if from_logits else softmax(logits)
    logs = model.train_on_batch(x, {"fine_fc3": y_true}, return_dict=True)
    np.testing.assert_allclose(logs["loss"], criterion.ref_loss(y_true, y_pred, from_logits), rtol=1e-4)
    grad_pred = criterion.ref_grad(y_true, y_pred, from_logits)
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
# Serialization, factory, config (both criteria)
# ---------------------------------------------------------------------------------------------


def test_serialization_round_trip_keeps_options(criterion):
    loss = criterion.cls(**criterion.options)
    config = loss.get_config()
    assert criterion.options.items() <= config.items()
    assert ("margin" in config) == (criterion.cls is PairwiseKLLoss)  # MCL has no margin
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, criterion.cls)
    assert {key: getattr(restored, key) for key in criterion.options} == criterion.options
    assert restored.name == loss.name and restored.reduction == loss.reduction
    clone = criterion.cls.from_config(config)
    y_true, y_pred = make_inputs("labels", False, seed=13)
    np.testing.assert_allclose(float(clone(y_true, y_pred)), float(loss(y_true, y_pred)))


def test_model_with_the_loss_saves_and_loads(criterion, tmp_path, float32_policy):
    model = tiny_clusterer()
    model.compile(optimizer="sgd", loss={"fine_fc3": criterion.cls(from_logits=True)})
    path = str(tmp_path / "clusterer.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.loss["fine_fc3"], criterion.cls)


def test_factory_builds_each_criterion():
    assert set(LOSSES) == set(CRITERIA) == set(CRITERIA_UNDER_TEST) == {"kcl", "mcl"}
    kcl = pairwise_loss("kcl", margin=3.0)
    assert type(kcl) is PairwiseKLLoss and kcl.margin == 3.0
    assert type(pairwise_loss()) is PairwiseKLLoss and pairwise_loss().margin == 2.0  # the paper's default
    mcl = pairwise_loss("mcl", margin=3.0, from_logits=False, name="m")  # MCL has no margin: ignored
    assert type(mcl) is PairwiseMCLLoss and not mcl.from_logits and mcl.name == "m"
    y_true, y_pred = make_inputs("labels", True, seed=16)
    assert float(mcl(y_true, ref_probs(y_pred, True))) == pytest.approx(mcl_ref_loss(y_true, y_pred), rel=1e-5)
    with pytest.raises(ValueError, match=r"Unknown criterion. Expected one of kcl, mcl. Received: criterion='ce'"):
        pairwise_loss("ce")


def test_config_criterion_key():
    config = load_config(dataset="synthetic")
    assert config["criterion"] == "kcl"
    assert set_value(config, "criterion", "mcl")["criterion"] == "mcl"
    for bad in ("MCL", "kl", 1, None):
        with pytest.raises(ConfigError, match="criterion' must be one of kcl, mcl"):
            set_value(config, "criterion", bad)
    with pytest.raises(ConfigError, match="Did you mean 'criterion'"):
        validate(dict(config, criterium="mcl"))


# ---------------------------------------------------------------------------------------------
# Bad input (both criteria: each message names its loss)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("y_true_shape, y_pred_shape, message", [
    ((5,), (6, 3), ": y_true has 5 labels for 6 predictions"),
    ((6, 6, 1), (6, 3), ": y_true must be .* rank 3"),
    ((6, 4), (6, 3), ": a pairwise constraint matrix must be N x N"),
    ((4, 4), (6, 3), ": constraint matrix is 4 x 4 for 6 predictions"),
])
def test_bad_labels_raise(criterion, y_true_shape, y_pred_shape, message):
    y_true = np.zeros(y_true_shape, np.int32 if len(y_true_shape) == 1 else np.float32)
    with pytest.raises(ValueError, match=criterion.name + message):
        criterion.cls()(y_true, np.zeros(y_pred_shape, np.float32))


def test_y_pred_of_wrong_rank_raises(criterion):
    with pytest.raises(ValueError, match=f"{criterion.name}: y_pred must be"):
        criterion.per_anchor(np.zeros(6, np.int32), np.zeros((6, 3, 2), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_raise_eagerly(criterion, bad):
    y_pred = np.zeros((4, 3), np.float32)
    y_pred[1, 2] = bad
    with pytest.raises(ValueError, match=f"{criterion.name} received 1 non-finite"):
        criterion.cls()(np.zeros(4, np.int32), y_pred)


# ---------------------------------------------------------------------------------------------
# KCL only: the margin and the KL matrix
# ---------------------------------------------------------------------------------------------


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
    np.testing.assert_allclose(float(value), kcl_ref_loss(y_true, y_pred, margin=margin), rtol=1e-5)


@pytest.mark.parametrize("margin", [0.0, -1.0, float("nan"), float("inf"), "two"])
def test_bad_margin_raises(margin):
    with pytest.raises(ValueError, match="margin must be"):
        PairwiseKLLoss(margin=margin)


def test_pairwise_similarity_forms():
    similar, valid = pairwise_similarity(np.array([0, 1, 0]))
    np.testing.assert_array_equal(to_numpy(similar), [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    assert valid is None  # labels: every pair counts, no mask to apply
    similar, valid = pairwise_similarity(np.array([[1, 0, -1], [0, 1, 1], [-1, 1, 1]]))
    np.testing.assert_array_equal(to_numpy(similar), [[1, 0, 0], [0, 1, 1], [0, 1, 1]])
    np.testing.assert_array_equal(to_numpy(valid), [[1, 1, 0], [1, 1, 1], [0, 1, 1]])


@pytest.mark.parametrize("from_logits", [True, False])
def test_pairwise_kl_divergence_equals_naive_all_pairs_formula(from_logits):
    _, y_pred = make_inputs("labels", from_logits, seed=7, n=9, k=7)
    kl = to_numpy(pairwise_kl_divergence(y_pred, from_logits=from_logits))
    assert kl.shape == (9, 9)
    np.testing.assert_allclose(kl, naive_kl(y_pred, from_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.diag(kl), 0.0, atol=1e-5)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("form", ["labels", "constraints"])
def test_kcl_single_example_gives_zero_loss_and_finite_gradient(form, from_logits):
    y_pred = np.array([[0.2, 0.3, 0.5]], np.float32)
    y_true = np.array([1], np.int32) if form == "labels" else np.ones((1, 1), np.float32)
    for runner in RUNNERS.values():
        value, grad = runner(lambda yt, yp: loss_and_grad(CRITERIA_UNDER_TEST["kcl"].loss(from_logits), yt, yp))(
            y_true, y_pred)
        assert abs(float(value)) < 1e-6  # KL(P || P): zero up to float32 rounding of the matrix product
        assert grad.shape == (1, 3) and np.all(np.isfinite(to_numpy(grad)))
        np.testing.assert_allclose(to_numpy(grad), 0.0, atol=1e-6)


def test_kcl_all_labels_equal_is_mean_kl():
    _, y_pred = make_inputs("labels", True, seed=8)
    y_true = np.zeros(N, np.int32)
    value, grad = loss_and_grad(CRITERIA_UNDER_TEST["kcl"].loss(), y_true, y_pred)
    np.testing.assert_allclose(float(value), naive_kl(y_pred).mean(), rtol=1e-5)
    np.testing.assert_allclose(to_numpy(grad), kcl_ref_grad(y_true, y_pred), rtol=1e-3, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# MCL only: the same-cluster probability
# ---------------------------------------------------------------------------------------------


def test_same_cluster_probability_is_the_inner_product_of_softmaxes():
    _, y_pred = make_inputs("labels", True, seed=1, n=7, k=4)
    s = to_numpy(pairwise_same_cluster_probability(y_pred))
    p = ref_probs(y_pred, True)
    np.testing.assert_allclose(s, np.einsum("ik,jk->ij", p, p), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s, s.T, rtol=1e-6)
    assert s.shape == (7, 7) and s.min() >= 0.0 and s.max() <= 1.0 + 1e-6


def test_mcl_mean_is_over_the_known_pairs_only():
    y_true, y_pred = make_inputs("constraints", True, seed=7)
    p = ref_probs(y_pred, True)
    s = np.clip(p @ p.T, EPSILON, UPPER)
    terms = np.where(y_true == 1, -np.log(s), -np.log(1.0 - s))
    assert float(PairwiseMCLLoss()(y_true, y_pred)) == pytest.approx(terms[y_true != -1].mean(), rel=1e-5)


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("form", ["labels", "constraints"])
def test_mcl_single_example(form, runner):
    """N = 1: the only pair is (0, 0), similar, loss -log ||P_0||^2; gradient finite and as the reference."""
    y_pred = np.array([[0.2, -0.3, 0.5]], np.float32)
    y_true = np.array([1], np.int32) if form == "labels" else np.ones((1, 1), np.float32)
    value, grad = RUNNERS[runner](lambda yt, yp: loss_and_grad(CRITERIA_UNDER_TEST["mcl"].loss(), yt, yp))(
        y_true, y_pred)
    p = ref_probs(y_pred, True)[0]
    assert float(value) == pytest.approx(-np.log(np.dot(p, p)), rel=1e-5)
    assert grad.shape == (1, 3) and np.all(np.isfinite(to_numpy(grad)))
    np.testing.assert_allclose(to_numpy(grad), mcl_ref_grad(y_true, y_pred), rtol=1e-3, atol=2e-6)


def test_mcl_batch_with_one_label():
    """Every pair similar: the loss is the mean of -log s and pulls all predictions into one cluster."""
    _, y_pred = make_inputs("labels", True, seed=9)
    y_true = np.full(N, 3, np.int32)
    value, grad = loss_and_grad(CRITERIA_UNDER_TEST["mcl"].loss(), y_true, y_pred)
    p = ref_probs(y_pred, True)
    np.testing.assert_allclose(float(value), np.mean(-np.log(p @ p.T)), rtol=1e-5)
    np.testing.assert_allclose(to_numpy(grad), mcl_ref_grad(y_true, y_pred), rtol=1e-3, atol=2e-6)


def test_mcl_learns_the_pairs():
    """A few SGD steps on the MCL loss raise s on similar pairs and lower it on dissimilar ones."""
    y_true, y_pred = make_inputs("labels", True, seed=14, n=12, k=4, num_classes=3, scale=0.1)
    x = y_pred
    loss = PairwiseMCLLoss()
    first = float(loss(y_true, x))
    for _ in range(100):
        _, grad = loss_and_grad(loss, y_true, x)
        x = x - 5.0 * to_numpy(grad)
    assert float(loss(y_true, x)) < 0.1 * first
    s = to_numpy(pairwise_same_cluster_probability(x))
    same = y_true[:, None] == y_true[None, :]
    assert s[same].mean() > 0.9 and s[~same].mean() < 0.05


# ---------------------------------------------------------------------------------------------
# Other backends and several replicas (subprocesses: the backend and the logical devices are fixed at start-up)
# ---------------------------------------------------------------------------------------------

_JAX = textwrap.dedent('''
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "jax"
    import jax, numpy as np
    from keras_cwsn import losses
    loss = getattr(losses, sys.argv[1])()
    y_true, y_pred = (np.array(v, dtype) for v, dtype in zip(json.loads(input()), ("int32", "float32")))
    f = lambda yp: loss(y_true, yp)
    value, grad = jax.value_and_grad(f)(y_pred)
    jit_value, jit_grad = jax.jit(jax.value_and_grad(f))(y_pred)
    print("RESULTS " + json.dumps([float(value), np.asarray(grad).tolist(), float(jit_value),
                                   np.asarray(jit_grad).tolist()]))
''')

_MIRRORED = TWO_CPU_REPLICAS + textwrap.dedent('''
    import json
    from keras_cwsn.losses import PairwiseMCLLoss

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    logits = np.random.default_rng(0).standard_normal((8, 5)).astype("float32")
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1], "float32")  # each replica alone would see one class only
    out = {}
    for reduction in ("sum_over_batch_size", "sum"):
        single, single_grad, total, grads = loss_on_replicas(mirrored, PairwiseMCLLoss(reduction=reduction), labels,
                                                             logits)
        out[reduction] = [single, total, float(np.abs(grads - single_grad).max()), float(np.abs(single_grad).max())]
    print("RESULTS " + json.dumps(out))
''')


def test_jax_backend_value_and_gradient_match_reference(criterion):
    """The loss on JAX (value and gradient, eager and jit) from any environment that has JAX: in the
    TensorFlow one, whose tests above run on TensorFlow, this is where JAX is checked."""
    pytest.importorskip("jax")
    y_true, y_pred = make_inputs("labels", True, seed=17)
    value, grad, jit_value, jit_grad = child_results(_JAX, criterion.name,
                                                     stdin=json.dumps([y_true.tolist(), y_pred.tolist()]))
    expected_grad = criterion.ref_grad(y_true, y_pred)
    for v, g in ((value, grad), (jit_value, jit_grad)):
        assert v == pytest.approx(criterion.ref_loss(y_true, y_pred), rel=1e-5)
        np.testing.assert_allclose(np.array(g), expected_grad, rtol=1e-3, atol=2e-6)


@tensorflow_backend_only("tf.distribute MirroredStrategy replicas")
def test_mcl_two_replicas_see_the_global_batch():
    """Under MirroredStrategy the loss all-gathers the replicas' slices (as PairwiseKLLoss does, test_distribute.py):
    the loss the optimizer minimises and the per-example gradients equal one device's on the whole batch, for both
    the default reduction (scaled by 1 / replicas, as fit does) and reduction="sum" (scaled inside the loss)."""
    results = child_results(_MIRRORED)
    for reduction, (single, mirrored, grad_diff, grad_max) in results.items():
        assert mirrored == pytest.approx(single, rel=1e-6), reduction
        assert grad_diff <= 1e-6 * max(1.0, grad_max), reduction
