"""Read a folder of class sub-folders (`DIR/<split>/<class>/*.jpg`) into memory, in parallel, once.

Decoding runs in tf.data (parallel, AUTOTUNE), or with Pillow in threads where TensorFlow is not
installed; files that fail to decode (corrupt, zero bytes)
are skipped and counted by name. The decoded arrays are cached as `.npy` under the cache
folder, keyed by the listing (paths, sizes, mtimes), so later runs start in a second.
"""

import concurrent.futures
import hashlib
import json
import os
import sys
import unicodedata

import numpy as np

from keras_cwsn.atomic import atomic_path, write_json_atomic
from keras_cwsn.constants import IMAGE_EXTENSIONS
from keras_cwsn.errors import UserError
from keras_cwsn.optional import tensorflow_available


class FolderError(UserError):
    """A data folder that can't be read as `<split>/<class>/<images>`."""


def default_cache_dir():
    return os.environ.get("KERAS_CWSN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "keras_cwsn"))


def _nfc(name):
    return unicodedata.normalize("NFC", name)


def list_split(data_dir, split_folder, class_names, every_class=False):
    """(paths, labels, report) for `data_dir/split_folder/<class>/*`; unknown class folders are an error.

    `every_class`: a class with no folder is an error too (else it is reported as an empty folder).
    """
    root = os.path.join(data_dir, split_folder)
    if not os.path.isdir(root):
        raise FolderError(f"No folder {root!r}: expected {split_folder}/<class>/<images> under --data-dir {data_dir!r}.")
    # Folders a system or tool leaves (.ipynb_checkpoints, __MACOSX) are not classes. Names are compared in
    # Unicode's composed form: macOS and its zips write decomposed names ("e" + accent) that look the same.
    on_disk = {_nfc(d): d for d in sorted(os.listdir(root))
               if os.path.isdir(os.path.join(root, d)) and not d.startswith(".") and d != "__MACOSX"}
    known = {_nfc(c) for c in class_names}
    unknown = [on_disk[d] for d in on_disk if d not in known]
    if unknown:
        hint = (" None of the folders is a class of the table: does it name the classes in another column? "
                "Say which with --fine-column." if len(unknown) == len(on_disk) else "")
        raise FolderError(f"{root}: class folder(s) {', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''}"
                          f" not in the class table ({len(class_names)} classes): add a row to the hierarchy table "
                          f"for each, or move the folder out.{hint}")
    missing = [c for c in class_names if _nfc(c) not in on_disk]
    if every_class and missing:
        raise FolderError(f"{root}: no folder for {len(missing)} class(es) of the hierarchy table "
                          f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): add the folders, or "
                          f"drop their rows from the table.")
    paths, labels, report = [], [], {"empty_class_folders": [], "non_image_files": 0, "sub_folders": []}
    for label, name in enumerate(class_names):
        folder = os.path.join(root, on_disk.get(_nfc(name), name))
        # scandir reads each entry's type with its name: no stat per image (thousands per folder)
        entries = sorted(os.scandir(folder), key=lambda e: e.name) if os.path.isdir(folder) else []
        nested = [e.name for e in entries if e.is_dir()]
        images = [e.name for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.is_dir()]
        report["sub_folders"] += [f"{name}/{d}" for d in nested]
        report["non_image_files"] += len(entries) - len(images) - len(nested)
        if not images:
            report["empty_class_folders"].append(name)
        paths += [os.path.join(folder, f) for f in images]
        labels += [label] * len(images)
    if not paths:
        raise FolderError(f"{root}: no images found in any class folder.")
    return paths, np.asarray(labels, dtype=np.int64), report


