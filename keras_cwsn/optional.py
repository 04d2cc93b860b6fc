"""Optional dependencies: TensorFlow is the default backend's, but the protocol also runs without it (JAX)."""

import functools
import importlib.util


@functools.lru_cache(maxsize=None)
def tensorflow_available():
    """Whether TensorFlow is installed here (a JAX-only machine has none); looked up without importing it."""
    return importlib.util.find_spec("tensorflow") is not None


def import_tensorflow_quietly():
    """Import TensorFlow (where installed) with its C++ start-up and version-skew notices kept off stderr.

    For the command lines: TensorFlow 2.21 prints absl/oneDNN lines while it loads, whatever
    TF_CPP_MIN_LOG_LEVEL says, and E-level "NodeDef mentions attribute use_unbounded_threadpool"
    notices when Keras's array adapter builds a dataset; they would bury the one-line error of a
    failed command and every epoch line of a log. Level 3 is the default here; set
    TF_CPP_MIN_LOG_LEVEL=0 to see everything.
    """
    import os
    import sys

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules or not tensorflow_available() or os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("", "0"):
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
