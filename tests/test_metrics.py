"""Tests for keras_cwsn.metrics: hand-made clusterings with known answers, and the callback in fit."""

import csv
import math

import keras
import numpy as np
import pytest

from conftest import confusion_counts, tiny_clusterer
from keras_cwsn.losses import PairwiseKLLoss
from keras_cwsn.metrics import (
    ClusteringMetrics,
    cluster_accuracy,
    cluster_confusion,
    clustering_report,
    hungarian_mapping,
    map_clusters,
    nmi,
    pair_separability,
    purity,
)

# ---------------------------------------------------------------------------------------------
# Hand-made cases
# ---------------------------------------------------------------------------------------------


def test_permuted_perfect_clustering_scores_one():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_cluster = np.array([2, 2, 0, 0, 1, 1, 1])  # cluster 0 is class 1, 1 is 2, 2 is 0
    np.testing.assert_array_equal(hungarian_mapping(y_true, y_cluster), [1, 2, 0])
    assert cluster_accuracy(y_true, y_cluster) == 1.0
    assert purity(y_true, y_cluster) == 1.0
    assert nmi(y_true, y_cluster) == pytest.approx(1.0)
    assert clustering_report(y_true, y_cluster) == pytest.approx(
        {"cluster_accuracy": 1.0, "nmi": 1.0, "purity": 1.0})


def test_hand_computed_purity_accuracy_and_nmi():
    y_true = [0, 0, 0, 1, 1, 2]
    y_cluster = [0, 0, 1, 1, 1, 1]
    # Contingency (class x cluster): class 0 -> (2, 1), class 1 -> (0, 2), class 2 -> (0, 1).
    # Purity: cluster 0's majority is class 0 (2), cluster 1's is class 1 (2): 4 / 6.
    assert purity(y_true, y_cluster) == pytest.approx(4 / 6)
    # Hungarian: cluster 0 -> class 0, cluster 1 -> class 1: 4 / 6 right.
    np.testing.assert_array_equal(hungarian_mapping(y_true, y_cluster), [0, 1])
    assert cluster_accuracy(y_true, y_cluster) == pytest.approx(4 / 6)
    # NMI with arithmetic averaging: I(Y; C) / ((H(Y) + H(C)) / 2), natural logs.
    h_y = -(3 / 6 * math.log(3 / 6) + 2 / 6 * math.log(2 / 6) + 1 / 6 * math.log(1 / 6))
    h_c = -(2 / 6 * math.log(2 / 6) + 4 / 6 * math.log(4 / 6))
    mutual = (2 / 6 * math.log((2 / 6) / (3 / 6 * 2 / 6))     # class 0, cluster 0
              + 1 / 6 * math.log((1 / 6) / (3 / 6 * 4 / 6))   # class 0, cluster 1
              + 2 / 6 * math.log((2 / 6) / (2 / 6 * 4 / 6))   # class 1, cluster 1
              + 1 / 6 * math.log((1 / 6) / (1 / 6 * 4 / 6)))  # class 2, cluster 1
    expected = mutual / ((h_y + h_c) / 2)
    assert 0.0 < expected < 1.0
    assert nmi(y_true, y_cluster) == pytest.approx(expected, rel=1e-12)


def test_single_cluster_has_zero_nmi_and_majority_purity():
    y_true = [0, 1, 1, 1]
    y_cluster = [0, 0, 0, 0]
    assert nmi(y_true, y_cluster) == pytest.approx(0.0)
    assert purity(y_true, y_cluster) == pytest.approx(3 / 4)
    assert cluster_accuracy(y_true, y_cluster) == pytest.approx(3 / 4)


def test_mapping_fitted_on_train_is_reused_on_test():
    train_true, train_cluster = [0, 0, 1, 1], [1, 1, 0, 0]
    mapping = hungarian_mapping(train_true, train_cluster)
    np.testing.assert_array_equal(mapping, [1, 0])
    test_true, test_cluster = [0, 1, 1], [0, 0, 1]
    # With the train mapping, clusters (0, 0, 1) read as classes (1, 1, 0): one right out of three.
    np.testing.assert_array_equal(map_clusters(test_cluster, mapping), [1, 1, 0])
    assert cluster_accuracy(test_true, test_cluster, mapping=mapping) == pytest.approx(1 / 3)
    # Fitting the mapping on the test split itself would flatter it (2 / 3): not what we report.
    assert cluster_accuracy(test_true, test_cluster) == pytest.approx(2 / 3)
    report = clustering_report(test_true, test_cluster, mapping=mapping)
    assert report["cluster_accuracy"] == pytest.approx(1 / 3)


