"""`report --write FILE.md --section NAME`: the tables go between `<!-- report:NAME -->` and `<!-- /report -->`,
and every other byte of the file stays as it was."""

import pytest

from keras_cwsn.errors import UserError
from keras_cwsn.report import cli
from report_helpers import write_run

HAND_WRITTEN = ("# Results\r\n\nWritten by hand: ± — trailing spaces   \n\n<!-- report:full -->\nold table\n"
                "<!-- /report -->\n\nBetween the sections, *kept*.\n<!-- report:short -->\nshort table, kept\n"
                "<!-- /report -->\nno newline at the end")


@pytest.fixture
def runs(tmp_path):
    for seed, (ce, a) in enumerate(((0.70, 0.75), (0.71, 0.77))):
        write_run(tmp_path / "runs" / "ce" / f"seed_{seed}", "ce", seed, acc=ce)
        write_run(tmp_path / "runs" / "A" / f"seed_{seed}", "A", seed, cluster=[(0.6, 0.5)], acc=a)
    return tmp_path / "runs"


def _write(runs, path, section="full", *flags):
    return cli.main([str(runs), "--write", str(path), "--section", section, *flags])


def test_write_replaces_only_the_section_and_a_second_write_changes_nothing(runs, tmp_path, capsys):
    path = tmp_path / "RESULTS.md"
    path.write_bytes(HAND_WRITTEN.encode())
    assert cli.main([str(runs)]) == 0
    printed = capsys.readouterr().out  # what stdout gets without --write
    assert _write(runs, path) == 0
    assert capsys.readouterr().out == ""  # the tables went to the file
    written = path.read_bytes().decode()
    before, rest = HAND_WRITTEN.split("<!-- report:full -->")
    after = rest.split("<!-- /report -->", 1)[1]
    assert written == f"{before}<!-- report:full -->\n{printed.strip()}\n<!-- /report -->{after}"
    assert "| A | 0,1 |" in written and "old table" not in written
    assert _write(runs, path) == 0
    assert path.read_bytes().decode() == written


def test_peaks_go_into_the_same_section_or_one_of_their_own(runs, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("<!-- report:full -->\n<!-- /report -->\n<!-- report:peaks -->\n<!-- /report -->\n")
    assert _write(runs, path, "full", "--peaks") == 0
    full = path.read_text().split("<!-- report:peaks -->")[0]
    assert "| warm-start class. acc. % |" in full and ": best epoch" in full
    assert _write(runs, path, "peaks", "--peaks-only") == 0
    peaks = path.read_text().split("<!-- report:peaks -->")[1]
    assert "| warm-start class. acc. % |" not in peaks and ": best epoch" in peaks
    assert path.read_text().split("<!-- report:peaks -->")[0] == full


@pytest.mark.parametrize("text, message", [
    ("no markers at all\n", "Expected one section <!-- report:full -->"),
    ("<!-- report:other -->\n<!-- /report -->\n", "Expected one section <!-- report:full -->"),
    ("<!-- report:full -->\nnever closed\n", "is never closed"),
    ("<!-- /report -->\n<!-- report:full -->\n<!-- /report -->\n", "line 1 has '<!-- /report -->'"),
    ("<!-- report:full -->\n<!-- report:inner -->\n<!-- /report -->\n", "line 2 has '<!-- report:inner -->'"),
    ("<!-- report:full -->\n<!-- /report -->\n<!-- report:full -->\n<!-- /report -->\n", "Received: 2"),
])
def test_missing_or_unbalanced_markers_are_one_line_and_leave_the_file(runs, tmp_path, capsys, text, message):
    path = tmp_path / "RESULTS.md"
    path.write_text(text)
    assert _write(runs, path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert path.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md", "runs"]  # no temporary file left behind


def test_a_missing_file_and_a_lone_flag_are_refused(runs, tmp_path, capsys):
    assert _write(runs, tmp_path / "missing.md") == 2
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(runs), "--write", str(tmp_path / "RESULTS.md")])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("name", ["", "a b", "x-->", "../x"])
def test_section_names_are_plain(name):
    with pytest.raises(UserError, match="--section takes"):
        cli.replace_section("<!-- report:x -->\n<!-- /report -->\n", name, "table")
