"""The paper's protocol as one call: cluster pretraining, Hungarian evaluation, warm-start fine-tuning.

`run(config, output_dir)` returns the run's figures (also written to `metrics.json`).

Resuming. A run killed at any moment (SIGKILL included) and started again with the same command and
`--output-dir` goes on from the last completed epoch of the phase it was in and ends with the same
figures as an uninterrupted run:
- a finished phase is never redone (`cluster_result.json` marks the clustering phase done,
  `metrics.json` the whole run);
- after every epoch, `Checkpoint` (a `keras.callbacks.BackupAndRestore`) writes the weights, the
  optimizer's state (momentum, iteration count) and the dropout seed states under
  `backup/<phase>/`, each file through a temporary name and `os.replace`, the metadata last;
- every epoch's shuffle is seeded by (seed, phase, epoch), and each phase re-seeds Keras before
  building its model, so epoch k reads the same batches and starts from the same weights whether
  or not the process was restarted before it;
- on a resumed classification phase the warm start is skipped: the checkpoint holds the
  fine-tuned weights, which copying the clusterer again would undo.
"""

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata as importlib_metadata

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_cwsn import data as data_lib
from keras_cwsn import distribute
from keras_cwsn import export as export_lib
from keras_cwsn.config import learning_rate_at, phase_settings
from keras_cwsn.data.preprocess import write_json_atomic
from keras_cwsn.losses import PairwiseKLLoss
from keras_cwsn.metrics import ClusteringMetrics, clustering_report, hungarian_mapping, predict_clusters
from keras_cwsn.models import CLASSIFIER_OUTPUT, build_model, penultimate_model, variant_levels, variant_loss_weights
from keras_cwsn.report import seed_std
from keras_cwsn.warmstart import WarmStart

PHASES = ("cluster", "classify")
# Settings that may differ when an unfinished run is resumed (e.g. a lower learning rate after a
# divergence, more epochs, another machine); anything else must match the run's config.json.
RESUMABLE_CHANGES = ("strategy", "xla", "steps_per_execution", "metrics_every", "embedding_sample", "data_dir",
                     "schedule_scale", "cluster.epochs", "cluster.learning_rate", "cluster.lr_milestones",
                     "cluster.lr_factor", "classify.epochs", "classify.learning_rate", "classify.lr_milestones",
                     "classify.lr_factor")


class RunError(RuntimeError):
    """A run that can't start or go on (finished output folder, diverged training, unwritable outputs, ...)."""


# Seeds ---------------------------------------------------------------------------------------------

def derived_seed(seed, *parts):
    """A 31-bit seed derived from the run's seed and names (e.g. phase, epoch): stable across processes."""
    digest = hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed):
    """Python, NumPy, TensorFlow and Keras seeds, and deterministic TensorFlow ops."""
    keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()


# Callbacks -----------------------------------------------------------------------------------------

class StopOnNonFinite(keras.callbacks.Callback):
    """End training with a clear error when an epoch's loss or weights are NaN/inf, before its checkpoint is written.

    Checked once per epoch (the epoch logs, then one reduction over the weights): no per-step host sync.
    Place it first, so that nothing after it (metrics, CSV row, checkpoint) sees the bad epoch.
    """

    def __init__(self, phase, backup_dir=None):
        super().__init__()
        self.phase, self.backup_dir = phase, backup_dir

    def on_epoch_end(self, epoch, logs=None):
        bad = {k: v for k, v in (logs or {}).items() if k.endswith("loss") and not np.isfinite(v)}
        if not bad and not _weights_finite(self.model):
            bad = {"weights": "NaN/inf"}
        if bad:
            kept = (f"The last good checkpoint (after epoch {epoch}) is kept in {self.backup_dir}: rerun the same "
                    f"command with a lower --lr to resume from it." if epoch else
                    "No checkpoint was written yet: lower the learning rate and rerun.")
            raise RunError(f"Training diverged in the {self.phase} phase at epoch {epoch + 1}: "
                           f"non-finite {bad}. {kept}")


