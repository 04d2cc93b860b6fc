"""Every dataset's splits (`load_split`), their statistics, and batched `(image, {output: labels})` tf.data.

Sources (`registry.DATASETS`): `synthetic` (embedded, no download), `cifar10` / `cifar100` (a
local folder of class sub-folders via `data_dir`, else TFDS), `folder` / `cub42` (a folder of
class sub-folders labelled by a hierarchy table), `birdsnap34` / `birdsnap` (TFDS builder over a
manual download). Every function here takes a dataset name or the `DatasetSpec` a run's config
resolves to (`registry.dataset_spec`). In-memory splits (synthetic, folders) load without TensorFlow,
so the protocol runs on JAX too; TFDS, Birdsnap and `make_pipeline` need it.
"""

import dataclasses
import hashlib
import json
import os

import numpy as np

from keras_cwsn.atomic import write_json_atomic
from keras_cwsn.data import folder, normalize
from keras_cwsn.data.info import DatasetInfo, HierarchyTableError, read_hierarchy_table
from keras_cwsn.data.registry import DatasetSpec, DatasetUnavailableError, dataset_spec, get_dataset
from keras_cwsn.data.synthetic import make_synthetic, synthetic_info
from keras_cwsn.optional import tensorflow_available

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class Split:
    """One split of one dataset, before preprocessing.

    Attributes:
        dataset: unbatched `tf.data.Dataset` of (uint8 image (H, W, 3), int64 fine label), or None
            for an in-memory split where TensorFlow is not installed.
        labels: int64 array of the fine labels, in dataset order.
        info: DatasetInfo.
        images: uint8 array (N, H, W, 3) for in-memory sources, else None.
        report: what loading skipped and why (files, counts).
    """

    name: str
    split: str
    dataset: object
    labels: np.ndarray
    info: DatasetInfo
    images: object = None
    report: dict = dataclasses.field(default_factory=dict)

    def __len__(self):
        return len(self.labels)


def require_tensorflow(what):
    """A one-line error naming what needs TensorFlow, where it is not installed."""
    if not tensorflow_available():
        raise DatasetUnavailableError(f"{what} needs TensorFlow, which is not installed here; on this machine "
                                      f"use the embedded dataset or a folder (--data-dir DIR/train/<class>/*.jpg).")


def _spec(dataset):
    return dataset if isinstance(dataset, DatasetSpec) else get_dataset(dataset)


def has_test_split(dataset, data_dir=None):
    """Whether the dataset offers a test split: TFDS and Birdsnap do, a folder only with `test/`."""
    if _spec(dataset).source in ("cifar", "folder") and data_dir is not None:
        return os.path.isdir(os.path.join(data_dir, "test"))
    return True


def resolve_eval_split(config):
    """The split the figures are on: the config's, or on `auto` test where there is one (the paper's), else val."""
    if config["eval_split"] != "auto":
        return config["eval_split"]
    return "test" if has_test_split(dataset_spec(config), config["data_dir"]) else "val"


def dataset_info(dataset):
    """DatasetInfo (class names, hierarchy) of a dataset (name or spec) without loading any image."""
    spec = _spec(dataset)
    if spec.source == "synthetic":
        return synthetic_info()
    fine, coarse, f2c, _ = read_hierarchy_table(spec.table_path, spec.fine_column, spec.coarse_column)
    if spec.source == "folder" and len(coarse) < 2:
        raise HierarchyTableError(f"Hierarchy table {spec.table_path}: column {spec.coarse_column!r} puts every class "
                                  f"in one group ({coarse[0]!r}); the coarse labels need at least two groups.")
    return DatasetInfo(spec.name, fine, coarse, f2c, image_size=spec.image_size, normalization=spec.normalization)


