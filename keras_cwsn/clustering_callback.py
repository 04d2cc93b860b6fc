"""`ClusteringMetrics`: a callback that puts clustering accuracy, NMI and purity into each epoch's logs.

Apart from `keras_cwsn.metrics` (which re-exports it) because it needs Keras and the figures do not.
"""

import time

import keras
import numpy as np

from keras_cwsn.constants import CLUSTER_OUTPUT, PREDICT_BATCH
from keras_cwsn.metrics import epoch_figures, predict_clusters


class ClusteringMetrics(keras.callbacks.Callback):
    """Put clustering accuracy, NMI and purity of one output into the epoch logs.

    Placed before TensorBoard/CSVLogger in the callback list, the figures reach them and History.

    Args:
        images: array (N, H, W, 3) or a dataset yielding image batches (no labels).
        labels: int array (N,). Labels at the output's hierarchy level.
        output: str. Model output to cluster by (argmax). Defaults to `CLUSTER_OUTPUT` (`"fine_fc3"`).
        prefix: str. Prefix of the log keys, e.g. `"val_"`. Defaults to `"val_"`.
        every: int. Compute every this many epochs, and at the first and last epoch of each `fit`
            (the first fixes CSVLogger's columns: keys missing from its first row are never written,
            also when a resumed run appends). Defaults to 1.
        mapping_images, mapping_labels: optional data on which the Hungarian mapping is fitted
            (the training split); by default it is fitted on the evaluated data itself.
    """

    def __init__(self, images, labels, output=CLUSTER_OUTPUT, prefix="val_", every=1, mapping_images=None,
                 mapping_labels=None, batch_size=PREDICT_BATCH):
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
