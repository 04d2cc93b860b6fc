"""Data sources and the tf.data pipeline: labels at both levels, splits, preprocessing maths."""

import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import CIFAR10_CLASSES, make_cifar_tree, write_image
from keras_cwsn import data
from keras_cwsn.data import folder, preprocess
from keras_cwsn.data.synthetic import make_synthetic


def test_synthetic_is_deterministic_balanced_and_hierarchical():
    a, la, info = make_synthetic(90, seed=3)
    b, lb, _ = make_synthetic(90, seed=3)
    c, _, _ = make_synthetic(90, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert a.shape == (90, 32, 32, 3) and a.dtype == np.uint8
    assert np.bincount(la).tolist() == [10] * 9
    assert info.num_fine == 9 and info.num_coarse == 3
    assert info.fine_to_coarse == (0, 0, 0, 1, 1, 1, 2, 2, 2)
    assert info.fine_names[3].startswith(info.coarse_names[1])


def test_synthetic_splits_are_disjoint_draws():
    train = data.load_split("synthetic", "train", synthetic={"train_size": 50, "eval_size": 20})
    test = data.load_split("synthetic", "test", synthetic={"train_size": 50, "eval_size": 20})
    assert len(train) == 50 and len(test) == 20
    assert not np.array_equal(train.images[:20], test.images)


def test_synthetic_rejects_unknown_option():
    with pytest.raises(ValueError, match="Unknown synthetic option"):
        data.load_split("synthetic", "train", synthetic={"trian_size": 5})


def test_folder_split_holds_out_the_last_images_per_class(tmp_path):
    arrays = make_cifar_tree(tmp_path, per_class=5)
    train = data.load_split("cifar10", "train", data_dir=str(tmp_path), val_per_class=2)
    val = data.load_split("cifar10", "val", data_dir=str(tmp_path), val_per_class=2)
    assert len(train) == 30 and len(val) == 20
    assert np.bincount(val.labels).tolist() == [2] * 10
    # val holds files 0003, 0004 of each class, in class-table order, pixels exact (PNG)
    expected = arrays[os.path.join(tmp_path, "train", "bird", "0003.png")]
    np.testing.assert_array_equal(val.images[4], expected)
    assert val.labels[4] == CIFAR10_CLASSES.index("bird")


def test_folder_skips_undecodable_files_and_counts_them(tmp_path, capsys):
    make_cifar_tree(tmp_path, per_class=3)
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "train" / "dog" / "empty.jpg").write_bytes(b"")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored")
    images, labels, report = folder.load_folder_split(str(tmp_path), "train", CIFAR10_CLASSES, (32, 32))
    assert len(labels) == 30
    assert sorted(os.path.basename(p) for p in report["skipped_undecodable"]) == ["broken.jpg", "empty.jpg"]
    assert report["non_image_files"] == 1
    assert "skipped 2 undecodable" in capsys.readouterr().out
    # the second read comes from the cache and says the same
    _, labels2, report2 = folder.load_folder_split(str(tmp_path), "train", CIFAR10_CLASSES, (32, 32))
    np.testing.assert_array_equal(labels, labels2)
    assert report2["skipped_undecodable"] == report["skipped_undecodable"]


def test_folder_resizes_odd_sizes_and_converts_grey(tmp_path):
    make_cifar_tree(tmp_path, per_class=1)
    write_image(str(tmp_path / "train" / "ship" / "big.png"), np.full((40, 50, 3), 200, np.uint8))
    from PIL import Image

    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(tmp_path / "train" / "ship" / "grey.png")
    images, labels, _ = folder.load_folder_split(str(tmp_path), "train", CIFAR10_CLASSES, (32, 32))
    assert images.shape == (12, 32, 32, 3)
    ship = images[labels == CIFAR10_CLASSES.index("ship")]
    assert {int(ship[i].mean().round()) for i in range(1, 3)} == {200, 90}