def decode_files(paths, labels, image_size, decoder="auto"):
    """Decode image files in parallel to uint8 (N, H, W, 3) at `image_size`; skip undecodable ones.

    Args:
        decoder: str. `"tensorflow"` (tf.data, parallel), `"pillow"` (threads; no TensorFlow needed)
            or `"auto"` (TensorFlow where it is installed). Both give the same pixels for lossless
            files; JPEG decoders may differ by a grey level.

    Returns (images, labels, skipped_paths).
    """
    if decoder == "pillow" or (decoder == "auto" and not tensorflow_available()):
        return _decode_files_pillow(paths, labels, image_size)
    import tensorflow as tf

    from keras_cwsn.data.preprocess import decode_rgb

    height, width = image_size

    def load(index):
        data = tf.io.read_file(tf.gather(paths_t, index))
        image = decode_rgb(data)
        if not (height is None or width is None):
            image = tf.cond(
                tf.reduce_all(tf.shape(image)[:2] == [height, width]),
                lambda: image,
                lambda: tf.cast(tf.round(tf.image.resize(image, (height, width), antialias=True)), tf.uint8),
            )
        return image, index

    paths_t = tf.constant(paths)
    ds = tf.data.Dataset.range(len(paths)).map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().batch(1024)
    images, kept = [], []
    for batch_images, batch_index in ds:
        images.append(batch_images.numpy())
        kept.append(batch_index.numpy())
    kept = np.concatenate(kept) if kept else np.zeros((0,), np.int64)
    images = np.concatenate(images) if images else np.zeros((0, height, width, 3), np.uint8)
    skipped = sorted(set(range(len(paths))) - set(kept.tolist()))
    return images, labels[kept], [paths[i] for i in skipped]


def _decode_one_pillow(path, image_size):
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")  # grey, CMYK, palette and alpha images become RGB
        if image.size != (image_size[1], image_size[0]):
            image = image.resize((image_size[1], image_size[0]), Image.BILINEAR, reducing_gap=None)
        return np.asarray(image, np.uint8)


def _decode_files_pillow(paths, labels, image_size):
    """`decode_files` with Pillow in a thread pool (decoding releases the GIL)."""
    from PIL import UnidentifiedImageError

    def load(path):
        try:
            return _decode_one_pillow(path, image_size)
        except (OSError, UnidentifiedImageError, ValueError):  # corrupt, truncated, zero bytes
            return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(load, paths, chunksize=64))
    kept = [i for i, image in enumerate(decoded) if image is not None]
    images = (np.stack([decoded[i] for i in kept]) if kept
              else np.zeros((0, image_size[0], image_size[1], 3), np.uint8))
    skipped = [paths[i] for i, image in enumerate(decoded) if image is None]
    return images, labels[np.asarray(kept, np.int64)], skipped


def load_folder_split(data_dir, split_folder, class_names, image_size, cache_dir=None, verbose=True,
                      every_class=False):
    """Decoded (images, labels, report) of one split folder, cached after the first read."""
    paths, labels, report = list_split(data_dir, split_folder, class_names, every_class)
    digest = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    digest.update(repr((tuple(class_names), tuple(image_size))).encode())
    cache = os.path.join(cache_dir or default_cache_dir(), "folders", digest.hexdigest()[:20])
    if os.path.exists(os.path.join(cache, "report.json")):
        with open(os.path.join(cache, "report.json")) as f:
            listing = report  # what the folder holds besides the images listed: as it is now
            report = dict(json.load(f), **{k: listing[k] for k in ("non_image_files", "sub_folders")})
        images = np.load(os.path.join(cache, "images.npy"), mmap_mode="r")
        return np.asarray(images), np.load(os.path.join(cache, "labels.npy")), report
    images, labels, skipped = decode_files(paths, labels, image_size)
    report.update(folder=os.path.join(data_dir, split_folder), listed=len(paths), decoded=len(labels),
                  skipped_undecodable=skipped)
    if verbose and (skipped or report["empty_class_folders"] or report["non_image_files"]):
        print(f"[data] {report['folder']}: skipped {len(skipped)} undecodable file(s)"
              f"{' e.g. ' + skipped[0] if skipped else ''}; {report['non_image_files']} non-image file(s) ignored; "
              f"empty class folders: {report['empty_class_folders'] or 'none'}",
              file=sys.stderr)  # a diagnostic: stdout stays for what a command answers (e.g. `evaluate --json`)
    if len(labels) == 0:
        raise FolderError(f"{report['folder']}: none of the {len(paths)} image files could be decoded.")
    try:
        os.makedirs(cache, exist_ok=True)
        for name, array in (("images", images), ("labels", labels)):
            with atomic_path(os.path.join(cache, f"{name}.npy")) as tmp:
                np.save(tmp, array)
        write_json_atomic(os.path.join(cache, "report.json"), report)  # written last: marks the cache complete
    except OSError as e:
        print(f"[data] could not cache decoded images in {cache}: {e}")
    return images, labels, report
