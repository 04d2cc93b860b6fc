"""Optional dependencies: TensorFlow is the default backend's, but the protocol also runs without it (JAX)."""

import functools
import importlib.util


@functools.lru_cache(maxsize=None)
def tensorflow_available():
    """Whether TensorFlow is installed here (a JAX-only machine has none); looked up without importing it."""
    return importlib.util.find_spec("tensorflow") is not None


def set_tensorflow_environment():
    """Defaults for what TensorFlow reads once, while it loads; a value the user has set is kept.

    - TF_CPP_MIN_LOG_LEVEL=3: see `import_tensorflow_quietly`.
    - TF_ENABLE_ONEDNN_OPTS=1: TensorFlow turns its oneDNN CPU kernels on by itself only where the
      CPU has AVX-512 VNNI, BF16 or AMX. On an AVX2-only CPU (an AMD EPYC here) they are off
      unless asked for, and turning them on makes the LeNet batch-16 training step 1.3-1.4x faster
      on one thread (docs/BENCHMARKS.md, section 0). Set TF_ENABLE_ONEDNN_OPTS=0 to opt out.

    No effect once TensorFlow is imported: call it first.
    """
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def onednn_enabled():
    """Whether the loaded TensorFlow runs its oneDNN CPU kernels (None without TensorFlow loaded)."""
    import sys

    if "tensorflow" not in sys.modules:
        return None
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # a TensorFlow build without this private module: unknown
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def import_tensorflow_quietly():
    """Import TensorFlow (where installed) with its C++ start-up and version-skew notices kept off stderr.

    For the command lines: TensorFlow 2.21 prints absl/oneDNN lines while it loads, whatever
    TF_CPP_MIN_LOG_LEVEL says, and E-level "NodeDef mentions attribute use_unbounded_threadpool"
    notices when Keras's array adapter builds a dataset; they would bury the one-line error of a
    failed command and every epoch line of a log. Level 3 is the default here; set
    TF_CPP_MIN_LOG_LEVEL=0 to see everything. The environment defaults of
    `set_tensorflow_environment` are applied first.
    """
    import os
    import sys

    set_tensorflow_environment()
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
