"""Gather runs into a Markdown results table beside the paper's Table 3.

    python -m keras_cwsn.report runs/cifar10-* > docs/RESULTS.md

Each argument is a run folder (metrics.json) or a multi-seed folder (seed_*/metrics.json); runs
are grouped by dataset, network, variant and schedule, and reported as mean ± sample std (n - 1)
and best over seeds, with the difference from the paper and from the cross-entropy baseline of the
same schedule (Welch's t-test p-value).
"""

import argparse
import glob
import json
import os
import sys

import numpy as np
from scipy import stats

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
FIGURES = ("cluster_accuracy", "nmi", "purity", "classification_accuracy")
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


def group_runs(metric_files):
    groups = {}
    for path in metric_files:
        with open(path) as f:
            m = json.load(f)
        c = m["config"]
        data = json.dumps(c.get("synthetic") or {}, sort_keys=True) if c["dataset"] == "synthetic" else ""
        key = (c["dataset"] + (f" {data}" if data else ""), c["arch"], bool(c.get("double")),
               c.get("schedule_scale", 1.0), c["variant"])
        groups.setdefault(key, []).append(m)
    return groups


def seed_std(values):
    """The sample standard deviation over seeds (n - 1: a handful of seeds estimates a spread), None for one seed."""
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if values.size > 1 else None


def _fmt(values, key):
    scale = 100.0 if key in PERCENT else 1.0
    values = np.asarray(values, dtype=float) * scale
    std = seed_std(values)
    spread = f" ± {std:.2f}" if std is not None else ""
    return f"{values.mean():.2f}{spread}", f"{values.max():.2f}", values.mean()


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
    return f"{np.mean(ours) - np.mean(base):+.2f} (p = {p_value:.2f})"


def markdown_table(groups):
    """One Markdown table per (dataset, network, schedule): ours (mean ± std, best) | paper | differences."""
    lines = []
    tables = sorted({k[:4] for k in groups})
    for dataset, arch, double, scale in tables:
        paper = PAPER_TABLE3.get((dataset, arch), {})
        lines += [f"### {dataset} / {arch}{' (double)' if double else ''}, schedule_scale {scale}", "",
                  "| variant | seeds | cluster acc. % | NMI | purity | warm-start class. acc. % | paper (acc / NMI / purity / class.) | ours − paper (class., mean) | ours − ce (class., Welch p) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        baseline = groups.get((dataset, arch, double, scale, "ce"), [])
        variants = sorted((k[4] for k in groups if k[:4] == (dataset, arch, double, scale)),
                          key=lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 99)
        for variant in variants:
            runs = groups[(dataset, arch, double, scale, variant)]
            cells, means = [], {}
            for key in FIGURES:
                values = [r[key] for r in runs if r.get(key) is not None]
                if values:
                    mean_std, best, mean = _fmt(values, key)
                    cells.append(f"{mean_std} (best {best})")
                    means[key] = mean
                else:
                    cells.append("—")
            ref = paper.get(variant)
            ref_text = " / ".join("—" if v is None else f"{v}" for v in ref) if ref else "—"
            diff = f"{means['classification_accuracy'] - ref[3]:+.2f}" if ref and "classification_accuracy" in means else "—"
            seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
            versus = versus_baseline(runs, baseline) if variant != "ce" else "—"
            lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + f" | {ref_text} | {diff} | {versus} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m keras_cwsn.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or metrics.json files")
    args = parser.parse_args(argv)
    try:
        groups = group_runs(find_metrics(args.runs))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
