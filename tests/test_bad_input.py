"""Bad input across the board: broken data folders, diverging training, unwritable outputs, wrong settings.

Every error a user can cause exits with status 2 and exactly one line on stderr (no traceback).
The checks call `train.main([...])` in this process and read stderr there; one goes through a real
subprocess, for the exit status and the stderr of the command itself (TensorFlow's start-up notices
must not bury the error line).
"""

import contextlib
import errno
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="TensorFlow only: train.py's handling of bad input (TensorFlow data "
                    "pipeline, checkpoints, command line); test_protocol_any_backend.py runs on any backend")

import train  # noqa: E402
from conftest import CIFAR10_CLASSES, ROOT, error_line, subprocess_env  # noqa: E402
from keras_cwsn.training import callbacks as training_callbacks  # noqa: E402

SYNTHETIC = ["--epochs", "1", "--batch-size", "32", "--set", "synthetic.train_size=96", "--set",
             "synthetic.eval_size=32", "--set", "embedding_sample=0", "--quiet", "--variant", "A"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_CWSN_CACHE", str(tmp_path / "cache"))


_error_line = error_line


def _cifar_folder(root, per_class=4, empty=(), extra_folders=()):
    """`root/train/<class>/*.jpg`: a few 32x32 JPEGs per CIFAR-10 class."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for label, name in enumerate(CIFAR10_CLASSES):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(0 if name in empty else per_class):
            image = np.clip(rng.normal(25 * label, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            (folder / f"{i:03d}.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
    for name in extra_folders:
        (root / "train" / name).mkdir(parents=True)
        (root / "train" / name / "000.jpg").write_bytes((root / "train" / "cat" / "000.jpg").read_bytes())
    return root


def _cifar_args(data_dir, output_dir):
    return ["--dataset", "cifar10", "--data-dir", str(data_dir), "--output-dir", str(output_dir), "--epochs", "1",
            "--batch-size", "8", "--set", "val_per_class=1", "--set", "embedding_sample=0", "--quiet",
            "--variant", "A"]


# Data folders ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broken_folder_run(tmp_path_factory):
    """One tiny CIFAR-10 run over a folder with a corrupt JPEG, a zero-byte JPEG and an empty class folder."""
    tmp = tmp_path_factory.mktemp("broken")
    root = _cifar_folder(tmp / "data", empty=("frog",))
    (root / "train" / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG" * 20)
    (root / "train" / "dog" / "zero.jpg").write_bytes(b"")
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr):
        mp.setenv("KERAS_CWSN_CACHE", str(tmp / "cache"))
        code = train.main(_cifar_args(root, tmp / "out"))
    done = subprocess.CompletedProcess(["train.main"], code, stderr=stderr.getvalue())
    metrics = json.loads((tmp / "out" / "metrics.json").read_text()) if code == 0 else None
    return done, metrics, root


def test_corrupt_and_zero_byte_images_are_skipped_and_reported(broken_folder_run):
    done, metrics, root = broken_folder_run
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings and "skipped 2 undecodable or empty image file(s)" in warnings[0]
    skipped = metrics["data"]["train"]["skipped_undecodable"]
    assert sorted(os.path.basename(p) for p in skipped) == ["corrupt.jpg", "zero.jpg"]
    assert metrics["data"]["train"]["listed"] == 9 * 4 + 2 and metrics["data"]["train"]["decoded"] == 36
    assert metrics["num_train"] + metrics["num_eval"] == 36


def test_empty_class_folder_is_reported_and_training_goes_on(broken_folder_run):
    done, metrics, _ = broken_folder_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics["data"]["train"]["empty_class_folders"] == ["frog"]
    assert "empty class folders: frog" in done.stderr
    assert len(metrics["class_names"]) == 10  # the model still has an output per class of the table


def test_class_folders_outside_the_class_table_are_named(tmp_path, capsys):
    root = _cifar_folder(tmp_path / "data", per_class=2, extra_folders=("spaceship", "Cat"))
    assert train.main(_cifar_args(root, tmp_path / "out")) == 2
    line = _error_line(capsys)
    assert "'spaceship'" in line and "'Cat'" in line and "class table" in line


# Diverging training ------------------------------------------------------------------------------

def test_infinite_learning_rate_stops_with_phase_and_epoch(tmp_path, capsys):
    assert train.main([*SYNTHETIC, "--lr", "1e30", "--output-dir", str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert "diverged in the cluster phase at epoch 1" in line and "non-finite" in line


def test_divergence_keeps_the_last_good_checkpoint_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = [*SYNTHETIC, "--cluster-epochs", "3", "--output-dir", str(out)]
    original = training_callbacks.learning_rate_at
    with monkeypatch.context() as patch:  # the learning rate explodes from the second epoch on
        patch.setattr(training_callbacks, "learning_rate_at", lambda epoch, s: 1e30 if epoch >= 1 else original(epoch, s))
        assert train.main(args) == 2
    line = _error_line(capsys)
    assert "cluster phase at epoch 2" in line and "last good checkpoint (after epoch 1)" in line
    metadata = json.loads((out / "backup" / "cluster" / "training_metadata.json").read_text())
    assert metadata["epoch"] == 1
    history = (out / "cluster_history.csv").read_text().split()
    assert [row.split(",")[0] for row in history[1:]] == ["0"]  # the NaN epoch was never logged

    assert train.main(args) == 0  # rerun: resumes from the good checkpoint
    assert "[resume] cluster phase: resuming after epoch 1 of 3" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["resumed"][0]["from_epoch"] == 1


# Unwritable outputs ------------------------------------------------------------------------------

def test_output_dir_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert train.main([*SYNTHETIC, "--output-dir", str(blocker / "run")]) == 2
    assert "Cannot create --output-dir" in _error_line(capsys)
    assert train.main([*SYNTHETIC, "--output-dir", str(blocker)]) == 2
    assert "exists and is not a folder" in _error_line(capsys)


def test_disk_full_leaves_no_half_written_model_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = [*SYNTHETIC, "--output-dir", str(out)]
    real_replace = os.replace

    def full_disk(src, dst, *a, **k):
        if str(dst).endswith("clusterer.keras"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", full_disk)
        assert train.main(args) == 2
    line = _error_line(capsys)
    assert "Cannot write the clusterer" in line and "No space left on device" in line
    leftovers = sorted(os.listdir(out))
    assert "clusterer.keras" not in leftovers and "cluster_result.json" not in leftovers
    assert not [name for name in leftovers if ".tmp" in name], leftovers
    assert (out / "backup" / "cluster" / "training_metadata.json").exists()  # the trained epochs are kept

    assert train.main(args) == 0  # space freed: the rerun restores the clustering epochs instead of redoing them
    assert "[resume] cluster phase: resuming after epoch 1 of 1" in capsys.readouterr().out
    assert (out / "clusterer.keras").exists() and (out / "metrics.json").exists()


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real_replace = os.replace

    def full_disk(src, dst, *a, **k):
        if str(dst).endswith("epoch-0002.weights.h5"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full_disk)
    assert train.main([*SYNTHETIC, "--cluster-epochs", "2", "--output-dir", str(out)]) == 2
    assert "Cannot write the cluster checkpoint for epoch 2" in _error_line(capsys)
    backup = out / "backup" / "cluster"
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 1
    assert sorted(os.listdir(backup)) == ["epoch-0001.weights.h5", "training_metadata.json"]


# Wrong settings ----------------------------------------------------------------------------------

def test_wrong_type_in_set_exits_2_with_one_line(tmp_path):
    """The one real subprocess: the command's exit status and its whole stderr, TensorFlow's start-up included."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *SYNTHETIC, "--set", "cluster.epochs=abc",
                           "--output-dir", str(tmp_path / "o")], cwd=ROOT, env=subprocess_env(tmp_path / "cache"),
                          capture_output=True, text=True, timeout=600)
    code, err = done.returncode, done.stderr
    assert code == 2
    assert err.strip().splitlines() == ["error: Config key 'cluster.epochs' must be an integer >= 1. Received: 'abc'"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "0"], "'cluster.batch_size' must be an integer >= 1. Received: 0"),
    (["--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
    (["--epochs", "-1"], "'cluster.epochs' must be an integer >= 1"),
    (["--lr", "inf"], "'cluster.learning_rate' must be a number > 0. Received: inf"),
    (["--lr", "nan"], "'cluster.learning_rate' must be a number > 0"),
    (["--seed", "-3"], "'seed' must be an integer >= 0"),
    (["--set", "cluster.epochs=[1"], "is not valid YAML"),
    (["--set", "clustr.epochs=2"], "'clustr' is not a section"),
    (["--set", "margn=2"], "Unknown config key 'margn'. Did you mean 'margin'?"),
    (["--set", "cluster.lr=abc"], "Unknown config key 'cluster.lr'. Did you mean 'learning_rate'?"),
    (["--set", "classify.wd=0"], "Did you mean 'weight_decay'?"),
    (["--set", "cluster.mom=0.5"], "Did you mean 'momentum'?"),
    (["--set", "batch_sise=3"], "Did you mean 'cluster.batch_size' or 'classify.batch_size'"),
    (["--set", "clustr.epochs=2"], "Did you mean 'cluster'?"),
    (["--set", "nothing"], "--set expects KEY=VALUE"),
    (["--strategy", "ring"], "argument --strategy: invalid choice: 'ring'"),
    (["--variant", "E"], "'variant' must be one of"),
    (["--seeds", "1,x"], "--seeds must be comma-separated integers"),
])
def test_wrong_flags_exit_2_with_one_line(flags, expected, tmp_path, capsys):
    assert train.main([*SYNTHETIC, *flags, "--output-dir", str(tmp_path / "o")]) == 2
    assert expected in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_misspelt_key_in_a_yaml_config(tmp_path, capsys):
    text = open(os.path.join(ROOT, "configs", "synthetic_lenet.yaml")).read().replace("  lr_factor: 0.5\n",
                                                                                    "  lr_factr: 0.5\n", 1)
    config = tmp_path / "typo.yaml"
    config.write_text(text)
    assert train.main(["--config", str(config), "--output-dir", str(tmp_path / "o")]) == 2
    line = _error_line(capsys)
    assert "Unknown config key 'cluster.lr_factr'" in line and "Did you mean 'lr_factor'?" in line
    config.write_text("dataset: synthetic\narch: [lenet\n")
    assert train.main(["--config", str(config), "--output-dir", str(tmp_path / "o")]) == 2
    assert "is not valid YAML" in _error_line(capsys)
    assert train.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "Config file not found" in _error_line(capsys)


