"""What a user sees with `tensorboard --logdir runs` on a finished run, asked of TensorBoard's own HTTP API.

TensorBoard is started as a process (the `tensorboard` module of this environment) on a free localhost
port over the folder that holds conftest's session-wide tiny run, as a user points it at `runs/`.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("tensorflow", reason="TensorFlow only: TensorBoard's event files are written with tf.summary")
pytest.importorskip("tensorboard", reason="TensorBoard is not installed here")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read().decode())


@pytest.fixture(scope="module")
def tensorboard(protocol_run, tmp_path_factory):
    """(base URL, run name prefix) of a TensorBoard serving the folder above the tiny run."""
    logdir = os.path.dirname(protocol_run["dir"])
    port = _free_port()
    log = open(tmp_path_factory.mktemp("tensorboard") / "tensorboard.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1",
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                _get(base + "/data/runs")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"TensorBoard did not start; see {log.name}")
                time.sleep(0.5)
        yield base, os.path.basename(protocol_run["dir"])
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _poll(fetch, ready, seconds=60):
    """TensorBoard decides whether a plugin is active in a background thread: ask until it answers."""
    deadline = time.time() + seconds
    answer = fetch()
    while not ready(answer) and time.time() < deadline:
        time.sleep(0.5)
        answer = fetch()
    return answer


def test_projector_is_listed_and_active(tensorboard):
    base, _ = tensorboard
    listing = _poll(lambda: _get(base + "/data/plugins_listing"), lambda a: a.get("projector", {}).get("enabled"))
    assert listing["projector"]["enabled"] is True, listing.get("projector")


def test_projector_serves_the_runs_embeddings_with_their_labels(tensorboard, protocol_run):
    base, run = tensorboard
    runs = _poll(lambda: _get(base + "/data/plugin/projector/runs"), bool)
    assert f"{run}/logs/projector" in runs, runs
    projector_run = f"{run}/logs/projector"
    config = _get(base + "/data/plugin/projector/info?run=" + urllib.request.quote(projector_run))
    (embedding,) = config["embeddings"]
    sample = protocol_run["config"]["embedding_sample"]
    assert embedding["tensorName"] == "fc2_embedding"
    assert [int(n) for n in embedding["tensorShape"]][0] == sample
    with urllib.request.urlopen(base + "/data/plugin/projector/metadata?run=" + urllib.request.quote(projector_run)
                                + "&name=fc2_embedding", timeout=10) as response:
        rows = response.read().decode().strip().splitlines()
    assert rows[0] == "fine\tcoarse" and len(rows) == sample + 1


def test_scalar_runs_of_both_phases_are_listed(tensorboard):
    base, run = tensorboard
    runs = _get(base + "/data/runs")
    for phase in ("cluster", "classify"):
        assert f"{run}/logs/{phase}/train" in runs and f"{run}/logs/{phase}/validation" in runs, runs
