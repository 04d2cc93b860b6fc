"""Shared fixtures: a private cache folder, tiny image trees built in the test, tiny configs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keep decoded-folder and statistics caches out of the user's ~/.cache."""
    monkeypatch.setenv("KERAS_CWSN_CACHE", str(tmp_path_factory.mktemp("cache")))


def write_image(path, array):
    """Encode a uint8 (H, W, 3) array as JPEG or PNG (by extension) with PIL."""
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def make_cifar_tree(root, per_class=6, classes=CIFAR10_CLASSES, seed=0, splits=("train",), size=32):
    """A tiny CIFAR-style folder: root/<split>/<class>/NNNN.png (lossless, so pixels are known)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(per_class):
                array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                array[..., c % 3] //= 2  # classes differ a little in colour
                path = os.path.join(root, split, name, f"{i:04d}.png")
                write_image(path, array)
                arrays[path] = array
    return arrays


def tiny_config(**overrides):
    """The synthetic config shrunk to seconds: 1 epoch per phase, a few hundred images."""
    from keras_cwsn.config import load_config, validate

    config = load_config(dataset="synthetic")
    config["synthetic"].update(train_size=192, eval_size=64)
    for phase in ("cluster", "classify"):
        config[phase].update(epochs=1, batch_size=32)
    config.update(embedding_sample=16)
    config.update(overrides)
    return validate(config)
