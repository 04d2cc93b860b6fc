"""The optimiser and the learning-rate schedule the protocol trains with (Appendix B: SGD, momentum 0.9,
weight decay, the rate halved at each milestone), checked step by step against hand arithmetic."""

import keras
import numpy as np
import pytest

from conftest import tiny_clusterer
from keras_cwsn.optimizers import CoupledSGD
from keras_cwsn.training import StepLearningRate, build_optimizer


def _two_steps(optimizer, w0, g):
    variable = keras.Variable(np.array(w0, np.float32))
    optimizer.build([variable])
    values = []
    for _ in range(2):
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(np.array(g, np.float32)), variable)])
        values.append(np.array(variable, dtype=np.float64))
    return values


SETTINGS = {"epochs": 1, "batch_size": 1, "lr_milestones": [], "lr_factor": 0.5}


def test_sgd_step_with_momentum_and_coupled_weight_decay_by_hand():
    """The default, as torch.optim.SGD (the paper's code): the decay joins the gradient before momentum."""
    lr, mu, wd = 0.1, 0.9, 0.01
    optimizer = build_optimizer(dict(SETTINGS, learning_rate=lr, momentum=mu, weight_decay=wd))
    assert isinstance(optimizer, CoupledSGD) and not optimizer.nesterov and not optimizer.weight_decay
    w0, g = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    step1, step2 = _two_steps(optimizer, w0, g)
    v1 = -lr * (g + wd * w0)  # d = g + wd w; v = mu v - lr d; w += v
    w1 = w0 + v1
    np.testing.assert_allclose(step1, w1, rtol=1e-6)
    v2 = mu * v1 - lr * (g + wd * w1)
    np.testing.assert_allclose(step2, w1 + v2, rtol=1e-6)
    # the first coordinate: v1 = -0.1 * 0.51 = -0.051, w1 = 0.949; v2 = -0.0459 - 0.1 * 0.50949 = -0.096849
    assert step2[0] == pytest.approx(0.852151, abs=1e-6)
    restored = CoupledSGD.from_config(optimizer.get_config())
    assert restored.coupled_weight_decay == pytest.approx(wd) and restored.momentum == pytest.approx(mu)


def test_coupled_decay_is_stronger_than_decoupled_under_momentum():
    """What the mode changes: with momentum 0.9 the coupled decay shrinks a gradient-free weight ~10x faster."""
    shrunk = {}
    for mode in ("coupled", "decoupled"):
        optimizer = build_optimizer(dict(SETTINGS, learning_rate=0.1, momentum=0.9, weight_decay=0.01), mode)
        variable = keras.Variable(np.array([1.0], np.float32))
        optimizer.build([variable])
        for _ in range(50):  # long enough for the momentum buffer to build up
            optimizer.apply_gradients([(keras.ops.zeros((1,)), variable)])
        shrunk[mode] = 1.0 - float(np.array(variable)[0])
    assert shrunk["coupled"] > 5 * shrunk["decoupled"] > 0
    with pytest.raises(ValueError, match="weight_decay_mode"):
        build_optimizer(dict(SETTINGS, learning_rate=0.1, momentum=0.9, weight_decay=0.01), "l2")


@pytest.mark.parametrize("mode", ["coupled", "decoupled"])
def test_a_variable_excluded_from_weight_decay_steps_as_without_decay(mode):
    """`exclude_from_weight_decay` (what `last_layer_weight_decay: false` uses) holds in both modes: the
    excluded variable follows plain SGD with momentum, the other still decays."""
    lr, mu, wd = 0.1, 0.9, 0.01
    w0, g = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    optimizer = build_optimizer(dict(SETTINGS, learning_rate=lr, momentum=mu, weight_decay=wd), mode)
    kept, excluded = keras.Variable(w0.astype(np.float32)), keras.Variable(w0.astype(np.float32))
    optimizer.exclude_from_weight_decay(var_list=[excluded])
    optimizer.build([kept, excluded])
    for _ in range(2):
        grad = keras.ops.convert_to_tensor(g.astype(np.float32))
        optimizer.apply_gradients([(grad, kept), (grad, excluded)])
    v1 = -lr * g  # no decay: v = mu v - lr g; w += v
    np.testing.assert_allclose(np.array(excluded), w0 + v1 + (mu * v1 - lr * g), rtol=1e-6)
    reference = _two_steps(build_optimizer(dict(SETTINGS, learning_rate=lr, momentum=mu, weight_decay=wd), mode), w0, g)
    np.testing.assert_allclose(np.array(kept), reference[1], rtol=1e-6)
    assert not np.allclose(np.array(kept), np.array(excluded))


