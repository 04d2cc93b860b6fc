"""Birdsnap: a TFDS builder that prepares a Birdsnap download once, and a downloader for it.

Two configs: `birdsnap34` (the paper's 34 species in 18 families) and `birdsnap500` (all 500
species folders). The images come from a *manual download* in Birdsnap's own layout:

```
species.txt        header line, then tab-separated: id, common, scientific, dir
images.txt         header line, then tab-separated: url, md5, path, species_id, ...
test_images.txt    header line, then one path per line (relative to images/)
images/<dir>/<file>.jpg
```

Get it with `python -m keras_cwsn.data.birdsnap download --images-file images.txt --out DIR`
(images.txt, species.txt and test_images.txt are in Birdsnap's archive, see
`BIRDSNAP_ARCHIVE_URL`), then `load_birdsnap(manual_dir=DIR)` prepares TFRecords once and
loads them from then on.
"""

import argparse
import concurrent.futures
import csv
import dataclasses
import http.client
import hashlib
import inspect
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from keras_cwsn.data.info import TABLES_DIR
from keras_cwsn.data.info import DatasetInfo
from keras_cwsn.data.info import read_hierarchy_table

DATASET_NAME = "cwsn_birdsnap"
CONFIG_TABLES = {
    "birdsnap34": "birdsnap34.tsv",
    "birdsnap500": "birdsnap500.tsv",
}
FINE_COLUMN = "dir"
COARSE_COLUMN = "family"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "keras_cwsn", "tfds")
DEFAULT_MANUAL_DIR = os.path.join("~", ".cache", "keras_cwsn", "birdsnap")
MANUAL_DIR_ENV = "KERAS_CWSN_BIRDSNAP_DIR"
BIRDSNAP_ARCHIVE_URL = "http://thomasberg.org/datasets/birdsnap/1.1/birdsnap.tgz"
REQUIRED_ENTRIES = ("species.txt", "images.txt", "test_images.txt", "images")
METADATA_FILES = ("images.txt", "species.txt", "test_images.txt")
REPORT_FILE_NAME = "preparation_report.json"
FAILED_FILE_NAME = "failed.tsv"
IMAGE_SIZE = (224, 224)


class BirdsnapNotFoundError(FileNotFoundError):
    """Raised when the Birdsnap download is not where the loader looked."""


# ---------------------------------------------------------------------------------------------
# Hierarchy and paths.


def _check_config_name(config_name):
    if config_name not in CONFIG_TABLES:
        raise ValueError(
            f"Unknown Birdsnap config {config_name!r}; expected one of {sorted(CONFIG_TABLES)}."
        )


def birdsnap_hierarchy(config_name="birdsnap34"):
    """Fine (species folder) and coarse (family) names of a Birdsnap config.

    Args:
        config_name: str. `"birdsnap34"` or `"birdsnap500"`.

    Returns:
        Tuple `(fine_names, coarse_names, fine_to_coarse)`: species folder names in table
        order, family names in order of first appearance, and the family index of each species.
    """
    _check_config_name(config_name)
    fine, coarse, fine_to_coarse, _ = read_hierarchy_table(
        os.path.join(TABLES_DIR, CONFIG_TABLES[config_name]), FINE_COLUMN, COARSE_COLUMN
    )
    return fine, coarse, fine_to_coarse


def birdsnap_dataset_info(config_name="birdsnap34", num_examples=None):
    """The `DatasetInfo` of a Birdsnap config, without touching any data.

    Args:
        config_name: str. `"birdsnap34"` or `"birdsnap500"`.
        num_examples: optional dict split -> int.

    Returns:
        A `DatasetInfo` with `image_size=(224, 224)` and `normalization="imagenet"`.
    """
    fine, coarse, fine_to_coarse = birdsnap_hierarchy(config_name)
    return DatasetInfo(
        name=config_name,
        fine_names=fine,
        coarse_names=coarse,
        fine_to_coarse=fine_to_coarse,
        image_size=IMAGE_SIZE,
        normalization="imagenet",
        num_examples=dict(num_examples or {}),
    )


