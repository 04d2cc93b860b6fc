"""The report's PNG plots (`--plots DIR`): curves read from fabricated run folders, checked against hand values."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, subprocess_env
from keras_cwsn.report import cli, histories, plots, tables
from report_helpers import CLASSIFY_HEADER, write_run

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402


@pytest.fixture
def runs(tmp_path):
    """ce x 2 seeds, A x 2 seeds (seed 1 one epoch longer in both phases), A with MCL x 1 seed."""
    write_run(tmp_path / "ce" / "seed_0", "ce", 0, classify=[0.50, 0.60, 0.70])
    write_run(tmp_path / "ce" / "seed_1", "ce", 1, classify=[0.54, 0.62, 0.68])
    write_run(tmp_path / "A" / "seed_0", "A", 0, cluster=[(0.20, 0.10), (0.30, 0.20)], classify=[0.52, 0.64, 0.71])
    write_run(tmp_path / "A" / "seed_1", "A", 1, cluster=[(0.24, 0.14), (0.28, 0.18), (0.36, 0.26)],
              classify=[0.48, 0.60, 0.69, 0.72])
    write_run(tmp_path / "A-mcl" / "seed_0", "A", 0, cluster=[(0.40, 0.30), (0.50, 0.40)], classify=[0.6, 0.7],
              criterion="mcl")
    return tmp_path


def test_aggregate_curves_by_hand():
    agg = plots.aggregate_curves([(np.array([0, 1, 2]), np.array([0.2, 0.3, 0.4])),
                                   (np.array([0, 1]), np.array([0.4, 0.5]))])
    np.testing.assert_array_equal(agg["epoch"], [0, 1, 2])
    np.testing.assert_allclose(agg["mean"], [0.3, 0.4, 0.4])
    np.testing.assert_allclose(agg["min"], [0.2, 0.3, 0.4])
    np.testing.assert_allclose(agg["max"], [0.4, 0.5, 0.4])
    np.testing.assert_array_equal(agg["count"], [2, 2, 1])
    np.testing.assert_allclose(agg["std"][:2], [np.sqrt(0.02), np.sqrt(0.02)])  # sample std (n - 1)
    assert np.isnan(agg["std"][2])  # one run reached epoch 2: no spread
    single = plots.aggregate_curves([(np.array([0, 1]), np.array([0.1, 0.2]))])
    np.testing.assert_allclose(single["mean"], [0.1, 0.2])
    assert np.all(np.isnan(single["std"]))


def test_read_history_last_row_of_a_repeated_epoch_wins(tmp_path):
    path = tmp_path / "classify_history.csv"
    path.write_text(CLASSIFY_HEADER + "\n0,0.1,0.01,1,0.50,1\n1,0.1,0.01,1,0.60,1\n1,0.1,0.01,1,0.65,1\n"
                    "2,0.1,0.01,1,,1\n3,0.1,0.01,1,NA,1\n")
    history = histories.read_history(str(path))
    np.testing.assert_array_equal(history["epoch"], [0, 1, 2, 3])
    np.testing.assert_allclose(history["val_accuracy"][:2], [0.50, 0.65])  # the resumed epoch 1's row
    assert np.isnan(history["val_accuracy"][2]) and np.isnan(history["val_accuracy"][3])  # "NA": metrics_every > 1


def test_table_curves_equal_the_csv_values(runs):
    groups = tables.group_runs(tables.find_metrics([str(runs / d) for d in ("ce", "A", "A-mcl")]))
    curves = plots.table_curves(groups)
    assert list(curves) == [("cifar10", "lenet", False, 0.5)]
    table = curves[("cifar10", "lenet", False, 0.5)]
    assert list(table["cluster_accuracy"]) == ["A", "A mcl"]  # ce has no cluster phase
    assert list(table["classification_accuracy"]) == ["ce", "A", "A mcl"]
    agg, n = table["cluster_accuracy"]["A"]
    assert n == 2
    np.testing.assert_array_equal(agg["epoch"], [0, 1, 2])
    np.testing.assert_allclose(agg["mean"], [22.0, 29.0, 36.0])  # percent: (20 + 24) / 2, (30 + 28) / 2, 36
    np.testing.assert_allclose(agg["min"], [20.0, 28.0, 36.0])
    np.testing.assert_allclose(agg["max"], [24.0, 30.0, 36.0])
    np.testing.assert_array_equal(agg["count"], [2, 2, 1])
    agg, _ = table["nmi"]["A"]
    np.testing.assert_allclose(agg["mean"], [0.12, 0.19, 0.26])  # NMI is not scaled
    agg, n = table["classification_accuracy"]["ce"]
    assert n == 2
    np.testing.assert_allclose(agg["mean"], [52.0, 61.0, 69.0])
    np.testing.assert_allclose(agg["max"], [54.0, 62.0, 70.0])
    agg, n = table["classification_accuracy"]["A mcl"]
    assert n == 1
    np.testing.assert_allclose(agg["mean"], [60.0, 70.0])


def test_plotted_lines_are_the_aggregates(runs):
    import matplotlib.pyplot as plt

    groups = tables.group_runs(tables.find_metrics([str(runs)]))
    key = ("cifar10", "lenet", False, 0.5)
    curves = plots.table_curves(groups)[key]
    figures = plots.make_figures(key, curves)
    assert set(figures) == {"cluster", "classify"}
    accuracy_axes, nmi_axes = figures["cluster"].axes
    for ax, figure in ((accuracy_axes, "cluster_accuracy"), (nmi_axes, "nmi")):
        lines = ax.get_lines()
        assert [line.get_label().split(" (")[0] for line in lines] == ["A", "A mcl"]
        for line, (agg, _) in zip(lines, curves[figure].values()):
            np.testing.assert_array_equal(line.get_xdata(), agg["epoch"] + 1)  # epochs shown from 1
            np.testing.assert_allclose(line.get_ydata(), agg["mean"])
    lines = figures["classify"].axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["ce (baseline) (2 seeds)", "A (2 seeds)", "A mcl (1 seed)"]
    assert len({(line.get_color(), str(line.get_linestyle())) for line in lines}) == len(lines)
    np.testing.assert_allclose(lines[0].get_ydata(), [52.0, 61.0, 69.0])
    assert lines[0].get_linestyle() == "--"
    for fig in figures.values():
        plt.close(fig)


def test_main_writes_valid_pngs_and_the_table(runs, tmp_path, capsys):
    out = tmp_path / "figures"
    assert cli.main([str(runs / "ce"), str(runs / "A"), str(runs / "A-mcl"), "--plots", str(out)]) == 0
    captured = capsys.readouterr()
    assert "### cifar10 / lenet, schedule_scale 0.5" in captured.out
    assert "| A mcl | 0 |" in captured.out and "74.21 / 0.55 / 0.74 / 75.75" in captured.out
    names = sorted(os.listdir(out))
    assert names == ["cifar10-lenet-s0.5-classify.png", "cifar10-lenet-s0.5-cluster.png"]
    for name in names:
        assert f"wrote {out / name}" in captured.err
        with Image.open(out / name) as image:
            assert image.format == "PNG"
            image.verify()
        with Image.open(out / name) as image:
            width, height = image.size
            assert width > 300 and height > 200
            assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn


def test_runs_without_histories_give_no_figure(tmp_path, capsys):
    """metrics.json alone (no CSV histories): the table as before, no PNG, no error."""
    write_run(tmp_path / "ce" / "seed_0", "ce", 0)
    write_run(tmp_path / "ce" / "seed_1", "ce", 1, classify=[0.5, 0.6])  # one seed with a history: plotted alone
    out = tmp_path / "figures"
    assert cli.main([str(tmp_path / "ce"), "--plots", str(out)]) == 0
    assert os.listdir(out) == ["cifar10-lenet-s0.5-classify.png"]
    assert "| ce | 0,1 |" in capsys.readouterr().out


def test_missing_matplotlib_is_one_clear_line(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert cli.main([str(runs / "A"), "--plots", str(tmp_path / "figures")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing half-done
    assert captured.err.strip().splitlines() == [
        "error: --plots needs matplotlib, which is not installed: pip install matplotlib"]
    assert not (tmp_path / "figures").exists()
    # Without --plots the report does not need it.
    assert cli.main([str(runs / "A")]) == 0


def test_figure_slug():
    assert plots.figure_slug(("cifar10", "lenet", False, 0.0632)) == "cifar10-lenet-s0.0632"
    assert plots.figure_slug(("birdsnap34", "alexnet", True, 1.0)) == "birdsnap34-alexnet-double-s1"
    slug = plots.figure_slug(('synthetic {"num_coarse": 4}', "lenet", False, 1.0))
    assert slug.startswith("synthetic-") and slug.endswith("-lenet-s1") and " " not in slug and "{" not in slug


def test_report_with_plots_loads_no_tensorflow(runs, tmp_path):
    code = ("import sys; from keras_cwsn.report import cli; "
            f"code = cli.main([{str(runs)!r}, '--plots', {str(tmp_path / 'figs')!r}]); "
            "print('RESULTS', code, any(m == 'tensorflow' or m.startswith('tensorflow.') or m == 'keras' "
            "for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    line = [line for line in done.stdout.splitlines() if line.startswith("RESULTS")]
    assert done.returncode == 0 and line, done.stderr[-2000:]
    assert line[-1] == "RESULTS 0 False"


@pytest.mark.parametrize("labels", [
    ["ce keras-init", "A keras-init", "A mcl keras-init", "D keras-init", "D mcl keras-init"],  # every row suffixed
    ["ce", "A", "A keras-init", "C", "C keras-init", "ce keras-init"],
])
def test_every_row_of_a_table_gets_its_own_line_style(labels):
    styles = plots._styles(labels)
    assert len({(s["color"], str(s["linestyle"])) for s in styles.values()}) == len(labels)
    plain = labels[1]  # the fewest settings: the variant's own colour, solid
    assert styles[plain] == {"color": "C0", "linestyle": "-"}


def test_epochs_without_figures_are_left_out_of_a_curve_not_drawn_as_gaps():
    mean = np.array([0.1, np.nan, 0.3, np.nan])  # figures every second epoch (metrics_every=2)
    agg = {"epoch": np.arange(4), "mean": mean, "min": mean - 0.01, "max": mean + 0.01}
    figure, ax = plots.import_pyplot().subplots()
    plots._draw(ax, {"C": (agg, 2)}, "cluster_accuracy", {"C": {"color": "C0"}})
    line, = ax.lines
    np.testing.assert_array_equal(line.get_xdata(), [1, 3])
    np.testing.assert_allclose(line.get_ydata(), [0.1, 0.3])
    plots.import_pyplot().close(figure)