def test_more_clusters_than_classes_map_unmatched_clusters_to_their_majority():
    y_true = [0, 0, 0, 1, 1, 1, 1, 1, 0]
    y_cluster = [0, 0, 1, 2, 2, 2, 3, 3, 3]
    # One-to-one: class 0 <- cluster 0, class 1 <- cluster 2. Unmatched: cluster 1 (all class 0)
    # and cluster 3 (two of class 1, one of class 0) take their majority class.
    mapping = hungarian_mapping(y_true, y_cluster)
    np.testing.assert_array_equal(mapping, [0, 0, 1, 1])
    assert mapping.dtype == np.int64
    assert cluster_accuracy(y_true, y_cluster) == pytest.approx(8 / 9)
    assert purity(y_true, y_cluster) == pytest.approx(8 / 9)
    assert len(hungarian_mapping(y_true, y_cluster, num_clusters=6)) == 6


def test_more_classes_than_clusters():
    y_true = [0, 1, 2, 2]
    y_cluster = [0, 0, 1, 1]
    mapping = hungarian_mapping(y_true, y_cluster)
    assert mapping[1] == 2 and mapping[0] in (0, 1)
    assert cluster_accuracy(y_true, y_cluster) == pytest.approx(3 / 4)


@pytest.mark.parametrize("metric", [cluster_accuracy, nmi, purity, hungarian_mapping, clustering_report])
def test_bad_labels_raise(metric):
    with pytest.raises(ValueError, match="differ in length"):
        metric([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="at least one example"):
        metric([], [])
    with pytest.raises(ValueError, match="non-negative integer"):
        metric([0, -1, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="non-negative integer"):
        metric([0, 1, 1], [0, 1, -2])
    with pytest.raises(ValueError, match="non-negative integer"):
        metric([0.0, 1.5, 1.0], [0, 1, 1])


def test_mapping_that_misses_a_cluster_raises():
    with pytest.raises(ValueError, match=r"Cluster ids \[3\] are not in the mapping"):
        cluster_accuracy([0, 1, 1], [0, 1, 3], mapping=np.array([0, 1]))


def test_cluster_confusion_is_the_contingency_with_columns_read_through_the_mapping():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 200)
    clusters = rng.integers(0, 4, 200)
    mapping = np.array([2, 0, 3, 1])
    counts = cluster_confusion(labels, clusters, mapping)
    expected = np.zeros((4, 4), dtype=np.int64)
    for k in range(4):  # cluster k's column lands in the column of the class it is read as
        expected[:, mapping[k]] += confusion_counts(labels, clusters, 4)[:, k]
    np.testing.assert_array_equal(counts, expected)
    assert np.trace(counts) / 200 == pytest.approx(cluster_accuracy(labels, clusters, mapping))


def test_cluster_confusion_shows_a_merge_and_keeps_empty_classes():
    # classes 0 and 1 share cluster 0; cluster 1 holds nothing; class 2 (never seen) still has its row
    counts = cluster_confusion([0, 0, 1, 1], [0, 0, 0, 0], mapping=np.array([0, 1]), num_classes=3)
    np.testing.assert_array_equal(counts, [[2, 0, 0], [2, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match=r"Cluster ids \[2\] are not in the mapping"):
        cluster_confusion([0, 1], [0, 2], mapping=np.array([0, 1]))


def test_pair_separability_reads_a_separating_direction_and_sees_none_in_noise():
    rng = np.random.default_rng(0)
    second_train, second_eval = rng.random(400) < 0.5, rng.random(200) < 0.5
    noise_train, noise_eval = rng.standard_normal((400, 8)), rng.standard_normal((200, 8))
    # one feature shifted by the class (far apart, hidden among noise features): a linear probe finds it
    shifted_train, shifted_eval = noise_train.copy(), noise_eval.copy()
    shifted_train[:, 5] += 10.0 * second_train
    shifted_eval[:, 5] += 10.0 * second_eval
    assert pair_separability(shifted_train, second_train, shifted_eval, second_eval) == (1.0, 1.0)
    # features that say nothing of the class: held-out accuracy near chance, however well it fits the training side
    _, held_out = pair_separability(noise_train, second_train, noise_eval, second_eval)
    assert 0.35 < held_out < 0.65


def test_pair_separability_rejects_what_it_cannot_fit():
    features = np.zeros((4, 3))
    with pytest.raises(ValueError, match="training images of both classes"):
        pair_separability(features, [True] * 4, features, [True] * 4)
    with pytest.raises(ValueError, match=r"\(N, D\) on both sides"):
        pair_separability(features, [True, False] * 2, np.zeros((4, 2)), [True, False] * 2)
    with pytest.raises(ValueError, match="one class flag"):
        pair_separability(features, [True, False], features, [True, False] * 2)


# ---------------------------------------------------------------------------------------------
# ClusteringMetrics callback
# ---------------------------------------------------------------------------------------------

KEYS = ("val_cluster_accuracy", "val_nmi", "val_purity")


def _tiny_clusterer(num_clusters=3):
    model = tiny_clusterer(num_clusters)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss={"fine_fc3": PairwiseKLLoss()})
    return model


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 3, size=n)


class _LogKeys(keras.callbacks.Callback):
    """Records which keys each epoch's logs held (placed after ClusteringMetrics)."""

    def __init__(self):
        super().__init__()
        self.keys = []

    def on_epoch_end(self, epoch, logs=None):
        self.keys.append(set(logs or {}))


def test_callback_logs_figures_into_history():
    keras.utils.set_random_seed(0)
    x, y = _data()
    x_val, y_val = _data(12, seed=1)
    model = _tiny_clusterer()
    history = model.fit(x, {"fine_fc3": y}, epochs=1, batch_size=8, verbose=0,
                        callbacks=[ClusteringMetrics(x_val, y_val)])
    for key in KEYS:
        assert key in history.history, sorted(history.history)
        assert len(history.history[key]) == 1 and 0.0 <= history.history[key][0] <= 1.0
    clusters = np.argmax(model.predict(x_val, verbose=0)["fine_fc3"], axis=-1)
    expected = clustering_report(y_val, clusters)
    for name, value in expected.items():
        assert history.history["val_" + name][0] == pytest.approx(value)


def test_callback_every_skips_epochs_but_computes_the_first_and_last(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = _data()
    model = _tiny_clusterer()
    recorder = _LogKeys()
    csv_path = str(tmp_path / "history.csv")
    history = model.fit(x, {"fine_fc3": y}, epochs=5, batch_size=8, verbose=0,
                        callbacks=[ClusteringMetrics(x, y, every=3, prefix="train_"), recorder,
                                   keras.callbacks.CSVLogger(csv_path, append=True)])
    present = [all("train_" + k[4:] in keys for k in KEYS) for keys in recorder.keys]
    assert present == [True, False, True, False, True]  # the first, every 3rd, the last
    assert len(history.history["train_nmi"]) == 3
    # CSVLogger takes its columns from the first epoch: the figures must be among them, also when a
    # resumed fit appends to the same file.
    model.fit(x, {"fine_fc3": y}, initial_epoch=5, epochs=7, batch_size=8, verbose=0,
              callbacks=[ClusteringMetrics(x, y, every=3, prefix="train_"),
                         keras.callbacks.CSVLogger(csv_path, append=True)])
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [row["train_nmi"] != "NA" for row in rows] == [True, False, True, False, True, True, True]


def test_callback_mapping_fitted_on_training_data():
    keras.utils.set_random_seed(0)
    x, y = _data()
    x_val, y_val = _data(12, seed=1)
    model = _tiny_clusterer()
    history = model.fit(x, {"fine_fc3": y}, epochs=1, batch_size=8, verbose=0,
                        callbacks=[ClusteringMetrics(x_val, y_val, mapping_images=x, mapping_labels=y)])
    train_clusters = np.argmax(model.predict(x, verbose=0)["fine_fc3"], axis=-1)
    val_clusters = np.argmax(model.predict(x_val, verbose=0)["fine_fc3"], axis=-1)
    assert set(val_clusters) <= set(train_clusters)  # else the callback scores unseen clusters as errors
    mapping = hungarian_mapping(y, train_clusters)
    expected = np.mean(mapping[val_clusters] == y_val)
    assert history.history["val_cluster_accuracy"][0] == pytest.approx(expected)


def _cluster_reader(num_clusters):
    """A model whose `fine_fc3` is its input: fed one-hot rows, it puts each example in the cluster we choose."""
    inputs = keras.Input((num_clusters,), name="x")
    model = keras.Model(inputs, {"fine_fc3": keras.layers.Identity(name="fc3")(inputs)})
    return model


def _one_hot(clusters, num_clusters):
    return np.eye(num_clusters, dtype=np.float32)[np.asarray(clusters)]


def _epoch_logs(callback, model, epochs=1):
    callback.set_model(model)
    callback.set_params({"epochs": epochs})
    logs = {}
    callback.on_epoch_end(epochs - 1, logs)
    return logs


def test_callback_uses_the_training_mapping_not_one_fitted_on_the_evaluated_data():
    # Training split: cluster k holds two of class k and one other -> mapping cluster k -> class k (6 of 9 right).
    train_clusters, train_labels = [0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 2, 2, 2, 0]
    np.testing.assert_array_equal(hungarian_mapping(train_labels, train_clusters), [0, 1, 2])
    # Evaluated split: the clusters hold classes 1, 2, 0. The training mapping reads them as 0, 1, 2:
    # nothing right (0 / 6). A mapping fitted on this split itself would claim 6 / 6.
    eval_clusters, eval_labels = [0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 0, 0]
    model = _cluster_reader(3)
    logs = _epoch_logs(ClusteringMetrics(_one_hot(eval_clusters, 3), eval_labels, mapping_images=_one_hot(
        train_clusters, 3), mapping_labels=train_labels), model)
    assert logs["val_cluster_accuracy"] == 0.0
    assert logs["val_nmi"] == pytest.approx(1.0) and logs["val_purity"] == 1.0  # no mapping in these
    self_fitted = _epoch_logs(ClusteringMetrics(_one_hot(eval_clusters, 3), eval_labels), model)
    assert self_fitted["val_cluster_accuracy"] == 1.0


def test_clusters_never_seen_in_training_count_as_errors():
    # Training uses clusters 0-2 only; the evaluated split also lands in cluster 3, which no class owns.
    train_clusters, train_labels = [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]
    eval_clusters, eval_labels = [0, 1, 2, 3, 3], [0, 1, 2, 0, 3]
    logs = _epoch_logs(ClusteringMetrics(_one_hot(eval_clusters, 4), eval_labels, mapping_images=_one_hot(
        train_clusters, 4), mapping_labels=train_labels), _cluster_reader(4))
    assert logs["val_cluster_accuracy"] == pytest.approx(3 / 5)  # the two cluster-3 examples are wrong
    assert logs["val_purity"] == pytest.approx(4 / 5)


def test_callback_rejects_bad_every():
    x, y = _data(4)
    with pytest.raises(ValueError, match="every must be >= 1"):
        ClusteringMetrics(x, y, every=0)


def test_coarse_agreement_counts_clusters_that_stay_in_the_true_family():
    from keras_cwsn.metrics import coarse_agreement

    fine_to_coarse = [0, 0, 1, 1]  # classes 0, 1 in group 0; 2, 3 in group 1
    y_true = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    mapping = np.array([0, 1, 2, 3])  # cluster k -> class k
    # right, sibling (same group), right, other group, right, right, sibling, other group
    clusters = np.array([0, 1, 1, 2, 2, 2, 2, 0])
    figures = coarse_agreement(y_true, clusters, mapping, fine_to_coarse)
    predicted_group = np.array(fine_to_coarse)[mapping[clusters]]
    true_group = np.array(fine_to_coarse)[y_true]
    assert figures["coarse_agreement"] == pytest.approx(np.mean(predicted_group == true_group)) == 6 / 8
    assert figures["coarse_agreement_of_errors"] == pytest.approx(2 / 4)  # 4 errors, 2 of them siblings
    perfect = coarse_agreement(y_true, y_true, mapping, fine_to_coarse)
    assert perfect == {"coarse_agreement": 1.0, "coarse_agreement_of_errors": None}
