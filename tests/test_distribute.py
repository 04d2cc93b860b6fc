"""tf.distribute: a step on 2 replicas equals a step on one device with the whole global batch.

TensorFlow must be told to split the CPU into 2 logical devices before it initialises, so the
checks run in one subprocess (`_CHECKS`, which starts with conftest's `TWO_CPU_REPLICAS`) that prints
its findings as JSON; the tests read them.
"""

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("tensorflow", reason="TensorFlow only: tf.distribute (MirroredStrategy, multi-worker runs)")

from conftest import ROOT, TWO_CPU_REPLICAS, child_results, subprocess_env  # noqa: E402

# The protocol runs' settings, shared by the in-process mirrored run and the two-worker run, so that
# both compare with the same single-device run.
RUN_ARGS = ["--epochs", "1", "--batch-size", "32", "--set", "synthetic.train_size=128",
            "--set", "synthetic.eval_size=40", "--set", "embedding_sample=0", "--quiet", "--variant", "A"]

_CHECKS = TWO_CPU_REPLICAS + textwrap.dedent('''
    import json, os, sys
    import keras
    import numpy as np

    from keras_cwsn import distribute, training
    from keras_cwsn.losses import PairwiseKLLoss, pairwise_kl_loss
    from keras_cwsn.models import build_model
    from keras_cwsn.variants import variant_loss_weights

    out = {}
    tf.config.experimental.enable_op_determinism()
    mirrored = distribute.make_strategy("mirrored")
    out["replicas"] = mirrored.num_replicas_in_sync
    out["auto"] = type(distribute.make_strategy("auto")).__name__

    # 1. The gathered loss (and its gradient) equals the single-device loss over the whole batch.
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 5)).astype("float32")
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1], "float32")  # replica 0 sees only class 0, replica 1 only class 1
    single, single_grad, out["loss_mirrored"], mirrored_grad = loss_on_replicas(mirrored, PairwiseKLLoss(), labels,
                                                                                 logits)
    out["loss_single"] = single

    @tf.function
    def local_step(y_true, y_pred):  # the pairs inside each replica's slice only
        return mirrored.run(lambda y, p: tf.reduce_mean(pairwise_kl_loss(y, p)), args=(y_true, y_pred))

    local_only = local_step(per_replica(mirrored, labels), per_replica(mirrored, logits))
    out["loss_per_replica_only"] = float(mirrored.reduce("MEAN", local_only, axis=None))
    out["grad_max_diff"] = float(np.abs(mirrored_grad - single_grad).max())
    out["grad_max"] = float(np.abs(single_grad).max())

    # 1b. reduction="sum": Keras does not scale a summed loss by 1 / replicas; the loss divides by them itself.
    summed = PairwiseKLLoss(reduction="sum")
    single_sum = float(summed(labels, tf.constant(logits)))

    @tf.function
    def summed_step(y_true, y_pred):
        return mirrored.run(lambda y, p: summed(y, p), args=(y_true, y_pred))

    sum_value = summed_step(per_replica(mirrored, labels), per_replica(mirrored, logits))
    out["sum_single"] = single_sum
    out["sum_mirrored"] = float(mirrored.reduce("SUM", sum_value, axis=None))

    # 2. A training step of the real clusterer (variant D, BN, SGD momentum) on 2 replicas = on 1 device.
    images = rng.standard_normal((16, 32, 32, 3)).astype("float32")
    fine = rng.integers(0, 4, 16)
    targets = {"fine_fc3": fine, "fine_fc2": fine, "coarse_fc1_side": fine // 2}
    batch = tf.data.Dataset.from_tensors((images, targets))

    def step_on(strategy, sync=True, init=None):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_model("lenet", "D", 4, 2, (32, 32, 3))
            if init is not None:
                model.set_weights(init)
            if sync:
                distribute.synchronize_batch_norm(model, strategy)
            weights = variant_loss_weights("D")
            model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=5e-4),
                          loss={k: PairwiseKLLoss() for k in weights}, loss_weights=weights)
        initial = [w.numpy() for w in model.weights]
        history = model.fit(batch, epochs=2, verbose=0, shuffle=False)  # 2 steps: momentum counts too
        return history.history["loss"], [w.numpy() for w in model.weights], initial

    one = distribute.make_strategy("one")
    loss_one, weights_one, init = step_on(one)
    loss_two, weights_two, _ = step_on(mirrored, init=init)
    loss_unsync, weights_unsync, _ = step_on(mirrored, sync=False, init=init)
    out["fit_loss_one"], out["fit_loss_mirrored"], out["fit_loss_unsynced_bn"] = loss_one, loss_two, loss_unsync
    out["fit_weight_max_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(weights_one, weights_two))
    out["fit_weight_max_change"] = max(float(np.abs(a - b).max()) for a, b in zip(weights_one, init))

    # 3. The whole protocol under --strategy mirrored.
    sys.path.insert(0, os.getcwd())
    import train
    args = json.loads(sys.argv[2])
    codes = [train.main(args + ["--strategy", s, "--output-dir", os.path.join(sys.argv[1], s)])
             for s in ("mirrored", "one")]
    metrics = {s: json.load(open(os.path.join(sys.argv[1], s, "metrics.json"))) for s in ("mirrored", "one")}
    out["run_codes"] = codes
    out["run_distribute"] = metrics["mirrored"]["distribute"]
    out["run_figures"] = {s: {k: metrics[s][k] for k in ("cluster_accuracy", "nmi", "classification_accuracy")}
                          for s in metrics}
    out["run_losses"] = {s: [float(line.split(",")[header.index("loss")]) for line in lines[1:]]
                         for s in metrics
                         for lines in [open(os.path.join(sys.argv[1], s, "cluster_history.csv")).read().split()]
                         for header in [lines[0].split(",")]}
    out["run_odd_batch"] = train.main(args + ["--strategy", "mirrored", "--batch-size", "33",
                                              "--output-dir", os.path.join(sys.argv[1], "odd")])
    print("RESULTS " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distribute")
    return child_results(_CHECKS, str(tmp), json.dumps(RUN_ARGS), cache_dir=tmp / "cache", timeout=900)


def test_two_logical_devices_make_two_replicas(results):
    assert results["replicas"] == 2
    assert results["auto"] == "_DefaultDistributionStrategy"  # auto mirrors GPUs only


def test_gathered_pairwise_loss_equals_single_device_loss(results):
    assert results["loss_mirrored"] == pytest.approx(results["loss_single"], rel=1e-6)
    assert results["grad_max_diff"] <= 1e-6 * max(1.0, results["grad_max"])
    # Without the gather each replica would see only its own (all-similar) pairs: a different loss.
    assert abs(results["loss_per_replica_only"] - results["loss_single"]) > 0.1


def test_summed_pairwise_loss_over_replicas_equals_single_device_sum(results):
    # Each replica holds the whole gathered batch: without the loss's 1 / replicas the sum would double.
    assert results["sum_mirrored"] == pytest.approx(results["sum_single"], rel=1e-6)
    assert results["sum_single"] > 0


def test_mirrored_training_step_equals_single_device_step(results):
    assert results["fit_loss_mirrored"] == pytest.approx(results["fit_loss_one"], rel=1e-5, abs=1e-6)
    assert results["fit_weight_max_change"] > 1e-3  # the step did move the weights
    assert results["fit_weight_max_diff"] < 1e-5
    # Per-replica BN statistics (Keras's default) would not match: hence synchronize_batch_norm.
    assert results["fit_loss_unsynced_bn"][0] != pytest.approx(results["fit_loss_one"][0], rel=1e-4)


def test_protocol_runs_under_mirrored_strategy(results):
    assert results["run_codes"] == [0, 0]
    assert results["run_distribute"]["num_replicas"] == 2
    assert results["run_distribute"]["strategy"] == "MirroredStrategy"
    # the same batches and the same math: the same figures, up to float rounding
    assert results["run_losses"]["mirrored"] == pytest.approx(results["run_losses"]["one"], rel=1e-4)
    mirrored, one = results["run_figures"]["mirrored"], results["run_figures"]["one"]
    for key in mirrored:  # (a flipped argmax of one of the 40 test images would move a figure by 0.025)
        assert mirrored[key] == pytest.approx(one[key], abs=0.026)
    assert results["run_odd_batch"] == 2  # 33 can't be split across 2 replicas


def test_multiworker_needs_tf_config(monkeypatch):
    from keras_cwsn import distribute

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(distribute.DistributeError, match="TF_CONFIG"):
        distribute.make_strategy("multiworker")
    assert distribute.is_chief() and distribute.worker_output_dir("runs/x") == "runs/x"
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker",
                                                                                               "index": 1}}))
    assert not distribute.is_chief()
    assert distribute.worker_output_dir("runs/x") == "runs/x.worker-1"
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker",
                                                                                               "index": 0}}))
    assert distribute.is_chief()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(distribute.DistributeError, match="not valid JSON"):
        distribute.task()


def _free_ports(n):
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.heavy
def test_two_workers_on_one_host_equal_one_device(tmp_path, results):
    """--strategy multiworker with 2 local worker processes (TF_CONFIG) ends where a single-device run ends.

    The single-device run is the one `results` already made with the same settings: only the two
    workers run here, side by side (they must), and nothing else starts beside them.
    """
    workers = [f"localhost:{port}" for port in _free_ports(2)]
    base = subprocess_env(tmp_path / "cache")
    base.pop("TF_CONFIG", None)
    processes = []
    for index in range(2):
        task = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = dict(base, TF_CONFIG=json.dumps(task))
        processes.append(subprocess.Popen([sys.executable, "train.py", *RUN_ARGS, "--strategy", "multiworker",
                                           "--output-dir", str(tmp_path / "multi")], cwd=ROOT, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        for p in processes:
            assert p.wait(timeout=600) == 0, p.stderr.read()[-3000:]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    chief, other = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("multi", "multi.worker-1"))
    one = results["run_figures"]["one"]
    assert chief["distribute"]["num_workers"] == 2 and chief["distribute"]["num_replicas"] == 2
    assert (tmp_path / "multi" / "classifier").exists() and not (tmp_path / "multi.worker-1" / "classifier").exists()
    for key in ("cluster_accuracy", "nmi", "classification_accuracy"):
        assert chief[key] == other[key]
        assert chief[key] == pytest.approx(one[key], abs=0.026)  # one flipped argmax of 40 images at most