def resolve_manual_dir(manual_dir=None):
    """Where the Birdsnap download is looked for, and what chose it.

    Args:
        manual_dir: optional path. Wins over `$KERAS_CWSN_BIRDSNAP_DIR`, which wins over
            `~/.cache/keras_cwsn/birdsnap`.

    Returns:
        Tuple `(path, source)`; `source` says which of the three gave `path`.
    """
    if manual_dir:
        return os.path.abspath(os.path.expanduser(os.fspath(manual_dir))), "manual_dir argument"
    env = os.environ.get(MANUAL_DIR_ENV)
    if env:
        return os.path.abspath(os.path.expanduser(env)), f"${MANUAL_DIR_ENV}"
    return os.path.abspath(os.path.expanduser(DEFAULT_MANUAL_DIR)), "default location"


def resolve_data_dir(data_dir=None):
    """The TFDS data dir: `data_dir` if given, else `~/.cache/keras_cwsn/tfds`."""
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir or DEFAULT_DATA_DIR)))


def _not_found_message(manual_dir, source, problem, config_name="birdsnap34"):
    return (
        f"Birdsnap download not found: looked in {manual_dir} ({source}) and {problem}. "
        "Put a Birdsnap download there (species.txt, images.txt, test_images.txt and "
        "images/<species dir>/*.jpg), or point to one with `manual_dir=` or "
        f"${MANUAL_DIR_ENV}. To get it: unpack Birdsnap's archive {BIRDSNAP_ARCHIVE_URL} "
        "(it holds images.txt, species.txt and test_images.txt), then fetch the images with "
        "`python -m keras_cwsn.data.birdsnap download --images-file images.txt "
        f"--out {manual_dir} --subset {config_name}` (it copies species.txt and "
        "test_images.txt from beside images.txt into --out)."
    )


def check_download(manual_dir=None, config_name="birdsnap34"):
    """Checks that a folder holds a Birdsnap download and returns its absolute path.

    Args:
        manual_dir: optional path; resolved as in `resolve_manual_dir`.
        config_name: str. Only used to word the error message.

    Returns:
        The absolute path of the download.

    Raises:
        BirdsnapNotFoundError: when the folder or one of species.txt, images.txt,
            test_images.txt, images/ is missing.
    """
    path, source = resolve_manual_dir(manual_dir)
    if not os.path.isdir(path):
        problem = "it is not a folder" if os.path.exists(path) else "the folder does not exist"
        raise BirdsnapNotFoundError(_not_found_message(path, source, problem, config_name))
    for entry in REQUIRED_ENTRIES:
        full = os.path.join(path, entry)
        ok = os.path.isdir(full) if entry == "images" else os.path.isfile(full)
        if not ok:
            what = "images/ (the image folder)" if entry == "images" else entry
            raise BirdsnapNotFoundError(
                _not_found_message(path, source, f"{what} is missing there", config_name)
            )
    return path


# ---------------------------------------------------------------------------------------------
# Reading a download.


def _species_of(path):
    """Species folder of a path relative to images/ (its first component)."""
    return path.replace("\\", "/").split("/", 1)[0]


def _read_tsv(path):
    """Header and rows of a tab-separated file, blank lines dropped."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    if not rows:
        raise ValueError(f"{path} is empty; expected a header line and rows.")
    return [c.strip() for c in rows[0]], rows[1:]


def _column_indices(header, path, columns):
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing}; its header is {header}.")
    return [header.index(c) for c in columns]


def read_images_file(path):
    """Rows of Birdsnap's images.txt as dicts with at least url, md5, path, species_id.

    Args:
        path: path of images.txt (header line naming the columns, then tab-separated rows).

    Returns:
        List of dicts, one per row, keyed by the header's column names. A row with fewer
        fields than the header gets empty strings for the missing ones.
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


