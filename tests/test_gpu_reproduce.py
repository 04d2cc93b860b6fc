"""scripts/gpu_reproduce.py on the CPU, on whichever backend runs the tests: probe, plan, parallel runs, collect, resume;
CIFAR-10 and the birds (cub42 on AlexNet, whose two phases differ in epoch time and whose paper's epochs are 195)."""

import json
import os
import sys
import tarfile

import pytest

from conftest import ROOT, make_cifar_archive, only_on_backend, write_image
from keras_cwsn.data import dataset_info

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_reproduce  # noqa: E402

TINY = ["--", "--batch-size", "8", "--set", "embedding_sample=0", "--set", "metrics_sample=40", "--quiet"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_cifar_archive(str(tmp_path_factory.mktemp("cifar")))


@pytest.mark.heavy
@only_on_backend("jax", "the script drives train.py on the GPU machines, which have JAX only")
def test_two_runs_at_once_are_planned_run_collected_and_resumed(archive, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KERAS_CWSN_CACHE", str(tmp_path / "cache"))
    out, collected = tmp_path / "runs", tmp_path / "results.tar.gz"
    argv = ["--archive", archive, "--out", str(out), "--runs", "A:0,ce:1", "--budget-seconds", "500",
            "--max-epochs", "2", "--collect", str(collected), *TINY]
    assert gpu_reproduce.main(argv) == 0
    printed = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    assert plan["parallel"] == 2 and plan["epochs"] == 2 and plan["schedule_scale"] == pytest.approx(2 / 95)
    assert plan["epoch_seconds"] > 0 and plan["classify_epoch_seconds"] > 0 and plan["runs"] == ["A:0", "ce:1"]
    assert plan["dataset"] == "cifar10"
    for variant, seed in (("A", 0), ("ce", 1)):
        run = out / f"cifar10-lenet-gpu-{variant}" / f"seed_{seed}"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["config"]["schedule_scale"] == pytest.approx(2 / 95) and metrics["seed"] == seed
        assert f"{variant}:{seed}" in printed
    assert printed.count("finished") == 2
    with tarfile.open(collected) as tar:
        names = set(tar.getnames())
    assert {"plan.json", "cifar10-lenet-gpu-A/seed_0/metrics.json", "cifar10-lenet-gpu-A/seed_0/cluster_history.csv",
            "cifar10-lenet-gpu-ce/seed_1/metrics.json"} <= names
    assert not any("probe" in n for n in names)

    assert gpu_reproduce.main(argv) == 0  # the same command again: same plan, nothing to run
    again = capsys.readouterr().out
    assert "[plan] resuming" in again and again.count("finished") == 2


def test_prepare_only_unpacks_and_decodes_and_runs_nothing(archive, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KERAS_CWSN_CACHE", str(cache))
    out, data = tmp_path / "runs", tmp_path / "data"
    assert gpu_reproduce.main(["--archive", archive, "--out", str(out), "--data-dir", str(data), "--prepare-only"]) == 0
    assert "[data]" in capsys.readouterr().out
    assert len(os.listdir(data / "train")) == 10
    assert any(files for _, _, files in os.walk(cache))  # the decoded arrays, for the runs to read
    assert not (out / "plan.json").exists() and not any(out.glob("cifar10-*"))


@pytest.mark.parametrize("runs, message", [("A:0,A:0", "each (variant, seed) once"), ("E:0", "not VARIANT:SEED"),
                                           ("A", "not VARIANT:SEED")])
def test_bad_runs_exit_2_with_one_line(runs, message, tmp_path, capsys):
    assert gpu_reproduce.main(["--out", str(tmp_path), "--runs", runs]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_missing_archive_says_what_to_carry(tmp_path, capsys):
    assert gpu_reproduce.main(["--out", str(tmp_path), "--archive", str(tmp_path / "none.tar.gz")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_epochs_fit_the_time_left():
    fit = gpu_reproduce.choose_epochs
    assert fit(2.0, 2.0, startup_seconds=40, seconds_left=500, most=95) == 95  # capped at the paper's
    assert fit(10.0, 10.0, startup_seconds=40, seconds_left=500, most=95) == 21  # (500-40-30)//20
    assert fit(1.0, 4.0, startup_seconds=40, seconds_left=500, most=195) == 86  # the phases' own epoch times: 430//5
    assert fit(0.0, 2.0, startup_seconds=40, seconds_left=500, most=195) == 195  # `ce` alone: no clustering epochs
    with pytest.raises(gpu_reproduce.PlanError, match="no epoch fits"):
        fit(100.0, 100.0, startup_seconds=40, seconds_left=200, most=95)


def test_each_dataset_plans_with_its_network_and_paper_epochs():
    assert gpu_reproduce.dataset_recipe("cifar10") == ("lenet", 95)
    assert gpu_reproduce.dataset_recipe("cub42") == ("alexnet", 195)
    with pytest.raises(gpu_reproduce.PlanError, match="--dataset nope"):
        gpu_reproduce.dataset_recipe("nope")


def test_max_epochs_beyond_the_papers_is_refused(tmp_path, capsys):
    assert gpu_reproduce.main(["--out", str(tmp_path), "--max-epochs", "96"]) == 2
    assert "1..95 for cifar10" in capsys.readouterr().err


def test_a_dataset_without_a_known_archive_asks_for_one(tmp_path, capsys):
    assert gpu_reproduce.main(["--out", str(tmp_path), "--dataset", "cifar100"]) == 2
    assert "name the archive(s)" in capsys.readouterr().err


def test_a_plan_for_another_dataset_is_not_resumed(archive, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KERAS_CWSN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "plan.json").write_text(json.dumps({"dataset": "cub42", "epochs": 3}))
    assert gpu_reproduce.main(["--out", str(tmp_path), "--archive", archive, "--runs", "ce:0"]) == 2
    assert "plans cub42 runs, not cifar10" in capsys.readouterr().err


def test_several_archives_unpack_into_one_tree_once(tmp_path):
    trees = {}
    for split in ("train", "test"):
        write_image(str(tmp_path / split / split / "cat" / "0.jpg"), __import__("numpy").zeros((8, 8, 3), "uint8"))
        trees[split] = str(tmp_path / f"{split}.tar.gz")
        with tarfile.open(trees[split], "w:gz") as tar:
            tar.add(str(tmp_path / split / split), arcname=split)
    data = tmp_path / "data"
    gpu_reproduce.unpack([trees["train"], trees["test"]], str(data))
    assert (data / "train" / "cat" / "0.jpg").exists() and (data / "test" / "cat" / "0.jpg").exists()
    (data / "test" / "cat" / "0.jpg").unlink()
    gpu_reproduce.unpack([trees["train"], trees["test"]], str(data))  # remembered: not unpacked again
    assert not (data / "test" / "cat" / "0.jpg").exists()
    with pytest.raises(gpu_reproduce.PlanError, match="no train/ folder"):
        gpu_reproduce.unpack([trees["test"]], str(tmp_path / "only-test"))


def test_each_variant_is_one_process_whose_seeds_land_in_their_run_folders(tmp_path, monkeypatch):
    assert gpu_reproduce.process_groups([("A", 0), ("ce", 1), ("A", 2)]) == [("A", [0, 2]), ("ce", [1])]
    assert gpu_reproduce.process_groups([("A", 0), ("A", 2)], together=False) == [("A", [0]), ("A", [2])]
    started = []
    monkeypatch.setattr(gpu_reproduce.subprocess, "Popen", lambda command, **kwargs: started.append(command))
    prefix = "cifar10-lenet-gpu"
    args = gpu_reproduce.argparse.Namespace(dataset="cifar10", prefix=prefix, data_dir="data", train_args=[])
    gpu_reproduce.launch("A", [0, 2], str(tmp_path), args, {}, [])
    gpu_reproduce.launch("ce", [1], str(tmp_path), args, {}, [])
    together, alone = started
    folder = together[together.index("--output-dir") + 1]
    assert together[together.index("--seeds") + 1] == "0,2" and "--seed" not in together
    assert os.path.join(folder, "seed_2") == gpu_reproduce.run_dir(str(tmp_path), "A", 2, prefix)  # train.py's seeds
    assert alone[alone.index("--output-dir") + 1] == gpu_reproduce.run_dir(str(tmp_path), "ce", 1, prefix)


@pytest.fixture(scope="module")
def bird_archive(tmp_path_factory):
    """A cub42-style archive: every species folder of the package's table, 2 training and 1 test image each."""
    import numpy as np

    root, rng = tmp_path_factory.mktemp("cub42"), np.random.default_rng(0)
    for split, count in (("train", 2), ("test", 1)):
        for name in dataset_info("cub42").fine_names:
            for i in range(count):
                write_image(str(root / "tree" / split / name / f"{i}.jpg"), rng.integers(0, 256, (40, 40, 3), np.uint8))
    path = str(root / "cub42-jpg.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(str(root / "tree" / split), arcname=split)
    return path


@pytest.mark.heavy
@only_on_backend("jax", "the script drives train.py on the GPU machines, which have JAX only")
def test_the_bird_protocol_runs_on_alexnet_with_the_papers_195_epochs(bird_archive, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KERAS_CWSN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    argv = ["--dataset", "cub42", "--archive", bird_archive, "--out", str(out), "--runs", "C:0,C:1",
            "--budget-seconds", "500", "--max-epochs", "1", "--", "--set", "image_size=64", "--set",
            "alexnet_bn=true", "--set", "embedding_sample=0", "--quiet"]
    assert gpu_reproduce.main(argv) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["dataset"] == "cub42" and plan["schedule_scale"] == pytest.approx(1 / 195)
    for seed in (0, 1):
        metrics = json.loads((out / "cub42-alexnet-gpu-C" / f"seed_{seed}" / "metrics.json").read_text())
        assert metrics["config"]["alexnet_bn"] is True and metrics["eval_split"] == "test"
        assert metrics["num_eval"] == 42
    assert capsys.readouterr().out.count("finished") == 2


def write_history(path, seconds):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("epoch,epoch_seconds\n" + "".join(f"{i},{s}\n" for i, s in enumerate(seconds)))


def test_a_failed_probe_run_leaves_out_its_variant_and_times_the_others(tmp_path):
    out = str(tmp_path)
    prefix = "cub42-alexnet-gpu"
    for seed in (0, 1):  # C trained both phases, two epochs each
        directory = gpu_reproduce.run_dir(out, "C", seed, prefix)
        write_history(os.path.join(directory, "cluster_history.csv"), [9.0, 3.0 + seed])
        write_history(os.path.join(directory, "classify_history.csv"), [8.0, 2.0])
    write_history(os.path.join(gpu_reproduce.run_dir(out, "ce", 0, prefix), "classify_history.csv"), [5.0, 1.5])
    log = os.path.join(out, f"{prefix}-A", "train.log")  # A's seeds trained together: their log is the parent's
    os.makedirs(os.path.dirname(log))
    with open(log, "w") as f:
        f.write("[cluster] phase 1 of 2\nerror: Training diverged in the cluster phase at epoch 1\n[summary] x\n")
    slowest, spent, failed = gpu_reproduce.probe_figures([("A", 0), ("A", 1), ("C", 0), ("C", 1), ("ce", 0)], out,
                                                         prefix)
    assert slowest == {"cluster": 4.0, "classify": 2.0}
    assert sorted(spent) == [6.5, 22.0, 23.0]
    assert failed == {"A": log}
    assert gpu_reproduce.last_error(log) == "error: Training diverged in the cluster phase at epoch 1"
    assert gpu_reproduce.last_error(os.path.join(out, "missing.log")) == "no log"
    rows = gpu_reproduce.summary_rows(out, [("A", 0), ("C", 0)], prefix, {"A": "error: ..."})
    assert rows[0][2] == "left out: its probe failed" and rows[1][2].startswith("stopped")


@pytest.mark.heavy
@only_on_backend("jax", "the script drives train.py on the GPU machines, which have JAX only")
def test_a_variant_that_diverges_in_the_probe_does_not_stop_the_others(archive, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KERAS_CWSN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    argv = ["--archive", archive, "--out", str(out), "--runs", "A:0,ce:0", "--budget-seconds", "500",
            "--max-epochs", "1", *TINY, "--set", "cluster.learning_rate=1.0e+30"]  # only A has a clustering phase
    assert gpu_reproduce.main(argv) == 0
    printed = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    assert [v for v, _ in plan["processes"]] == ["ce"] and list(plan["left_out"]) == ["A"]
    assert "diverged" in plan["left_out"]["A"]
    assert (out / "cifar10-lenet-gpu-ce" / "seed_0" / "metrics.json").exists()
    assert "left out: its probe failed" in printed and "A left out, its probe: error:" in printed
