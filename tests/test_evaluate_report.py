"""The evaluate command on a folder never seen in training, the protocol's mapping, and the results table.

The data folder is built so that the choice of split for the Hungarian mapping shows in the figures:
the images held out of `train/<class c>/` as the val split are copies of training images of class c + 1.
A clusterer that groups images at all puts them in the clusters of class c + 1, so the training split's
mapping reads them as c + 1 (wrong), while a mapping fitted on the val split itself would read them
as c (right): the protocol must report the first.
"""

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="TensorFlow only: evaluate reads the SavedModel a protocol run exports")

import train  # noqa: E402
from conftest import (  # noqa: E402
    CIFAR10_CLASSES,
    best_one_to_one_matches,
    confusion_counts,
    make_cifar_tree,
    mapped_matches,
)
from keras_cwsn import evaluate  # noqa: E402
from keras_cwsn.report import cli, tables  # noqa: E402

PER_CLASS, VAL_PER_CLASS = 8, 2


def _shifted_copies(train_dir, out_dir, names):
    """out_dir/<class c>/<name> = a copy of train_dir/<class c + 1>/<source>, for (name, source) in names."""
    for c, cls in enumerate(CIFAR10_CLASSES):
        source_class = CIFAR10_CLASSES[(c + 1) % len(CIFAR10_CLASSES)]
        os.makedirs(os.path.join(out_dir, cls), exist_ok=True)
        for name, source in names:
            shutil.copyfile(os.path.join(train_dir, source_class, source), os.path.join(out_dir, cls, name))


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data_dir = root / "train_data"
    make_cifar_tree(str(data_dir), per_class=PER_CLASS, seed=1)
    # the val split (the last 2 files by name): copies of the first two training images of the next class
    _shifted_copies(str(data_dir / "train"), str(data_dir / "train"), [(f"{PER_CLASS - 2:04d}.png", "0000.png"),
                                                                       (f"{PER_CLASS - 1:04d}.png", "0001.png")])
    out = str(root / "run")
    argv = ["--dataset", "cifar10", "--data-dir", str(data_dir), "--variant", "A", "--epochs", "1",
            "--batch-size", "16", "--set", f"val_per_class={VAL_PER_CLASS}", "--set", "embedding_sample=0",
            "--output-dir", out, "--quiet"]
    assert train.main(argv) == 0
    return root, out


def _clusters(run_dir, data_dir, split):
    """(labels, cluster ids) of a split under the run's clusterer, fed as evaluate and the protocol feed it."""
    import keras

    from keras_cwsn import data
    from keras_cwsn.data import preprocess

    with open(os.path.join(run_dir, "classifier", "assets", "cwsn_model_info.json")) as f:
        stats = json.load(f)["preprocessing"]
    loaded = data.load_split("cifar10", split, data_dir=data_dir, val_per_class=VAL_PER_CLASS, verbose=False)
    clusterer = keras.saving.load_model(os.path.join(run_dir, "clusterer.keras"), compile=False)
    x = np.asarray(preprocess.preprocess(loaded.images, stats["normalization"], stats))
    return loaded.labels, np.argmax(clusterer.predict(x, batch_size=256, verbose=0)["fine_fc3"], axis=-1)


def _mapping(run_dir):
    with open(os.path.join(run_dir, "cluster_result.json")) as f:
        return np.asarray(json.load(f)["mapping"])


def test_protocol_fits_the_mapping_on_the_training_split_and_reports_the_val_split_with_it(cifar_run):
    root, run_dir = cifar_run
    mapping = _mapping(run_dir)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    train_labels, train_clusters = _clusters(run_dir, str(root / "train_data"), "train")
    counts = confusion_counts(train_labels, train_clusters, 10)
    assert mapped_matches(counts, mapping) == best_one_to_one_matches(counts)
    assert metrics["train_cluster_accuracy"] == pytest.approx(best_one_to_one_matches(counts) / len(train_labels))
    val_labels, val_clusters = _clusters(run_dir, str(root / "train_data"), "val")
    counts = confusion_counts(val_labels, val_clusters, 10)
    assert metrics["cluster_accuracy"] == pytest.approx(mapped_matches(counts, mapping) / len(val_labels))
    # the built-in shift: a mapping fitted on the val split itself would have reported more
    assert best_one_to_one_matches(counts) > mapped_matches(counts, mapping)


