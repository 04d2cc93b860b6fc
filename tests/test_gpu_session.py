"""scripts/gpu_session.sh on the CPU, on whichever backend runs the tests: the one device call, end to end."""

import os
import subprocess
import sys
import tarfile

import keras
import pytest

from conftest import ROOT, make_cifar_archive, only_on_backend

SCRIPT = os.path.join(ROOT, "scripts", "gpu_session.sh")
TINY_CHECK = ("--archs lenet --variants ce --steps 1 --warmup 1 --lenet-batch 4 --loss-sizes 16x4 --repeats 1")
TINY_TRAIN = "--batch-size 8 --set embedding_sample=0 --set metrics_sample=40 --quiet"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_cifar_archive(str(tmp_path_factory.mktemp("cifar")))


def session(out, tmp_path, **settings):
    env = dict(os.environ, PYTHON=sys.executable, KERAS_BACKEND=keras.backend.backend(), WORK=str(tmp_path / "work"),
               WHEELS=str(tmp_path / "no-wheels"), **settings)
    return subprocess.run(["bash", SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.heavy
@only_on_backend("jax", "the lent GPU machines have JAX and no TensorFlow: the one device call is checked as it runs there")
def test_one_call_checks_the_device_runs_and_returns_every_file(archive, tmp_path):
    out = tmp_path / "out"
    done = session(out, tmp_path, ARCHIVE=archive, RUNS="ce:0", BUDGET="400", MAX_EPOCHS="1", CHECK_SECONDS="300",
                   CHECK_ARGS=TINY_CHECK, TRAIN_ARGS=TINY_TRAIN)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["data.txt", "gpu_check.txt", "logs.tar.gz", "machine.txt", "reproduce.txt",
                                       "results.tar.gz"]
    check = (out / "gpu_check.txt").read_text()
    assert "PairwiseKLLoss forward+backward" in check and "gpu_check exit 0" in check
    assert "1 epochs per phase" in (out / "reproduce.txt").read_text()
    assert f"keras {keras.__version__} backend {keras.backend.backend()}" in (out / "machine.txt").read_text()
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "plan.json" in names and "cifar10-lenet-gpu-ce/seed_0/metrics.json" in names
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "./cifar10-lenet-gpu-ce/seed_0/train.log" in tar.getnames()


def test_a_missing_archive_stops_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    done = session(out, tmp_path, ARCHIVE=str(tmp_path / "nowhere.tar.gz"))
    assert done.returncode == 2
    assert "nowhere.tar.gz: no such file" in done.stderr
    assert not (out / "gpu_check.txt").exists()
