"""What every dataset source hands to the training code: class names per level and the hierarchy."""

import csv
import dataclasses
import difflib
import os

import numpy as np

from keras_cwsn.errors import UserError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Class names at both hierarchy levels and the fine -> coarse map.

    Args:
        name: str. Dataset name as given to `--dataset`.
        fine_names: tuple of str. Fine class names; index = fine label.
        coarse_names: tuple of str. Coarse class names; index = coarse label.
        fine_to_coarse: tuple of int. Coarse label of each fine label.
        image_size: tuple (H, W). Size the model's input expects.
        normalization: str. `"yuv"` (Hsu & Kira CIFAR preprocessing) or `"imagenet"`.
        num_examples: dict split -> int, where known.
    """

    name: str
    fine_names: tuple
    coarse_names: tuple
    fine_to_coarse: tuple
    image_size: tuple = (32, 32)
    normalization: str = "yuv"
    num_examples: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if len(self.fine_to_coarse) != len(self.fine_names):
            raise ValueError(
                f"fine_to_coarse has {len(self.fine_to_coarse)} entries for "
                f"{len(self.fine_names)} fine classes in dataset {self.name!r}."
            )
        bad = [c for c in self.fine_to_coarse if not 0 <= c < len(self.coarse_names)]
        if bad:
            raise ValueError(f"fine_to_coarse of {self.name!r} names unknown coarse labels {bad}.")

    @property
    def num_fine(self):
        return len(self.fine_names)

    @property
    def num_coarse(self):
        return len(self.coarse_names)

    def coarse_of(self, fine_labels):
        """Coarse labels of an array of fine labels."""
        return np.asarray(self.fine_to_coarse, dtype=np.int64)[np.asarray(fine_labels)]


class HierarchyTableError(UserError):
    """A hierarchy table that can't label a dataset: missing, malformed, or at odds with its folders."""


def read_hierarchy_table(path, fine_column, coarse_column):
    """Read a hierarchy table (TSV, or CSV by its `.csv` name) into (fine_names, coarse_names, fine_to_coarse, rows).

    Args:
        fine_column: str or None. The column naming each fine class (None: the first column).
        coarse_column: str. The column naming its coarse class.

    Coarse names are numbered in order of first appearance so the table alone fixes the labels.
    Raises `HierarchyTableError` naming the file and the problem (missing column, empty or repeated
    class, empty coarse label).
    """
    if not os.path.isfile(path):
        raise HierarchyTableError(f"Hierarchy table not found: {path}")
    delimiter = "," if path.lower().endswith(".csv") else "\t"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows, lines = [], []  # each row's line in the file (blank lines are skipped by the reader)
            for row in reader:
                rows.append({(k or "").strip(): (v or "").strip() if isinstance(v, str) else v
                             for k, v in row.items()})
                lines.append(reader.line_num)
    except (UnicodeDecodeError, csv.Error) as e:
        raise HierarchyTableError(f"Hierarchy table {path} can't be read as {'CSV' if delimiter == ',' else 'TSV'} "
                                  f"text: {e}") from None
    if not columns or not rows:
        raise HierarchyTableError(f"Hierarchy table {path} has no rows under a header line.")
    fine_column = fine_column or columns[0]
    for role, column in (("fine", fine_column), ("coarse", coarse_column)):
        if column not in columns and len(columns) == 1:
            raise HierarchyTableError(f"Hierarchy table {path} has one column, {columns[0]!r}: is it "
                                      f"{'comma' if delimiter == ',' else 'tab'}-separated? (a table named .csv is "
                                      f"read as comma-separated, any other as tab-separated)")
        if column not in columns:
            close = difflib.get_close_matches(column, columns, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise HierarchyTableError(f"Hierarchy table {path} has no {role} column {column!r}.{hint} "
                                      f"Columns: {', '.join(columns)}.")
    fine_names, coarse_names, fine_to_coarse = [], [], []
    for line, row in zip(lines, rows):
        fine, coarse = row.get(fine_column) or "", row.get(coarse_column) or ""
        if not fine:
            raise HierarchyTableError(f"Hierarchy table {path}, line {line}: empty {fine_column!r}.")
        if not coarse:
            raise HierarchyTableError(f"Hierarchy table {path}, line {line}: class {fine!r} has an empty "
                                      f"{coarse_column!r}.")
        if fine in fine_names:
            raise HierarchyTableError(f"Hierarchy table {path}, line {line}: class {fine!r} is listed twice "
                                      f"(first on line {lines[fine_names.index(fine)]}).")
        if coarse not in coarse_names:
            coarse_names.append(coarse)
        fine_names.append(fine)
        fine_to_coarse.append(coarse_names.index(coarse))
    return tuple(fine_names), tuple(coarse_names), tuple(fine_to_coarse), rows
