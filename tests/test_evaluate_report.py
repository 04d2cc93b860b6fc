"""The evaluate command on a folder never seen in training, and the results table."""

import json
import os

import pytest

import train
from conftest import make_cifar_tree
from keras_cwsn import evaluate, report


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_cifar_tree(str(root / "train_data"), per_class=8, seed=1)
    out = str(root / "run")
    argv = ["--dataset", "cifar10", "--data-dir", str(root / "train_data"), "--variant", "A", "--epochs", "1",
            "--batch-size", "16", "--set", "val_per_class=2", "--set", "embedding_sample=0", "--output-dir", out,
            "--quiet"]
    assert train.main(argv) == 0
    return root, out


def test_evaluate_on_an_unseen_folder(cifar_run, capsys):
    root, run_dir = cifar_run
    make_cifar_tree(str(root / "unseen"), per_class=3, seed=9, splits=("test",))
    figures = evaluate.evaluate_run(run_dir, str(root / "unseen"), "test")
    assert figures["num_examples"] == 30
    for key in ("classification_accuracy", "cluster_accuracy", "nmi", "purity"):
        assert 0.0 <= figures[key] <= 1.0
    assert evaluate.main([run_dir, "--data-dir", str(root / "unseen"), "--split", "test", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["classification_accuracy"] == pytest.approx(figures["classification_accuracy"])


def test_evaluate_reproduces_the_runs_own_figures(cifar_run):
    root, run_dir = cifar_run
    figures = evaluate.evaluate_run(run_dir, None, "val")  # the run's own held-out split
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    assert figures["classification_accuracy"] == pytest.approx(metrics["classification_accuracy"], abs=1e-6)
    assert figures["cluster_accuracy"] == pytest.approx(metrics["cluster_accuracy"], abs=1e-6)


def test_evaluate_errors(tmp_path, capsys):
    assert evaluate.main([str(tmp_path)]) == 2
    assert "not a finished run" in capsys.readouterr().err


def _metrics(path, variant, seed, acc, cluster=None):
    config = {"dataset": "cifar10", "arch": "lenet", "double": False, "schedule_scale": 0.5, "variant": variant}
    payload = {"config": config, "seed": seed, "classification_accuracy": acc}
    if cluster is not None:
        payload.update(cluster_accuracy=cluster, nmi=0.5, purity=0.6)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.json"), "w") as f:
        json.dump(payload, f)


def test_report_table(tmp_path, capsys):
    _metrics(tmp_path / "ce" / "seed_0", "ce", 0, 0.70)
    _metrics(tmp_path / "ce" / "seed_1", "ce", 1, 0.72)
    _metrics(tmp_path / "a" / "seed_0", "A", 0, 0.75, cluster=0.6)
    assert report.main([str(tmp_path / "ce"), str(tmp_path / "a")]) == 0
    table = capsys.readouterr().out
    assert "### cifar10 / lenet, schedule_scale 0.5" in table
    ce_row = next(line for line in table.splitlines() if line.startswith("| ce "))
    assert "71.00 ± 1.41 (best 72.00)" in ce_row and "75.48" in ce_row and "-4.48" in ce_row
    a_row = next(line for line in table.splitlines() if line.startswith("| A "))
    assert "| 60.00 (best 60.00) |" in a_row and "±" not in a_row.split("|")[3] and "74.21 / 0.55 / 0.74 / 75.75" in a_row
    assert a_row.rstrip().endswith("| — |")  # one run: no test against the baseline
    _metrics(tmp_path / "a" / "seed_1", "A", 1, 0.77, cluster=0.6)
    assert report.main([str(tmp_path / "ce"), str(tmp_path / "a")]) == 0
    a_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| A "))
    assert a_row.rstrip().endswith("| +5.00 (p = 0.07) |")  # Welch: t = 5 / sqrt(2/2 + 2/2) = 3.54, 2 degrees of freedom
    assert report.main([str(tmp_path / "none")]) == 2
