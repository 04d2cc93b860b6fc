"""The `cwsn_birdsnap` TFDS builder: prepares a Birdsnap download into TFRecords once, then loads them.

The only Birdsnap module that imports TensorFlow (Datasets); the package imports it on first use.
"""

import inspect
import io
import os
import shutil

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from keras_cwsn.atomic import read_json, write_json_atomic
from keras_cwsn.data.birdsnap.hierarchy import (
    BIRDSNAP_ARCHIVE_URL,
    CONFIGS,
    BirdsnapNotFoundError,
    birdsnap_dataset_info,
    birdsnap_hierarchy,
    check_config_name,
    check_download,
    download_fingerprint,
    is_download,
    resolve_data_dir,
    resolve_manual_dir,
    species_of,
    split_paths,
)

DATASET_NAME = "cwsn_birdsnap"
REPORT_FILE_NAME = "preparation_report.json"
CITATION = (
    "@inproceedings{berg2014birdsnap, title={Birdsnap: Large-scale Fine-grained Visual Categorization of Birds}, "
    "author={Berg, Thomas and Liu, Jiongxin and Lee, Seung Woo and Alexander, Michelle L. and Jacobs, David W. "
    "and Belhumeur, Peter N.}, booktitle={CVPR}, year={2014}}"
)


class _CorruptImageError(Exception):
    pass


