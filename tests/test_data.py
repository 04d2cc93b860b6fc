"""Data sources and the tf.data pipeline: labels at both levels, splits, preprocessing maths."""

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow only: the tf.data pipeline and its preprocessing")

from conftest import (  # noqa: E402
    CIFAR10_ANIMALS,
    CIFAR10_CLASSES,
    CIFAR10_VEHICLES,
    make_cifar_tree,
    uv_stats_reference,
    write_image,
    yuv_reference,
)
from keras_cwsn import data  # noqa: E402
from keras_cwsn.data import folder, normalize, preprocess  # noqa: E402
from keras_cwsn.data.synthetic import make_synthetic  # noqa: E402


def _refuse(what):
    """A stand-in for a function that must not run (the cache should answer instead)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} ran again: the cache was not read")

    return refuse


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
    assert "skipped 2 undecodable" in capsys.readouterr().err  # a diagnostic, off stdout



def test_second_folder_read_comes_from_the_cache(tmp_path, monkeypatch):
    make_cifar_tree(tmp_path, per_class=2)
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    images, labels, report = folder.load_folder_split(str(tmp_path), "train", CIFAR10_CLASSES, (32, 32))
    monkeypatch.setattr(folder, "decode_files", _refuse("decode_files"))
    images2, labels2, report2 = folder.load_folder_split(str(tmp_path), "train", CIFAR10_CLASSES, (32, 32))
    np.testing.assert_array_equal(images, images2)
    np.testing.assert_array_equal(labels, labels2)
    assert report2["skipped_undecodable"] == report["skipped_undecodable"] != []
    # A changed listing is a different cache entry: the files are decoded again.
    write_image(str(tmp_path / "train" / "cat" / "new.png"), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(AssertionError, match="decode_files ran again"):
        folder.load_folder_split(str(tmp_path), "train", CIFAR10_CLASSES, (32, 32))


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


# Hand-computed BT.601 YUV of pure colours (Y = .299 R + .587 G + .114 B, U = .492111 (B - Y),
# V = .877283 (R - Y), RGB in [0, 1]):
#   red   Y .299  U .492111 x -.299 = -.147141  V .877283 x  .701 =  .614975
#   green Y .587  U .492111 x -.587 = -.288869  V .877283 x -.587 = -.514965
#   blue  Y .114  U .492111 x  .886 =  .436010  V .877283 x -.114 = -.100010
#   white Y 1     U 0                           V 0
PURE = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], np.uint8)
PURE_Y = np.array([[0.299, 0.587], [0.114, 1.0]])
PURE_U = np.array([[-0.147141, -0.288869], [0.436010, 0.0]])
PURE_V = np.array([[0.614975, -0.514965], [-0.100010, 0.0]])


def test_yuv_of_known_pixels_by_hand():
    uv_mean, uv_std = [0.1, -0.2], [2.0, 4.0]
    tile = (2, 2)  # a 4 x 4 image: each colour 4 times (same mean and std, and above the flat-image floor 1/4)
    x = preprocess.yuv_normalize(np.tile(PURE, tile + (1,))[None], uv_mean, uv_std).numpy()[0]
    assert x.shape == (4, 4, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 1], np.tile((PURE_U - 0.1) / 2.0, tile), atol=2e-6)
    np.testing.assert_allclose(x[..., 2], np.tile((PURE_V + 0.2) / 4.0, tile), atol=2e-6)
    # Y standardised by this image's own mean (0.5) and population std.
    std = np.sqrt(np.mean((PURE_Y - 0.5) ** 2))
    assert std == pytest.approx(0.33428, abs=1e-5)
    np.testing.assert_allclose(x[..., 0], np.tile((PURE_Y - 0.5) / std, tile), atol=1e-5)


def test_uv_statistics_of_a_known_split_by_hand(tmp_path):
    """Half the pixels pure red, half pure blue: U, V mean is the midpoint and std half the gap."""
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0, ..., 0] = 255
    images[1, ..., 2] = 255
    info = data.dataset_info("cifar10")
    labels = np.array([0, 1])
    split = data.Split("cifar10", "train", tf.data.Dataset.from_tensor_slices((images, labels)), labels, info, images)
    stats = data.preprocessing_stats(split, cache_dir=str(tmp_path), verbose=False)
    assert stats["normalization"] == "yuv"
    np.testing.assert_allclose(stats["uv_mean"], [(-0.147141 + 0.436010) / 2, (0.614975 - 0.100010) / 2], atol=2e-6)
    np.testing.assert_allclose(stats["uv_std"], [(0.436010 + 0.147141) / 2, (0.614975 + 0.100010) / 2], atol=2e-6)


def test_yuv_normalisation_statistics(tmp_path, monkeypatch):
    make_cifar_tree(tmp_path, per_class=4)
    train = data.load_split("cifar10", "train", data_dir=str(tmp_path), val_per_class=1)
    stats = data.preprocessing_stats(train, verbose=False)
    # the statistics are those of the training split's U and V pixels (NumPy BT.601 reference)
    uv_mean, uv_std = uv_stats_reference(train.images)
    np.testing.assert_allclose(stats["uv_mean"], uv_mean, atol=2e-6)
    np.testing.assert_allclose(stats["uv_std"], uv_std, atol=2e-6)
    batches = data.make_pipeline(train, stats, 7, images_only=True)
    x = np.concatenate(list(batches.as_numpy_iterator()))
    np.testing.assert_allclose(x, yuv_reference(train.images, uv_mean, uv_std), atol=2e-4)
    np.testing.assert_allclose(x[..., 0].mean(axis=(1, 2)), 0.0, atol=1e-4)  # Y: per image
    np.testing.assert_allclose(x[..., 0].std(axis=(1, 2)), 1.0, atol=1e-3)
    np.testing.assert_allclose(x[..., 1:].reshape(-1, 2).mean(0), 0.0, atol=1e-4)  # U, V: over the split
    np.testing.assert_allclose(x[..., 1:].reshape(-1, 2).std(0), 1.0, atol=1e-3)
    # computed once: a second call reads the cache and never recomputes
    monkeypatch.setattr(normalize, "compute_uv_stats", _refuse("compute_uv_stats"))
    assert data.preprocessing_stats(train, verbose=False) == stats
    # the held-out split's pixels do not enter the statistics
    val = data.load_split("cifar10", "val", data_dir=str(tmp_path), val_per_class=1)
    assert not np.allclose(uv_stats_reference(np.concatenate([train.images, val.images]))[0], uv_mean, atol=1e-6)


def test_flat_image_does_not_divide_by_zero():
    x = preprocess.yuv_normalize(np.full((1, 4, 4, 3), 128, np.uint8), [0.0, 0.0], [1.0, 1.0]).numpy()
    assert np.all(np.isfinite(x)) and np.allclose(x[..., 0], 0.0)


def test_imagenet_normalisation_is_exact():
    pixel = np.array([[[[255, 0, 128]]]], np.uint8)
    out = preprocess.imagenet_normalize(pixel).numpy().reshape(3)
    # (1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225, by hand
    np.testing.assert_allclose(out, [2.248908, -2.035714, 0.426492], rtol=1e-5)


def test_pipeline_yields_labels_at_each_level_and_shuffles_reproducibly():
    split = data.load_split("synthetic", "train", synthetic={"train_size": 64})
    stats = data.preprocessing_stats(split, verbose=False)
    levels = {"fine_fc3": "fine", "coarse_fc1": "coarse"}

    def order(seed, training=True):
        ds = data.make_pipeline(split, stats, 16, levels, training=training, seed=seed)
        return np.concatenate([y["fine_fc3"].numpy() for _, y in ds])

    first = order(5)
    np.testing.assert_array_equal(first, order(5))  # the same seed, the same order
    assert sorted(first.tolist()) == sorted(split.labels.tolist())  # every example once
    # ... and a real shuffle: not the stored order, and another seed gives another order
    np.testing.assert_array_equal(order(5, training=False), split.labels)
    assert not np.array_equal(first, split.labels)
    assert not np.array_equal(first, order(6))
    ds = data.make_pipeline(split, stats, 16, levels, training=True, seed=5)
    x, y = next(iter(ds))
    assert x.shape == (16, 32, 32, 3) and x.dtype == tf.float32
    np.testing.assert_array_equal(y["coarse_fc1"].numpy(), split.info.coarse_of(y["fine_fc3"].numpy()))


def _coarse_partition(fine, coarse):
    """{class name: its coarse label}, checked one coarse label per fine class."""
    by_class = {}
    for f, c in zip(fine.tolist(), coarse.tolist()):
        assert by_class.setdefault(CIFAR10_CLASSES[f], c) == c
    return by_class


def test_cifar10_coarse_labels_are_animals_versus_vehicles(tmp_path):
    """Hsu & Kira's hierarchy reaches the coarse outputs: bird, cat, deer, dog, frog, horse share one
    coarse label; airplane, automobile, ship, truck the other; in the tf.data pipeline and in the
    protocol's own training batches."""
    from keras_cwsn.training import training_data

    make_cifar_tree(tmp_path, per_class=3)
    train = data.load_split("cifar10", "train", data_dir=str(tmp_path), val_per_class=1)
    stats = data.preprocessing_stats(train, verbose=False)
    levels = {"coarse_fc1_side": "coarse", "fine_fc2": "fine", "fine_fc3": "fine"}
    batches = list(data.make_pipeline(train, stats, 8, levels).as_numpy_iterator())
    fine = np.concatenate([y["fine_fc3"] for _, y in batches])
    np.testing.assert_array_equal(fine, np.concatenate([y["fine_fc2"] for _, y in batches]))
    seen = [_coarse_partition(fine, np.concatenate([y["coarse_fc1_side"] for _, y in batches]))]
    ds, steps = training_data(train, stats, 4, levels, {"seed": 0, "augment": False}, "cluster", 0, 1)
    batches = list(ds.take(steps).as_numpy_iterator())
    seen.append(_coarse_partition(np.concatenate([y["fine_fc3"] for _, y in batches]),
                                  np.concatenate([y["coarse_fc1_side"] for _, y in batches])))
    for by_class in seen:
        assert sorted(by_class) == sorted(CIFAR10_CLASSES)
        animals, vehicles = {by_class[c] for c in CIFAR10_ANIMALS}, {by_class[c] for c in CIFAR10_VEHICLES}
        assert len(animals) == 1 and len(vehicles) == 1 and animals != vehicles


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


