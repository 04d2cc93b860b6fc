"""What a run says as it goes: the header, a line per phase, and numbered epoch lines in a redirected log.

A log read later (nohup, CI, a batch queue) must say what ran without the command line beside it:
the header names the data read, the network, the variant and each phase's schedule, and every
epoch line carries its phase and number (`[cluster 3/95] ...`). In a terminal Keras's progress
bars are kept as they are; only the header and the phase lines are added.
"""

import sys

import keras

from keras_cwsn.config import phase_settings
from keras_cwsn.variants import CLASSIFIER_VARIANT

VARIANT_WORDS = {CLASSIFIER_VARIANT: "the cross-entropy baseline, no clustering phase"}


def _split_folders(split):
    report = split.report or {}
    return (report.get("folder") or report.get("source"), report.get("split"))  # Birdsnap: one folder, two splits


def skipped_files(splits):
    """(count, an example or None) of the files the splits' loading skipped, each folder counted once."""
    count, example, seen = 0, None, set()
    for split in splits:
        report = split.report or {}
        key = _split_folders(split) if _split_folders(split)[0] else id(split)
        if key in seen:  # train and the held-out val come from one folder: one report
            continue
        seen.add(key)
        undecodable = report.get("skipped_undecodable") or []
        count += len(undecodable) + int(report.get("skipped_missing", 0)) + int(report.get("skipped_corrupt", 0))
        example = example or (undecodable[0] if undecodable else None)
    return count, example


def data_source(config, split):
    """Where a split's images came from, in words: the folder or download, TFDS, or the embedded data."""
    report = split.report or {}
    if report.get("source"):
        return report["source"]
    if config["dataset"] == "synthetic":
        return "embedded synthetic data"
    return config["data_dir"] or f"TFDS {config['dataset']}"


def data_line(config, data):
    """One line saying what a run read: source, split sizes, classes, skipped files (printed, and in metrics.json)."""
    info = data.info
    held_out = (data.evaluation.report or {}).get("held_out_per_class")
    eval_words = f"{data.eval_split} {len(data.evaluation)}" + (
        f" (the last {held_out} per class of train/)" if held_out and data.eval_split == "val" else "")
    count, example = skipped_files((data.train, data.evaluation))
    skipped = f"skipped {count} file(s)" + (f", e.g. {example}" if example else "")
    return (f"{config['dataset']} from {data_source(config, data.train)}: train {len(data.train)}, {eval_words} "
            f"images; {info.num_fine} classes in {info.num_coarse} groups; {skipped}")


def _phase_words(settings):
    return f"{settings['epochs']} epochs, batch {settings['batch_size']}, lr {settings['learning_rate']:g}"


def header(config, data, output_dir):
    """The lines a run opens with: data, network and variant, each phase's schedule, the split of the figures, folder."""
    variant = config["variant"]
    words = VARIANT_WORDS.get(variant, f"clustering warm start, criterion {config['criterion']}, head {config['head']}")
    phases = [] if variant == CLASSIFIER_VARIANT else ["cluster"]
    schedule = "; ".join(f"{p} {_phase_words(phase_settings(config, p))}" for p in phases + ["classify"])
    return [
        f"[run] data: {data_line(config, data)}",
        f"[run] network {config['arch']}{' (double width)' if config['double'] else ''}, variant {variant} ({words}), "
        f"seed {config['seed']}, backend {keras.backend.backend()}",
        f"[run] schedule: {schedule}",
        f"[run] figures on the {data.eval_split} split ({len(data.evaluation)} images): the val_* keys of the history "
        f"CSVs and TensorBoard are on it; epoch lines below name it {data.eval_split}_*",
        f"[run] output: {output_dir}",
    ]


def phase_line(phase, settings, variant, first_epoch=0):
    """`[cluster] phase 1 of 2: ...` before a phase's first epoch."""
    count = 1 if variant == CLASSIFIER_VARIANT else 2
    number = 1 if phase == "cluster" or count == 1 else 2
    what = {"cluster": "clustering pretraining (pairwise loss on same-or-different labels)",
            "classify": "classification" + (" from scratch" if count == 1 else ", warm-started from the clusterer")}
    resumed = f", resuming after epoch {first_epoch}" if first_epoch else ""
    return f"[{phase}] phase {number} of {count}: {what[phase]}; {_phase_words(settings)}{resumed}"


def progress_bars():
    """Whether `fit` draws its own progress bars (a terminal) rather than this module's epoch lines (a file or pipe)."""
    return sys.stdout.isatty()


def _format(value):
    if isinstance(value, float) or hasattr(value, "dtype"):
        value = float(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


class EpochLine(keras.callbacks.Callback):
    """One line per epoch, `[cluster 3/95] loss 1.234 - test_cluster_accuracy 0.5 - ... - 12.3 s`.

    For logs that are not a terminal. Keys that Keras names `val_*` are printed with the split the
    figures are on (`test_*` when the run reports on test). Place it after the callbacks that add to
    the epoch's logs (metrics, learning rate, `EpochTimer`).
    """

    def __init__(self, phase, epochs, eval_split, stream=None):
        super().__init__()
        self.phase, self.epochs, self.eval_split, self.stream = phase, epochs, eval_split, stream

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        seconds = logs.pop("epoch_seconds", None)
        parts = [f"{self.eval_split}_{k[4:]}" if k.startswith("val_") else k for k in logs]
        text = " - ".join(f"{name} {_format(v)}" for name, v in zip(parts, logs.values()))
        tail = f" - {seconds:.1f} s" if seconds is not None else ""
        print(f"[{self.phase} {epoch + 1}/{self.epochs}] {text}{tail}", file=self.stream or sys.stdout, flush=True)
