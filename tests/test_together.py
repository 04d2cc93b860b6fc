"""Seeds trained together on JAX (`training.together`, `training.stacked`) against separate runs of `fit`.

The tolerance: a vmapped step rounds differently from a lone one (a convolution over stacked
weights is a grouped convolution), so per-epoch losses and weights agree to float32 rounding, not
bit for bit: relative 1e-4 (absolute 1e-6) on every logged figure, 1e-4 relative / 1e-5 absolute on
every weight, after a few epochs of tiny data; the held-out figures (argmax counts) are equal.
"""

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import ROOT, error_line, load_bench_script, only_on_backend, sigkill_at, subprocess_env

import train

pytestmark = only_on_backend("jax", "the seeds-together trainer is JAX's; TensorFlow keeps fit")

TINY = ["--set", "synthetic.train_size=96", "--set", "synthetic.eval_size=48", "--batch-size", "16",
        "--set", "embedding_sample=8", "--set", "metrics_sample=64", "--set", "augment=true", "--quiet"]
ARGS = ["--variant", "C", "--cluster-epochs", "3", "--classify-epochs", "2", "--seeds", "0,1", *TINY]
FIGURES = ("cluster_accuracy", "nmi", "purity", "classification_accuracy", "train_cluster_accuracy")


def _history(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _json(path):
    with open(path) as f:
        return json.load(f)


def _assert_same_run(run, reference, rel=1e-4, abs_=1e-6):
    """Every file, logged figure (wall times aside), held-out figure and weight of `run` matches `reference`."""
    for phase in ("cluster", "classify"):
        rows, ref_rows = _history(os.path.join(run, f"{phase}_history.csv")), _history(
            os.path.join(reference, f"{phase}_history.csv"))
        assert len(rows) == len(ref_rows) and rows[0].keys() == ref_rows[0].keys(), phase
        for row, ref in zip(rows, ref_rows):
            for key in (k for k in ref if not k.endswith("_seconds")):
                assert float(row[key]) == pytest.approx(float(ref[key]), rel=rel, abs=abs_), (phase, key)
    figures, ref_figures = _json(os.path.join(run, "metrics.json")), _json(os.path.join(reference, "metrics.json"))
    for key in FIGURES:
        assert figures[key] == pytest.approx(ref_figures[key], abs=1e-9), key
    assert figures["warm_start"] == ref_figures["warm_start"]
    assert _json(os.path.join(run, "cluster_result.json"))["mapping"] == _json(
        os.path.join(reference, "cluster_result.json"))["mapping"]
    for name in ("clusterer.keras", "classifier.keras"):
        model = keras.saving.load_model(os.path.join(run, name), compile=False)
        ref_model = keras.saving.load_model(os.path.join(reference, name), compile=False)
        for v, ref_v in zip(model.variables, ref_model.variables):
            np.testing.assert_allclose(np.asarray(v), np.asarray(ref_v), rtol=1e-4, atol=1e-5, err_msg=v.path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("together")
    assert train.main(ARGS + ["--output-dir", str(root / "together")]) == 0
    assert train.main(ARGS + ["--separate-seeds", "--output-dir", str(root / "separate")]) == 0
    return root


@pytest.mark.heavy
def test_each_seed_equals_a_separate_fit_run(runs):
    for seed in (0, 1):
        together, separate = runs / "together" / f"seed_{seed}", runs / "separate" / f"seed_{seed}"
        assert _json(together / "metrics.json")["seeds_together"] == [0, 1]
        assert "seeds_together" not in _json(separate / "metrics.json")
        assert sorted(os.listdir(together)) == sorted(os.listdir(separate))  # the same files, nothing left over
        _assert_same_run(str(together), str(separate))
    seed_0, seed_1 = (_history(runs / "together" / f"seed_{s}" / "cluster_history.csv") for s in (0, 1))
    assert seed_0[0]["loss"] != seed_1[0]["loss"], "each seed has its own initialisation and batches"
    summary, separate_summary = (_json(runs / name / "summary.json") for name in ("together", "separate"))
    assert summary["per_seed"] == separate_summary["per_seed"] and summary["best_seed"] == separate_summary["best_seed"]


@pytest.mark.parametrize("seed_axis, block", [("vmap", None), ("unroll", 1), ("vmap", 2)])
def test_stacked_epochs_equal_fit_with_dropout_batchnorm_and_crops(seed_axis, block, float32_policy):
    """The trainer alone, against `fit` on the inputs the protocol gives it: each seed's own dropout masks,
    BatchNorm statistics, crops, learning-rate schedule and coupled weight decay; in the accelerator
    layout (vmap, one scan per epoch), the CPU's (seeds unrolled, a step per dispatch) and blocks of 2
    steps (the epoch's 5 do not divide: a shorter last block)."""
    from keras_cwsn.config import learning_rate_at
    from keras_cwsn.optimizers import CoupledSGD
    from keras_cwsn.training.callbacks import StepLearningRate
    from keras_cwsn.training.inputs import BatchesByOrder, epoch_batches
    from keras_cwsn.training.recipe import compile_model
    from keras_cwsn.training.stacked import StackedTrainer, stack_state, write_back

    def build(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((8, 8, 3), name="image")
        x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(4, 3, name="conv1")(inputs))
        x = keras.layers.Dropout(0.5, name="drop")(keras.layers.Flatten(name="flatten")(x))
        outputs = {"probabilities": keras.layers.Softmax(name="probabilities")(keras.layers.Dense(3, name="fc3")(x))}
        optimizer = CoupledSGD(learning_rate=0.1, momentum=0.9, coupled_weight_decay=1e-3)
        return compile_model(keras.Model(inputs, outputs), "ce", optimizer, jit_compile=True)

    settings = {"learning_rate": 0.1, "lr_milestones": [1], "lr_factor": 0.5}
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 8, 8, 3)).astype(np.float32), {"probabilities": rng.integers(0, 3, 40, np.int32)}
    seeds, epochs = (3, 7), 3
    tables = {s: [epoch_batches(s, "classify", e, 40, 8, (8, 8)) for e in range(epochs)] for s in seeds}
    separate = {}
    for s in seeds:
        model = build(s)
        data = BatchesByOrder(x, y, np.concatenate([t[0] for t in tables[s]]),
                              np.concatenate([t[1] for t in tables[s]]), pad=1)
        history = model.fit(data, epochs=epochs, steps_per_epoch=5, shuffle=False, verbose=0,
                            callbacks=[StepLearningRate(settings)]).history
        separate[s] = history, [np.asarray(v) for v in model.variables + model.optimizer.variables]
    models = [build(s) for s in seeds]
    trainer = StackedTrainer(models[0], "ce", "kcl", 2.0, x, y, pad=1, seed_axis=seed_axis, block=block)
    state = stack_state(models)
    for epoch in range(epochs):
        order = np.stack([tables[s][epoch][0] for s in seeds])
        crops = np.stack([tables[s][epoch][1] for s in seeds])
        state, logs = trainer.epoch(state, order, crops, learning_rate_at(epoch, settings))
        for s, seed_logs in zip(seeds, logs):
            for key in ("loss", "accuracy"):
                assert seed_logs[key] == pytest.approx(separate[s][0][key][epoch], rel=1e-5), (s, epoch, key)
    write_back(state, models)
    for s, model in zip(seeds, models):
        variables = model.variables + model.optimizer.variables
        for v, expected in zip(variables, separate[s][1]):
            np.testing.assert_allclose(np.asarray(v), expected, rtol=1e-5, atol=1e-6, err_msg=f"seed {s}: {v.path}")
    drop_states = [np.asarray(v) for m in models for v in m.variables if v.path.endswith("seed_generator_state")]
    assert len(drop_states) == 2 and not np.array_equal(*drop_states), "each seed draws its own dropout masks"


