"""The protocol's inputs: NumPy normalisation, Pillow decoding, in-memory epochs and the split the figures are on.

Each optimised or backend-neutral path is pinned against the plain TensorFlow path it replaces, and
against an independent NumPy reference (conftest).
"""

import os

import numpy as np
import pytest

from conftest import make_cifar_tree, random_images, tiny_config, uv_stats_reference, yuv_reference

from keras_cwsn import data
from keras_cwsn.data import folder, normalize
from keras_cwsn.training import inputs
from keras_cwsn.optional import tensorflow_available
from keras_cwsn.training.seeds import epoch_order


def test_numpy_yuv_equals_the_reference_and_the_graph_version():
    images = random_images(6, seed=3)
    uv_mean, uv_std = uv_stats_reference(images)
    x = normalize.yuv_normalize(images, uv_mean, uv_std)
    np.testing.assert_allclose(x, yuv_reference(images, uv_mean, uv_std), atol=2e-4)
    if tensorflow_available():  # the SavedModel's graph computes the same numbers
        from keras_cwsn.data import preprocess

        graph = np.asarray(preprocess.yuv_normalize(images, uv_mean, uv_std))
        np.testing.assert_allclose(x, graph, atol=1e-5)
    assert np.all(np.isfinite(normalize.yuv_normalize(np.full((1, 4, 4, 3), 7, np.uint8), [0, 0], [1, 1])))
    with pytest.raises(ValueError, match="Unknown normalization"):
        normalize.normalize(images, {"normalization": "hsv"})


def test_numpy_uv_stats_equal_the_reference():
    images = random_images(5, seed=4)
    stats = normalize.compute_uv_stats([images[:2], images[2:]])
    np.testing.assert_allclose(stats["uv_mean"], uv_stats_reference(images)[0], atol=2e-6)
    np.testing.assert_allclose(stats["uv_std"], uv_stats_reference(images)[1], atol=2e-6)
    with pytest.raises(ValueError, match="empty"):
        normalize.compute_uv_stats([])


def test_pillow_decoder_reads_the_pixels_and_skips_broken_files(tmp_path):
    arrays = make_cifar_tree(str(tmp_path), per_class=2, classes=("cat", "dog"))
    bad = tmp_path / "train" / "cat" / "9999.png"
    bad.write_bytes(b"")  # zero bytes
    paths, labels, _ = folder.list_split(str(tmp_path), "train", ("cat", "dog"))
    images, kept, skipped = folder.decode_files(paths, labels, (32, 32), decoder="pillow")
    assert skipped == [str(bad)] and len(images) == 4
    expected = np.stack([arrays[p] for p in paths if p != str(bad)])
    np.testing.assert_array_equal(images, expected)  # PNG: lossless, exact
    np.testing.assert_array_equal(kept, [0, 0, 1, 1])
    if tensorflow_available():
        tf_images, _, tf_skipped = folder.decode_files(paths, labels, (32, 32), decoder="tensorflow")
        np.testing.assert_array_equal(tf_images, images)
        assert tf_skipped == skipped


def test_an_epoch_gathers_the_batches_the_plain_pipeline_would_give():
    """The in-memory path equals make_pipeline over the same order: same images, labels and batches."""
    pytest.importorskip("tensorflow")
    import tensorflow as tf

    train = data.load_split("synthetic", "train", synthetic={"train_size": 40, "eval_size": 8})
    stats = data.preprocessing_stats(train, verbose=False)
    levels = {"fine_fc3": "fine", "coarse_fc1": "coarse"}
    config = {"seed": 3, "augment": False}
    fast, steps = inputs.training_data(train, stats, 8, levels, config, "cluster", 1, 3)
    assert steps == 5
    fast = list(fast.as_numpy_iterator())
    assert len(fast) == 2 * steps
    for epoch in (1, 2):
        order = epoch_order(3, "cluster", epoch, len(train))
        reordered = data.Split(train.name, "train", tf.data.Dataset.from_tensor_slices(
            (train.images[order], train.labels[order])), train.labels[order], train.info, train.images[order])
        plain = list(data.make_pipeline(reordered, stats, 8, levels, drop_remainder=True).as_numpy_iterator())
        for (x_fast, y_fast), (x_plain, y_plain) in zip(fast[(epoch - 1) * steps:epoch * steps], plain):
            np.testing.assert_allclose(x_fast, x_plain, atol=1e-5)
            for name in levels:
                np.testing.assert_array_equal(y_fast[name], y_plain[name])
    assert not np.array_equal(fast[0][1]["fine_fc3"], fast[steps][1]["fine_fc3"]), "each epoch has its own order"


