"""The paper's protocol as one call: cluster pretraining, Hungarian evaluation, warm-start fine-tuning.

`run(config, output_dir)` returns the run's figures (also written to `metrics.json`); phases that
finished are never redone, and an interrupted phase resumes from its last completed epoch.
"""

import json
import os
import platform
import shutil
import subprocess
import time

import keras
import numpy as np
import tensorflow as tf

from keras_cwsn import data as data_lib
from keras_cwsn import export as export_lib
from keras_cwsn.config import learning_rate_at, phase_settings
from keras_cwsn.data.preprocess import write_json_atomic
from keras_cwsn.losses import PairwiseKLLoss
from keras_cwsn.metrics import ClusteringMetrics, clustering_report, hungarian_mapping, predict_clusters
from keras_cwsn.models import CLASSIFIER_OUTPUT, build_model, penultimate_model, variant_levels, variant_loss_weights
from keras_cwsn.warmstart import WarmStart

PHASES = ("cluster", "classify")


class RunError(RuntimeError):
    """A run that can't start or go on (finished output folder, diverged training, ...)."""


class StopOnNonFinite(keras.callbacks.Callback):
    """End training with a clear error when an epoch's loss is NaN/inf, before its checkpoint is written.

    Checked once per epoch from the epoch logs: no per-step host sync.
    """

    def __init__(self, phase):
        super().__init__()
        self.phase = phase

    def on_epoch_end(self, epoch, logs=None):
        bad = {k: v for k, v in (logs or {}).items() if k.endswith("loss") and not np.isfinite(v)}
        if bad:
            raise RunError(f"Training diverged in the {self.phase} phase at epoch {epoch + 1}: non-finite {bad}. "
                           f"The last good checkpoint (epoch {epoch}) is kept; lower the learning rate and rerun.")


class EpochLearningRate(keras.callbacks.Callback):
    """Set the phase's step-schedule learning rate at each epoch start and log it."""

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def on_epoch_begin(self, epoch, logs=None):
        self.model.optimizer.learning_rate = learning_rate_at(epoch, self.settings)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(learning_rate_at(epoch, self.settings))


def use_xla(config):
    """`xla: auto` compiles with XLA on a GPU and not on a CPU, where it measured slower (docs/BENCHMARKS.md)."""
    if config["xla"] == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return bool(config["xla"])


def _optimizer(settings):
    return keras.optimizers.SGD(learning_rate=settings["learning_rate"], momentum=settings["momentum"],
                                weight_decay=settings["weight_decay"] or None)


def _callbacks(phase, settings, output_dir, config, quiet, extra=()):
    logs = os.path.join(output_dir, "logs", phase)
    return [
        *extra,
        EpochLearningRate(settings),
        StopOnNonFinite(phase),
        keras.callbacks.CSVLogger(os.path.join(output_dir, f"{phase}_history.csv"), append=True),
        keras.callbacks.TensorBoard(log_dir=logs, write_graph=False, update_freq="epoch"),
        keras.callbacks.BackupAndRestore(os.path.join(output_dir, "backup", phase), delete_checkpoint=False),
    ]


def _save_keras_atomic(model, path):
    tmp = path + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions():
    import scipy
    import sklearn

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "scikit-learn": sklearn.__version__,
            "backend": keras.backend.backend()}


def check_output_dir(output_dir, overwrite):
    """Refuse a finished run's folder unless `overwrite` (then wipe it); an unfinished one is resumed."""
    if os.path.exists(os.path.join(output_dir, "metrics.json")):
        if not overwrite:
            raise RunError(f"{output_dir} holds a finished run (metrics.json); pass --overwrite to replace it "
                           f"or choose another --output-dir.")
        shutil.rmtree(output_dir)
    os.makedirs(output_dir, exist_ok=True)


def _write_config_summary(output_dir, config):
    write_json_atomic(os.path.join(output_dir, "config.json"), config)
    writer = tf.summary.create_file_writer(os.path.join(output_dir, "logs", "config"))
    with writer.as_default():
        tf.summary.text("config", "```\n" + json.dumps(config, indent=2) + "\n```", step=0)
    writer.close()


