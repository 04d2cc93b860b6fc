"""keras-cwsn: Cluster-based Warm-Start Nets in Keras 3.

Pretrain a CNN as a clusterer with a pairwise KL-divergence contrastive loss at several layers and
hierarchy levels, warm-start a classifier from it, fine-tune. Names are imported on first use so
that light entry points (the Birdsnap downloader) don't load TensorFlow.
"""

from keras_cwsn._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "losses": ("PairwiseKLLoss", "pairwise_kl_loss", "PairwiseMCLLoss", "pairwise_mcl_loss", "pairwise_loss"),
    "metrics": ("cluster_accuracy", "hungarian_mapping", "nmi", "purity", "ClusteringMetrics"),
    "models": ("build_model",),
    "variants": ("VARIANTS",),
    "warmstart": ("WarmStart", "transfer_weights"),
    "training": ("run", "run_seeds"),
}
__all__ = [name for names in _EXPORTS.values() for name in names]

__getattr__ = lazy_getattr("keras_cwsn", _EXPORTS)
