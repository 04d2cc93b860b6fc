"""The paper's protocol as one call: cluster pretraining, Hungarian evaluation, warm-start fine-tuning.

`run(config, output_dir)` returns the run's figures (also written to `metrics.json`); resuming a
killed run is described in `keras_cwsn.training.resume`.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import time

import keras
import numpy as np

from keras_cwsn.atomic import read_json, write_json_atomic
from keras_cwsn.config import phase_settings
from keras_cwsn.constants import CLUSTER_OUTPUT, FIGURES, LAST_LAYER, PREDICT_BATCH
from keras_cwsn.errors import RunError
from keras_cwsn.clustering_callback import ClusteringMetrics
from keras_cwsn.metrics import hierarchy_cluster_report, hungarian_mapping, predict_clusters
from keras_cwsn.models import build_model
from keras_cwsn.variants import CLASSIFIER_OUTPUT, CLASSIFIER_VARIANT, variant_levels
from keras_cwsn.optional import tensorflow_available
from keras_cwsn.training import log, records
from keras_cwsn.training import resume as resume_policy
from keras_cwsn.training import workers
from keras_cwsn.training.callbacks import StepLearningRate, EpochTimer, ResumableWarmStart, StopOnNonFinite
from keras_cwsn.training.checkpoint import Checkpoint
from keras_cwsn.training.inputs import load_run_data, steps_per_epoch, training_data
from keras_cwsn.training.recipe import build_optimizer, compile_model, steps_per_execution, use_xla
from keras_cwsn.training.seeds import derived_seed, seed_everything


@dataclasses.dataclass
class Run:
    """What every step of one run needs: its config, folder, device strategy and data."""

    config: dict
    output_dir: str
    strategy: object  # a tf.distribute.Strategy, or None without TensorFlow
    quiet: bool
    data: object = None
    fresh: tuple = None  # (folder existed, its entries) before a fresh start; None when resuming
    results: dict = None  # the figures so far (metrics.json once finished)
    timings: dict = None
    started: float = None

    @property
    def info(self):
        return self.data.info

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def say(self, line):
        if not self.quiet:
            print(line, flush=True)


def run(config, output_dir, overwrite=False, quiet=False, resume=True):
    """Run the whole protocol for one seed; returns the figures written to `metrics.json`.

    Args:
        config: dict. A validated config (`keras_cwsn.config`).
        output_dir: str. The run's folder; an unfinished run there is resumed.
        overwrite: bool. Replace a run (finished or not) in `output_dir`. Defaults to False.
        quiet: bool. No progress output. Defaults to False.
        resume: bool. Continue an unfinished run in `output_dir`; False refuses it. Defaults to True.
    """
    started = time.time()
    ctx = _start(config, output_dir, overwrite, quiet, resume)
    with resume_policy.undone_if_nothing_trained(ctx.output_dir, ctx.fresh):  # no stub runs in TensorBoard
        begin(ctx, load_run_data(config, quiet), started)
        clusterer = mapping = None
        if config["variant"] != CLASSIFIER_VARIANT:  # phase 1: cluster pretraining, then the Hungarian mapping
            clusterer, mapping = cluster_phase(ctx)
        t0 = time.time()  # phase 2: classification, warm-started from the clusterer (from scratch for `ce`)
        classifier, warm = classify_phase(ctx, clusterer, mapping)
        return conclude(ctx, classifier, clusterer, warm, t0)


def begin(ctx, data, started):
    """Hand the run its data, log its header, write config.json and open its figures (all before training)."""
    config = ctx.config
    ctx.data, ctx.started = data, started
    ctx.timings = {"data_s": round(time.time() - started, 2)}
    for line in log.header(config, data, ctx.output_dir):
        ctx.say(line)
    with records.writing("the run's config", ctx.output_dir):  # once the data is read: a run in TensorBoard from now
        records.write_config(ctx.output_dir, config)
    ctx.results = {"dataset": config["dataset"], "variant": config["variant"], "seed": config["seed"],
                   "num_train": len(data.train), "num_eval": len(data.evaluation), "eval_split": data.eval_split,
                   "data_read": log.data_line(config, data)}


def conclude(ctx, classifier, clusterer, warm, classify_started):
    """After the classification phase: the held-out accuracy, the models and records, metrics.json."""
    results = ctx.results
    probabilities = classifier.predict(ctx.data.images("eval"), batch_size=PREDICT_BATCH, verbose=0)
    predicted = np.argmax(probabilities[CLASSIFIER_OUTPUT], axis=-1)
    results["classification_accuracy"] = float(np.mean(predicted == ctx.data.evaluation.labels))
    ctx.timings["classify_s"] = round(time.time() - classify_started, 2)
    if warm is not None:
        results["warm_start"] = {"head": ctx.config["head"], "layers": list(warm.copied)}
    write_outputs(ctx, classifier, clusterer, results)
    ctx.timings["total_s"] = round(time.time() - ctx.started, 2)
    return finish(ctx, results, ctx.timings)


def _start(config, output_dir, overwrite, quiet, resume_ok):
    """Device strategy, output folder (resume or not), seeds and precision: everything before the data."""
    strategy = _make_strategy(config["strategy"])  # first: multi-worker needs it before other ops
    if strategy is not None:
        from keras_cwsn import distribute

        output_dir = distribute.worker_output_dir(output_dir)
    existed = os.path.isdir(output_dir)
    resuming = resume_policy.check_output_dir(output_dir, overwrite, resume_ok)
    fresh = None if resuming else (existed, set(os.listdir(output_dir)))
    changes = resume_policy.check_resume_config(output_dir, config) if resuming else {}
    if changes:
        print("[resume] settings changed since the run started: " +
              "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()), flush=True)
    seed_everything(config["seed"])
    keras.mixed_precision.set_global_policy(config["precision"])
    return Run(config, output_dir, strategy, quiet, fresh=fresh)


def _make_strategy(name):
    if keras.backend.backend() != "tensorflow":
        if name not in ("auto", "one"):
            raise RunError(f"--strategy {name} needs the TensorFlow backend (tf.distribute); on "
                           f"{keras.backend.backend()} use --strategy auto.")
        return None
    from keras_cwsn import distribute

    return distribute.make_strategy(name)


def cluster_phase(ctx):
    """Train the clusterer (or load the one a finished phase left); returns it and its cluster -> class mapping."""
    found = finished_clusterer(ctx)
    if found is None:
        t0 = time.time()
        clusterer, settings, monitor = new_clusterer(ctx)
        fit_phase(ctx, "cluster", clusterer, settings, variant_levels(ctx.config["variant"]), extra=[monitor])
        found = clusterer, save_clusterer(ctx, clusterer, settings, t0)
    clusterer, cluster_result = found
    return clusterer, record_clustering(ctx, cluster_result)


def finished_clusterer(ctx):
    """(clusterer, cluster_result) of a clustering phase that finished before, or None."""
    out = ctx.output_dir
    done_path, clusterer_path = os.path.join(out, "cluster_result.json"), os.path.join(out, "clusterer.keras")
    if not workers.agree_min(ctx.strategy, int(os.path.exists(done_path) and os.path.exists(clusterer_path))):
        return None  # every worker agrees
    with open(done_path) as f:
        cluster_result = json.load(f)
    ctx.say(f"[resume] cluster phase: finished before, loaded {clusterer_path}")
    return keras.saving.load_model(clusterer_path), cluster_result


def new_clusterer(ctx):
    """A fresh compiled clusterer, its phase settings, and the callback that logs its per-epoch figures."""
    config, data, settings = ctx.config, ctx.data, phase_settings(ctx.config, "cluster")
    clusterer = _build(ctx, config["variant"], settings, "cluster")
    sample_x, sample_y = data.train_sample(config["metrics_sample"], config["seed"])
    monitor = ClusteringMetrics(data.images("eval"), data.evaluation.labels, output=CLUSTER_OUTPUT, prefix="val_",
                                every=config["metrics_every"], mapping_images=sample_x, mapping_labels=sample_y)
    return clusterer, settings, monitor


def save_clusterer(ctx, clusterer, settings, t0):
    """Map clusters to classes on the training split, write the clusterer and mark the phase finished."""
    data, out = ctx.data, ctx.output_dir
    train_clusters = predict_clusters(clusterer, data.images("train"), CLUSTER_OUTPUT)
    mapping = hungarian_mapping(data.train.labels, train_clusters, num_clusters=ctx.info.num_fine,
                                num_classes=ctx.info.num_fine)
    eval_clusters = predict_clusters(clusterer, data.images("eval"), CLUSTER_OUTPUT)
    fine_to_coarse = ctx.info.fine_to_coarse  # with the coarse figures: do the clusters follow the hierarchy?
    cluster_result = {"mapping": mapping.tolist(), "epochs": settings["epochs"],
                      "train": hierarchy_cluster_report(data.train.labels, train_clusters, mapping, fine_to_coarse),
                      "eval": hierarchy_cluster_report(data.evaluation.labels, eval_clusters, mapping, fine_to_coarse),
                      "seconds": round(time.time() - t0, 2)}
    clusterer_path = os.path.join(out, "clusterer.keras")
    with records.writing("the clusterer", clusterer_path):
        records.save_keras_atomic(clusterer, clusterer_path)
        write_json_atomic(os.path.join(out, "preprocessing.json"), data.stats)  # evaluate reads the clusterer with it
        write_json_atomic(os.path.join(out, "cluster_result.json"), cluster_result)  # written last: the phase is done
    if workers.num_workers(ctx.strategy) == 1:  # other workers may still need it to agree on a resume point
        shutil.rmtree(os.path.join(out, "backup", "cluster"), ignore_errors=True)
    return cluster_result


def record_clustering(ctx, cluster_result):
    """Put the clustering figures into the run's results; returns the cluster -> class mapping."""
    ctx.results.update(cluster_result["eval"], train_cluster_accuracy=cluster_result["train"]["cluster_accuracy"])
    ctx.timings["cluster_s"] = cluster_result["seconds"]
    ctx.say(f"[cluster] {ctx.data.eval_split}: " + ", ".join(f"{k} {v:.4f}" for k, v in cluster_result["eval"].items() if v is not None))
    return np.asarray(cluster_result["mapping"])


