"""Classify image files with an exported classifier, using TensorFlow alone.

```shell
python -m keras_cwsn.predict --model runs/RUN/classifier cat.jpg photos/ [--top-k 3] [--json]
```

The SavedModel written by `keras_cwsn.export` decodes, resizes and normalises in its graph, so this
module only reads files and calls its `serve_jpeg` signature (no Keras, no keras_cwsn model code).
Folders are searched recursively for `.jpg .jpeg .png .gif .bmp .webp` files; other files there are
skipped and counted. A file that can't be decoded is reported on stderr and skipped.

Exit status: 0 when every image was classified, 1 when some could not be decoded, 2 for bad
arguments (no such model or file, nothing to classify), with one line on stderr.
"""

import argparse
import json
import os
import re
import sys

import numpy as np

from keras_cwsn.constants import IMAGE_EXTENSIONS
from keras_cwsn.constants import MODEL_INFO_ASSET
from keras_cwsn.errors import UsageError, print_error

SIGNATURE = "serve_jpeg"


def find_images(paths):
    """Expand files and folders into image files.

    Args:
        paths: list of str. Files (taken as given, whatever their extension) and folders
            (searched recursively for files with an `IMAGE_EXTENSIONS` extension).

    Returns:
        `(images, skipped)`: the image paths, in the order given (folders sorted), and the
        non-image files found in folders.

    Raises:
        UsageError: a path that does not exist.
    """
    images, skipped = [], []
    for path in paths:
        if os.path.isfile(path):
            images.append(path)
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    full = os.path.join(root, name)
                    (images if name.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(full)
        else:
            raise UsageError(f"no such image file or folder: {path}")
    return images, skipped


def _error_message(error):
    """The useful line of a TensorFlow op error (the assertion text or the decoder's complaint)."""
    text = getattr(error, "message", None) or str(error)
    match = re.search(r"assertion failed: \[(.*?)\]\s*(\n|$)", text, re.S)
    if match:
        return match.group(1)
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith(("[[", "Detected at", "<stack", "Graph execution"))]
    return re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*\]$", "", lines[0] if lines else text).strip()


def check_model_dir(model_dir):
    """Raise UsageError unless `model_dir` is a folder holding a `saved_model.pb` (no TensorFlow needed)."""
    if not os.path.isdir(model_dir):
        raise UsageError(f"no such model folder: {model_dir}")
    if not os.path.isfile(os.path.join(model_dir, "saved_model.pb")):
        raise UsageError(f"{model_dir} is not a SavedModel folder (no saved_model.pb); "
                         f"pass the run's classifier/ folder")


