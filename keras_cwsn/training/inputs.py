"""What the protocol feeds `fit` and `predict`: the splits, preprocessed once, and each epoch's batches.

Data that fits in memory (the embedded dataset, CIFAR from a folder or TFDS) is preprocessed once
into a float32 array; an epoch is then a gather of batches by a seeded permutation (`epoch_order`),
with no per-image work and no per-batch Python on TensorFlow; `augment: true` adds a random
pad-crop-flip per image (`data.crops`, drawn by `epoch_crops`). Streamed sources (Birdsnap) keep
the tf.data path of `data.make_pipeline` (resize, random crop, flip).
"""

import dataclasses

import keras
import numpy as np

from keras_cwsn import data as data_lib
from keras_cwsn.constants import PREDICT_BATCH
from keras_cwsn.data.crops import crop_flip, crop_flip_tf, crop_padding
from keras_cwsn.data.normalize import normalize
from keras_cwsn.training.records import warn_data_report
from keras_cwsn.training.seeds import derived_seed, epoch_crops, epoch_order


@dataclasses.dataclass
class RunData:
    """The training and evaluation splits of a run, their statistics and (in memory) preprocessed images."""

    train: object
    evaluation: object
    stats: dict
    eval_split: str  # "val" or "test": the split the figures are on
    train_x: np.ndarray = None
    eval_x: np.ndarray = None

    @property
    def info(self):
        return self.train.info

    def images(self, which):
        """Preprocessed images of `"train"` or `"eval"` for `predict`: an array, or a tf.data pipeline."""
        split, array = (self.train, self.train_x) if which == "train" else (self.evaluation, self.eval_x)
        if array is not None:
            return array
        return data_lib.make_pipeline(split, self.stats, PREDICT_BATCH, images_only=True)

    def labeled_eval(self, levels):
        """The evaluation split as `(images, {output: labels})`, for `fit(validation_data=...)`."""
        if self.eval_x is not None:
            return self.eval_x, labels_by_output(self.evaluation, levels)
        return data_lib.make_pipeline(self.evaluation, self.stats, PREDICT_BATCH, levels)

    def train_sample(self, size, seed):
        """A fixed, seeded sample of the training split (images, fine labels) for per-epoch mappings."""
        keep = self.train_sample_index(size, seed)
        if keep is None:
            return self.images("train"), self.train.labels
        return self.train_x[keep], self.train.labels[keep]

    def train_sample_index(self, size, seed):
        """The sorted indices of `train_sample`'s images, or None when it is the whole split."""
        n = len(self.train)
        if self.train_x is None or size >= n:
            return None
        return np.sort(np.random.default_rng(derived_seed(seed, "metrics_sample")).choice(n, size, replace=False))


def load_run_data(config, quiet=False):
    """Load the config's training and evaluation splits, their statistics and preprocessed arrays.

    With the figures on `test` (the paper's protocol, and `eval_split: auto` wherever there is a test
    split) the model trains on every training image; on `val` the held-out images are left out.
    """
    eval_split = data_lib.resolve_eval_split(config)
    train = load_training_split(config, eval_split=eval_split)
    evaluation = data_lib.load_split(data_lib.dataset_spec(config), eval_split, data_dir=config["data_dir"], verbose=False,
                                     val_per_class=train_held_out(config, eval_split), synthetic=config["synthetic"])
    warn_data_report((train, evaluation))
    stats = data_lib.preprocessing_stats(train, verbose=not quiet)
    return RunData(train, evaluation, stats, eval_split, preprocess_split(train, stats),
                   preprocess_split(evaluation, stats))


def load_training_split(config, data_dir=None, eval_split=None):
    """The run's training split: every training image, less the held-out val images when the run
    reports on val. `data_dir` overrides the config's (data moved since the run); `eval_split` is the
    run's resolved evaluation split (resolved here, in the folder read, when None)."""
    config = dict(config, data_dir=data_dir or config["data_dir"])
    eval_split = eval_split or data_lib.resolve_eval_split(config)
    return data_lib.load_split(data_lib.dataset_spec(config), "train", data_dir=config["data_dir"], verbose=False,
                               val_per_class=train_held_out(config, eval_split), synthetic=config["synthetic"])


def train_held_out(config, eval_split):
    """Images per class held out of the training split: the val images when the run reports on val, else none."""
    return config["val_per_class"] if eval_split == "val" else 0


def preprocess_split(split, stats, chunk=8192):
    """The split's images preprocessed into one float32 array, or None for a streamed split."""
    if split.images is None:
        return None
    parts = [normalize(split.images[i:i + chunk], stats) for i in range(0, len(split), chunk)]
    return np.concatenate(parts).astype(np.float32, copy=False)


def labels_by_output(split, levels):
    """{output name: labels at its hierarchy level} for the split's examples."""
    by_level = {"fine": split.labels, "coarse": split.info.coarse_of(split.labels)}
    return {name: by_level[level].astype(np.int32) for name, level in levels.items()}


def steps_per_epoch(num_examples, batch_size):
    """Batches per training epoch: partial batches are dropped, unless there is only one."""
    return num_examples // batch_size if num_examples >= batch_size else 1


