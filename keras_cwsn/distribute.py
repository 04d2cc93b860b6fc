"""tf.distribute for training: one device, several GPUs of one host, or several hosts.

`make_strategy(name)` turns the config's `strategy` (`auto`, `one`, `mirrored`, `multiworker`) into
a `tf.distribute.Strategy`; models are built and compiled under `strategy.scope()` and trained with
`model.fit`, which splits each global batch across the replicas. The pairwise loss all-gathers the
replicas' outputs (`keras_cwsn.losses.gather_global_batch`) and batch normalisation is synchronised
(`synchronize_batch_norm`), so that a step on R replicas equals a step on one device with the whole
global batch. See the README's section "Several GPUs, several hosts".
"""

import json
import os

import numpy as np
import tensorflow as tf

from keras_cwsn.constants import STRATEGIES
from keras_cwsn.errors import UserError

_STRATEGIES = {}  # one strategy per name and process: MultiWorkerMirroredStrategy can't be created twice


class DistributeError(UserError):
    """A strategy that can't be set up here (no TF_CONFIG for `multiworker`, ...)."""


def make_strategy(name="auto"):
    """The `tf.distribute.Strategy` for a config's `strategy` setting (created once per process).

    Args:
        name: str. `"auto"`: mirrored over the local GPUs if there are several, else `"one"`.
            `"one"`: TensorFlow's default strategy (one device, nothing distributed).
            `"mirrored"`: `MirroredStrategy` over every local GPU (or, without GPUs, every logical
            CPU device; one device is a valid, if pointless, mirror). `"multiworker"`:
            `MultiWorkerMirroredStrategy`, with the cluster read from the `TF_CONFIG` environment
            variable; create it before any other TensorFlow op runs. Defaults to `"auto"`.

    Returns:
        tf.distribute.Strategy.

    Example:
    ```python
    strategy = make_strategy("mirrored")
    with strategy.scope():
        model = build_model("lenet", "A", 10)
        model.compile(...)
    model.fit(dataset_with_global_batches)
    ```
    """
    if name not in STRATEGIES:
        raise DistributeError(f"Unknown strategy. Expected one of {', '.join(STRATEGIES)}. Received: strategy={name!r}")
    if name == "auto":
        name = "mirrored" if len(tf.config.list_logical_devices("GPU")) > 1 else "one"
    if name not in _STRATEGIES:
        if name == "one":
            strategy = tf.distribute.get_strategy()
        elif name == "mirrored":
            gpus = tf.config.list_logical_devices("GPU")
            devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
            strategy = tf.distribute.MirroredStrategy(devices)
        else:
            cluster = read_tf_config()
            if not cluster:
                raise DistributeError("--strategy multiworker reads the cluster from the TF_CONFIG environment "
                                      "variable, which is not set (see the README section \"Several hosts\").")
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        _STRATEGIES[name] = strategy
    return _STRATEGIES[name]


def read_tf_config():
    """The parsed `TF_CONFIG` environment variable ({} when unset); a malformed one is an error."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DistributeError(f"TF_CONFIG is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict) or "task" not in config:
        raise DistributeError('TF_CONFIG must hold {"cluster": {...}, "task": {"type": ..., "index": ...}}. '
                              f"Received: {raw[:200]}")
    return config


def task():
    """(task type, task index) of this process from TF_CONFIG; ("chief", 0) without one."""
    config = read_tf_config()
    if not config:
        return "chief", 0
    return str(config["task"].get("type", "worker")), int(config["task"].get("index", 0))


def is_chief():
    """Whether this process writes the run's outputs: the `chief` task, or worker 0 when no chief is named."""
    config = read_tf_config()
    if not config:
        return True
    kind, index = task()
    if kind == "chief":
        return True
    return kind == "worker" and index == 0 and "chief" not in config["cluster"]


def worker_output_dir(output_dir):
    """Where this process writes: `output_dir` for the chief, `<output_dir>.<type>-<index>` for other workers.

    Every worker keeps its own checkpoints (no shared file system needed); only the chief's folder
    holds the exported model and the figures that count.
    """
    if is_chief():
        return output_dir
    kind, index = task()
    return f"{os.path.normpath(output_dir)}.{kind}-{index}"


def num_workers(strategy):
    """Hosts taking part (1 unless multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return max(1, sum(len(spec.get(kind, [])) for kind in ("chief", "worker")))


def describe(strategy):
    """A JSON-able summary of a strategy, for `metrics.json`."""
    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no device list
        devices = []
    return {"strategy": type(strategy).__name__, "num_replicas": int(strategy.num_replicas_in_sync),
            "num_workers": num_workers(strategy), "devices": [str(d) for d in devices]}


def synchronize_batch_norm(model, strategy):
    """Make every BatchNormalization layer use the global batch's statistics when there are several replicas.

    Keras's BN normalises with each replica's own slice statistics unless `synchronized=True`; then
    it all-reduces the sums (three small all-reduces per BN layer and step). With it, a mirrored step
    equals a single-device step on the whole global batch. Returns the names of the layers changed.
    """
    import keras

    if strategy.num_replicas_in_sync <= 1:
        return []
    changed = []
    stack = list(model.layers)
    while stack:
        layer = stack.pop(0)
        stack.extend(getattr(layer, "layers", []))  # nested models
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized:
            layer.synchronized = True  # read when the layer is called, i.e. when fit traces its step
            changed.append(layer.name)
    return changed


def patch_multiworker_fit(model, strategy):
    """Let `model.fit` / `evaluate` start under a multi-worker strategy (keras-team/keras#20585).

    Keras 3.15's TensorFlow trainer peeks at the first distributed batch and averages it across
    replicas with `strategy.reduce` to build the metrics; MultiWorkerMirroredStrategy can't reduce
    a nested batch and fit fails ("Attempt to convert a value (PerReplica...)"). Only shapes are
    needed there, so this model's peek takes this worker's first replica's batch instead; and its
    steps return their logs as 1-vectors, which the same cross-worker reduce can average. A no-op
    on one host.
    """
    if num_workers(strategy) <= 1:
        return

    def first_local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(first_local, next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = maybe_symbolic_build

    def with_vector_logs(step):
        def wrapped(data):
            return {k: tf.reshape(v, [1]) if getattr(v, "shape", None) is not None and v.shape.rank == 0 else v
                    for k, v in step(data).items()}
        return wrapped

    # The step's logs are averaged over the workers with strategy.reduce("MEAN", value, axis=0), which
    # fails on scalars: hand them over as 1-vectors (the epoch logs callbacks see are unaffected).
    model.train_step = with_vector_logs(model.train_step)
    model.test_step = with_vector_logs(model.test_step)


def agree_min(strategy, value):
    """The smallest of every worker's `value` (this process's own value on a single host).

    Used when a run resumes: after a crash, workers may have written their checkpoints for
    different epochs (at most one apart, since an epoch ends with collective steps on all of them)
    or marked a phase done at different moments; all must go on from the same point.
    """
    workers = num_workers(strategy)
    if workers <= 1:
        return int(value)
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict()
    position = (len(spec.get("chief", [])) if resolver.task_type == "worker" else 0) + int(resolver.task_id)
    local = np.zeros(workers, np.float64)  # small integers: exact in float64
    local[position] = value / (strategy.num_replicas_in_sync // workers)  # each local replica adds its share
    values = strategy.experimental_distribute_values_from_function(lambda _: tf.constant(local))
    everyone = strategy.reduce("SUM", values, axis=None).numpy()  # an all-reduce across the workers
    return int(round(float(everyone.min())))
