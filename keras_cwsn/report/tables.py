"""The results tables: runs grouped into rows, mean ± std and best over seeds beside the paper's Table 3.

Runs are grouped by dataset, network, schedule and row label (the variant, then each recipe setting
that is not the paper's: `ROW_SETTINGS`), and reported as mean ± sample std (n - 1) and best over
seeds, with the difference from the paper and from the cross-entropy baseline of the same schedule
and settings (Welch's t-test p-value). `peak_table` gives each row's figures at its best epoch.
"""

import glob
import json
import os

import numpy as np
from scipy import stats

from keras_cwsn.config import KEYS, VALUES_BEFORE_THE_KEY, recipe_defaults
from keras_cwsn.constants import FIGURES
from keras_cwsn.data.registry import DATASETS
from keras_cwsn.metrics import seed_std
from keras_cwsn.report.histories import run_peak
from keras_cwsn.variants import CLASSIFIER_VARIANT, VARIANTS

# The paper's Tables 3 (best of 5 runs) and 4 (double width), by (dataset, network, double): clustering
# accuracy %, NMI, purity, warm-start classification %.
PAPER_TABLES = {
    ("cifar10", "lenet", False): {
        "ce": (None, None, None, 75.48), "A": (74.21, 0.55, 0.74, 75.75), "B": (72.66, 0.54, 0.73, 75.42),
        "C": (72.84, 0.55, 0.73, 75.11), "D": (74.17, 0.56, 0.74, 75.53),
    },
    ("birdsnap34", "alexnet", False): {
        "ce": (None, None, None, 53.50), "A": (17.20, 0.39, 0.17, 50.32), "B": (20.38, 0.45, 0.20, 45.86),
        "C": (24.84, 0.51, 0.25, 70.70), "D": (22.29, 0.49, 0.22, 65.61),
    },
    ("birdsnap34", "alexnet", True): {"A": (22.93, 0.49, 0.23, 59.24)},
}
# Whether a clusterer's clusters follow the hierarchy (`metrics.coarse_agreement`): a column of its own in
# the tables where a run has it (training records it; older runs may have it from `evaluate`).
HIERARCHY_FIGURE = "coarse_agreement"
PERCENT = {"cluster_accuracy", "classification_accuracy", HIERARCHY_FIGURE}
FIGURE_HEADERS = {"cluster_accuracy": "cluster acc. %", "nmi": "NMI", "purity": "purity",
                  HIERARCHY_FIGURE: "clusters in the true coarse class %",
                  "classification_accuracy": "warm-start class. acc. %"}
VARIANT_ORDER = (CLASSIFIER_VARIANT, *VARIANTS)  # the baseline's row first, then the variant table's order


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
# clusterers), from the config's keys. A run from before a key existed is read as the code ran then
# (VALUES_BEFORE_THE_KEY, as resuming reads it): the 6- and 12-epoch runs predate `weight_decay_mode`
# and used decoupled decay.
ROW_SETTINGS = {name: (key.default, key.row, key.clusterer_only) for name, key in KEYS.items() if key.row}


def row_label(config):
    """The table row of a run: its variant, then each setting of ROW_SETTINGS that is not the paper's
    (as the dataset's config file has it: `config.recipe_defaults`), e.g. "A", "A mcl", "D decoupled-wd", "ce keras-init" (`ce` has no pairwise loss and no warm start)."""
    parts = [config["variant"]]
    recipe = recipe_defaults(config.get("dataset"), config.get("arch"))
    for key, (default, suffix, clusterer_only) in ROW_SETTINGS.items():
        default = recipe.get(key, default)
        value = config.get(key, VALUES_BEFORE_THE_KEY.get(key, default))
        if value != default and not (clusterer_only and config["variant"] == CLASSIFIER_VARIANT):
            parts.append(suffix(value))
    return " ".join(parts)


def baseline_label(config):
    """The row of the `ce` baseline a run is compared with: `ce` trained with the same settings
    (those that concern only clusterers aside)."""
    return row_label(dict(config, variant=CLASSIFIER_VARIANT))


def _variant_sort_key(label):
    variant, _, criterion = label.partition(" ")
    return (VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else 99, criterion)


def table_rows(groups):
    """[(table key (dataset, arch, double, schedule_scale), its row labels in table order)], tables sorted."""
    return [(key, sorted((k[4] for k in groups if k[:4] == key), key=_variant_sort_key))
            for key in sorted({k[:4] for k in groups})]


def paper_reference(table_key):
    """(the paper's dataset a table is read against, its rows {variant: figures}); rows {} where the paper has none."""
    dataset, arch, double = table_key[:3]
    name = dataset.partition(" ")[0]  # without the qualifiers of `group_runs`
    spec = DATASETS.get(name)
    paper_dataset = (spec.paper_rows if spec else None) or name
    return paper_dataset, PAPER_TABLES.get((paper_dataset, arch, double), {})


def _paper_header(dataset, paper_dataset, figures):
    return f"paper{'' if paper_dataset == dataset else ', ' + paper_dataset} ({figures})"


def table_title(table_key, scale_format=""):
    dataset, arch, double, scale = table_key
    return f"{dataset} / {arch}{' (double)' if double else ''}, schedule_scale {scale:{scale_format}}"