def test_evaluate_on_an_unseen_folder_uses_the_runs_mapping(cifar_run, capsys):
    root, run_dir = cifar_run
    unseen = root / "unseen"
    _shifted_copies(str(root / "train_data" / "train"), str(unseen / "test"),
                    [(f"{i:04d}.png", f"{i:04d}.png") for i in range(3)])
    figures = evaluate.evaluate_run(run_dir, str(unseen), "test")
    assert figures["num_examples"] == 30
    labels, clusters = _clusters(run_dir, str(unseen), "test")
    counts = confusion_counts(labels, clusters, 10)
    mapping = _mapping(run_dir)
    assert figures["cluster_accuracy"] == pytest.approx(mapped_matches(counts, mapping) / 30)
    assert best_one_to_one_matches(counts) > mapped_matches(counts, mapping)  # a self-fitted mapping would differ
    purity = sum(np.bincount(labels[clusters == c]).max() for c in set(clusters.tolist())) / 30
    assert figures["purity"] == pytest.approx(purity)
    for key in ("classification_accuracy", "nmi"):
        assert 0.0 <= figures[key] <= 1.0
    assert evaluate.main([run_dir, "--data-dir", str(unseen), "--split", "test", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["classification_accuracy"] == pytest.approx(figures["classification_accuracy"])
    assert printed["cluster_accuracy"] == pytest.approx(figures["cluster_accuracy"])


def test_evaluate_reproduces_the_runs_own_figures(cifar_run):
    root, run_dir = cifar_run
    figures = evaluate.evaluate_run(run_dir, None, "val")  # the run's own held-out split
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    for key in ("classification_accuracy", "cluster_accuracy", "nmi", "purity"):
        assert figures[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_evaluate_confusion_counts_the_clusterers_answers(cifar_run, capsys):
    root, run_dir = cifar_run
    figures = evaluate.evaluate_run(run_dir, None, "val", confusion=True)
    labels, clusters = _clusters(run_dir, str(root / "train_data"), "val")
    mapping = _mapping(run_dir)
    expected = np.zeros((10, 10), dtype=np.int64)
    for label, cluster in zip(labels, clusters):
        expected[label, mapping[cluster]] += 1
    assert figures["confusion"]["classes"] == list(CIFAR10_CLASSES)
    np.testing.assert_array_equal(figures["confusion"]["counts"], expected)
    assert np.trace(expected) / len(labels) == pytest.approx(figures["cluster_accuracy"])
    assert evaluate.main([run_dir, "--split", "val", "--confusion"]) == 0
    printed = capsys.readouterr().out
    assert "rows: true class" in printed
    first = expected[0]
    others = first.copy()
    others[0] = -1
    leak = CIFAR10_CLASSES[int(others.argmax())]
    assert f"{first[0] / first.sum():6.1%} in its own cluster; largest leak: {leak}" in printed


def test_evaluate_confusion_needs_a_clusterer(cifar_run, tmp_path, capsys):
    _, run_dir = cifar_run
    copy = tmp_path / "no-clusterer"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("clusterer.keras", "logs", "backup"))
    assert evaluate.main([str(copy), "--split", "val", "--confusion"]) == 2
    assert "--confusion needs a clusterer" in capsys.readouterr().err
    assert evaluate.main([str(copy), "--split", "val", "--probe", "cat,dog"]) == 2
    assert "--probe needs a clusterer" in capsys.readouterr().err
    assert "confusion" not in evaluate.evaluate_run(str(copy), None, "val")


def test_evaluate_probe_fits_each_hidden_fc_layer_on_the_two_classes_training_images(cifar_run, capsys):
    import keras

    from keras_cwsn import data
    from keras_cwsn.data import preprocess
    from keras_cwsn.metrics import pair_separability

    root, run_dir = cifar_run
    figures = evaluate.evaluate_run(run_dir, None, "val", probe=["cat", "airplane"])
    assert figures["probe"]["classes"] == ["cat", "airplane"]
    assert list(figures["probe"]["layers"]) == ["fc1_relu", "fc2_relu"]
    # the same probe by hand: the run's statistics, its training split without the held-out images
    with open(os.path.join(run_dir, "preprocessing.json")) as f:
        stats = json.load(f)
    clusterer = keras.saving.load_model(os.path.join(run_dir, "clusterer.keras"), compile=False)
    sides = []
    for split in ("train", "val"):
        loaded = data.load_split("cifar10", split, data_dir=str(root / "train_data"), val_per_class=VAL_PER_CLASS,
                                 verbose=False)
        keep = np.isin(loaded.labels, [CIFAR10_CLASSES.index("cat"), CIFAR10_CLASSES.index("airplane")])
        x = np.asarray(preprocess.preprocess(loaded.images[keep], stats["normalization"], stats))
        sides.append((x, loaded.labels[keep] == CIFAR10_CLASSES.index("airplane")))
    for layer, scores in figures["probe"]["layers"].items():
        hidden = keras.Model(clusterer.input, clusterer.get_layer(layer).output)
        expected = pair_separability(hidden.predict(sides[0][0], verbose=0), sides[0][1],
                                     hidden.predict(sides[1][0], verbose=0), sides[1][1])
        assert (scores["train"], scores["val"]) == pytest.approx(expected, abs=1e-6), layer
    assert evaluate.main([run_dir, "--split", "val", "--probe", "cat,airplane"]) == 0
    printed = capsys.readouterr().out
    assert "linear probe, cat vs airplane" in printed and "fc2_relu" in printed


def test_evaluate_probe_on_a_run_without_saved_statistics_loads_its_training_split_once(cifar_run, tmp_path,
                                                                                          monkeypatch):
    """An older run in its classification phase (no classifier/, no preprocessing.json) whose data moved: the
    statistics and the probe share one load of the training split, from the --data-dir given."""
    from keras_cwsn.training import inputs

    root, run_dir = cifar_run
    reference = evaluate.evaluate_run(run_dir, None, "val", probe=["cat", "airplane"])
    older = tmp_path / "older-run"
    shutil.copytree(run_dir, older, ignore=shutil.ignore_patterns("classifier", "preprocessing.json", "backup", "logs"))
    moved = tmp_path / "moved-data"
    shutil.copytree(root / "train_data", moved)
    config = json.loads((older / "config.json").read_text())
    (older / "config.json").write_text(json.dumps(dict(config, data_dir=str(tmp_path / "gone"))))
    loads = []
    load = inputs.load_training_split
    monkeypatch.setattr(inputs, "load_training_split", lambda *args: loads.append(args) or load(*args))
    figures = evaluate.evaluate_run(str(older), str(moved), "val", probe=["cat", "airplane"])
    assert [args[1] for args in loads] == [str(moved)]
    assert figures["cluster_accuracy"] == pytest.approx(reference["cluster_accuracy"], abs=1e-6)
    for layer, scores in reference["probe"]["layers"].items():
        assert figures["probe"]["layers"][layer] == pytest.approx(scores, abs=1e-6), layer


@pytest.mark.parametrize("probe, message", [(["cat", "kitten"], "Unknown class 'kitten' for --probe; classes: airplane"),
                                            (["cat", "cat"], "two different class names"),
                                            (["cat"], "two different class names")])
def test_evaluate_probe_names_bad_classes(cifar_run, probe, message):
    with pytest.raises(ValueError, match=message):
        evaluate.evaluate_run(cifar_run[1], None, "val", probe=probe)


def test_evaluate_errors(tmp_path, capsys):
    assert evaluate.main([str(tmp_path)]) == 2
    assert "not a run folder: config.json is missing" in capsys.readouterr().err


def _metrics(path, variant, seed, acc, cluster=None, extra=None, **settings):
    config = {"dataset": "cifar10", "arch": "lenet", "double": False, "schedule_scale": 0.5, "variant": variant,
              "weight_decay_mode": "coupled", "init": "torch", **settings}
    payload = {"config": config, "seed": seed, "classification_accuracy": acc, "eval_split": "test", **(extra or {})}
    if cluster is not None:
        payload.update(cluster_accuracy=cluster, nmi=0.5, purity=0.6)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.json"), "w") as f:
        json.dump(payload, f)


def test_report_table(tmp_path, capsys):
    _metrics(tmp_path / "ce" / "seed_0", "ce", 0, 0.70)
    _metrics(tmp_path / "ce" / "seed_1", "ce", 1, 0.72)
    _metrics(tmp_path / "a" / "seed_0", "A", 0, 0.75, cluster=0.6)
    assert cli.main([str(tmp_path / "ce"), str(tmp_path / "a")]) == 0
    table = capsys.readouterr().out
    assert "### cifar10 / lenet, schedule_scale 0.5" in table
    ce_row = next(line for line in table.splitlines() if line.startswith("| ce "))
    assert "71.00 ± 1.41 (best 72.00)" in ce_row and "75.48" in ce_row and "-4.48" in ce_row
    a_row = next(line for line in table.splitlines() if line.startswith("| A "))
    assert "| 60.00 (best 60.00) |" in a_row and "±" not in a_row.split("|")[3] and "74.21 / 0.55 / 0.74 / 75.75" in a_row
    assert a_row.rstrip().endswith("| — |")  # one run: no test against the baseline
    _metrics(tmp_path / "a" / "seed_1", "A", 1, 0.77, cluster=0.6)
    assert cli.main([str(tmp_path / "ce"), str(tmp_path / "a")]) == 0
    a_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| A "))
    assert a_row.rstrip().endswith("| +5.00 (p = 0.07) |")  # Welch: t = 5 / sqrt(2/2 + 2/2) = 3.54, 2 degrees of freedom
    assert cli.main([str(tmp_path / "none")]) == 2


def test_report_keeps_other_recipes_in_rows_of_their_own_against_their_own_baseline(tmp_path, capsys):
    for seed in (0, 1):
        _metrics(tmp_path / "ce" / f"seed_{seed}", "ce", seed, 0.70 + 0.02 * seed, weight_decay_mode="coupled")
        _metrics(tmp_path / "a" / f"seed_{seed}", "A", seed, 0.75 + 0.02 * seed, cluster=0.6, weight_decay_mode="coupled")
        _metrics(tmp_path / "ce-dec" / f"seed_{seed}", "ce", seed, 0.60 + 0.02 * seed, weight_decay_mode="decoupled")
        _metrics(tmp_path / "a-dec" / f"seed_{seed}", "A", seed, 0.61 + 0.02 * seed, cluster=0.5,
                 weight_decay_mode="decoupled")
        _metrics(tmp_path / "a-mcl-keras" / f"seed_{seed}", "A", seed, 0.80, cluster=0.7, criterion="mcl",
                 init="keras")
    assert cli.main([str(tmp_path / d) for d in ("ce", "a", "ce-dec", "a-dec", "a-mcl-keras")]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert {"ce", "A", "ce decoupled-wd", "A decoupled-wd", "A mcl keras-init"} <= set(rows)
    assert "71.00 ± 1.41" in rows["ce"] and "61.00 ± 1.41" in rows["ce decoupled-wd"]  # never averaged together
    assert rows["A"].rstrip().endswith("| +5.00 (p = 0.07) |")  # against the coupled ce
    assert rows["A decoupled-wd"].rstrip().endswith("| +1.00 (p = 0.55) |")  # t = 1 / sqrt(2), 2 d.f.; vs the coupled ce: -9
    assert rows["A mcl keras-init"].rstrip().endswith("| — |")  # no ce with keras-init: no comparison
    assert tables.row_label({"variant": "ce", "criterion": "mcl", "init": "keras", "weight_decay_mode": "coupled"}) \
        == "ce keras-init"
    # A run from before the keys existed is read as the code ran then, as resuming reads it: decoupled decay,
    # Keras's initialisation.
    assert tables.row_label({"variant": "D"}) == "D decoupled-wd keras-init"
    assert tables.row_label({"variant": "D", "weight_decay_mode": "coupled", "init": "torch"}) == "D"
    config = {"variant": "A", "criterion": "mcl", "margin": 1.0, "head": "copy", "weight_decay_mode": "decoupled",
              "init": "keras", "batchnorm": "torch", "augment": True, "last_layer_weight_decay": False}
    assert tables.row_label(config) == "A mcl margin-1 copy-head decoupled-wd keras-init torch-bn augment no-fc3-wd"
    assert tables.baseline_label(config) == "ce decoupled-wd keras-init torch-bn augment no-fc3-wd"
    # an input other than the network's (a smaller image for a CPU campaign) is never averaged with it
    from keras_cwsn.config import DEFAULTS
    assert tables.row_label({**DEFAULTS, "variant": "C", "image_size": 64}) == "C 64px"
    assert tables.row_label({**DEFAULTS, "variant": "ce", "image_size": [96, 128], "normalization": "yuv"}) \
        == "ce 96x128px yuv-norm"


def test_report_says_p_below_001_rather_than_p_zero(tmp_path, capsys):
    for seed, (ce, a) in enumerate(((0.700, 0.800), (0.701, 0.801), (0.702, 0.803))):
        _metrics(tmp_path / "ce" / f"seed_{seed}", "ce", seed, ce)
        _metrics(tmp_path / "a" / f"seed_{seed}", "A", seed, a, cluster=0.6)
    assert cli.main([str(tmp_path / "ce"), str(tmp_path / "a")]) == 0
    a_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| A "))
    assert a_row.rstrip().endswith("| +10.03 (p < 0.01) |")


def test_a_run_with_the_default_settings_gets_the_plain_row():
    """ROW_SETTINGS' defaults are the config's: a run made with today's defaults is the paper's row ("A")."""
    from keras_cwsn.config import DEFAULTS

    for key, (default, _, _) in tables.ROW_SETTINGS.items():
        assert DEFAULTS[key] == default, key
    assert tables.row_label({**DEFAULTS, "variant": "A"}) == "A" and DEFAULTS["init"] == "torch"


def test_rows_read_the_recipe_from_the_datasets_config_file():
    """The bird configs start AlexNet from Glorot's init: there that is the plain row and PyTorch's the suffixed one."""
    from keras_cwsn.config import DEFAULTS, load_config

    bird = load_config(None, "cub42")
    assert tables.row_label(dict(bird, variant="C")) == "C"
    assert tables.row_label(dict(bird, variant="C", init="torch")) == "C torch-init"
    assert tables.row_label({**DEFAULTS, "dataset": "cifar10", "arch": "lenet", "variant": "C", "init": "keras"}) \
        == "C keras-init"
    assert tables.row_label({**DEFAULTS, "dataset": "no-such-dataset", "variant": "A"}) == "A"  # DEFAULTS then


def _row(table, label):
    return next(line for line in table.splitlines() if line.startswith(f"| {label} |"))


def test_a_stand_in_dataset_is_read_against_the_papers_rows_of_the_dataset_it_stands_in_for(tmp_path, capsys):
    """cub42 runs Birdsnap34's protocol: its rows sit beside Birdsnap34's (Table 3; Table 4 for double width)."""
    bird = {"dataset": "cub42", "arch": "alexnet", "init": "keras"}
    for seed in (0, 1):
        _metrics(tmp_path / "ce" / f"seed_{seed}", "ce", seed, 0.50 + 0.02 * seed, **bird)
        _metrics(tmp_path / "c" / f"seed_{seed}", "C", seed, 0.52 + 0.02 * seed, cluster=0.1, **bird)
        _metrics(tmp_path / "a2" / f"seed_{seed}", "A", seed, 0.40, cluster=0.05, double=True, **bird)
    assert cli.main([str(tmp_path / d) for d in ("ce", "c", "a2")]) == 0
    out = capsys.readouterr().out
    single, double = out.split("### cub42 / alexnet (double)")
    assert "paper, birdsnap34 (acc / NMI / purity / class.)" in single
    assert "| 24.84 / 0.51 / 0.25 / 70.7 | -17.70 |" in _row(single, "C")  # 53.00 - 70.70
    assert _row(single, "C").rstrip().endswith("| +2.00 (p = 0.29) |")
    assert "| 22.93 / 0.49 / 0.23 / 59.24 | -19.24 |" in _row(double, "A")
    assert "clusters in the true coarse class" not in out  # no run has the figure: no column


def test_the_hierarchy_figure_gets_a_column_from_metrics_or_from_an_evaluate_file_on_the_same_split(tmp_path, capsys):
    _metrics(tmp_path / "c" / "seed_0", "C", 0, 0.5, cluster=0.1, extra={"coarse_agreement": 0.20})
    _metrics(tmp_path / "c" / "seed_1", "C", 1, 0.5, cluster=0.1)
    with open(tmp_path / "c" / "seed_1" / "evaluate_test.json", "w") as f:
        json.dump({"split": "test", "coarse_agreement": 0.30}, f)
    _metrics(tmp_path / "c" / "seed_2", "C", 2, 0.5, cluster=0.1)
    with open(tmp_path / "c" / "seed_2" / "evaluate_test.json", "w") as f:
        json.dump({"split": "val", "coarse_agreement": 0.99}, f)  # evaluate_test.json made on another split: ignored
    _metrics(tmp_path / "ce" / "seed_0", "ce", 0, 0.5)
    assert cli.main([str(tmp_path / "c"), str(tmp_path / "ce")]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| variant"))
    assert header.split(" | ")[5] == "clusters in the true coarse class %"
    assert _row(table, "C").split(" | ")[5] == "25.00 ± 7.07 (best 30.00)"  # seeds 0 and 1; seed 2 has none
    assert _row(table, "ce").split(" | ")[5] == "—"
    assert all(line.count("|") == header.count("|") for line in table.splitlines() if line.startswith("|"))


def test_restat_batchnorm_makes_the_moving_mean_the_mean_over_every_image_and_refits_the_mapping(cifar_run, capsys):
    import keras

    from keras_cwsn import data
    from keras_cwsn.data import preprocess

    root, run_dir = cifar_run
    clusterer = keras.saving.load_model(os.path.join(run_dir, "clusterer.keras"), compile=False)
    with open(os.path.join(run_dir, "classifier", "assets", "cwsn_model_info.json")) as f:
        stats = json.load(f)["preprocessing"]
    train_split = data.load_split("cifar10", "train", data_dir=str(root / "train_data"), val_per_class=VAL_PER_CLASS,
                                  verbose=False)
    x = np.asarray(preprocess.preprocess(train_split.images, stats["normalization"], stats))
    first_bn = next(layer for layer in clusterer.layers if isinstance(layer, keras.layers.BatchNormalization))
    # The first BN's input comes through layers without BatchNorm or dropout: the same in both modes.
    bn_input = keras.Model(clusterer.input, first_bn.input).predict(x, verbose=0)
    batches = [x[i:i + 7] for i in range(0, len(x), 7)]  # a ragged last batch: weighted by size
    evaluate.restat_batchnorm(clusterer, batches)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(first_bn.moving_mean),
                               bn_input.reshape(-1, bn_input.shape[-1]).mean(axis=0), rtol=1e-4, atol=1e-5)
    assert first_bn.momentum == 0.99  # put back
    assert evaluate.main([run_dir, "--data-dir", str(root / "train_data"), "--split", "val", "--json",
                          "--restat-batchnorm"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["batchnorm_restat"] is True and 0 <= figures["cluster_accuracy"] <= 1
    with pytest.raises(ValueError, match="no BatchNormalization"):
        evaluate.restat_batchnorm(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]), [np.zeros((1, 2))])
