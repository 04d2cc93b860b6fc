"""Gather runs into a Markdown results table beside the paper's Table 3, and optionally PNG plots.

    python -m keras_cwsn.report runs/cifar10-* > docs/RESULTS.md
    python -m keras_cwsn.report runs/cifar10-* --plots docs/figures > docs/RESULTS.md

Each argument is a run folder (metrics.json) or a multi-seed folder (seed_*/metrics.json); runs
are grouped by dataset, network, variant, recipe settings and schedule, and reported as mean ±
sample std (n - 1) and best over seeds, with the difference from the paper and from the
cross-entropy baseline of the same schedule and settings (Welch's t-test p-value). A run whose
criterion, margin, head, weight decay, initialisation, BatchNorm or augmentation is not the paper's gets a
row of its own (ROW_SETTINGS), e.g. "A mcl", "D decoupled-wd", "ce keras-init".

--plots DIR also writes, per table, two PNG figures read from the runs' per-epoch histories:
DIR/<table>-cluster.png (clustering accuracy and NMI per epoch of the cluster phase) and
DIR/<table>-classify.png (classification accuracy per epoch of the warm start, with the `ce`
baseline), each variant's mean over seeds as a line and its min-max over seeds as a band. It
needs matplotlib (pip install matplotlib).

--peaks also prints, per table, each row's figures at its best epoch rather than its last: per run
the highest held-out clustering and warm-start accuracy over the epochs of its histories and the
epoch it came at. The paper reports "the top performing results out of 5 runs" after a fixed
number of epochs without saying which epoch; this bounds what picking the best epoch (an
optimistic choice, made on the evaluated split itself) could add to the last-epoch table.
"""

import argparse
import csv
import glob
import hashlib
import json
import os
import re
import sys
import warnings

import numpy as np
from scipy import stats

from keras_cwsn.constants import FIGURES, VALUES_BEFORE_THE_KEY
from keras_cwsn.errors import UserError

# Table 3 of the paper (best of 5 runs): clustering accuracy %, NMI, purity, warm-start classification %.
PAPER_TABLE3 = {
    ("cifar10", "lenet"): {
        "ce": (None, None, None, 75.48), "A": (74.21, 0.55, 0.74, 75.75), "B": (72.66, 0.54, 0.73, 75.42),
        "C": (72.84, 0.55, 0.73, 75.11), "D": (74.17, 0.56, 0.74, 75.53),
    },
    ("birdsnap34", "alexnet"): {
        "ce": (None, None, None, 53.50), "A": (17.20, 0.39, 0.17, 50.32), "B": (20.38, 0.45, 0.20, 45.86),
        "C": (24.84, 0.51, 0.25, 70.70), "D": (22.29, 0.49, 0.22, 65.61),
    },
}
PERCENT = {"cluster_accuracy", "classification_accuracy"}
VARIANT_ORDER = ("ce", "A", "B", "C", "D")


def find_metrics(paths):
    """Every metrics.json under the given run folders (a folder itself, or its seed_* children)."""
    found = []
    for path in paths:
        if os.path.isfile(path) and path.endswith(".json"):
            found.append(path)
        elif os.path.isfile(os.path.join(path, "metrics.json")):
            found.append(os.path.join(path, "metrics.json"))
        else:
            found += sorted(glob.glob(os.path.join(path, "**", "metrics.json"), recursive=True))
    if not found:
        raise FileNotFoundError(f"No metrics.json under {', '.join(paths)}.")
    return found


# Recipe settings that put a run in a row of its own where they differ from the paper's (the
# defaults): key -> (default, the row label's suffix for a value, whether it only concerns
# clusterers). A run from before a key existed is read as the code ran then (VALUES_BEFORE_THE_KEY,
# as resuming reads it): the 6- and 12-epoch runs predate `weight_decay_mode` and used decoupled decay.
ROW_SETTINGS = {
    "criterion": ("kcl", lambda value: value, True),
    "margin": (2.0, lambda value: f"margin-{value:g}", True),
    "head": ("hungarian", lambda value: f"{value}-head", True),
    "weight_decay_mode": ("coupled", lambda value: f"{value}-wd", False),
    "init": ("torch", lambda value: f"{value}-init", False),
    "batchnorm": ("keras", lambda value: f"{value}-bn", False),
    "augment": (False, lambda value: "augment", False),
    "last_layer_weight_decay": (True, lambda value: "no-fc3-wd", False),
}


def row_label(config):
    """The table row of a run: its variant, then each setting of ROW_SETTINGS that is not the paper's,
    e.g. "A", "A mcl", "D decoupled-wd", "ce keras-init" (`ce` has no pairwise loss and no warm start)."""
    parts = [config["variant"]]
    for key, (default, suffix, clusterer_only) in ROW_SETTINGS.items():
        value = config.get(key, VALUES_BEFORE_THE_KEY.get(key, default))
        if value != default and not (clusterer_only and config["variant"] == "ce"):
            parts.append(suffix(value))
    return " ".join(parts)


