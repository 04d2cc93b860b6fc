"""PNG figures of the runs' per-epoch curves: per results table, the cluster phase and the warm start.

Each row's mean over seeds is a line and its min-max over seeds a band. Needs matplotlib, imported
only when a figure is drawn.
"""

import hashlib
import os
import re
import warnings

import numpy as np

from keras_cwsn.errors import UserError
from keras_cwsn.report.histories import CURVES, run_curve
from keras_cwsn.report.tables import table_rows, table_title
from keras_cwsn.variants import CLASSIFIER_VARIANT, VARIANTS


def aggregate_curves(curves):
    """Mean, sample std, min and max over runs per epoch, from a list of (epochs, values).

    Runs of different lengths are aligned by epoch; each epoch aggregates the runs that reached it
    (`count`). Returns {"epoch", "mean", "std", "min", "max", "count"} arrays (std NaN for one run).
    """
    epochs = sorted({int(e) for ep, _ in curves for e in ep})
    table = np.full((len(curves), len(epochs)), np.nan)
    column = {e: i for i, e in enumerate(epochs)}
    for r, (ep, values) in enumerate(curves):
        for e, v in zip(ep, values):
            table[r, column[int(e)]] = v
    count = np.sum(~np.isnan(table), axis=0)
    with warnings.catch_warnings():  # an epoch with no value (all NaN) gives NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        std = np.nanstd(table, axis=0, ddof=1) if len(curves) > 1 else np.full(len(epochs), np.nan)
        return {"epoch": np.array(epochs, dtype=int), "mean": np.nanmean(table, axis=0),
                "std": np.where(count > 1, std, np.nan), "min": np.nanmin(table, axis=0),
                "max": np.nanmax(table, axis=0), "count": count}


def table_curves(groups):
    """Per results table, per figure, per row label: the aggregate of its runs' curves (runs without one skipped).

    Returns {(dataset, arch, double, schedule_scale): {figure: {label: (aggregate, number of runs)}}}, with
    rows in table order; the classification figure includes the `ce` baseline.
    """
    out = {}
    for key, labels in table_rows(groups):
        out[key] = {}
        for figure in CURVES:
            rows = {}
            for label in labels:
                curves = [c for c in (run_curve(m["run_dir"], figure) for m in groups[key + (label,)]) if c is not None]
                if curves:
                    rows[label] = (aggregate_curves(curves), len(curves))
            out[key][figure] = rows
    return out


def figure_slug(table_key):
    """A file-name stem for a results table: `cifar10-lenet-s0.0632`, `synthetic-1a2b3c4d-lenet-s1`."""
    dataset, arch, double, scale = table_key
    name, _, settings = dataset.partition(" ")
    if settings:
        name += "-" + hashlib.sha1(settings.encode()).hexdigest()[:8]
    slug = f"{name}-{arch}{'-double' if double else ''}-s{scale:g}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", slug)


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plots needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _styles(labels):
    """Line colour and style of each row of a table, all distinct: a variant keeps its colour (ce black,
    A-D C0-C3) for its first settings suffix, in order of fewest settings, and each further suffix
    shifts the colour by 4 and changes the line (ce: grey and dotted)."""
    suffixes = sorted({label.partition(" ")[2] for label in labels}, key=lambda s: (len(s.split()), s))
    styles = {}
    for label in labels:
        variant, _, settings = label.partition(" ")
        k = suffixes.index(settings)
        if variant == CLASSIFIER_VARIANT:
            styles[label] = {"color": ("black", "dimgray", "darkgray")[k % 3],
                             "linestyle": ("--", ":", (0, (5, 1, 1, 1)))[k % 3]}
        else:
            index = list(VARIANTS).index(variant) if variant in VARIANTS else 4
            styles[label] = {"color": f"C{(index + 4 * k) % 10}", "linestyle": ("-", "-.", ":")[k % 3]}
    return styles


def _draw(ax, rows, figure, styles):
    for label, (agg, n) in rows.items():
        measured = np.isfinite(agg["mean"])  # epochs without figures (`metrics_every` > 1) are left out, not gaps
        x = agg["epoch"][measured] + 1  # after epoch 1, 2, ...
        style = styles[label]
        name = f"{label} (baseline)" if label == CLASSIFIER_VARIANT else label
        ax.plot(x, agg["mean"][measured], marker="o", markersize=3,
                label=f"{name} ({n} seed{'s' if n > 1 else ''})", **style)
        if n > 1:
            ax.fill_between(x, agg["min"][measured], agg["max"][measured], alpha=0.15, color=style["color"],
                            linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(CURVES[figure][2])
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)


def make_figures(table_key, curves, split="val"):
    """The matplotlib figures of one results table: {"cluster": Figure, "classify": Figure} (either left
    out where no run has its history). `curves` is one entry of `table_curves`."""
    plt = import_pyplot()
    title = table_title(table_key, "g")
    spread = "line: mean over seeds, band: min-max"
    figures = {}
    styles = _styles({label for rows in curves.values() for label in rows})  # the same in both figures
    if curves["cluster_accuracy"] or curves["nmi"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, figure in zip(axes, ("cluster_accuracy", "nmi")):
            _draw(ax, curves[figure], figure, styles)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{title}\ncluster phase, {split} split ({spread})", fontsize=10)
        fig.tight_layout()
        figures["cluster"] = fig
    if curves["classification_accuracy"]:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        _draw(ax, curves["classification_accuracy"], "classification_accuracy", styles)
        ax.legend(fontsize=8)
        fig.suptitle(f"{title}\nwarm start vs ce, {split} split ({spread})", fontsize=10)
        fig.tight_layout()
        figures["classify"] = fig
    return figures


def plot_figures(groups, out_dir):
    """Write every table's PNG figures into `out_dir` (created); returns the paths written."""
    plt = import_pyplot()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for table_key, curves in table_curves(groups).items():
        runs = [m for k, ms in groups.items() if k[:4] == table_key for m in ms]
        split = "/".join(sorted({str(m.get("eval_split") or m["config"].get("eval_split", "val")) for m in runs}))
        for name, fig in make_figures(table_key, curves, split).items():
            path = os.path.join(out_dir, f"{figure_slug(table_key)}-{name}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


