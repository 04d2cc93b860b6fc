"""The paper's protocol, in modules with one job each.

- `protocol`: `run(config, output_dir) -> figures`, the phases in the paper's order; `run_seeds`.
- `inputs`: the splits, preprocessed once, and each epoch's seeded batches.
- `recipe`: the compile recipe of a variant (losses, weights, optimizer, XLA, steps per execution).
- `callbacks`: divergence stop, learning-rate schedule, epoch timer, resumable warm start.
- `checkpoint`: per-epoch checkpoints that survive SIGKILL.
- `resume`: whether and from where a run in an output folder goes on.
- `workers`: what every worker agrees on (this process alone without tf.distribute).
- `records`: config, provenance, projector and seed summaries written beside the figures.
- `seeds`: derived seeds and each epoch's order (and crops, with `augment`).
- `together`: several seeds of one setting trained together on JAX (`run_seeds`' default there);
  `stacked`: its compiled, vmapped epoch program (imports JAX).

Names are imported on first use, so `keras_cwsn.training.recipe` loads without the rest.
"""

from keras_cwsn._lazy import lazy_getattr
from keras_cwsn.errors import RunError  # noqa: F401 (re-exported)

_EXPORTS = {
    "protocol": ("run", "run_seeds", "cluster_phase", "classify_phase", "fit_phase"),
    "together": ("run_together",),
    "inputs": ("RunData", "load_run_data", "load_training_split", "training_data", "steps_per_epoch",
               "preprocess_split", "epoch_batches"),
    "recipe": ("build_optimizer", "compile_model", "variant_losses", "use_xla", "steps_per_execution"),
    "callbacks": ("StopOnNonFinite", "StepLearningRate", "EpochTimer", "ResumableWarmStart"),
    "checkpoint": ("Checkpoint",),
    "resume": ("RESUMABLE_CHANGES", "check_output_dir", "check_resume_config", "config_changes",
               "read_resume_epoch", "truncate_history"),
    "records": ("summarize", "versions", "git_info"),
    "seeds": ("derived_seed", "epoch_order", "epoch_crops", "seed_everything"),
}
__all__ = ["RunError"] + [name for names in _EXPORTS.values() for name in names]

__getattr__ = lazy_getattr("keras_cwsn.training", _EXPORTS)
