"""Export the fine-tuned classifier as a SavedModel whose signatures take what clients have.

Two signatures, both with the preprocessing inside the graph (no keras_cwsn code needed to serve):

- `serving_default`: `images`, uint8 `(batch, height, width, channels)` of any size. Grey (1
  channel) is repeated to RGB and RGBA (4) loses its alpha; other channel counts are refused.
- `serve_jpeg`: `image_bytes`, a string vector of encoded images (JPEG, PNG, GIF, BMP or WebP; what
  TF Serving's REST API receives as `{"b64": ...}`), decoded to RGB in the graph.

Images not at the model's size are resized as the training pipeline resizes them (bilinear,
antialiased; rounded to uint8 for the 32x32 datasets, whose training images are decoded uint8),
then normalised by `keras_cwsn.data.preprocess.preprocess` with the training split's statistics.
Both return `probabilities` (batch, classes), the top-1 `class_ids` and `class_names`, and
`top_k_ids`, `top_k_scores`, `top_k_names` (batch, k) with k = min(top_k, classes).

The folder also holds `assets/cwsn_model_info.json` (class names, dataset, variant, preprocessing,
training figures), registered as a SavedModel asset so that it travels with the model, and the
`fingerprint.pb` TensorFlow writes.
"""

import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_cwsn.constants import MODEL_INFO_ASSET
from keras_cwsn.data import preprocess
from keras_cwsn.variants import CLASSIFIER_OUTPUT

SIGNATURES = ("serving_default", "serve_jpeg")
INPUTS = {"serving_default": "images", "serve_jpeg": "image_bytes"}
# Leading bytes of the formats `tf.io.decode_image` reads; anything else is refused with a clear error.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF", b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")


def _check_arguments(class_names, image_size, stats, top_k):
    if isinstance(class_names, str) or not all(isinstance(n, str) for n in class_names) or len(class_names) < 2:
        raise ValueError(f"class_names must be a sequence of at least 2 strings. Received: class_names={class_names!r}")
    if (len(tuple(image_size)) != 2 or
            not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in image_size)):
        raise ValueError(f"image_size must be (height, width), two integers >= 1. Received: image_size={image_size!r}")
    if not isinstance(stats, dict) or stats.get("normalization") not in preprocess.NORMALIZATIONS:
        raise ValueError(f"stats must be a dict from `preprocessing_stats` whose 'normalization' is one of "
                         f"{preprocess.NORMALIZATIONS}. Received: stats={stats!r}")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1. Received: top_k={top_k!r}")


def build_serving_functions(classifier, class_names, image_size, stats, top_k=5):
    """Build the `tf.function`s behind the two signatures (also usable without saving).

    Args:
        classifier: `keras.Model`. The `ce` classifier: takes normalised images (batch, H, W, 3)
            and returns `{"probabilities": (batch, classes)}` (or the probabilities alone).
        class_names: sequence of str. Fine class names; index = class id.
        image_size: tuple `(H, W)`. The classifier's input size.
        stats: dict. The training split's normalisation (`keras_cwsn.data.preprocessing_stats`).
        top_k: int. How many classes the `top_k_*` outputs hold (at most the number of
            classes). Defaults to 5.

    Returns:
        `(serve_images, serve_jpeg)`: `tf.function`s with fixed input signatures, taking uint8
        images `(batch, H', W', C)` and a string vector of encoded images, each returning the
        dict of outputs described in this module's docstring.

    Example:
    ```python
    serve_images, serve_jpeg = build_serving_functions(classifier, info.fine_names, (32, 32), stats)
    serve_images(tf.zeros([2, 64, 48, 3], tf.uint8))["class_names"]  # shape (2,)
    ```
    """
    _check_arguments(class_names, image_size, stats, top_k)
    graph = _ServingGraph(classifier, class_names, image_size, stats, top_k)
    serve_images = tf.function(graph.from_images, input_signature=[
        tf.TensorSpec([None, None, None, None], tf.uint8, name=INPUTS["serving_default"])])
    serve_jpeg = tf.function(graph.from_bytes, input_signature=[
        tf.TensorSpec([None], tf.string, name=INPUTS["serve_jpeg"])])
    return serve_images, serve_jpeg


