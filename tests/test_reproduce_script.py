"""scripts/reproduce_cifar10.sh: runs skipped when finished, small files copied, STREAMS=N runs at once on one thread each,
RETRIES=N reruns of a run killed for memory."""

import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import ROOT, make_cifar_tree, only_on_backend, subprocess_env

SCRIPT = os.path.join(ROOT, "scripts", "reproduce_cifar10.sh")
TINY = "--batch-size 8 --set embedding_sample=0 --set metrics_sample=40 --quiet"


def _python_that_logs_its_threads(tmp_path):
    """An interpreter wrapper recording, per call, the thread settings TensorFlow would read."""
    log = tmp_path / "threads.log"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/usr/bin/env bash\necho "${{TF_NUM_INTRAOP_THREADS:-unset}} '
                       f'${{TF_NUM_INTEROP_THREADS:-unset}} $*" >> "{log}"\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return str(wrapper), log


@pytest.mark.heavy
@only_on_backend("tensorflow", "the CPU runs' script, on TensorFlow (the fastest backend on a CPU)")
def test_streams_share_out_the_runs_and_run_each_on_one_thread(tmp_path):
    data, out, copies = tmp_path / "data", tmp_path / "runs", tmp_path / "results"
    make_cifar_tree(str(data), per_class=4, splits=("train", "test"))
    python, log = _python_that_logs_its_threads(tmp_path)
    env = subprocess_env(tmp_path / "cache", STREAMS=2, RUNS="ce:0 A:0 A:1", TAG="t", PYTHON=python, ARGS=TINY,
                         COPY_TO=copies)
    done = subprocess.run(["bash", SCRIPT, str(data), str(out), "0.0106"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr + (out / "stream-0.log").read_text()
    streams = [(out / f"stream-{k}.log").read_text() for k in (0, 1)]
    assert "ce seed 0" in streams[0] and "A seed 1" in streams[0] and "A seed 0" in streams[1]  # round-robin
    assert done.stdout.count("### cifar10 / lenet") == 1  # one table, after both streams
    for variant, seed in (("ce", 0), ("A", 0), ("A", 1)):
        metrics = json.loads((out / f"cifar10-lenet-t-{variant}" / f"seed_{seed}" / "metrics.json").read_text())
        assert metrics["config"]["schedule_scale"] == 0.0106 and metrics["seed"] == seed
        assert (copies / f"cifar10-lenet-t-{variant}" / f"seed_{seed}" / "metrics.json").is_file()
    trainings = [line for line in log.read_text().splitlines() if "train.py" in line]
    assert len(trainings) == 3 and all(line.startswith("1 1 ") for line in trainings)

    env["STREAMS"] = "1"  # the same command again: every run is finished, nothing trains
    again = subprocess.run(["bash", SCRIPT, str(data), str(out), "0.0106"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "===" not in again.stdout
    assert len([line for line in log.read_text().splitlines() if "train.py" in line]) == 3


def test_bad_streams_value_is_refused(tmp_path):
    for value in ("0", "two", "-1"):
        done = subprocess.run(["bash", SCRIPT, str(tmp_path), str(tmp_path / "runs")],
                              env=subprocess_env(STREAMS=value), capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "STREAMS must be a whole number" in done.stderr, value


def _python_killed_first(tmp_path, kills, exit_status=None):
    """An interpreter stand-in for `train.py`: SIGKILLs itself on its first `kills` calls (as the
    out-of-memory killer would), or exits with `exit_status`; otherwise writes a finished run."""
    calls = tmp_path / "calls.log"
    wrapper = tmp_path / "python"
    fail = f"exit {exit_status}" if exit_status is not None else "kill -9 $$"
    wrapper.write_text(f"""#!/usr/bin/env bash
echo "$*" >> "{calls}"
n=$(wc -l < "{calls}")
if [ "$n" -le {kills} ]; then {fail}; fi
while [ $# -gt 0 ]; do [ "$1" = --output-dir ] && out=$2; shift; done
mkdir -p "$out" && echo '{{}}' > "$out/metrics.json"
""")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return str(wrapper), calls


def _reproduce(tmp_path, python, **env):
    env = subprocess_env(RUNS="A:0", TAG="t", PYTHON=python, NO_TABLE=1, **env)
    return subprocess.run(["bash", SCRIPT, str(tmp_path), str(tmp_path / "runs"), "0.1"], env=env,
                          capture_output=True, text=True, timeout=60)


def test_retries_resume_a_run_killed_for_memory(tmp_path):
    python, calls = _python_killed_first(tmp_path, kills=2)
    done = _reproduce(tmp_path, python, RETRIES=2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("killed (exit 137); resuming") == 2
    assert (tmp_path / "runs" / "cifar10-lenet-t-A" / "seed_0" / "metrics.json").is_file()
    runs = calls.read_text().splitlines()
    assert len(runs) == 3 and len(set(runs)) == 1  # the same command each time: train.py resumes it


def test_retries_run_out_and_other_failures_stop_the_script(tmp_path):
    python, calls = _python_killed_first(tmp_path, kills=2)
    done = _reproduce(tmp_path, python, RETRIES=1)  # killed twice, one retry: the kill stands
    assert done.returncode == 137 and len(calls.read_text().splitlines()) == 2
    calls.unlink()
    python, calls = _python_killed_first(tmp_path, kills=1, exit_status=2)  # a refused config: never retried
    done = _reproduce(tmp_path, python, RETRIES=5)
    assert done.returncode == 2 and len(calls.read_text().splitlines()) == 1
    assert _reproduce(tmp_path, python, RETRIES="x").stderr.startswith("error: RETRIES must be a whole number")
