"""The whole protocol on tiny embedded data: every output exists and is usable."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "synthetic.train_size=192", "--set", "synthetic.eval_size=64", "--epochs", "1",
        "--batch-size", "32", "--set", "embedding_sample=16", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "d")
    assert train.main(["--variant", "D", "--output-dir", out, *TINY]) == 0
    return out


def _scalar_tags(folder):
    from tensorflow.python.summary.summary_iterator import summary_iterator

    tags = set()
    for path in glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True):
        for event in summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags


def test_metrics_json_holds_every_figure(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    for key in ("cluster_accuracy", "nmi", "purity", "classification_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["config"]["variant"] == "D"
    assert metrics["warm_start"]["head"] == "hungarian"
    assert "fc1_side" not in metrics["warm_start"]["layers"] and "fc3" in metrics["warm_start"]["layers"]
    assert {"cluster_s", "classify_s", "total_s"} <= set(metrics["timings"])
    assert metrics["versions"]["tensorflow"] == tf.__version__


def test_tensorboard_has_every_loss_output_and_metric(run_dir):
    cluster = _scalar_tags(os.path.join(run_dir, "logs", "cluster", "train"))
    for tag in ("epoch_loss", "epoch_fine_fc3_loss", "epoch_fine_fc2_loss", "epoch_coarse_fc1_side_loss",
                "epoch_learning_rate"):
        assert tag in cluster, (tag, cluster)
    # TensorBoard files `val_*` figures under validation/, prefix dropped
    validation = _scalar_tags(os.path.join(run_dir, "logs", "cluster", "validation"))
    assert {"epoch_cluster_accuracy", "epoch_nmi", "epoch_purity"} <= validation, validation
    classify = _scalar_tags(os.path.join(run_dir, "logs", "classify"))
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= classify, classify
    assert "config" in _scalar_tags(os.path.join(run_dir, "logs", "config"))
    projector = os.path.join(run_dir, "logs", "projector")
    assert np.loadtxt(os.path.join(projector, "tensors.tsv")).shape == (16, 128)
    assert len(open(os.path.join(projector, "metadata.tsv")).read().splitlines()) == 17


def test_saved_model_matches_the_keras_classifier(run_dir):
    import keras

    from keras_cwsn import data
    from keras_cwsn.models import build_model

    split = data.load_split("synthetic", "test", synthetic={"train_size": 192, "eval_size": 64})
    images = split.images[:8]
    # the signature, run in a fresh process that has TensorFlow alone
    script = (
        "import sys, json, numpy as np, tensorflow as tf\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "x = np.load(sys.argv[2])\n"
        "out = m.signatures['serving_default'](images=tf.constant(x))\n"
        "np.save(sys.argv[3], out['probabilities'].numpy())\n"
    )
    np.save(os.path.join(run_dir, "x.npy"), images)
    subprocess.run([sys.executable, "-c", script, os.path.join(run_dir, "classifier"),
                    os.path.join(run_dir, "x.npy"), os.path.join(run_dir, "p.npy")], check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    served = np.load(os.path.join(run_dir, "p.npy"))
    # the Keras classifier with the exported weights, fed by the training pipeline's preprocessing
    loaded = tf.saved_model.load(os.path.join(run_dir, "classifier"))
    classifier = build_model("lenet", "ce", 9)
    by_name = {v.name.rsplit(":", 1)[0]: v for v in loaded.variables}
    for variable in classifier.weights:
        variable.assign(by_name[variable.path].numpy())
    stats = data.preprocessing_stats(data.load_split("synthetic", "train", synthetic={"train_size": 192}), verbose=False)
    x = np.concatenate(list(data.make_pipeline(split, stats, 8, images_only=True).take(1).as_numpy_iterator()))
    expected = keras.ops.convert_to_numpy(classifier(x, training=False)["probabilities"])
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert np.allclose(served.sum(-1), 1.0, atol=1e-5)


def test_clusterer_is_saved_and_reloads(run_dir):
    import keras

    import keras_cwsn.losses  # noqa: F401  registers PairwiseKLLoss for deserialisation

    model = keras.saving.load_model(os.path.join(run_dir, "clusterer.keras"))
    assert sorted(model.output) == ["coarse_fc1_side", "fine_fc2", "fine_fc3"]


def test_finished_run_is_refused_without_overwrite(run_dir, capsys):
    assert train.main(["--variant", "D", "--output-dir", run_dir, *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished run" in err[0] and "--overwrite" in err[0]


def test_ce_baseline_and_multiple_seeds(tmp_path):
    out = str(tmp_path / "ce")
    assert train.main(["--variant", "ce", "--seeds", "0,1", "--output-dir", out, *TINY]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["seeds"] == [0, 1]
    assert len(summary["per_seed"]["classification_accuracy"]) == 2
    assert "cluster_accuracy" not in summary
    assert summary["classification_accuracy"]["best"] == max(summary["per_seed"]["classification_accuracy"])
    assert summary["classification_accuracy"]["std"] == pytest.approx(  # the sample std over seeds (n - 1)
        np.std(summary["per_seed"]["classification_accuracy"], ddof=1))
    assert os.path.isdir(os.path.join(out, "seed_1", "classifier"))
    assert not os.path.exists(os.path.join(out, "seed_0", "clusterer.keras"))


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "mnist"], "Unknown dataset"),
    (["--variant", "E"], "variant"),
    (["--set", "cluster.epoch=3"], "Did you mean 'epochs'"),
    (["--set", "margin=-1"], "margin"),
    (["--dataset", "cifar10", "--data-dir", "/no/such/folder"], "does not exist"),
])
def test_cli_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    assert train.main([*argv, "--output-dir", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