@pytest.mark.heavy
def test_sigkill_resumes_every_seed_to_the_uninterrupted_figures(runs, tmp_path, capsys):
    env = subprocess_env(tmp_path / "cache", KERAS_BACKEND="jax")
    killed = tmp_path / "killed"
    command = [sys.executable, os.path.join(ROOT, "train.py"), *ARGS, "--output-dir", str(killed)]
    victim = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metadata = killed / "seed_1" / "backup" / "cluster" / "training_metadata.json"
    sigkill_at(victim, metadata)
    assert not (killed / "seed_0" / "metrics.json").exists()
    # bad input: the same folders under other settings are refused in one line, before anything is touched
    assert train.main(ARGS + ["--set", "margin=1.5", "--output-dir", str(killed)]) == 2
    assert "holds a run started with other settings" in error_line(capsys)
    restarted = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    for seed in (0, 1):
        resumed = killed / f"seed_{seed}"
        assert _json(resumed / "metrics.json")["resumed"][0]["phase"] == "cluster"
        assert not (resumed / "backup").exists()
        _assert_same_run(str(resumed), str(runs / "together" / f"seed_{seed}"), rel=1e-6, abs_=1e-7)


def test_other_backends_and_float16_run_the_seeds_apart():
    from keras_cwsn.training.together import unavailable
    from conftest import tiny_config

    assert unavailable(tiny_config()) is None
    assert "mixed_float16" in unavailable(tiny_config(precision="mixed_float16"))


def test_the_benchmarks_memory_figure_grows_with_the_seeds():
    """`bench_seeds_together.py --memory`: XLA's plan for 2 stacked seeds holds about twice one seed's state."""
    bench = load_bench_script("bench_seeds_together")
    one, two = (bench.device_memory("lenet", "D", 4, (32, 32, 3), n) for n in (1, 2))
    assert 0 < one < two <= 2.2 * one, (one, two)
