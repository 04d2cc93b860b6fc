"""Tests for keras_cwsn.models: outputs per variant, loss taps, side branch, Double, training, saving."""

import keras
import numpy as np
import pytest

from conftest import random_images
from keras_cwsn import models
from keras_cwsn.losses import PairwiseKLLoss
from keras_cwsn.models import build_model
from keras_cwsn.variants import VARIANTS, variant_levels, variant_loss_weights

NUM_FINE, NUM_COARSE = 4, 2
EXPECTED_OUTPUTS = {
    "A": ["fine_fc3"],
    "B": ["fine_fc2", "fine_fc3"],
    "C": ["coarse_fc1", "fine_fc2", "fine_fc3"],
    "D": ["coarse_fc1_side", "fine_fc2", "fine_fc3"],
    "ce": ["probabilities"],
}
TAP_LAYERS = {"fine_fc3": "fc3", "fine_fc2": "fc2", "coarse_fc1": "fc1", "coarse_fc1_side": "fc1_side"}


def _images(n=4, shape=(32, 32, 3), seed=0):
    return random_images(n, shape, seed)


def _lenet(variant, **kwargs):
    return build_model("lenet", variant, num_fine=NUM_FINE, num_coarse=NUM_COARSE, **kwargs)


def _outputs(model, x):
    return {k: keras.ops.convert_to_numpy(v) for k, v in model(x, training=False).items()}


# ---------------------------------------------------------------------------------------------
# The variant table
# ---------------------------------------------------------------------------------------------


def test_variant_table_matches_design():
    assert variant_loss_weights("A") == {"fine_fc3": 1.0}
    assert variant_loss_weights("B") == {"fine_fc2": 0.2, "fine_fc3": 0.8}
    assert variant_loss_weights("C") == {"coarse_fc1": 0.4, "fine_fc2": 0.2, "fine_fc3": 0.4}
    assert variant_loss_weights("D") == {"coarse_fc1_side": 0.4, "fine_fc2": 0.2, "fine_fc3": 0.4}
    for variant in VARIANTS:
        assert sum(variant_loss_weights(variant).values()) == pytest.approx(1.0)
    assert variant_levels("C") == {"coarse_fc1": "coarse", "fine_fc2": "fine", "fine_fc3": "fine"}
    assert variant_levels("ce") == {"probabilities": "fine"}


@pytest.mark.parametrize("variant", sorted(EXPECTED_OUTPUTS))
def test_outputs_per_variant(variant):
    model = _lenet(variant)
    assert sorted(model.output) == EXPECTED_OUTPUTS[variant]
    if variant != "ce":
        assert sorted(variant_loss_weights(variant)) == EXPECTED_OUTPUTS[variant]
        assert sorted(variant_levels(variant)) == EXPECTED_OUTPUTS[variant]
    assert ("fc1_side" in [layer.name for layer in model.layers]) == (variant == "D")
    outputs = _outputs(model, _images())
    assert sorted(outputs) == EXPECTED_OUTPUTS[variant]
    widths = {"fine_fc3": NUM_FINE, "fine_fc2": 128, "coarse_fc1": 500, "coarse_fc1_side": 500,
              "probabilities": NUM_FINE}
    for key, value in outputs.items():
        assert value.shape == (4, widths[key])
        assert np.all(np.isfinite(value))
    if variant == "ce":
        np.testing.assert_allclose(outputs["probabilities"].sum(axis=-1), 1.0, rtol=1e-5)
        assert np.all(outputs["probabilities"] >= 0)


