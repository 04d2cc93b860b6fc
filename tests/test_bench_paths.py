"""Every optimised path the benchmarks time computes what the plain path computes (values and gradients, never timings).

Covers: XLA vs no XLA for a variant-D step, mixed precision vs float32, steps_per_execution > 1
vs 1, the benchmark's own compiled step vs `train_on_batch`, the 224 pipeline path of
bench_pipeline.py, bench_batchnorm.py's closed-form BatchNormalization vs Keras's, bench_layers.py's BN piece vs
Keras's BatchNormalization, and a smoke run of bench/gpu_check.py (TensorFlow backend, tiny sizes), whose
JAX path must import no TensorFlow.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow", reason="TensorFlow only: the benchmarks' TensorFlow paths (XLA, tf.data)")

from conftest import ROOT as CHECKOUT  # noqa: E402
from conftest import imagenet_reference, load_bench_script, subprocess_env  # noqa: E402
from keras_cwsn.losses import PairwiseKLLoss  # noqa: E402
from keras_cwsn.models import build_model  # noqa: E402
from keras_cwsn.variants import variant_levels, variant_loss_weights  # noqa: E402
from keras_cwsn.optional import onednn_enabled  # noqa: E402

ROOT = Path(CHECKOUT)
BENCH = ROOT / "bench"


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()


def _compiled(variant="D", jit_compile=False, steps_per_execution=1, seed=0):
    keras.utils.set_random_seed(seed)
    model = build_model("lenet", variant, num_fine=6, num_coarse=2)
    optimizer = keras.optimizers.SGD(learning_rate=0.05, momentum=0.9, weight_decay=5e-4)
    if variant == "ce":
        model.compile(optimizer=optimizer, loss={"probabilities": keras.losses.SparseCategoricalCrossentropy()},
                      jit_compile=jit_compile, steps_per_execution=steps_per_execution)
    else:
        weights = variant_loss_weights(variant)
        model.compile(optimizer=optimizer, loss={name: PairwiseKLLoss() for name in weights}, loss_weights=weights,
                      jit_compile=jit_compile, steps_per_execution=steps_per_execution)
    return model


def _data(count, variant="D", seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, 32, 32, 3)).astype(np.float32)
    fine = rng.integers(0, 6, size=count).astype(np.int32)
    by_level = {"fine": fine, "coarse": fine % 2}
    return x, {name: by_level[level] for name, level in variant_levels(variant).items()}


def _weights(model):
    return [np.asarray(w) for w in model.get_weights()]


def _assert_updates_close(before, after_a, after_b, rtol, atol):
    """The weight updates (gradient through the optimiser) agree, not just the weights."""
    for w0, wa, wb in zip(before, after_a, after_b):
        np.testing.assert_allclose(wa - w0, wb - w0, rtol=rtol, atol=atol)


def test_xla_step_matches_plain_step_variant_d():
    x, y = _data(16)
    plain, xla = _compiled(jit_compile=False), _compiled(jit_compile=True)
    before = _weights(plain)
    np.testing.assert_array_equal(before[0], _weights(xla)[0])
    for start in (0, 8):
        batch = (x[start:start + 8], {k: v[start:start + 8] for k, v in y.items()})
        plain_logs = plain.train_on_batch(*batch, return_dict=True)
        xla_logs = xla.train_on_batch(*batch, return_dict=True)
        for key in plain_logs:
            np.testing.assert_allclose(xla_logs[key], plain_logs[key], rtol=1e-4, atol=1e-5)
    _assert_updates_close(before, _weights(plain), _weights(xla), rtol=2e-3, atol=2e-6)


def test_bench_compiled_step_matches_train_on_batch():
    bench_steps = load_bench_script("bench_steps")
    x, y = _data(8)
    reference, benched = _compiled(), _compiled()
    before = _weights(reference)
    reference_loss = reference.train_on_batch(x, y, return_dict=True)["loss"]
    benched.optimizer.build(benched.trainable_variables)
    loss = bench_steps.step_function(benched, jit_compile=False)(tf.constant(x), {k: tf.constant(v) for k, v in y.items()})
    np.testing.assert_allclose(float(loss), reference_loss, rtol=1e-5)
    _assert_updates_close(before, _weights(reference), _weights(benched), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("policy, loss_rtol, min_cosine", [("mixed_bfloat16", 1e-2, 0.995), ("mixed_float16", 2e-3, 0.9995)])
def test_mixed_precision_loss_and_gradients_close_to_float32(policy, loss_rtol, min_cosine):
    x, y = _data(16)
    reference = _compiled()
    before = _weights(reference)
    keras.mixed_precision.set_global_policy(policy)
    mixed = _compiled()
    keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(before)
    assert mixed.get_layer("fc3").compute_dtype == policy.split("_")[1]
    assert all(v.dtype == "float32" for v in mixed.trainable_variables)

    eval_ref = reference.test_on_batch(x, y, return_dict=True)
    eval_mixed = mixed.test_on_batch(x, y, return_dict=True)
    for key in eval_ref:
        assert np.isfinite(eval_mixed[key])
        np.testing.assert_allclose(eval_mixed[key], eval_ref[key], rtol=loss_rtol)

    ref_loss = reference.train_on_batch(x, y, return_dict=True)["loss"]
    mixed_loss = mixed.train_on_batch(x, y, return_dict=True)["loss"]
    assert np.isfinite(mixed_loss)
    np.testing.assert_allclose(mixed_loss, ref_loss, rtol=loss_rtol)
    ref_update = np.concatenate([(w - w0).ravel() for w, w0 in zip(_weights(reference), before)])
    mixed_update = np.concatenate([(w - w0).ravel() for w, w0 in zip(_weights(mixed), before)])
    if policy == "mixed_float16":  # the loss-scale optimiser skips a step whose scaled gradients overflow
        assert np.any(mixed_update)
    cosine = ref_update @ mixed_update / (np.linalg.norm(ref_update) * np.linalg.norm(mixed_update))
    assert cosine > min_cosine
    np.testing.assert_allclose(np.linalg.norm(mixed_update), np.linalg.norm(ref_update), rtol=0.02)


@pytest.mark.parametrize("source", ["numpy", "tf.data"])
def test_steps_per_execution_matches_one_step_per_execution(source):
    x, y = _data(64)
    trained = {}
    for spe in (1, 4):
        model = _compiled(steps_per_execution=spe)
        before = _weights(model)
        if source == "numpy":
            history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        else:
            ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8, drop_remainder=True)
            history = model.fit(ds, epochs=2, verbose=0)
        trained[spe] = (_weights(model), history.history["loss"])
    np.testing.assert_allclose(trained[4][1], trained[1][1], rtol=1e-5)
    _assert_updates_close(before, trained[1][0], trained[4][0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name, shape", [("ClosedFormBatchNorm", (6, 5, 5, 4)), ("FusedBatchNormalization", (6, 5, 5, 4)),
                                         ("FusedBatchNormalization", (6, 4)), ("FusedBatchNormalization", (1, 4))])
def test_other_batchnorms_match_keras_batchnorm(name, shape):
    """The BNs bench_batchnorm.py times are the same function: outputs, input and gamma/beta gradients, moving stats."""
    bench = load_bench_script("bench_batchnorm")
    x = tf.constant(np.random.default_rng(2).standard_normal(shape).astype("float32") * 3 + 1)
    results = []
    for layer_class in (keras.layers.BatchNormalization, getattr(bench, name)):
        layer = layer_class(gamma_initializer=keras.initializers.RandomUniform(0.5, 2.0, seed=1),
                            beta_initializer=keras.initializers.RandomUniform(-1.0, 1.0, seed=2))
        layer.build(x.shape)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.sin(y) * tf.range(1.0, 5.0))
        grads = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
        results.append([y.numpy()] + [g.numpy() for g in grads] + [layer.moving_mean.numpy(), layer.moving_variance.numpy()])
    for ours, reference in zip(results[1], results[0]):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def test_birdsnap_like_224_path_matches_plain_preprocessing(tmp_path):
    bench_pipeline = load_bench_script("bench_pipeline")
    from keras_cwsn.data import pipeline

    paths, labels = bench_pipeline.write_fake_birdsnap(str(tmp_path), count=5, size=(90, 110))
    split = bench_pipeline.jpeg_split(paths, labels)
    stats = pipeline.preprocessing_stats(split, verbose=False)
    levels = variant_levels("D")
    images, targets = next(iter(pipeline.make_pipeline(split, stats, 5, levels)))
    assert images.shape == (5, 224, 224, 3)
    for i, path in enumerate(paths):
        decoded = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        resized = tf.image.resize(decoded, (224, 224), method="bilinear", antialias=True).numpy()
        expected = imagenet_reference(resized)  # NumPy, ImageNet's constants written out in conftest
        np.testing.assert_allclose(images[i].numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(targets["fine_fc3"].numpy(), labels)
    info = split.info
    np.testing.assert_array_equal(targets["coarse_fc1_side"].numpy(), info.coarse_of(labels))
    augmented = next(iter(pipeline.make_pipeline(split, stats, 5, levels, training=True, augment=True)))[0]
    assert augmented.shape == (5, 224, 224, 3) and np.all(np.isfinite(augmented.numpy()))


def test_gpu_check_smoke_tensorflow_backend():
    gpu_check = load_bench_script("gpu_check")
    lines = []
    results = gpu_check.main(["--steps", "2", "--warmup", "1", "--lenet-batch", "8", "--archs", "lenet",
                              "--loss-sizes", "16x8,32x5", "--repeats", "2"], log=lines.append)
    assert results["backend"] == "tensorflow"
    rows = results["training"]
    assert {(r["variant"], r["path"]) for r in rows} == {(v, p) for v in ("D", "ce") for p in ("jit step", "fit numpy")}
    for r in rows:
        assert r["ips"] > 0 and r["finite"], r
    assert [(r["N"], r["K"]) for r in results["loss"]] == [(16, 8), (32, 5)]
    assert all(r["naive_us"] is not None and r["ours_us"] > 0 for r in results["loss"])
    assert any("Training images/second" in line for line in lines)


def test_gpu_check_losses_match_bench_loss_and_each_other():
    """gpu_check's keras.ops copies of the floor and naive losses equal bench_loss.py's; ours equals naive."""
    gpu_check, bench_loss = load_bench_script("gpu_check"), load_bench_script("bench_loss")
    rng = np.random.default_rng(3)
    logits = tf.constant(rng.standard_normal((12, 7)).astype(np.float32) * 3.0)
    labels = tf.constant(rng.integers(0, 3, size=12).astype(np.int32))
    for ours, theirs in ((gpu_check.floor_loss, bench_loss.floor_loss), (gpu_check.naive_loss, bench_loss.naive_loss)):
        np.testing.assert_allclose(float(ours(labels, logits)), float(theirs(labels, logits)), rtol=1e-6)
    for jit in (False, True):
        value, grad = gpu_check.value_and_grad(gpu_check.ours_loss(), jit)(logits, labels)
        naive_value, naive_grad = gpu_check.value_and_grad(gpu_check.naive_loss, jit)(logits, labels)
        np.testing.assert_allclose(value.numpy(), naive_value.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grad.numpy(), naive_grad.numpy(), rtol=1e-3, atol=1e-6)


PACKAGE = ROOT / "keras_cwsn"


def _module_path(name):
    """Source file of `gpu_check` or of a `keras_cwsn...` module, or None if it is not a module."""
    if name == "gpu_check":
        return BENCH / "gpu_check.py"
    base = ROOT / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def _top_level_imports(path):
    """Modules imported at module level (not inside functions or classes) of one source file."""
    names = set()
    for node in ast.parse(Path(path).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                names.update(alias.name for alias in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.level == 0:
                names.add(sub.module)
                names.update(f"{sub.module}.{a.name}" for a in sub.names if _module_path(f"{sub.module}.{a.name}"))
    return names


def _tensorflow_modules():
    """Package modules that import TensorFlow (or TFDS) at module level themselves."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if any(m.startswith("tensorflow") for m in _top_level_imports(path)):
            found.add(name)
    return found


