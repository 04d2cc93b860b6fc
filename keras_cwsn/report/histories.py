"""The runs' per-epoch histories (Keras CSVLogger files): one figure's curve, and its best epoch."""

import csv
import os

import numpy as np

# figure -> (history file, columns it may be in (the first one present is read), axis label, scale).
CURVES = {
    "cluster_accuracy": ("cluster_history.csv", ("val_cluster_accuracy",), "clustering accuracy %", 100.0),
    "nmi": ("cluster_history.csv", ("val_nmi",), "NMI", 1.0),
    "classification_accuracy": ("classify_history.csv", ("val_accuracy", "val_classification_accuracy"),
                                "classification accuracy %", 100.0),
}


MISSING = (None, "", "NA")  # how a history CSV leaves a cell without a figure


def read_history(path):
    """A Keras CSVLogger file as {column: float array}, one row per epoch (`epoch` counted from 0).

    Where an epoch appears more than once (a run resumed from an earlier checkpoint logs it again),
    the last row wins. Empty cells and CSVLogger's "NA" (a figure not computed that epoch, as with
    `metrics_every` > 1) read as NaN.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    by_epoch = {}
    for row in rows:
        if row.get("epoch") not in (None, ""):
            by_epoch[int(float(row["epoch"]))] = row
    epochs = sorted(by_epoch)
    columns = rows[0].keys() if rows else ()
    history = {"epoch": np.array(epochs, dtype=int)}
    for column in columns:
        if column != "epoch":
            history[column] = np.array([float(by_epoch[e][column]) if by_epoch[e].get(column) not in MISSING
                                        else np.nan for e in epochs], dtype=float)
    return history


def run_curve(run_dir, figure):
    """(epochs, values) of one figure of one run, on CURVES' scale; None where the run has no such history."""
    filename, columns, _, scale = CURVES[figure]
    path = os.path.join(run_dir, filename)
    if not os.path.isfile(path):
        return None
    history = read_history(path)
    column = next((c for c in columns if c in history), None)
    if column is None:
        return None
    return history["epoch"], history[column] * scale


def run_peak(run_dir, figure):
    """(value, epoch counted from 1) of the best epoch of one figure of one run, None without its history.

    NaN epochs (a figure not computed that epoch) are skipped; ties go to the earliest epoch.
    """
    curve = run_curve(run_dir, figure)
    if curve is None or not np.any(np.isfinite(curve[1])):
        return None
    epochs, values = curve
    best = int(np.nanargmax(values))
    return float(values[best]), int(epochs[best]) + 1
