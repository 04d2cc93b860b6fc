"""Clustering metrics (Hungarian accuracy, NMI, purity), the spread over seeds, and a callback that logs them.

Metrics are NumPy/SciPy/scikit-learn on `predict()` output, outside the graph. The callback
(`ClusteringMetrics`, in `keras_cwsn.clustering_callback`) is imported on first use: it needs Keras,
the figures do not, so `report` reads them without loading Keras or TensorFlow.
"""

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import confusion_matrix, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from keras_cwsn._lazy import lazy_getattr
from keras_cwsn.constants import CLUSTER_OUTPUT, PREDICT_BATCH

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


def hierarchy_cluster_report(y_true, y_cluster, mapping, fine_to_coarse):
    """`clustering_report` plus `coarse_agreement`: what training records of a clusterer and `evaluate` prints."""
    return {**clustering_report(y_true, y_cluster, mapping),
            **coarse_agreement(y_true, y_cluster, mapping, fine_to_coarse)}


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


def seed_std(values):
    """The sample standard deviation over seeds (n - 1: a handful of seeds estimates a spread), None for one seed."""
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if values.size > 1 else None


def predict_clusters(model, data, output=CLUSTER_OUTPUT, batch_size=PREDICT_BATCH):
    """Cluster id (argmax of the named output) for every example of `data` (array or dataset of images)."""
    predictions = model.predict(data, batch_size=batch_size if not _is_dataset(data) else None, verbose=0)
    if isinstance(predictions, dict):
        if output not in predictions:
            raise ValueError(f"Model has no output {output!r}; outputs: {sorted(predictions)}.")
        predictions = predictions[output]
    return np.argmax(predictions, axis=-1)


def _is_dataset(data):
    return not isinstance(data, np.ndarray)


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


__getattr__ = lazy_getattr("keras_cwsn", {"clustering_callback": ("ClusteringMetrics",)})