@pytest.mark.parametrize("variant", ["C", "D"])
def test_loss_taps_are_the_linear_dense_outputs(variant):
    model = _lenet(variant)
    x = _images()
    outputs = _outputs(model, x)
    for key in EXPECTED_OUTPUTS[variant]:
        layer = model.get_layer(TAP_LAYERS[key])
        assert isinstance(layer, keras.layers.Dense)
        assert layer.get_config()["activation"] == "linear"
        tap = keras.Model(model.input, layer.output)
        np.testing.assert_allclose(outputs[key], keras.ops.convert_to_numpy(tap(x, training=False)),
                                   rtol=1e-5, atol=1e-5)
    # The taps are logits (before BN/ReLU): hidden ones take negative values.
    assert (outputs["fine_fc2"] < 0).any()
    # The classifier's probabilities are the softmax of the same fc3 logits.
    classifier = _lenet("ce")
    classifier.set_weights(_lenet("A").get_weights())  # same layer order: trunk, fc1..fc3
    fc3 = keras.Model(classifier.input, classifier.get_layer("fc3").output)
    np.testing.assert_allclose(_outputs(classifier, x)["probabilities"],
                               keras.ops.convert_to_numpy(keras.ops.softmax(fc3(x, training=False))),
                               rtol=1e-5, atol=1e-6)


def test_side_branch_feeds_nothing():
    model = _lenet("D")
    side = model.get_layer("fc1_side")
    # Graph: fc1_side reads the same tensor as fc1, and no layer reads fc1_side's output.
    assert side.input is model.get_layer("fc1").input
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        assert all(t is not side.output for t in keras.tree.flatten(layer.input)), layer.name
    # Behaviour: re-drawing fc1_side's weights changes only coarse_fc1_side.
    x = _images()
    before = _outputs(model, x)
    rng = np.random.default_rng(1)
    side.set_weights([rng.standard_normal(w.shape).astype(np.float32) for w in side.get_weights()])
    after = _outputs(model, x)
    assert not np.allclose(before["coarse_fc1_side"], after["coarse_fc1_side"])
    np.testing.assert_array_equal(before["fine_fc2"], after["fine_fc2"])
    np.testing.assert_array_equal(before["fine_fc3"], after["fine_fc3"])


# ---------------------------------------------------------------------------------------------
# Double
# ---------------------------------------------------------------------------------------------


def _widths(model):
    """filters / units of every Conv2D and Dense layer, by name."""
    widths = {}
    for layer in model.layers:
        config = layer.get_config()
        if isinstance(layer, keras.layers.Conv2D):
            widths[layer.name] = config["filters"]
        elif isinstance(layer, keras.layers.Dense):
            widths[layer.name] = config["units"]
    return widths


def test_double_lenet_doubles_convs_and_hidden_fcs():
    normal, double = _widths(_lenet("D")), _widths(_lenet("D", double=True))
    assert normal == {"conv1": 20, "conv2": 50, "fc1": 500, "fc2": 128, "fc1_side": 500, "fc3": NUM_FINE}
    assert double == {name: (w if name == "fc3" else 2 * w) for name, w in normal.items()}
    model = _lenet("D", double=True)
    outputs = _outputs(model, _images(2))
    assert outputs["fine_fc2"].shape == (2, 256) and outputs["coarse_fc1_side"].shape == (2, 1000)


@pytest.fixture
def narrow_alexnet_fc(monkeypatch):
    """AlexNet with 8-unit fc1/fc2 instead of 4096: its trunk is untouched, and it builds in a blink.

    (A doubled AlexNet's fc2 alone is 8192 x 8192 = 67M weights; the width logic is the same at 8.)
    """
    trunk, widths, style = models.ARCH_SPECS["alexnet"]
    assert widths == (4096, 4096)  # the real widths, read from the table the builder uses
    monkeypatch.setitem(models.ARCH_SPECS, "alexnet", (trunk, (8, 8), style))


def _fan_in(layer):
    return int(np.prod(layer.kernel.shape[:-1]))


