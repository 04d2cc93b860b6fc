"""Evaluate a run's exported classifier and clusterer on any folder of class sub-folders.

    python -m keras_cwsn.evaluate RUN --data-dir DIR --split test [--json] [--confusion] [--probe A,B]
                                  [--restat-batchnorm]

The classifier is the SavedModel (raw uint8 images in, preprocessing inside); the clusterer is
`clusterer.keras`, fed with the run's own training statistics, and its clusters are mapped to
classes with the Hungarian mapping found on the run's training split (`cluster_result.json`).
`--confusion` adds the class x mapped-cluster counts, to tell merged clusters from scattered errors;
`--probe A,B` then asks whether the clusterer's hidden layers still tell two merged classes apart.
A run whose clustering phase has finished can be evaluated while its classifier still trains: the
figures are then the clusterer's alone.
"""

import argparse
import functools
import json
import os
import sys

from keras_cwsn.constants import CLUSTER_OUTPUT, MODEL_INFO_ASSET, PREDICT_BATCH
from keras_cwsn.errors import print_error


def evaluate_run(run_dir, data_dir=None, split="test", batch_size=PREDICT_BATCH, confusion=False, probe=None,
                 restat_batchnorm=False):
    """Classification accuracy and clustering figures of a run on a split; returns a dict.

    A run still in its classification phase gives its clusterer's figures alone (no
    "classification_accuracy"); a run with neither a classifier nor a finished clusterer is refused.

    With `confusion`, also "confusion": {"classes": names, "counts": [[...]]}, rows the true class
    and columns the class each cluster is mapped to (needs the run's clusterer).
    With `probe` (two class names), also "probe": {"classes": [a, b], "layers": {layer: {"train": acc,
    split: acc}}}: a linear probe of the two classes on each hidden fc layer of the clusterer
    (`metrics.pair_separability`), fitted on the run's training split.
    With `restat_batchnorm`, the clusterer's BatchNorm statistics are first re-estimated on the run's
    training split (`restat_batchnorm`) and its mapping refitted there: "batchnorm_restat" is then True.
    """
    from keras_cwsn import data as data_lib
    from keras_cwsn.training.inputs import load_training_split
    from keras_cwsn.training.records import table_snapshot

    clusterer_done = _check_run_folder(run_dir, confusion=confusion, probe=probe, restat=restat_batchnorm)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    config["hierarchy"] = table_snapshot(run_dir) or config.get("hierarchy")  # the table as it trained, if kept
    split_data = data_lib.load_split(data_lib.dataset_spec(config), split, data_dir=data_dir or config["data_dir"],
                                     val_per_class=config["val_per_class"], synthetic=config["synthetic"],
                                     every_class=False)  # a folder with some of the classes is fine to evaluate on
    _check_class_names(run_dir, split_data.info.fine_names)
    pair = _class_ids(probe, split_data.info.fine_names) if probe else None
    load_training = functools.cache(lambda: load_training_split(config, data_dir))  # loaded once, if at all
    stats = run_stats(run_dir, config, load_training)
    figures = {"run": run_dir, "dataset": config["dataset"], "variant": config["variant"], "split": split,
               "num_examples": len(split_data)}
    classifier_dir = os.path.join(run_dir, "classifier")
    if os.path.exists(classifier_dir):
        figures["classification_accuracy"] = _classifier_accuracy(classifier_dir, split_data, batch_size)
    if clusterer_done:
        clusterer, clusters, mapping = _clusters(run_dir, split_data, stats, batch_size,
                                                 load_training() if restat_batchnorm else None)
        figures.update(_cluster_figures(split_data, clusters, mapping, confusion))
        if restat_batchnorm:
            figures["batchnorm_restat"] = True
        if pair:
            figures["probe"] = _probe(clusterer, pair, load_training(), stats, split_data, batch_size)
    return figures


def _check_run_folder(run_dir, confusion=False, probe=None, restat=False):
    """Refuse a folder that can't answer what is asked; returns whether its clusterer is finished."""
    clusterer_done = all(os.path.exists(os.path.join(run_dir, name))
                         for name in ("clusterer.keras", "cluster_result.json"))  # written in this order
    if not os.path.exists(os.path.join(run_dir, "config.json")):
        raise FileNotFoundError(f"{run_dir} is not a run folder: config.json is missing.")
    if not os.path.exists(os.path.join(run_dir, "classifier")) and not clusterer_done:
        raise FileNotFoundError(f"{run_dir} is not a finished run: classifier/ is missing, and so is a finished "
                                "clusterer (clusterer.keras and cluster_result.json).")
    for wanted, flag in ((confusion, "--confusion"), (probe, "--probe"), (restat, "--restat-batchnorm")):
        if wanted and not clusterer_done:
            raise FileNotFoundError(f"{run_dir} has no finished clusterer (clusterer.keras and cluster_result.json): "
                                    f"{flag} needs a clusterer.")
    return clusterer_done


