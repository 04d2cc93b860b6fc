"""Training augmentation for small in-memory images: pad, random crop back to size, random horizontal flip.

The usual CIFAR augmentation (4-pixel padding for 32x32 images, as torchvision's
`RandomCrop(32, padding=4)` + `RandomHorizontalFlip()`), applied to already-normalised batches, so
the padding is zeros: the training set's mean colour. Each image's crop is drawn ahead of time as
`(dy, dx, flip)` (`training.seeds.epoch_crops`, seeded by run, phase and epoch, so a resumed run
crops the same way), and the crop itself is index arithmetic on the whole batch: one gather along
rows and one along columns, the flip folded into the column indices. The NumPy version feeds
backends without tf.data (JAX); the TensorFlow one runs inside the tf.data map. `tests/test_inputs.py`
pins both to a per-image slicing reference.
"""

import types

import numpy as np


def crop_padding(image_size):
    """Padding on each side for images of `image_size` (h, w): an eighth of the smaller side, at least 1."""
    return max(1, min(image_size) // 8)


def _indices(crops, height, width, xp):
    """(N, height) row and (N, width) column indices into the padded images for each crop (dy, dx, flip)."""
    rows = crops[:, 0:1] + xp.arange(height)[None]
    forward = xp.arange(width)[None]
    columns = xp.where(crops[:, 2:3] > 0, forward[:, ::-1], forward)
    return rows, crops[:, 1:2] + columns


def crop_flip(images, crops, pad, xp=np):
    """NumPy: (N, H, W, C) images, (N, 3) int crops (dy, dx in [0, 2 * pad], flip in {0, 1}) -> (N, H, W, C).

    `xp=jax.numpy` runs the same indexing inside a jitted JAX program (the seeds-together trainer).
    """
    n, height, width, _ = images.shape
    padded = xp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows, columns = _indices(xp.asarray(crops), height, width, xp)
    return padded[xp.arange(n)[:, None, None], rows[:, :, None], columns[:, None, :]]


def crop_flip_tf(images, crops, pad):
    """TensorFlow (graph-safe, for tf.data): the same as `crop_flip`."""
    import tensorflow as tf

    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    xp = types.SimpleNamespace(arange=tf.range, where=tf.where)  # what `_indices` needs, in TensorFlow
    rows, columns = _indices(tf.convert_to_tensor(crops, tf.int32), height, width, xp)
    return tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), columns, axis=2, batch_dims=1)

