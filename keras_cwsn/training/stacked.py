"""Seeds trained together on JAX: their states stacked along a leading axis, a whole epoch one compiled program.

Built from Keras's stateless pieces, as keras-io's guide "Writing a training loop from scratch in
JAX" does: `model.stateless_call` for the forward pass, `jax.value_and_grad` of the variant's own
losses (`recipe.variant_losses`, the ones `compile` gets), `optimizer.stateless_apply` for the
update. One seed's step is vmapped over the seeds (`jax.vmap`: each seed has its own weights,
BatchNorm statistics, optimizer state and dropout seed state, and reads its own batch indices),
and an epoch is `jax.lax.scan` of that step over the epoch's index table, on training images
placed on the device once: one dispatch per epoch instead of one per step.

That layout is for accelerators, where `fit`'s per-step dispatch is the cost. On XLA:CPU it loses:
a vmapped convolution becomes a grouped one, about 2x slower than the seeds' convolutions one by
one, and a step inside a `scan` ran about 5x slower than the same step jitted alone (measured, 2
cores, docs/many-seeds.md). So on the CPU the seeds are unrolled inside one program (the same step
traced once per seed) and runs `CPU_BLOCK` steps per dispatch, unrolled (the fastest tried: one step
per dispatch was 3-4x slower); `seed_axis` and `block` choose.

The template model (one seed's) lends only its graph and its optimizer's update rule; every value
lives in the stacked state, which `write_back` copies into each seed's own Keras model after an
epoch, for the callbacks and writers a separate run uses. JAX only (imports `jax`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from keras import ops

from keras_cwsn.constants import CLUSTER_OUTPUT, PREDICT_BATCH
from keras_cwsn.data.crops import crop_flip
from keras_cwsn.variants import CLASSIFIER_OUTPUT, CLASSIFIER_VARIANT
from keras_cwsn.training.recipe import variant_losses

CPU_BLOCK = 8  # steps per dispatch on a CPU, unrolled (see above)


def stack_state(models):
    """(trainable, non-trainable, optimizer) values of each seed's compiled model, stacked along axis 0."""
    for model in models:
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)

    def stacked(variables_of):
        per_seed = [[ops.convert_to_numpy(v) for v in variables_of(m)] for m in models]
        return [jnp.asarray(np.stack(values)) for values in zip(*per_seed)]

    return (stacked(lambda m: m.trainable_variables), stacked(lambda m: m.non_trainable_variables),
            stacked(lambda m: m.optimizer.variables))


def write_back(state, models):
    """Copy each seed's slice of the stacked state into its own model and optimizer (one transfer to the host)."""
    host = jax.device_get(state)
    for s, model in enumerate(models):
        owners = (model.trainable_variables, model.non_trainable_variables, model.optimizer.variables)
        for variables, values in zip(owners, host):
            for variable, value in zip(variables, values):
                variable.assign(value[s])


def _learning_rate_index(optimizer):
    """Where the learning rate sits among the optimizer's variables (set per epoch, as `StepLearningRate` does)."""
    found = [i for i, v in enumerate(optimizer.variables) if v.path.split("/")[-1] == "learning_rate"]
    if len(found) != 1:
        raise ValueError(f"Expected one learning_rate variable in {type(optimizer).__name__}; found {len(found)}.")
    return found[0]


