"""What every dataset source hands to the training code: class names per level and the hierarchy."""

import dataclasses
import csv
import os

import numpy as np


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


def read_hierarchy_table(path, fine_column, coarse_column):
    """Read a tab-separated hierarchy table into (fine_names, coarse_names, fine_to_coarse, rows).

    Coarse names are numbered in order of first appearance so the table alone fixes the labels.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"Hierarchy table not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for column in (fine_column, coarse_column):
        if rows and column not in rows[0]:
            raise ValueError(f"Hierarchy table {path} has no column {column!r}; columns: {list(rows[0])}.")
    fine_names, coarse_names, fine_to_coarse = [], [], []
    for row in rows:
        coarse = row[coarse_column].strip()
        if not coarse:
            raise ValueError(f"Hierarchy table {path}: row {row[fine_column]!r} has an empty {coarse_column!r}.")
        if coarse not in coarse_names:
            coarse_names.append(coarse)
        fine_names.append(row[fine_column].strip())
        fine_to_coarse.append(coarse_names.index(coarse))
    if len(set(fine_names)) != len(fine_names):
        raise ValueError(f"Hierarchy table {path} repeats a fine class.")
    return tuple(fine_names), tuple(coarse_names), tuple(fine_to_coarse), rows