def load_split(dataset, split, data_dir=None, val_per_class=500, synthetic=None, cache_dir=None, verbose=True,
               every_class=None):
    """Load one split of a dataset as a `Split` (images not yet preprocessed).

    Args:
        dataset: str or DatasetSpec. One of `DATASETS`, or a run's `dataset_spec(config)`.
        split: str. `"train"`, `"val"` (held out from the training images) or `"test"`.
        data_dir: str or None. Local folder (`train/<class>/*`, optional `test/<class>/*`) for
            CIFAR and folder datasets; the Birdsnap download folder for Birdsnap. Defaults to None
            (TFDS / default dir; a folder dataset needs one).
        val_per_class: int. Images per class held out of `train/` as `val` (the last ones by file
            name); 0 trains on all of `train/` (when the figures are on `test`). Defaults to 500.
        synthetic: dict or None. `train_size`, `eval_size`, `num_coarse`, `fine_per_coarse`, `data_seed`.
        cache_dir: str or None. Where decoded folders and statistics are cached.
        every_class: bool or None. Whether each class of a folder dataset's table needs a folder; None: yes
            (training), False: a folder with some of the classes is read (evaluating on it).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split. Expected one of {', '.join(SPLITS)}. Received: split={split!r}")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DatasetUnavailableError(f"--data-dir {data_dir!r} does not exist or is not a folder.")
    spec = _spec(dataset)
    name, source = spec.name, spec.source
    if source == "synthetic":
        return _synthetic_split(split, synthetic or {})
    if source == "folder" and data_dir is None:
        raise DatasetUnavailableError(f"Dataset {name!r} is read from a folder: pass --data-dir DIR with "
                                      f"DIR/train/<class>/* (and optionally DIR/test/<class>/*).")
    info = dataset_info(spec)
    if source in ("cifar", "folder"):
        if data_dir is not None:
            return _folder_split(name, split, data_dir, info, val_per_class, cache_dir, verbose,
                                 every_class=source == "folder" and every_class is not False)
        return _tfds_cifar_split(name, split, info, val_per_class)
    return _birdsnap_split(name, split, data_dir, info)


def _from_arrays(name, split, images, labels, info, report=None):
    info = dataclasses.replace(info, num_examples={split: int(len(labels))})
    dataset = None
    if tensorflow_available():
        import tensorflow as tf

        dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    return Split(name, split, dataset, np.asarray(labels, np.int64), info, images, report or {})


def _synthetic_split(split, options):
    allowed = {"train_size", "eval_size", "num_coarse", "fine_per_coarse", "data_seed", "noise"}
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"Unknown synthetic option(s) {sorted(unknown)}; expected {sorted(allowed)}.")
    size = options.get("train_size", 3000) if split == "train" else options.get("eval_size", 600)
    seed = options.get("data_seed", 0) * 3 + SPLITS.index(split)  # disjoint draws per split
    images, labels, info = make_synthetic(
        size, seed=seed, num_coarse=options.get("num_coarse", 3),
        fine_per_coarse=options.get("fine_per_coarse", 3), noise=options.get("noise", 0.5))
    return _from_arrays("synthetic", split, images, labels, info)


def _folder_split(name, split, data_dir, info, val_per_class, cache_dir, verbose, every_class=False):
    """`every_class`: each class of the table must have a folder (a folder dataset's table and folders must agree)."""

    def read(folder_name):
        return folder.load_folder_split(data_dir, folder_name, info.fine_names, info.image_size, cache_dir, verbose,
                                        every_class=every_class)

    if split == "test":
        images, labels, report = read("test")
        return _from_arrays(name, split, images, labels, info, report)
    if os.path.isdir(os.path.join(data_dir, "val")):
        images, labels, report = read("train" if split == "train" else "val")
        return _from_arrays(name, split, images, labels, info, report)
    images, labels, report = read("train")
    if split == "train" and not val_per_class:  # the figures are on test/: train on every image
        return _from_arrays(name, split, images, labels, info, report)
    held_out = holdout_mask(labels, val_per_class, info.fine_names)
    keep = held_out if split == "val" else ~held_out
    report = dict(report, held_out_per_class=val_per_class)
    return _from_arrays(name, split, images[keep], labels[keep], info, report)


def holdout_mask(labels, per_class, class_names=None):
    """Boolean mask of the last `per_class` examples of each class (in file-name order)."""
    mask = np.zeros(len(labels), dtype=bool)
    classes, counts = np.unique(labels, return_counts=True)
    for c, count in zip(classes, counts):
        if per_class >= count:
            name = repr(class_names[c]) if class_names is not None else str(c)
            raise DatasetUnavailableError(
                f"Cannot hold out {per_class} images of class {name} for the val split: it has only {count}. "
                f"Hold out fewer with --set val_per_class=N (N < {counts.min()}), or add a test/ folder "
                f"(the figures are then on test and nothing is held out).")
        idx = np.flatnonzero(labels == c)
        mask[idx[len(idx) - per_class:]] = True
    return mask


def _tfds_cifar_split(name, split, info, val_per_class):
    require_tensorflow(f"Loading {name} from TFDS")
    import tensorflow_datasets as tfds

    try:
        data = tfds.load(name, split="test" if split == "test" else "train", batch_size=-1, as_supervised=True)
    except Exception as e:  # TFDS raises many kinds (network, checksum, missing files)
        raise DatasetUnavailableError(
            f"Could not load {name} from TFDS ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Without internet, pass --data-dir DIR with DIR/train/<class>/*.jpg "
            f"(a folder of class sub-folders, e.g. the CIFAR-10 images as JPEG or PNG files)."
        ) from None
    images, labels = (np.asarray(a) for a in tfds.as_numpy(data))
    labels = labels.astype(np.int64)
    if split != "test" and (split == "val" or val_per_class):
        held_out = holdout_mask(labels, val_per_class, info.fine_names)
        keep = held_out if split == "val" else ~held_out
        images, labels = images[keep], labels[keep]
    return _from_arrays(name, split, images, labels, info)


def _birdsnap_split(name, split, data_dir, info):
    require_tensorflow("Birdsnap (a TFDS builder)")
    import tensorflow as tf

    from keras_cwsn.data import birdsnap

    config = "birdsnap34" if name == "birdsnap34" else "birdsnap500"
    if split == "val":
        raise ValueError("Birdsnap has no held-out val split: use its official test split (eval_split: test).")
    tfds_dir = os.path.join(folder.default_cache_dir(), "tfds")
    try:
        raw, loaded_info = birdsnap.load_birdsnap(config, split, data_dir=tfds_dir, manual_dir=data_dir or None,
                                                  option="--data-dir")
    except birdsnap.BirdsnapNotFoundError as e:
        raise DatasetUnavailableError(str(e)) from None
    dataset = raw.map(lambda image, fine, coarse: (image, fine), num_parallel_calls=tf.data.AUTOTUNE)
    labels = birdsnap.load_birdsnap_labels(config, split, data_dir=tfds_dir)  # same order, images not decoded
    # The run's input settings (a config's image_size / normalization) over the builder's defaults.
    run_info = dataclasses.replace(loaded_info, name=name, image_size=info.image_size, normalization=info.normalization)
    return Split(name, split, dataset, labels, run_info,
                 report=_birdsnap_report(birdsnap.read_preparation_report(config, tfds_dir), split, tfds_dir))


def _birdsnap_report(prepared, split, tfds_dir):
    """What a Birdsnap split read, from its preparation report: the download, the prepared copy, skipped files."""
    counts = (prepared or {}).get("splits", {}).get(split, {})
    written, missing, corrupt = (int(counts.get(k, 0)) for k in ("examples_written", "skipped_missing",
                                                                  "skipped_corrupt"))
    download = (prepared or {}).get("manual_dir", "an unknown download")
    return {"source": f"the Birdsnap download {download} (prepared in {tfds_dir})", "split": split,
            "folder": os.path.join(download, "images"), "listed": written + missing + corrupt, "decoded": written,
            "skipped_missing": missing, "skipped_corrupt": corrupt}


def preprocessing_stats(train, cache_dir=None, verbose=True):
    """Normalisation constants from the training split: U, V mean/std for "yuv" (cached), ImageNet's else."""
    info = train.info
    if info.normalization == "imagenet":
        return {"normalization": "imagenet", "mean": list(normalize.IMAGENET_MEAN), "std": list(normalize.IMAGENET_STD)}
    key = hashlib.sha1(np.ascontiguousarray(train.labels).tobytes())
    if train.images is not None:
        key.update(np.ascontiguousarray(train.images[:: max(1, len(train) // 512)]).tobytes())
    path = os.path.join(cache_dir or folder.default_cache_dir(), "stats", f"{train.name}-{key.hexdigest()[:20]}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if train.images is not None:
        batches = (train.images[i:i + 2048] for i in range(0, len(train), 2048))
    else:
        batches = (b for b in train.dataset.map(lambda image, label: image).batch(2048).as_numpy_iterator())
    stats = dict(normalize.compute_uv_stats(batches), normalization="yuv")
    if verbose:
        print(f"[data] {train.name} training-split U, V mean {stats['uv_mean']} std {stats['uv_std']} "
              f"(over {len(train)} images; cached in {path})")
    try:
        write_json_atomic(path, stats)
    except OSError as e:
        print(f"[data] could not cache statistics in {path}: {e}")
    return stats


def make_pipeline(split, stats, batch_size, levels=None, training=False, seed=0, augment=False, drop_remainder=None,
                  images_only=False):
    """Batched, preprocessed tf.data pipeline of one split.

    Args:
        split: Split.
        stats: dict from `preprocessing_stats`.
        batch_size: int.
        levels: dict output name -> "fine"/"coarse": the label structure the model was compiled with.
        training: bool. Shuffle (seeded by `seed`), drop the last partial batch (static shapes for XLA).
        augment: bool. Random crop and flip (224-pixel datasets only).
        images_only: bool. Yield preprocessed images alone (for `predict`).

    Returns:
        `tf.data.Dataset` of `(images, {output: labels})` (or images alone).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1. Received: {batch_size}")
    if augment and split.images is not None:  # it would be silently ignored here
        raise ValueError(f"augment=True crops streamed splits only; the in-memory split {split.name!r} is cropped "
                         f"per epoch by `keras_cwsn.training.training_data`. Received: augment=True")
    require_tensorflow("A tf.data pipeline")
    import tensorflow as tf

    from keras_cwsn.data import preprocess

    info = split.info
    size = tuple(info.image_size)
    normalization = stats["normalization"]
    fine_to_coarse = tf.constant(info.fine_to_coarse, tf.int64)
    ds = split.dataset
    if training:
        # The same order on every pass over this pipeline (Keras may peek at a batch first); each epoch
        # of a run is its own pipeline with its own seed (`training.inputs`).
        ds = ds.shuffle(min(len(split), 50_000), seed=seed, reshuffle_each_iteration=False)
    if split.images is None:  # variable-size images: resize (or crop) one by one, in parallel
        if training and augment:
            ds = ds.map(lambda x, y: (preprocess.random_crop_flip(x, size, seed), y), num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.map(lambda x, y: (preprocess.resize_images(x, size), y), num_parallel_calls=tf.data.AUTOTUNE)
    drop = training if drop_remainder is None else drop_remainder
    ds = ds.batch(int(batch_size), drop_remainder=drop and len(split) >= batch_size)

    def transform(images, fine):
        images = preprocess.preprocess(images, normalization, stats)
        if images_only:
            return images
        by_level = {"fine": fine, "coarse": tf.gather(fine_to_coarse, fine)}
        return images, {name: by_level[level] for name, level in (levels or {}).items()}

    return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

