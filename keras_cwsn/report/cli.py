"""Gather runs into Markdown results tables beside the paper's Table 3, and optionally PNG plots.

    python -m keras_cwsn.report runs/cifar10-*                        # the tables, on stdout
    python -m keras_cwsn.report runs/cifar10-* --write docs/RESULTS.md --section cifar10-full
    python -m keras_cwsn.report runs/cifar10-* --plots docs/figures

Each argument is a run folder (metrics.json) or a multi-seed folder (seed_*/metrics.json); runs
are grouped by dataset (a folder dataset by its folder and table), network, variant, recipe settings
and schedule (split reported on and epochs apart where they differ), and reported as mean ±
sample std (n - 1) and best over seeds, with the difference from the paper and from the
cross-entropy baseline of the same schedule and settings (Welch's t-test p-value). A run whose
criterion, margin, head, weight decay, initialisation, BatchNorm or augmentation is not the paper's gets a
row of its own (the config keys with a `row` label), e.g. "A mcl", "D decoupled-wd", "ce keras-init".

--write FILE.md --section NAME puts the tables into FILE.md between the lines
`<!-- report:NAME -->` and `<!-- /report -->`, which must be there already, and leaves every other
byte of the file as it was; writing the same runs again changes nothing. Without --write the
tables go to stdout.

--plots DIR also writes, per table, two PNG figures read from the runs' per-epoch histories:
DIR/<table>-cluster.png (clustering accuracy and NMI per epoch of the cluster phase) and
DIR/<table>-classify.png (classification accuracy per epoch of the warm start, with the `ce`
baseline), each variant's mean over seeds as a line and its min-max over seeds as a band. It
needs matplotlib (pip install matplotlib).

--peaks also gives (--peaks-only gives alone), per table, each row's figures at its best epoch rather than its last: per run
the highest held-out clustering and warm-start accuracy over the epochs of its histories and the
epoch it came at. The paper reports "the top performing results out of 5 runs" after a fixed
number of epochs without saying which epoch; this bounds what picking the best epoch (an
optimistic choice, made on the evaluated split itself) could add to the last-epoch table.
"""

import argparse
import re
import sys

from keras_cwsn.atomic import write_text_atomic
from keras_cwsn.errors import UserError, print_error
from keras_cwsn.report.plots import import_pyplot, plot_figures
from keras_cwsn.report.tables import find_metrics, group_runs, markdown_table, peak_table

SECTION_NAME = re.compile(r"[A-Za-z0-9._-]+")
_MARKER = re.compile(r"<!-- report:(?P<name>[^ >]*) -->|<!-- /report -->")


def replace_section(text, name, content):
    """`text` with what stands between `<!-- report:name -->` and `<!-- /report -->` replaced by `content`.

    Every marker in `text` must open a section or close the one opened before it, and `name` must
    open exactly one; otherwise a UserError says which marker is wrong. The section holds `content`
    from the line after its opening marker to the line before its closing one, so writing the same
    content again returns `text` unchanged.
    """
    if not SECTION_NAME.fullmatch(name):
        raise UserError(f"--section takes letters, digits, '.', '_' and '-'. Received: {name!r}")
    opened, found = None, []
    for marker in _MARKER.finditer(text):
        line = text.count("\n", 0, marker.start()) + 1
        if marker["name"] is not None and opened is None:
            opened = marker
        elif marker["name"] is None and opened is not None:
            if opened["name"] == name:
                found.append((opened.end(), marker.start()))
            opened = None
        else:
            raise UserError(f"Unbalanced report markers: line {line} has {marker[0]!r} where "
                            f"{'<!-- /report -->' if opened is not None else '<!-- report:NAME -->'} was expected.")
    if opened is not None:
        raise UserError(f"Unbalanced report markers: {opened[0]!r} is never closed by <!-- /report -->.")
    if len(found) != 1:
        raise UserError(f"Expected one section <!-- report:{name} --> ... <!-- /report -->. Received: "
                        f"{len(found)}.")
    start, end = found[0]
    return text[:start] + "\n" + content.strip("\n") + "\n" + text[end:]


def write_section(path, name, content):
    """Replace the section `name` of the Markdown file `path` by `content`, atomically."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    write_text_atomic(path, replace_section(text, name, content))


def _parser():
    parser = argparse.ArgumentParser(prog="python -m keras_cwsn.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or metrics.json files")
    parser.add_argument("--plots", metavar="DIR", default=None,
                        help="also write PNG figures of the per-epoch curves into DIR (needs matplotlib)")
    parser.add_argument("--peaks", action="store_true",
                        help="also give each row's figures at its best epoch (from the runs' histories)")
    parser.add_argument("--peaks-only", action="store_true",
                        help="give the best-epoch tables alone (e.g. for a --section of their own)")
    parser.add_argument("--write", metavar="FILE.md", default=None,
                        help="write the tables into FILE.md between <!-- report:NAME --> and <!-- /report -->")
    parser.add_argument("--section", metavar="NAME", default=None, help="the section --write replaces")
    return parser


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.write is None) != (args.section is None):
        parser.error("--write and --section go together")
    try:
        groups = group_runs(find_metrics(args.runs))
        if args.plots is not None:
            import_pyplot()  # fail before writing anything
        if args.peaks_only:
            tables = peak_table(groups)
        else:
            tables = markdown_table(groups) + ("\n" + peak_table(groups) if args.peaks else "")
        if args.write is not None:
            write_section(args.write, args.section, tables)
            print(f"wrote section {args.section} of {args.write}", file=sys.stderr)
        else:
            print(tables)
        for path in plot_figures(groups, args.plots) if args.plots is not None else ():
            print(f"wrote {path}", file=sys.stderr)
    except (OSError, ValueError, KeyError) as e:
        print_error(e)
        return 2
    return 0
