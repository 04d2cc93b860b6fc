"""SGD with the weight decay of the paper's PyTorch code: added to the gradient, before momentum.

`torch.optim.SGD(weight_decay=wd)` (what Hsu & Kira's code and Appendix B's figures use) adds
`wd * w` to each gradient, so the decay is carried by the momentum buffer: at momentum 0.9 it
acts about ten times as strongly as Keras's own `SGD(weight_decay=wd)`, which decays the weights
directly (decoupled, `w -= lr * wd * w`). `weight_decay_mode: coupled` (the default) follows the
paper; `decoupled` is Keras's.
"""

import keras
from keras import ops

from keras_cwsn.constants import WEIGHT_DECAY_MODES  # noqa: F401 (re-exported)


@keras.saving.register_keras_serializable(package="keras_cwsn")
class CoupledSGD(keras.optimizers.SGD):
    """`keras.optimizers.SGD` whose update uses `gradient + coupled_weight_decay * variable` (torch's SGD).

    Args:
        coupled_weight_decay: float. L2 factor added to every trainable variable's gradient
            (biases and BatchNorm parameters too, as in PyTorch), except those passed to
            `exclude_from_weight_decay` before the first step. Defaults to 0.
        **kwargs: `keras.optimizers.SGD` arguments (`learning_rate`, `momentum`, ...).

    Example:
    ```python
    optimizer = CoupledSGD(learning_rate=0.01, momentum=0.9, coupled_weight_decay=5e-4)
    ```
    """

    def __init__(self, coupled_weight_decay=0.0, **kwargs):
        super().__init__(**kwargs)
        if coupled_weight_decay < 0:
            raise ValueError(f"coupled_weight_decay must be >= 0. Received: {coupled_weight_decay}")
        self.coupled_weight_decay = float(coupled_weight_decay)

    def update_step(self, gradient, variable, learning_rate):
        if self.coupled_weight_decay and self._use_weight_decay(variable):  # honours exclude_from_weight_decay
            decay = ops.cast(self.coupled_weight_decay, variable.dtype)
            gradient = ops.add(ops.cast(gradient, variable.dtype), ops.multiply(decay, variable))
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config["coupled_weight_decay"] = self.coupled_weight_decay
        return config