def classify_phase(ctx, clusterer, mapping):
    """Fine-tune a classifier, warm-started from `clusterer` (None: from scratch, the `ce` baseline)."""
    classifier, warm, settings = new_classifier(ctx, clusterer, mapping)
    levels = variant_levels(CLASSIFIER_VARIANT)
    fit_phase(ctx, "classify", classifier, settings, levels, extra=[warm] if warm else [],
              validation_data=ctx.data.labeled_eval(levels))
    return classifier, warm


def new_classifier(ctx, clusterer, mapping):
    """A fresh compiled classifier, the warm start that fills it from `clusterer` (None for `ce`), its settings."""
    settings = phase_settings(ctx.config, "classify")
    classifier = _build(ctx, CLASSIFIER_VARIANT, settings, "classify")
    warm = None
    if clusterer is not None:
        warm = ResumableWarmStart(clusterer, ctx.config["head"], mapping,
                                  os.path.join(ctx.output_dir, "warm_start.json"),
                                  resumed=_resume_epoch(ctx, "classify") > 0)
    return classifier, warm, settings


def _build(ctx, variant, settings, phase):
    """A freshly initialised, compiled model of `variant` for `phase` (seeded by the run and the phase)."""
    replicas = workers.num_replicas(ctx.strategy)
    if settings["batch_size"] % replicas:
        raise RunError(f"The {phase} batch size {settings['batch_size']} can't be split evenly across {replicas} "
                       f"replicas: choose a multiple of {replicas}.")
    seed_everything(derived_seed(ctx.config["seed"], phase))
    info, config = ctx.info, ctx.config
    steps = steps_per_epoch(len(ctx.data.train), settings["batch_size"])
    with ctx.scope():
        model = build_model(config["arch"], variant, info.num_fine, info.num_coarse,
                            tuple(info.image_size) + (3,), config["double"], init=config["init"],
                            batchnorm=config["batchnorm"], alexnet_bn=config["alexnet_bn"])
        optimizer = build_optimizer(settings, config["weight_decay_mode"])
        if not config["last_layer_weight_decay"]:
            optimizer.exclude_from_weight_decay(var_list=model.get_layer(LAST_LAYER).trainable_weights)
        return compile_model(model, variant, optimizer,
                             criterion=config["criterion"],
                             margin=config["margin"], jit_compile=use_xla(config, replicas), strategy=ctx.strategy,
                             steps_per_execution=steps_per_execution(config["steps_per_execution"], steps, replicas))


