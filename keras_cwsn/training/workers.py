"""What the workers of a run agree on, in one place for the protocol and the resume policy.

Under a tf.distribute strategy every worker must take the same branch (resume or not, from which
epoch); with no strategy (JAX, or one device) this process decides alone. `distribute` imports
TensorFlow, so it is only imported when there is a strategy.
"""


def agree_min(strategy, value):
    """The smallest `value` over every worker (the value itself without a strategy)."""
    if strategy is None:
        return value
    from keras_cwsn import distribute

    return distribute.agree_min(strategy, value)


def num_workers(strategy):
    """Processes taking part in the run (1 without a strategy)."""
    if strategy is None:
        return 1
    from keras_cwsn import distribute

    return distribute.num_workers(strategy)


def num_replicas(strategy):
    """Replicas the global batch is split over (1 without a strategy)."""
    return strategy.num_replicas_in_sync if strategy is not None else 1
