"""Shared test helpers: paths, the subprocess environment, tiny models and data, NumPy references, one protocol run.

Everything the test files used to repeat lives here once:
- `ROOT` (the repository) is on `sys.path`, so `import train` works from any working directory;
- `subprocess_env(...)`: the environment of a child Python process (quiet TensorFlow, this checkout
  importable, a private cache); `child_results(code, ...)`: run a child script, read the JSON it prints;
  `TWO_CPU_REPLICAS`: the start of a child script that needs 2 tf.distribute replicas on the CPU;
- `only_on_backend(name, reason)`: a skip mark; the `heavy` mark (pytest.ini) puts a module first;
- `tiny_clusterer`, `random_images`, `softmax`, the `float32_policy` fixture;
- `make_cifar_tree`, `make_cifar_archive`, `write_image`, `tiny_config`: small datasets and configs;
- `yuv_reference`, `uv_stats_reference`, `imagenet_reference`: the preprocessing written out in
  NumPy float64 from the published coefficients, never by calling the code under test;
- `protocol_run`: one tiny run of the whole protocol (train.py, variant D) for the session, shared by
  test_export.py and test_train_e2e.py, with the in-memory classifier and the warm start's inputs captured.
(The pairwise-loss tests share theirs in loss_helpers.py.)

Backends: the modules about what only TensorFlow has (tf.distribute, TFDS, the SavedModel, op determinism,
the TensorFlow command line's subprocesses) begin with `pytest.importorskip("tensorflow", reason=...)`, so
where TensorFlow is not installed (the JAX environment of requirements-jax.txt) pytest reports them as
skipped, with the reason; their backend-neutral counterparts are in test_protocol_any_backend.py. Every
other module runs on the active Keras backend.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from keras_cwsn.optional import set_tensorflow_environment  # noqa: E402

set_tensorflow_environment()  # the kernels train.py runs on (oneDNN on), set before anything loads TensorFlow

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Hsu & Kira's CIFAR-10 hierarchy (DESIGN.md), written out here rather than read from the package's table.
CIFAR10_ANIMALS = ("bird", "cat", "deer", "dog", "frog", "horse")
CIFAR10_VEHICLES = ("airplane", "automobile", "ship", "truck")


def pytest_collection_modifyitems(items):
    """Modules holding a `heavy` test (whole train.py processes, a minute or more) run first.

    Under `pytest -n 2` (README, CI) pytest.ini hands each worker whole modules in this order, so the
    long ones start at once and the many short ones fill in around them instead of trailing behind.
    """
    heavy = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("heavy")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in heavy)  # stable: file order otherwise


def only_on_backend(name, reason):
    """Run a test on one Keras backend only. For the scripts that drive train.py processes: CI runs the
    suite on both backends, and train.py itself is checked on each by test_protocol_any_backend.py."""
    import keras

    return pytest.mark.skipif(keras.backend.backend() != name, reason=f"{name} backend only: {reason}")


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keep decoded-folder and statistics caches out of the user's ~/.cache."""
    monkeypatch.setenv("KERAS_CWSN_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def float32_policy():
    """Restore the global dtype policy (and Keras's name counters) whatever a test does with them."""
    import keras

    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def subprocess_env(cache_dir=None, **extra):
    """Environment of a child Python process: quiet TensorFlow, this checkout first on PYTHONPATH, a cache folder."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cache_dir is not None:
        env["KERAS_CWSN_CACHE"] = str(cache_dir)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def load_bench_script(name):
    """Import a bench script by path (bench/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def sigkill_at(process, path, timeout=300):
    """SIGKILL `process` as soon as `path` exists (e.g. its first checkpoint), and check that it was killed."""
    deadline = time.time() + timeout
    while not os.path.exists(path) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def child_results(code, *args, stdin="", cache_dir=None, timeout=300, **env):
    """Run `python -c code *args` in the checkout (environment: `subprocess_env(cache_dir, **env)`) and return
    the JSON its last `RESULTS <json>` line of stdout holds; fail with the end of its stderr if it failed or
    printed none."""
    done = subprocess.run([sys.executable, "-c", code, *args], input=stdin, cwd=ROOT,
                          env=subprocess_env(cache_dir, **env), capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS "):])


# The start of a child script that needs 2 tf.distribute replicas on the CPU: TensorFlow must split the
# CPU into 2 logical devices before it initialises, hence a fresh process (see `child_results`). It
# imports TensorFlow as `tf` and defines `per_replica(strategy, array)`, which hands replica r the r-th
# half of a global batch, as fit's dataset distribution does, and `loss_on_replicas(strategy, loss, labels,
# logits)`: (the loss of one device on the whole batch, its gradient w.r.t. the logits, the replicas' losses
# summed as the optimizer minimises them, their gradients concatenated).
TWO_CPU_REPLICAS = textwrap.dedent('''
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


    def per_replica(strategy, array):
        half = len(array) // 2
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(array[ctx.replica_id_in_sync_group * half:][:half]))


    def loss_on_replicas(strategy, loss, labels, logits):
        x = tf.constant(logits)
        with tf.GradientTape() as tape:
            tape.watch(x)
            single = loss(labels, x)
        single_grad = tape.gradient(single, x).numpy()

        @tf.function
        def replica_step(y_true, y_pred):
            def step(y_true, y_pred):
                with tf.GradientTape() as tape:
                    tape.watch(y_pred)
                    value = loss(y_true, y_pred)  # sum_over_batch_size: Keras scales it by 1 / replicas, as fit
                return value, tape.gradient(value, y_pred)
            return strategy.run(step, args=(y_true, y_pred))

        value, grad = replica_step(per_replica(strategy, labels), per_replica(strategy, logits))
        grads = np.concatenate([g.numpy() for g in strategy.experimental_local_results(grad)])
        return float(single), single_grad, float(strategy.reduce("SUM", value, axis=None)), grads
''')


def error_line(capsys):
    """The single `error: ...` line a failed command printed on stderr (and nothing else there)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Tiny models and data
# ---------------------------------------------------------------------------------------------


def random_images(n=4, shape=(32, 32, 3), seed=0):
    """Standard-normal float32 images (already "preprocessed"), seeded."""
    return np.random.default_rng(seed).standard_normal((n,) + tuple(shape)).astype(np.float32)


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def tiny_clusterer(num_clusters=4, input_dim=6, hidden="hidden"):
    """A two-Dense-layer model with one `fine_fc3` logits output (uncompiled): loss and metric tests use it."""
    import keras

    inputs = keras.Input((input_dim,), name="x")
    x = keras.layers.Dense(8, activation="relu", name=hidden)(inputs)
    logits = keras.layers.Dense(num_clusters, name="fc3")(x)
    return keras.Model(inputs, {"fine_fc3": logits})


def write_image(path, array):
    """Encode a uint8 (H, W, 3) array as JPEG or PNG (by extension) with PIL."""
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def make_cifar_tree(root, per_class=6, classes=CIFAR10_CLASSES, seed=0, splits=("train",), size=32):
    """A tiny CIFAR-style folder: root/<split>/<class>/NNNN.png (lossless, so pixels are known)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(per_class):
                array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                array[..., c % 3] //= 2  # classes differ a little in colour
                path = os.path.join(root, split, name, f"{i:04d}.png")
                write_image(path, array)
                arrays[path] = array
    return arrays


def make_cifar_archive(root):
    """A CIFAR-style archive as the GPU machine gets it (train/<class>/*, here with a test/ split too)."""
    make_cifar_tree(os.path.join(root, "tree"), per_class=4, splits=("train", "test"))
    path = os.path.join(root, "cifar10.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(os.path.join(root, "tree", split), arcname=split)
    return path


def tiny_config(**overrides):
    """The synthetic config shrunk to seconds: 1 epoch per phase, a few hundred images."""
    from keras_cwsn.config import load_config, validate

    config = load_config(dataset="synthetic")
    config["synthetic"].update(train_size=192, eval_size=64)
    for phase in ("cluster", "classify"):
        config[phase].update(epochs=1, batch_size=32)
    config.update(embedding_sample=16)
    config.update(overrides)
    if config["dataset"] != "synthetic":  # the embedded data's settings would be refused on another dataset
        config["synthetic"] = {}
    return validate(config)


# ---------------------------------------------------------------------------------------------
# Independent preprocessing references (NumPy float64, coefficients written out)
# ---------------------------------------------------------------------------------------------

# ITU-R BT.601 luma, and the analogue YUV colour differences U = 0.492111 (B - Y), V = 0.877283 (R - Y).
BT601_LUMA = (0.299, 0.587, 0.114)
BT601_U_SCALE, BT601_V_SCALE = 0.492111, 0.877283
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rgb_to_yuv_reference(images):
    """uint8 (or float 0..255) RGB (..., 3) -> float64 YUV, RGB scaled to [0, 1] first."""
    rgb = np.asarray(images, dtype=np.float64) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = BT601_LUMA[0] * r + BT601_LUMA[1] * g + BT601_LUMA[2] * b
    return np.stack([y, BT601_U_SCALE * (b - y), BT601_V_SCALE * (r - y)], axis=-1)


def uv_stats_reference(images):
    """(uv_mean, uv_std) over every pixel of a split: the population mean and std of U and V."""
    uv = rgb_to_yuv_reference(images)[..., 1:].reshape(-1, 2)
    return uv.mean(axis=0), uv.std(axis=0)


def yuv_reference(images, uv_mean, uv_std):
    """Hsu & Kira's input: Y standardised per image (by its own mean and std), U and V by the given statistics."""
    yuv = rgb_to_yuv_reference(images)
    y = yuv[..., 0]
    axes = tuple(range(y.ndim - 2, y.ndim))
    mean = y.mean(axis=axes, keepdims=True)
    std = y.std(axis=axes, keepdims=True)
    y = (y - mean) / np.maximum(std, 1.0 / np.sqrt(y.shape[-1] * y.shape[-2]))
    uv = (yuv[..., 1:] - np.asarray(uv_mean, np.float64)) / np.asarray(uv_std, np.float64)
    return np.concatenate([y[..., None], uv], axis=-1)


def imagenet_reference(images):
    """RGB scaled to [0, 1], then ImageNet's per-channel mean and std."""
    x = np.asarray(images, dtype=np.float64) / 255.0
    return (x - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)


# ---------------------------------------------------------------------------------------------
# Clustering figures, recomputed from their definitions
# ---------------------------------------------------------------------------------------------


def confusion_counts(labels, clusters, size):
    """counts[class, cluster], by a plain loop."""
    counts = np.zeros((size, size), dtype=np.int64)
    for label, cluster in zip(np.asarray(labels).tolist(), np.asarray(clusters).tolist()):
        counts[label, cluster] += 1
    return counts


def best_one_to_one_matches(counts):
    """The most examples any one-to-one cluster -> class assignment gets right.

    Exact, by dynamic programming over the subsets of clusters (classes taken in order): an
    algorithm of its own, not the Hungarian solver the package calls.
    """
    size = counts.shape[0]
    best = {0: 0}
    for mask in range(1 << size):
        if mask not in best:
            continue
        cls = bin(mask).count("1")
        if cls == size:
            continue
        for cluster in range(size):
            if not mask & (1 << cluster):
                nxt = mask | (1 << cluster)
                best[nxt] = max(best.get(nxt, -1), best[mask] + int(counts[cls, cluster]))
    return best[(1 << size) - 1]


def mapped_matches(counts, mapping):
    """Examples right when cluster k is read as class mapping[k]."""
    return int(sum(counts[mapping[k], k] for k in range(len(mapping))))


# ---------------------------------------------------------------------------------------------
# One tiny run of the whole protocol, shared by the session
# ---------------------------------------------------------------------------------------------

# Each phase gets its own momentum, weight decay and rate, so that a test can tell them apart.
TINY_RUN_ARGS = ["--set", "synthetic.train_size=192", "--set", "synthetic.eval_size=64", "--epochs", "1",
                 "--batch-size", "32", "--set", "embedding_sample=16", "--quiet",
                 "--set", "cluster.momentum=0.8", "--set", "cluster.weight_decay=0.001",
                 "--set", "cluster.learning_rate=0.02", "--set", "classify.momentum=0.7",
                 "--set", "classify.weight_decay=0.0002", "--set", "classify.learning_rate=0.005"]


@pytest.fixture(scope="session")
def protocol_run(tmp_path_factory):
    """`train.py --variant D` on tiny embedded data, once per session.

    Returns a dict: `dir` (the run folder), `model_dir` (its SavedModel), `metrics` (metrics.json),
    `config`, and what the run handed to two library calls, captured on the way:
    - `export`: the arguments of `export.export_classifier` (the in-memory Keras `classifier`,
      `class_names`, `image_size`, `stats`, `kwargs`);
    - `warm_start`: the `mapping` the warm start received, the clusterer's fc3 weights and the
      classifier's fc3 weights right after the transfer (before any fine-tuning step).
    """
    import train
    from keras_cwsn import export as export_lib
    from keras_cwsn import warmstart

    root = tmp_path_factory.mktemp("protocol_run")
    out = str(root / "run")
    captured = {"export": {}, "warm_start": {}}
    real_export, real_transfer = export_lib.export_classifier, warmstart.transfer_weights

    def capture_export(classifier, path, class_names, image_size, stats, **kwargs):
        captured["export"].update(classifier=classifier, class_names=list(class_names), image_size=tuple(image_size),
                                  stats=stats, kwargs=kwargs)
        return real_export(classifier, path, class_names, image_size, stats, **kwargs)

    def capture_transfer(clusterer, classifier, head="hungarian", mapping=None):
        copied = real_transfer(clusterer, classifier, head, mapping)
        captured["warm_start"].update(
            head=head, mapping=None if mapping is None else np.asarray(mapping).copy(), copied=list(copied),
            clusterer_fc3=[np.array(w) for w in clusterer.get_layer("fc3").get_weights()],
            classifier_fc3=[np.array(w) for w in classifier.get_layer("fc3").get_weights()],
            clusterer_conv1=[np.array(w) for w in clusterer.get_layer("conv1").get_weights()],
            classifier_conv1=[np.array(w) for w in classifier.get_layer("conv1").get_weights()])
        return copied

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_CWSN_CACHE", str(root / "cache"))
        mp.setattr(export_lib, "export_classifier", capture_export)
        mp.setattr(warmstart, "transfer_weights", capture_transfer)
        assert train.main(["--variant", "D", "--output-dir", out, *TINY_RUN_ARGS]) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    return dict(captured, dir=out, model_dir=os.path.join(out, "classifier"), metrics=metrics,
                config=metrics["config"])