def baseline_label(config):
    """The row of the `ce` baseline a run is compared with: `ce` trained with the same settings
    (those that concern only clusterers aside)."""
    return row_label(dict(config, variant="ce"))


def _variant_sort_key(label):
    variant, _, criterion = label.partition(" ")
    return (VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else 99, criterion)


def group_runs(metric_files):
    """{(dataset, arch, double, schedule_scale, row label): [metrics dicts]}; each dict gets `run_dir`,
    the folder its metrics.json is in (where the per-epoch histories are)."""
    groups = {}
    for path in metric_files:
        with open(path) as f:
            m = json.load(f)
        m["run_dir"] = os.path.dirname(os.path.abspath(path))
        c = m["config"]
        data = json.dumps(c.get("synthetic") or {}, sort_keys=True) if c["dataset"] == "synthetic" else ""
        key = (c["dataset"] + (f" {data}" if data else ""), c["arch"], bool(c.get("double")),
               c.get("schedule_scale", 1.0), row_label(c))
        groups.setdefault(key, []).append(m)
    return groups


def seed_std(values):
    """The sample standard deviation over seeds (n - 1: a handful of seeds estimates a spread), None for one seed."""
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if values.size > 1 else None


def _cell(values):
    """One table cell over seeds: "mean ± std (best max)" ("mean (best max)" for one seed)."""
    values = np.asarray(values, dtype=float)
    std = seed_std(values)
    spread = f" ± {std:.2f}" if std is not None else ""
    return f"{values.mean():.2f}{spread} (best {values.max():.2f})"


def _paper_text(figures):
    return " / ".join("—" if v is None else f"{v}" for v in figures)


def versus_baseline(runs, baseline_runs):
    """Warm-start accuracy minus the cross-entropy baseline's (points) and Welch's t-test p-value.

    The question a reproduction must answer is whether a variant beats the baseline beyond the seed
    spread; with a handful of seeds a p-value says it more honestly than overlapping ± ranges. "—" when
    either side has fewer than two runs.
    """
    ours = [100.0 * r["classification_accuracy"] for r in runs]
    base = [100.0 * r["classification_accuracy"] for r in baseline_runs]
    if len(ours) < 2 or len(base) < 2:
        return "—"
    p_value = stats.ttest_ind(ours, base, equal_var=False).pvalue
    p_text = "p < 0.01" if p_value < 0.01 else f"p = {p_value:.2f}"  # "p = 0.00" would claim p is zero
    return f"{np.mean(ours) - np.mean(base):+.2f} ({p_text})"


