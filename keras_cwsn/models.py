"""LeNet and AlexNet clusterers/classifiers with one named output per loss-bearing layer (Fig. 2).

The variant table is data: which layer carries which level's pairwise loss, with which weight.
The loss-bearing tensor of a layer is its linear output (before BN/ReLU); the loss applies the softmax.
"""

import collections
import math

import keras
from keras import layers

from keras_cwsn.constants import NETWORK_INPUTS

LossTap = collections.namedtuple("LossTap", ["level", "layer", "weight"])

# The paper's Fig. 2 / Appendix B (weights read earliest layer first: README, "Decisions where the
# paper is silent"). `fc1_side` is variant D's side branch: a Dense layer parallel to fc1, fed by
# the same input, whose output feeds nothing else.
VARIANTS = {
    "A": (LossTap("fine", "fc3", 1.0),),
    "B": (LossTap("fine", "fc2", 0.2), LossTap("fine", "fc3", 0.8)),
    "C": (LossTap("coarse", "fc1", 0.4), LossTap("fine", "fc2", 0.2), LossTap("fine", "fc3", 0.4)),
    "D": (LossTap("coarse", "fc1_side", 0.4), LossTap("fine", "fc2", 0.2), LossTap("fine", "fc3", 0.4)),
}
CLASSIFIER_VARIANT = "ce"
ALL_VARIANTS = tuple(VARIANTS) + (CLASSIFIER_VARIANT,)
ARCHS = tuple(NETWORK_INPUTS)
# The smallest input side each trunk leaves at least one pixel of (LeNet: two valid 5x5 convs and 2x2
# pools; AlexNet: the 11x11/4 conv and three 3x3/2 pools).
MIN_INPUT_SIDE = {"lenet": 16, "alexnet": 63}
CLASSIFIER_OUTPUT = "probabilities"
SIDE_BRANCH_LAYERS = ("fc1_side",)
LAST_LAYER = "fc3"  # the fine clusters' (clusterer) or classes' (classifier) logits, in every arch
INITS = ("torch", "keras")  # how conv and dense weights start: PyTorch's defaults (the paper's) or Keras's
# BatchNormalization (momentum, epsilon): Keras's defaults, or PyTorch's (its momentum 0.1 weighs the new
# batch, i.e. Keras momentum 0.9; epsilon 1e-5), which the paper's code had. PyTorch's running variance
# also takes the unbiased batch variance (n / (n - 1)), Keras's the biased one: that difference stays.
BATCHNORMS = {"keras": (0.99, 1e-3), "torch": (0.9, 1e-5)}


def output_name(tap):
    """Name of the model output for a loss tap, e.g. `fine_fc3`, `coarse_fc1_side`."""
    return f"{tap.level}_{tap.layer}"