class StackedTrainer:
    """The compiled programs of one phase for several seeds' copies of one compiled model.

    Args:
        template: keras.Model. One seed's compiled model (its graph and optimizer rule are used).
        variant: str. The model's variant (`"A"`-`"D"` or `"ce"`): its losses and their weights.
        criterion, margin: the pairwise loss, as the config names it.
        images: float32 array (N, H, W, C). The training split, preprocessed; placed on the device once.
        labels: dict {output: (N,) int32}. Its labels at each output's level.
        pad: int. Crop padding when the epochs come with crops (`augment`), else 0.
        seed_axis: str. `"vmap"` or `"unroll"` (the seeds traced one by one). Defaults to unroll on a CPU.
        block: int or None. Steps per dispatch; None: the whole epoch in one scan. Defaults to `CPU_BLOCK` on CPUs.
    """

    def __init__(self, template, variant, criterion, margin, images, labels, pad=0, seed_axis=None, block=-1):
        self.model, self.optimizer = template, template.optimizer
        if not self.optimizer.built:
            self.optimizer.build(template.trainable_variables)
        self.losses, self.weights = variant_losses(variant, criterion, margin)
        self.names = list(self.losses)
        self.classifier = variant == CLASSIFIER_VARIANT
        self.lr_index, self.pad = _learning_rate_index(self.optimizer), pad
        self.images = jnp.asarray(images)
        self.labels = {k: jnp.asarray(v) for k, v in labels.items()}
        cpu = jax.default_backend() == "cpu"
        self.seed_axis = seed_axis or ("unroll" if cpu else "vmap")
        self.block = (CPU_BLOCK if cpu else None) if block == -1 else block
        donate = () if cpu else (0,)  # the CPU can't reuse donated buffers
        self._epoch = jax.jit(self._over_seeds(self._seed_epoch, (0, None, None, 0, 0, None)), donate_argnums=donate)
        self._outputs = {}

    def _over_seeds(self, fn, in_axes):
        """`fn` of one seed applied to every seed: `jax.vmap`, or traced once per seed and stacked ("unroll")."""
        if self.seed_axis == "vmap":
            return jax.vmap(fn, in_axes=in_axes)

        def unrolled(*args):
            seeds = jax.tree_util.tree_leaves(args[0])[0].shape[0]
            outs = [fn(*(a if axis is None else jax.tree_util.tree_map(lambda v: v[s], a)
                         for a, axis in zip(args, in_axes))) for s in range(seeds)]
            return jax.tree_util.tree_map(lambda *values: jnp.stack(values), *outs)

        return unrolled

    @property
    def log_names(self):
        """The epoch logs `fit` reports for this model: the loss, each output's loss when there are several,
        and the classifier's accuracy."""
        per_output = [f"{name}_loss" for name in self.names] if len(self.names) > 1 else []
        return ["loss", *per_output] + (["accuracy"] if self.classifier else [])

    def _step(self, state, images, labels):
        """One seed's training step (the guide's `train_step`): returns the new state and the step's figures."""
        trainable, non_trainable, optimizer_variables = state

        def loss_fn(trainable, non_trainable):
            outputs, non_trainable = self.model.stateless_call(trainable, non_trainable, images, training=True)
            parts = [self.losses[name](labels[name], outputs[name]) for name in self.names]
            if self.weights is None:
                return parts[0], (non_trainable, parts, outputs)
            total = sum(ops.multiply(part, self.weights[name]) for name, part in zip(self.names, parts))
            return total, (non_trainable, parts, outputs)

        (loss, (non_trainable, parts, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable)
        trainable, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, grads, trainable)
        figures = [loss, *parts] if len(parts) > 1 else [loss]
        if self.classifier:
            predicted = jnp.argmax(outputs[CLASSIFIER_OUTPUT], axis=-1)
            figures.append(jnp.sum(predicted == labels[CLASSIFIER_OUTPUT]))
        return (trainable, non_trainable, optimizer_variables), jnp.stack([jnp.float32(f) for f in figures])

    def _seed_epoch(self, state, images, labels, order, crops, learning_rate):
        """One seed's epoch: a scan of `_step` over its (steps, batch) index table (and crops)."""
        trainable, non_trainable, optimizer_variables = state
        optimizer_variables = list(optimizer_variables)
        optimizer_variables[self.lr_index] = learning_rate.astype(optimizer_variables[self.lr_index].dtype)

        def step(carry, batch):
            index, crop = batch
            x = images[index] if crop is None else crop_flip(images[index], crop, self.pad, xp=jnp)
            return self._step(carry, x, {name: labels[name][index] for name in self.names})

        unroll = self.block is not None  # a block of steps per dispatch: no loop in the program (see the module doc)
        return jax.lax.scan(step, (trainable, non_trainable, optimizer_variables), (order, crops),
                            unroll=order.shape[0] if unroll else 1)

    def epoch(self, state, order, crops, learning_rate):
        """Every seed's epoch in one call: order (S, steps, batch) int32, crops (S, steps, batch, 3) or None.

        Returns the new (donated) state and each seed's epoch logs, as `fit` reports them.
        """
        steps, block, parts = order.shape[1], self.block or order.shape[1], []
        for start in range(0, steps, block):  # one dispatch per block (the whole epoch unless `block`)
            crop = None if crops is None else jnp.asarray(crops[:, start:start + block])
            state, figures = self._epoch(state, self.images, self.labels, jnp.asarray(order[:, start:start + block]),
                                         crop, jnp.float32(learning_rate))
            parts.append(figures)
        figures = np.asarray(jnp.concatenate(parts, axis=1), np.float64)  # (S, steps, figures): one host sync
        logs = []
        for seed_figures in figures:
            means = seed_figures.mean(axis=0)
            if self.classifier:  # correct predictions over every example of the epoch
                means[-1] = seed_figures[:, -1].sum() / (order.shape[1] * order.shape[2])
            logs.append({name: float(np.float32(value)) for name, value in zip(self.log_names, means)})
        return state, logs

    def _program(self, kind, per_seed_index):
        """A compiled evaluation over index chunks: `kind` "clusters" (argmax of fine_fc3) or "validation"."""
        key = (kind, per_seed_index)
        if key not in self._outputs:
            fn = functools.partial(self._seed_evaluation, kind)
            self._outputs[key] = jax.jit(self._over_seeds(fn, (0, None, None, 0 if per_seed_index else None)))
        return self._outputs[key]

    def _seed_evaluation(self, kind, state, images, labels, chunks):
        trainable, non_trainable, _ = state

        def chunk(index):
            outputs, _ = self.model.stateless_call(trainable, non_trainable, images[index], training=False)
            if kind == "clusters":
                return jnp.argmax(outputs[CLUSTER_OUTPUT], axis=-1)
            probabilities, truth = outputs[CLASSIFIER_OUTPUT], labels[index]
            per_example = self.losses[CLASSIFIER_OUTPUT].call(truth, probabilities)
            return jnp.stack([jnp.float32(per_example), jnp.float32(jnp.argmax(probabilities, -1) == truth)])

        return jax.lax.map(chunk, chunks)

    def evaluate(self, kind, state, images, index, labels=None):
        """Every seed's clusters (S, M) or (per-example loss, correct) (S, 2, M) of `images[index]`, without
        training; `index` (M,) shared or (S, M) one per seed, run in chunks of `PREDICT_BATCH`."""
        index = np.asarray(index, np.int32)
        count = index.shape[-1]
        padded = -(-count // PREDICT_BATCH) * PREDICT_BATCH
        index = np.pad(index, [(0, 0)] * (index.ndim - 1) + [(0, padded - count)])
        chunks = index.reshape(index.shape[:-1] + (-1, PREDICT_BATCH))
        out = self._program(kind, index.ndim == 2)(state, images, labels, jnp.asarray(chunks))
        out = np.asarray(out)  # (S, C, chunk) or (S, C, 2, chunk)
        if kind == "clusters":
            return out.reshape(out.shape[0], -1)[:, :count]
        return np.moveaxis(out, 2, 1).reshape(out.shape[0], 2, -1)[:, :, :count]
