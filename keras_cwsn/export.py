"""Export the fine-tuned classifier as a SavedModel whose signatures take what clients have.

`serving_default` takes uint8 images (batch, H, W, 3) of any size; `serve_jpeg` takes encoded
JPEG/PNG strings. Both resize and normalise in the graph, as the training pipeline does, and return
probabilities, top-1 class ids and names, and the top-k ids and scores.
"""

import json
import os
import shutil

import keras
import tensorflow as tf

from keras_cwsn.data import preprocess

ASSET_FILE = "cwsn_model_info.json"


def build_serving_functions(classifier, class_names, image_size, stats, top_k=5):
    """tf.functions for the two signatures (also usable without saving, e.g. in tests)."""
    height, width = image_size
    names = tf.constant(list(class_names))
    k = min(int(top_k), len(class_names))

    def outputs(images_uint8):
        images = tf.image.resize(tf.cast(images_uint8, tf.float32), (height, width), antialias=True)
        images = tf.cast(tf.round(tf.clip_by_value(images, 0.0, 255.0)), tf.uint8)  # as decoded training images
        x = preprocess.preprocess(images, stats["normalization"], stats)
        probabilities = tf.cast(classifier(x, training=False)["probabilities"], tf.float32)
        top = tf.math.top_k(probabilities, k=k)
        class_ids = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {
            "probabilities": probabilities,
            "class_ids": class_ids,
            "class_names": tf.gather(names, class_ids),
            "top_k_ids": top.indices,
            "top_k_scores": top.values,
        }

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, None], tf.uint8, name="images")])
    def serve_images(images):
        channels = tf.shape(images)[-1]
        tf.debugging.assert_rank(images, 4, message="images must be (batch, height, width, channels)")
        tf.debugging.assert_equal(
            tf.reduce_any(tf.equal(channels, [1, 3, 4])), True,
            message="images must have 1 (grey), 3 (RGB) or 4 (RGBA) channels")
        images = tf.case([(tf.equal(channels, 1), lambda: tf.image.grayscale_to_rgb(images[..., :1])),
                          (tf.equal(channels, 4), lambda: images[..., :3])], default=lambda: images[..., :3])
        images = tf.ensure_shape(images, [None, None, None, 3])
        return outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve_jpeg(encoded):
        def decode(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False)
            return tf.image.resize(image, (height, width), antialias=True)

        images = tf.map_fn(decode, encoded, fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32))
        return outputs(tf.cast(tf.round(tf.clip_by_value(images, 0.0, 255.0)), tf.uint8))

    return serve_images, serve_jpeg


def export_classifier(classifier, path, class_names, image_size, stats, metadata=None, top_k=5):
    """Write the SavedModel to `path` atomically (a temporary folder renamed into place)."""
    serve_images, serve_jpeg = build_serving_functions(classifier, class_names, image_size, stats, top_k)
    archive = keras.export.ExportArchive()
    archive.track(classifier)
    archive.add_endpoint("serving_default", serve_images)
    archive.add_endpoint("serve_jpeg", serve_jpeg)
    tmp = f"{path}.tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    archive.write_out(tmp, verbose=False)
    info = dict(metadata or {}, class_names=list(class_names), image_size=list(image_size), preprocessing=stats)
    os.makedirs(os.path.join(tmp, "assets"), exist_ok=True)
    with open(os.path.join(tmp, "assets", ASSET_FILE), "w") as f:
        json.dump(info, f, indent=2)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
