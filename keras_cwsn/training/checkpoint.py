"""Per-epoch checkpoints that survive SIGKILL at any instant and restore all that `fit` depends on."""

import contextlib
import json
import os
import time

import keras
import numpy as np

from keras_cwsn.atomic import atomic_path, write_json_atomic
from keras_cwsn.errors import RunError, one_line

TORN_WRITE_AGE = 60  # seconds: a checkpoint's temporary file unchanged this long before a save is garbage


class Checkpoint(keras.callbacks.Callback):
    """Per-epoch checkpoints that survive SIGKILL at any instant and restore all that `fit` depends on.

    Not `keras.callbacks.BackupAndRestore`, whose job this is: it overwrites one `latest.weights.h5`
    in place and then its metadata (a kill between the two pairs new weights with the old epoch),
    leaves out the dropout seed-generator states (a resumed run would draw other masks), picks the
    epoch to resume from by itself (the workers of a multi-worker run must agree on it first) and,
    by default, deletes the backup when `fit` ends (before the phase's results are written). Every
    one of its hooks would be overridden, so this is a plain callback.

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
        super().__init__()
        self.backup_dir, self.phase, self.initial_epoch = backup_dir, phase, int(initial_epoch)

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

    def on_epoch_end(self, epoch, logs=None):
        self.save(self.model, epoch + 1)

    def restore(self, model, epoch):
        """Load the checkpoint written after `epoch` epochs into `model` (and its optimizer)."""
        path = self.available(self.backup_dir).get(int(epoch))
        if path is None:
            raise RunError(f"The {self.phase} checkpoint for epoch {epoch} is missing from {self.backup_dir}; "
                           f"pass --overwrite to start over.")
        meta = self.read(self.backup_dir)
        strategy = getattr(model, "distribute_strategy", None)  # TensorFlow only
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
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
        started = time.time()
        previous = self.read(self.backup_dir) or {}
        try:
            with atomic_path(os.path.join(self.backup_dir, name), suffix=".weights.h5") as tmp:
                model.save_weights(tmp, overwrite=True)
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
            raise RunError(f"Cannot write the {self.phase} checkpoint for epoch {epoch} to {self.backup_dir}: "
                           f"{one_line(e)}") from e
        for stale in os.listdir(self.backup_dir):  # keep this epoch's and the previous one's
            path = os.path.join(self.backup_dir, stale)
            if not stale.endswith(".weights.h5") or stale in checkpoints.values():
                continue
            with contextlib.suppress(OSError):
                # A temporary file untouched since before this save began is a write torn by a kill
                # (as large as the model); one still being written belongs to another writer.
                if not stale.startswith(".tmp-") or os.path.getmtime(path) < started - TORN_WRITE_AGE:
                    os.remove(path)


def _seed_state_variables(model):
    """Dropout's SeedGenerator states: part of the training state, but not of `save_weights`."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]