def _weights_finite(model):
    checks = [ops.all(ops.isfinite(v)) for v in model.trainable_variables if "float" in str(v.dtype)]
    return bool(ops.all(ops.stack(checks))) if checks else True


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


class Checkpoint(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` that survives SIGKILL at any instant and restores all that `fit` depends on.

    After each epoch it writes `epoch-NNNN.weights.h5` (model weights and the optimizer's variables:
    Keras's `save_weights` includes them) through a temporary file and `os.replace`, then
    `training_metadata.json` the same way (it names the epoch, the weights file and the dropout
    seed-generator states, which `save_weights` leaves out); the previous epoch's file is kept until
    the next one is in place, so a kill leaves either the old or the new checkpoint, never half of
    one. Restoring happens at `on_train_begin` (or by `restore` when no epoch is left to run) from
    the epoch the run agreed on (`read_resume_epoch`).

    Args:
        backup_dir: str. The phase's folder, e.g. `<run>/backup/cluster`.
        phase: str. For messages.
        initial_epoch: int. Epochs already completed (0: nothing to restore).
    """

    METADATA = "training_metadata.json"

    def __init__(self, backup_dir, phase="", initial_epoch=0):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)
        self.phase, self.initial_epoch = phase, int(initial_epoch)

    @classmethod
    def read(cls, backup_dir):
        """The metadata of the last complete checkpoint in `backup_dir`, or None."""
        path = os.path.join(backup_dir, cls.METADATA)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise RunError(f"Cannot read the checkpoint metadata {path}: {e}. "
                           f"Pass --overwrite to start over.") from None

    @classmethod
    def available(cls, backup_dir):
        """{epoch: weights path} of the checkpoints whose files are all there."""
        meta = cls.read(backup_dir) or {}
        found = {}
        for epoch, name in (meta.get("checkpoints") or {}).items():
            path = os.path.join(backup_dir, name)
            if os.path.isfile(path):
                found[int(epoch)] = path
        return found

    def on_train_begin(self, logs=None):
        if self.initial_epoch:
            self.restore(self.model, self.initial_epoch)

    def on_train_batch_end(self, batch, logs=None):
        pass  # epoch checkpoints only

    def on_epoch_end(self, epoch, logs=None):
        self.save(self.model, epoch + 1)

    def on_train_end(self, logs=None):
        pass  # kept until the run is finished

    def restore(self, model, epoch):
        """Load the checkpoint written after `epoch` epochs into `model` (and its optimizer)."""
        path = self.available(self.backup_dir).get(int(epoch))
        if path is None:
            raise RunError(f"The {self.phase} checkpoint for epoch {epoch} is missing from {self.backup_dir}; "
                           f"pass --overwrite to start over.")
        meta = self.read(self.backup_dir)
        with model.distribute_strategy.scope():
            if model.optimizer is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)  # its variables must exist to be loaded
            try:
                model.load_weights(path)
            except (OSError, ValueError, KeyError) as e:
                raise RunError(f"Cannot restore the {self.phase} checkpoint {path}: {e}. "
                               f"Pass --overwrite to start over.") from None
            states = (meta.get("seed_states") or {}).get(str(epoch), [])
            variables = _seed_state_variables(model)
            if len(states) != len(variables):
                raise RunError(f"The {self.phase} checkpoint in {self.backup_dir} holds {len(states)} seed states for "
                               f"a model with {len(variables)}: was the model changed? Pass --overwrite to start over.")
            for variable, state in zip(variables, states):  # in model order (names get numbered per process)
                variable.assign(np.asarray(state["value"], dtype=str(variable.dtype)))

    def save(self, model, epoch):
        """Write the checkpoint after `epoch` completed epochs; the metadata goes last."""
        name = f"epoch-{epoch:04d}.weights.h5"
        final = os.path.join(self.backup_dir, name)
        tmp = os.path.join(self.backup_dir, f".tmp-{name}")
        previous = self.read(self.backup_dir) or {}
        try:
            os.makedirs(self.backup_dir, exist_ok=True)
            model.save_weights(tmp, overwrite=True)
            os.replace(tmp, final)
            checkpoints = {str(epoch): name}
            states = {str(epoch): [{"path": v.path, "value": np.asarray(v.numpy()).tolist()}
                                   for v in _seed_state_variables(model)]}
            last = previous.get("epoch")
            if last is not None and last != epoch and str(last) in (previous.get("checkpoints") or {}):
                checkpoints[str(last)] = previous["checkpoints"][str(last)]
                states[str(last)] = (previous.get("seed_states") or {}).get(str(last), [])
            write_json_atomic(os.path.join(self.backup_dir, self.METADATA),
                              {"phase": self.phase, "epoch": epoch, "batch": 0, "weights": name,
                               "checkpoints": checkpoints, "seed_states": states})
        except Exception as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise RunError(f"Cannot write the {self.phase} checkpoint for epoch {epoch} to {self.backup_dir}: "
                           f"{_one_line(e)}") from e
        for stale in os.listdir(self.backup_dir):  # keep this epoch's and the previous one's
            if stale.endswith(".weights.h5") and stale not in checkpoints.values() and not stale.startswith(".tmp-"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.backup_dir, stale))


def _seed_state_variables(model):
    """Dropout's SeedGenerator states: part of the training state, but not of `save_weights`."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


class ResumableWarmStart(WarmStart):
    """`WarmStart` that records what it copied (for the run's figures) and stands aside on a resumed fit.

    When the classification phase resumes from a checkpoint, the checkpoint holds the fine-tuned
    weights; copying the clusterer into the classifier again would undo them.
    """

    def __init__(self, clusterer, head, mapping, record_path, resumed=False):
        super().__init__(clusterer, head=head, mapping=mapping)
        self.record_path = record_path
        if resumed:
            if not os.path.exists(record_path):
                raise RunError(f"Resuming the classify phase needs {record_path}, written by its warm start; "
                               f"pass --overwrite to start over.")
            with open(record_path) as f:
                self.copied = json.load(f)["layers"]
            self.done = True

    def on_train_begin(self, logs=None):
        if self.done:
            return
        super().on_train_begin(logs)
        write_json_atomic(self.record_path, {"head": self.head, "layers": self.copied})


# Helpers -------------------------------------------------------------------------------------------

def use_xla(config, strategy=None):
    """`xla: auto` compiles with XLA on one GPU; not on a CPU (measured slower) nor across replicas."""
    if config["xla"] == "auto":
        replicas = strategy.num_replicas_in_sync if strategy is not None else 1
        return bool(tf.config.list_physical_devices("GPU")) and replicas == 1
    return bool(config["xla"])


def _optimizer(settings):
    return keras.optimizers.SGD(learning_rate=settings["learning_rate"], momentum=settings["momentum"],
                                weight_decay=settings["weight_decay"] or None)


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def _writing(what, path):
    """Turn a failed write (disk full, read-only folder, ...) into a RunError that says what and where."""
    try:
        yield
    except OSError as e:
        raise RunError(f"Cannot write {what} to {path}: {_one_line(e)}") from e


def _save_keras_atomic(model, path):
    tmp = path + ".tmp.keras"
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _git_info():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=root)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def versions():
    """Python, platform and the versions of the libraries that shape the figures."""
    found = {"python": platform.python_version(), "platform": platform.platform(), "backend": keras.backend.backend()}
    for package in ("tensorflow", "keras", "numpy", "scipy", "scikit-learn", "tensorflow-datasets", "h5py"):
        try:
            found[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            found[package] = None
    found["tensorflow"] = found["tensorflow"] or tf.__version__
    found["keras"] = keras.__version__
    return found


def _flatten(mapping, prefix=""):
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and key in ("cluster", "classify", "synthetic"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_changes(saved, config):
    """{dotted key: (saved, now)} for every setting that differs between two configs."""
    old, new = _flatten(saved), _flatten(config)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def check_output_dir(output_dir, overwrite=False, resume=True):
    """Prepare `output_dir`; returns True when it holds an unfinished run to resume.

    A finished run (metrics.json) is refused unless `overwrite`; an unfinished one (config.json, no
    metrics.json) is resumed, or refused when `resume` is False; `overwrite` wipes either and starts over.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RunError(f"--output-dir {output_dir} exists and is not a folder.")
    finished = os.path.exists(os.path.join(output_dir, "metrics.json"))
    started = os.path.exists(os.path.join(output_dir, "config.json"))
    if overwrite and (finished or started):
        shutil.rmtree(output_dir)
        finished = started = False
    if finished:
        raise RunError(f"{output_dir} holds a finished run (metrics.json); pass --overwrite to replace it "
                       f"or choose another --output-dir.")
    if started and not resume:
        raise RunError(f"{output_dir} holds an unfinished run; drop --no-resume to continue it, or pass --overwrite "
                       f"to start over.")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise RunError(f"Cannot create --output-dir {output_dir}: {_one_line(e)}") from None
    return started


def _has_progress(output_dir):
    """Whether a run's folder holds anything trained: a checkpoint, the clusterer or the finished run."""
    marks = ["cluster_result.json", "metrics.json"] + [os.path.join("backup", p, Checkpoint.METADATA) for p in PHASES]
    return any(os.path.exists(os.path.join(output_dir, m)) for m in marks)


def check_resume_config(output_dir, config):
    """Refuse to resume a run under a config that changes what it computes; returns the allowed changes."""
    path = os.path.join(output_dir, "config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"Cannot read {path} to resume the run: {e}. Pass --overwrite to start over.") from None
    changes = config_changes(saved, config)
    if not _has_progress(output_dir):  # nothing trained yet (e.g. the data failed to load): start afresh
        return {}
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE_CHANGES}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise RunError(f"{output_dir} holds a run started with other settings ({listed}); rerun with the same "
                       f"settings to resume it, pass --overwrite to start over, or choose another --output-dir.")
    return changes


def read_resume_epoch(backup_dir, strategy):
    """Epochs completed by the phase's last checkpoint (0 if none), agreed on by every worker."""
    meta = Checkpoint.read(backup_dir)
    epoch = int(meta["epoch"]) if meta else 0
    agreed = distribute.agree_min(strategy, epoch)
    if agreed and "checkpoints" not in meta:  # e.g. plain BackupAndRestore's {"epoch", "batch"} of early versions
        raise RunError(f"Cannot resume from epoch {agreed}: {os.path.join(backup_dir, Checkpoint.METADATA)} is in a "
                       f"format this version does not read (no 'checkpoints' entry; written by an older keras-cwsn?); "
                       f"pass --overwrite to start over.")
    if agreed and agreed not in Checkpoint.available(backup_dir):
        raise RunError(f"Cannot resume from epoch {agreed}: its checkpoint is missing from {backup_dir}; "
                       f"pass --overwrite to start over.")
    return agreed


def truncate_history(path, first_epoch):
    """Keep only the CSV rows of epochs before `first_epoch` (a killed run may have logged an epoch it never saved)."""
    if not os.path.exists(path):
        return
    if first_epoch == 0:
        os.remove(path)
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    header = rows[0]
    kept = [header] + [r for r in rows[1:] if len(r) == len(header) and r[0].isdigit() and int(r[0]) < first_epoch]
    if len(kept) == len(rows):
        return
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, path)


def _read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _note_resume(output_dir, phase, epoch, epochs):
    path = os.path.join(output_dir, "resumes.json")
    events = _read_json(path, default=[])
    events.append({"phase": phase, "from_epoch": epoch, "epochs": epochs, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    write_json_atomic(path, events)


def steps_per_epoch(num_examples, batch_size):
    """Batches per training epoch: partial batches are dropped (as `make_pipeline` does), unless there is only one."""
    return num_examples // batch_size if num_examples >= batch_size else 1


def training_data(split, stats, batch_size, levels, config, phase, first_epoch, epochs):
    """The training batches of epochs `first_epoch`..`epochs - 1` as one dataset, and the steps per epoch.

    Each epoch is its own pipeline, shuffled with a seed derived from (seed, phase, epoch) and the
    same order on every pass, so the batches of epoch k are the same whether the run started at
    epoch 0 or resumed at k, and whether or not Keras peeks at a batch first (it does under a
    tf.distribute strategy). Random crops (`augment` on streamed datasets) keep `make_pipeline`'s
    own training path, whose shuffle also depends on the pass: exact within one strategy.
    """
    def one_epoch(epoch):
        seed = derived_seed(config["seed"], phase, "epoch", epoch)
        if config["augment"] and split.images is None:
            return data_lib.make_pipeline(split, stats, batch_size, levels, training=True, seed=seed, augment=True)
        shuffled = dataclasses.replace(split, dataset=split.dataset.shuffle(
            min(len(split), 50_000), seed=seed, reshuffle_each_iteration=False))
        return data_lib.make_pipeline(shuffled, stats, batch_size, levels, drop_remainder=True)

    per_epoch = [one_epoch(epoch) for epoch in range(first_epoch, epochs)]
    steps = int(per_epoch[0].cardinality())
    if steps <= 0:  # unknown (streamed source)
        steps = steps_per_epoch(len(split), batch_size)
    while len(per_epoch) > 1:  # a balanced tree of concatenations: shallow for long schedules
        pairs = [a.concatenate(b) for a, b in zip(per_epoch[::2], per_epoch[1::2])]
        per_epoch = pairs + ([per_epoch[-1]] if len(per_epoch) % 2 else [])
    return per_epoch[0].prefetch(tf.data.AUTOTUNE), steps


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


def _warn_data_report(split):
    """One line on stderr for files skipped and class folders found empty (also when the decode was cached)."""
    report = split.report or {}
    skipped = report.get("skipped_undecodable") or []
    empty = report.get("empty_class_folders") or []
    if skipped or empty:
        example = f" (e.g. {skipped[0]})" if skipped else ""
        print(f"warning: {report.get('folder', split.name)}: skipped {len(skipped)} undecodable or empty image "
              f"file(s){example}; empty class folders: {', '.join(empty) or 'none'}", file=sys.stderr, flush=True)


def _data_summary(split):
    report = split.report or {}
    keys = ("folder", "listed", "decoded", "skipped_undecodable", "empty_class_folders", "non_image_files")
    return {k: report[k] for k in keys if k in report}


def _check_batch(settings, strategy, phase):
    replicas = strategy.num_replicas_in_sync
    if settings["batch_size"] % replicas:
        raise RunError(f"The {phase} batch size {settings['batch_size']} can't be split evenly across {replicas} "
                       f"replicas: choose a multiple of {replicas}.")


# The protocol -------------------------------------------------------------------------------------

def _fit_phase(phase, model, settings, split, stats, levels, config, output_dir, strategy, first_epoch, quiet,
               extra=(), validation_data=None):
    """Fit one phase from `first_epoch` (restoring its checkpoint) to its last epoch."""
    backup_dir = os.path.join(output_dir, "backup", phase)
    history = os.path.join(output_dir, f"{phase}_history.csv")
    checkpoint = Checkpoint(backup_dir, phase, first_epoch)
    epochs = settings["epochs"]
    if first_epoch:
        print(f"[resume] {phase} phase: resuming after epoch {first_epoch} of {epochs} from {backup_dir}", flush=True)
        _note_resume(output_dir, phase, first_epoch, epochs)
    truncate_history(history, first_epoch)
    if first_epoch >= epochs:  # every epoch ran before the interruption: only the weights are needed
        checkpoint.restore(model, first_epoch)
        return
    data, steps = training_data(split, stats, settings["batch_size"], levels, config, phase, first_epoch, epochs)
    callbacks = [
        StopOnNonFinite(phase, backup_dir),
        *extra,
        EpochLearningRate(settings),
        keras.callbacks.CSVLogger(history, append=True),
        keras.callbacks.TensorBoard(log_dir=os.path.join(output_dir, "logs", phase), write_graph=False,
                                    update_freq="epoch"),
        checkpoint,
    ]
    model.fit(data, epochs=epochs, initial_epoch=first_epoch, steps_per_epoch=steps, validation_data=validation_data,
              shuffle=False, verbose=0 if quiet else "auto", callbacks=callbacks)  # each epoch is shuffled already


def _compile(model, strategy, **kwargs):
    distribute.synchronize_batch_norm(model, strategy)
    model.compile(**kwargs)
    distribute.patch_multiworker_fit(model, strategy)
    return model


def run(config, output_dir, overwrite=False, quiet=False, resume=True):
    """Run the whole protocol for one seed; returns the figures written to `metrics.json`.

    Args:
        config: dict. A validated config (`keras_cwsn.config`).
        output_dir: str. The run's folder; an unfinished run there is resumed.
        overwrite: bool. Replace a run (finished or not) in `output_dir`. Defaults to False.
        quiet: bool. No progress bars. Defaults to False.
        resume: bool. Continue an unfinished run in `output_dir`; False refuses it. Defaults to True.
    """
    started = time.time()
    strategy = distribute.make_strategy(config["strategy"])  # first: multi-worker needs it before other ops
    chief = distribute.is_chief()
    output_dir = distribute.worker_output_dir(output_dir)
    resuming = check_output_dir(output_dir, overwrite, resume)
    changes = check_resume_config(output_dir, config) if resuming else {}
    if changes:
        print("[resume] settings changed since the run started: " +
              "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()), flush=True)
    seed = config["seed"]
    seed_everything(seed)
    keras.mixed_precision.set_global_policy(config["precision"])
    with _writing("the run's config", output_dir):
        _write_config_summary(output_dir, config)
    variant, jit = config["variant"], use_xla(config, strategy)
    timings = {}

    # Data
    load = dict(data_dir=config["data_dir"], val_per_class=config["val_per_class"], synthetic=config["synthetic"],
                verbose=False)
    train = data_lib.load_split(config["dataset"], "train", **load)
    evaluation = data_lib.load_split(config["dataset"], config["eval_split"], **load)
    for split in (train, evaluation):
        _warn_data_report(split)
    info = train.info
    stats = data_lib.preprocessing_stats(train, verbose=not quiet)
    eval_images = data_lib.make_pipeline(evaluation, stats, 256, images_only=True)
    train_images = data_lib.make_pipeline(train, stats, 256, images_only=True)
    shape = tuple(info.image_size) + (3,)
    timings["data_s"] = round(time.time() - started, 2)
    results = {"dataset": config["dataset"], "variant": variant, "seed": seed,
               "num_train": len(train), "num_eval": len(evaluation), "eval_split": config["eval_split"]}

    # Phase 1: cluster pretraining (skipped for the cross-entropy baseline, and when already done)
    clusterer, mapping = None, None
    if variant != "ce":
        done_path = os.path.join(output_dir, "cluster_result.json")
        clusterer_path = os.path.join(output_dir, "clusterer.keras")
        done = os.path.exists(done_path) and os.path.exists(clusterer_path)
        if distribute.agree_min(strategy, int(done)):  # every worker must take the same branch
            with open(done_path) as f:
                cluster_result = json.load(f)
            clusterer = keras.saving.load_model(clusterer_path)
            if resuming and not quiet:
                print(f"[resume] cluster phase: finished before, loaded {clusterer_path}", flush=True)
        else:
            t0 = time.time()
            settings = phase_settings(config, "cluster")
            _check_batch(settings, strategy, "cluster")
            seed_everything(derived_seed(seed, "cluster"))
            first = read_resume_epoch(os.path.join(output_dir, "backup", "cluster"), strategy)
            weights = variant_loss_weights(variant)
            with strategy.scope():
                clusterer = build_model(config["arch"], variant, info.num_fine, info.num_coarse, shape,
                                        config["double"])
                _compile(clusterer, strategy, optimizer=_optimizer(settings),
                         loss={name: PairwiseKLLoss(margin=config["margin"]) for name in weights},
                         loss_weights=weights, jit_compile=jit, steps_per_execution=config["steps_per_execution"])
            monitor = ClusteringMetrics(eval_images, evaluation.labels, output="fine_fc3", prefix="val_",
                                        every=config["metrics_every"])
            _fit_phase("cluster", clusterer, settings, train, stats, variant_levels(variant), config, output_dir,
                       strategy, first, quiet, extra=[monitor])
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
            with _writing("the clusterer", clusterer_path):
                _save_keras_atomic(clusterer, clusterer_path)
                write_json_atomic(done_path, cluster_result)  # written last: marks the phase finished
            if distribute.num_workers(strategy) == 1:  # other workers may still need it to agree on a resume point
                shutil.rmtree(os.path.join(output_dir, "backup", "cluster"), ignore_errors=True)
        mapping = np.asarray(cluster_result["mapping"])
        results.update(cluster_result["eval"])
        results["train_cluster_accuracy"] = cluster_result["train"]["cluster_accuracy"]
        timings["cluster_s"] = cluster_result["seconds"]
        if not quiet:
            print(f"[cluster] {config['eval_split']}: " + ", ".join(f"{k} {v:.4f}" for k, v in cluster_result["eval"].items()))

    # Phase 2: classification, warm-started from the clusterer (or from scratch for `ce`)
    t0 = time.time()
    settings = phase_settings(config, "classify")
    _check_batch(settings, strategy, "classify")
    seed_everything(derived_seed(seed, "classify"))
    first = read_resume_epoch(os.path.join(output_dir, "backup", "classify"), strategy)
    with strategy.scope():
        classifier = build_model(config["arch"], "ce", info.num_fine, info.num_coarse, shape, config["double"])
        _compile(classifier, strategy, optimizer=_optimizer(settings),
                 loss={CLASSIFIER_OUTPUT: keras.losses.SparseCategoricalCrossentropy()},
                 metrics={CLASSIFIER_OUTPUT: ["accuracy"]}, jit_compile=jit,
                 steps_per_execution=config["steps_per_execution"])
    levels = variant_levels("ce")
    eval_ds = data_lib.make_pipeline(evaluation, stats, 256, levels)
    warm = None
    if clusterer is not None:
        warm = ResumableWarmStart(clusterer, config["head"], mapping, os.path.join(output_dir, "warm_start.json"),
                                  resumed=first > 0)
    _fit_phase("classify", classifier, settings, train, stats, levels, config, output_dir, strategy, first, quiet,
               extra=[warm] if warm else [], validation_data=eval_ds)
    probabilities = classifier.predict(data_lib.make_pipeline(evaluation, stats, 256, images_only=True), verbose=0)
    predicted = np.argmax(probabilities[CLASSIFIER_OUTPUT], axis=-1)
    results["classification_accuracy"] = float(np.mean(predicted == evaluation.labels))
    timings["classify_s"] = round(time.time() - t0, 2)
    if warm is not None:
        results["warm_start"] = {"head": config["head"], "layers": list(warm.copied)}

    # Outputs (every worker writes to its own folder; the model is exported by the chief only)
    sample = min(config["embedding_sample"], len(evaluation))
    if sample:  # predict is collective under a multi-worker strategy: every worker takes part
        sample_images = (data_lib.make_pipeline(evaluation, stats, 256, images_only=True).unbatch().take(sample)
                         .batch(256).apply(tf.data.experimental.assert_cardinality(-(-sample // 256))))
        with _writing("the embedding projector", os.path.join(output_dir, "logs", "projector")):
            _write_projector(output_dir, clusterer or classifier, sample_images, evaluation.labels[:sample], info)
    if chief:
        export_path = os.path.join(output_dir, "classifier")
        try:
            with _writing("the exported classifier", export_path):
                export_lib.export_classifier(
                    classifier, export_path, info.fine_names, info.image_size, stats,
                    metadata={"dataset": config["dataset"], "variant": variant, "figures": dict(results)})
        except RunError:
            shutil.rmtree(export_path + ".tmp", ignore_errors=True)  # never leave half a model behind
            raise
    timings["total_s"] = round(time.time() - started, 2)
    resumes = _read_json(os.path.join(output_dir, "resumes.json"), default=[])
    git = _git_info()
    results.update(timings=timings, config=config, versions=versions(), git_commit=git["commit"],
                   git_dirty=git["dirty"], determinism={"seed": seed, "op_determinism": True},
                   distribute=distribute.describe(strategy), resumed=resumes, xla=jit,
                   data={"train": _data_summary(train), "eval": _data_summary(evaluation)},
                   class_names=list(info.fine_names))
    with _writing("metrics.json", output_dir):
        write_json_atomic(os.path.join(output_dir, "metrics.json"), results)  # written last: the run is finished
    shutil.rmtree(os.path.join(output_dir, "backup"), ignore_errors=True)
    if not quiet:
        figures = {k: results[k] for k in ("cluster_accuracy", "nmi", "purity", "classification_accuracy") if k in results}
        print(f"[done] {output_dir}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()) +
              f" ({timings['total_s']:.0f} s)")
    return results


FIGURES = ("cluster_accuracy", "nmi", "purity", "classification_accuracy")


def summarize(per_seed):
    """Mean, sample std (None for one seed) and best (by classification accuracy, as the paper's best of 5) over seeds."""
    summary = {"seeds": [r["seed"] for r in per_seed], "per_seed": {}}
    for key in FIGURES:
        values = [r[key] for r in per_seed if key in r]
        if values:
            summary["per_seed"][key] = values
            summary[key] = {"mean": float(np.mean(values)), "std": seed_std(values), "best": float(np.max(values))}
    best = max(per_seed, key=lambda r: r["classification_accuracy"])
    summary["best_seed"] = best["seed"]
    return summary


def run_seeds(config, seeds, output_dir, overwrite=False, quiet=False, resume=True):
    """Run one seed (in `output_dir`) or several (in `output_dir/seed_<n>`, plus `summary.json`).

    With several seeds, an interrupted command started again keeps the seeds that finished and
    resumes the one that didn't.
    """
    if len(seeds) == 1:
        return run(dict(config, seed=seeds[0]), output_dir, overwrite, quiet, resume)
    summary_path = os.path.join(output_dir, "summary.json")
    if os.path.exists(summary_path) and not overwrite:
        raise RunError(f"{output_dir} holds a finished multi-seed run (summary.json); pass --overwrite to replace it "
                       f"or choose another --output-dir.")
    per_seed = []
    for s in seeds:
        folder, seed_config = os.path.join(output_dir, f"seed_{s}"), dict(config, seed=s)
        finished = os.path.join(folder, "metrics.json")
        if os.path.exists(finished) and not overwrite:
            check_resume_config(folder, seed_config)
            with open(finished) as f:
                per_seed.append(json.load(f))
            if not quiet:
                print(f"[resume] seed {s}: finished before, kept {folder}", flush=True)
            continue
        per_seed.append(run(seed_config, folder, overwrite, quiet, resume))
    summary = summarize(per_seed)
    with _writing("summary.json", output_dir):
        write_json_atomic(summary_path, summary)
    if not quiet:
        for key in FIGURES:
            if key in summary:
                s = summary[key]
                spread = f" ± {s['std']:.4f}" if s["std"] is not None else ""
                print(f"[summary] {key}: {s['mean']:.4f}{spread} (best {s['best']:.4f})")
    return summary
