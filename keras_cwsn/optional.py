"""Optional dependencies: TensorFlow is the default backend's, but the protocol also runs without it (JAX)."""

import functools


@functools.lru_cache(maxsize=None)
def tensorflow_available():
    """Whether TensorFlow can be imported here (a JAX-only machine has none)."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True
