"""Pause background training jobs (SIGSTOP) while a benchmark times something, and resume them (SIGCONT).

No TensorFlow or Keras here, so every benchmark can use it on either backend.
"""

import contextlib
import os
import signal
import sys
import time


def find_jobs(dataset="cifar10"):
    """PIDs of `... train.py ... --dataset <dataset> ...` processes (by their argv, never this one)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not any(a.endswith("train.py") for a in argv) or "--dataset" not in argv[:-1]:
            continue
        if argv[argv.index("--dataset") + 1] == dataset:
            pids.append(int(entry))
    return pids


class PauseJobs(contextlib.AbstractContextManager):
    """SIGSTOP the matching background jobs for a `with` block; SIGCONT them on exit, on SIGTERM/SIGINT and at exit.

    Args:
        dataset: str or None. Pause `train.py --dataset <dataset>` jobs; None pauses nothing.
        max_seconds: float. Warn when a pause lasted longer than this. Defaults to 150.
    """

    paused_total_s = 0.0
    pauses = 0

    def __init__(self, dataset=None, max_seconds=150.0):
        self.dataset = dataset
        self.max_seconds = max_seconds
        self.pids = []

    def __enter__(self):
        if self.dataset is None:
            return self
        self.pids = find_jobs(self.dataset)
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self._start = time.perf_counter()
        return self

    def resume(self):
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.pids = []

    def _on_signal(self, signum, frame):
        self.resume()
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self.dataset is None:
            return False
        self.resume()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        elapsed = time.perf_counter() - self._start
        PauseJobs.paused_total_s += elapsed
        PauseJobs.pauses += 1
        if elapsed > self.max_seconds:
            print(f"[pause] warning: a pause lasted {elapsed:.0f} s (> {self.max_seconds:.0f} s)", file=sys.stderr)
        return False
