"""The whole protocol on tiny embedded data: every output exists, and the figures are what the paper's
protocol defines.

The run is conftest's session-wide `protocol_run` (train.py, variant D), shared with test_export.py.
Its figures are recomputed here independently: the best one-to-one cluster -> class assignment of the
training split's confusion matrix by an exact search of its own, NMI and purity by their formulas.
(test_evaluate_report.py holds a run whose evaluation split is built so that a mapping fitted on it
would differ from the training one.)
"""

import glob
import json
import math
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="TensorFlow only: conftest's protocol_run exports a SavedModel")

import train  # noqa: E402
from conftest import TINY_RUN_ARGS, best_one_to_one_matches, confusion_counts, mapped_matches  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(protocol_run):
    return protocol_run["dir"]


def _scalar_tags(folder):
    from tensorflow.python.summary.summary_iterator import summary_iterator

    tags = set()
    for path in glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True):
        for event in summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    return tags


def _nmi(labels, clusters):
    """I(Y; C) / ((H(Y) + H(C)) / 2), natural logs (the arithmetic normalisation the README states)."""
    n = len(labels)
    joint = {}
    for y, c in zip(labels, clusters):
        joint[(y, c)] = joint.get((y, c), 0) + 1
    py = {y: np.sum(labels == y) / n for y in set(labels.tolist())}
    pc = {c: np.sum(clusters == c) / n for c in set(clusters.tolist())}
    mutual = sum(k / n * math.log((k / n) / (py[y] * pc[c])) for (y, c), k in joint.items())
    entropy = lambda p: -sum(v * math.log(v) for v in p.values())  # noqa: E731
    return mutual / ((entropy(py) + entropy(pc)) / 2)


def _purity(labels, clusters):
    return sum(np.bincount(labels[clusters == c]).max() for c in set(clusters.tolist())) / len(labels)


@pytest.fixture(scope="module")
def clusters(protocol_run):
    """The run's clusterer (reloaded from clusterer.keras) applied to both splits: cluster ids and labels."""
    import keras

    from keras_cwsn import data
    from keras_cwsn.data import preprocess

    config, stats = protocol_run["config"], protocol_run["export"]["stats"]
    clusterer = keras.saving.load_model(os.path.join(protocol_run["dir"], "clusterer.keras"), compile=False)
    out = {}
    for name, split in (("train", "train"), ("eval", config["eval_split"])):
        loaded = data.load_split(config["dataset"], split, synthetic=config["synthetic"])
        x = np.asarray(preprocess.preprocess(loaded.images, stats["normalization"], stats))
        logits = clusterer.predict(x, batch_size=256, verbose=0)["fine_fc3"]
        out[name] = (loaded.labels.astype(np.int64), np.argmax(logits, axis=-1))
    return out


def test_stored_mapping_is_the_hungarian_mapping_of_the_training_clusters(protocol_run, clusters):
    with open(os.path.join(protocol_run["dir"], "cluster_result.json")) as f:
        mapping = np.asarray(json.load(f)["mapping"])
    num_classes = 9
    assert sorted(mapping.tolist()) == list(range(num_classes))  # one cluster per class
    labels, assigned = clusters["train"]
    counts = confusion_counts(labels, assigned, num_classes)
    best = best_one_to_one_matches(counts)
    assert mapped_matches(counts, mapping) == best, "the stored mapping is not the best one on the training split"
    assert protocol_run["metrics"]["train_cluster_accuracy"] == pytest.approx(best / len(labels), abs=1e-12)


def test_evaluation_figures_use_the_training_mapping(protocol_run, clusters):
    """cluster_accuracy on the evaluation split reads clusters with the training split's mapping."""
    with open(os.path.join(protocol_run["dir"], "cluster_result.json")) as f:
        mapping = np.asarray(json.load(f)["mapping"])
    metrics = protocol_run["metrics"]
    labels, assigned = clusters["eval"]
    counts = confusion_counts(labels, assigned, 9)
    assert metrics["cluster_accuracy"] == pytest.approx(mapped_matches(counts, mapping) / len(labels), abs=1e-12)
    assert metrics["nmi"] == pytest.approx(_nmi(labels, assigned), rel=1e-9)
    assert metrics["purity"] == pytest.approx(_purity(labels, assigned), abs=1e-12)


