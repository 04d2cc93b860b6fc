"""scripts/gpu_reproduce.py on the CPU, on whichever backend runs the tests: probe, plan, parallel runs, collect, resume."""

import json
import os
import sys
import tarfile

import pytest

from conftest import ROOT, make_cifar_archive, only_on_backend

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
    assert plan["epoch_seconds"] > 0 and plan["runs"] == ["A:0", "ce:1"]
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
    assert gpu_reproduce.choose_epochs(epoch_seconds=2.0, startup_seconds=40, seconds_left=500) == 95  # capped
    assert gpu_reproduce.choose_epochs(epoch_seconds=10.0, startup_seconds=40, seconds_left=500) == 21  # (500-40-30)//20
    with pytest.raises(gpu_reproduce.PlanError, match="no epoch fits"):
        gpu_reproduce.choose_epochs(epoch_seconds=100.0, startup_seconds=40, seconds_left=200)


def test_each_variant_is_one_process_whose_seeds_land_in_their_run_folders(tmp_path, monkeypatch):
    assert gpu_reproduce.process_groups([("A", 0), ("ce", 1), ("A", 2)]) == [("A", [0, 2]), ("ce", [1])]
    assert gpu_reproduce.process_groups([("A", 0), ("A", 2)], together=False) == [("A", [0]), ("A", [2])]
    started = []
    monkeypatch.setattr(gpu_reproduce.subprocess, "Popen", lambda command, **kwargs: started.append(command))
    args = gpu_reproduce.argparse.Namespace(data_dir="data", train_args=[])
    gpu_reproduce.launch("A", [0, 2], str(tmp_path), args, {}, [])
    gpu_reproduce.launch("ce", [1], str(tmp_path), args, {}, [])
    together, alone = started
    folder = together[together.index("--output-dir") + 1]
    assert together[together.index("--seeds") + 1] == "0,2" and "--seed" not in together
    assert os.path.join(folder, "seed_2") == gpu_reproduce.run_dir(str(tmp_path), "A", 2)  # train.py's seed folders
    assert alone[alone.index("--output-dir") + 1] == gpu_reproduce.run_dir(str(tmp_path), "ce", 1)
