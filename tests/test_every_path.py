"""Every dataset a user can name x every variant and `ce` runs to the end and writes metrics.json.

The failures users meet are in whole paths nobody ran (a Birdsnap `ce` run that crashed after its
last epoch), so each registered dataset runs the real `train.py` on tiny data: one epoch per phase,
AlexNet datasets at 64x64 with Appendix B's per-variant settings otherwise untouched. The own-folder
path (`--hierarchy`) has the same sweep in test_own_dataset.py.
"""

import json
import os

import pytest

import train
from conftest import make_cifar_tree, write_image
from keras_cwsn.data import dataset_info
from keras_cwsn.variants import ALL_VARIANTS
from keras_cwsn.optional import tensorflow_available

ALEXNET_SMALL = ["--set", "image_size=64", "--set", "classify.batch_size=8"]
COMMON = ["--epochs", "1", "--quiet", "--set", "embedding_sample=8"]


def _class_tree(root, names, per_split=(2, 1), size=40):
    """root/{train,test}/<name>/NN.jpg for each class name (random pixels: only the path is under test)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), per_split):
        for name in names:
            for i in range(count):
                write_image(os.path.join(root, split, name, f"{i:02d}.jpg"),
                            rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Arguments that point each registered dataset at tiny data of its own kind."""
    root = tmp_path_factory.mktemp("every-path")
    cifar_test = str(root / "cifar10-test")
    make_cifar_tree(cifar_test, per_class=3, splits=("train", "test"))
    cifar_val = str(root / "cifar10-val")
    make_cifar_tree(cifar_val, per_class=3)
    cifar100 = _class_tree(root / "cifar100", dataset_info("cifar100").fine_names, size=32)
    cub42 = _class_tree(root / "cub42", dataset_info("cub42").fine_names)
    cases = {
        "synthetic": ["--dataset", "synthetic", "--set", "synthetic.train_size=96", "--set", "synthetic.eval_size=32",
                      "--batch-size", "16"],
        "cifar10 with test/": ["--dataset", "cifar10", "--data-dir", cifar_test, "--batch-size", "8"],
        "cifar10 without test/": ["--dataset", "cifar10", "--data-dir", cifar_val, "--set", "val_per_class=1",
                                  "--batch-size", "8"],
        "cifar100": ["--dataset", "cifar100", "--data-dir", cifar100, "--batch-size", "16"],
        "cub42": ["--dataset", "cub42", "--data-dir", cub42, *ALEXNET_SMALL],
    }
    if tensorflow_available():  # Birdsnap is a TFDS builder: from a fake download
        from test_birdsnap import make_fake_birdsnap

        download = str(root / "birdsnap-download")
        os.makedirs(download)
        make_fake_birdsnap(download)
        for name in ("birdsnap34", "birdsnap"):
            cases[name] = ["--dataset", name, "--data-dir", download, *ALEXNET_SMALL]
    return cases


@pytest.fixture(autouse=True)
def fresh_keras_state():
    """Thirty-odd whole runs in one worker: drop each run's models and traced functions before the next."""
    yield
    import gc

    import keras

    keras.backend.clear_session()
    gc.collect()


DATASETS = ("synthetic", "cifar10 with test/", "cifar10 without test/", "cifar100", "cub42", "birdsnap34", "birdsnap")


@pytest.mark.heavy
@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_and_variant_runs_to_the_end(dataset, variant, data, tmp_path):
    if dataset not in data:
        pytest.skip("Birdsnap needs TensorFlow (a TFDS builder)")
    out = str(tmp_path / "run")
    assert train.main([*data[dataset], *COMMON, "--variant", variant, "--output-dir", out]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["config"]["variant"] == variant
    assert metrics["eval_split"] == ("val" if dataset == "cifar10 without test/" else "test")
    assert 0.0 <= metrics["classification_accuracy"] <= 1.0
    assert ("cluster_accuracy" in metrics) == (variant != "ce")
    assert len(metrics["class_names"]) == len(metrics["fine_to_coarse"])


@pytest.mark.heavy
@pytest.mark.parametrize("variant", ["C", "ce"])
def test_alexnet_with_batchnorm_runs_to_the_end(variant, data, tmp_path):
    """`alexnet_bn`: the warm start carries the BatchNorm layers' weights and statistics over too."""
    out = str(tmp_path / "run")
    assert train.main([*data["cub42"], *COMMON, "--variant", variant, "--set", "alexnet_bn=true",
                       "--output-dir", out]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["config"]["alexnet_bn"] is True and 0.0 <= metrics["classification_accuracy"] <= 1.0