def test_sgd_step_with_momentum_and_decoupled_weight_decay_by_hand():
    lr, mu, wd = 0.1, 0.9, 0.01
    optimizer = build_optimizer(dict(SETTINGS, learning_rate=lr, momentum=mu, weight_decay=wd), "decoupled")
    assert isinstance(optimizer, keras.optimizers.SGD) and not optimizer.nesterov
    w0, g = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    step1, step2 = _two_steps(optimizer, w0, g)
    # Step 1: decay w by lr * wd, then velocity v1 = -lr g and w += v1.
    w1 = w0 - lr * wd * w0
    v1 = -lr * g
    w1 = w1 + v1
    np.testing.assert_allclose(step1, w1, rtol=1e-6)
    # Step 2: decay again, v2 = mu v1 - lr g (momentum carries the first step on), w += v2.
    w2 = w1 - lr * wd * w1
    v2 = mu * v1 - lr * g
    np.testing.assert_allclose(step2, w2 + v2, rtol=1e-6)
    # e.g. the first coordinate: 1 - 0.001 - 0.05 = 0.949, then 0.949 - 0.000949 - 0.095 = 0.853051
    assert step2[0] == pytest.approx(0.853051, abs=1e-6)


def test_zero_weight_decay_means_none():
    optimizer = build_optimizer({"learning_rate": 0.1, "momentum": 0.0, "weight_decay": 0, "epochs": 1,
                                 "batch_size": 1, "lr_milestones": [], "lr_factor": 0.5})
    step1, step2 = _two_steps(optimizer, [1.0], [1.0])
    np.testing.assert_allclose([step1[0], step2[0]], [0.9, 0.8], rtol=1e-6)  # plain SGD: w - lr g


class _RateSeen(keras.callbacks.Callback):
    """The optimiser's learning rate at the first batch of each epoch (what the steps really use)."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def _fit_with_schedule(initial_epoch=0):
    """(the rate each epoch's steps used, the logged rates) of a tiny fit to epoch 4 on a two-milestone schedule."""
    keras.utils.set_random_seed(0)
    model = tiny_clusterer(3)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss={"fine_fc3": "sparse_categorical_crossentropy"})
    settings = {"learning_rate": 0.1, "lr_milestones": [1, 3], "lr_factor": 0.5}
    seen = _RateSeen()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 6)).astype(np.float32), {"fine_fc3": rng.integers(0, 3, 8)}
    history = model.fit(x, y, batch_size=4, epochs=4, initial_epoch=initial_epoch, verbose=0, shuffle=False,
                        callbacks=[StepLearningRate(settings), seen])
    return seen.rates, history.history["learning_rate"]


def test_step_learning_rate_steps_the_optimizer_at_each_milestone():
    used, logged = _fit_with_schedule()
    expected = [0.1, 0.05, 0.05, 0.025]  # halved entering epoch 1 and epoch 3 (counted from 0)
    assert used == pytest.approx(expected, rel=1e-6)
    assert logged == expected  # the schedule's own values, not float32 copies


def test_step_learning_rate_on_a_resumed_fit_starts_at_the_resumed_epoch():
    """A fit resumed at epoch 2 (`initial_epoch`) runs epochs 2 and 3 at the rates an uninterrupted fit had."""
    used, logged = _fit_with_schedule(initial_epoch=2)
    assert used == pytest.approx([0.05, 0.025], rel=1e-6)
    assert logged == [0.05, 0.025]