def test_gpu_check_jax_path_imports_no_tensorflow():
    """Statically: the module-level import chain of gpu_check.py holds no TensorFlow and no tf.data module."""
    seen, todo = set(), ["gpu_check"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in _top_level_imports(_module_path(name)):
            assert not imported.startswith("tensorflow"), f"{name} imports {imported} at module level"
            assert not imported.startswith("keras_cwsn.data"), f"{name} imports {imported} (tf.data)"
            if imported.startswith("keras_cwsn") and _module_path(imported):
                todo.append(imported)
                if "." in imported:
                    todo.append(imported.rsplit(".", 1)[0])  # a submodule import runs its package first
    assert {"gpu_check", "keras_cwsn", "keras_cwsn.losses", "keras_cwsn.models"} <= seen


def test_gpu_check_loads_no_tensorflow_module_of_the_package():
    """At run time: importing gpu_check loads .losses and .models and no package module that imports TensorFlow."""
    code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); import gpu_check; "
            "print(sorted(m for m in sys.modules if m.startswith('keras_cwsn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=subprocess_env(TF_CPP_MIN_LOG_LEVEL=3), cwd=str(ROOT))
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert {"keras_cwsn.losses", "keras_cwsn.models"} <= loaded
    tf_modules = _tensorflow_modules()
    assert "keras_cwsn.export" in tf_modules and "keras_cwsn.data.preprocess" in tf_modules  # the scan sees TF where it is
    assert not loaded & tf_modules, f"gpu_check loads {sorted(loaded & tf_modules)}, which import TensorFlow"
    assert not any(m.startswith("keras_cwsn.data") for m in loaded)