def test_warm_start_head_is_the_clusterers_fc3_permuted_by_the_stored_mapping(protocol_run):
    warm = protocol_run["warm_start"]
    with open(os.path.join(protocol_run["dir"], "cluster_result.json")) as f:
        mapping = np.asarray(json.load(f)["mapping"])
    assert warm["head"] == "hungarian"
    np.testing.assert_array_equal(warm["mapping"], mapping)
    assert not np.array_equal(mapping, np.arange(len(mapping)))  # else the permutation would be invisible
    (cluster_kernel, cluster_bias), (class_kernel, class_bias) = warm["clusterer_fc3"], warm["classifier_fc3"]
    for cluster, cls in enumerate(mapping):  # class c's unit is the unit of the cluster mapped to c
        np.testing.assert_array_equal(class_kernel[:, cls], cluster_kernel[:, cluster])
        assert class_bias[cls] == cluster_bias[cluster]
    for a, b in zip(warm["clusterer_conv1"], warm["classifier_conv1"]):
        np.testing.assert_array_equal(a, b)
    metrics = protocol_run["metrics"]
    assert "fc1_side" not in metrics["warm_start"]["layers"] and "fc3" in metrics["warm_start"]["layers"]


def test_optimizers_are_sgd_with_each_phases_momentum_weight_decay_and_rate(protocol_run):
    """The run sets different values per phase (TINY_RUN_ARGS): each phase's optimiser has its own."""
    import keras

    clusterer = keras.saving.load_model(os.path.join(protocol_run["dir"], "clusterer.keras"))
    classifier = protocol_run["export"]["classifier"]
    expected = {"cluster": (clusterer.optimizer, 0.8, 0.001, 0.02),
                "classify": (classifier.optimizer, 0.7, 0.0002, 0.005)}
    for phase, (optimizer, momentum, weight_decay, rate) in expected.items():
        assert isinstance(optimizer, keras.optimizers.SGD) and not optimizer.nesterov, phase
        assert optimizer.momentum == pytest.approx(momentum), phase
        assert optimizer.coupled_weight_decay == pytest.approx(weight_decay), phase  # the paper's (torch) decay
        assert float(keras.ops.convert_to_numpy(optimizer.learning_rate)) == pytest.approx(rate), phase
        with open(os.path.join(protocol_run["dir"], f"{phase}_history.csv")) as f:
            header, row = f.read().split()[:2]
        assert float(row.split(",")[header.split(",").index("learning_rate")]) == pytest.approx(rate), phase


def test_metrics_json_holds_every_figure(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    for key in ("cluster_accuracy", "nmi", "purity", "classification_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["config"]["variant"] == "D"
    assert metrics["warm_start"]["head"] == "hungarian"
    assert {"cluster_s", "classify_s", "total_s"} <= set(metrics["timings"])
    assert metrics["versions"]["tensorflow"] == tf.__version__
    assert isinstance(metrics["versions"]["onednn"], bool)
    assert metrics["versions"]["cpu"].endswith(f", {os.cpu_count()} cores")


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


def test_clusterer_is_saved_and_reloads(run_dir):
    import keras

    import keras_cwsn.losses  # noqa: F401  registers PairwiseKLLoss for deserialisation

    model = keras.saving.load_model(os.path.join(run_dir, "clusterer.keras"))
    assert sorted(model.output) == ["coarse_fc1_side", "fine_fc2", "fine_fc3"]


def test_finished_run_is_refused_without_overwrite(run_dir, capsys):
    assert train.main(["--variant", "D", "--output-dir", run_dir, *TINY_RUN_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished run" in err[0] and "--overwrite" in err[0]


def test_ce_baseline_and_multiple_seeds(tmp_path):
    out = str(tmp_path / "ce")
    assert train.main(["--variant", "ce", "--seeds", "0,1", "--output-dir", out, *TINY_RUN_ARGS]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["seeds"] == [0, 1]
    per_seed = summary["per_seed"]["classification_accuracy"]
    assert len(per_seed) == 2
    assert "cluster_accuracy" not in summary
    assert summary["classification_accuracy"]["best"] == max(per_seed)
    assert summary["classification_accuracy"]["mean"] == pytest.approx((per_seed[0] + per_seed[1]) / 2)
    # the sample std over seeds (n - 1): for two values, |a - b| / sqrt(2)
    assert summary["classification_accuracy"]["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2))
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