def test_unknown_class_folder_is_named(tmp_path):
    make_cifar_tree(tmp_path, per_class=1)
    write_image(str(tmp_path / "train" / "unicorn" / "0.png"), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(folder.FolderError, match="unicorn"):
        data.load_split("cifar10", "train", data_dir=str(tmp_path), val_per_class=0 + 1)


def test_missing_data_dir_and_unknown_dataset_are_clear(tmp_path):
    with pytest.raises(data.DatasetUnavailableError, match="does not exist"):
        data.load_split("cifar10", "train", data_dir=str(tmp_path / "nope"))
    with pytest.raises(data.DatasetUnavailableError, match="Unknown dataset"):
        data.load_split("imagenet", "train")
    with pytest.raises(ValueError, match="Unknown split"):
        data.load_split("synthetic", "validation")


def test_yuv_normalisation_statistics(tmp_path):
    make_cifar_tree(tmp_path, per_class=4)
    train = data.load_split("cifar10", "train", data_dir=str(tmp_path), val_per_class=1)
    stats = data.preprocessing_stats(train, verbose=False)
    # the statistics are those of the training split's U and V pixels
    uv = tf.image.rgb_to_yuv(train.images.astype(np.float32) / 255.0).numpy()[..., 1:].reshape(-1, 2)
    np.testing.assert_allclose(stats["uv_mean"], uv.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["uv_std"], uv.std(0), atol=1e-5)
    batches = data.make_pipeline(train, stats, 7, images_only=True)
    x = np.concatenate(list(batches.as_numpy_iterator()))
    np.testing.assert_allclose(x[..., 0].mean(axis=(1, 2)), 0.0, atol=1e-4)  # Y: per image
    np.testing.assert_allclose(x[..., 0].std(axis=(1, 2)), 1.0, atol=1e-3)
    np.testing.assert_allclose(x[..., 1:].reshape(-1, 2).mean(0), 0.0, atol=1e-4)  # U, V: over the split
    np.testing.assert_allclose(x[..., 1:].reshape(-1, 2).std(0), 1.0, atol=1e-3)
    # computed once: a second call reads the cache
    assert data.preprocessing_stats(train, verbose=False) == stats


def test_flat_image_does_not_divide_by_zero():
    x = preprocess.yuv_normalize(np.full((1, 4, 4, 3), 128, np.uint8), [0.0, 0.0], [1.0, 1.0]).numpy()
    assert np.all(np.isfinite(x)) and np.allclose(x[..., 0], 0.0)


def test_imagenet_normalisation_is_exact():
    pixel = np.array([[[[255, 0, 128]]]], np.uint8)
    out = preprocess.imagenet_normalize(pixel).numpy().reshape(3)
    expected = (np.array([255, 0, 128]) / 255.0 - np.array(preprocess.IMAGENET_MEAN)) / np.array(preprocess.IMAGENET_STD)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_pipeline_yields_labels_at_each_level_and_shuffles_reproducibly():
    split = data.load_split("synthetic", "train", synthetic={"train_size": 64})
    stats = data.preprocessing_stats(split, verbose=False)
    levels = {"fine_fc3": "fine", "coarse_fc1": "coarse"}
    ds = data.make_pipeline(split, stats, 16, levels, training=True, seed=5)
    first = [y["fine_fc3"].numpy() for _, y in ds]
    again = [y["fine_fc3"].numpy() for _, y in data.make_pipeline(split, stats, 16, levels, training=True, seed=5)]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    x, y = next(iter(ds))
    assert x.shape == (16, 32, 32, 3) and x.dtype == tf.float32
    np.testing.assert_array_equal(y["coarse_fc1"].numpy(), split.info.coarse_of(y["fine_fc3"].numpy()))
    assert sorted(np.concatenate(first).tolist()) == sorted(split.labels.tolist())  # every example once


def test_training_pipeline_drops_the_partial_batch_for_static_shapes():
    split = data.load_split("synthetic", "train", synthetic={"train_size": 40})
    stats = data.preprocessing_stats(split, verbose=False)
    sizes = [x.shape[0] for x, _ in data.make_pipeline(split, stats, 16, {"fine_fc3": "fine"}, training=True)]
    assert sizes == [16, 16]
    sizes = [x.shape[0] for x in data.make_pipeline(split, stats, 16, images_only=True)]
    assert sizes == [16, 16, 8]


def test_dataset_info_tables():
    cifar10 = data.dataset_info("cifar10")
    assert cifar10.coarse_names == ("vehicle", "animal")
    assert [cifar10.coarse_names[c] for c in cifar10.fine_to_coarse[:3]] == ["vehicle", "vehicle", "animal"]
    cifar100 = data.dataset_info("cifar100")
    assert cifar100.num_fine == 100 and cifar100.num_coarse == 20
    assert cifar100.fine_names[0] == "apple" and cifar100.coarse_names[cifar100.fine_to_coarse[0]] == "fruit_and_vegetables"
    birds = data.dataset_info("birdsnap34")
    assert birds.num_fine == 34 and birds.num_coarse == 18 and birds.image_size == (224, 224)
    assert data.dataset_info("birdsnap").num_fine == 500