def _write_projector(output_dir, model, images, labels, info):
    """Penultimate-layer (fc2) embeddings of an evaluation sample, for TensorBoard's Projector."""
    folder = os.path.join(output_dir, "logs", "projector")
    os.makedirs(folder, exist_ok=True)
    embeddings = penultimate_model(model).predict(images, verbose=0)
    np.savetxt(os.path.join(folder, "tensors.tsv"), embeddings, delimiter="\t", fmt="%.5f")
    with open(os.path.join(folder, "metadata.tsv"), "w") as f:
        f.write("fine\tcoarse\n")
        for label in labels:
            f.write(f"{info.fine_names[label]}\t{info.coarse_names[info.fine_to_coarse[label]]}\n")
    with open(os.path.join(folder, "projector_config.pbtxt"), "w") as f:
        f.write('embeddings {\n  tensor_name: "fc2_embedding"\n  tensor_path: "tensors.tsv"\n'
                '  metadata_path: "metadata.tsv"\n}\n')


def run(config, output_dir, overwrite=False, quiet=False):
    """Run the whole protocol for one seed; returns the figures written to `metrics.json`."""
    started = time.time()
    check_output_dir(output_dir, overwrite)
    keras.utils.set_random_seed(config["seed"])
    tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(config["precision"])
    _write_config_summary(output_dir, config)
    verbose = 0 if quiet else "auto"
    variant, jit = config["variant"], use_xla(config)
    timings = {}

    # Data
    load = dict(data_dir=config["data_dir"], val_per_class=config["val_per_class"], synthetic=config["synthetic"],
                verbose=not quiet)
    train = data_lib.load_split(config["dataset"], "train", **load)
    evaluation = data_lib.load_split(config["dataset"], config["eval_split"], **load)
    info = train.info
    stats = data_lib.preprocessing_stats(train, verbose=not quiet)
    eval_images = data_lib.make_pipeline(evaluation, stats, 256, images_only=True)
    train_images = data_lib.make_pipeline(train, stats, 256, images_only=True)
    shape = tuple(info.image_size) + (3,)
    timings["data_s"] = round(time.time() - started, 2)
    results = {"dataset": config["dataset"], "variant": variant, "seed": config["seed"],
               "num_train": len(train), "num_eval": len(evaluation), "eval_split": config["eval_split"]}

    # Phase 1: cluster pretraining (skipped for the cross-entropy baseline, and when already done)
    clusterer, mapping = None, None
    if variant != "ce":
        done_path = os.path.join(output_dir, "cluster_result.json")
        clusterer_path = os.path.join(output_dir, "clusterer.keras")
        if os.path.exists(done_path) and os.path.exists(clusterer_path):
            with open(done_path) as f:
                cluster_result = json.load(f)
            clusterer = keras.saving.load_model(clusterer_path)
        else:
            t0 = time.time()
            settings = phase_settings(config, "cluster")
            clusterer = build_model(config["arch"], variant, info.num_fine, info.num_coarse, shape, config["double"])
            weights = variant_loss_weights(variant)
            clusterer.compile(optimizer=_optimizer(settings),
                              loss={name: PairwiseKLLoss(margin=config["margin"]) for name in weights},
                              loss_weights=weights, jit_compile=jit,
                              steps_per_execution=config["steps_per_execution"])
            levels = variant_levels(variant)
            train_ds = data_lib.make_pipeline(train, stats, settings["batch_size"], levels, training=True,
                                              seed=config["seed"], augment=config["augment"])
            monitor = ClusteringMetrics(eval_images, evaluation.labels, output="fine_fc3", prefix="val_",
                                        every=config["metrics_every"])
            clusterer.fit(train_ds, epochs=settings["epochs"], verbose=verbose,
                          callbacks=_callbacks("cluster", settings, output_dir, config, quiet, extra=[monitor]))
            train_clusters = predict_clusters(clusterer, train_images, "fine_fc3")
            mapping = hungarian_mapping(train.labels, train_clusters, num_clusters=info.num_fine,
                                        num_classes=info.num_fine)
            eval_clusters = predict_clusters(clusterer, eval_images, "fine_fc3")
            cluster_result = {
                "mapping": mapping.tolist(),
                "train": clustering_report(train.labels, train_clusters, mapping),
                "eval": clustering_report(evaluation.labels, eval_clusters, mapping),
                "seconds": round(time.time() - t0, 2),
                "epochs": settings["epochs"],
            }
            _save_keras_atomic(clusterer, clusterer_path)
            write_json_atomic(done_path, cluster_result)  # written last: marks the phase finished
        mapping = np.asarray(cluster_result["mapping"])
        results.update(cluster_result["eval"])
        results["train_cluster_accuracy"] = cluster_result["train"]["cluster_accuracy"]
        timings["cluster_s"] = cluster_result["seconds"]
        if not quiet:
            print(f"[cluster] {config['eval_split']}: " + ", ".join(f"{k} {v:.4f}" for k, v in cluster_result["eval"].items()))

    # Phase 2: classification, warm-started from the clusterer (or from scratch for `ce`)
    t0 = time.time()
    settings = phase_settings(config, "classify")
    classifier = build_model(config["arch"], "ce", info.num_fine, info.num_coarse, shape, config["double"])
    classifier.compile(optimizer=_optimizer(settings),
                       loss={CLASSIFIER_OUTPUT: keras.losses.SparseCategoricalCrossentropy()},
                       metrics={CLASSIFIER_OUTPUT: ["accuracy"]}, jit_compile=jit,
                       steps_per_execution=config["steps_per_execution"])
    levels = variant_levels("ce")
    train_ds = data_lib.make_pipeline(train, stats, settings["batch_size"], levels, training=True,
                                      seed=config["seed"] + 1, augment=config["augment"])
    eval_ds = data_lib.make_pipeline(evaluation, stats, 256, levels)
    extra = [WarmStart(clusterer, head=config["head"], mapping=mapping)] if clusterer is not None else []
    classifier.fit(train_ds, epochs=settings["epochs"], validation_data=eval_ds, verbose=verbose,
                   callbacks=_callbacks("classify", settings, output_dir, config, quiet, extra=extra))
    probabilities = classifier.predict(data_lib.make_pipeline(evaluation, stats, 256, images_only=True), verbose=0)
    predicted = np.argmax(probabilities[CLASSIFIER_OUTPUT], axis=-1)
    results["classification_accuracy"] = float(np.mean(predicted == evaluation.labels))
    timings["classify_s"] = round(time.time() - t0, 2)
    if clusterer is not None:
        results["warm_start"] = {"head": config["head"], "layers": extra[0].copied}

    # Outputs
    sample = min(config["embedding_sample"], len(evaluation))
    if sample:
        sample_images = data_lib.make_pipeline(evaluation, stats, 256, images_only=True).unbatch().take(sample).batch(256)
        _write_projector(output_dir, clusterer or classifier, sample_images, evaluation.labels[:sample], info)
    export_lib.export_classifier(
        classifier, os.path.join(output_dir, "classifier"), info.fine_names, info.image_size, stats,
        metadata={"dataset": config["dataset"], "variant": variant, "figures": dict(results)})
    timings["total_s"] = round(time.time() - started, 2)
    results.update(timings=timings, config=config, versions=versions(), git_commit=_git_commit(),
                   xla=jit, class_names=list(info.fine_names))
    write_json_atomic(os.path.join(output_dir, "metrics.json"), results)  # written last: the run is finished
    shutil.rmtree(os.path.join(output_dir, "backup"), ignore_errors=True)
    if not quiet:
        figures = {k: results[k] for k in ("cluster_accuracy", "nmi", "purity", "classification_accuracy") if k in results}
        print(f"[done] {output_dir}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()) +
              f" ({timings['total_s']:.0f} s)")
    return results


