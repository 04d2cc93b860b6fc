"""Resuming: a run killed at any moment and started again ends where an uninterrupted run ends.

Tiny runs on the embedded synthetic data (256 training images, batch 32, a few epochs). The SIGKILL
test, which runs on every backend, is in test_protocol_any_backend.py.
"""

import csv
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("tensorflow", reason="TensorFlow only: resuming killed train.py runs (TensorFlow checkpoints "
                    "and tf.distribute strategies)")

from conftest import ROOT, subprocess_env  # noqa: E402

FIGURES = ("cluster_accuracy", "nmi", "purity", "classification_accuracy", "train_cluster_accuracy")
TINY = ["--set", "synthetic.train_size=256", "--set", "synthetic.eval_size=64", "--batch-size", "32",
        "--set", "embedding_sample=0", "--quiet"]


def _env(tmp_path):
    return subprocess_env(tmp_path / "cache")


def _command(output_dir, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--output-dir", str(output_dir), "--seed", "3",
            "--cluster-epochs", "4", "--classify-epochs", "2", *TINY, *extra]


def _history(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return json.load(f)


def _assert_same_figures(a, b):
    for key in FIGURES:
        assert a[key] == pytest.approx(b[key], abs=1e-6), key


def _assert_same_history(rows, reference):
    assert [int(r["epoch"]) for r in rows] == list(range(len(reference))), "epochs missing or duplicated"
    for row, ref in zip(rows, reference):
        for key, value in ref.items():
            if key.endswith("_seconds"):  # wall time: the one thing a resumed run may change
                continue
            np.testing.assert_allclose(float(row[key]), float(value), rtol=1e-4, atol=1e-6, err_msg=key)


class _Interrupted(Exception):
    pass


@pytest.mark.heavy
def test_resumed_classification_keeps_restored_weights(tmp_path, monkeypatch):
    """An interrupted classify phase resumes from its checkpoint: the warm start must not overwrite it."""
    monkeypatch.setenv("KERAS_CWSN_CACHE", str(tmp_path / "cache"))
    import train
    from keras_cwsn.training import protocol as training  # the module whose names the run looks up

    args = ["--seed", "5", "--cluster-epochs", "1", "--classify-epochs", "3", "--variant", "A", *TINY]
    assert train.main(args + ["--output-dir", str(tmp_path / "reference")]) == 0

    class InterruptingStop(training.StopOnNonFinite):
        def on_epoch_begin(self, epoch, logs=None):
            if self.phase == "classify" and epoch == 2:
                raise _Interrupted()

    out = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(training, "StopOnNonFinite", InterruptingStop)
        with pytest.raises(_Interrupted):
            train.main(args + ["--output-dir", str(out)])
    assert json.loads((out / "backup" / "classify" / "training_metadata.json").read_text())["epoch"] == 2
    assert (out / "cluster_result.json").exists() and not (out / "backup" / "cluster").exists()
    _assert_the_clusterer_evaluates_while_the_classifier_trains(out, tmp_path, _metrics(tmp_path / "reference"))

    copies = []
    original = training.ResumableWarmStart.on_train_begin

    def spy(self, logs=None):
        copies.append(self.done)
        return original(self, logs)

    monkeypatch.setattr(training.ResumableWarmStart, "on_train_begin", spy)
    assert train.main(args + ["--output-dir", str(out)]) == 0
    assert copies == [True], "the warm start stood aside on the resumed fit"
    resumed, reference = _metrics(out), _metrics(tmp_path / "reference")
    _assert_same_figures(resumed, reference)
    assert resumed["warm_start"] == reference["warm_start"]
    _assert_same_history(_history(out / "classify_history.csv"),
                         _history(tmp_path / "reference" / "classify_history.csv"))


def _assert_the_clusterer_evaluates_while_the_classifier_trains(run_dir, tmp_path, reference):
    """evaluate gives a run in its classification phase the clusterer's finished figures, with the statistics the
    cluster phase saved, or, for a run from before it saved them, recomputed from the training split."""
    import shutil

    from keras_cwsn import evaluate

    assert not (run_dir / "classifier").exists() and (run_dir / "preprocessing.json").exists()
    older = tmp_path / "older-run"
    shutil.copytree(run_dir, older, ignore=shutil.ignore_patterns("preprocessing.json", "backup", "logs"))
    for folder in (run_dir, older):
        figures = evaluate.evaluate_run(str(folder), None, reference["eval_split"], confusion=True)
        assert "classification_accuracy" not in figures
        for key in ("cluster_accuracy", "nmi", "purity"):
            assert figures[key] == pytest.approx(reference[key], abs=1e-6), (folder.name, key)
        assert np.trace(figures["confusion"]["counts"]) == round(reference["cluster_accuracy"] * reference["num_eval"])
    (older / "cluster_result.json").unlink()  # a clusterer whose phase did not finish is no result
    with pytest.raises(FileNotFoundError, match="classifier/ is missing, and so is a finished clusterer"):
        evaluate.evaluate_run(str(older), None, reference["eval_split"])


def test_output_dir_rules(tmp_path):
    from keras_cwsn.training import RunError, check_output_dir, check_resume_config

    out = tmp_path / "run"
    assert check_output_dir(str(out)) is False  # new
    (out / "config.json").write_text(json.dumps({"variant": "D", "seed": 0, "cluster": {"learning_rate": 0.01}}))
    assert check_output_dir(str(out)) is True  # unfinished: resumed
    assert check_resume_config(str(out), {"variant": "A"}) == {}  # nothing trained yet: any change goes
    (out / "backup" / "cluster").mkdir(parents=True)
    (out / "backup" / "cluster" / "training_metadata.json").write_text('{"epoch": 1}')
    with pytest.raises(RunError, match="unfinished run"):
        check_output_dir(str(out), resume=False)
    # a lower learning rate may change on resume; the variant may not
    assert "cluster.learning_rate" in check_resume_config(str(out), {"variant": "D", "seed": 0,
                                                                     "cluster": {"learning_rate": 0.001}})
    with pytest.raises(RunError, match=r"variant: 'D' -> 'A'.*\(--set variant=D\)"):
        check_resume_config(str(out), {"variant": "A", "seed": 0, "cluster": {"learning_rate": 0.01}})
    # keys added later: a saved config without one ran the way the code did before it existed
    same = {"variant": "D", "seed": 0, "cluster": {"learning_rate": 0.01}}
    assert check_resume_config(str(out), {**same, "init": "keras", "criterion": "kcl"}) == {}
    with pytest.raises(RunError, match=r"init: 'keras' -> 'torch'.*\(--set init=keras\)"):
        check_resume_config(str(out), {**same, "init": "torch"})  # a run from before init: torch was the default
    assert check_resume_config(str(out), {**same, "batchnorm": "keras"}) == {}
    with pytest.raises(RunError, match="batchnorm: 'keras' -> 'torch'"):
        check_resume_config(str(out), {**same, "batchnorm": "torch"})
    with pytest.raises(RunError, match="weight_decay_mode: 'decoupled' -> 'coupled'"):
        check_resume_config(str(out), {**same, "weight_decay_mode": "coupled"})
    (out / "metrics.json").write_text("{}")
    with pytest.raises(RunError, match="finished run"):
        check_output_dir(str(out))
    assert check_output_dir(str(out), overwrite=True) is False
    assert os.listdir(out) == []


def test_checkpoint_keeps_optimizer_state_and_survives_a_torn_write(tmp_path):
    """save_weights holds the optimizer's momentum; a half-written checkpoint never replaces the last good one,
    and the next save deletes it."""
    import keras

    from keras_cwsn.training import Checkpoint

    def model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        m = keras.Model(inputs, keras.layers.Dropout(0.5)(keras.layers.Dense(3)(inputs)))
        m.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
        return m

    x, y = np.random.default_rng(0).standard_normal((8, 4)), np.ones((8, 3))
    trained = model()
    trained.fit(x, y, epochs=2, verbose=0)
    checkpoint = Checkpoint(str(tmp_path / "backup"), "test")
    checkpoint.save(trained, 2)
    (tmp_path / "backup" / ".tmp-epoch-0003.weights.h5").write_bytes(b"torn")  # a kill mid-write
    restored = model()
    Checkpoint(str(tmp_path / "backup"), "test", initial_epoch=2).restore(restored, 2)
    for a, b in zip(trained.optimizer.variables + trained.variables, restored.optimizer.variables + restored.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    assert int(restored.optimizer.iterations.numpy()) == 2

    torn, live = tmp_path / "backup" / ".tmp-epoch-0003.weights.h5", tmp_path / "backup" / ".tmp-live.weights.h5"
    live.write_bytes(b"another writer, still writing")
    os.utime(torn, (time.time() - 3600,) * 2)  # left by a process killed an hour ago
    checkpoint.save(trained, 3)  # the next save sweeps the torn file, not a live one
    assert not torn.exists() and live.exists()
    assert sorted(p.name for p in (tmp_path / "backup").glob("epoch-*")) == ["epoch-0002.weights.h5",
                                                                          "epoch-0003.weights.h5"]


def test_multi_seed_command_keeps_finished_seeds(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_CWSN_CACHE", str(tmp_path / "cache"))
    import train
    from keras_cwsn.training import protocol as training  # the module whose names the run looks up

    args = ["--seeds", "0,1", "--epochs", "1", "--variant", "ce", *TINY, "--output-dir", str(tmp_path / "seeds")]
    original, calls = training.run, []

    def crash_on_seed_1(config, output_dir, *a, **k):
        calls.append(config["seed"])
        if config["seed"] == 1:
            raise _Interrupted()
        return original(config, output_dir, *a, **k)

    monkeypatch.setattr(training, "run", crash_on_seed_1)
    with pytest.raises(_Interrupted):
        train.main(args)
    monkeypatch.setattr(training, "run",
                        lambda config, *a, **k: calls.append(config["seed"]) or original(config, *a, **k))
    assert train.main(args) == 0
    assert calls == [0, 1, 1], "seed 0 finished before: kept, not rerun"
    summary = json.loads((tmp_path / "seeds" / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert train.main(args) == 2  # the whole multi-seed run is finished now


def test_unreadable_checkpoint_format_is_named(tmp_path):
    """A backup folder in another format (plain BackupAndRestore metadata) is refused with a message saying so."""
    import tensorflow as tf

    from keras_cwsn.training import RunError, read_resume_epoch

    backup = tmp_path / "backup" / "classify"
    backup.mkdir(parents=True)
    (backup / "latest.weights.h5").write_bytes(b"old")
    (backup / "training_metadata.json").write_text(json.dumps({"epoch": 4, "batch": 0}))
    with pytest.raises(RunError, match=r"Cannot resume from epoch 4: .*training_metadata.json is in a format"):
        read_resume_epoch(str(backup), tf.distribute.get_strategy())
    (backup / "training_metadata.json").write_text(json.dumps({"epoch": 4, "checkpoints": {"4": "gone.weights.h5"}}))
    with pytest.raises(RunError, match="its checkpoint is missing"):
        read_resume_epoch(str(backup), tf.distribute.get_strategy())
    assert read_resume_epoch(str(tmp_path / "nothing"), tf.distribute.get_strategy()) == 0


@pytest.mark.parametrize("key, value", [("init", "keras"), ("margin", 2.0), ("cluster.weight_decay", 1e-05),
                                        ("double", True), ("seed", 3), ("cluster.lr_milestones", [25, 50, 75]),
                                        ("synthetic", {"noise": 0.5, "train_size": 60})])
def test_the_refusal_names_a_set_flag_that_gives_the_saved_value_back(key, value):
    """What the refusal tells a user to pass is read by train.py's --set (YAML) as the saved value."""
    import shlex

    import yaml

    from keras_cwsn.training.resume import _set_flag

    flag, item = shlex.split(_set_flag(key, value))  # two words, as a shell passes them to train.py
    assert flag == "--set" and item.partition("=")[0] == key
    assert yaml.safe_load(item.partition("=")[2]) == value


def test_a_run_resumes_only_with_the_hierarchy_table_it_started_with(tmp_path):
    from keras_cwsn.training import RunError, check_resume_config

    out, table, moved = tmp_path / "run", tmp_path / "birds.tsv", tmp_path / "elsewhere.tsv"
    table.write_text("species\tfamily\nMallard\tAnatidae\nWood_Duck\tAnatidae\n")
    started = {"variant": "C", "seed": 0, "hierarchy": str(table)}
    (out / "backup" / "cluster").mkdir(parents=True)
    (out / "backup" / "cluster" / "training_metadata.json").write_text('{"epoch": 1}')
    (out / "config.json").write_text(json.dumps(started))
    (out / "hierarchy_table.tsv").write_text(table.read_text())
    assert check_resume_config(str(out), started) == {}
    moved.write_text(table.read_text())  # the same table at another path (another machine) resumes
    assert "hierarchy" in check_resume_config(str(out), dict(started, hierarchy=str(moved)))
    table.write_text("species\tfamily\nWood_Duck\tAnatidae\nMallard\tAnatidae\n")  # rows reordered: ids change
    with pytest.raises(RunError, match=r"birds.tsv has changed since .*resume with --hierarchy .*hierarchy_table.tsv"):
        check_resume_config(str(out), started)
    kept = str(out / "hierarchy_table.tsv")
    assert "hierarchy" in check_resume_config(str(out), dict(started, hierarchy=kept))
