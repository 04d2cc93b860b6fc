"""Pairwise clustering criteria computed from in-batch pair labels.

- KCL, the pairwise KL-divergence contrastive loss (Hsu & Kira 2015) that Cluster-based Warm-Start
  Nets use: `PairwiseKLLoss`. Paper: https://openreview.net/forum?id=SkNXwJ-Rb (Eq. 2-4); reference:
  Hsu & Kira, arXiv:1511.06321.
- MCL, Meta Classification Likelihood (Hsu, Lv, Schlosser, Odom & Kira, "Multi-class classification
  without multi-class labels", ICLR 2019, https://openreview.net/forum?id=SJzR2iRcK7): the binary
  cross-entropy of the inner product of two softmax outputs against the pair's similarity:
  `PairwiseMCLLoss`.

Both take the same labels, mask the same unknown pairs, reduce to the mean over the N^2 ordered
pairs, and handle several replicas the same way; `pairwise_loss(criterion)` builds either by name.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_cwsn.constants import CRITERIA

EPSILON = 1e-7


def pairwise_similarity(y_true, num_examples=None, who="PairwiseKLLoss"):
    """Turn labels (N,) / (N, 1) or an (N, N) constraint matrix into (similar, valid) float32 matrices.

    Labels: `similar[i, j] = 1` where labels are equal; every pair is valid (`valid` is None, which
    saves the masking passes). Constraint matrix: 1 similar, 0 dissimilar, -1 unknown (not valid,
    masked out of the mean). `who` names the loss in error messages.
    """
    y_true = ops.convert_to_tensor(y_true)
    rank = len(y_true.shape)
    if rank == 2 and y_true.shape[-1] == 1:
        y_true = ops.squeeze(y_true, axis=-1)
        rank = 1
    if rank == 1:
        if num_examples is not None and y_true.shape[0] is not None and y_true.shape[0] != num_examples:
            raise ValueError(
                f"{who}: y_true has {y_true.shape[0]} labels for {num_examples} predictions. "
                f"Received: y_true.shape={tuple(y_true.shape)}"
            )
        labels = ops.cast(y_true, "float32")
        similar = ops.cast(ops.equal(labels[:, None], labels[None, :]), "float32")
        return similar, None
    if rank == 2:
        rows, cols = y_true.shape
        if rows is not None and cols is not None and rows != cols:
            raise ValueError(
                f"{who}: a pairwise constraint matrix must be N x N. "
                f"Received: y_true.shape={tuple(y_true.shape)}"
            )
        if num_examples is not None and rows is not None and rows != num_examples:
            raise ValueError(
                f"{who}: constraint matrix is {rows} x {cols} for {num_examples} predictions."
            )
        constraints = ops.cast(y_true, "float32")
        valid = ops.cast(ops.greater_equal(constraints, 0.0), "float32")
        similar = ops.cast(ops.equal(constraints, 1.0), "float32")
        return similar, valid
    raise ValueError(
        f"{who}: y_true must be integer labels (N,) or an N x N constraint matrix. "
        f"Received rank {rank}: y_true.shape={tuple(y_true.shape)}"
    )


def _normalized(probs):
    """Probabilities (N, K) rescaled to sum to 1 per row (a row of zeros stays zero)."""
    return probs / ops.maximum(ops.sum(probs, axis=-1, keepdims=True), EPSILON)


def _predictions(y_pred, who):
    """y_pred as a rank-2 tensor (N, K), or a ValueError naming the loss."""
    y_pred = ops.convert_to_tensor(y_pred)
    if len(y_pred.shape) != 2:
        raise ValueError(f"{who}: y_pred must be (N, K). Received: y_pred.shape={tuple(y_pred.shape)}")
    return y_pred


def _mean_over_pairs(pair_loss, valid):
    """Per-anchor values (N,) of an (N, N) pair loss, whose mean is its mean over the valid ordered pairs.

    `valid` None (labels): all N^2 pairs count; else a 0/1 mask, and a batch without a valid pair
    gives zeros, not NaN.
    """
    num_rows = ops.cast(ops.shape(pair_loss)[0], "float32")
    if valid is None:
        return ops.sum(pair_loss, axis=-1) / num_rows
    scale = ops.divide_no_nan(num_rows, ops.sum(valid))
    return ops.sum(pair_loss * valid, axis=-1) * scale


def pairwise_kl_divergence(y_pred, from_logits=True):
    """All-pairs KL[i, j] = KL(stop_gradient(P_i) || P_j) for a batch of predictions, shape (N, N).

    One (N, K) x (K, N) matrix product, never an (N, N, K) tensor:
    `KL = rowsum(T * log T)[:, None] - T @ log(P)^T` with `T = stop_gradient(P)`.
    Computed in float32 whatever the input dtype; log P is clamped at log(eps) so that
    saturated softmaxes (|logit| ~ 1e4, float16) stay finite.
    """
    y_pred = ops.cast(y_pred, "float32")
    if from_logits:
        log_p = ops.log_softmax(y_pred, axis=-1)
    else:
        log_p = ops.log(ops.clip(_normalized(y_pred), EPSILON, 1.0))
    log_p = ops.maximum(log_p, math.log(EPSILON))
    log_t = ops.stop_gradient(log_p)
    t = ops.exp(log_t)
    neg_entropy = ops.sum(t * log_t, axis=-1)
    return neg_entropy[:, None] - ops.matmul(t, ops.transpose(log_p))


def pairwise_kl_loss(y_true, y_pred, margin=2.0, from_logits=True):
    """Per-anchor pairwise KL contrastive loss, shape (N,).

    Args:
        y_true: labels (N,) or (N, 1), or an (N, N) constraint matrix (1 / 0 / -1 unknown).
        y_pred: (N, K) logits (or probabilities with `from_logits=False`).
        margin: float. Hinge margin for dissimilar pairs. Defaults to 2.0.
        from_logits: bool. Whether `y_pred` are logits. Defaults to True.

    Returns:
        (N,) values whose mean is the mean of
        `S_ij * KL_ij + (1 - S_ij) * max(0, margin - KL_ij)` over the valid ordered pairs,
        so that Keras's `sum_over_batch_size` reduction yields the paper's loss.
    """
    y_pred = _predictions(y_pred, "PairwiseKLLoss")
    similar, valid = pairwise_similarity(y_true, num_examples=y_pred.shape[0])
    kl = pairwise_kl_divergence(y_pred, from_logits=from_logits)
    hinge = ops.relu(margin - kl)
    pair_loss = hinge + similar * (kl - hinge)  # S * KL + (1 - S) * hinge, one pass fewer
    return _mean_over_pairs(pair_loss, valid)


def pairwise_same_cluster_probability(y_pred, from_logits=True):
    """All-pairs s[i, j] = sum_k P_ik P_jk, the probability that i and j fall in the same cluster, (N, N).

    One (N, K) x (K, N) matrix product `P @ P^T`, never an (N, N, K) tensor, in float32 whatever the
    input dtype. Both sides carry gradient (MCL detaches neither).
    """
    y_pred = ops.cast(y_pred, "float32")
    probs = ops.softmax(y_pred, axis=-1) if from_logits else _normalized(y_pred)
    return ops.matmul(probs, ops.transpose(probs))


def pairwise_mcl_loss(y_true, y_pred, from_logits=True):
    """Per-anchor Meta Classification Likelihood loss (Hsu et al., ICLR 2019), shape (N,).

    Args:
        y_true: labels (N,) or (N, 1), or an (N, N) constraint matrix (1 / 0 / -1 unknown).
        y_pred: (N, K) logits (or probabilities with `from_logits=False`).
        from_logits: bool. Whether `y_pred` are logits. Defaults to True.

    Returns:
        (N,) values whose mean is the mean of the pairs' binary cross-entropy
        `-[S_ij log s_ij + (1 - S_ij) log(1 - s_ij)]`, `s_ij = P_i . P_j`, over the valid ordered
        pairs (the diagonal included, as in the reference implementation). `s` is clamped to
        [eps, 1 - eps] before the log, so saturated softmaxes stay finite.
    """
    y_pred = _predictions(y_pred, "PairwiseMCLLoss")
    similar, valid = pairwise_similarity(y_true, num_examples=y_pred.shape[0], who="PairwiseMCLLoss")
    s = ops.clip(pairwise_same_cluster_probability(y_pred, from_logits=from_logits), EPSILON, 1.0 - EPSILON)
    likelihood = 1.0 - similar + (2.0 * similar - 1.0) * s  # s where similar, 1 - s where not: one log
    return -_mean_over_pairs(ops.log(likelihood), valid)  # negated per anchor (N,), not per pair (N, N)


def _is_concrete(x):
    """Whether `x` holds values now (eager), rather than being traced into a compiled function."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    return True