def _trained_class_names(run_dir):
    """The class names in the run's id order, from metrics.json or the exported classifier (None if neither)."""
    for path, key in ((os.path.join(run_dir, "metrics.json"), "class_names"),
                      (os.path.join(run_dir, "classifier", "assets", MODEL_INFO_ASSET), "class_names")):
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f).get(key)
    return None


def _check_class_names(run_dir, names):
    """Refuse labels that would not be the run's: class ids are the hierarchy table's row order when it trained."""
    trained = _trained_class_names(run_dir)
    if trained is not None and list(trained) != list(names):
        what = "the same classes in another order" if sorted(trained) == sorted(names) else "other classes"
        raise ValueError(f"{run_dir} was trained on {len(trained)} classes, and its dataset now lists {what} "
                         f"({len(names)}): has its hierarchy table changed since? Evaluate with the table it "
                         f"trained with (the run keeps a copy as hierarchy_table.tsv/.csv from this version on).")


def _classifier_accuracy(classifier_dir, split_data, batch_size):
    """The exported classifier's accuracy, fed raw uint8 images as a client would."""
    import numpy as np
    import tensorflow as tf

    serve = tf.saved_model.load(classifier_dir).signatures["serving_default"]
    predicted = np.concatenate([
        serve(images=tf.cast(images, tf.uint8))["class_ids"].numpy()
        for images in split_data.dataset.map(lambda x, y: x).batch(batch_size)
    ])
    return float(np.mean(predicted == split_data.labels))


def _clusters(run_dir, split_data, stats, batch_size, restat_on=None):
    """(the clusterer, each image's cluster, the run's cluster -> class mapping); with `restat_on` (the
    training split), BatchNorm statistics re-estimated there and the mapping refitted there."""
    import keras
    import numpy as np

    import keras_cwsn.losses  # noqa: F401  registers PairwiseKLLoss
    from keras_cwsn import data as data_lib
    from keras_cwsn.metrics import hungarian_mapping, predict_clusters

    with open(os.path.join(run_dir, "cluster_result.json")) as f:
        mapping = np.asarray(json.load(f)["mapping"])
    clusterer = keras.saving.load_model(os.path.join(run_dir, "clusterer.keras"), compile=False)
    if restat_on is not None:
        training_images = data_lib.make_pipeline(restat_on, stats, batch_size, images_only=True)
        restat_batchnorm(clusterer, training_images)
        mapping = hungarian_mapping(restat_on.labels, predict_clusters(clusterer, training_images, CLUSTER_OUTPUT),
                                    num_clusters=len(mapping))
    images = data_lib.make_pipeline(split_data, stats, batch_size, images_only=True)
    return clusterer, predict_clusters(clusterer, images, CLUSTER_OUTPUT), mapping


def restat_batchnorm(model, batches):
    """Replace every BatchNorm layer's moving statistics by their average over `batches` under the model's
    present weights (batch-size weighted: the moving mean becomes the mean over every image).

    A diagnostic: Keras's momentum (0.99) averages over the last few hundred steps, so a model trained
    for a few hundred steps in all (an AlexNet epoch on 1,196 bird images is 9 clustering steps) keeps
    statistics of earlier weights and of the initialisation; this asks what the weights give without that lag.
    """
    import keras

    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers:
        raise ValueError("The model has no BatchNormalization layer: there are no statistics to re-estimate.")
    momenta, seen = [layer.momentum for layer in layers], 0
    try:
        for batch in batches:
            size = int(keras.ops.shape(batch)[0])
            for layer in layers:  # new = old * seen / (seen + size) + batch * size / (seen + size)
                layer.momentum = seen / (seen + size)
            model(batch, training=True)
            seen += size
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


def _cluster_figures(split_data, clusters, mapping, confusion):
    from keras_cwsn.metrics import cluster_confusion, hierarchy_cluster_report

    figures = hierarchy_cluster_report(split_data.labels, clusters, mapping, split_data.info.fine_to_coarse)
    if confusion:
        names = list(split_data.info.fine_names)
        counts = cluster_confusion(split_data.labels, clusters, mapping, num_classes=len(names))
        figures["confusion"] = {"classes": names, "counts": counts.tolist()}
    return figures


def _class_ids(names, known):
    known = list(known)
    if len(names) != 2 or names[0] == names[1]:
        raise ValueError(f"--probe takes two different class names; received {list(names)}.")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"Unknown class {', '.join(map(repr, unknown))} for --probe; classes: {', '.join(known)}.")
    return [known.index(n) for n in names]