def group_runs(metric_files):
    """{(dataset, arch, double, schedule_scale, row label): [metrics dicts]}; each dict gets `run_dir`,
    the folder its metrics.json is in (where the per-epoch histories are).

    `dataset` names the data itself: a user's folder with its table and columns, the embedded set
    with its settings. Runs of one table that differ in a setting of `TABLE_SPLITTERS` (the split
    reported on, the number of epochs) are never averaged: the table splits in two, the setting
    named after the dataset, e.g. "cifar10 eval=val"."""
    tables = {}
    for path in metric_files:
        with open(path) as f:
            m = json.load(f)
        m["run_dir"] = os.path.dirname(os.path.abspath(path))
        _add_evaluated_hierarchy_figure(m)
        c = m["config"]
        tables.setdefault((_data_name(c), c["arch"], bool(c.get("double")), c.get("schedule_scale", 1.0)),
                          []).append(m)
    groups = {}
    for (dataset, *rest), runs in tables.items():
        splitters = [(name, value) for name, value in TABLE_SPLITTERS.items()
                     if len({value(m) for m in runs} - {None}) > 1]
        for m in runs:
            qualifier = " ".join(f"{name}={value(m)}" for name, value in splitters if value(m) is not None)
            key = (f"{dataset} {qualifier}" if qualifier else dataset, *rest, row_label(m["config"]))
            groups.setdefault(key, []).append(m)
    return groups


def _data_name(config):
    """The data a run trained on, as a table names it: the dataset, with what tells its data apart
    where the name alone does not (the embedded set's settings, a user's folder and table)."""
    dataset = config["dataset"]
    if dataset == "synthetic":
        return f"{dataset} {json.dumps(config.get('synthetic') or {}, sort_keys=True)}"
    if dataset == "folder":
        return " ".join([dataset] + [f"{key}={config[key]}" for key in FOLDER_DATA_KEYS if config.get(key)])
    return dataset


# The config keys that say which folder and table a user's own dataset is.
FOLDER_DATA_KEYS = ("data_dir", "hierarchy", "fine_column", "coarse_column")
# Settings every run of a table must share to be averaged; where they differ, the table splits by them.
TABLE_SPLITTERS = {
    "eval": lambda m: m.get("eval_split"),
    "epochs": lambda m: m["config"].get("classify", {}).get("epochs"),
    "cluster-epochs": lambda m: (None if m["config"]["variant"] == CLASSIFIER_VARIANT
                                 else m["config"].get("cluster", {}).get("epochs")),
}


def _add_evaluated_hierarchy_figure(m):
    """A run recorded before training kept the hierarchy figure takes it from `evaluate_<split>.json` beside its
    metrics.json (`python -m keras_cwsn.evaluate RUN --split S --json > RUN/evaluate_S.json`) on the same split."""
    path = os.path.join(m["run_dir"], f"evaluate_{m.get('eval_split')}.json")
    if m.get(HIERARCHY_FIGURE) is None and os.path.isfile(path):
        with open(path) as f:
            evaluated = json.load(f)
        if evaluated.get("split") == m.get("eval_split"):
            m[HIERARCHY_FIGURE] = evaluated.get(HIERARCHY_FIGURE)


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
    for key, labels in table_rows(groups):
        paper_dataset, paper = paper_reference(key)
        figures = list(FIGURES)
        if any(r.get(HIERARCHY_FIGURE) is not None for label in labels for r in groups[key + (label,)]):
            figures.insert(3, HIERARCHY_FIGURE)  # after purity: the clustering figures together
        header = ["variant", "seeds", *(FIGURE_HEADERS[f] for f in figures),
                  _paper_header(key[0], paper_dataset, "acc / NMI / purity / class."), "ours − paper (class., mean)",
                  "ours − ce (class., Welch p)"]
        lines += [f"### {table_title(key)}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        lines += [_table_row(groups, key, label, paper, figures) for label in labels]
        lines.append("")
    return "\n".join(lines)


def _table_row(groups, key, label, paper, figures):
    runs = groups[key + (label,)]
    cells, means = [], {}
    for figure in figures:
        values = [r[figure] for r in runs if r.get(figure) is not None]
        if values:
            values = np.asarray(values, dtype=float) * (100.0 if figure in PERCENT else 1.0)
            cells.append(_cell(values))
            means[figure] = values.mean()
        else:
            cells.append("—")
    variant = label.partition(" ")[0]
    ref = paper.get(variant)  # the paper's figures are KCL's
    ref_text = _paper_text(ref) if ref else "—"
    diff = f"{means['classification_accuracy'] - ref[3]:+.2f}" if ref and "classification_accuracy" in means else "—"
    seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
    baseline = groups.get(key + (baseline_label(runs[0]["config"]),), [])
    versus = versus_baseline(runs, baseline) if variant != CLASSIFIER_VARIANT else "—"
    return f"| {label} | {seeds} | " + " | ".join(cells) + f" | {ref_text} | {diff} | {versus} |"


def peak_table(groups):
    """Markdown tables of each row's best-epoch figures: mean ± std (best) over seeds, and each seed's epoch."""
    lines = []
    for key, labels in table_rows(groups):
        paper_dataset, paper = paper_reference(key)
        paper_header = _paper_header(key[0], paper_dataset, "acc / class.")
        lines += [f"### {table_title(key)}: best epoch",
                  "", "| variant | seeds | cluster acc. % at its best epoch | epochs | warm-start class. acc. % at "
                  f"its best epoch | epochs | last epoch (class., mean) | {paper_header} |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [_peak_row(sorted(groups[key + (label,)], key=lambda r: r["seed"]), label, paper) for label in labels]
        lines.append("")
    return "\n".join(lines)


def _peak_row(runs, label, paper):
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
    return f"| {label} | {seeds} | " + " | ".join(cells) + " |"