class _ServingGraph:
    """What both signatures share: fitting images to the model's size, the network, the outputs."""

    def __init__(self, classifier, class_names, image_size, stats, top_k):
        self.classifier, self.stats = classifier, stats
        self.height, self.width = (int(s) for s in image_size)
        self.num_classes = len(class_names)
        self.names = tf.constant(list(class_names), tf.string)
        self.k = min(int(top_k), self.num_classes)
        # The 32x32 datasets' images are decoded uint8 (folders are resized then rounded); Birdsnap's
        # variable-size images go to the network as the resize's float values.
        self.round_resized = stats["normalization"] == "yuv"

    def to_model_size(self, images):
        """uint8 RGB (..., h, w, 3) -> float32 (..., H, W, 3) in [0, 255], resized only if needed."""
        shape = tf.shape(images)
        same = tf.logical_and(tf.equal(shape[-3], self.height), tf.equal(shape[-2], self.width))

        def resize():
            resized = preprocess.resize_images(tf.cast(images, tf.float32), (self.height, self.width))
            resized = tf.clip_by_value(resized, 0.0, 255.0)
            return tf.round(resized) if self.round_resized else resized

        return tf.cond(same, lambda: tf.cast(images, tf.float32), resize)

    def predict(self, images):
        result = self.classifier(preprocess.preprocess(images, self.stats["normalization"], self.stats),
                                 training=False)
        if isinstance(result, dict):
            if CLASSIFIER_OUTPUT not in result:
                raise ValueError(f"The classifier must output {CLASSIFIER_OUTPUT!r}. "
                                 f"Received outputs: {sorted(result)}")
            result = result[CLASSIFIER_OUTPUT]
        probabilities = tf.cast(result, tf.float32)
        if probabilities.shape.rank != 2 or probabilities.shape[-1] != self.num_classes:
            raise ValueError(f"The classifier's probabilities must be (batch, {self.num_classes}) for "
                             f"{self.num_classes} class names. Received shape: {probabilities.shape}")
        return probabilities

    def outputs(self, images):
        """float32 RGB (batch, H, W, 3) in [0, 255] -> the signature outputs."""
        images = tf.ensure_shape(images, [None, self.height, self.width, 3])
        # An empty batch never reaches the network (TF's conv kernels mis-shape a batch of 0).
        probabilities = tf.cond(tf.shape(images)[0] > 0, lambda: self.predict(images),
                                lambda: tf.zeros([0, self.num_classes], tf.float32))
        top = tf.math.top_k(probabilities, k=self.k)
        class_ids = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {
            "probabilities": probabilities,
            "class_ids": class_ids,
            "class_names": tf.gather(self.names, class_ids),
            "top_k_ids": top.indices,
            "top_k_scores": top.values,
            "top_k_names": tf.gather(self.names, top.indices),
        }

    def from_images(self, images):
        """`serving_default`: uint8 (batch, h, w, 1|3|4) of any size."""
        shape = tf.shape(images)
        channels = shape[3]
        channels_ok = tf.reduce_any(tf.equal(channels, [1, 3, 4]))
        size_ok = tf.logical_or(tf.equal(shape[0], 0), tf.logical_and(shape[1] > 0, shape[2] > 0))
        checks = [
            tf.debugging.Assert(channels_ok, [tf.strings.format(
                "serving_default takes uint8 images (batch, height, width, 3); 1 (grey) and 4 (RGBA) "
                "channels are converted. Received {} channels: images of shape {}.", (channels, shape))]),
            tf.debugging.Assert(size_ok, [tf.strings.format(
                "serving_default takes images of at least 1x1 pixels. Received images of shape {}.", shape)]),
        ]
        with tf.control_dependencies(checks):
            rgb = tf.cond(tf.equal(channels, 1),
                          lambda: tf.tile(images[..., :1], [1, 1, 1, 3]),
                          lambda: images[..., :3])
        rgb = tf.ensure_shape(rgb, [None, None, None, 3])
        fitted = tf.cond(tf.equal(shape[0], 0),
                         lambda: tf.zeros([0, self.height, self.width, 3], tf.float32),
                         lambda: self.to_model_size(rgb))
        return self.outputs(fitted)

    def from_bytes(self, image_bytes):
        """`serve_jpeg`: a string vector of encoded images, decoded to RGB in the graph."""
        count = tf.shape(image_bytes)[0]

        def decode(args):
            index, data = args
            known = tf.reduce_any(tf.stack([tf.equal(tf.strings.substr(data, 0, len(m)), m) for m in _IMAGE_MAGIC]))
            check = tf.debugging.Assert(known, [tf.strings.format(
                "serve_jpeg could not decode image {} of the batch of {} ({} bytes): not a JPEG, PNG, GIF, BMP "
                "or WebP image.", (index, count, tf.strings.length(data)))])
            with tf.control_dependencies([check]):
                image = preprocess.decode_rgb(data)
            return self.to_model_size(image)

        images = tf.map_fn(decode, (tf.range(count), image_bytes),
                           fn_output_signature=tf.TensorSpec([self.height, self.width, 3], tf.float32))
        return self.outputs(images)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def model_info(class_names, image_size, stats, metadata=None, top_k=5):
    """The dict written to `assets/cwsn_model_info.json`: `metadata` plus what serving needs."""
    k = min(int(top_k), len(class_names))
    return dict(
        metadata or {},
        class_names=list(class_names),
        num_classes=len(class_names),
        image_size=[int(s) for s in image_size],
        preprocessing=stats,
        top_k=k,
        signatures={
            "serving_default": {"inputs": {INPUTS["serving_default"]: "uint8 (batch, height, width, 1|3|4)"}},
            "serve_jpeg": {"inputs": {INPUTS["serve_jpeg"]: "string (batch,): encoded JPEG/PNG/GIF/BMP/WebP"}},
            "outputs": {"probabilities": "float32 (batch, classes)", "class_ids": "int32 (batch,)",
                        "class_names": "string (batch,)", "top_k_ids": f"int32 (batch, {k})",
                        "top_k_scores": f"float32 (batch, {k})", "top_k_names": f"string (batch, {k})"},
        },
        versions={"tensorflow": tf.__version__, "keras": keras.__version__},
    )