FIGURES = ("cluster_accuracy", "nmi", "purity", "classification_accuracy")


def summarize(per_seed):
    """Mean, std and best (by classification accuracy, as the paper's best of 5) over seeds."""
    summary = {"seeds": [r["seed"] for r in per_seed], "per_seed": {}}
    for key in FIGURES:
        values = [r[key] for r in per_seed if key in r]
        if values:
            summary["per_seed"][key] = values
            summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "best": float(np.max(values))}
    best = max(per_seed, key=lambda r: r["classification_accuracy"])
    summary["best_seed"] = best["seed"]
    return summary


def run_seeds(config, seeds, output_dir, overwrite=False, quiet=False):
    """Run one seed (in `output_dir`) or several (in `output_dir/seed_<n>`, plus `summary.json`)."""
    if len(seeds) == 1:
        return run(dict(config, seed=seeds[0]), output_dir, overwrite, quiet)
    per_seed = [run(dict(config, seed=s), os.path.join(output_dir, f"seed_{s}"), overwrite, quiet) for s in seeds]
    summary = summarize(per_seed)
    write_json_atomic(os.path.join(output_dir, "summary.json"), summary)
    if not quiet:
        for key in FIGURES:
            if key in summary:
                s = summary[key]
                print(f"[summary] {key}: {s['mean']:.4f} ± {s['std']:.4f} (best {s['best']:.4f})")
    return summary
