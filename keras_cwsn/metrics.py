"""Clustering metrics (Hungarian accuracy, NMI, purity) and a callback that logs them every epoch.

Metrics are NumPy/SciPy/scikit-learn on `predict()` output, outside the graph.
"""

import time

import keras
import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import confusion_matrix, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

NMI_AVERAGE = "arithmetic"  # scikit-learn's default: I(Y;C) / mean(H(Y), H(C)); stated in the README


def _as_labels(y_true, y_cluster):
    y_true = np.asarray(y_true).reshape(-1)
    y_cluster = np.asarray(y_cluster).reshape(-1)
    if y_true.shape != y_cluster.shape:
        raise ValueError(f"y_true and y_cluster differ in length: {y_true.shape[0]} vs {y_cluster.shape[0]}.")
    if y_true.size == 0:
        raise ValueError("Clustering metrics need at least one example; received empty arrays.")
    for name, y in (("y_true", y_true), ("y_cluster", y_cluster)):
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise ValueError(f"{name} must hold non-negative integer labels; received dtype {y.dtype}, min {y.min()}.")
    return y_true, y_cluster


def hungarian_mapping(y_true, y_cluster, num_clusters=None, num_classes=None):
    """Cluster -> class map maximising matches (Hungarian on the class x cluster confusion matrix).

    Fit it on the training split and reuse it on the test split. With more clusters than classes,
    the clusters left unmatched by the one-to-one assignment are mapped to their majority class.

    Returns:
        int64 array of length `num_clusters` (default: max cluster id + 1): class of each cluster.
    """
    y_true, y_cluster = _as_labels(y_true, y_cluster)
    num_clusters = int(max(num_clusters or 0, y_cluster.max() + 1))
    num_classes = int(max(num_classes or 0, y_true.max() + 1))
    counts = np.zeros((num_classes, num_clusters), dtype=np.int64)
    np.add.at(counts, (y_true, y_cluster), 1)
    class_idx, cluster_idx = linear_sum_assignment(-counts)
    mapping = counts.argmax(axis=0).astype(np.int64)  # majority class, for unmatched clusters
    mapping[cluster_idx] = class_idx
    return mapping


def map_clusters(y_cluster, mapping):
    """Apply a cluster -> class map; clusters it doesn't know raise an error naming them."""
    y_cluster = np.asarray(y_cluster).reshape(-1)
    unknown = np.unique(y_cluster[(y_cluster < 0) | (y_cluster >= len(mapping))])
    if unknown.size:
        raise ValueError(f"Cluster ids {unknown.tolist()} are not in the mapping (it has {len(mapping)} clusters).")
    return np.asarray(mapping)[y_cluster]


def cluster_accuracy(y_true, y_cluster, mapping=None):
    """Fraction of examples whose cluster maps to their class (Hungarian mapping fitted here if not given)."""
    y_true, y_cluster = _as_labels(y_true, y_cluster)
    if mapping is None:
        mapping = hungarian_mapping(y_true, y_cluster)
    return float(np.mean(map_clusters(y_cluster, mapping) == y_true))


def nmi(y_true, y_cluster):
    """Normalised mutual information, arithmetic-mean normalisation (scikit-learn's default)."""
    y_true, y_cluster = _as_labels(y_true, y_cluster)
    return float(normalized_mutual_info_score(y_true, y_cluster, average_method=NMI_AVERAGE))


def purity(y_true, y_cluster):
    """Fraction of examples that belong to their cluster's majority class."""
    y_true, y_cluster = _as_labels(y_true, y_cluster)
    return float(contingency_matrix(y_true, y_cluster).max(axis=0).sum() / y_true.size)


def cluster_confusion(y_true, y_cluster, mapping, num_classes=None):
    """counts[class, mapped class]: where each class's examples land once every cluster is read as its class.

    The diagonal is what Hungarian accuracy counts; a large off-diagonal cell shows two classes
    sharing one cluster (a merge), which accuracy alone cannot tell from scattered errors.
    """
    y_true, y_cluster = _as_labels(y_true, y_cluster)
    mapped = map_clusters(y_cluster, mapping)
    size = int(max(num_classes or 0, y_true.max() + 1, mapped.max() + 1))
    return confusion_matrix(y_true, mapped, labels=np.arange(size))


def clustering_report(y_true, y_cluster, mapping=None):
    """All clustering figures as a dict: cluster_accuracy, nmi, purity."""
    return {
        "cluster_accuracy": cluster_accuracy(y_true, y_cluster, mapping),
        "nmi": nmi(y_true, y_cluster),
        "purity": purity(y_true, y_cluster),
    }


def coarse_agreement(y_true, y_cluster, mapping, fine_to_coarse):
    """Whether clusters follow the hierarchy: shares of examples whose cluster maps to a class of their coarse class.

    Returns `coarse_agreement` (over all examples: mapped class in the true coarse class, the right
    class included) and `coarse_agreement_of_errors` (over the examples mapped to a wrong class: the
    share that stays in the true coarse class; chance is about (classes per group - 1) / (classes - 1)).
    """
    y_true, y_cluster = _as_labels(y_true, y_cluster)
    to_coarse = np.asarray(fine_to_coarse)
    predicted = map_clusters(y_cluster, mapping)
    same = to_coarse[predicted] == to_coarse[y_true]
    wrong = predicted != y_true
    return {"coarse_agreement": float(np.mean(same)),
            "coarse_agreement_of_errors": float(np.mean(same[wrong])) if wrong.any() else None}