def epoch_batches(seed, phase, epoch, num_examples, batch_size, crop_size=None):
    """Epoch `epoch`'s batches as an index table (steps, batch) int32, and with `crop_size` (the images'
    (h, w), for `augment`) their crops (steps, batch, 3), else None: what `training_data` feeds each epoch."""
    steps, per_batch = steps_per_epoch(num_examples, batch_size), min(batch_size, num_examples)
    order = epoch_order(seed, phase, epoch, num_examples)[: steps * per_batch].reshape(steps, per_batch)
    crops = None
    if crop_size:
        crops = epoch_crops(seed, phase, epoch, steps * per_batch, crop_padding(crop_size)).reshape(steps, per_batch, 3)
    return order.astype(np.int32), crops


def training_data(split, stats, batch_size, levels, config, phase, first_epoch, epochs, preprocessed=None):
    """The training batches of epochs `first_epoch`..`epochs - 1` as one dataset, and the steps per epoch.

    Epoch k reads the examples in `epoch_order(seed, phase, k)`, so its batches are the same whether
    the run started at epoch 0 or resumed at k, and whether or not Keras peeks at a batch first
    (it does under a tf.distribute strategy).

    Args:
        split: data.Split. The training split.
        stats: dict. Its preprocessing statistics.
        batch_size: int.
        levels: dict output name -> "fine"/"coarse".
        config: dict. Reads `seed` and `augment`.
        phase: str. `"cluster"` or `"classify"` (part of each epoch's seed).
        first_epoch, epochs: int. The epochs to produce.
        preprocessed: float32 array or None. `split`'s images already preprocessed (computed if None).
    """
    seed = config["seed"]
    if split.images is None:  # streamed 224-pixel sources: `augment` resizes, crops and flips in make_pipeline
        return _streamed_training_data(split, stats, batch_size, levels, seed, phase, first_epoch, epochs,
                                       config["augment"])
    x = preprocess_split(split, stats) if preprocessed is None else preprocessed
    steps = steps_per_epoch(len(split), batch_size)
    tables = [epoch_batches(seed, phase, e, len(split), batch_size, config["augment"] and x.shape[1:3])
              for e in range(first_epoch, epochs)]
    order = np.concatenate([t[0] for t in tables])
    crops, pad = None, 0
    if config["augment"]:
        pad = crop_padding(x.shape[1:3])
        crops = np.concatenate([t[1] for t in tables])
    labels = labels_by_output(split, levels)
    if keras.backend.backend() == "tensorflow":
        return _gathered_tf_dataset(x, labels, order, crops, pad), steps
    return BatchesByOrder(x, labels, order, crops, pad), steps


def _gathered_tf_dataset(x, labels, order, crops=None, pad=0):
    """tf.data of batches gathered from in-memory arrays by an index table (as Keras's own array adapter
    does), each image cropped and flipped by its row of `crops` when given."""
    import tensorflow as tf

    tables = (order,) if crops is None else (order, crops)
    indices = tf.data.Dataset.from_tensor_slices(tables)
    arrays = tf.data.Dataset.from_tensors((x, labels)).repeat()

    def gather(table, data):
        images, by_output = data
        batch = tf.gather(images, table[0])
        if crops is not None:
            batch = crop_flip_tf(batch, table[1], pad)
        return batch, {k: tf.gather(v, table[0]) for k, v in by_output.items()}

    return (tf.data.Dataset.zip((indices, arrays)).map(gather, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


class BatchesByOrder(keras.utils.PyDataset):
    """Batches of in-memory arrays by an index table, for backends without tf.data (JAX)."""

    def __init__(self, x, labels, order, crops=None, pad=0, **kwargs):
        super().__init__(**kwargs)
        self.x, self.labels, self.order, self.crops, self.pad = x, labels, order, crops, pad

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        index = self.order[i]
        images = self.x[index] if self.crops is None else crop_flip(self.x[index], self.crops[i], self.pad)
        return images, {k: v[index] for k, v in self.labels.items()}


def _streamed_training_data(split, stats, batch_size, levels, seed, phase, first_epoch, epochs, augment):
    """Per-epoch tf.data pipelines over a streamed split, each shuffled with its (seed, phase, epoch) seed."""
    import tensorflow as tf

    def one_epoch(epoch):
        return data_lib.make_pipeline(split, stats, batch_size, levels, training=True, augment=augment,
                                      seed=derived_seed(seed, phase, "epoch", epoch))

    per_epoch = [one_epoch(epoch) for epoch in range(first_epoch, epochs)]
    steps = int(per_epoch[0].cardinality())
    if steps <= 0:  # unknown (streamed source)
        steps = steps_per_epoch(len(split), batch_size)
    while len(per_epoch) > 1:  # a balanced tree of concatenations: shallow for long schedules
        pairs = [a.concatenate(b) for a, b in zip(per_epoch[::2], per_epoch[1::2])]
        per_epoch = pairs + ([per_epoch[-1]] if len(per_epoch) % 2 else [])
    return per_epoch[0].prefetch(tf.data.AUTOTUNE), steps