def _resume_epoch(ctx, phase):
    return resume_policy.read_resume_epoch(os.path.join(ctx.output_dir, "backup", phase), ctx.strategy)


def fit_phase(ctx, phase, model, settings, levels, extra=(), validation_data=None):
    """Fit one phase from its last checkpoint (or epoch 0) to its last epoch, with the protocol's callbacks."""
    bars = not ctx.quiet and log.progress_bars()
    lines = [] if ctx.quiet or bars else [log.EpochLine(phase, settings["epochs"], ctx.data.eval_split)]
    first, callbacks = phase_callbacks(ctx, phase, model, settings, extra, lines)
    if callbacks is None:
        return
    data, epochs = ctx.data, settings["epochs"]
    batches, steps = training_data(data.train, data.stats, settings["batch_size"], levels, ctx.config, phase, first,
                                   epochs, preprocessed=data.train_x)
    model.fit(batches, epochs=epochs, initial_epoch=first, steps_per_epoch=steps, validation_data=validation_data,
              validation_batch_size=PREDICT_BATCH if isinstance(validation_data, tuple) else None,
              shuffle=False, verbose="auto" if bars else 0, callbacks=callbacks)  # each epoch is ordered already


def phase_callbacks(ctx, phase, model, settings, extra=(), lines=()):
    """Where a phase resumes, and the protocol's callbacks (`lines`: a redirected log's epoch lines) for its
    epochs; None when every epoch ran before an interruption, and its last checkpoint is restored instead."""
    backup_dir = os.path.join(ctx.output_dir, "backup", phase)
    history = os.path.join(ctx.output_dir, f"{phase}_history.csv")
    first, epochs = _resume_epoch(ctx, phase), settings["epochs"]
    checkpoint = Checkpoint(backup_dir, phase, first)
    if first:
        print(f"[resume] {phase} phase: resuming after epoch {first} of {epochs} from {backup_dir}", flush=True)
        resume_policy.note_resume(ctx.output_dir, phase, first, epochs)
    resume_policy.truncate_history(history, first)
    if first >= epochs:  # every epoch ran before the interruption: only the weights are needed
        checkpoint.restore(model, first)
        return first, None
    ctx.say(log.phase_line(phase, settings, ctx.config["variant"], first))
    return first, [StopOnNonFinite(phase, backup_dir), *extra, StepLearningRate(settings), EpochTimer(), *lines,
                   keras.callbacks.CSVLogger(history, append=True), *_tensorboard(ctx, phase), checkpoint]


