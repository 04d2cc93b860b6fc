"""In-graph preprocessing shared by the tf.data pipelines and the exported SavedModel.

CIFAR-style ("yuv", after Hsu & Kira): RGB -> YUV, Y standardised per image, U and V by the
training split's mean and std. Birdsnap ("imagenet"): RGB scaled to [0, 1] and normalised with
ImageNet's mean and std. `normalize` holds the same in NumPy for in-memory splits.
"""

import tensorflow as tf

from keras_cwsn.data.normalize import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATIONS, compute_uv_stats  # noqa: F401


def decode_rgb(data):
    """Encoded image bytes (JPEG, PNG, GIF, BMP, WebP) -> uint8 RGB (H, W, 3): grey repeated, alpha dropped.

    Decoded with the file's own channels first: `decode_image(channels=3)` refuses a WebP with alpha."""
    image = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
    rgb = tf.cond(tf.shape(image)[-1] < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
    return tf.ensure_shape(rgb, [None, None, 3])


def yuv_normalize(images, uv_mean, uv_std):
    """uint8 RGB images (..., H, W, 3) -> float32 YUV with per-image Y and dataset-level U, V standardisation."""
    yuv = tf.image.rgb_to_yuv(tf.cast(images, tf.float32) / 255.0)
    y = yuv[..., :1]
    mean = tf.reduce_mean(y, axis=[-3, -2, -1], keepdims=True)
    std = tf.math.reduce_std(y, axis=[-3, -2, -1], keepdims=True)
    num_pixels = tf.cast(tf.reduce_prod(tf.shape(y)[-3:]), tf.float32)
    y = (y - mean) / tf.maximum(std, tf.math.rsqrt(num_pixels))  # a flat image must not divide by 0
    uv = (yuv[..., 1:] - tf.constant(uv_mean, tf.float32)) / tf.constant(uv_std, tf.float32)
    return tf.concat([y, uv], axis=-1)


def imagenet_normalize(images):
    """uint8 RGB images -> float32 normalised with ImageNet's per-channel mean and std."""
    x = tf.cast(images, tf.float32) / 255.0
    return (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def resize_images(images, size):
    """Resize a batch or single image to `size` (bilinear, antialiased), keeping uint8-range float values."""
    return tf.image.resize(images, size, method="bilinear", antialias=True)


def random_crop_flip(image, size, seed=None):
    """Training augmentation for one image: resize the short side to 1.14 x size, random crop, random flip."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = 1.14 * max(size) / tf.reduce_min(shape)
    resized = tf.image.resize(image, tf.cast(tf.math.ceil(shape * scale), tf.int32), antialias=True)
    cropped = tf.image.random_crop(resized, (size[0], size[1], 3), seed=seed)
    return tf.image.random_flip_left_right(cropped, seed=seed)


def preprocess(images, normalization, stats):
    """Apply a dataset's normalisation to uint8/float RGB images already at the model's size."""
    if normalization == "yuv":
        return yuv_normalize(images, stats["uv_mean"], stats["uv_std"])
    if normalization == "imagenet":
        return imagenet_normalize(images)
    raise ValueError(f"Unknown normalization. Expected one of {NORMALIZATIONS}. Received: {normalization!r}")