def test_pipeline_refuses_augment_on_an_in_memory_split_instead_of_ignoring_it():
    split = data.load_split("synthetic", "train", synthetic={"train_size": 32})
    stats = data.preprocessing_stats(split, verbose=False)
    with pytest.raises(ValueError, match="augment=True crops streamed splits only"):
        data.make_pipeline(split, stats, 8, {"fine_fc3": "fine"}, training=True, augment=True)


def test_images_with_alpha_or_grey_with_alpha_decode_to_their_rgb(tmp_path):
    """A WebP with alpha (which `decode_image(channels=3)` refuses) and a grey PNG with alpha train, not skip."""
    pytest.importorskip("tensorflow")
    from PIL import Image

    from keras_cwsn.data.folder import decode_files

    rgba = np.random.default_rng(0).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.webp", "WEBP", lossless=True, exact=True)
    Image.fromarray(rgba[..., :2], "LA").save(tmp_path / "b.png")
    images, labels, skipped = decode_files([str(tmp_path / "a.webp"), str(tmp_path / "b.png")], np.array([0, 1]),
                                           (6, 5), decoder="tensorflow")
    assert skipped == [] and list(labels) == [0, 1]
    np.testing.assert_array_equal(images[0], rgba[..., :3])
    np.testing.assert_array_equal(images[1], np.repeat(rgba[..., :1], 3, axis=-1))