def test_torch_init_draws_kernels_and_biases_from_pytorchs_uniform():
    """init="torch" (the default): kernel and bias of every conv and dense layer uniform in +-1/sqrt(fan_in) (PyTorch's default)."""
    keras.utils.set_random_seed(0)
    model = build_model("lenet", "D", num_fine=NUM_FINE, num_coarse=NUM_COARSE, init="torch")
    layers = [layer for layer in model.layers if hasattr(layer, "kernel") and layer.name != "image"]
    assert {layer.name for layer in layers} == {"conv1", "conv2", "fc1", "fc1_side", "fc2", "fc3"}
    for layer in layers:
        bound = 1.0 / np.sqrt(_fan_in(layer))
        kernel, bias = (np.asarray(w) for w in (layer.kernel, layer.bias))
        assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound, layer.name
        assert np.abs(kernel).max() > 0.9 * bound, layer.name  # the whole interval is used
        assert np.std(kernel) == pytest.approx(bound / np.sqrt(3), rel=0.1), layer.name  # a uniform's std
        assert np.count_nonzero(bias) == bias.size, layer.name
    keras.utils.set_random_seed(0)
    default = build_model("lenet", "D", num_fine=NUM_FINE, num_coarse=NUM_COARSE)  # the default is PyTorch's
    np.testing.assert_array_equal(np.asarray(default.get_layer("fc1").kernel), np.asarray(model.get_layer("fc1").kernel))
    keras.utils.set_random_seed(0)
    glorot_model = build_model("lenet", "D", num_fine=NUM_FINE, num_coarse=NUM_COARSE, init="keras")
    fc1 = glorot_model.get_layer("fc1")
    glorot = np.sqrt(6.0 / (fc1.kernel.shape[0] + fc1.kernel.shape[1]))
    assert np.abs(np.asarray(fc1.kernel)).max() > 1.0 / np.sqrt(_fan_in(fc1))  # Keras's: wider than torch's
    assert np.abs(np.asarray(fc1.kernel)).max() <= glorot and not np.any(np.asarray(fc1.bias))
    with pytest.raises(ValueError, match="Unknown init"):
        build_model("lenet", "A", num_fine=NUM_FINE, init="he")


def test_alexnet_configs_start_from_glorot_where_its_clusters_differ_across_images():
    """AlexNet (no BatchNorm) from PyTorch's init gives nearly the same logits for every image, so the
    pairwise-KL loss has no gradient to leave that plateau (docs/decisions.md); the bird configs start from Glorot."""
    from keras_cwsn.config import load_config

    assert load_config(None, "cub42")["init"] == "keras"
    assert load_config(None, "birdsnap34")["init"] == "keras"
    assert load_config(None, "cifar10")["init"] == "torch"  # LeNet has BatchNorm: the paper's init stays
    images = np.random.default_rng(0).normal(size=(16, 64, 64, 3)).astype("float32")
    spread = {}
    for init in ("torch", "keras"):
        keras.utils.set_random_seed(0)
        model = build_model("alexnet", "C", num_fine=42, num_coarse=21, input_shape=(64, 64, 3), init=init)
        spread[init] = float(np.std(np.asarray(model(images, training=False)["fine_fc3"]), axis=0).mean())
    assert spread["keras"] > 3 * spread["torch"], spread


