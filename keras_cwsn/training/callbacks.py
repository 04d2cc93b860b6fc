"""The protocol's callbacks: stop on divergence, the step learning-rate schedule, epoch timing, a resumable warm start.

Each publishes what it measures into the epoch `logs`, so History, CSVLogger and TensorBoard record it.
"""

import json
import os
import time

import keras
import numpy as np
from keras import ops

from keras_cwsn.atomic import write_json_atomic
from keras_cwsn.config import learning_rate_at
from keras_cwsn.errors import RunError
from keras_cwsn.warmstart import WarmStart


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


class StepLearningRate(keras.callbacks.LearningRateScheduler):
    """Keras's `LearningRateScheduler` on the phase's step schedule (`config.learning_rate_at`).

    It logs the schedule's rate rather than the optimizer's float32 copy of it, so the history
    reads 0.005, as it always has, not 0.004999999888241291.

    Args:
        settings: dict. The phase's settings (`config.phase_settings`).
    """

    def __init__(self, settings):
        super().__init__(lambda epoch, rate: float(learning_rate_at(epoch, settings)))
        self.settings = settings

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(learning_rate_at(epoch, self.settings))


class EpochTimer(keras.callbacks.Callback):
    """Log each epoch's wall time (`epoch_seconds`: its steps, validation and per-epoch figures).

    Place it after the callbacks whose time should count and before CSVLogger and TensorBoard.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = round(time.perf_counter() - self._start, 3)


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
