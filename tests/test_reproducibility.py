"""Reproducibility: the same --seed repeats a CPU run exactly, and metrics.json says what produced it."""

import csv
import json
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("tensorflow", reason="TensorFlow only: exact repeats through TensorFlow's op determinism")

from conftest import ROOT, subprocess_env  # noqa: E402

FIGURES = ("cluster_accuracy", "nmi", "purity", "classification_accuracy", "train_cluster_accuracy")


def _command(output_dir, seed):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--output-dir", str(output_dir), "--seed", str(seed),
            "--epochs", "2", "--batch-size", "32", "--set", "synthetic.train_size=256",
            "--set", "synthetic.eval_size=64", "--set", "embedding_sample=0", "--quiet"]


def _without_timing(path):
    """The history's rows without the wall-time columns (the one thing a repeat may change)."""
    rows = list(csv.reader(open(path)))
    keep = [i for i, name in enumerate(rows[0]) if not name.endswith("_seconds")]
    assert "epoch_seconds" in rows[0], "every history records its epochs' wall time"
    return [[row[i] for i in keep] for row in rows]


@pytest.mark.heavy
def test_same_seed_repeats_a_run_exactly(tmp_path):
    env = subprocess_env(tmp_path / "cache")
    runs = [subprocess.Popen(_command(tmp_path / name, 7), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for p in runs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    a, b = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("a", "b"))
    for key in FIGURES:
        assert a[key] == b[key], key  # exactly, not approximately
    assert a["warm_start"] == b["warm_start"]
    for phase in ("cluster", "classify"):
        rows_a, rows_b = (_without_timing(tmp_path / name / f"{phase}_history.csv") for name in ("a", "b"))
        assert rows_a == rows_b and len(rows_a) == 3

    # what produced the figures
    assert a["seed"] == 7 and a["determinism"] == {"seed": 7, "op_determinism": True}
    for package in ("python", "tensorflow", "keras", "numpy", "scipy", "scikit-learn"):
        assert a["versions"][package]
    assert a["git_commit"] is None or len(a["git_commit"]) == 40
    assert a["config"]["seed"] == 7 and a["distribute"]["num_replicas"] == 1


def test_epoch_batches_do_not_depend_on_where_the_run_started(tmp_path, monkeypatch):
    """Epoch k's shuffle is seeded by (seed, phase, k): a run resumed at k reads the batches it would have read."""
    monkeypatch.setenv("KERAS_CWSN_CACHE", str(tmp_path / "cache"))
    from keras_cwsn import data as data_lib
    from keras_cwsn.training import derived_seed, seed_everything, training_data

    train = data_lib.load_split("synthetic", "train", synthetic={"train_size": 40, "eval_size": 8})
    stats = data_lib.preprocessing_stats(train, verbose=False)
    config = {"seed": 1, "augment": False}

    def labels(first_epoch):
        seed_everything(123)
        data, steps = training_data(train, stats, 8, {"fine_fc3": "fine"}, config, "cluster", first_epoch, 3)
        batches = [y["fine_fc3"] for _, y in data.as_numpy_iterator()]
        again = [y["fine_fc3"] for _, y in data.as_numpy_iterator()]  # Keras peeks at a batch under a strategy
        np.testing.assert_array_equal(batches, again)
        return np.stack(batches).reshape(3 - first_epoch, steps, 8), steps

    full, steps = labels(0)
    resumed, _ = labels(1)
    assert steps == 5
    np.testing.assert_array_equal(full[1:], resumed)
    assert not np.array_equal(full[0], full[1]), "each epoch is shuffled differently"
    assert len({derived_seed(0, "cluster", "epoch", e) for e in range(100)}) == 100
    assert derived_seed(0, "cluster") != derived_seed(1, "cluster") != derived_seed(0, "classify")


def test_cpu_description_names_the_model_and_cores(tmp_path):
    """metrics.json's versions.cpu: the same seed gives another clusterer on another CPU, so it is recorded."""
    from keras_cwsn.training.records import cpu_description

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 167\n"
                       "model name\t: Intel(R) Xeon(R) Processor\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert cpu_description(str(cpuinfo)) == f"Intel(R) Xeon(R) Processor (family 6, model 167), {os.cpu_count()} cores"
    assert cpu_description(str(tmp_path / "missing")).endswith(f", {os.cpu_count()} cores")
