"""Timing helpers shared by the benchmark scripts (keras only, so the JAX GPU check can use them)."""

import time

import keras


class EpochTimer(keras.callbacks.Callback):
    """Wall time of every epoch of `fit`."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
