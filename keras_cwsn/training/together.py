"""Several seeds of one setting trained together on JAX, each into the folder a separate run would fill.

`run_seeds` calls `run_together` on the JAX backend for two or more seeds (`train.py --seeds 0,1,2`)
unless `--separate-seeds` asks for the one-after-another path. The protocol is `protocol.run`'s,
step by step and per seed (folders, resume policy, seeded initialisation, warm start, Hungarian
mapping, writers, metrics.json); only the two training loops differ: instead of one `fit` per seed,
every seed's epoch runs in one compiled program (`stacked.StackedTrainer`) that reads each seed's
own batches (`inputs.epoch_batches`, seeded as `fit`'s are) at that epoch's learning rate. After
each epoch the seeds' weights go back into their own Keras models and their own callbacks run
(divergence stop, learning rate and epoch time logs, CSV history, TensorBoard, the per-epoch
checkpoint), with the per-epoch figures computed for all seeds in one evaluation program.

What differs from separate runs: floating-point rounding (a vmapped convolution is a grouped one),
so figures agree to a tolerance (tests/test_together.py states it); `epoch_seconds` and
`figures_seconds` are the wall times of the epoch every seed shared; and metrics.json names the
seeds trained together (`seeds_together`).
"""

import contextlib
import os
import time

import keras
import numpy as np

from keras_cwsn.config import learning_rate_at
from keras_cwsn.data.crops import crop_padding
from keras_cwsn.metrics import epoch_figures
from keras_cwsn.variants import CLASSIFIER_VARIANT, variant_levels
from keras_cwsn.training import protocol
from keras_cwsn.training import resume as resume_policy
from keras_cwsn.training.inputs import epoch_batches, labels_by_output, load_run_data, steps_per_epoch


def seed_dir(output_dir, seed):
    """The folder of one seed of a multi-seed run."""
    return os.path.join(output_dir, f"seed_{seed}")


def unavailable(config):
    """Why the seeds of `config` can't train together (None when they can); they then run one after another."""
    if keras.backend.backend() != "jax":
        return f"the {keras.backend.backend()} backend (the trainer is JAX's)"
    if config["precision"] == "mixed_float16":
        return "mixed_float16 (its loss scaling is fit's)"
    return None


def run_together(config, seeds, output_dir, overwrite=False, quiet=False, resume=True):
    """Run the protocol for `seeds` (each in `output_dir/seed_<n>`), training them together; returns {seed: figures}."""
    started = time.time()
    ctxs = [protocol._start(dict(config, seed=s), seed_dir(output_dir, s), overwrite, quiet, resume) for s in seeds]
    with contextlib.ExitStack() as undo:  # a failure before any saved epoch leaves no stub runs behind
        for ctx in ctxs:
            undo.enter_context(resume_policy.undone_if_nothing_trained(ctx.output_dir, ctx.fresh))
        return _protocol_together(ctxs, config, seeds, output_dir, quiet, resume, started)


def _protocol_together(ctxs, config, seeds, output_dir, quiet, resume, started):
    """`run_together` once every seed's folder is ready: data, the phases, each seed's outputs."""
    data = load_run_data(config, quiet)
    if data.train_x is None:  # a streamed source (Birdsnap): its tf.data epochs stay with fit
        print("[seeds] the training images are streamed, not in memory: the seeds run one after another", flush=True)
        return {s: protocol.run(dict(config, seed=s), seed_dir(output_dir, s), False, quiet, resume) for s in seeds}
    if not quiet:
        print(f"[seeds] training seeds {', '.join(map(str, seeds))} together (JAX, one program per epoch)", flush=True)
    for ctx in ctxs:
        protocol.begin(ctx, data, started)
        ctx.results["seeds_together"] = list(seeds)
    clusterers, mappings = [None] * len(ctxs), [None] * len(ctxs)
    if config["variant"] != CLASSIFIER_VARIANT:
        clusterers, mappings = _cluster_together(ctxs)
    t0 = time.time()
    built = [protocol.new_classifier(ctx, c, m) for ctx, c, m in zip(ctxs, clusterers, mappings)]
    fit_together(ctxs, "classify", [b[0] for b in built], built[0][2], [[b[1]] if b[1] else [] for b in built])
    return {ctx.config["seed"]: protocol.conclude(ctx, classifier, clusterer, warm, t0)
            for ctx, (classifier, warm, _), clusterer in zip(ctxs, built, clusterers)}


def _cluster_together(ctxs):
    """The clustering phase of every seed: finished ones loaded, the others trained together."""
    found = [protocol.finished_clusterer(ctx) for ctx in ctxs]
    pending = [i for i, f in enumerate(found) if f is None]
    if pending:
        t0 = time.time()
        built = {i: protocol.new_clusterer(ctxs[i]) for i in pending}  # (clusterer, settings, monitor)
        fit_together([ctxs[i] for i in pending], "cluster", [built[i][0] for i in pending], built[pending[0]][1],
                     [[] for _ in pending], monitors=[built[i][2] for i in pending])
        for i in pending:
            found[i] = built[i][0], protocol.save_clusterer(ctxs[i], built[i][0], built[i][1], t0)
    return [f[0] for f in found], [protocol.record_clustering(ctx, f[1]) for ctx, f in zip(ctxs, found)]


