"""Datasets: one entry point (`load`) from a name to batched `(image, {output: labels})` tf.data.

The names below are imported on first use, so that `python -m keras_cwsn.data.birdsnap download`
starts without loading TensorFlow.
"""

import importlib

_EXPORTS = {
    "pipeline": ("DATASETS", "SPLITS", "DatasetUnavailableError", "Split", "dataset_info", "load_split",
                 "holdout_mask", "preprocessing_stats", "make_pipeline", "load"),
    "info": ("DatasetInfo",),
}
__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name):
    for module, names in _EXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(f"keras_cwsn.data.{module}"), name)
    raise AttributeError(f"module 'keras_cwsn.data' has no attribute {name!r}")
