"""The same normalisations as `preprocess` (the tf.data / SavedModel graph), in NumPy, for any backend.

In-memory splits are normalised once with these (on TensorFlow and on JAX alike); the exported
SavedModel keeps the TensorFlow version in its graph. `tests/test_data.py` pins both to a hand
computation and to each other.
"""

import numpy as np

from keras_cwsn.constants import NORMALIZATIONS  # noqa: F401  (re-exported: preprocess reads it here)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RGB -> YUV (BT.601), the kernel `tf.image.rgb_to_yuv` applies: yuv = rgb @ YUV_FROM_RGB.
YUV_FROM_RGB = np.array([[0.299, -0.14714119, 0.61497538],
                         [0.587, -0.28886916, -0.51496512],
                         [0.114, 0.43601035, -0.10001026]], np.float32)


def rgb_to_yuv(images):
    """uint8 or float RGB (..., 3), scaled to [0, 1] -> float32 YUV."""
    return (np.asarray(images, np.float32) / np.float32(255.0)) @ YUV_FROM_RGB


def yuv_normalize(images, uv_mean, uv_std):
    """uint8 RGB images (N, H, W, 3) -> float32 YUV, Y standardised per image, U and V by the split's statistics."""
    yuv = rgb_to_yuv(images)
    y = yuv[..., :1]
    mean = y.mean(axis=(-3, -2, -1), keepdims=True, dtype=np.float32)
    std = y.std(axis=(-3, -2, -1), keepdims=True, dtype=np.float32)
    floor = np.float32(1.0 / np.sqrt(np.prod(y.shape[-3:])))  # a flat image must not divide by 0
    y = (y - mean) / np.maximum(std, floor)
    uv = (yuv[..., 1:] - np.asarray(uv_mean, np.float32)) / np.asarray(uv_std, np.float32)
    return np.concatenate([y, uv], axis=-1).astype(np.float32, copy=False)


def imagenet_normalize(images):
    """uint8 RGB images -> float32 normalised with ImageNet's per-channel mean and std."""
    x = np.asarray(images, np.float32) / np.float32(255.0)
    return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


def normalize(images, stats):
    """Apply the normalisation `stats` names (from `preprocessing_stats`) to images at the model's size."""
    normalization = stats["normalization"]
    if normalization == "yuv":
        return yuv_normalize(images, stats["uv_mean"], stats["uv_std"])
    if normalization == "imagenet":
        return imagenet_normalize(images)
    raise ValueError(f"Unknown normalization. Expected one of {NORMALIZATIONS}. Received: {normalization!r}")


def compute_uv_stats(image_batches):
    """Mean and std of the U and V channels over every pixel of an iterable of uint8 image batches."""
    total, total_sq, count = np.zeros(2), np.zeros(2), 0
    for batch in image_batches:
        uv = rgb_to_yuv(batch)[..., 1:].astype(np.float64).reshape(-1, 2)
        total += uv.sum(axis=0)
        total_sq += (uv**2).sum(axis=0)
        count += uv.shape[0]
    if count == 0:
        raise ValueError("Cannot compute U, V statistics of an empty training split.")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return {"uv_mean": mean.round(6).tolist(), "uv_std": np.maximum(std, 1e-6).round(6).tolist()}