def _tensorboard(ctx, phase):
    if not tensorflow_available():
        return []
    return [keras.callbacks.TensorBoard(log_dir=os.path.join(ctx.output_dir, "logs", phase), write_graph=False,
                                        update_freq="epoch")]


def write_outputs(ctx, classifier, clusterer, results):
    """classifier.keras, preprocessing.json, projector embeddings, and the SavedModel (chief, TensorFlow only)."""
    config, data, out = ctx.config, ctx.data, ctx.output_dir
    with records.writing("the classifier", out):
        records.save_keras_atomic(classifier, os.path.join(out, "classifier.keras"))
        write_json_atomic(os.path.join(out, "preprocessing.json"), data.stats)  # what `keras_cwsn.export` needs
    sample = min(config["embedding_sample"], len(data.evaluation))
    if sample:  # predict is collective under a multi-worker strategy: every worker takes part
        with records.writing("the embedding projector", os.path.join(out, "logs", "projector")):
            records.write_projector(out, clusterer or classifier, _first_images(data, sample),
                                    data.evaluation.labels[:sample], ctx.info)
    if ctx.strategy is not None:
        from keras_cwsn import distribute

        if not distribute.is_chief():
            return
    if not tensorflow_available():
        ctx.say("[export] no TensorFlow here: the SavedModel is not written; run `python -m keras_cwsn.export "
                f"{out}` where TensorFlow is installed")
        return
    from keras_cwsn import export as export_lib

    export_path = os.path.join(out, "classifier")
    with records.writing("the exported classifier", export_path):
        export_lib.export_classifier(classifier, export_path, ctx.info.fine_names, ctx.info.image_size, data.stats,
                                     metadata=export_lib.run_metadata(config, results, ctx.info))