@pytest.mark.skipif(onednn_enabled() is False, reason="channels-first convolutions need TensorFlow's oneDNN "
                    "kernels on the CPU (TF_ENABLE_ONEDNN_OPTS=0 was set)")
def test_channels_first_lenet_is_the_same_function_as_channels_last():
    """bench_layout.py times one network in two layouts: with fc1's rows reordered, the outputs agree."""
    bench = load_bench_script("bench_layout")
    last, first = bench.lenet("channels_last"), bench.lenet("channels_first")
    weights = [w.copy() for w in last.get_weights()]
    for i, w in enumerate(weights):  # fc1's kernel: rows in (h, w, c) flatten order -> (c, h, w)
        if w.shape == (5 * 5 * 50, 500):
            weights[i] = w.reshape(5, 5, 50, 500).transpose(2, 0, 1, 3).reshape(-1, 500)
    first.set_weights(weights)
    x = np.random.default_rng(4).standard_normal((3, 32, 32, 3)).astype("float32")
    for training in (False, True):
        np.testing.assert_allclose(first(x, training=training).numpy(), last(x, training=training).numpy(),
                                   rtol=1e-4, atol=1e-4)
    first.set_weights(last.get_weights())  # without the reordering the networks differ: the check has teeth
    assert not np.allclose(first(x, training=False).numpy(), last(x, training=False).numpy(), atol=1e-4)


