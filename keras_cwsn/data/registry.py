"""The datasets this project knows, as data: config, train.py's help and the loaders all read this table.

A `folder` dataset is the user's own (`DIR/train/<class>/*` plus a hierarchy table): `dataset_spec`
turns a config into the spec its loaders read, so a new dataset needs no edit here.
"""

import dataclasses
import difflib
import os

from keras_cwsn.constants import NETWORK_INPUTS
from keras_cwsn.errors import UserError

TABLES_DIR = os.path.join(os.path.dirname(__file__), "tables")
# The Appendix B settings a folder dataset takes from its network: LeNet's CIFAR-10, AlexNet's Birdsnap34.
NETWORK_CONFIGS = {"lenet": "cifar10_lenet.yaml", "alexnet": "birdsnap34_alexnet.yaml"}


class DatasetUnavailableError(UserError):
    """A dataset that can't be loaded here (unknown name, no download, no folder): the message says what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to find, label and preprocess one dataset.

    Args:
        name: str. What `--dataset` takes.
        source: str. `"synthetic"` (generated), `"cifar"` (a folder of class sub-folders, else TFDS),
            `"folder"` (a folder of class sub-folders with a hierarchy table) or `"birdsnap"` (the
            TFDS builder over a Birdsnap download).
        config_file: str or None. Its default config in `configs/` (None: the network's, `NETWORK_CONFIGS`).
        table: str or None. Its hierarchy table: a file in `keras_cwsn/data/tables/` or a path.
        fine_column, coarse_column: str or None. The table's columns for the two levels (fine None:
            the first column).
        image_size: tuple (H, W) or None. The model's input size (None: the network's).
        normalization: str or None. `"yuv"` (Hsu & Kira's CIFAR preprocessing), `"imagenet"`, or
            None (the network's).
        tfds_config: str or None. The TFDS name (CIFAR) or builder config (Birdsnap).
        summary: str. One line for `--help`.
        paper_rows: str or None. The dataset of the paper's tables that `report` sets its rows beside
            (None: its own name): a stand-in runs another dataset's protocol, so it is read against it.
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
    paper_rows: str = None

    @property
    def table_path(self):
        return os.path.join(TABLES_DIR, self.table) if self.table else None

    def needs_data_dir(self):
        return self.source == "folder"


DATASETS = {spec.name: spec for spec in (
    DatasetSpec("synthetic", "synthetic", "synthetic_lenet.yaml", summary="embedded, no download (default)"),
    DatasetSpec("cifar10", "cifar", "cifar10_lenet.yaml", "cifar10.tsv", tfds_config="cifar10",
                summary="10 classes in 2 groups; --data-dir DIR/train/<class>/*.jpg, else TFDS"),
    DatasetSpec("cifar100", "cifar", "cifar100_lenet.yaml", "cifar100.tsv", tfds_config="cifar100",
                summary="100 classes in 20 superclasses; folder or TFDS"),
    DatasetSpec("birdsnap34", "birdsnap", "birdsnap34_alexnet.yaml", "birdsnap34.tsv", "dir", "family",
                (224, 224), "imagenet", "birdsnap34", summary="the paper's 34 species in 18 families"),
    DatasetSpec("cub42", "folder", "birdsnap34_alexnet.yaml", "cub42.tsv", "folder", "family", (224, 224),
                "imagenet", summary="42 CUB-200-2011 species in 21 families, Birdsnap34's protocol; "
                                    "--data-dir: the unpacked cub42 archive", paper_rows="birdsnap34"),
    DatasetSpec("folder", "folder", None, None, None, None, None, None,
                summary="your own: --data-dir DIR (DIR/train/<class>/*) --hierarchy TABLE --coarse-column C"),
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


def dataset_spec(config):
    """The spec a run's loaders read: the registered one with the config's table, columns and input settings.

    `hierarchy`, `fine_column` and `coarse_column` apply to folder datasets; `image_size` and
    `normalization` to every dataset but the synthetic one; unset, they follow the dataset, then the
    network (`NETWORK_INPUTS`). Configs saved before these keys existed read as unset.
    """
    spec = get_dataset(config["dataset"])
    table = config.get("hierarchy")
    if spec.source != "folder":
        return dataclasses.replace(spec, image_size=_image_size(config, spec),
                                   normalization=config.get("normalization") or spec.normalization)
    if table is None and spec.table is None:
        raise DatasetUnavailableError(f"Dataset {spec.name!r} needs a hierarchy table that maps each class folder "
                                      f"to its coarse class: pass --hierarchy TABLE.tsv (or set `hierarchy:`).")
    network_size, network_normalization = NETWORK_INPUTS[config["arch"]]
    return dataclasses.replace(
        spec, table=os.path.abspath(table) if table else spec.table,  # a path, or a packaged table's name
        fine_column=config.get("fine_column") or (None if table else spec.fine_column),
        coarse_column=config.get("coarse_column") or (None if table else spec.coarse_column) or "coarse",
        image_size=_image_size(config, spec) or network_size,
        normalization=config.get("normalization") or spec.normalization or network_normalization)


def _image_size(config, spec):
    size = config.get("image_size")
    if size is None:
        return spec.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def datasets_help():
    """`name (summary), ...` for command-line help."""
    return "; ".join(f"{s.name} ({s.summary})" for s in DATASETS.values())