def _check_finite(y_pred, who="PairwiseKLLoss"):
    """Raise on NaN/inf logits when running eagerly (traced graphs are guarded by the training callbacks)."""
    if not _is_concrete(y_pred):
        return
    values = ops.convert_to_numpy(y_pred)
    if not np.all(np.isfinite(values)):
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise ValueError(f"{who} received {bad} non-finite values (NaN or inf) in y_pred.")


def gather_global_batch(y_true, y_pred):
    """All-gather labels and predictions from every replica, so that the loss sees all pairs of the global batch.

    Only under a TensorFlow `tf.distribute` replica context with more than one replica (model.fit
    under MirroredStrategy / MultiWorkerMirroredStrategy); everywhere else the inputs come back
    unchanged and TensorFlow is not imported. `all_gather` is differentiable: its gradient
    sum-all-reduces the upstream gradients and hands each replica the slice of its own examples.
    Each replica then computes the whole batch's loss L; Keras divides it by the number of
    replicas R (`sum_over_batch_size`) and sums the replicas' weight gradients, which gives
    R * (1/R) * dL = dL: the single-device gradient of the single-device loss.

    Returns:
        (y_true, y_pred, num_replicas).
    """
    if keras.backend.backend() != "tensorflow":
        return y_true, y_pred, 1
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:  # cross-replica context or a single replica
        return y_true, y_pred, 1
    return context.all_gather(y_true, axis=0), context.all_gather(y_pred, axis=0), context.num_replicas_in_sync