def _probe(clusterer, pair, training_split, stats, split_data, batch_size):
    """Linear separability of two classes on each hidden fc layer (the ReLU outputs of rank 2)."""
    import dataclasses

    import keras
    import numpy as np
    import tensorflow as tf

    from keras_cwsn import data as data_lib
    from keras_cwsn.metrics import pair_separability

    wanted = tf.constant(pair, tf.int64)
    hidden = [layer.name for layer in clusterer.layers if layer.name.endswith("_relu") and len(layer.output.shape) == 2]
    features = keras.Model(clusterer.input, [clusterer.get_layer(name).output for name in hidden])
    sides = {}
    for side, split in (("train", training_split), ("eval", split_data)):
        keep = np.isin(split.labels, pair)
        dataset = split.dataset.filter(lambda image, label: tf.reduce_any(tf.equal(label, wanted))).apply(
            tf.data.experimental.assert_cardinality(int(keep.sum())))  # so predict knows where it ends
        subset = dataclasses.replace(split, dataset=dataset, labels=split.labels[keep],
                                     images=None if split.images is None else split.images[keep])
        outputs = features.predict(data_lib.make_pipeline(subset, stats, batch_size, images_only=True), verbose=0)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        sides[side] = ([np.asarray(o) for o in outputs], subset.labels == pair[1])
    names = [split_data.info.fine_names[i] for i in pair]
    layers = {}
    for i, name in enumerate(hidden):
        train_acc, eval_acc = pair_separability(sides["train"][0][i], sides["train"][1],
                                                sides["eval"][0][i], sides["eval"][1])
        layers[name] = {"train": train_acc, split_data.split: eval_acc}
    return {"classes": names, "layers": layers}


def run_stats(run_dir, config, load_training):
    """The run's preprocessing statistics: from its exported classifier, its preprocessing.json, or, for a
    run that has written neither yet (an older run still in its classification phase), recomputed from its
    training split as the run loaded it (`load_training()`)."""
    from keras_cwsn import data as data_lib
    asset = os.path.join(run_dir, "classifier", "assets", MODEL_INFO_ASSET)
    if os.path.exists(asset):
        with open(asset) as f:
            return json.load(f)["preprocessing"]
    saved = os.path.join(run_dir, "preprocessing.json")
    if os.path.exists(saved):
        with open(saved) as f:
            return json.load(f)
    return data_lib.preprocessing_stats(load_training(), verbose=False)


def confusion_text(confusion):
    """The confusion as a table plus, per class, its share in its own cluster and its largest leak."""
    import numpy as np

    names, counts = confusion["classes"], np.asarray(confusion["counts"])
    width = max(6, *(len(n) for n in names))
    lines = ["rows: true class; columns: the class each cluster is mapped to",
             " " * width + "".join(f"{n[:width]:>{width + 1}}" for n in names)]
    lines += [f"{name:<{width}}" + "".join(f"{c:>{width + 1}}" for c in row) for name, row in zip(names, counts)]
    lines.append("")
    for i, name in enumerate(names):
        total = counts[i].sum()
        if total == 0:
            lines.append(f"{name:<{width}} no examples")
            continue
        others = counts[i].copy()
        others[i] = -1
        j = int(others.argmax())
        lines.append(f"{name:<{width}} {counts[i, i] / total:6.1%} in its own cluster; largest leak: "
                     f"{names[j]} {counts[i, j] / total:.1%}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m keras_cwsn.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run folder whose classifier/ or clusterer (clusterer.keras, "
                                    "cluster_result.json) is finished")
    parser.add_argument("--data-dir", default=None, help="folder with <split>/<class>/*; default: the run's")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--confusion", action="store_true",
                        help="also the class x mapped-cluster counts (rows: true class), to spot merged clusters")
    parser.add_argument("--probe", default=None, metavar="A,B",
                        help="two class names: how well a linear probe on each hidden fc layer of the clusterer "
                             "tells them apart (e.g. two classes --confusion shows in one cluster)")
    parser.add_argument("--restat-batchnorm", action="store_true",
                        help="first re-estimate the clusterer's BatchNorm statistics on the run's training split and "
                             "refit its mapping there (a diagnostic of moving averages left behind by the weights)")
    args = parser.parse_args(argv)
    from keras_cwsn.optional import import_tensorflow_quietly

    import_tensorflow_quietly()
    try:
        probe = [name.strip() for name in args.probe.split(",")] if args.probe else None
        figures = evaluate_run(args.run, args.data_dir, args.split, confusion=args.confusion, probe=probe,
                               restat_batchnorm=args.restat_batchnorm)
    except (OSError, ValueError) as e:
        print_error(e)
        return 2
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{figures['run']} on {figures['split']} ({figures['num_examples']} images)")
        for key in ("classification_accuracy", "cluster_accuracy", "nmi", "purity"):
            if key in figures:
                print(f"  {key:24s} {figures[key]:.4f}")
        if "confusion" in figures:
            print(confusion_text(figures["confusion"]))
        if "probe" in figures:
            a, b = figures["probe"]["classes"]
            print(f"linear probe, {a} vs {b} (fitted on the training split; accuracy, chance about 0.5):")
            for layer, scores in figures["probe"]["layers"].items():
                print(f"  {layer:24s} " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