@pytest.mark.parametrize("batchnorm, momentum, epsilon", [("keras", 0.99, 1e-3), ("torch", 0.9, 1e-5)])
def test_batchnorm_setting_gives_every_bn_layer_its_momentum_and_epsilon(batchnorm, momentum, epsilon):
    """batchnorm="torch": PyTorch's BatchNorm (running stats move by 0.1 of the batch's, epsilon 1e-5)."""
    keras.utils.set_random_seed(0)
    model = build_model("lenet", "D", num_fine=NUM_FINE, num_coarse=NUM_COARSE, batchnorm=batchnorm)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert {layer.name for layer in bns} == {"conv1_bn", "conv2_bn", "fc1_bn", "fc2_bn"}
    assert all(layer.momentum == momentum and layer.epsilon == epsilon for layer in bns)
    # One training-mode call moves conv1_bn's running mean from 0 by (1 - momentum) of the batch mean,
    # and the inference-mode output divides by sqrt(var + epsilon), as NumPy computes them.
    x = np.random.default_rng(0).normal(size=(8, 32, 32, 3)).astype("float32")
    conv1 = np.asarray(keras.Model(model.input, model.get_layer("conv1").output)(x))
    model(x, training=True)
    bn = model.get_layer("conv1_bn")
    np.testing.assert_allclose(np.asarray(bn.moving_mean), (1 - momentum) * conv1.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    mean, var = np.asarray(bn.moving_mean), np.asarray(bn.moving_variance)
    expected = np.asarray(bn.gamma) * (conv1 - mean) / np.sqrt(var + epsilon) + np.asarray(bn.beta)
    np.testing.assert_allclose(np.asarray(bn(conv1, training=False)), expected, rtol=1e-4, atol=1e-4)


def test_unknown_batchnorm_is_refused():
    with pytest.raises(ValueError, match="Unknown batchnorm"):
        build_model("lenet", "A", num_fine=NUM_FINE, batchnorm="pytorch")


def test_alexnet_layout():
    # A small input the torchvision trunk accepts (64x64 -> 1x1x256 after pool5) keeps this cheap.
    normal = build_model("alexnet", "D", num_fine=NUM_FINE, num_coarse=NUM_COARSE, input_shape=(64, 64, 3))
    assert _widths(normal) == {"conv1": 64, "conv2": 192, "conv3": 384, "conv4": 256, "conv5": 256,
                               "fc1": 4096, "fc2": 4096, "fc1_side": 4096, "fc3": NUM_FINE}
    assert {layer.name for layer in normal.layers if isinstance(layer, keras.layers.Dropout)} == {
        "fc1_dropout", "fc2_dropout"}
    assert sorted(normal.output) == EXPECTED_OUTPUTS["D"]
    assert build_model("alexnet", "ce", num_fine=NUM_FINE, input_shape=(64, 64, 3)).input_shape == (
        None, 64, 64, 3)


def test_alexnet_double_doubles_convs_and_hidden_fcs(narrow_alexnet_fc):
    double = build_model("alexnet", "D", num_fine=NUM_FINE, num_coarse=NUM_COARSE, input_shape=(64, 64, 3),
                         double=True)
    assert _widths(double) == {"conv1": 128, "conv2": 384, "conv3": 768, "conv4": 512, "conv5": 512,
                               "fc1": 16, "fc2": 16, "fc1_side": 16, "fc3": NUM_FINE}


def test_alexnet_at_its_default_224_input(narrow_alexnet_fc):
    """torchvision's layout at 224 x 224: 55 -> 27 -> 27 -> 13 -> 13 -> 6, so fc1 reads 6 x 6 x 256 = 9216 features."""
    model = build_model("alexnet", "D", num_fine=NUM_FINE, num_coarse=NUM_COARSE)
    assert model.input_shape == (None, 224, 224, 3)
    spatial = {name: model.get_layer(name).output.shape[1:3] for name in ("conv1", "pool1", "conv2", "pool2", "pool5")}
    assert spatial == {"conv1": (55, 55), "pool1": (27, 27), "conv2": (27, 27), "pool2": (13, 13), "pool5": (6, 6)}
    assert model.get_layer("flatten").output.shape[-1] == 9216
    assert model.get_layer("fc1").kernel.shape == (9216, 8) and model.get_layer("fc1_side").kernel.shape == (9216, 8)
    outputs = _outputs(model, _images(1, (224, 224, 3)))
    assert {k: v.shape for k, v in outputs.items()} == {"coarse_fc1_side": (1, 8), "fine_fc2": (1, 8),
                                                         "fine_fc3": (1, NUM_FINE)}
    assert all(np.all(np.isfinite(v)) for v in outputs.values())


# ---------------------------------------------------------------------------------------------
# Training with the pairwise losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains_without_nan(variant):
    keras.utils.set_random_seed(0)
    model = _lenet(variant)
    outputs = list(model.output)
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss={key: PairwiseKLLoss() for key in outputs},
                  loss_weights=variant_loss_weights(variant))
    rng = np.random.default_rng(0)
    x = _images(8)
    fine = rng.integers(0, NUM_FINE, size=8)
    labels = {"fine": fine, "coarse": fine // 2}
    y = {key: labels[level] for key, level in variant_levels(variant).items()}
    before = [w.numpy().copy() for w in model.trainable_weights]
    for _ in range(2):
        logs = model.train_on_batch(x, y, return_dict=True)
        assert np.isfinite(logs["loss"]) and logs["loss"] > 0, logs
    for key in outputs if len(outputs) > 1 else ():  # every tap contributes its own loss
        assert np.isfinite(logs[f"{key}_loss"]) and logs[f"{key}_loss"] > 0, logs
    after = [w.numpy() for w in model.trainable_weights]
    assert all(np.all(np.isfinite(w)) for w in after)
    changed = {w.path for w, b, a in zip(model.trainable_weights, before, after) if not np.allclose(b, a)}
    assert any(path.startswith("conv1/") for path in changed)
    assert np.all(np.isfinite(_outputs(model, x)["fine_fc3"]))


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="Unknown arch.*resnet"):
        build_model("resnet", "A", num_fine=4)
    with pytest.raises(ValueError, match="Unknown variant.*'E'"):
        build_model("lenet", "E", num_fine=4)
    for variant in ("C", "D"):
        with pytest.raises(ValueError, match="num_coarse"):
            build_model("lenet", variant, num_fine=4)
        with pytest.raises(ValueError, match="num_coarse"):
            build_model("lenet", variant, num_fine=4, num_coarse=1)
    with pytest.raises(ValueError, match="num_fine"):
        build_model("lenet", "A", num_fine=1)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("lenet", "A", num_fine=4, input_shape=(32, 32))
    with pytest.raises(ValueError, match="input_shape"):
        build_model("lenet", "A", num_fine=4, input_shape=(32, 32, 1))
    with pytest.raises(ValueError):  # too small for the trunk: Keras names the shrinking layer
        build_model("lenet", "A", num_fine=4, input_shape=(8, 8, 3))


