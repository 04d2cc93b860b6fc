"""The whole protocol on whichever Keras backend runs the tests, with or without TensorFlow installed.

CI runs this module twice: in the TensorFlow environment, and with `KERAS_BACKEND=jax` in an
environment where TensorFlow is not installed (requirements-jax.txt). Nothing here imports
TensorFlow at module level; the SavedModel checks run only where it is installed.
"""

import csv
import json
import os

import keras
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from conftest import CIFAR10_CLASSES, make_cifar_tree

import train
from keras_cwsn.optional import tensorflow_available

TINY = ["--set", "synthetic.train_size=96", "--set", "synthetic.eval_size=48", "--batch-size", "16",
        "--set", "embedding_sample=8", "--set", "metrics_sample=64", "--quiet"]


def _history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _figures(run_dir):
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("any_backend") / "run")
    assert train.main(["--variant", "C", "--cluster-epochs", "2", "--classify-epochs", "1", "--seed", "3", *TINY,
                       "--output-dir", out]) == 0
    return out


def test_every_output_of_a_run(finished_run):
    figures = _figures(finished_run)
    assert figures["backend"] == keras.backend.backend()
    for name in ("clusterer.keras", "classifier.keras", "preprocessing.json", "cluster_result.json",
                 "warm_start.json", "config.json"):
        assert os.path.isfile(os.path.join(finished_run, name)), name
    cluster = _history(os.path.join(finished_run, "cluster_history.csv"))
    classify = _history(os.path.join(finished_run, "classify_history.csv"))
    assert len(cluster) == 2 and len(classify) == 1
    for row in cluster:  # the per-epoch figures and what they and the epoch cost
        assert 0 <= float(row["val_cluster_accuracy"]) <= 1 and float(row["epoch_seconds"]) > 0
        assert 0 < float(row["figures_seconds"]) < float(row["epoch_seconds"])
    assert float(cluster[1]["learning_rate"]) > 0 and "val_accuracy" in classify[0]
    # the SavedModel is written where TensorFlow is; elsewhere it is left to `python -m keras_cwsn.export`
    assert os.path.isdir(os.path.join(finished_run, "classifier")) == tensorflow_available()


def test_classifier_file_reproduces_the_reported_accuracy(finished_run):
    from keras_cwsn import data as data_lib
    from keras_cwsn.data.normalize import normalize

    figures = _figures(finished_run)
    with open(os.path.join(finished_run, "preprocessing.json")) as f:
        stats = json.load(f)
    evaluation = data_lib.load_split("synthetic", figures["eval_split"], synthetic=figures["config"]["synthetic"])
    classifier = keras.saving.load_model(os.path.join(finished_run, "classifier.keras"), compile=False)
    probabilities = classifier.predict(normalize(evaluation.images, stats), verbose=0)["probabilities"]
    accuracy = float(np.mean(np.argmax(probabilities, -1) == evaluation.labels))
    assert accuracy == pytest.approx(figures["classification_accuracy"], abs=1e-6)


def test_stored_mapping_is_the_hungarian_mapping_of_the_training_clusters(finished_run):
    from keras_cwsn import data as data_lib
    from keras_cwsn.data.normalize import normalize

    figures = _figures(finished_run)
    with open(os.path.join(finished_run, "preprocessing.json")) as f:
        stats = json.load(f)
    with open(os.path.join(finished_run, "cluster_result.json")) as f:
        mapping = np.asarray(json.load(f)["mapping"])
    train_split = data_lib.load_split("synthetic", "train", synthetic=figures["config"]["synthetic"])
    clusterer = keras.saving.load_model(os.path.join(finished_run, "clusterer.keras"), compile=False)
    clusters = np.argmax(clusterer.predict(normalize(train_split.images, stats), verbose=0)["fine_fc3"], -1)
    k = len(mapping)
    counts = np.zeros((k, k))
    np.add.at(counts, (clusters, train_split.labels), 1)  # cluster x class
    rows, cols = linear_sum_assignment(-counts)
    assert counts[np.arange(k), mapping].sum() == counts[rows, cols].sum()  # an optimal assignment
    accuracy = counts[np.arange(k), mapping].sum() / len(clusters)
    with open(os.path.join(finished_run, "cluster_result.json")) as f:
        assert json.load(f)["train"]["cluster_accuracy"] == pytest.approx(accuracy, abs=1e-9)