def export_classifier(classifier, path, class_names, image_size, stats, metadata=None, top_k=5):
    """Write the classifier as a servable SavedModel folder at `path`.

    The folder is written next to `path` and renamed into place, so `path` never holds half a
    model; an existing folder at `path` is replaced.

    Args:
        classifier: `keras.Model`. The fine-tuned `ce` classifier (normalised images in,
            `{"probabilities": ...}` out).
        path: str. The SavedModel folder to write (e.g. `<run>/classifier`).
        class_names: sequence of str. Fine class names; index = class id.
        image_size: tuple `(H, W)`. The classifier's input size.
        stats: dict. The training split's normalisation (`keras_cwsn.data.preprocessing_stats`).
        metadata: dict or None. Extra JSON-able facts for the asset file (dataset, variant,
            training figures). Defaults to None.
        top_k: int. Size of the `top_k_*` outputs (capped at the number of classes). Defaults to 5.

    Returns:
        str: `path`.

    Example:
    ```python
    export_classifier(classifier, "runs/r/classifier", info.fine_names, (32, 32), stats,
                      metadata={"dataset": "synthetic", "variant": "D"})
    tf.saved_model.load("runs/r/classifier").signatures["serve_jpeg"](image_bytes=tf.constant([png]))
    ```
    """
    serve_images, serve_jpeg = build_serving_functions(classifier, class_names, image_size, stats, top_k)
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    with tempfile.TemporaryDirectory(prefix="cwsn-export-") as scratch:
        info_path = os.path.join(scratch, MODEL_INFO_ASSET)
        with open(info_path, "w") as f:
            json.dump(model_info(class_names, image_size, stats, metadata, top_k), f, indent=2, default=_jsonable)
            f.write("\n")
        # ExportArchive saves the TrackableResources it is given; a file-backed table is one, and
        # its file becomes a registered SavedModel asset (copied to assets/, restored on load).
        info_table = tf.lookup.StaticHashTable(
            tf.lookup.TextFileInitializer(info_path, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
                                          tf.string, tf.lookup.TextFileIndex.WHOLE_LINE),
            default_value="")
        archive = keras.export.ExportArchive()
        archive.track(classifier)
        archive.track(info_table)
        archive.add_endpoint("serving_default", serve_images)
        archive.add_endpoint("serve_jpeg", serve_jpeg)
        archive.write_out(tmp, verbose=False)
        if not os.path.isfile(os.path.join(tmp, "assets", MODEL_INFO_ASSET)):  # never left out, whatever TF does
            os.makedirs(os.path.join(tmp, "assets"), exist_ok=True)
            shutil.copyfile(info_path, os.path.join(tmp, "assets", MODEL_INFO_ASSET))
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def run_metadata(config, results, info=None):
    """The facts about a run that travel with its SavedModel (dataset, variant, figures, the class hierarchy)."""
    metadata = {"dataset": config["dataset"], "variant": config["variant"], "figures": dict(results)}
    if info is not None:
        metadata.update(coarse_names=list(info.coarse_names), fine_to_coarse=[int(c) for c in info.fine_to_coarse])
    return metadata