def test_unknown_variant_in_table_helpers_raises():
    with pytest.raises(ValueError, match="Unknown variant"):
        variant_loss_weights("ce")
    with pytest.raises(ValueError, match="Unknown variant"):
        variant_levels("Z")


# ---------------------------------------------------------------------------------------------
# Config and saving round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["D", "ce"])
def test_config_round_trip(variant):
    model = _lenet(variant, double=variant == "D")
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    assert sorted(clone.output) == sorted(model.output)
    x = _images(3)
    expected, actual = _outputs(model, x), _outputs(clone, x)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["D", "ce"])
def test_keras_file_round_trip(variant, tmp_path):
    model = _lenet(variant)
    model.compile(optimizer="sgd", loss={key: PairwiseKLLoss(margin=3.0) for key in model.output}
                  if variant != "ce" else {"probabilities": "sparse_categorical_crossentropy"})
    path = tmp_path / f"lenet_{variant}.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert sorted(restored.output) == sorted(model.output)
    x = _images(3)
    expected, actual = _outputs(model, x), _outputs(restored, x)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    if variant != "ce":
        loss = restored.loss["fine_fc3"] if isinstance(restored.loss, dict) else None
        assert isinstance(loss, PairwiseKLLoss) and loss.margin == 3.0


def test_alexnet_bn_puts_batchnorm_after_every_conv_and_hidden_fc_in_place_of_dropout():
    plain = build_model("alexnet", "C", num_fine=6, num_coarse=3, input_shape=(64, 64, 3))
    with_bn = build_model("alexnet", "C", num_fine=6, num_coarse=3, input_shape=(64, 64, 3), alexnet_bn=True)
    names = [layer.name for layer in with_bn.layers]
    assert [n for n in names if n.endswith("_bn")] == [f"conv{i}_bn" for i in range(1, 6)] + ["fc1_bn", "fc2_bn"]
    assert not any("dropout" in n for n in names) and any("dropout" in layer.name for layer in plain.layers)
    assert not any(layer.name.endswith("_bn") for layer in plain.layers)  # torchvision's AlexNet unchanged
    assert [w.shape for w in plain.get_layer("conv1").weights] == [w.shape for w in with_bn.get_layer("conv1").weights]
    outputs = with_bn(random_images(4, (64, 64, 3)), training=True)
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {"coarse_fc1": (4, 4096), "fine_fc2": (4, 4096),
                                                              "fine_fc3": (4, 6)}
    with pytest.raises(ValueError, match="alexnet_bn applies to AlexNet only"):
        build_model("lenet", "A", num_fine=NUM_FINE, alexnet_bn=True)
