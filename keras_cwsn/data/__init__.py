"""Datasets: the registry of names, their splits (`load_split`) and preprocessing pipelines (`make_pipeline`).

The names below are imported on first use, so that `python -m keras_cwsn.data.birdsnap download`
starts without loading TensorFlow.
"""

from keras_cwsn._lazy import lazy_getattr

_EXPORTS = {
    "registry": ("DATASETS", "DatasetSpec", "DatasetUnavailableError", "dataset_spec", "get_dataset"),
    "pipeline": ("SPLITS", "Split", "dataset_info", "load_split", "holdout_mask", "preprocessing_stats",
                 "make_pipeline", "resolve_eval_split", "has_test_split"),
    "info": ("DatasetInfo", "HierarchyTableError"),
}
__all__ = [name for names in _EXPORTS.values() for name in names]

__getattr__ = lazy_getattr("keras_cwsn.data", _EXPORTS)