def markdown_table(groups):
    """One Markdown table per (dataset, network, schedule): ours (mean ± std, best) | paper | differences."""
    lines = []
    tables = sorted({k[:4] for k in groups})
    for dataset, arch, double, scale in tables:
        paper = PAPER_TABLE3.get((dataset, arch), {})
        lines += [f"### {dataset} / {arch}{' (double)' if double else ''}, schedule_scale {scale}", "",
                  "| variant | seeds | cluster acc. % | NMI | purity | warm-start class. acc. % | paper (acc / NMI / purity / class.) | ours − paper (class., mean) | ours − ce (class., Welch p) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        variants = sorted((k[4] for k in groups if k[:4] == (dataset, arch, double, scale)), key=_variant_sort_key)
        for variant in variants:
            runs = groups[(dataset, arch, double, scale, variant)]
            cells, means = [], {}
            for key in FIGURES:
                values = [r[key] for r in runs if r.get(key) is not None]
                if values:
                    values = np.asarray(values, dtype=float) * (100.0 if key in PERCENT else 1.0)
                    cells.append(_cell(values))
                    means[key] = values.mean()
                else:
                    cells.append("—")
            ref = paper.get(variant.partition(" ")[0])  # the paper's figures are KCL's
            ref_text = _paper_text(ref) if ref else "—"
            diff = f"{means['classification_accuracy'] - ref[3]:+.2f}" if ref and "classification_accuracy" in means else "—"
            seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
            baseline = groups.get((dataset, arch, double, scale, baseline_label(runs[0]["config"])), [])
            versus = versus_baseline(runs, baseline) if variant.partition(" ")[0] != "ce" else "—"
            lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + f" | {ref_text} | {diff} | {versus} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots: per-epoch curves from the runs' CSV histories
# ---------------------------------------------------------------------------------------------

# figure -> (history file, columns it may be in (the first one present is read), axis label, scale).
CURVES = {
    "cluster_accuracy": ("cluster_history.csv", ("val_cluster_accuracy",), "clustering accuracy %", 100.0),
    "nmi": ("cluster_history.csv", ("val_nmi",), "NMI", 1.0),
    "classification_accuracy": ("classify_history.csv", ("val_accuracy", "val_classification_accuracy"),
                                "classification accuracy %", 100.0),
}


def read_history(path):
    """A Keras CSVLogger file as {column: float array}, one row per epoch (`epoch` counted from 0).

    Where an epoch appears more than once (a run resumed from an earlier checkpoint logs it again),
    the last row wins. Empty cells read as NaN.
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
            history[column] = np.array([float(by_epoch[e][column]) if by_epoch[e].get(column) not in (None, "")
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
    for key in sorted({k[:4] for k in groups}):
        labels = sorted((k[4] for k in groups if k[:4] == key), key=_variant_sort_key)
        out[key] = {}
        for figure in CURVES:
            rows = {}
            for label in labels:
                curves = [c for c in (run_curve(m["run_dir"], figure) for m in groups[key + (label,)]) if c is not None]
                if curves:
                    rows[label] = (aggregate_curves(curves), len(curves))
            out[key][figure] = rows
    return out


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


def peak_table(groups):
    """Markdown tables of each row's best-epoch figures: mean ± std (best) over seeds, and each seed's epoch."""
    lines = []
    for key in sorted({k[:4] for k in groups}):
        dataset, arch, double, scale = key
        paper = PAPER_TABLE3.get((dataset, arch), {})
        lines += [f"### {dataset} / {arch}{' (double)' if double else ''}, schedule_scale {scale}: best epoch",
                  "", "| variant | seeds | cluster acc. % at its best epoch | epochs | warm-start class. acc. % at "
                  "its best epoch | epochs | last epoch (class., mean) | paper (acc / class.) |",
                  "|---|---|---|---|---|---|---|---|"]
        for label in sorted((k[4] for k in groups if k[:4] == key), key=_variant_sort_key):
            runs = sorted(groups[key + (label,)], key=lambda r: r["seed"])
            cells = []
            for figure in ("cluster_accuracy", "classification_accuracy"):
                peaks = [p for p in (run_peak(r["run_dir"], figure) for r in runs) if p is not None]
                if peaks:
                    cells.append(_cell([value for value, _ in peaks]))
                    cells.append(", ".join(str(epoch) for _, epoch in peaks))
                else:
                    cells += ["—", "—"]
            last = [100.0 * r["classification_accuracy"] for r in runs if r.get("classification_accuracy") is not None]
            cells.append(f"{np.mean(last):.2f}" if last else "—")
            ref = paper.get(label.partition(" ")[0])
            cells.append(_paper_text((ref[0], ref[3])) if ref else "—")
            seeds = ",".join(str(r["seed"]) for r in runs)
            lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def figure_slug(table_key):
    """A file-name stem for a results table: `cifar10-lenet-s0.0632`, `synthetic-1a2b3c4d-lenet-s1`."""
    dataset, arch, double, scale = table_key
    name, _, settings = dataset.partition(" ")
    if settings:
        name += "-" + hashlib.sha1(settings.encode()).hexdigest()[:8]
    slug = f"{name}-{arch}{'-double' if double else ''}-s{scale:g}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", slug)


def _import_pyplot():
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
        if variant == "ce":
            styles[label] = {"color": ("black", "dimgray", "darkgray")[k % 3],
                             "linestyle": ("--", ":", (0, (5, 1, 1, 1)))[k % 3]}
        else:
            index = VARIANT_ORDER.index(variant) - 1 if variant in VARIANT_ORDER else 4
            styles[label] = {"color": f"C{(index + 4 * k) % 10}", "linestyle": ("-", "-.", ":")[k % 3]}
    return styles


def _draw(ax, rows, figure, styles):
    for label, (agg, n) in rows.items():
        x = agg["epoch"] + 1  # after epoch 1, 2, ...
        style = styles[label]
        name = "ce (baseline)" if label == "ce" else label
        ax.plot(x, agg["mean"], marker="o", markersize=3, label=f"{name} ({n} seed{'s' if n > 1 else ''})",
                **style)
        if n > 1:
            ax.fill_between(x, agg["min"], agg["max"], alpha=0.15, color=style["color"], linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(CURVES[figure][2])
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)


def make_figures(table_key, curves, split="val"):
    """The matplotlib figures of one results table: {"cluster": Figure, "classify": Figure} (either left
    out where no run has its history). `curves` is one entry of `table_curves`."""
    plt = _import_pyplot()
    dataset, arch, double, scale = table_key
    title = f"{dataset} / {arch}{' (double)' if double else ''}, schedule_scale {scale:g}"
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
    plt = _import_pyplot()
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m keras_cwsn.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or metrics.json files")
    parser.add_argument("--plots", metavar="DIR", default=None,
                        help="also write PNG figures of the per-epoch curves into DIR (needs matplotlib)")
    parser.add_argument("--peaks", action="store_true",
                        help="also print each row's figures at its best epoch (from the runs' histories)")
    args = parser.parse_args(argv)
    try:
        groups = group_runs(find_metrics(args.runs))
        if args.plots is not None:
            _import_pyplot()  # fail before printing anything
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(groups))
    if args.peaks:
        print(peak_table(groups))
    if args.plots is not None:
        try:
            for path in plot_figures(groups, args.plots):
                print(f"wrote {path}", file=sys.stderr)
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