def test_train_speed_bench_reads_median_and_best_epoch_after_the_first(tmp_path):
    """The first epoch (tracing) is left out of both figures; the best is the fastest later epoch."""
    bench = load_bench_script("bench_train_speed")
    (tmp_path / "cluster_history.csv").write_text(
        "epoch,epoch_seconds,figures_seconds\n0,90.0,9.0\n1,40.0,1.5\n2,60.0,2.5\n3,44.0,1.0\n")
    assert bench.epoch_figures(str(tmp_path), "cluster") == (44.0, 40.0, 1.5)
    (tmp_path / "classify_history.csv").write_text("epoch,epoch_seconds\n0,30.0\n")  # one epoch: it is all there is
    assert bench.epoch_figures(str(tmp_path), "classify") == (30.0, 30.0, None)


def test_layers_bench_times_keras_batchnorm_and_every_case(capsys):
    """bench_layers.py's BN piece is Keras's training-mode BatchNormalization + ReLU; its TF column times every case."""
    bench = load_bench_script("bench_layers")
    _, forward, x, (gamma, beta) = bench.tensorflow_piece("bn", (5, 5, 4), None, np.random.default_rng(3))
    gamma.assign(np.linspace(0.5, 2.0, 4).astype("float32"))
    beta.assign(np.linspace(-1.0, 1.0, 4).astype("float32"))
    layer = keras.layers.BatchNormalization()
    layer.build(x.shape)
    layer.gamma.assign(gamma.numpy())
    layer.beta.assign(beta.numpy())
    np.testing.assert_allclose(forward().numpy(), keras.ops.relu(layer(x, training=True)).numpy(), rtol=1e-5, atol=1e-5)

    assert bench.main(["--column", "tensorflow", "--calls", "1", "--rounds", "1", "--threads", "1"]) == 0
    times = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(times) == set(bench.CASES) and all(t > 0 for t in times.values())
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--rounds", "0"])
    assert exit_info.value.code == 2 and "at least 1" in capsys.readouterr().err
