"""The report's best-epoch table (`--peaks`): each run's highest per-epoch figure and its epoch, from fabricated
histories, checked against hand values."""

import numpy as np
import pytest

from keras_cwsn.report import cli, histories, tables
from report_helpers import CLASSIFY_HEADER, write_run


@pytest.fixture
def runs(tmp_path):
    """ce x 2 seeds; A x 2 seeds whose best epochs are not their last; A seed 2 with no histories at all."""
    write_run(tmp_path / "ce" / "seed_0", "ce", 0, classify=[0.50, 0.72, 0.70])
    write_run(tmp_path / "ce" / "seed_1", "ce", 1, classify=[0.54, 0.62, 0.68])
    write_run(tmp_path / "A" / "seed_0", "A", 0, cluster=[(0.20, 0.1), (0.40, 0.2), (0.30, 0.2)],
              classify=[0.52, 0.74, 0.71])
    write_run(tmp_path / "A" / "seed_1", "A", 1, cluster=[(0.24, 0.1), (0.28, 0.2), (0.36, 0.3)],
              classify=[0.76, 0.60, 0.72])
    return tmp_path


def _rows(text):
    return {line.split(" | ")[0].strip("| "): [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")}


def test_run_peak_is_the_best_epoch_counted_from_one(runs):
    assert histories.run_peak(str(runs / "A" / "seed_0"), "cluster_accuracy") == pytest.approx((40.0, 2))
    assert histories.run_peak(str(runs / "A" / "seed_1"), "classification_accuracy") == pytest.approx((76.0, 1))
    assert histories.run_peak(str(runs / "ce" / "seed_0"), "cluster_accuracy") is None  # ce has no cluster phase


def test_run_peak_skips_empty_epochs_and_takes_the_first_of_a_tie(tmp_path):
    (tmp_path / "classify_history.csv").write_text(
        CLASSIFY_HEADER + "\n0,0.1,0.01,1,0.50,1\n1,0.1,0.01,1,,1\n2,0.1,0.01,1,0.60,1\n3,0.1,0.01,1,0.60,1\n")
    assert histories.run_peak(str(tmp_path), "classification_accuracy") == pytest.approx((60.0, 3))
    (tmp_path / "classify_history.csv").write_text(CLASSIFY_HEADER + "\n0,0.1,0.01,1,,1\n")
    assert histories.run_peak(str(tmp_path), "classification_accuracy") is None


def test_peak_table_by_hand(runs):
    groups = tables.group_runs(tables.find_metrics([str(runs)]))
    text = tables.peak_table(groups)
    assert "### cifar10 / lenet, schedule_scale 0.5: best epoch" in text
    rows = _rows(text)
    assert list(rows) == ["ce", "A"]
    ce, a = rows["ce"], rows["A"]
    assert ce[2:4] == ["—", "—"]  # no clustering figures for ce
    std = np.std([72.0, 68.0], ddof=1)
    assert ce[4] == f"70.00 ± {std:.2f} (best 72.00)" and ce[5] == "2, 3"
    assert ce[6] == "69.00"  # the last epochs' mean: (70 + 68) / 2
    assert a[2] == f"38.00 ± {np.std([40.0, 36.0], ddof=1):.2f} (best 40.00)" and a[3] == "2, 3"
    assert a[4] == f"75.00 ± {np.std([74.0, 76.0], ddof=1):.2f} (best 76.00)" and a[5] == "2, 1"
    assert a[6] == "71.50" and a[7] == "74.21 / 75.75"


def test_runs_without_histories_are_left_out_of_their_row(runs):
    write_run(runs / "A" / "seed_2", "A", 2, acc=0.5)  # metrics.json only
    rows = _rows(tables.peak_table(tables.group_runs(tables.find_metrics([str(runs)]))))
    assert rows["A"][1] == "0,1,2" and rows["A"][3] == "2, 3"  # seed 2 has no epoch to show
    assert rows["A"][6] == f"{(71.0 + 72.0 + 50.0) / 3:.2f}"  # but its last-epoch figure counts


def test_main_prints_the_peaks_only_when_asked(runs, capsys):
    assert cli.main([str(runs)]) == 0
    assert "best epoch" not in capsys.readouterr().out
    assert cli.main([str(runs), "--peaks"]) == 0
    out = capsys.readouterr().out
    assert out.index("### cifar10 / lenet, schedule_scale 0.5\n") < out.index("schedule_scale 0.5: best epoch")


def test_runs_on_other_data_other_splits_or_other_epochs_are_never_averaged(tmp_path):
    """A user's folders (each with its own table), the split reported on and the number of epochs
    name tables of their own; runs that agree on all of them share one row."""
    def folder_run(name, seed, acc, data_dir, coarse="family", **settings):
        write_run(tmp_path / name / f"seed_{seed}", "C", seed, cluster=[(0.3, 0.2)], acc=acc, dataset="folder",
                  data_dir=data_dir, hierarchy=f"{data_dir}/table.tsv", coarse_column=coarse, **settings)

    folder_run("birds", 0, 0.40, "/data/birds")
    folder_run("birds", 1, 0.50, "/data/birds")
    folder_run("cars", 0, 0.90, "/data/cars")
    folder_run("cars-make", 0, 0.80, "/data/cars", coarse="make")
    groups = tables.group_runs(tables.find_metrics([str(tmp_path)]))
    rows = {key[0]: [r["classification_accuracy"] for r in runs] for key, runs in groups.items()}
    assert sorted(map(sorted, rows.values())) == [[0.4, 0.5], [0.8], [0.9]]
    assert sorted(rows[k][0] for k in rows if "coarse_column=family" in k) == [0.4, 0.9]

    split = tmp_path / "splits"
    write_run(split / "val" / "seed_0", "ce", 0, acc=0.70, epochs=95)
    write_run(split / "test" / "seed_0", "ce", 0, acc=0.60, eval_split="test", epochs=95)
    write_run(split / "short" / "seed_1", "ce", 1, acc=0.10, eval_split="test", epochs=1)
    groups = tables.group_runs(tables.find_metrics([str(split)]))
    names = {key[0]: [r["classification_accuracy"] for r in runs] for key, runs in groups.items()}
    assert names == {"cifar10 eval=val epochs=95": [0.7], "cifar10 eval=test epochs=95": [0.6],
                     "cifar10 eval=test epochs=1": [0.1]}
    assert tables.paper_reference(("cifar10 eval=val", "lenet", False, 0.5))[1]["ce"][3] == 75.48
    # One table when the runs agree: the title is the dataset's alone.
    assert [k[0] for k in tables.group_runs(tables.find_metrics([str(split / "val")]))] == ["cifar10"]