def _read_image(path):
    """Bytes of an RGB JPEG for the image at `path`, and whether it had to be re-encoded.

    TFDS's `Image(encoding_format="jpeg")` needs RGB JPEG bytes, but Birdsnap's Flickr files include
    grayscale, CMYK, and PNG or GIF under a .jpg name: whatever PIL decodes is converted.
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


class Birdsnap(tfds.core.GeneratorBasedBuilder):
    """Birdsnap species (fine) and families (coarse) from a manual download.

    Features: `image` (RGB JPEG), `fine` and `coarse` (`ClassLabel`), `file_name` (path relative to
    images/). Splits: `test` = test_images.txt, `train` = every other image of images.txt. Missing and
    undecodable files are skipped and listed in `preparation_report.json` beside the TFRecords.
    """

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Birdsnap 1.1 download; birdsnap34 and birdsnap500 configs."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=config, description=f"Birdsnap: {spec.summary}.")
        for config, spec in CONFIGS.items()
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put a Birdsnap download in the manual dir (species.txt, images.txt, test_images.txt and "
        f"images/<species dir>/*.jpg). Get the three text files from {BIRDSNAP_ARCHIVE_URL}, then fetch "
        "the images with `python -m keras_cwsn.data.birdsnap download --images-file images.txt --out MANUAL_DIR`."
    )

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS 4.9.10's own `code_path` needs `importlib_resources`, which its requirements only
        # install on Python < 3.9; the file of this class is all TFDS needs here.
        return epath.Path(inspect.getfile(cls))

    def _info(self):
        fine, coarse, _ = birdsnap_hierarchy(self.builder_config.name)
        features = tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "fine": tfds.features.ClassLabel(names=list(fine)),
            "coarse": tfds.features.ClassLabel(names=list(coarse)),
            "file_name": tfds.features.Text(),
        })
        return self.dataset_info_from_configs(features=features, homepage="http://thomasberg.org/", citation=CITATION)

    def _split_generators(self, dl_manager):
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError:  # TFDS: manual dir missing or empty; check_download says what to do.
            manual_dir = getattr(dl_manager, "_manual_dir", None)
        manual_dir = check_download(manual_dir, self.builder_config.name)
        fine, _, fine_to_coarse = birdsnap_hierarchy(self.builder_config.name)
        splits, extra = split_paths(manual_dir, fine)
        self._preparation_report = {
            "dataset": f"{self.name}/{self.builder_config.name}",
            "version": str(self.version),
            "manual_dir": manual_dir,
            "source_fingerprint": download_fingerprint(manual_dir),
            "splits": {},
            **extra,
        }
        fine_index = {name: i for i, name in enumerate(fine)}
        return {
            split: self._generate_examples(split, paths, manual_dir, fine_index, fine_to_coarse)
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
            fine = fine_index[species_of(rel)]
            species_seen.add(fine)
            written += 1
            yield rel, {"image": data, "fine": fine, "coarse": fine_to_coarse[fine], "file_name": rel}
        if not written:
            raise BirdsnapNotFoundError(
                f"No usable image for split {split!r} of {self.builder_config.name} in "
                f"{os.path.join(manual_dir, 'images')}: {len(paths)} listed, {len(missing)} missing, "
                f"{len(corrupt)} undecodable. Is the download complete? Rerun "
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
            write_json_atomic(os.path.join(self.data_dir, REPORT_FILE_NAME), self._preparation_report)

    def download_and_prepare(self, **kwargs):
        self._preparation_report = None
        super().download_and_prepare(**kwargs)
        if self._preparation_report is not None:  # Prepared now, not reused.
            print(_summary_paragraph(self._preparation_report, self.data_dir), flush=True)


def _summary_paragraph(report, data_dir):
    parts = [
        f"{split} {r['examples_written']} examples (skipped {r['skipped_missing']} missing, "
        f"{r['skipped_corrupt']} corrupt; {r['converted_to_rgb_jpeg']} converted to RGB JPEG)"
        for split, r in report["splits"].items()
    ]
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


def birdsnap_builder(config_name="birdsnap34", data_dir=None):
    """The `Birdsnap` builder of a config in a data dir (default `~/.cache/keras_cwsn/tfds`); nothing is prepared."""
    check_config_name(config_name)
    return Birdsnap(config=config_name, data_dir=resolve_data_dir(data_dir))


def _prepared_from(builder, manual_dir, config_name, option):
    """Whether a prepared config came from the download `manual_dir` names; refuses a folder that is no download.

    The same folder (even emptied or moved since) or a download with the same file list is the same
    source; another download is not (the caller prepares it again).
    """
    report = read_json(os.path.join(builder.data_dir, REPORT_FILE_NAME), default={})
    path, _ = resolve_manual_dir(manual_dir)
    if not is_download(path):
        if report.get("manual_dir") == path:
            return True
        try:
            check_download(manual_dir, config_name, option)
        except BirdsnapNotFoundError as e:
            raise BirdsnapNotFoundError(f"{e} (The {config_name} prepared before came from "
                                        f"{report.get('manual_dir', 'an unknown download')}.)") from None
    if "source_fingerprint" in report:
        return report["source_fingerprint"] == download_fingerprint(path)
    return report.get("manual_dir") == path


def prepare_birdsnap(config_name="birdsnap34", data_dir=None, manual_dir=None, option="manual_dir="):
    """Prepares a Birdsnap config into TFRecords unless that was already done; returns the builder.

    Preparing reads the download once, writes TFRecords and `preparation_report.json` (with the
    download's folder and a fingerprint of its file list) under `data_dir/cwsn_birdsnap/<config>/1.0.0/`
    and prints a summary. A prepared config is reused without reading the download (which may be gone
    by then) unless `manual_dir` names another download: then it is prepared again from that one; a
    `manual_dir` that is no download (and not the one it came from) is refused, naming `option`.

    Args:
        config_name: str. `"birdsnap34"` or `"birdsnap500"`.
        data_dir: optional TFDS data dir; default `$KERAS_CWSN_CACHE/tfds` (`~/.cache/keras_cwsn/tfds`).
        manual_dir: optional folder of the Birdsnap download; default
            `$KERAS_CWSN_BIRDSNAP_DIR`, else `~/.cache/keras_cwsn/birdsnap`.
        option: str. How the caller's user names `manual_dir`, for messages (`--data-dir` in train.py).

    Raises:
        BirdsnapNotFoundError: when preparation is needed and the download is missing.
    """
    builder = birdsnap_builder(config_name, data_dir)
    if os.path.isdir(builder.data_dir) and builder.is_prepared():
        if manual_dir is None or _prepared_from(builder, manual_dir, config_name, option):
            return builder
        previous = (read_json(os.path.join(builder.data_dir, REPORT_FILE_NAME)) or {}).get("manual_dir")
        print(f"[data] {config_name} was prepared from {previous}; preparing it again from {manual_dir}", flush=True)
        shutil.rmtree(builder.data_dir)
        builder = birdsnap_builder(config_name, data_dir)
    manual = check_download(manual_dir, config_name, option)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False)
    )
    return builder


def read_preparation_report(config_name="birdsnap34", data_dir=None):
    """The `preparation_report.json` of a prepared config, as a dict (None if absent)."""
    return read_json(os.path.join(birdsnap_builder(config_name, data_dir).data_dir, REPORT_FILE_NAME))


def load_birdsnap(config_name="birdsnap34", split="train", data_dir=None, manual_dir=None, option="manual_dir="):
    """Loads a Birdsnap split as `(image, fine, coarse)` tuples, preparing it first if needed.

    Args:
        config_name: str. `"birdsnap34"` or `"birdsnap500"`.
        split: str. `"train"` or `"test"` (TFDS slicing such as `"train[:90%]"` works too).
        data_dir: optional TFDS data dir; default `$KERAS_CWSN_CACHE/tfds` (`~/.cache/keras_cwsn/tfds`).
        manual_dir: optional folder of the Birdsnap download, read when the config is not prepared yet
            or was prepared from another download (see `prepare_birdsnap`); default
            `$KERAS_CWSN_BIRDSNAP_DIR`, else `~/.cache/keras_cwsn/birdsnap`.
        option: str. How the caller's user names `manual_dir`, for messages.

    Returns:
        Tuple `(dataset, info)`. `dataset` yields `(image, fine, coarse)`: a uint8 `[H, W, 3]`
        image at its original size and int64 scalar labels, unbatched, in a fixed order.
        `info` is a `DatasetInfo` whose `num_examples` holds every split's size.

    Raises:
        BirdsnapNotFoundError: when preparation is needed and the download is missing.
    """
    builder = prepare_birdsnap(config_name, data_dir=data_dir, manual_dir=manual_dir, option=option)
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    dataset = dataset.map(
        lambda ex: (ex["image"], ex["fine"], ex["coarse"]), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    num_examples = {name: int(s.num_examples) for name, s in builder.info.splits.items()}
    return dataset, birdsnap_dataset_info(config_name, num_examples)


def load_birdsnap_labels(config_name="birdsnap34", split="train", data_dir=None, manual_dir=None):
    """Fine labels (int64 NumPy) of a split in `load_birdsnap`'s order, without decoding any image.

    Arguments as in `load_birdsnap`; coarse labels are `info.coarse_of(labels)`.
    """
    builder = prepare_birdsnap(config_name, data_dir=data_dir, manual_dir=manual_dir)
    dataset = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    return np.fromiter(dataset.map(lambda ex: ex["fine"]).as_numpy_iterator(), dtype=np.int64)
