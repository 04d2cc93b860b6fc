"""Tests for keras_cwsn.warmstart: the classifier starts where the clusterer left off."""

import keras
import numpy as np
import pytest

from conftest import random_images, softmax
from keras_cwsn.models import build_model
from keras_cwsn.warmstart import WarmStart, transfer_weights

NUM_FINE, NUM_COARSE = 4, 2
TRUNK_LAYERS = ["conv1", "conv1_bn", "conv2", "conv2_bn", "fc1", "fc1_bn", "fc2", "fc2_bn"]


def _images(n=16, seed=0):
    return random_images(n, (32, 32, 3), seed)


def _randomize(model, seed=0):
    """Random values for every weight (BN moving variance kept positive), so that copies are visible."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for w in layer.weights:
            value = rng.standard_normal(w.shape).astype(np.float32) * 0.2
            if "variance" in w.path:
                value = 0.5 + np.abs(value)
            w.assign(value)
    return model


def _clusterer(variant="A", seed=0, **kwargs):
    return _randomize(build_model("lenet", variant, num_fine=NUM_FINE, num_coarse=NUM_COARSE, **kwargs), seed)


def _classifier(seed=1, **kwargs):
    return _randomize(build_model("lenet", "ce", num_fine=NUM_FINE, **kwargs), seed)


def _predict(model, x, key):
    return model.predict(x, verbose=0)[key]


def _warm_start(clusterer, classifier, **kwargs):
    callback = WarmStart(clusterer, **kwargs)
    callback.set_model(classifier)
    callback.on_train_begin()
    return callback


def _weights(model, name):
    return [np.array(w) for w in model.get_layer(name).get_weights()]


def _assert_same_weights(a, b, name):
    for wa, wb in zip(_weights(a, name), _weights(b, name)):
        np.testing.assert_array_equal(wa, wb)


def test_hungarian_head_reproduces_the_clusterer():
    clusterer, classifier = _clusterer(), _classifier()
    x = _images()
    # Centre the clusterer's logits over the batch so that the images fall into several clusters.
    kernel, bias = _weights(clusterer, "fc3")
    clusterer.get_layer("fc3").set_weights([kernel, bias - _predict(clusterer, x, "fine_fc3").mean(axis=0)])
    logits = _predict(clusterer, x, "fine_fc3")
    clusters = logits.argmax(axis=-1)
    assert len(set(clusters)) > 1  # a real permutation test needs several clusters
    mapping = np.array([2, 3, 1, 0])  # cluster -> class; not its own inverse, so the direction matters
    assert not np.array_equal(np.argsort(mapping), mapping)
    callback = _warm_start(clusterer, classifier, head="hungarian", mapping=mapping)
    assert callback.head == "hungarian" and callback.done
    probs = _predict(classifier, x, "probabilities")
    np.testing.assert_array_equal(probs.argmax(axis=-1), mapping[clusters])
    # Class c's probability is the probability of the cluster mapped to c.
    expected = np.empty_like(probs)
    expected[:, mapping] = softmax(logits.astype(np.float64))
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
    for name in TRUNK_LAYERS:
        _assert_same_weights(classifier, clusterer, name)


def test_copy_head_gives_identical_fc3():
    clusterer, classifier = _clusterer(), _classifier()
    callback = _warm_start(clusterer, classifier, head="copy")
    assert sorted(callback.copied) == sorted(TRUNK_LAYERS + ["fc3"])
    for name in TRUNK_LAYERS + ["fc3"]:
        _assert_same_weights(classifier, clusterer, name)
    x = _images(4)
    np.testing.assert_allclose(_predict(classifier, x, "probabilities"),
                               softmax(_predict(clusterer, x, "fine_fc3").astype(np.float64)), rtol=1e-4, atol=1e-6)


def test_fresh_head_keeps_fc3_but_copies_the_trunk():
    clusterer, classifier = _clusterer(), _classifier()
    head_before = _weights(classifier, "fc3")
    callback = _warm_start(clusterer, classifier, head="fresh")
    assert "fc3" not in callback.copied
    for before, after in zip(head_before, _weights(classifier, "fc3")):
        np.testing.assert_array_equal(before, after)
    for name in TRUNK_LAYERS:
        _assert_same_weights(classifier, clusterer, name)


def test_side_branch_is_dropped_and_nothing_is_frozen():
    clusterer, classifier = _clusterer("D"), _classifier()
    copied = transfer_weights(clusterer, classifier, head="copy")
    assert sorted(copied) == sorted(TRUNK_LAYERS + ["fc3"])
    # fc1 comes from the clusterer's fc1, not from its side branch (both hold random, different values).
    assert not np.array_equal(_weights(clusterer, "fc1")[0], _weights(clusterer, "fc1_side")[0])
    _assert_same_weights(classifier, clusterer, "fc1")
    assert all(layer.trainable for layer in classifier.layers)
    non_trainable = {w.path for w in classifier.non_trainable_weights}
    assert all("moving_" in path for path in non_trainable)  # only BN statistics, as in a fresh model
    fresh = build_model("lenet", "ce", num_fine=NUM_FINE)
    assert len(classifier.trainable_weights) == len(fresh.trainable_weights)


def test_side_branch_is_skipped_even_where_the_target_has_one():
    """The skip itself: a target that has an `fc1_side` layer (a D-shaped model) keeps its own."""
    clusterer, target = _clusterer("D", seed=0), _clusterer("D", seed=1)
    side_before = _weights(target, "fc1_side")
    assert not np.array_equal(side_before[0], _weights(clusterer, "fc1_side")[0])  # a copy would show
    copied = transfer_weights(clusterer, target, head="copy")
    assert "fc1_side" not in copied
    for before, after in zip(side_before, _weights(target, "fc1_side")):
        np.testing.assert_array_equal(before, after)
    for name in TRUNK_LAYERS + ["fc3"]:
        _assert_same_weights(target, clusterer, name)


def test_callback_runs_in_fit_once():
    clusterer, classifier = _clusterer(), _classifier()
    classifier.compile(optimizer=keras.optimizers.SGD(0.0), loss={"probabilities": "sparse_categorical_crossentropy"})
    x = _images(8)
    y = {"probabilities": np.arange(8) % NUM_FINE}
    callback = WarmStart(clusterer, head="copy")
    classifier.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[callback])
    assert callback.done and "conv1" in callback.copied
    _assert_same_weights(classifier, clusterer, "fc3")  # lr 0: the copied head is unchanged
    # A second fit (resumed training) does not overwrite the fine-tuned weights.
    classifier.get_layer("fc3").set_weights([np.zeros_like(w) for w in _weights(classifier, "fc3")])
    classifier.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[callback])
    assert all(np.all(w == 0) for w in _weights(classifier, "fc3"))


def test_mismatched_layers_raise_and_name_them():
    clusterer, classifier = _clusterer(double=True), _classifier()
    with pytest.raises(ValueError, match="mismatched layers") as error:
        transfer_weights(clusterer, classifier, head="copy")
    message = str(error.value)
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        assert f"{name}:" in message
    # Different number of classes: only the head differs.
    other = _randomize(build_model("lenet", "A", num_fine=NUM_FINE + 1))
    with pytest.raises(ValueError, match="fc3: clusterer"):
        _warm_start(other, classifier, head="copy")


def test_classifier_layer_missing_from_clusterer_raises():
    clusterer = _clusterer()
    classifier = build_model("alexnet", "ce", num_fine=NUM_FINE, input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match="not in the clusterer"):
        transfer_weights(clusterer, classifier, head="copy")


@pytest.mark.parametrize("mapping", [None, [0, 0, 1, 2], [0, 1, 2], [0, 1, 2, 3, 4], [1, 2, 3, 4]])
def test_hungarian_needs_a_permutation(mapping):
    clusterer, classifier = _clusterer(), _classifier()
    fc3_before = _weights(classifier, "fc3")
    with pytest.raises(ValueError, match="mapping|permutation"):
        transfer_weights(clusterer, classifier, head="hungarian", mapping=mapping)
    for before, after in zip(fc3_before, _weights(classifier, "fc3")):  # nothing half-copied
        np.testing.assert_array_equal(before, after)


def test_unknown_head_raises():
    with pytest.raises(ValueError, match="Unknown head"):
        WarmStart(_clusterer(), head="permute")
    with pytest.raises(ValueError, match="Unknown head"):
        transfer_weights(_clusterer(), _classifier(), head="random")
