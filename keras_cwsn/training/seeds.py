"""Seeds: one run seed, from which every phase and epoch derives its own, stable across processes."""

import hashlib

import keras
import numpy as np


def derived_seed(seed, *parts):
    """A 31-bit seed derived from the run's seed and names (e.g. phase, epoch): stable across processes."""
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def epoch_order(seed, phase, epoch, num_examples):
    """The order in which epoch `epoch` of `phase` reads the training examples (a seeded permutation).

    Computed in NumPy from (seed, phase, epoch) alone, so a resumed run reads the same batches and
    both backends share one definition.
    """
    return np.random.default_rng(derived_seed(seed, phase, "epoch", epoch)).permutation(num_examples)


def epoch_crops(seed, phase, epoch, count, pad):
    """The random crops of epoch `epoch` of `phase` (`augment`): (count, 3) int32 rows of (dy, dx, flip),
    dy and dx in [0, 2 * pad], one per slot of the epoch's order; seeded like `epoch_order`, so a
    resumed run crops the same way on either backend."""
    rng = np.random.default_rng(derived_seed(seed, phase, "crops", epoch))
    return np.concatenate([rng.integers(0, 2 * pad + 1, size=(count, 2)), rng.integers(0, 2, size=(count, 1))],
                          axis=1).astype(np.int32)


def seed_everything(seed):
    """Python, NumPy and backend seeds; deterministic ops on TensorFlow."""
    keras.utils.set_random_seed(int(seed))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