def test_array_batches_without_tf_data_follow_the_same_order():
    x = np.arange(10, dtype=np.float32)[:, None]
    labels = {"fine_fc3": np.arange(10, dtype=np.int32)}
    order = np.stack([epoch_order(0, "classify", 0, 10)[:8]]).reshape(-1, 4).astype(np.int32)
    batches = inputs.BatchesByOrder(x, labels, order)
    assert len(batches) == 2
    images, by_output = batches[1]
    np.testing.assert_array_equal(images[:, 0], order[1])
    np.testing.assert_array_equal(by_output["fine_fc3"], order[1])


def test_training_sample_for_the_per_epoch_mapping_is_fixed_and_seeded():
    config = tiny_config()
    run_data = inputs.load_run_data(config, quiet=True)
    a_x, a_y = run_data.train_sample(50, seed=0)
    b_x, b_y = run_data.train_sample(50, seed=0)
    c_x, _ = run_data.train_sample(50, seed=1)
    assert len(a_y) == 50 and np.array_equal(a_x, b_x) and np.array_equal(a_y, b_y)
    assert not np.array_equal(a_x, c_x)
    full_x, full_y = run_data.train_sample(10_000, seed=0)
    assert len(full_y) == len(run_data.train)


@pytest.mark.parametrize("with_test, expected_split, expected_train", [(True, "test", 40), (False, "val", 30)])
def test_the_figures_are_on_test_when_there_is_one(tmp_path, with_test, expected_split, expected_train):
    """The paper's protocol: all of train/ for training and test/ for the figures; else a held-out val."""
    splits = ("train", "test") if with_test else ("train",)
    make_cifar_tree(str(tmp_path), per_class=4, splits=splits)
    config = tiny_config(dataset="cifar10", data_dir=str(tmp_path), val_per_class=1, eval_split="auto")
    run_data = inputs.load_run_data(config, quiet=True)
    assert run_data.eval_split == expected_split
    assert len(run_data.train) == expected_train and len(run_data.evaluation) == 10 * (4 if with_test else 1)
    explicit = inputs.load_run_data(dict(config, eval_split="val"), quiet=True)
    assert explicit.eval_split == "val" and len(explicit.train) == 30
    if with_test:
        assert os.path.isdir(tmp_path / "test")


# ---------------------------------------------------------------------------------------------
# `augment: true` on in-memory data: pad, random crop, random flip
# ---------------------------------------------------------------------------------------------

def crop_flip_reference(images, crops, pad):
    """One image at a time, by slicing: pad with zeros, take the window at (dy, dx), mirror it if flip."""
    height, width = images.shape[1:3]
    out = []
    for image, (dy, dx, flip) in zip(images, crops):
        window = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))[dy:dy + height, dx:dx + width]
        out.append(window[:, ::-1] if flip else window)
    return np.stack(out)


def _crop_batch(n=6, size=(8, 6), pad=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n,) + size + (3,)).astype(np.float32)
    corners = [(0, 0, 0), (2 * pad, 2 * pad, 1), (pad, pad, 0), (pad, pad, 1), (0, 2 * pad, 1), (2 * pad, 0, 0)]
    return images, np.array(corners[:n], dtype=np.int32)


