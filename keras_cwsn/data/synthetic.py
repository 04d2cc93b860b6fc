"""The embedded dataset: procedurally drawn 32x32 RGB images with a real two-level hierarchy.

Coarse classes are pattern families (stripes, rings, checks, spots) and the fine classes inside
a family share that pattern, differing in its orientation or frequency and in the colour of the
foreground (each fine class has its own hue, neighbouring hues within a family), so coarse
similarity is visual similarity. Phases, positions, colour jitter and background are
random per image; it is deterministic from its seed and needs no download.
"""

import colorsys

import numpy as np

from keras_cwsn.data.info import DatasetInfo

PATTERNS = ("stripes", "rings", "checks", "spots")
SIZE = 32


def synthetic_info(num_coarse=3, fine_per_coarse=3, num_examples=None):
    """DatasetInfo of the synthetic hierarchy (fine names like `stripes_1`)."""
    if not 2 <= num_coarse <= len(PATTERNS):
        raise ValueError(f"synthetic num_coarse must be in 2..{len(PATTERNS)}. Received: {num_coarse}")
    if not 2 <= fine_per_coarse <= 5:
        raise ValueError(f"synthetic fine_per_coarse must be in 2..5. Received: {fine_per_coarse}")
    fine = tuple(f"{PATTERNS[c]}_{k}" for c in range(num_coarse) for k in range(fine_per_coarse))
    return DatasetInfo(
        name="synthetic",
        fine_names=fine,
        coarse_names=PATTERNS[:num_coarse],
        fine_to_coarse=tuple(c for c in range(num_coarse) for _ in range(fine_per_coarse)),
        image_size=(SIZE, SIZE),
        normalization="yuv",
        num_examples=dict(num_examples or {}),
    )


def _pattern(pattern, k, n, rng):
    """n grey-level patterns in [-1, 1] of family `pattern`, fine variant k."""
    grid = (np.arange(SIZE) + 0.5) / SIZE
    y, x = np.meshgrid(grid, grid, indexing="ij")
    x, y = x[None], y[None]
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    if pattern == "stripes":  # orientation tells the fine class apart
        theta = np.deg2rad(k * 180.0 / 5 + rng.normal(0, 6, (n, 1, 1)))
        return np.sin(2 * np.pi * 4 * (x * np.cos(theta) + y * np.sin(theta)) + phase)
    if pattern == "rings":  # ring frequency
        cx, cy = rng.uniform(0.3, 0.7, (2, n, 1, 1))
        r = np.hypot(x - cx, y - cy)
        return np.sin(2 * np.pi * (2.5 + 1.5 * k) * r + phase)
    if pattern == "checks":  # checker frequency
        f = 2.0 + 1.2 * k
        return np.tanh(4 * np.sin(2 * np.pi * f * x + phase) * np.sin(2 * np.pi * f * y + phase[::-1]))
    # spots: number of Gaussian blobs
    out = np.zeros((n, SIZE, SIZE))
    for _ in range(k + 1):
        cx, cy = rng.uniform(0.15, 0.85, (2, n, 1, 1))
        out += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.08**2))
    return 2 * np.clip(out, 0, 1) - 1


def make_synthetic(num_examples, seed=0, num_coarse=3, fine_per_coarse=3, noise=0.5):
    """Draw `num_examples` images: returns (uint8 images (N, 32, 32, 3), int64 fine labels (N,), info).

    Classes are balanced (round-robin, then shuffled); the same seed gives the same arrays.
    """
    if int(num_examples) < 1:
        raise ValueError(f"synthetic num_examples must be >= 1. Received: {num_examples}")
    info = synthetic_info(num_coarse, fine_per_coarse)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_examples) % info.num_fine).astype(np.int64)
    images = np.zeros((num_examples, SIZE, SIZE, 3), dtype=np.float64)
    for fine in range(info.num_fine):
        idx = np.flatnonzero(labels == fine)
        coarse, k = divmod(fine, fine_per_coarse)
        grey = _pattern(PATTERNS[coarse], k, idx.size, rng)
        hue = colorsys.hsv_to_rgb(fine / info.num_fine, 0.85, 0.95)
        fg = np.clip(np.asarray(hue) + rng.normal(0, 0.06, (idx.size, 1, 1, 3)), 0, 1)
        bg = rng.uniform(0.0, 0.5, (idx.size, 1, 1, 3))
        mix = (grey[..., None] + 1) / 2
        images[idx] = mix * fg + (1 - mix) * bg
    images += rng.normal(0, noise, images.shape)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels, info