@pytest.mark.heavy
def test_interrupted_run_resumes_to_the_same_figures(tmp_path, monkeypatch):
    from keras_cwsn.training import protocol

    args = ["--variant", "A", "--cluster-epochs", "2", "--classify-epochs", "2", "--seed", "5", *TINY]
    assert train.main(args + ["--output-dir", str(tmp_path / "reference")]) == 0

    class Interrupted(Exception):
        pass

    class StopAfterFirstClassifyEpoch(protocol.EpochTimer):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1 and "probabilities" in self.model.output_names:  # the classifier's second epoch
                raise Interrupted()
            super().on_epoch_begin(epoch, logs)

    with monkeypatch.context() as patch:
        patch.setattr(protocol, "EpochTimer", StopAfterFirstClassifyEpoch)
        with pytest.raises(Interrupted):
            train.main(args + ["--output-dir", str(tmp_path / "resumed")])
    assert (tmp_path / "resumed" / "cluster_result.json").exists()
    assert not (tmp_path / "resumed" / "metrics.json").exists()
    assert train.main(args + ["--output-dir", str(tmp_path / "resumed")]) == 0
    reference, resumed = _figures(tmp_path / "reference"), _figures(tmp_path / "resumed")
    for key in ("cluster_accuracy", "nmi", "classification_accuracy"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key
    assert [event["phase"] for event in resumed["resumed"]] == ["classify"]


@pytest.mark.heavy
def test_sigkill_during_clustering_resumes_to_the_same_figures(tmp_path):
    """A run killed with SIGKILL (no handler runs) goes on from its last checkpoint to an uninterrupted run's figures."""
    import subprocess
    import sys

    from conftest import ROOT, sigkill_at, subprocess_env

    env = subprocess_env(tmp_path / "cache", KERAS_BACKEND=keras.backend.backend())

    def command(out):
        return [sys.executable, os.path.join(ROOT, "train.py"), "--variant", "D", "--cluster-epochs", "3",
                "--classify-epochs", "1", "--seed", "4", *TINY, "--output-dir", str(out)]

    reference = subprocess.Popen(command(tmp_path / "reference"), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    killed = tmp_path / "killed"
    victim = subprocess.Popen(command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metadata = killed / "backup" / "cluster" / "training_metadata.json"
    sigkill_at(victim, metadata)
    saved_epoch = json.loads(metadata.read_text())["epoch"]
    assert 1 <= saved_epoch < 3 and not (killed / "metrics.json").exists()

    restarted = subprocess.run(command(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    resumed, uninterrupted = _figures(killed), _figures(tmp_path / "reference")
    for key in ("cluster_accuracy", "nmi", "purity", "classification_accuracy"):
        assert resumed[key] == pytest.approx(uninterrupted[key], abs=1e-6), key
    assert resumed["resumed"][0] == {**resumed["resumed"][0], "phase": "cluster", "from_epoch": saved_epoch}
    for phase, epochs in (("cluster", 3), ("classify", 1)):  # every logged figure but wall times, epoch by epoch
        rows, reference_rows = (_history(run / f"{phase}_history.csv") for run in (killed, tmp_path / "reference"))
        assert [int(r["epoch"]) for r in rows] == [int(r["epoch"]) for r in reference_rows] == list(range(epochs))
        for row, ref in zip(rows, reference_rows):
            assert row.keys() == ref.keys()
            for key in (k for k in ref if not k.endswith("_seconds")):
                assert float(row[key]) == pytest.approx(float(ref[key]), rel=1e-4, abs=1e-6), (phase, key)
    assert not (killed / "backup").exists(), "checkpoints are removed once the run is finished"
    assert (killed / "classifier" / "saved_model.pb").exists() == tensorflow_available()


def test_broken_images_are_skipped_and_counted(tmp_path):
    make_cifar_tree(str(tmp_path / "data"), per_class=3, splits=("train", "test"))
    (tmp_path / "data" / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (tmp_path / "data" / "train" / "dog" / "empty.png").write_bytes(b"")
    out = tmp_path / "run"
    assert train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--variant", "ce",
                       "--epochs", "1", "--batch-size", "10", "--set", "embedding_sample=0", "--quiet",
                       "--output-dir", str(out)]) == 0
    figures = _figures(out)
    assert figures["eval_split"] == "test" and figures["num_train"] == 30  # all of train/ (paper's protocol)
    report = figures["data"]["train"]
    assert report["listed"] == 32 and report["decoded"] == 30
    assert sorted(os.path.basename(p) for p in report["skipped_undecodable"]) == ["broken.jpg", "empty.png"]


@pytest.mark.parametrize("argv, message", [
    (["--variant", "E"], "Config key 'variant' must be one of"),
    (["--criterion", "triplet"], "Config key 'criterion' must be one of kcl, mcl"),
    (["--dataset", "cifar11"], "Did you mean 'cifar10'?"),
    (["--epochs", "many"], "invalid int value"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, tmp_path, capsys):
    assert train.main(argv + ["--output-dir", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_unknown_class_folder_exits_2_with_one_line(tmp_path, capsys):
    make_cifar_tree(str(tmp_path / "data"), per_class=1, classes=CIFAR10_CLASSES[:2] + ("unicorn",))
    assert train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--quiet",
                       "--output-dir", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unicorn" in lines[0] and "not in the class table" in lines[0], lines


def test_export_later_writes_the_savedmodel_of_a_run(finished_run, tmp_path):
    """`python -m keras_cwsn.export RUN` (for runs trained without TensorFlow) serves the run's classifier."""
    tf = pytest.importorskip("tensorflow")
    from keras_cwsn import export as export_lib

    assert export_lib.main([finished_run, "--output", str(tmp_path / "model")]) == 0
    figures = _figures(finished_run)
    from keras_cwsn import data as data_lib

    evaluation = data_lib.load_split("synthetic", figures["eval_split"], synthetic=figures["config"]["synthetic"])
    serve = tf.saved_model.load(str(tmp_path / "model")).signatures["serving_default"]
    ids = serve(images=tf.constant(evaluation.images))["class_ids"].numpy()
    assert float(np.mean(ids == evaluation.labels)) == pytest.approx(figures["classification_accuracy"], abs=1e-6)
    assert export_lib.main([str(tmp_path)]) == 2


def test_hparams_and_final_figures_reach_tensorboard(finished_run):
    """`tensorboard --logdir runs` compares runs in the HParams dashboard: read the event files back."""
    pytest.importorskip("tensorflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(os.path.join(finished_run, "logs", "hparams"), size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    sessions = [plugin_data_pb2.HParamsPluginData.FromString(c) for c in content.values()]
    start = [s.session_start_info for s in sessions if s.HasField("session_start_info")][0]
    hparams = {k: v.ListFields()[0][1] for k, v in start.hparams.items()}
    assert hparams["variant"] == "C" and hparams["criterion"] == "kcl" and hparams["seed"] == 3
    assert hparams["cluster.epochs"] == 2 and hparams["classify.batch_size"] == 16
    assert hparams["eval_split"] == "test" and hparams["margin"] == 2.0
    assert hparams["init"] == "torch" and hparams["batchnorm"] == "keras" and hparams["weight_decay_mode"] == "coupled"
    assert hparams["last_layer_weight_decay"] is True
    figures = _figures(finished_run)
    for key in ("cluster_accuracy", "classification_accuracy"):
        value = float(tf_value(events.Tensors(f"final/{key}")[0].tensor_proto))
        assert value == pytest.approx(figures[key], abs=1e-6), key


def tf_value(proto):
    import tensorflow as tf

    return tf.make_ndarray(proto)


# The losses on this backend: value and gradient against a float64 double loop (the full suite,
# test_losses.py, runs on TensorFlow; these run on every backend, JAX included).


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return np.maximum(shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)), np.log(1e-7))


def _kcl_reference(labels, logits, fixed_log_t=None, margin=2.0):
    log_p = _log_softmax64(logits)
    log_t = log_p if fixed_log_t is None else fixed_log_t
    n, total = len(labels), 0.0
    for i in range(n):
        for j in range(n):
            kl = float(np.sum(np.exp(log_t[i]) * (log_t[i] - log_p[j])))
            total += kl if labels[i] == labels[j] else max(0.0, margin - kl)
    return total / n**2


def _mcl_reference(labels, logits, _fixed=None):
    p = np.exp(_log_softmax64(logits))
    n, total = len(labels), 0.0
    for i in range(n):
        for j in range(n):
            s = min(max(float(p[i] @ p[j]), 1e-7), 1 - 1e-7)
            total -= np.log(s) if labels[i] == labels[j] else np.log(1 - s)
    return total / n**2


def _value_and_grad(fn, x):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        value, grad = jax.value_and_grad(fn)(jax.numpy.asarray(x))
        return float(value), np.asarray(grad)
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = fn(x)
    return float(value), tape.gradient(value, x).numpy()


@pytest.mark.parametrize("criterion", ["kcl", "mcl"])
def test_pairwise_losses_match_a_float64_reference_on_this_backend(criterion):
    from keras_cwsn.losses import pairwise_loss

    rng = np.random.default_rng(1)
    logits = (2 * rng.standard_normal((5, 4))).astype(np.float32)
    labels = np.array([0, 1, 0, 2, 1], np.int32)
    loss = pairwise_loss(criterion)
    value, grad = _value_and_grad(lambda x: loss(keras.ops.convert_to_tensor(labels), x), logits)
    reference = _kcl_reference if criterion == "kcl" else _mcl_reference
    assert value == pytest.approx(reference(labels, logits), rel=1e-4)
    fixed = _log_softmax64(logits)  # KCL's target side is held fixed (stop_gradient), as in the loss
    expected = np.zeros((5, 4))
    for idx in np.ndindex(5, 4):
        plus, minus = logits.astype(np.float64), logits.astype(np.float64)
        plus[idx] += 1e-5
        minus[idx] -= 1e-5
        expected[idx] = (reference(labels, plus, fixed) - reference(labels, minus, fixed)) / 2e-5
    np.testing.assert_allclose(grad, expected, atol=2e-4)


def test_a_redirected_log_says_what_runs_and_numbers_every_epoch(tmp_path, capfd):
    """stdout that is not a terminal (nohup, CI, a file): the run's header, a line per phase, `[phase k/n]` epoch
    lines whose evaluation keys name the split they are on, and no progress-bar redraws."""
    args = [a for a in TINY if a != "--quiet"]
    out_dir = str(tmp_path / "run")
    assert train.main(["--variant", "A", "--cluster-epochs", "2", "--classify-epochs", "1", *args,
                       "--output-dir", out_dir]) == 0
    out = capfd.readouterr().out
    assert "\r" not in out and "\x1b[" not in out
    lines = [line for line in out.splitlines() if not line.startswith("[data]")]
    assert lines[0] == ("[run] data: synthetic from embedded synthetic data: train 96, test 48 images; "
                        "9 classes in 3 groups; skipped 0 file(s)")
    assert lines[1].startswith("[run] network lenet, variant A (clustering warm start, criterion kcl")
    assert lines[2] == ("[run] schedule: cluster 2 epochs, batch 16, lr 0.01; classify 1 epochs, batch 16, "
                        "lr 0.01")
    assert lines[3].startswith("[run] figures on the test split (48 images)")
    assert lines[4] == f"[run] output: {out_dir}"
    assert lines[5].startswith("[cluster] phase 1 of 2: clustering pretraining")
    epochs = [line for line in lines if line.startswith(("[cluster ", "[classify "))]
    assert [line.split("]")[0] + "]" for line in epochs] == ["[cluster 1/2]", "[cluster 2/2]", "[classify 1/1]"], out
    assert "test_cluster_accuracy" in epochs[0] and "test_accuracy" in epochs[2], epochs
    assert not any("val_" in line for line in epochs), epochs
    assert lines.index("[classify] phase 2 of 2: classification, warm-started from the clusterer; 1 epochs, "
                       "batch 16, lr 0.01") == lines.index(epochs[2]) - 1
    assert _figures(out_dir)["data_read"] == lines[0][len("[run] data: "):]


def test_a_terminal_keeps_keras_progress_bars(tmp_path, capfd, monkeypatch):
    from keras_cwsn.training import log

    monkeypatch.setattr(log, "progress_bars", lambda: True)
    args = [a for a in TINY if a != "--quiet"]
    assert train.main(["--variant", "ce", "--epochs", "1", *args, "--output-dir", str(tmp_path / "run")]) == 0
    out = capfd.readouterr().out
    assert "[classify] phase 1 of 1: classification from scratch" in out
    assert "[classify 1/1]" not in out and "6/6" in out, out  # Keras's bar: 96 images in batches of 16


def test_a_failed_start_leaves_no_run_behind(tmp_path, capsys):
    """Data that fails to load: no folder (or nothing added to one that was there) for TensorBoard to list;
    the files of an unfinished run being resumed are kept."""
    make_cifar_tree(str(tmp_path / "data"), per_class=1, classes=CIFAR10_CLASSES[:2] + ("unicorn",))
    bad = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--quiet", "--output-dir"]
    assert train.main(bad + [str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    assert train.main(bad + [str(tmp_path / "mine")]) == 2
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "config.json").write_text("{}")
    assert train.main(bad + [str(resumed)]) == 2
    assert os.listdir(resumed) == ["config.json"]
    assert capsys.readouterr().err.count("unicorn") == 3


def test_last_layer_weight_decay_false_spares_fc3_alone_in_both_phases(tmp_path, monkeypatch):
    from keras_cwsn.training import protocol

    spared = []

    def spy(model, variant, optimizer, **kwargs):
        spared.append(sorted(v.path for v in model.trainable_variables if not optimizer._use_weight_decay(v)))
        return compile_model(model, variant, optimizer, **kwargs)

    compile_model = protocol.compile_model
    monkeypatch.setattr(protocol, "compile_model", spy)
    out = str(tmp_path / "run")
    assert train.main(["--variant", "C", "--cluster-epochs", "1", "--classify-epochs", "1", "--set",
                       "last_layer_weight_decay=false", *TINY, "--set", "embedding_sample=0", "--output-dir", out]) == 0
    assert spared == [["fc3/bias", "fc3/kernel"]] * 2  # the clusterer, then the classifier
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["last_layer_weight_decay"] is False


def test_init_and_batchnorm_settings_reach_every_model_the_protocol_builds(tmp_path, monkeypatch):
    from keras_cwsn.training import protocol

    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs.get("init"), kwargs.get("batchnorm")))
        return build_model(*args, **kwargs)

    build_model = protocol.build_model
    monkeypatch.setattr(protocol, "build_model", spy)
    out = str(tmp_path / "run")
    assert train.main(["--variant", "A", "--cluster-epochs", "1", "--classify-epochs", "1", "--set", "init=keras",
                       "--set", "batchnorm=torch", *TINY, "--set", "embedding_sample=0", "--output-dir", out]) == 0
    assert seen == [("keras", "torch")] * 2  # the clusterer, then the classifier (neither the default)
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    assert saved["init"] == "keras" and saved["batchnorm"] == "torch"
