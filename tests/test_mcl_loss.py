"""Tests for PairwiseMCLLoss (keras_cwsn.losses): values and gradients against a float64 NumPy double loop,
the criterion factory and the config's `criterion` key.

On the active Keras backend (TensorFlow, or JAX where TensorFlow is not installed), through loss_helpers.py
as test_losses.py does; the TensorFlow graph inspection and the tf.distribute replicas are skipped elsewhere.
"""

import json
import os
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import TWO_CPU_REPLICAS, child_results, tiny_clusterer  # noqa: E402
from keras_cwsn.config import ConfigError, load_config, set_value, validate  # noqa: E402
from keras_cwsn.constants import CRITERIA  # noqa: E402
from keras_cwsn.losses import (  # noqa: E402
    EPSILON,
    LOSSES,
    PairwiseKLLoss,
    PairwiseMCLLoss,
    pairwise_loss,
    pairwise_mcl_loss,
    pairwise_same_cluster_probability,
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

# The clamp's upper end as float32 holds it (1 - 1e-7 rounds to 1 - 2**-23 * 1.0).
UPPER = float(np.float32(1.0 - EPSILON))


# ---------------------------------------------------------------------------------------------
# Slow float64 reference
# ---------------------------------------------------------------------------------------------


def ref_probs(y_pred, from_logits):
    x = np.asarray(y_pred, dtype=np.float64)
    if from_logits:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return x / np.maximum(x.sum(axis=-1, keepdims=True), EPSILON)


def ref_loss(y_true, y_pred, from_logits=True):
    """Mean over valid ordered pairs (diagonal included) of -[S log s + (1 - S) log(1 - s)], s = P_i . P_j."""
    p = ref_probs(y_pred, from_logits)
    y = np.asarray(y_true)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    n = p.shape[0]
    total, count = 0.0, 0
    for i in range(n):
        for j in range(n):
            if y.ndim == 1:
                similar = y[i] == y[j]
            else:
                if y[i, j] < 0:
                    continue
                similar = y[i, j] == 1
            s = min(max(float(np.dot(p[i], p[j])), EPSILON), UPPER)
            total += -np.log(s) if similar else -np.log(1.0 - s)
            count += 1
    return total / count if count else 0.0


def ref_grad(y_true, y_pred, from_logits=True, h=1e-6):
    """Central finite differences (float64) of ref_loss w.r.t. y_pred (both sides of each pair move)."""
    return central_differences(lambda x: ref_loss(y_true, x, from_logits), y_pred, h)


# ---------------------------------------------------------------------------------------------
# The losses under test (inputs, gradients and runners: loss_helpers.py)
# ---------------------------------------------------------------------------------------------


def class_loss(from_logits=True, **kwargs):
    loss = PairwiseMCLLoss(from_logits=from_logits, **kwargs)
    return lambda y_true, y_pred: loss(y_true, y_pred)


def function_loss(from_logits=True):
    return lambda y_true, y_pred: keras.ops.mean(pairwise_mcl_loss(y_true, y_pred, from_logits))


# ---------------------------------------------------------------------------------------------
# Value and gradient against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("form", ["labels", "constraints"])
@pytest.mark.parametrize("api", ["class", "function"])
def test_value_and_gradient_match_reference(api, form, from_logits, runner):
    y_true, y_pred = make_inputs(form, from_logits, seed=4 * (api == "class") + 2 * (form == "labels") + from_logits)
    expected = ref_loss(y_true, y_pred, from_logits)
    expected_grad = ref_grad(y_true, y_pred, from_logits)
    make = class_loss if api == "class" else function_loss
    run = RUNNERS[runner](lambda yt, yp: loss_and_grad(make(from_logits=from_logits), yt, yp))
    value, grad = run(y_true, y_pred)
    assert expected > 0.1 and np.abs(expected_grad).max() > 1e-3  # a meaningful case
    np.testing.assert_allclose(float(value), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(grad), expected_grad, rtol=1e-3, atol=2e-6)


def test_same_cluster_probability_is_the_inner_product_of_softmaxes():
    _, y_pred = make_inputs("labels", True, seed=1, n=7, k=4)
    s = to_numpy(pairwise_same_cluster_probability(y_pred))
    p = ref_probs(y_pred, True)
    np.testing.assert_allclose(s, np.einsum("ik,jk->ij", p, p), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s, s.T, rtol=1e-6)
    assert s.shape == (7, 7) and s.min() >= 0.0 and s.max() <= 1.0 + 1e-6


def test_per_anchor_values_average_to_pair_mean_and_respect_sample_weight():
    y_true, y_pred = make_inputs("constraints", True, seed=4)
    per_anchor = to_numpy(pairwise_mcl_loss(y_true, y_pred))
    assert per_anchor.shape == (N,)
    np.testing.assert_allclose(per_anchor.mean(), ref_loss(y_true, y_pred), rtol=1e-5)
    weights = np.arange(N, dtype=np.float32)
    weighted = PairwiseMCLLoss()(y_true, y_pred, sample_weight=weights)
    np.testing.assert_allclose(float(weighted), np.sum(per_anchor * weights) / N, rtol=1e-5)


def test_sum_reduction_is_n_times_the_mean():
    y_true, y_pred = make_inputs("labels", True, seed=5)
    total = PairwiseMCLLoss(reduction="sum")(y_true, y_pred)
    np.testing.assert_allclose(float(total), N * ref_loss(y_true, y_pred), rtol=1e-5)


def test_labels_as_column_vector_equal_flat_labels():
    y_true, y_pred = make_inputs("labels", True, seed=5)
    np.testing.assert_allclose(float(PairwiseMCLLoss()(y_true[:, None], y_pred)),
                               float(PairwiseMCLLoss()(y_true, y_pred)), rtol=1e-6)


def test_constraint_matrix_equal_to_labels_gives_the_same_loss():
    labels, y_pred = make_inputs("labels", True, seed=6)
    matrix = (labels[:, None] == labels[None, :]).astype(np.float32)
    np.testing.assert_allclose(float(PairwiseMCLLoss()(matrix, y_pred)), float(PairwiseMCLLoss()(labels, y_pred)),
                               rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------


def test_unknown_pairs_are_left_out_of_the_mean():
    y_true, y_pred = make_inputs("constraints", True, seed=7)
    unknown = y_true == -1
    flipped = y_true.copy()
    flipped[unknown] = -2.0  # any negative value is unknown
    base = float(PairwiseMCLLoss()(y_true, y_pred))
    assert float(PairwiseMCLLoss()(flipped, y_pred)) == pytest.approx(base, rel=1e-6)
    # The mean is over the known pairs only: the sum of their terms over their count.
    p = ref_probs(y_pred, True)
    s = np.clip(p @ p.T, EPSILON, UPPER)
    terms = np.where(y_true == 1, -np.log(s), -np.log(1.0 - s))
    assert base == pytest.approx(terms[~unknown].mean(), rel=1e-5)


def test_all_unknown_constraints_give_zero_not_nan():
    _, y_pred = make_inputs("labels", True, seed=8)
    for runner in RUNNERS.values():
        value, grad = runner(lambda yt, yp: loss_and_grad(class_loss(), yt, yp))(-np.ones((N, N), np.float32), y_pred)
        assert float(value) == 0.0
        assert np.all(to_numpy(grad) == 0.0)


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("form", ["labels", "constraints"])
def test_single_example(form, runner):
    """N = 1: the only pair is (0, 0), similar, loss -log ||P_0||^2; gradient finite and as the reference."""
    y_pred = np.array([[0.2, -0.3, 0.5]], np.float32)
    y_true = np.array([1], np.int32) if form == "labels" else np.ones((1, 1), np.float32)
    value, grad = RUNNERS[runner](lambda yt, yp: loss_and_grad(class_loss(), yt, yp))(y_true, y_pred)
    p = ref_probs(y_pred, True)[0]
    assert float(value) == pytest.approx(-np.log(np.dot(p, p)), rel=1e-5)
    assert grad.shape == (1, 3) and np.all(np.isfinite(to_numpy(grad)))
    np.testing.assert_allclose(to_numpy(grad), ref_grad(y_true, y_pred), rtol=1e-3, atol=2e-6)


def test_batch_with_one_label():
    """Every pair similar: the loss is the mean of -log s and pulls all predictions into one cluster."""
    _, y_pred = make_inputs("labels", True, seed=9)
    y_true = np.full(N, 3, np.int32)
    value, grad = loss_and_grad(class_loss(), y_true, y_pred)
    p = ref_probs(y_pred, True)
    np.testing.assert_allclose(float(value), np.mean(-np.log(p @ p.T)), rtol=1e-5)
    np.testing.assert_allclose(to_numpy(grad), ref_grad(y_true, y_pred), rtol=1e-3, atol=2e-6)


def test_all_labels_different_and_identical_predictions():
    _, y_pred = make_inputs("labels", True, seed=10)
    y_true = np.arange(N, dtype=np.int32)
    value, grad = loss_and_grad(class_loss(), y_true, y_pred)
    np.testing.assert_allclose(float(value), ref_loss(y_true, y_pred), rtol=1e-5)
    np.testing.assert_allclose(to_numpy(grad), ref_grad(y_true, y_pred), rtol=1e-3, atol=2e-6)
    # Uniform predictions: s = 1/K for every pair; N diagonal pairs similar, N^2 - N dissimilar.
    uniform = np.zeros((N, K), np.float32)
    expected = (N * -np.log(1.0 / K) + (N * N - N) * -np.log(1.0 - 1.0 / K)) / (N * N)
    np.testing.assert_allclose(float(PairwiseMCLLoss()(y_true, uniform)), expected, rtol=1e-6)


@pytest.mark.parametrize("runner", sorted(RUNNERS))
@pytest.mark.parametrize("form", ["labels", "constraints"])
def test_extreme_logits_stay_finite(form, runner):
    y_true, _ = make_inputs(form, True, seed=11)
    rng = np.random.default_rng(11)
    y_pred = rng.choice([-1e4, -1.0, 0.0, 1.0, 1e4], size=(N, K)).astype(np.float32)
    y_pred[0] = 1e4  # a row saturated everywhere
    y_pred[1] = -1e4
    value, grad = RUNNERS[runner](lambda yt, yp: loss_and_grad(class_loss(), yt, yp))(y_true, y_pred)
    assert np.isfinite(float(value)) and np.all(np.isfinite(to_numpy(grad)))
    np.testing.assert_allclose(float(value), ref_loss(y_true, y_pred), rtol=1e-4)
    assert float(value) <= -np.log(EPSILON) + 1e-3  # the clamp bounds every pair's term
    # One-hot probabilities (from_logits=False): s exactly 0 or 1, clamped too.
    probs = np.eye(K, dtype=np.float32)[rng.integers(0, K, size=N)]
    value, grad = loss_and_grad(class_loss(from_logits=False), y_true, probs)
    assert np.isfinite(float(value)) and np.all(np.isfinite(to_numpy(grad)))
    np.testing.assert_allclose(float(value), ref_loss(y_true, probs, from_logits=False), rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("form", ["labels", "constraints"])
def test_low_precision_inputs_are_computed_in_float32(dtype, from_logits, form):
    y_true, y_pred = make_inputs(form, from_logits, seed=12)
    low = keras.ops.cast(y_pred, dtype)
    rounded = to_numpy(keras.ops.cast(low, "float32"))  # the float32 values the low-precision input holds
    loss = function_loss(from_logits)
    for runner in RUNNERS.values():
        value, grad = runner(lambda yt, yp: loss_and_grad(loss, yt, yp))(y_true, low)
        assert keras.backend.standardize_dtype(value.dtype) == "float32"
        assert keras.backend.standardize_dtype(grad.dtype) == dtype
        assert np.isfinite(float(value)) and np.all(np.isfinite(to_numpy(keras.ops.cast(grad, "float32"))))
        np.testing.assert_allclose(float(value), ref_loss(y_true, rounded, from_logits), rtol=1e-4)
        np.testing.assert_allclose(float(value), ref_loss(y_true, y_pred, from_logits), rtol=0.05, atol=0.02)
    if from_logits:
        extreme = keras.ops.cast(np.where(y_pred > 0, 1e4, -1e4), dtype)
        value, grad = loss_and_grad(loss, y_true, extreme)
        assert np.isfinite(float(value)) and np.all(np.isfinite(to_numpy(keras.ops.cast(grad, "float32"))))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_model_trains_without_nan(policy, float32_policy):
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = tiny_clusterer()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss={"fine_fc3": PairwiseMCLLoss()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 6)).astype(np.float32)
    y = {"fine_fc3": rng.integers(0, 3, size=8)}
    before = [to_numpy(w).copy() for w in model.trainable_weights]
    for _ in range(2):
        logs = model.train_on_batch(x, y, return_dict=True)
        assert np.isfinite(logs["loss"]) and logs["loss"] > 0
    assert all(np.all(np.isfinite(to_numpy(w))) for w in model.trainable_weights)
    assert any(not np.allclose(b, to_numpy(w)) for b, w in zip(before, model.trainable_weights))


@pytest.mark.parametrize("form", ["labels", "constraints"])
def test_compiled_xla_training_matches_reference(form, float32_policy):
    """model.compile(jit_compile=True): the first step's loss is the reference loss and the SGD update of a
    bias-free Dense layer is -lr * x^T dL/dlogits with the reference gradient."""
    y_true, _ = make_inputs(form, True, seed=13)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((N, 4)).astype(np.float32)
    inputs = keras.Input((4,))
    dense = keras.layers.Dense(K, use_bias=False, name="fc3")
    model = keras.Model(inputs, {"fine_fc3": dense(inputs)})
    kernel = rng.standard_normal((4, K)).astype(np.float32)
    dense.set_weights([kernel])
    lr = 0.5
    model.compile(optimizer=keras.optimizers.SGD(lr), jit_compile=True, loss={"fine_fc3": PairwiseMCLLoss()})
    logits = x.astype(np.float64) @ kernel
    logs = model.train_on_batch(x, {"fine_fc3": y_true}, return_dict=True)
    np.testing.assert_allclose(logs["loss"], ref_loss(y_true, logits), rtol=1e-4)
    expected_kernel = kernel - lr * x.astype(np.float64).T @ ref_grad(y_true, logits)
    np.testing.assert_allclose(dense.get_weights()[0], expected_kernel, rtol=1e-4, atol=1e-5)


@tensorflow_backend_only("inspects a tf.function graph")
def test_graph_has_no_rank_3_tensor():
    """Forward and backward graph of the loss: every intermediate is at most 2-D (no N x N x K)."""
    ranks = tf_graph_ranks(PairwiseMCLLoss())
    assert ranks and max(ranks) <= 2, ranks


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
# Serialization, factory, config
# ---------------------------------------------------------------------------------------------


def test_serialization_round_trip_keeps_options():
    loss = PairwiseMCLLoss(from_logits=False, check_finite=False, reduction="sum", name="mcl_fc3")
    config = loss.get_config()
    expected = {"from_logits": False, "check_finite": False, "reduction": "sum", "name": "mcl_fc3"}
    assert expected.items() <= config.items()
    assert "margin" not in config
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, PairwiseMCLLoss)
    assert (restored.from_logits, restored.check_finite, restored.reduction, restored.name) == \
        (False, False, "sum", "mcl_fc3")
    clone = PairwiseMCLLoss.from_config(config)
    y_true, y_pred = make_inputs("labels", False, seed=15)
    np.testing.assert_allclose(float(clone(y_true, y_pred)), float(loss(y_true, y_pred)))


def test_model_with_mcl_loss_saves_and_loads(tmp_path, float32_policy):
    model = tiny_clusterer()
    model.compile(optimizer="sgd", loss={"fine_fc3": PairwiseMCLLoss(from_logits=True)})
    path = str(tmp_path / "clusterer.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.loss["fine_fc3"], PairwiseMCLLoss)


def test_factory_builds_each_criterion():
    assert set(LOSSES) == set(CRITERIA) == {"kcl", "mcl"}
    kcl = pairwise_loss("kcl", margin=3.0)
    assert type(kcl) is PairwiseKLLoss and kcl.margin == 3.0
    assert type(pairwise_loss()) is PairwiseKLLoss and pairwise_loss().margin == 2.0  # the paper's default
    mcl = pairwise_loss("mcl", margin=3.0, from_logits=False, name="m")  # MCL has no margin: ignored
    assert type(mcl) is PairwiseMCLLoss and not mcl.from_logits and mcl.name == "m"
    y_true, y_pred = make_inputs("labels", True, seed=16)
    assert float(mcl(y_true, ref_probs(y_pred, True))) == pytest.approx(ref_loss(y_true, y_pred), rel=1e-5)
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
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_input_errors_name_the_mcl_loss():
    with pytest.raises(ValueError, match="PairwiseMCLLoss: y_true has 5 labels for 6 predictions"):
        PairwiseMCLLoss()(np.zeros(5, np.int32), np.zeros((6, 3), np.float32))
    with pytest.raises(ValueError, match="PairwiseMCLLoss: a pairwise constraint matrix must be N x N"):
        PairwiseMCLLoss()(np.zeros((6, 4), np.float32), np.zeros((6, 3), np.float32))
    with pytest.raises(ValueError, match="PairwiseMCLLoss: y_true must be .* rank 3"):
        PairwiseMCLLoss()(np.zeros((6, 6, 1), np.float32), np.zeros((6, 3), np.float32))
    with pytest.raises(ValueError, match="PairwiseMCLLoss: y_pred must be"):
        pairwise_mcl_loss(np.zeros(6, np.int32), np.zeros((6, 3, 2), np.float32))
    y_pred = np.zeros((4, 3), np.float32)
    y_pred[1, 2] = np.nan
    with pytest.raises(ValueError, match="PairwiseMCLLoss received 1 non-finite"):
        PairwiseMCLLoss()(np.zeros(4, np.int32), y_pred)


# ---------------------------------------------------------------------------------------------
# Other backends and several replicas (subprocesses: the backend and the logical devices are fixed at start-up)
# ---------------------------------------------------------------------------------------------

_JAX = textwrap.dedent('''
    import json, os
    os.environ["KERAS_BACKEND"] = "jax"
    import jax, numpy as np
    from keras_cwsn.losses import PairwiseMCLLoss
    loss = PairwiseMCLLoss()
    y_true, y_pred = (np.array(v, dtype) for v, dtype in zip(json.loads(input()), ("int32", "float32")))
    f = lambda yp: loss(y_true, yp)
    value, grad = jax.value_and_grad(f)(y_pred)
    jit_value, jit_grad = jax.jit(jax.value_and_grad(f))(y_pred)
    print("RESULTS " + json.dumps([float(value), np.asarray(grad).tolist(), float(jit_value),
                                   np.asarray(jit_grad).tolist()]))
''')

_MIRRORED = TWO_CPU_REPLICAS + textwrap.dedent('''
    import json
    import numpy as np
    from keras_cwsn.losses import PairwiseMCLLoss

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 5)).astype("float32")
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1], "float32")  # each replica alone would see one class only

    out = {}
    for reduction in ("sum_over_batch_size", "sum"):
        loss = PairwiseMCLLoss(reduction=reduction)
        x = tf.constant(logits)
        with tf.GradientTape() as tape:
            tape.watch(x)
            single = loss(labels, x)
        single_grad = tape.gradient(single, x).numpy()

        @tf.function
        def replica_step(y_true, y_pred):
            def step(y_true, y_pred):
                with tf.GradientTape() as tape:
                    tape.watch(y_pred)
                    value = loss(y_true, y_pred)  # sum_over_batch_size: Keras scales by 1 / replicas
                return value, tape.gradient(value, y_pred)
            return mirrored.run(step, args=(y_true, y_pred))

        value, grad = replica_step(per_replica(mirrored, labels), per_replica(mirrored, logits))
        total = float(mirrored.reduce("SUM", value, axis=None))
        grads = np.concatenate([g.numpy() for g in mirrored.experimental_local_results(grad)])
        out[reduction] = [float(single), total, float(np.abs(grads - single_grad).max()),
                          float(np.abs(single_grad).max())]
    print("RESULTS " + json.dumps(out))
''')


def test_jax_backend_value_and_gradient_match_reference():
    """The loss on JAX (value and gradient, eager and jit) from any environment that has JAX: in the
    TensorFlow one, whose tests above run on TensorFlow, this is where JAX is checked."""
    pytest.importorskip("jax")
    y_true, y_pred = make_inputs("labels", True, seed=17)
    value, grad, jit_value, jit_grad = child_results(_JAX, stdin=json.dumps([y_true.tolist(), y_pred.tolist()]))
    expected_grad = ref_grad(y_true, y_pred)
    for v, g in ((value, grad), (jit_value, jit_grad)):
        assert v == pytest.approx(ref_loss(y_true, y_pred), rel=1e-5)
        np.testing.assert_allclose(np.array(g), expected_grad, rtol=1e-3, atol=2e-6)


@tensorflow_backend_only("tf.distribute MirroredStrategy replicas")
def test_two_replicas_see_the_global_batch():
    """Under MirroredStrategy the loss all-gathers the replicas' slices (as PairwiseKLLoss does): the loss the
    optimizer minimises and the per-example gradients equal one device's on the whole batch, for both the
    default reduction (scaled by 1 / replicas, as fit does) and reduction="sum" (scaled inside the loss)."""
    results = child_results(_MIRRORED)
    for reduction, (single, mirrored, grad_diff, grad_max) in results.items():
        assert mirrored == pytest.approx(single, rel=1e-6), reduction
        assert grad_diff <= 1e-6 * max(1.0, grad_max), reduction