class _PairwiseLoss(keras.losses.Loss):
    """What the pairwise criteria share: the eager finite check, the global-batch all-gather and the
    replica scaling of `reduction="sum"`. Subclasses implement `pairwise_values(y_true, y_pred) -> (N,)`.
    """

    def __init__(self, from_logits, check_finite, reduction, name, dtype):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)
        self.check_finite = bool(check_finite)

    def pairwise_values(self, y_true, y_pred):
        raise NotImplementedError

    def call(self, y_true, y_pred):
        if self.check_finite:
            _check_finite(y_pred, type(self).__name__)
        y_true, y_pred, num_replicas = gather_global_batch(y_true, y_pred)
        values = self.pairwise_values(y_true, y_pred)
        if num_replicas > 1 and self.reduction == "sum":
            # Every replica holds the whole batch's sum; Keras adds the replicas' gradients up.
            values = values / num_replicas
        return values

    def get_config(self):
        config = super().get_config()
        config.update(from_logits=self.from_logits, check_finite=self.check_finite)
        return config


@keras.saving.register_keras_serializable(package="keras_cwsn")
class PairwiseKLLoss(_PairwiseLoss):
    """All-pairs KL-divergence contrastive loss over a batch, from in-batch label equality.

    For a batch of N outputs, every ordered pair (i, j) contributes
    `KL(P_i || P_j)` if similar and `max(0, margin - KL(P_i || P_j))` if not, with the target
    side P_i stop-gradiented (enumerating both orders gives the paper's symmetric Eq. 2).
    The result is the mean over all N^2 ordered pairs (unknown pairs masked out).

    Args:
        margin: float. Hinge margin for dissimilar pairs. Defaults to 2.0.
        from_logits: bool. Whether predictions are logits. Defaults to True.
        check_finite: bool. Raise a clear error on NaN/inf predictions in eager calls. Defaults to True.

    Example:
    ```python
    loss = PairwiseKLLoss(margin=2.0)
    loss(np.array([0, 0, 1]), np.random.randn(3, 10))
    ```
    """

    def __init__(self, margin=2.0, from_logits=True, check_finite=True, reduction="sum_over_batch_size",
                 name="pairwise_kl", dtype=None):
        super().__init__(from_logits, check_finite, reduction, name, dtype)
        try:
            margin = float(margin)
        except (TypeError, ValueError):
            raise ValueError(f"PairwiseKLLoss: margin must be a number. Received: margin={margin!r}") from None
        if not math.isfinite(margin) or margin <= 0:
            raise ValueError(f"PairwiseKLLoss: margin must be positive and finite. Received: margin={margin}")
        self.margin = margin

    def pairwise_values(self, y_true, y_pred):
        return pairwise_kl_loss(y_true, y_pred, margin=self.margin, from_logits=self.from_logits)

    def get_config(self):
        config = super().get_config()
        config.update(margin=self.margin)
        return config