def _first_images(data, count):
    images = data.images("eval")
    if isinstance(images, np.ndarray):
        return images[:count]
    import tensorflow as tf

    return (images.unbatch().take(count).batch(PREDICT_BATCH)
            .apply(tf.data.experimental.assert_cardinality(-(-count // PREDICT_BATCH))))


def finish(ctx, results, timings):
    """Add provenance to the figures, write metrics.json (the mark of a finished run), drop the checkpoints."""
    config, out = ctx.config, ctx.output_dir
    git = records.git_info()
    distributed = None
    if ctx.strategy is not None:
        from keras_cwsn import distribute

        distributed = distribute.describe(ctx.strategy)
    results.update(timings=timings, config=config, versions=records.versions(), git_commit=git["commit"],
                   git_dirty=git["dirty"], determinism={"seed": config["seed"], "op_determinism": True},
                   distribute=distributed, resumed=read_json(os.path.join(out, "resumes.json"), default=[]),
                   xla=use_xla(config, workers.num_replicas(ctx.strategy)), backend=keras.backend.backend(),
                   data={"train": records.data_summary(ctx.data.train),
                         "eval": records.data_summary(ctx.data.evaluation)},
                   class_names=list(ctx.info.fine_names), coarse_names=list(ctx.info.coarse_names),
                   fine_to_coarse=list(ctx.info.fine_to_coarse))
    with records.writing("the HParams summary", out):
        records.write_hparams(out, config, results)
    with records.writing("metrics.json", out):
        write_json_atomic(os.path.join(out, "metrics.json"), results)  # written last: the run is finished
    shutil.rmtree(os.path.join(out, "backup"), ignore_errors=True)
    figures = {k: results[k] for k in FIGURES if k in results}
    ctx.say(f"[done] {out}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()) +
            f" ({timings['total_s']:.0f} s)")
    return results


def run_seeds(config, seeds, output_dir, overwrite=False, quiet=False, resume=True, together=True):
    """Run one seed (in `output_dir`) or several (in `output_dir/seed_<n>`, plus `summary.json`).

    With several seeds, an interrupted command started again keeps the seeds that finished and
    resumes the others. On JAX they train together in one compiled program (`training.together`)
    unless `together` is False or the run can't (then one after another, as on TensorFlow).
    """
    if len(seeds) == 1:
        return run(dict(config, seed=seeds[0]), output_dir, overwrite, quiet, resume)
    summary_path = os.path.join(output_dir, "summary.json")
    if os.path.exists(summary_path) and not overwrite:
        raise RunError(f"{output_dir} holds a finished multi-seed run (summary.json); pass --overwrite to replace it "
                       f"or choose another --output-dir.")
    from keras_cwsn.training import together as together_lib

    per_seed, pending, seed_dir = {}, [], together_lib.seed_dir
    for s in seeds:
        folder, finished = seed_dir(output_dir, s), os.path.join(seed_dir(output_dir, s), "metrics.json")
        if os.path.exists(finished) and not overwrite:
            resume_policy.check_resume_config(folder, dict(config, seed=s))
            per_seed[s] = read_json(finished)
            if not quiet:
                print(f"[resume] seed {s}: finished before, kept {folder}", flush=True)
            continue
        pending.append(s)
    why_not = together_lib.unavailable(config) if together else "--separate-seeds"
    if pending and why_not is None:
        per_seed.update(together_lib.run_together(config, pending, output_dir, overwrite, quiet, resume))
    if pending and together and why_not is not None and keras.backend.backend() == "jax" and not quiet:
        print(f"[seeds] the seeds run one after another: {why_not}", flush=True)
    for s in pending if why_not is not None else ():
        per_seed[s] = run(dict(config, seed=s), seed_dir(output_dir, s), overwrite, quiet, resume)
    summary = records.summarize([per_seed[s] for s in seeds])
    with records.writing("summary.json", output_dir):
        write_json_atomic(summary_path, summary)
    for key in FIGURES:
        if key in summary and not quiet:
            s = summary[key]
            spread = f" ± {s['std']:.4f}" if s["std"] is not None else ""
            print(f"[summary] {key}: {s['mean']:.4f}{spread} (best {s['best']:.4f})")
    return summary
