"""A run's classifier as a LiteRT, ONNX or OpenVINO file, with the preprocessing inside (Keras's `model.export`).

Input contract of every format: `images`, uint8 `(batch, H, W, 3)` RGB at the model's input size
(`image_size` in the JSON written beside the file: 32x32 for CIFAR and the embedded data, 224x224
for Birdsnap); resizing, decoding and grey/RGBA conversion are the client's (the SavedModel does
them in its graph). Output: `probabilities`, float32 `(batch, classes)`, index = class id, with
the class names in the JSON beside the file. The normalisation (YUV with the training split's
statistics, or ImageNet's) is a `Preprocess` layer inside the exported graph.

Each format's converter is an optional package; a missing one is a one-line error naming it.
"""

import importlib.util
import json
import os
import shutil
import tempfile

import keras
from keras import ops

from keras_cwsn.data.normalize import IMAGENET_MEAN, IMAGENET_STD, YUV_FROM_RGB
from keras_cwsn.errors import UserError
from keras_cwsn.models import CLASSIFIER_OUTPUT

# format -> (file name ending, {backend: the packages its converter imports, as pip names them})
FORMATS = {
    "litert": (".tflite", {"tensorflow": ("tensorflow",)}),
    "onnx": (".onnx", {"tensorflow": ("tf2onnx", "onnx"), "jax": ("jax2onnx", "onnx")}),
    "openvino": (".xml", {"tensorflow": ("openvino",), "jax": ("openvino",)}),
}


@keras.saving.register_keras_serializable(package="keras_cwsn")
class Preprocess(keras.layers.Layer):
    """uint8 RGB images at the model's size -> the normalised input the classifier was trained on.

    The same arithmetic as `keras_cwsn.data.normalize.normalize`, in `keras.ops` so that every
    exporter traces it into its graph.
    """

    def __init__(self, stats, **kwargs):
        super().__init__(**kwargs)
        self.stats = dict(stats)

    def call(self, images):
        x = ops.cast(images, "float32") / 255.0
        if self.stats["normalization"] == "imagenet":
            return (x - ops.convert_to_tensor(IMAGENET_MEAN)) / ops.convert_to_tensor(IMAGENET_STD)
        yuv = ops.matmul(x, ops.convert_to_tensor(YUV_FROM_RGB))
        y = yuv[..., :1]
        mean = ops.mean(y, axis=(1, 2, 3), keepdims=True)
        std = ops.sqrt(ops.mean(ops.square(y - mean), axis=(1, 2, 3), keepdims=True))
        floor = 1.0 / float(images.shape[1] * images.shape[2]) ** 0.5  # a flat image must not divide by 0
        y = (y - mean) / ops.maximum(std, floor)
        uv = (yuv[..., 1:] - ops.convert_to_tensor(self.stats["uv_mean"], "float32")) / ops.convert_to_tensor(
            self.stats["uv_std"], "float32")
        return ops.concatenate([y, uv], axis=-1)

    def get_config(self):
        return dict(super().get_config(), stats=self.stats)


def serving_model(classifier, image_size, stats):
    """uint8 images `(batch, H, W, 3)` in, `probabilities` out: the preprocessing and the classifier in one model."""
    images = keras.Input((*image_size, 3), dtype="uint8", name="images")
    outputs = classifier(Preprocess(stats, name="preprocess")(images))
    probabilities = outputs[CLASSIFIER_OUTPUT] if isinstance(outputs, dict) else outputs
    return keras.Model(images, keras.layers.Identity(name=CLASSIFIER_OUTPUT)(probabilities), name="cwsn_serving")


def missing_packages(fmt, backend=None):
    """The pip packages `fmt`'s converter needs that are not installed here (refuses a format or backend it lacks)."""
    if fmt not in FORMATS:
        raise UserError(f"Unknown export format. Expected one of savedmodel, {', '.join(FORMATS)}. Received: {fmt!r}")
    backend = backend or keras.backend.backend()
    needs = FORMATS[fmt][1].get(backend)
    if needs is None:
        raise UserError(f"--format {fmt} is not available on the {backend} backend; run the export where "
                        f"TensorFlow is installed (KERAS_BACKEND=tensorflow).")
    return [p for p in needs if importlib.util.find_spec(p) is None]


def export_format(classifier, path, fmt, class_names, image_size, stats, metadata=None):
    """Write `classifier` (with its preprocessing) as `fmt` at `path`, plus `path + ".json"` (classes, contract).

    The files are written in a scratch folder beside `path` and moved into place, so `path` never
    holds half a model. Returns `path`.
    """
    missing = missing_packages(fmt)
    if missing:
        raise UserError(f"--format {fmt} needs the package(s) {', '.join(missing)}, not installed here: "
                        f"pip install {' '.join(missing)}")
    path = os.fspath(path)
    if not path.endswith(FORMATS[fmt][0]):  # each converter insists on its own ending
        path += FORMATS[fmt][0]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    model = serving_model(classifier, tuple(int(s) for s in image_size), stats)
    model(ops.zeros((1, *model.input_shape[1:]), "uint8"))  # the ONNX exporter wants a model that has run once
    info = dict(metadata or {}, format=fmt, class_names=list(class_names), image_size=[int(s) for s in image_size],
                preprocessing=stats, inputs={"images": "uint8 (batch, H, W, 3) RGB at image_size"},
                outputs={CLASSIFIER_OUTPUT: f"float32 (batch, {len(class_names)})"})
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as scratch:
        target = os.path.join(scratch, os.path.basename(path))
        model.export(target, format=fmt, verbose=False)
        with open(target + ".json", "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
        stem = os.path.splitext(os.path.basename(path))[0]
        for name in os.listdir(scratch):  # e.g. OpenVINO's .xml and .bin
            if name.startswith(stem):
                destination = os.path.join(folder, name)
                if os.path.isdir(destination):
                    shutil.rmtree(destination)
                os.replace(os.path.join(scratch, name), destination)
    return path


def default_path(run_dir, fmt):
    """`RUN/classifier.tflite`, `RUN/classifier.onnx` or `RUN/classifier.xml` (+ `.bin`)."""
    return os.path.join(run_dir, "classifier" + FORMATS[fmt][0])
