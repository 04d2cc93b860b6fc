"""Birdsnap without TensorFlow: config names, hierarchy tables, where the download is, and reading it.

The downloader and the TFDS builder both read these, so this module imports neither TFDS nor
TensorFlow.
"""

import csv
import functools
import hashlib
import os

from keras_cwsn.data.info import DatasetInfo, read_hierarchy_table
from keras_cwsn.data.registry import DATASETS
from keras_cwsn.errors import UserError

# Config name (`birdsnap34`, `birdsnap500`) -> its `DatasetSpec`; the registry is the one copy.
CONFIGS = {spec.tfds_config: spec for spec in DATASETS.values() if spec.source == "birdsnap"}
DEFAULT_DATA_DIR = os.path.join("$KERAS_CWSN_CACHE", "tfds")  # the cache folder's, ~/.cache/keras_cwsn by default
DEFAULT_MANUAL_DIR = os.path.join("~", ".cache", "keras_cwsn", "birdsnap")
MANUAL_DIR_ENV = "KERAS_CWSN_BIRDSNAP_DIR"
BIRDSNAP_ARCHIVE_URL = "http://thomasberg.org/datasets/birdsnap/1.1/birdsnap.tgz"
REQUIRED_ENTRIES = ("species.txt", "images.txt", "test_images.txt", "images")


class BirdsnapNotFoundError(UserError, FileNotFoundError):
    """The Birdsnap download is not where the loader looked; the message says where and how to get it."""


def check_config_name(config_name):
    if config_name not in CONFIGS:
        raise UserError(f"Unknown Birdsnap config {config_name!r}; expected one of {sorted(CONFIGS)}.")
    return CONFIGS[config_name]


def birdsnap_hierarchy(config_name="birdsnap34"):
    """Fine (species folder) and coarse (family) names of a Birdsnap config.

    Args:
        config_name: str. `"birdsnap34"` or `"birdsnap500"`.

    Returns:
        Tuple `(fine_names, coarse_names, fine_to_coarse)`: species folder names in table
        order, family names in order of first appearance, and the family index of each species.
    """
    spec = check_config_name(config_name)
    fine, coarse, fine_to_coarse, _ = read_hierarchy_table(spec.table_path, spec.fine_column, spec.coarse_column)
    return fine, coarse, fine_to_coarse


def birdsnap_dataset_info(config_name="birdsnap34", num_examples=None):
    """The `DatasetInfo` of a Birdsnap config (224x224, ImageNet normalisation), without touching any data."""
    spec = check_config_name(config_name)
    fine, coarse, fine_to_coarse = birdsnap_hierarchy(config_name)
    return DatasetInfo(
        name=config_name,
        fine_names=fine,
        coarse_names=coarse,
        fine_to_coarse=fine_to_coarse,
        image_size=spec.image_size,
        normalization=spec.normalization,
        num_examples=dict(num_examples or {}),
    )


def resolve_manual_dir(manual_dir=None):
    """Where the Birdsnap download is looked for, and what chose it.

    Args:
        manual_dir: optional path. Wins over `$KERAS_CWSN_BIRDSNAP_DIR`, which wins over
            `~/.cache/keras_cwsn/birdsnap`.

    Returns:
        Tuple `(path, source)`; `source` names which of the three gave `path`, for error messages.
    """
    if manual_dir:
        return os.path.abspath(os.path.expanduser(os.fspath(manual_dir))), "manual_dir argument"
    env = os.environ.get(MANUAL_DIR_ENV)
    if env:
        return os.path.abspath(os.path.expanduser(env)), f"${MANUAL_DIR_ENV}"
    return os.path.abspath(os.path.expanduser(DEFAULT_MANUAL_DIR)), "default location"


def resolve_data_dir(data_dir=None):
    """The TFDS data dir: `data_dir` if given, else `tfds/` in the cache folder (`$KERAS_CWSN_CACHE`, like every cache)."""
    if data_dir:
        return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    from keras_cwsn.data.folder import default_cache_dir

    return os.path.abspath(os.path.join(default_cache_dir(), "tfds"))


def _not_found_message(manual_dir, source, problem, config_name="birdsnap34", option="manual_dir="):
    return (f"Birdsnap download not found: {manual_dir} ({source}): {problem}. Point {option} or ${MANUAL_DIR_ENV} at "
            f"one (species.txt, images.txt, test_images.txt, images/); to get it: {BIRDSNAP_ARCHIVE_URL}, then "
            f"`python -m keras_cwsn.data.birdsnap download --subset {config_name} ...`.")