def fit_together(ctxs, phase, models, settings, extras, monitors=None):
    """One phase of every seed, from each one's last checkpoint; seeds resuming at different epochs train
    as separate groups. `monitors` (clustering) are the `ClusteringMetrics` whose figures the group computes."""
    groups = {}
    for i, (ctx, model) in enumerate(zip(ctxs, models)):
        first, callbacks = protocol.phase_callbacks(ctx, phase, model, settings, extras[i])
        if callbacks is not None:  # None: every epoch ran before, the checkpoint is restored
            groups.setdefault(first, []).append((ctx, model, callbacks, monitors[i] if monitors else None))
    for first, members in sorted(groups.items()):
        _fit_group(members, phase, settings, first)


def _fit_group(members, phase, settings, first):
    """Epochs `first`..end of a phase for seeds at the same epoch: one compiled program per epoch."""
    from keras_cwsn.training.stacked import StackedTrainer, stack_state, write_back

    ctxs, models = [m[0] for m in members], [m[1] for m in members]
    config, data, epochs = ctxs[0].config, ctxs[0].data, settings["epochs"]
    variant = config["variant"] if phase == "cluster" else CLASSIFIER_VARIANT
    crop_size = data.train_x.shape[1:3] if config["augment"] else None
    steps = steps_per_epoch(len(data.train), settings["batch_size"])
    lists = [keras.callbacks.CallbackList(m[2], model=m[1], epochs=epochs, steps=steps, verbose=0) for m in members]
    for callbacks in lists:
        callbacks.on_train_begin()  # the warm start, or the restored checkpoint
    trainer = StackedTrainer(models[0], variant, config["criterion"], config["margin"], data.train_x,
                             labels_by_output(data.train, variant_levels(variant)),
                             crop_padding(crop_size) if crop_size else 0)
    figures = _Figures(trainer, ctxs, [m[3] for m in members], phase)
    state = stack_state(models)
    for epoch in range(first, epochs):
        for callbacks in lists:
            callbacks.on_epoch_begin(epoch)
        start = time.perf_counter()
        tables = [epoch_batches(ctx.config["seed"], phase, epoch, len(data.train), settings["batch_size"], crop_size)
                  for ctx in ctxs]
        crops = np.stack([t[1] for t in tables]) if crop_size else None
        state, logs = trainer.epoch(state, np.stack([t[0] for t in tables]), crops, learning_rate_at(epoch, settings))
        figures.add(state, logs, epoch, epochs, first=epoch == first)
        write_back(state, models)
        for callbacks, seed_logs in zip(lists, logs):
            callbacks.on_epoch_end(epoch, seed_logs)
        if not ctxs[0].quiet:
            print(f"[seeds] {phase} epoch {epoch + 1}/{epochs} ({time.perf_counter() - start:.2f} s): " +
                  "; ".join(f"seed {ctx.config['seed']} loss {log['loss']:.4f}" for ctx, log in zip(ctxs, logs)),
                  flush=True)
    for callbacks in lists:
        callbacks.on_train_end()


class _Figures:
    """The per-epoch figures `fit` would log, for every seed at once: the clustering figures of
    `ClusteringMetrics` (clusterer) or the validation loss and accuracy (classifier)."""

    def __init__(self, trainer, ctxs, monitors, phase):
        data = ctxs[0].data
        self.trainer, self.monitors, self.phase = trainer, monitors, phase
        self.eval_images = keras.ops.convert_to_tensor(data.eval_x)
        self.eval_labels = data.evaluation.labels
        if phase == "cluster":
            samples = [data.train_sample_index(ctx.config["metrics_sample"], ctx.config["seed"]) for ctx in ctxs]
            self.sample = np.arange(len(data.train)) if samples[0] is None else np.stack(samples)
            self.sample_labels = data.train.labels[self.sample]  # (M,) or (S, M)

    def add(self, state, logs, epoch, epochs, first=False):
        start = time.perf_counter()
        everything = np.arange(len(self.eval_labels))
        if self.phase == "classify":
            values = self.trainer.evaluate("validation", state, self.eval_images, everything,
                                           keras.ops.convert_to_tensor(self.eval_labels.astype(np.int32)))
            for seed_logs, (loss, correct) in zip(logs, values):
                seed_logs.update(val_loss=float(np.float32(loss.mean())),
                                 val_accuracy=float(np.float32(correct.mean())))
            return
        monitor = self.monitors[0]
        if not monitor.due(epoch, epochs, first):  # as under fit: the first epoch of each (resumed) fit too
            return
        clusters = self.trainer.evaluate("clusters", state, self.eval_images, everything)
        sample_clusters = self.trainer.evaluate("clusters", state, self.trainer.images, self.sample)
        for s, seed_logs in enumerate(logs):
            sample_labels = self.sample_labels if self.sample_labels.ndim == 1 else self.sample_labels[s]
            found = epoch_figures(self.eval_labels, clusters[s], sample_labels, sample_clusters[s])
            seed_logs.update({monitor.prefix + key: value for key, value in found.items()})
        seconds = round(time.perf_counter() - start, 3)  # every seed's figures: the time the shared epoch spent
        for seed_logs in logs:
            seed_logs["figures_seconds"] = seconds
