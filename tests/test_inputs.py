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
