"""The compile recipe of a variant, in one place: training, the benchmarks and the README example use it.

Backend-neutral: imports TensorFlow only for a tf.distribute strategy.
"""

import keras

from keras_cwsn.losses import pairwise_loss
from keras_cwsn.variants import CLASSIFIER_OUTPUT, CLASSIFIER_VARIANT, variant_loss_weights
from keras_cwsn.constants import WEIGHT_DECAY_MODES
from keras_cwsn.optimizers import CoupledSGD

# Steps per `fit` execution when `steps_per_execution: auto`: measured in docs/BENCHMARKS.md.
AUTO_STEPS_PER_EXECUTION = {"cpu": 32, "gpu": 32}


def build_optimizer(settings, weight_decay_mode="coupled"):
    """SGD with the phase's learning rate, momentum and weight decay (Appendix B).

    `"coupled"` adds the decay to the gradient before momentum, as the paper's PyTorch SGD does
    (`keras_cwsn.optimizers.CoupledSGD`); `"decoupled"` is Keras's `SGD(weight_decay=...)`.
    """
    if weight_decay_mode == "coupled":
        return CoupledSGD(learning_rate=settings["learning_rate"], momentum=settings["momentum"],
                          coupled_weight_decay=settings["weight_decay"])
    if weight_decay_mode != "decoupled":
        raise ValueError(f"Unknown weight_decay_mode. Expected one of {', '.join(WEIGHT_DECAY_MODES)}. "
                         f"Received: {weight_decay_mode!r}")
    return keras.optimizers.SGD(learning_rate=settings["learning_rate"], momentum=settings["momentum"],
                                weight_decay=settings["weight_decay"] or None)


def compile_model(model, variant, optimizer, criterion="kcl", margin=2.0, jit_compile=False, steps_per_execution=1,
                  strategy=None, pair_loss=None, metrics=True):
    """Compile `model` for `variant`: pairwise losses with the variant's weights, or cross-entropy for `ce`.

    Args:
        model: keras.Model from `build_model(arch, variant, ...)`.
        variant: str. `"A"`-`"D"` (a clusterer) or `"ce"` (a classifier, with an accuracy metric).
        optimizer: keras.optimizers.Optimizer.
        criterion: str. The pairwise loss: `"kcl"` (the paper's `PairwiseKLLoss`) or `"mcl"`
            (`PairwiseMCLLoss`). Defaults to `"kcl"`.
        margin: float. The hinge margin of KCL. Defaults to 2.0 (the paper's).
        jit_compile: bool. Compile the step with XLA.
        steps_per_execution: int. Steps run per call into the compiled function.
        strategy: tf.distribute.Strategy or None. Synchronises BatchNorm across replicas.
        pair_loss: callable or None. Makes the loss of each tap (defaults to the criterion's).
        metrics: bool. Track the classifier's accuracy (benchmarks of the bare step leave it out).

    Example:
    ```python
    model = build_model("lenet", "D", num_fine=10, num_coarse=2)
    compile_model(model, "D", build_optimizer({"learning_rate": 0.01, "momentum": 0.9, "weight_decay": 5e-4}))
    ```
    """
    if strategy is not None:
        from keras_cwsn import distribute

        distribute.synchronize_batch_norm(model, strategy)
    losses, weights = variant_losses(variant, criterion, margin, pair_loss)
    if variant == CLASSIFIER_VARIANT:
        model.compile(optimizer=optimizer, loss=losses,
                      metrics={CLASSIFIER_OUTPUT: ["accuracy"]} if metrics else None, jit_compile=jit_compile,
                      steps_per_execution=steps_per_execution)
    else:
        model.compile(optimizer=optimizer, loss=losses, loss_weights=weights,
                      jit_compile=jit_compile, steps_per_execution=steps_per_execution)
    if strategy is not None:
        from keras_cwsn import distribute

        distribute.patch_multiworker_fit(model, strategy)
    return model


def variant_losses(variant, criterion="kcl", margin=2.0, pair_loss=None):
    """The losses a variant trains with, {output: Loss}, and their weights ({output: weight}; None for `ce`).

    `compile_model` compiles them; the seeds-together trainer (`training.together`) calls them itself.
    """
    if variant == CLASSIFIER_VARIANT:
        return {CLASSIFIER_OUTPUT: keras.losses.SparseCategoricalCrossentropy()}, None
    weights = variant_loss_weights(variant)
    make = pair_loss or (lambda: pairwise_loss(criterion, margin=margin))
    return {name: make() for name in weights}, weights


def device_kind():
    """`"gpu"` when the backend sees a GPU, else `"cpu"`."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    if backend == "jax":
        import jax

        return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"
    return "cpu"


def use_xla(config, replicas=1):
    """`xla: auto` compiles with XLA on one GPU; not on a CPU (measured slower there) nor across replicas."""
    if keras.backend.backend() == "jax":
        return True  # JAX always compiles
    if config["xla"] == "auto":
        return device_kind() == "gpu" and replicas == 1
    return bool(config["xla"])


def steps_per_execution(requested, steps_per_epoch, replicas=1):
    """Steps run per call into the compiled step: the largest divisor of the epoch up to `requested`.

    Keras runs an execution's steps back to back; one that crossed an epoch's end would read the
    next epoch's first batches, so the figure must divide the epoch. `"auto"` stands for the
    device's figure in `AUTO_STEPS_PER_EXECUTION`. Across several replicas it is 1: Keras 3.15's
    multi-step loop fails under MirroredStrategy (InvalidArgumentError in multi_step_on_iterator).
    """
    if replicas > 1:
        return 1
    limit = AUTO_STEPS_PER_EXECUTION[device_kind()] if requested == "auto" else int(requested)
    return max(d for d in range(1, min(limit, steps_per_epoch) + 1) if steps_per_epoch % d == 0)
