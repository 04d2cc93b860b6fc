"""keras-cwsn: Cluster-based Warm-Start Nets in Keras 3.

Pretrain a CNN as a clusterer with a pairwise KL-divergence contrastive loss at several layers and
hierarchy levels, warm-start a classifier from it, fine-tune. Names are imported on first use so
that light entry points (the Birdsnap downloader) don't load TensorFlow.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "losses": ("PairwiseKLLoss", "pairwise_kl_loss"),
    "metrics": ("cluster_accuracy", "hungarian_mapping", "nmi", "purity", "ClusteringMetrics"),
    "models": ("build_model", "VARIANTS"),
    "warmstart": ("WarmStart", "transfer_weights"),
    "training": ("run", "run_seeds"),
}
__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name):
    for module, names in _EXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(f"keras_cwsn.{module}"), name)
    raise AttributeError(f"module 'keras_cwsn' has no attribute {name!r}")
