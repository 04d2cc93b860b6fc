"""The pairwise losses the benchmarks time, in keras.ops only (TensorFlow or JAX backend).

ours: `PairwiseKLLoss`; floor: one N x K x N product plus one elementwise pass over (N, N);
naive: the same loss as ours with KL from an explicit (N, N, K) tensor; mcl: `PairwiseMCLLoss`, the
second criterion, against the same floor.
"""

import numpy as np
from keras import ops

from keras_cwsn.losses import EPSILON, PairwiseKLLoss, PairwiseMCLLoss

MARGIN = 2.0


def ours_loss():
    loss = PairwiseKLLoss(margin=MARGIN, check_finite=False)
    return lambda labels, logits: loss(labels, logits)


def mcl_loss():
    loss = PairwiseMCLLoss(check_finite=False)
    return lambda labels, logits: loss(labels, logits)


def floor_loss(labels, logits):
    """One N x K x N product (target side detached) and one fused elementwise pass over (N, N)."""
    del labels
    gram = ops.matmul(ops.stop_gradient(logits), ops.transpose(logits))
    return ops.mean(ops.relu(MARGIN - gram))


def naive_loss(labels, logits):
    """The same loss with KL from an explicit (N, N, K) tensor."""
    log_p = ops.maximum(ops.log_softmax(logits, axis=-1), np.log(EPSILON).astype("float32"))
    log_t = ops.stop_gradient(log_p)
    t = ops.exp(log_t)
    kl = ops.sum(t[:, None, :] * (log_t[:, None, :] - log_p[None, :, :]), axis=-1)
    similar = ops.cast(ops.equal(labels[:, None], labels[None, :]), "float32")
    return ops.mean(similar * kl + (1.0 - similar) * ops.relu(MARGIN - kl))
