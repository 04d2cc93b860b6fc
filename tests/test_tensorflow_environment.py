"""Tests for the environment defaults the command lines give TensorFlow before it loads (keras_cwsn.optional)."""

import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env
from keras_cwsn.optional import set_tensorflow_environment, tensorflow_available

# What a command line does first (train.py, evaluate, predict), then what the loaded TensorFlow says.
CHILD = ("from keras_cwsn.optional import import_tensorflow_quietly, onednn_enabled\n"
         "import_tensorflow_quietly()\n"
         "print('ONEDNN', onednn_enabled())\n")


def test_defaults_fill_only_what_the_user_left_unset(monkeypatch):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    set_tensorflow_environment()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    set_tensorflow_environment()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"  # the user's opt-out is kept
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


def _child_onednn(**env):
    child_env = subprocess_env()
    child_env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    child_env.update(env)
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=child_env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split("ONEDNN ")[-1].strip()


@pytest.mark.skipif(not tensorflow_available(), reason="TensorFlow only")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN is TensorFlow's x86 CPU path")
def test_command_lines_load_tensorflow_with_onednn_on_unless_opted_out():
    # On a CPU without AVX-512 VNNI/BF16/AMX TensorFlow leaves oneDNN off by itself; the default turns it on.
    assert _child_onednn() == "True"
    assert _child_onednn(TF_ENABLE_ONEDNN_OPTS="0") == "False"