def variant_taps(variant):
    """The loss taps of a clustering variant (A, B, C or D)."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant. Expected one of {', '.join(VARIANTS)}. Received: variant={variant!r}")
    return VARIANTS[variant]


def variant_levels(variant):
    """Map output name -> hierarchy level ("fine"/"coarse") for a variant, `ce` included."""
    if variant == CLASSIFIER_VARIANT:
        return {CLASSIFIER_OUTPUT: "fine"}
    return {output_name(t): t.level for t in variant_taps(variant)}


def variant_loss_weights(variant):
    """Map output name -> loss weight for a clustering variant."""
    return {output_name(t): t.weight for t in variant_taps(variant)}


def _initializers(init, fan_in):
    """Kernel and bias initializers of a conv or dense layer whose units each see `fan_in` inputs.

    `keras`: Keras's defaults (Glorot uniform kernel, zero bias). `torch`: PyTorch's Conv2d/Linear
    defaults, which the paper's code (Hsu & Kira's, PyTorch) keeps: kernel and bias both uniform in
    +-1/sqrt(fan_in) (`kaiming_uniform_` with a = sqrt(5)); the paper only says "randomly initialized".
    """
    if init == "keras":
        return {}
    bound = 1.0 / math.sqrt(fan_in)
    return {"kernel_initializer": keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
            "bias_initializer": keras.initializers.RandomUniform(-bound, bound)}


def _conv(x, filters, size, name, init, **kwargs):
    return layers.Conv2D(filters, size, name=name, **kwargs, **_initializers(init, size * size * x.shape[-1]))(x)


def _dense(x, units, name, init):
    return layers.Dense(units, name=name, **_initializers(init, x.shape[-1]))(x)


def _batchnorm(x, name, batchnorm):
    momentum, epsilon = BATCHNORMS[batchnorm]
    return layers.BatchNormalization(momentum=momentum, epsilon=epsilon, name=name)(x)


def _lenet_trunk(x, width, init, batchnorm):
    """conv5x5(20)-BN-ReLU-pool, conv5x5(50)-BN-ReLU-pool, flatten (Hsu & Kira's LeNet)."""
    for i, filters in enumerate((20, 50), start=1):
        x = _conv(x, filters * width, 5, f"conv{i}", init)
        x = _batchnorm(x, f"conv{i}_bn", batchnorm)
        x = layers.ReLU(name=f"conv{i}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    return layers.Flatten(name="flatten")(x)


def _alexnet_trunk(x, width, init, batchnorm):
    """torchvision AlexNet features: 64/192/384/256/256 convs, three 3x3/2 max-pools (no BatchNorm)."""
    x = layers.ZeroPadding2D(2, name="conv1_pad")(x)
    x = _conv(x, 64 * width, 11, "conv1", init, strides=4, activation="relu")
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    x = _conv(x, 192 * width, 5, "conv2", init, padding="same", activation="relu")
    x = layers.MaxPooling2D(3, strides=2, name="pool2")(x)
    x = _conv(x, 384 * width, 3, "conv3", init, padding="same", activation="relu")
    x = _conv(x, 256 * width, 3, "conv4", init, padding="same", activation="relu")
    x = _conv(x, 256 * width, 3, "conv5", init, padding="same", activation="relu")
    x = layers.MaxPooling2D(3, strides=2, name="pool5")(x)
    return layers.Flatten(name="flatten")(x)


ARCH_SPECS = {
    # trunk builder, (fc1, fc2) widths, whether fc layers are followed by BN (else dropout before them)
    "lenet": (_lenet_trunk, (500, 128), "bn"),
    "alexnet": (_alexnet_trunk, (4096, 4096), "dropout"),
}


def build_model(arch, variant, num_fine, num_coarse=None, input_shape=None, double=False, dropout=0.5,
                name=None, init="torch", batchnorm="keras"):
    """Build a clusterer (variant A-D) or classifier (`ce`) as a Functional model with dict outputs.

    Args:
        arch: str. `"lenet"` or `"alexnet"`.
        variant: str. `"A"`, `"B"`, `"C"`, `"D"` (pairwise-loss clusterers) or `"ce"` (classifier).
        num_fine: int. Number of fine classes (= clusters at fc3).
        num_coarse: int or None. Number of coarse classes; the coarse taps are on hidden layers,
            so this is only checked (C and D need a hierarchy). Defaults to None.
        input_shape: tuple (H, W, 3). Defaults to 32x32x3 for LeNet and 224x224x3 for AlexNet.
        double: bool. Double every conv's filters and every hidden fc width (Table 4). Defaults to False.
        dropout: float. AlexNet's dropout rate before fc1 and fc2. Defaults to 0.5.
        name: str. Model name. Defaults to `"<arch>_<variant>"`.
        init: str. `"torch"` (PyTorch's layer defaults: the paper's implementation is PyTorch and its
            weights "randomly initialized") or `"keras"` (Glorot-uniform kernels, zero biases).
            Defaults to `"torch"`.
        batchnorm: str. `"keras"` (momentum 0.99, epsilon 1e-3) or `"torch"` (PyTorch's defaults,
            as the paper's code had them: momentum 0.9 in Keras's terms, epsilon 1e-5). Defaults
            to `"keras"`.

    Returns:
        `keras.Model` whose outputs are a dict: one logits output per loss tap (e.g. `fine_fc3`,
        `fine_fc2`, `coarse_fc1`) for A-D, or `{"probabilities": softmax(fc3)}` for `ce`.

    Example:
    ```python
    model = build_model("lenet", "D", num_fine=10, num_coarse=2)
    sorted(model.output_names)  # ['coarse_fc1_side', 'fine_fc2', 'fine_fc3']
    ```
    """
    if arch not in ARCH_SPECS:
        raise ValueError(f"Unknown arch. Expected one of {', '.join(ARCHS)}. Received: arch={arch!r}")
    if variant not in ALL_VARIANTS:
        raise ValueError(f"Unknown variant. Expected one of {', '.join(ALL_VARIANTS)}. Received: variant={variant!r}")
    if not isinstance(num_fine, int) or isinstance(num_fine, bool) or num_fine < 2:
        raise ValueError(f"num_fine must be an integer >= 2. Received: num_fine={num_fine!r}")
    if init not in INITS:
        raise ValueError(f"Unknown init. Expected one of {', '.join(INITS)}. Received: init={init!r}")
    if batchnorm not in BATCHNORMS:
        raise ValueError(f"Unknown batchnorm. Expected one of {', '.join(BATCHNORMS)}. Received: batchnorm={batchnorm!r}")
    taps = () if variant == CLASSIFIER_VARIANT else variant_taps(variant)
    if any(t.level == "coarse" for t in taps) and (num_coarse is None or num_coarse < 2):
        raise ValueError(f"Variant {variant} uses coarse labels: num_coarse must be >= 2. Received: {num_coarse!r}")
    input_shape = tuple(input_shape or NETWORK_INPUTS[arch][0] + (3,))
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (H, W, 3). Received: input_shape={input_shape}")
    trunk, (fc1_units, fc2_units), fc_style = ARCH_SPECS[arch]
    width = 2 if double else 1

    # Layers
    inputs = keras.Input(shape=input_shape, name="image")
    features = trunk(inputs, width, init, batchnorm)
    if fc_style == "dropout":
        features = layers.Dropout(dropout, name="fc1_dropout")(features)
    hidden = {}
    hidden["fc1"] = _dense(features, fc1_units * width, "fc1", init)
    x = _post_fc(hidden["fc1"], "fc1", fc_style, dropout, batchnorm)
    hidden["fc2"] = _dense(x, fc2_units * width, "fc2", init)
    x = _post_fc(hidden["fc2"], "fc2", fc_style, dropout, batchnorm, last=True)
    hidden["fc3"] = _dense(x, num_fine, LAST_LAYER, init)
    if any(t.layer == "fc1_side" for t in taps):
        hidden["fc1_side"] = _dense(features, fc1_units * width, "fc1_side", init)

    # Functional graph
    if variant == CLASSIFIER_VARIANT:
        outputs = {CLASSIFIER_OUTPUT: layers.Softmax(name=CLASSIFIER_OUTPUT, dtype="float32")(hidden["fc3"])}
    else:
        outputs = {output_name(t): hidden[t.layer] for t in taps}
    return keras.Model(inputs, outputs, name=name or f"{arch}_{variant}")


def _post_fc(x, layer_name, fc_style, dropout, batchnorm, last=False):
    """What follows a hidden fc layer: BN + ReLU (LeNet) or ReLU (+ dropout before the next, AlexNet)."""
    if fc_style == "bn":
        x = _batchnorm(x, f"{layer_name}_bn", batchnorm)
        return layers.ReLU(name=f"{layer_name}_relu")(x)
    x = layers.ReLU(name=f"{layer_name}_relu")(x)
    if not last:
        x = layers.Dropout(dropout, name=f"{layer_name.replace('1', '2')}_dropout")(x)
    return x


def penultimate_model(model):
    """A model from the same input to the fc2 activations (the embedding shown in the Projector)."""
    return keras.Model(model.input, model.get_layer("fc2_relu").output, name=f"{model.name}_embedding")


def fc3_logits_model(model):
    """A model from the same input to fc3's logits (the clusterer's cluster scores)."""
    return keras.Model(model.input, model.get_layer("fc3").output, name=f"{model.name}_fc3")