def read_run(run_dir):
    """(classifier, stats, figures, config, DatasetInfo) of a finished run folder; a UserError names what is missing."""
    from keras_cwsn.data import dataset_info, dataset_spec
    from keras_cwsn.errors import UserError

    needed = ("classifier.keras", "preprocessing.json", "metrics.json")
    missing = [name for name in needed if not os.path.isfile(os.path.join(run_dir, name))]
    if missing:
        raise UserError(f"{run_dir} is not a finished run of this version: {', '.join(missing)} missing.")
    with open(os.path.join(run_dir, "preprocessing.json")) as f:
        stats = json.load(f)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        results = json.load(f)
    config = results["config"]
    info = dataset_info(dataset_spec(config))
    classifier = keras.saving.load_model(os.path.join(run_dir, "classifier.keras"), compile=False)
    return classifier, stats, results, config, info


def export_run(run_dir, path=None, fmt="savedmodel"):
    """Export a finished run's `classifier.keras` as the SavedModel `run_dir/classifier` (or `path`), or as
    a LiteRT, ONNX or OpenVINO file (`keras_cwsn.export_formats`).

    The SavedModel is for runs trained where TensorFlow was missing (the JAX backend): the same folder
    `train.py` writes on TensorFlow, built from the run's own `preprocessing.json` and `metrics.json`.
    """
    from keras_cwsn import export_formats

    if fmt != "savedmodel":
        export_formats.missing_packages(fmt)  # an unknown format before the run is read
    classifier, stats, results, config, info = read_run(run_dir)
    figures = {k: v for k, v in results.items()
               if k not in ("config", "versions", "data", "class_names", "coarse_names", "fine_to_coarse")}
    metadata = run_metadata(config, figures, info)
    if fmt != "savedmodel":
        return export_formats.export_format(classifier, path or export_formats.default_path(run_dir, fmt), fmt,
                                            results["class_names"], info.image_size, stats, metadata=metadata)
    return export_classifier(classifier, path or os.path.join(run_dir, "classifier"), results["class_names"],
                             info.image_size, stats, metadata=metadata)


def main(argv=None):
    """`python -m keras_cwsn.export RUN [--format F] [--output PATH]`: exit 0, or 2 with one line on a bad run folder,
    an unknown format or a converter that is not installed."""
    import argparse
    import sys

    from keras_cwsn.errors import UserError, print_error
    from keras_cwsn.export_formats import FORMATS

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit status 2, as every command line here
            raise UserError(f"{message} (see --help)")

    parser = Parser(prog="python -m keras_cwsn.export",
                    description="Write a finished run's classifier.keras as a servable SavedModel, "
                                "or as a LiteRT, ONNX or OpenVINO file (docs/serving.md).")
    parser.add_argument("run", help="the run folder (holds classifier.keras, preprocessing.json, metrics.json)")
    parser.add_argument("--format", default="savedmodel", choices=("savedmodel", *FORMATS),
                        help="savedmodel (default), litert (.tflite), onnx (needs tf2onnx) or openvino")
    parser.add_argument("--output", default=None,
                        help="default: RUN/classifier (SavedModel folder), RUN/classifier.tflite|.onnx|.xml")
    try:
        args = parser.parse_args(argv)
        path = export_run(args.run, args.output, args.format)
    except (UserError, OSError, ValueError) as e:
        print_error(e, parser.prog)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    print(f"{parser.prog}: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
