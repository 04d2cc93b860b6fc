"""The datasets this project knows, as data: config, train.py's help and the loaders all read this table."""

import dataclasses
import difflib
import os

from keras_cwsn.errors import UserError

TABLES_DIR = os.path.join(os.path.dirname(__file__), "tables")


class DatasetUnavailableError(UserError):
    """A dataset that can't be loaded here (unknown name, no download, no folder): the message says what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to find, label and preprocess one dataset.

    Args:
        name: str. What `--dataset` takes.
        source: str. `"synthetic"` (generated), `"cifar"` (a folder of class sub-folders, else TFDS)
            or `"birdsnap"` (the TFDS builder over a Birdsnap download).
        config_file: str. Its default config in `configs/`.
        table: str or None. Its hierarchy table in `keras_cwsn/data/tables/`.
        fine_column, coarse_column: str. The table's columns for the two levels.
        image_size: tuple (H, W). The model's input size.
        normalization: str. `"yuv"` (Hsu & Kira's CIFAR preprocessing) or `"imagenet"`.
        tfds_config: str or None. The TFDS name (CIFAR) or builder config (Birdsnap).
        summary: str. One line for `--help`.
    """

    name: str
    source: str
    config_file: str
    table: str = None
    fine_column: str = "fine"
    coarse_column: str = "coarse"
    image_size: tuple = (32, 32)
    normalization: str = "yuv"
    tfds_config: str = None
    summary: str = ""

    @property
    def table_path(self):
        return os.path.join(TABLES_DIR, self.table) if self.table else None


DATASETS = {spec.name: spec for spec in (
    DatasetSpec("synthetic", "synthetic", "synthetic_lenet.yaml", summary="embedded, no download (default)"),
    DatasetSpec("cifar10", "cifar", "cifar10_lenet.yaml", "cifar10.tsv", tfds_config="cifar10",
                summary="10 classes in 2 groups; --data-dir DIR/train/<class>/*.jpg, else TFDS"),
    DatasetSpec("cifar100", "cifar", "cifar100_lenet.yaml", "cifar100.tsv", tfds_config="cifar100",
                summary="100 classes in 20 superclasses; folder or TFDS"),
    DatasetSpec("birdsnap34", "birdsnap", "birdsnap34_alexnet.yaml", "birdsnap34.tsv", "dir", "family",
                (224, 224), "imagenet", "birdsnap34", summary="the paper's 34 species in 18 families"),
    DatasetSpec("birdsnap", "birdsnap", "birdsnap_alexnet.yaml", "birdsnap500.tsv", "dir", "family",
                (224, 224), "imagenet", "birdsnap500", summary="all 500 species"),
)}


def get_dataset(name):
    """The `DatasetSpec` of `name`; an unknown name is a `DatasetUnavailableError` with a suggestion."""
    if name in DATASETS:
        return DATASETS[name]
    close = difflib.get_close_matches(str(name), list(DATASETS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DatasetUnavailableError(f"Unknown dataset.{hint} Expected one of {', '.join(DATASETS)}. Received: {name!r}")


def datasets_help():
    """`name (summary), ...` for command-line help."""
    return "; ".join(f"{s.name} ({s.summary})" for s in DATASETS.values())
