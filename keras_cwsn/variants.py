"""The variant table (the paper's Fig. 2) as data, and the names derived from it.

Pure Python, so that the config, `report` and the GPU scripts read it without loading Keras.
"""

import collections

from keras_cwsn.constants import LAST_LAYER

LossTap = collections.namedtuple("LossTap", ["level", "layer", "weight"])

# The paper's Fig. 2 / Appendix B (weights read earliest layer first: README, "Decisions where the
# paper is silent"). `fc1_side` is variant D's side branch: a Dense layer parallel to fc1, fed by
# the same input, whose output feeds nothing else.
VARIANTS = {
    "A": (LossTap("fine", LAST_LAYER, 1.0),),
    "B": (LossTap("fine", "fc2", 0.2), LossTap("fine", LAST_LAYER, 0.8)),
    "C": (LossTap("coarse", "fc1", 0.4), LossTap("fine", "fc2", 0.2), LossTap("fine", LAST_LAYER, 0.4)),
    "D": (LossTap("coarse", "fc1_side", 0.4), LossTap("fine", "fc2", 0.2), LossTap("fine", LAST_LAYER, 0.4)),
}
CLASSIFIER_VARIANT = "ce"  # the cross-entropy classifier: the baseline, and the warm-started network
ALL_VARIANTS = tuple(VARIANTS) + (CLASSIFIER_VARIANT,)
CLASSIFIER_OUTPUT = "probabilities"
SIDE_BRANCH_LAYERS = ("fc1_side",)


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