def test_a_partial_config_file_is_laid_over_the_defaults(tmp_path, capsys):
    """A file may set only what it changes; a typo in it is named as an unknown key, not as a missing 'arch'."""
    config = tmp_path / "mine.yaml"
    config.write_text("variannt: B\n")
    assert train.main(["--config", str(config), "--output-dir", str(tmp_path / "o")]) == 2
    line = _error_line(capsys)
    assert "Unknown config key 'variannt'. Did you mean 'variant'?" in line and "missing" not in line, line
    config.write_text("variant: B\ncluster:\n  epochs: 7\n")
    resolved = train.resolve_config(train.parse_args(["--config", str(config)]))
    assert resolved["variant"] == "B" and resolved["cluster"]["epochs"] == 7 and resolved["arch"] == "lenet"
    from keras_cwsn.config import load_config

    defaults = load_config(dataset="synthetic")
    assert resolved["dataset"] == "synthetic" and resolved["synthetic"] == defaults["synthetic"]  # the rest: defaults
    assert resolved["cluster"]["batch_size"] == defaults["cluster"]["batch_size"]
    assert resolved["classify"] == defaults["classify"]


def test_broken_yaml_names_its_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("variant: B\ncluster:\n  epochs: 7\n  batch_size: [32\n")
    assert train.main(["--config", str(config), "--output-dir", str(tmp_path / "o")]) == 2
    line = _error_line(capsys)
    assert "is not valid YAML/JSON: line 5, column 1:" in line, line


def test_a_class_too_small_to_hold_out_is_named_with_the_flag_that_fixes_it(tmp_path, capsys):
    data = _cifar_folder(tmp_path / "data", per_class=3)
    args = _cifar_args(data, tmp_path / "o")
    args[args.index("val_per_class=1")] = "val_per_class=5"
    assert train.main(args) == 2
    line = _error_line(capsys)
    assert "Cannot hold out 5 images of class 'airplane' for the val split: it has only 3." in line, line
    assert "--set val_per_class=N (N < 3)" in line
    assert not (tmp_path / "o").exists()


def test_skipped_files_are_warned_about_once(tmp_path, capsys):
    data = _cifar_folder(tmp_path / "data", per_class=4)
    (data / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    assert train.main(_cifar_args(data, tmp_path / "o")) == 0
    err = capsys.readouterr().err
    assert err.count("skipped 1 undecodable") == 1, err  # train and its held-out val share one folder