def load_model(model_dir):
    """Load an exported classifier folder with `tf.saved_model.load`.

    Returns:
        `(model, info)`: `model` maps a list of encoded images to a dict of numpy outputs of the
        `serve_jpeg` signature; `info` is `assets/cwsn_model_info.json` (empty if absent).

    Raises:
        UsageError: the folder is missing, is not a SavedModel, or has no `serve_jpeg` signature.
    """
    check_model_dir(model_dir)
    from keras_cwsn.optional import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(model_dir)
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise UsageError(f"could not load the SavedModel in {model_dir}: {_error_message(e)}") from None
    if SIGNATURE not in loaded.signatures:
        raise UsageError(f"{model_dir} has no {SIGNATURE!r} signature (it has {sorted(loaded.signatures)}); "
                         f"export it with keras_cwsn.export")
    info = {}
    info_path = os.path.join(model_dir, "assets", MODEL_INFO_ASSET)
    if os.path.isfile(info_path):
        try:
            with open(info_path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            info = {}
    return _Model(loaded, loaded.signatures[SIGNATURE]), info


class _Model:
    """The `serve_jpeg` signature as a callable on a list of byte strings (keeps the SavedModel alive)."""

    def __init__(self, loaded, function):
        self.loaded = loaded
        self.function = function
        self.input_name = next(iter(function.structured_input_signature[1]))

    def __call__(self, encoded):
        import tensorflow as tf

        outputs = self.function(**{self.input_name: tf.constant(encoded, dtype=tf.string)})
        return {name: value.numpy() for name, value in outputs.items()}


def _top_classes(outputs, row, top_k, class_names):
    """[(class_id, name, score)] of one image, best first."""
    if class_names is not None and len(class_names) == outputs["probabilities"].shape[-1]:
        probabilities = outputs["probabilities"][row]
        ids = np.argsort(-probabilities, kind="stable")[:top_k]
        return [(int(i), class_names[i], float(probabilities[i])) for i in ids]
    names = [n.decode("utf-8") for n in outputs["top_k_names"][row]]  # no asset: the exported top k
    return [(int(i), n, float(s)) for i, n, s in
            zip(outputs["top_k_ids"][row][:top_k], names[:top_k], outputs["top_k_scores"][row][:top_k])]


def classify(model, paths, top_k=5, class_names=None, batch_size=32):
    """Classify image files in batches; a batch that fails is retried image by image.

    Args:
        model: callable from `load_model`: a list of encoded images -> dict of numpy outputs.
        paths: list of str. Image files.
        top_k: int. Classes per image. Defaults to 5.
        class_names: list of str or None. Every class name (from the model's asset file); None
            uses the signature's `top_k_*` outputs. Defaults to None.
        batch_size: int. Images per call. Defaults to 32.

    Yields:
        One dict per file: `{"path", "top_k": [{"class_id", "class_name", "score"}]}`, or
        `{"path", "error"}` for a file that could not be read or decoded.
    """
    import tensorflow as tf

    for start in range(0, len(paths), batch_size):
        chunk, batch, results = paths[start:start + batch_size], [], {}
        for path in chunk:
            try:
                with open(path, "rb") as f:
                    batch.append((path, f.read()))
            except OSError as e:
                results[path] = {"path": path, "error": f"could not read the file: {e.strerror or e}"}
        try:
            predicted = [(batch, model([data for _, data in batch]))] if batch else []
        except tf.errors.InvalidArgumentError:  # one bad file fails its batch: find it, keep the others
            predicted = []
            for path, data in batch:
                try:
                    predicted.append(([(path, data)], model([data])))
                except tf.errors.InvalidArgumentError as e:
                    message = re.sub(r"^serve_jpeg could not decode image \d+ of the batch of \d+ \((\d+ bytes)\): "
                                     r"(.*?)\.?$", r"\2 (\1)", _error_message(e))
                    results[path] = {"path": path, "error": f"could not decode: {message}"}
        for group, outputs in predicted:
            for row, (path, _) in enumerate(group):
                results[path] = {"path": path, "top_k": [
                    {"class_id": i, "class_name": n, "score": round(s, 6)}
                    for i, n, s in _top_classes(outputs, row, top_k, class_names)]}
        for path in chunk:
            yield results[path]


def _format(result):
    return f"{result['path']}: " + ", ".join(f"{c['class_name']} {c['score']:.4f}" for c in result["top_k"])


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_cwsn.predict",
        description="Classify images with an exported keras_cwsn classifier (TensorFlow only).")
    parser.add_argument("--model", required=True, help="the SavedModel folder, e.g. runs/RUN/classifier")
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help="image files, or folders searched recursively for " + " ".join(IMAGE_EXTENSIONS))
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--batch-size", type=int, default=32, help="images per call (default 32)")
    return parser


def main(argv=None):
    """Command-line entry point; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        if args.top_k < 1:
            raise UsageError(f"--top-k must be >= 1. Received: {args.top_k}")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1. Received: {args.batch_size}")
        check_model_dir(args.model)
        paths, skipped = find_images(args.paths)
        shown = ", ".join(os.path.basename(p) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        note = f"skipped {len(skipped)} non-image file(s) ({shown})" if skipped else ""
        if not paths:
            raise UsageError(f"no image files to classify in {' '.join(args.paths)} (looked for "
                             f"{' '.join(IMAGE_EXTENSIONS)}){'; ' + note if note else ''}")
        if note:
            print(f"{prog}: {note}", file=sys.stderr)
        model, info = load_model(args.model)
    except UsageError as e:
        print_error(e, prog)
        return 2
    class_names = info.get("class_names")
    top_k = min(args.top_k, len(class_names)) if class_names else args.top_k
    failed = 0
    for result in classify(model, paths, top_k, class_names, args.batch_size):
        if "error" in result:
            failed += 1
            print(f"{prog}: skipped {result['path']}: {result['error']}", file=sys.stderr)
            continue
        print(json.dumps(result) if args.json else _format(result), flush=True)
    if failed:
        print(f"{prog}: {len(paths) - failed} of {len(paths)} image(s) classified; "
              f"{failed} could not be decoded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