@keras.saving.register_keras_serializable(package="keras_cwsn")
class PairwiseMCLLoss(_PairwiseLoss):
    """Meta Classification Likelihood: all-pairs binary cross-entropy of "same cluster" over a batch.

    Hsu, Lv, Schlosser, Odom & Kira, "Multi-class classification without multi-class labels",
    ICLR 2019 (https://openreview.net/forum?id=SJzR2iRcK7). For a batch of N outputs with softmax
    P (N, K), the probability that i and j share a cluster is `s_ij = P_i . P_j` (one
    (N, K) x (K, N) product), and every ordered pair contributes
    `-[S_ij log s_ij + (1 - S_ij) log(1 - s_ij)]`. The result is the mean over all N^2 ordered
    pairs (unknown pairs masked out). No margin; the same labels as `PairwiseKLLoss`.

    Args:
        from_logits: bool. Whether predictions are logits. Defaults to True.
        check_finite: bool. Raise a clear error on NaN/inf predictions in eager calls. Defaults to True.

    Example:
    ```python
    loss = PairwiseMCLLoss()
    loss(np.array([0, 0, 1]), np.random.randn(3, 10))
    ```
    """

    def __init__(self, from_logits=True, check_finite=True, reduction="sum_over_batch_size",
                 name="pairwise_mcl", dtype=None):
        super().__init__(from_logits, check_finite, reduction, name, dtype)

    def pairwise_values(self, y_true, y_pred):
        return pairwise_mcl_loss(y_true, y_pred, from_logits=self.from_logits)


# The clusterer's criteria by name (constants.CRITERIA); only KCL takes a margin.
LOSSES = {"kcl": PairwiseKLLoss, "mcl": PairwiseMCLLoss}


def pairwise_loss(criterion="kcl", margin=2.0, **kwargs):
    """The pairwise loss named by `criterion`, as the training code builds it from the config.

    Args:
        criterion: str. "kcl" (`PairwiseKLLoss`, the paper's) or "mcl" (`PairwiseMCLLoss`). Defaults to "kcl".
        margin: float. KCL's hinge margin; MCL has none and ignores it. Defaults to 2.0.
        **kwargs: passed to the loss class (`from_logits`, `check_finite`, `reduction`, `name`).

    Example:
    ```python
    loss = pairwise_loss(config["criterion"], margin=config["margin"])
    ```
    """
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown criterion. Expected one of {', '.join(CRITERIA)}. Received: criterion={criterion!r}")
    if criterion == "kcl":
        kwargs["margin"] = margin
    return LOSSES[criterion](**kwargs)
