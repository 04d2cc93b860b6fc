"""Warm start: move a trained clusterer's weights into a classifier before its first step."""

import keras
import numpy as np

from keras_cwsn.constants import HEADS, LAST_LAYER
from keras_cwsn.variants import SIDE_BRANCH_LAYERS


def transfer_weights(clusterer, classifier, head="hungarian", mapping=None):
    """Copy every shared layer's weights (matched by name, shapes checked) from clusterer to classifier.

    Side branches (`fc1_side`) are dropped and nothing is frozen. The fc3 head is copied with its
    units permuted so that class c takes the cluster that `mapping` assigns to c (`"hungarian"`),
    copied as is (`"copy"`), or left as freshly initialised (`"fresh"`).

    Args:
        clusterer: keras.Model. Trained clusterer (any variant).
        classifier: keras.Model. Classifier with the same trunk (variant `ce`).
        head: str. One of `"hungarian"`, `"copy"`, `"fresh"`. Defaults to `"hungarian"`.
        mapping: int array (num_clusters,). Cluster -> class map (from `hungarian_mapping`), needed
            for `"hungarian"`; it must be a permutation.

    Returns:
        list of str: names of the layers whose weights were copied.
    """
    if head not in HEADS:
        raise ValueError(f"Unknown head. Expected one of {', '.join(HEADS)}. Received: head={head!r}")
    source = {layer.name: layer for layer in clusterer.layers if layer.weights}
    problems, plan = [], []
    for layer in classifier.layers:
        if not layer.weights:
            continue
        if layer.name not in source:
            problems.append(f"{layer.name}: not in the clusterer")
            continue
        src_shapes = [tuple(w.shape) for w in source[layer.name].weights]
        dst_shapes = [tuple(w.shape) for w in layer.weights]
        if src_shapes != dst_shapes:
            problems.append(f"{layer.name}: clusterer {src_shapes} vs classifier {dst_shapes}")
            continue
        plan.append(layer)
    if problems:
        raise ValueError("Cannot warm-start the classifier from the clusterer; mismatched layers:\n  "
                         + "\n  ".join(problems))
    order = None
    if head == "hungarian":
        order = _head_order(mapping, classifier.get_layer(LAST_LAYER).weights[0].shape[-1])
    copied = []
    for layer in plan:
        if layer.name in SIDE_BRANCH_LAYERS:
            continue
        weights = source[layer.name].get_weights()
        if layer.name == LAST_LAYER:
            if head == "fresh":
                continue
            if order is not None:
                weights = [w[..., order] for w in weights]
        layer.set_weights(weights)
        copied.append(layer.name)
    return copied


def _head_order(mapping, num_classes):
    """Column order for the head: entry c is the cluster mapped to class c."""
    if mapping is None:
        raise ValueError('head="hungarian" needs the cluster -> class mapping (metrics.hungarian_mapping).')
    mapping = np.asarray(mapping, dtype=np.int64).reshape(-1)
    if len(mapping) != num_classes or sorted(mapping.tolist()) != list(range(num_classes)):
        raise ValueError(
            f'head="hungarian" needs a permutation of {num_classes} classes; received mapping {mapping.tolist()}.'
        )
    return np.argsort(mapping)


class WarmStart(keras.callbacks.Callback):
    """On the classifier's `fit`, at `on_train_begin`, load a trained clusterer's weights into it.

    Freezes nothing; see `transfer_weights` for the head options. The copied layer names are kept
    in `self.copied` (and the head choice in `self.head`) for the run's records.

    Example:
    ```python
    classifier.fit(data, callbacks=[WarmStart(clusterer, head="hungarian", mapping=mapping)])
    ```
    """

    def __init__(self, clusterer, head="hungarian", mapping=None):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"Unknown head. Expected one of {', '.join(HEADS)}. Received: head={head!r}")
        self.clusterer, self.head, self.mapping = clusterer, head, mapping
        self.copied = []
        self.done = False

    def on_train_begin(self, logs=None):
        if self.done:  # a resumed fit must not overwrite fine-tuned weights
            return
        self.copied = transfer_weights(self.clusterer, self.model, self.head, self.mapping)
        self.done = True