def pair_separability(train_features, train_second, eval_features, eval_second):
    """How well a linear classifier tells two classes apart on features: (train accuracy, eval accuracy).

    Logistic regression on standardised features, fitted on the training images of the two classes and
    scored on the evaluated ones. When a clusterer merges two classes, a hidden layer that still separates
    them says the last layer merged them, not the representation.

    Args:
        train_features, eval_features: float arrays (N, D) and (M, D).
        train_second, eval_second: bool arrays (N,) and (M,): whether each image is of the second class.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_features, eval_features = np.asarray(train_features), np.asarray(eval_features)
    train_second, eval_second = np.asarray(train_second, bool), np.asarray(eval_second, bool)
    if train_features.ndim != 2 or eval_features.shape[1:] != train_features.shape[1:]:
        raise ValueError(f"Features must be (N, D) on both sides; received {train_features.shape} and "
                         f"{eval_features.shape}.")
    if len(train_second) != len(train_features) or len(eval_second) != len(eval_features):
        raise ValueError("Each feature row needs one class flag.")
    if train_second.all() or not train_second.any() or len(eval_second) == 0:
        raise ValueError(f"The probe needs training images of both classes ({int(train_second.sum())} of the second, "
                         f"{int((~train_second).sum())} of the first) and at least one evaluated image.")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_features, train_second)
    return float(probe.score(train_features, train_second)), float(probe.score(eval_features, eval_second))


def predict_clusters(model, data, output="fine_fc3", batch_size=256):
    """Cluster id (argmax of the named output) for every example of `data` (array or dataset of images)."""
    predictions = model.predict(data, batch_size=batch_size if not _is_dataset(data) else None, verbose=0)
    if isinstance(predictions, dict):
        if output not in predictions:
            raise ValueError(f"Model has no output {output!r}; outputs: {sorted(predictions)}.")
        predictions = predictions[output]
    return np.argmax(predictions, axis=-1)


def _is_dataset(data):
    return not isinstance(data, np.ndarray)


class ClusteringMetrics(keras.callbacks.Callback):
    """Put clustering accuracy, NMI and purity of one output into the epoch logs.

    Placed before TensorBoard/CSVLogger in the callback list, the figures reach them and History.

    Args:
        images: array (N, H, W, 3) or a dataset yielding image batches (no labels).
        labels: int array (N,). Labels at the output's hierarchy level.
        output: str. Model output to cluster by (argmax). Defaults to `"fine_fc3"`.
        prefix: str. Prefix of the log keys, e.g. `"val_"`. Defaults to `"val_"`.
        every: int. Compute every this many epochs, and at the first and last epoch of each `fit`
            (the first fixes CSVLogger's columns: keys missing from its first row are never written,
            also when a resumed run appends). Defaults to 1.
        mapping_images, mapping_labels: optional data on which the Hungarian mapping is fitted
            (the training split); by default it is fitted on the evaluated data itself.
    """

    def __init__(self, images, labels, output="fine_fc3", prefix="val_", every=1, mapping_images=None,
                 mapping_labels=None, batch_size=256):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"every must be >= 1. Received: every={every}")
        self.images, self.labels = images, np.asarray(labels).astype(np.int64)
        self.output, self.prefix, self.every = output, prefix, int(every)
        self.mapping_images, self.mapping_labels = mapping_images, mapping_labels
        self.batch_size = batch_size

    def on_train_begin(self, logs=None):
        self._first = True

    def due(self, epoch, epochs, first=False):
        """Whether epoch `epoch` (from 0) of `epochs` gets the figures: every `every` epochs, the last, and the
        first of each `fit` (`first`)."""
        return first or (epoch + 1) % self.every == 0 or epoch + 1 == epochs

    def on_epoch_end(self, epoch, logs=None):
        first, self._first = getattr(self, "_first", True), False
        if logs is None or not self.due(epoch, (self.params or {}).get("epochs"), first):
            return
        start = time.perf_counter()
        clusters = predict_clusters(self.model, self.images, self.output, self.batch_size)
        train_clusters = None
        if self.mapping_images is not None:
            train_clusters = predict_clusters(self.model, self.mapping_images, self.output, self.batch_size)
        for key, value in epoch_figures(self.labels, clusters, self.mapping_labels, train_clusters).items():
            logs[self.prefix + key] = value
        logs["figures_seconds"] = round(time.perf_counter() - start, 3)  # what these figures cost the epoch


def epoch_figures(labels, clusters, mapping_labels=None, mapping_clusters=None):
    """The per-epoch clustering figures, the mapping fitted on (`mapping_labels`, `mapping_clusters`) when given
    (the training sample), else on the evaluated data itself."""
    mapping = None
    if mapping_clusters is not None:
        mapping = _extend(hungarian_mapping(mapping_labels, mapping_clusters, num_clusters=None), clusters)
    return clustering_report(labels, clusters, mapping)


def _extend(mapping, clusters):
    """Map clusters never seen when fitting the mapping to class -1, so they count as errors instead of crashing."""
    size = int(max(len(mapping), np.max(clusters) + 1))
    extended = np.zeros(size, dtype=np.int64)
    extended[: len(mapping)] = mapping
    if size > len(mapping):
        extended[len(mapping):] = -1
    return extended
