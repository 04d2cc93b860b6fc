"""Timing helpers shared by the benchmark scripts (keras only, so the JAX GPU check can use them)."""

import statistics
import time

import keras

from pause import PauseJobs


class EpochTimer(keras.callbacks.Callback):
    """Wall time of every epoch of `fit`."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def train_steps_call(model, steps):
    """One `tf.function` running `steps` calls of `model.train_step` on one batch (TensorFlow backend)."""
    import tensorflow as tf

    @tf.function
    def run(x, y):
        for _ in tf.range(steps):
            model.train_step((x, y))
        return 0

    return run


def time_interleaved(calls, inputs, rounds, pause=None, per_call=1):
    """Time named calls in turns, the order reversed every other round (after one warm-up call each).

    On a shared machine whose speed drifts from round to round, the per-round ratio holds still
    where the medians of the cases do not.

    Args:
        calls: dict name -> callable; the first is the reference.
        inputs: tuple of arguments for every call.
        rounds: int. Timed rounds.
        pause: dataset name for `pause.PauseJobs` (SIGSTOP matching training jobs per round), or None.
        per_call: int. Units (steps) one call runs; times are reported per unit.

    Returns:
        (median ms per unit of each name, median over rounds of name's time / the reference's time).
    """
    for call in calls.values():
        call(*inputs)  # trace and warm up
    times = {name: [] for name in calls}
    for r in range(rounds):
        with PauseJobs(pause):
            for name, call in (list(calls.items()) if r % 2 == 0 else reversed(calls.items())):
                start = time.perf_counter()
                call(*inputs)
                times[name].append((time.perf_counter() - start) / per_call * 1000)
    reference = times[next(iter(calls))]
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: statistics.median(a / b for a, b in zip(t, reference)) for name, t in times.items()}
    return medians, ratios