def test_crop_flip_equals_the_slicing_reference_at_every_corner():
    from keras_cwsn.data import crops as crops_lib

    images, crops = _crop_batch()
    out = crops_lib.crop_flip(images, crops, 2)
    assert out.shape == images.shape and out.dtype == images.dtype
    np.testing.assert_array_equal(out, crop_flip_reference(images, crops, 2))
    np.testing.assert_array_equal(out[2], images[2])  # centred, no flip: the image itself
    np.testing.assert_array_equal(out[3], images[3][:, ::-1])  # centred and flipped: its mirror
    assert np.all(out[0][:2] == 0) and np.all(out[0][:, :2] == 0)  # shifted: zero (mean-colour) border
    if tensorflow_available():
        np.testing.assert_array_equal(np.asarray(crops_lib.crop_flip_tf(images, crops, 2)), out)
    assert crops_lib.crop_padding((32, 32)) == 4 and crops_lib.crop_padding((5, 9)) == 1


def test_epoch_crops_are_in_range_seeded_and_differ_by_epoch():
    from keras_cwsn.training.seeds import epoch_crops

    a = epoch_crops(0, "cluster", 3, 2000, 4)
    assert a.shape == (2000, 3) and a.dtype == np.int32
    assert a[:, :2].min() == 0 and a[:, :2].max() == 8 and set(np.unique(a[:, 2])) == {0, 1}
    np.testing.assert_array_equal(a, epoch_crops(0, "cluster", 3, 2000, 4))
    for other in (epoch_crops(0, "cluster", 4, 2000, 4), epoch_crops(1, "cluster", 3, 2000, 4),
                  epoch_crops(0, "classify", 3, 2000, 4)):
        assert not np.array_equal(a, other)


@pytest.mark.parametrize("first_epoch", [0, 1])
def test_augmented_epochs_crop_each_gathered_image_by_its_drawn_crop(first_epoch):
    """training_data with augment: each batch is the plain batch cropped by epoch_crops (so a resumed run
    crops as the full run did), on tf.data and on the backend-neutral PyDataset alike; labels untouched."""
    from keras_cwsn.training.seeds import epoch_crops

    train = data.load_split("synthetic", "train", synthetic={"train_size": 40, "eval_size": 8})
    stats = data.preprocessing_stats(train, verbose=False)
    x = inputs.preprocess_split(train, stats)
    levels = {"fine_fc3": "fine"}
    config = {"seed": 5, "augment": True}
    assert x.shape[1:3] == (32, 32)
    pad = 4  # an eighth of 32
    batches, steps = inputs.training_data(train, stats, 8, levels, config, "classify", first_epoch, 2, preprocessed=x)
    got = list(batches.as_numpy_iterator()) if hasattr(batches, "as_numpy_iterator") else \
        [batches[i] for i in range(len(batches))]
    assert len(got) == (2 - first_epoch) * steps
    changed = 0
    for epoch in range(first_epoch, 2):
        order = epoch_order(5, "classify", epoch, len(train))[:steps * 8].reshape(steps, 8)
        crops = epoch_crops(5, "classify", epoch, steps * 8, pad).reshape(steps, 8, 3)
        for step in range(steps):
            images, labels = got[(epoch - first_epoch) * steps + step]
            expected = crop_flip_reference(x[order[step]], crops[step], pad)
            np.testing.assert_allclose(images, expected, atol=0)
            np.testing.assert_array_equal(labels["fine_fc3"], train.labels[order[step]])
            changed += not np.array_equal(images, x[order[step]])
    assert changed == (2 - first_epoch) * steps  # every batch is augmented
    plain, _ = inputs.training_data(train, stats, 8, levels, dict(config, augment=False), "classify", first_epoch, 2,
                                    preprocessed=x)
    first = next(iter(plain.as_numpy_iterator())) if hasattr(plain, "as_numpy_iterator") else plain[0]
    np.testing.assert_array_equal(first[0], x[epoch_order(5, "classify", first_epoch, len(train))[:8]])