def _split_paths(manual_dir, fine_names):
    """Train/test paths of the subset's species, and bookkeeping for the report."""
    wanted = set(fine_names)
    listed = _dedup(row["path"] for row in read_images_file(os.path.join(manual_dir, "images.txt")))
    listed = [p for p in listed if p]
    test = _dedup(read_test_images_file(os.path.join(manual_dir, "test_images.txt")))
    test_set = set(test)
    species_dirs = _read_species_dirs(os.path.join(manual_dir, "species.txt"))
    splits = {
        "train": [p for p in listed if _species_of(p) in wanted and p not in test_set],
        "test": [p for p in test if _species_of(p) in wanted],
    }
    extra = {
        "ignored_other_species": sum(1 for p in listed if _species_of(p) not in wanted),
        "species_not_in_species_txt": sorted(wanted - species_dirs),
    }
    return splits, extra


class _CorruptImageError(Exception):
    pass


def _read_image(path):
    """Bytes of an RGB JPEG for the image at `path`, and whether it had to be re-encoded.

    Any image PIL can decode is accepted; what is not already an RGB JPEG (grayscale,
    CMYK, PNG or GIF under a .jpg name, ...) is converted to RGB and re-encoded as JPEG.
    """
    from PIL import Image as PILImage

    with open(path, "rb") as f:
        data = f.read()
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            img.load()
            if img.format == "JPEG" and img.mode == "RGB":
                return data, False
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as e:
        raise _CorruptImageError(f"{type(e).__name__}: {e}") from e
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue(), True


# ---------------------------------------------------------------------------------------------
# The TFDS builder.


_MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
Put a Birdsnap download in the manual dir (species.txt, images.txt, test_images.txt and
images/<species dir>/*.jpg). Get images.txt, species.txt and test_images.txt from
{BIRDSNAP_ARCHIVE_URL}, then fetch the images with
`python -m keras_cwsn.data.birdsnap download --images-file images.txt --out MANUAL_DIR`.
"""


def _define_builder():
    """Imports TFDS and defines (and registers) the `Birdsnap` builder class."""
    import tensorflow_datasets as tfds
    from etils import epath
    from tensorflow_datasets.core import utils as tfds_utils

    class Birdsnap(tfds.core.GeneratorBasedBuilder, skip_registration=__name__ == "__main__"):
        """Birdsnap species (fine) and families (coarse) from a manual download.

        Configs: `birdsnap34` (34 species, 18 families) and `birdsnap500` (all 500 species).
        Features: `image` (JPEG, RGB), `fine` and `coarse` (`ClassLabel`), `file_name` (path
        relative to images/). Splits: `test` = Birdsnap's test_images.txt, `train` = every other
        image of images.txt. Images of other species are ignored; missing and undecodable files
        are skipped and listed in `preparation_report.json` next to the prepared TFRecords.
        """

        name = DATASET_NAME
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Birdsnap 1.1 download; birdsnap34 and birdsnap500 configs."}
        BUILDER_CONFIGS = [
            tfds.core.BuilderConfig(
                name="birdsnap34", description="34 Birdsnap species in 18 families (the paper's subset)."
            ),
            tfds.core.BuilderConfig(
                name="birdsnap500", description="All 500 Birdsnap species folders with their families."
            ),
        ]
        MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

        @tfds_utils.classproperty
        @classmethod
        def code_path(cls):
            # TFDS 4.9.10's own `code_path` needs `importlib_resources`, which its requirements only
            # install on Python < 3.9; the file of this class is all TFDS needs here.
            return epath.Path(inspect.getfile(cls))

        def _info(self):
            fine, coarse, _ = birdsnap_hierarchy(self.builder_config.name)
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                        "fine": tfds.features.ClassLabel(names=list(fine)),
                        "coarse": tfds.features.ClassLabel(names=list(coarse)),
                        "file_name": tfds.features.Text(),
                    }
                ),
                homepage="http://thomasberg.org/",
                citation=(
                    "@inproceedings{berg2014birdsnap, title={Birdsnap: Large-scale Fine-grained "
                    "Visual Categorization of Birds}, author={Berg, Thomas and Liu, Jiongxin and "
                    "Lee, Seung Woo and Alexander, Michelle L. and Jacobs, David W. and Belhumeur, "
                    "Peter N.}, booktitle={CVPR}, year={2014}}"
                ),
            )

        def _split_generators(self, dl_manager):
            try:
                manual_dir = os.fspath(dl_manager.manual_dir)
            except AssertionError:  # TFDS: manual dir missing or empty.
                manual_dir = os.fspath(getattr(dl_manager, "_manual_dir", None) or DEFAULT_MANUAL_DIR)
            manual_dir = check_download(manual_dir, self.builder_config.name)
            fine, _, fine_to_coarse = birdsnap_hierarchy(self.builder_config.name)
            splits, extra = _split_paths(manual_dir, fine)
            self._preparation_report = {
                "dataset": f"{self.name}/{self.builder_config.name}",
                "version": str(self.version),
                "manual_dir": manual_dir,
                "splits": {},
                **extra,
            }
            fine_index = {name: i for i, name in enumerate(fine)}
            return {
                split: self._generate_examples(
                    split=split,
                    paths=paths,
                    manual_dir=manual_dir,
                    fine_index=fine_index,
                    fine_to_coarse=fine_to_coarse,
                )
                for split, paths in splits.items()
            }

        def _generate_examples(self, split, paths, manual_dir, fine_index, fine_to_coarse):
            written, missing, corrupt, converted = 0, [], [], []
            species_seen = set()
            for rel in paths:
                full = os.path.join(manual_dir, "images", rel)
                if not os.path.isfile(full):
                    missing.append(rel)
                    continue
                try:
                    data, was_converted = _read_image(full)
                except _CorruptImageError as e:
                    corrupt.append({"file_name": rel, "error": str(e)})
                    continue
                if was_converted:
                    converted.append(rel)
                fine = fine_index[_species_of(rel)]
                species_seen.add(fine)
                written += 1
                yield rel, {
                    "image": data,
                    "fine": fine,
                    "coarse": fine_to_coarse[fine],
                    "file_name": rel,
                }
            if not written:
                raise BirdsnapNotFoundError(
                    f"No usable image for split {split!r} of {self.builder_config.name} in "
                    f"{os.path.join(manual_dir, 'images')}: {len(paths)} listed, {len(missing)} "
                    f"missing, {len(corrupt)} undecodable. Is the download complete? Rerun "
                    "`python -m keras_cwsn.data.birdsnap download ...` and check its failed.tsv."
                )
            names = sorted(fine_index, key=fine_index.get)
            self._preparation_report["splits"][split] = {
                "examples_written": written,
                "skipped_missing": len(missing),
                "skipped_corrupt": len(corrupt),
                "converted_to_rgb_jpeg": len(converted),
                "species_without_examples": [n for i, n in enumerate(names) if i not in species_seen],
                "missing_files": missing,
                "corrupt_files": corrupt,
                "converted_files": converted,
            }

        def _download_and_prepare(self, dl_manager, download_config):
            self._preparation_report = None
            super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
            # self.data_dir is still the temporary folder TFDS renames on success, so the report
            # appears together with the TFRecords.
            if self._preparation_report is not None:
                with open(os.path.join(self.data_dir, REPORT_FILE_NAME), "w", encoding="utf-8") as f:
                    json.dump(self._preparation_report, f, indent=2)

        def download_and_prepare(self, **kwargs):
            self._preparation_report = None
            super().download_and_prepare(**kwargs)
            if self._preparation_report is not None:  # Prepared now, not reused.
                print(_summary_paragraph(self._preparation_report, self.data_dir), flush=True)

    Birdsnap.__qualname__ = "Birdsnap"
    return Birdsnap


_builder_lock = threading.Lock()
_builder_class = None


def builder_class():
    """The `Birdsnap` TFDS builder class, defined and registered as `cwsn_birdsnap` on first use.

    TensorFlow Datasets is only imported when needed, so the downloader runs without
    TensorFlow. `keras_cwsn.data.birdsnap.Birdsnap` is the same class.
    """
    global _builder_class
    with _builder_lock:
        if _builder_class is None:
            _builder_class = _define_builder()
        return _builder_class


def __getattr__(name):
    if name == "Birdsnap":
        return builder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _summary_paragraph(report, data_dir):
    parts = []
    for split, r in report["splits"].items():
        parts.append(
            f"{split} {r['examples_written']} examples (skipped {r['skipped_missing']} missing, "
            f"{r['skipped_corrupt']} corrupt; {r['converted_to_rgb_jpeg']} converted to RGB JPEG)"
        )
    text = (
        f"Prepared {report['dataset']} {report['version']} from {report['manual_dir']} into "
        f"{data_dir}: {'; '.join(parts)}. Ignored {report['ignored_other_species']} listed "
        "images of species outside this config."
    )
    empty = report["splits"].get("train", {}).get("species_without_examples")
    if empty:
        text += f" {len(empty)} species have no train images: {', '.join(empty[:10])}"
        text += "..." if len(empty) > 10 else "."
    return text + f" Details: {os.path.join(data_dir, REPORT_FILE_NAME)}."


# ---------------------------------------------------------------------------------------------
# Public entry points.


def birdsnap_builder(config_name="birdsnap34", data_dir=None):
    """The `Birdsnap` builder of a config in a data dir (nothing is prepared).

    Args:
        config_name: str. `"birdsnap34"` or `"birdsnap500"`.
        data_dir: optional TFDS data dir; default `~/.cache/keras_cwsn/tfds`.
    """
    _check_config_name(config_name)
    return builder_class()(config=config_name, data_dir=resolve_data_dir(data_dir))


def prepare_birdsnap(config_name="birdsnap34", data_dir=None, manual_dir=None):
    """Prepares a Birdsnap config into TFRecords unless that was already done.

    Preparing reads the download once, writes TFRecords and `preparation_report.json` under
    `data_dir/cwsn_birdsnap/<config>/1.0.0/` and prints a summary. When the data dir already
    holds the prepared config nothing is read or written, and the download is not needed.

    Args:
        config_name: str. `"birdsnap34"` or `"birdsnap500"`.
        data_dir: optional TFDS data dir; default `~/.cache/keras_cwsn/tfds`.
        manual_dir: optional folder of the Birdsnap download; default
            `$KERAS_CWSN_BIRDSNAP_DIR`, else `~/.cache/keras_cwsn/birdsnap`.

    Returns:
        The prepared `Birdsnap` builder.

    Raises:
        BirdsnapNotFoundError: when preparation is needed and the download is missing.
    """
    builder = birdsnap_builder(config_name, data_dir)
    if os.path.isdir(builder.data_dir) and builder.is_prepared():
        return builder
    import tensorflow_datasets as tfds

    manual = check_download(manual_dir, config_name)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False)
    )
    return builder


def read_preparation_report(config_name="birdsnap34", data_dir=None):
    """The `preparation_report.json` of a prepared config, as a dict (None if absent)."""
    path = os.path.join(birdsnap_builder(config_name, data_dir).data_dir, REPORT_FILE_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_birdsnap(config_name="birdsnap34", split="train", data_dir=None, manual_dir=None):
    """Loads a Birdsnap split as `(image, fine, coarse)` tuples, preparing it first if needed.

    Args:
        config_name: str. `"birdsnap34"` or `"birdsnap500"`.
        split: str. `"train"` or `"test"` (TFDS slicing such as `"train[:90%]"` works too).
        data_dir: optional TFDS data dir; default `~/.cache/keras_cwsn/tfds`.
        manual_dir: optional folder of the Birdsnap download, only read when the config is not
            prepared yet; default `$KERAS_CWSN_BIRDSNAP_DIR`, else `~/.cache/keras_cwsn/birdsnap`.

    Returns:
        Tuple `(dataset, info)`. `dataset` yields `(image, fine, coarse)`: a uint8 `[H, W, 3]`
        image at its original size and int64 scalar labels, unbatched, in a fixed order.
        `info` is a `DatasetInfo` (image_size (224, 224), ImageNet normalisation) whose
        `num_examples` holds every split's size.

    Raises:
        BirdsnapNotFoundError: when preparation is needed and the download is missing.
        ValueError: for an unknown config.
    """
    import tensorflow as tf

    builder = prepare_birdsnap(config_name, data_dir=data_dir, manual_dir=manual_dir)
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    dataset = dataset.map(
        lambda ex: (ex["image"], ex["fine"], ex["coarse"]),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    num_examples = {name: int(s.num_examples) for name, s in builder.info.splits.items()}
    return dataset, birdsnap_dataset_info(config_name, num_examples)


def load_birdsnap_labels(config_name="birdsnap34", split="train", data_dir=None, manual_dir=None):
    """Fine labels of a Birdsnap split in `load_birdsnap`'s order, without decoding images.

    Args:
        config_name: str. `"birdsnap34"` or `"birdsnap500"`.
        split: str. As in `load_birdsnap`.
        data_dir: optional TFDS data dir; default `~/.cache/keras_cwsn/tfds`.
        manual_dir: optional folder of the Birdsnap download (only read to prepare).

    Returns:
        int64 NumPy array of fine labels (coarse ones: `info.coarse_of(labels)`).
    """
    import numpy as np
    import tensorflow_datasets as tfds

    builder = prepare_birdsnap(config_name, data_dir=data_dir, manual_dir=manual_dir)
    dataset = builder.as_dataset(
        split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
    )
    return np.fromiter(dataset.map(lambda ex: ex["fine"]).as_numpy_iterator(), dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Downloader.


@dataclasses.dataclass
class DownloadSummary:
    """What a `download_images` run did.

    Args:
        total: int. Rows considered (after `subset`).
        downloaded: int. Files fetched in this run.
        already_ok: int. Files already present with the right md5.
        failed: list of `(url, path, reason)`.
    """

    total: int = 0
    downloaded: int = 0
    already_ok: int = 0
    failed: list = dataclasses.field(default_factory=list)


class _Permanent(Exception):
    """A download failure that retrying will not fix (404, bad URL)."""


def _safe_destination(images_dir, rel):
    """Absolute destination of `rel` under `images_dir`, or raise ValueError."""
    if not rel:
        raise ValueError("empty path")
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith(("/", "\\")) or os.path.isabs(rel) or os.path.splitdrive(rel)[0]:
        raise ValueError(f"absolute path {rel!r} refused")
    if ".." in parts:
        raise ValueError(f"path {rel!r} with '..' refused")
    dest = os.path.realpath(os.path.join(images_dir, *[p for p in parts if p not in ("", ".")]))
    root = os.path.realpath(images_dir)
    if os.path.commonpath([dest, root]) != root or dest == root:
        raise ValueError(f"path {rel!r} leaves the output folder")
    return dest


def _md5_of(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url, dest, md5, timeout):
    """Downloads `url` to `dest` through a temporary file; raises on any failure."""
    request = urllib.request.Request(url, headers={"User-Agent": "keras_cwsn-birdsnap/1.0"})
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".", suffix=".part")
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    if "photo_unavailable" in (response.geturl() or ""):
                        raise _Permanent("photo no longer available (redirected to placeholder)")
                    for chunk in iter(lambda: response.read(1 << 16), b""):
                        digest.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as e:
                if e.code in (408, 425, 429) or e.code >= 500:
                    raise
                raise _Permanent(f"HTTP {e.code} {e.reason}") from e
        if md5 and digest.hexdigest() != md5.lower():
            raise ValueError(f"md5 mismatch (got {digest.hexdigest()}, expected {md5.lower()})")
        os.replace(tmp, dest)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _describe(error):
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"URL error: {error.reason}"
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{error}" if isinstance(error, (_Permanent, ValueError)) else f"{type(error).__name__}: {error}"


def _download_one(url, dest, md5, retries, timeout, backoff_base):
    """Returns "ok" (already there) or "downloaded", or raises with the last failure."""
    if os.path.isfile(dest) and (not md5 or _md5_of(dest) == md5.lower()):
        return "ok"
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise _Permanent(f"unsupported URL {url!r} (only http and https)")
    attempt = 0
    while True:
        try:
            _fetch(url, dest, md5, timeout)
            return "downloaded"
        except (OSError, ValueError, http.client.HTTPException):  # Network, timeout, md5.
            if attempt >= retries:
                raise
        time.sleep(backoff_base * (2**attempt))
        attempt += 1


def _subset_species(subset):
    if subset is None:
        return None
    fine, _, _ = birdsnap_hierarchy(subset)
    return set(fine)


def _clean(text):
    return " ".join(str(text).split())


def download_images(
    images_file,
    out_dir,
    subset=None,
    workers=16,
    retries=3,
    timeout=30.0,
    backoff_base=1.0,
    progress=True,
):
    """Downloads the images listed in Birdsnap's images.txt into `out_dir/images/`.

    Every file is checked against its md5; a bad one is deleted and retried. Files are written
    to a temporary name and renamed when complete, so a rerun skips what is already there with
    the right md5. Rows whose path is absolute or contains `..` are refused (counted as
    failed). images.txt, and species.txt / test_images.txt when they sit beside it, are copied
    into `out_dir`; `out_dir/failed.tsv` lists every failure (url, path, reason).

    Args:
        images_file: path of Birdsnap's images.txt.
        out_dir: output folder (the future manual dir).
        subset: optional `"birdsnap34"` or `"birdsnap500"`: keep only rows whose species folder
            (first component of the path) is in that config's table.
        workers: int. Parallel downloads.
        retries: int. Extra attempts after the first for network errors, timeouts, 5xx/429
            answers and md5 mismatches (404 and the like are not retried).
        timeout: float. Socket timeout in seconds for each attempt.
        backoff_base: float. Sleep `backoff_base * 2**attempt` seconds before a retry.
        progress: bool. Show a tqdm progress bar on stderr.

    Returns:
        A `DownloadSummary`.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}.")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}.")
    if backoff_base < 0:
        raise ValueError(f"backoff_base must be >= 0, got {backoff_base}.")
    if not os.path.isfile(images_file):
        raise FileNotFoundError(f"images file not found: {images_file}")
    wanted = _subset_species(subset)
    rows = read_images_file(images_file)
    out_dir = os.path.abspath(os.fspath(out_dir))
    images_dir = os.path.join(out_dir, "images")
    os.makedirs(images_dir, exist_ok=True)

    summary = DownloadSummary()
    jobs, seen = [], set()
    for row in rows:
        url, rel, md5 = row["url"], row["path"], row["md5"]
        try:
            dest = _safe_destination(images_dir, rel)
        except ValueError as e:
            summary.failed.append((url, rel, str(e)))
            continue
        if wanted is not None and _species_of(rel) not in wanted:
            continue
        if dest in seen:
            continue
        seen.add(dest)
        jobs.append((url, rel, dest, md5))
    summary.total = len(jobs) + len(summary.failed)

    from tqdm.auto import tqdm  # A TFDS dependency.

    with tqdm(total=len(jobs), unit="img", disable=not progress, file=sys.stderr) as bar:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {
                pool.submit(_download_one, url, dest, md5, retries, timeout, backoff_base): (url, rel)
                for url, rel, dest, md5 in jobs
            }
            try:
                for future in concurrent.futures.as_completed(futures):
                    url, rel = futures[future]
                    try:
                        outcome = future.result()
                    except Exception as e:  # One bad file must not stop the others.
                        summary.failed.append((url, rel, _describe(e)))
                    else:
                        if outcome == "ok":
                            summary.already_ok += 1
                        else:
                            summary.downloaded += 1
                    bar.update(1)
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)
                raise

    with open(os.path.join(out_dir, FAILED_FILE_NAME), "w", encoding="utf-8", newline="") as f:
        f.write("url\tpath\treason\n")
        for url, rel, reason in summary.failed:
            f.write(f"{_clean(url)}\t{_clean(rel)}\t{_clean(reason)}\n")
    source_dir = os.path.dirname(os.path.abspath(images_file))
    for name in METADATA_FILES:
        source = images_file if name == "images.txt" else os.path.join(source_dir, name)
        target = os.path.join(out_dir, name)
        if os.path.isfile(source) and not (
            os.path.exists(target) and os.path.samefile(source, target)
        ):
            shutil.copyfile(source, target)
    return summary


# ---------------------------------------------------------------------------------------------
# Command line.


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def _parser():
    parser = _Parser(
        prog="python -m keras_cwsn.data.birdsnap",
        description="Download Birdsnap images, or prepare a Birdsnap download into TFRecords.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    download = commands.add_parser("download", help="Fetch the images listed in images.txt.")
    download.add_argument("--images-file", required=True, help="Birdsnap's images.txt.")
    download.add_argument("--out", required=True, help="Output folder (the manual dir).")
    download.add_argument("--subset", choices=sorted(CONFIG_TABLES), default=None)
    download.add_argument("--workers", type=int, default=16)
    download.add_argument("--retries", type=int, default=3)
    download.add_argument("--timeout", type=float, default=30.0, help="Seconds per attempt.")
    download.add_argument("--backoff-base", type=float, default=1.0, help="Seconds; doubles per retry.")
    download.add_argument("--no-progress", action="store_true", help="No progress bar.")
    prepare = commands.add_parser("prepare", help="Prepare a download into TFRecords once.")
    prepare.add_argument("--config", choices=sorted(CONFIG_TABLES), default="birdsnap34")
    prepare.add_argument("--manual-dir", default=None, help=f"Default ${MANUAL_DIR_ENV} or {DEFAULT_MANUAL_DIR}.")
    prepare.add_argument("--data-dir", default=None, help=f"Default {DEFAULT_DATA_DIR}.")
    return parser


def main(argv=None):
    """Command line entry point; returns the exit status (0 ok, 1 some downloads failed, 2 bad input)."""
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        print(f"birdsnap: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    try:
        if args.command == "prepare":
            prepare_birdsnap(args.config, data_dir=args.data_dir, manual_dir=args.manual_dir)
            return 0
        summary = download_images(
            args.images_file,
            args.out,
            subset=args.subset,
            workers=args.workers,
            retries=args.retries,
            timeout=args.timeout,
            backoff_base=args.backoff_base,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as e:
        print(f"birdsnap {args.command}: error: {_clean(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("birdsnap download: interrupted; run it again to resume.", file=sys.stderr)
        return 130
    out = os.path.abspath(args.out)
    print(
        f"Birdsnap download: {summary.downloaded} downloaded, {summary.already_ok} already ok, "
        f"{len(summary.failed)} failed of {summary.total} images into {os.path.join(out, 'images')}"
        + (f" (see {os.path.join(out, FAILED_FILE_NAME)})." if summary.failed else "."),
        flush=True,
    )
    return 1 if summary.failed else 0


if __name__ == "__main__":
    # Run the registered module's `main`, not this `__main__` copy of it.
    from keras_cwsn.data.birdsnap import main as _main

    sys.exit(_main())
