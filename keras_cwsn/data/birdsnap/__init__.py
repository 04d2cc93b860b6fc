"""Birdsnap: a downloader, and a TFDS builder that prepares the download once.

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

Modules: `hierarchy` (configs, tables, where the download is), `download` (the downloader),
`builder` (the TFDS builder and loaders), `__main__` (the command line). The names below are
imported on first use, so importing this package, and the `download` command, need no TensorFlow.
"""

from keras_cwsn._lazy import lazy_getattr

_EXPORTS = {
    "hierarchy": ("CONFIGS", "DEFAULT_DATA_DIR", "DEFAULT_MANUAL_DIR", "MANUAL_DIR_ENV", "BIRDSNAP_ARCHIVE_URL",
                  "BirdsnapNotFoundError", "birdsnap_hierarchy", "birdsnap_dataset_info", "resolve_manual_dir",
                  "resolve_data_dir", "check_download", "read_images_file", "read_test_images_file"),
    "builder": ("DATASET_NAME", "REPORT_FILE_NAME", "Birdsnap", "birdsnap_builder", "prepare_birdsnap",
                "read_preparation_report", "load_birdsnap", "load_birdsnap_labels"),
    "download": ("FAILED_FILE_NAME", "DownloadSummary", "download_images"),
    "__main__": ("main",),
}
__all__ = [name for names in _EXPORTS.values() for name in names]

__getattr__ = lazy_getattr("keras_cwsn.data.birdsnap", _EXPORTS)