@functools.lru_cache(maxsize=8)
def _fingerprint(path, stamp):
    digest = hashlib.sha1()
    for name in ("species.txt", "images.txt", "test_images.txt"):
        digest.update(f"{name}\0{os.path.getsize(os.path.join(path, name))}\n".encode())
    images = os.path.join(path, "images")
    for species in sorted(os.listdir(images)):
        folder = os.path.join(images, species)
        if os.path.isdir(folder):
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.is_file():
                    digest.update(f"{species}/{entry.name}\0{entry.stat().st_size}\n".encode())
    return digest.hexdigest()[:20]


def download_fingerprint(manual_dir):
    """A fingerprint of a download's file list (the three text files' sizes, every image's path and size).

    The same download copied elsewhere keeps it; another download, or files added or removed, change it.
    """
    path = os.path.abspath(manual_dir)
    stamps = [os.stat(os.path.join(path, n)).st_mtime_ns for n in ("images.txt", "images")]
    return _fingerprint(path, tuple(stamps))


def is_download(manual_dir):
    """Whether a folder holds every entry of a Birdsnap download."""
    return all((os.path.isdir if e == "images" else os.path.isfile)(os.path.join(manual_dir, e))
               for e in REQUIRED_ENTRIES)


def check_download(manual_dir=None, config_name="birdsnap34", option="manual_dir="):
    """Checks that a folder holds a Birdsnap download and returns its absolute path.

    Args:
        manual_dir: optional path; resolved as in `resolve_manual_dir`.
        config_name: str. Only used to word the error message.

    Raises:
        BirdsnapNotFoundError: when the folder or one of species.txt, images.txt,
            test_images.txt, images/ is missing.
    """
    path, source = resolve_manual_dir(manual_dir)
    source = option.rstrip("=") if source == "manual_dir argument" else source
    if not os.path.isdir(path):
        problem = "it is not a folder" if os.path.exists(path) else "the folder does not exist"
        raise BirdsnapNotFoundError(_not_found_message(path, source, problem, config_name, option))
    for entry in REQUIRED_ENTRIES:
        full = os.path.join(path, entry)
        ok = os.path.isdir(full) if entry == "images" else os.path.isfile(full)
        if not ok:
            what = "images/ (the image folder)" if entry == "images" else entry
            raise BirdsnapNotFoundError(_not_found_message(path, source, f"{what} is missing there", config_name,
                                                           option))
    return path


def species_of(path):
    """Species folder of a path relative to images/ (its first component)."""
    return path.replace("\\", "/").split("/", 1)[0]


def _read_tsv(path):
    """Header and rows of a tab-separated file, blank lines dropped."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    if not rows:
        raise UserError(f"{path} is empty; expected a header line and rows.")
    return [c.strip() for c in rows[0]], rows[1:]


def _column_indices(header, path, columns):
    missing = [c for c in columns if c not in header]
    if missing:
        raise UserError(f"{path} has no column(s) {missing}; its header is {header}.")
    return [header.index(c) for c in columns]


def read_images_file(path):
    """Rows of Birdsnap's images.txt as dicts keyed by its header (at least url, md5, path).

    A row with fewer fields than the header gets empty strings for the missing ones.
    """
    header, rows = _read_tsv(path)
    _column_indices(header, path, ("url", "md5", "path"))
    out = []
    for row in rows:
        row = [c.strip() for c in row] + [""] * (len(header) - len(row))
        out.append(dict(zip(header, row)))
    return out


def read_test_images_file(path):
    """Paths listed in test_images.txt (its header line, if any, dropped)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line]
    # Birdsnap's header is "path"; a listed image always has a species folder.
    if lines and "/" not in lines[0].replace("\\", "/"):
        lines = lines[1:]
    return lines


def _read_species_dirs(path):
    header, rows = _read_tsv(path)
    (dir_index,) = _column_indices(header, path, ("dir",))
    return {row[dir_index].strip() for row in rows if len(row) > dir_index}


def _dedup(items):
    return list(dict.fromkeys(items))


def split_paths(manual_dir, fine_names):
    """Train/test image paths of the given species in a download, and counts for the preparation report.

    `test` is test_images.txt; `train` is every other path of images.txt.
    """
    wanted = set(fine_names)
    listed = [p for p in _dedup(row["path"] for row in read_images_file(os.path.join(manual_dir, "images.txt"))) if p]
    test = _dedup(read_test_images_file(os.path.join(manual_dir, "test_images.txt")))
    test_set = set(test)
    species_dirs = _read_species_dirs(os.path.join(manual_dir, "species.txt"))
    splits = {
        "train": [p for p in listed if species_of(p) in wanted and p not in test_set],
        "test": [p for p in test if species_of(p) in wanted],
    }
    extra = {
        "ignored_other_species": sum(1 for p in listed if species_of(p) not in wanted),
        "species_not_in_species_txt": sorted(wanted - species_dirs),
    }
    return splits, extra
