"""Experiment configs: the paper's Appendix B settings as YAML files, validated on load.

A phase field (under `cluster:` / `classify:`) may be one value or a mapping variant -> value
(e.g. Birdsnap's clustering batch size is 1024 for A and 128 for B-D).
"""

import copy
import math
import os

import yaml

from keras_cwsn.constants import CRITERIA, EVAL_SPLITS, HEADS, NORMALIZATIONS, PHASES, PRECISIONS, STRATEGIES
from keras_cwsn.data.registry import DATASETS, NETWORK_CONFIGS, get_dataset
from keras_cwsn.errors import UserError, did_you_mean
from keras_cwsn.models import ALL_VARIANTS, ARCHS, BATCHNORMS, CLASSIFIER_VARIANT, INITS, MIN_INPUT_SIDE
from keras_cwsn.optimizers import WEIGHT_DECAY_MODES

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(UserError):
    """A config that names an unknown key or holds a value of the wrong type or range."""


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _non_negative_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _positive_number(v):
    return _non_negative_number(v) and v > 0


PHASE_SCHEMA = {
    "epochs": (_positive_int, "an integer >= 1"),
    "batch_size": (_positive_int, "an integer >= 1"),
    "learning_rate": (_positive_number, "a number > 0"),
    "lr_milestones": (lambda v: isinstance(v, list) and all(_positive_int(m) for m in v), "a list of epochs >= 1"),
    "lr_factor": (lambda v: _positive_number(v) and v <= 1, "a number in (0, 1]"),
    "momentum": (lambda v: _non_negative_number(v) and v < 1, "a number in [0, 1)"),
    "weight_decay": (_non_negative_number, "a number >= 0"),
}
TOP_SCHEMA = {
    "dataset": (lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}"),
    "arch": (lambda v: v in ARCHS, f"one of {ARCHS}"),
    "variant": (lambda v: v in ALL_VARIANTS, f"one of {ALL_VARIANTS}"),
    "double": (lambda v: isinstance(v, bool), "true or false"),
    "margin": (_positive_number, "a number > 0"),
    "criterion": (lambda v: v in CRITERIA, f"one of {', '.join(CRITERIA)}"),
    "head": (lambda v: v in HEADS, f"one of {', '.join(HEADS)}"),
    "schedule_scale": (lambda v: _positive_number(v) and v <= 1, "a number in (0, 1]"),
    "eval_split": (lambda v: v == "auto" or v in EVAL_SPLITS, f"auto or one of {', '.join(EVAL_SPLITS)}"),
    "val_per_class": (_positive_int, "an integer >= 1"),
    "data_dir": (lambda v: v is None or isinstance(v, str), "a folder path or null"),
    "hierarchy": (lambda v: v is None or (isinstance(v, str) and bool(v)), "a TSV/CSV file path or null"),
    "fine_column": (lambda v: v is None or (isinstance(v, str) and bool(v)), "a column name or null (the first)"),
    "coarse_column": (lambda v: v is None or (isinstance(v, str) and bool(v)), "a column name or null"),
    "image_size": (lambda v: v is None or (_positive_int(v) and v >= 16) or (
        isinstance(v, list) and len(v) == 2 and all(_positive_int(s) and s >= 16 for s in v)),
        "null (the network's), a side >= 16 or [height, width]"),
    "normalization": (lambda v: v is None or v in NORMALIZATIONS, f"null (the network's) or one of "
                                                                   f"{', '.join(NORMALIZATIONS)}"),
    "xla": (lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"),
    "weight_decay_mode": (lambda v: v in WEIGHT_DECAY_MODES, f"one of {', '.join(WEIGHT_DECAY_MODES)}"),
    "init": (lambda v: v in INITS, f"one of {', '.join(INITS)}"),
    "last_layer_weight_decay": (lambda v: isinstance(v, bool), "true or false"),
    "batchnorm": (lambda v: v in BATCHNORMS, f"one of {', '.join(BATCHNORMS)}"),
    "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "augment": (lambda v: isinstance(v, bool), "true or false"),
    "metrics_every": (_positive_int, "an integer >= 1"),
    "steps_per_execution": (lambda v: v == "auto" or _positive_int(v), "auto or an integer >= 1"),
    "metrics_sample": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "embedding_sample": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "strategy": (lambda v: v in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
    "synthetic": (lambda v: isinstance(v, dict), "a mapping"),
    "cluster": (lambda v: isinstance(v, dict), "a mapping of phase settings"),
    "classify": (lambda v: isinstance(v, dict), "a mapping of phase settings"),
}
SYNTHETIC_SCHEMA = {
    "train_size": (_positive_int, "an integer >= 1"),
    "eval_size": (_positive_int, "an integer >= 1"),
    "num_coarse": (lambda v: _positive_int(v) and 2 <= v <= 4, "an integer in 2..4"),
    "fine_per_coarse": (lambda v: _positive_int(v) and 2 <= v <= 5, "an integer in 2..5"),
    "data_seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "noise": (_non_negative_number, "a number >= 0"),
}
DEFAULTS = {
    "variant": "D", "double": False, "margin": 2.0, "criterion": "kcl", "head": "hungarian", "schedule_scale": 1.0,
    "eval_split": "auto", "val_per_class": 500, "data_dir": None, "hierarchy": None, "fine_column": None,
    "coarse_column": None, "image_size": None, "normalization": None, "xla": "auto", "precision": "float32",
    "seed": 0, "augment": False, "metrics_every": 1, "steps_per_execution": "auto",
    "metrics_sample": 5000, "weight_decay_mode": "coupled", "init": "torch", "batchnorm": "keras",
    "last_layer_weight_decay": True,
    "embedding_sample": 500,
    "strategy": "auto", "synthetic": {},
}


def _unknown(key, known, where):
    close = did_you_mean(key, known)
    hint = f" Did you mean {close!r}?" if close else ""
    phase_key = did_you_mean(key, PHASE_SCHEMA) if not close and where == "" else None
    if phase_key:  # a phase setting given at the top: it lives under each phase
        hint = f" Did you mean 'cluster.{phase_key}' or 'classify.{phase_key}' (a setting of each phase)?"
    return ConfigError(f"Unknown config key '{where}{key}'.{hint} Known keys: {', '.join(sorted(known))}.")


def _check(schema, mapping, where):
    for key, value in mapping.items():
        if key not in schema:
            raise _unknown(key, schema, where)
        ok, expected = schema[key]
        if not ok(value):
            raise ConfigError(f"Config key '{where}{key}' must be {expected}. Received: {value!r}")


def validate(config):
    """Check every key and value; return a completed copy (defaults filled). Raises ConfigError."""
    if not isinstance(config, dict):
        raise ConfigError(f"A config must be a mapping of keys to values. Received: {type(config).__name__}")
    config = copy.deepcopy(config)
    for key, value in DEFAULTS.items():
        config.setdefault(key, copy.deepcopy(value))
    for required in ("dataset", "arch", "cluster", "classify"):
        if required not in config:
            raise ConfigError(f"Config is missing the required key {required!r}.")
    _check(TOP_SCHEMA, config, "")
    _check(SYNTHETIC_SCHEMA, config["synthetic"], "synthetic.")
    if config["synthetic"] and config["dataset"] != "synthetic":  # it would be silently ignored
        raise ConfigError(f"Config key 'synthetic' applies to dataset 'synthetic' only; this config's dataset is "
                          f"{config['dataset']!r}. Remove the synthetic settings or use --dataset synthetic.")
    _check_data_keys(config)
    for phase in ("cluster", "classify"):
        for key in config[phase]:  # unknown keys first: a misspelt key is also a missing one
            if key not in PHASE_SCHEMA:
                raise _unknown(key, PHASE_SCHEMA, f"{phase}.")
        missing = set(PHASE_SCHEMA) - set(config[phase])
        if missing:
            raise ConfigError(f"Config section {phase!r} is missing {sorted(missing)}.")
        for key, value in config[phase].items():
            values = value if isinstance(value, dict) else {"*": value}
            for variant, v in values.items():
                if variant != "*" and variant not in ALL_VARIANTS:
                    raise ConfigError(f"Config key {phase}.{key} names unknown variant {variant!r}; "
                                      f"expected one of {ALL_VARIANTS}.")
                _check({key: PHASE_SCHEMA[key]}, {key: v}, f"{phase}.")
    return config


def _check_data_keys(config):
    """Keys that apply to some datasets only: set on another they would be silently ignored."""
    source = get_dataset(config["dataset"]).source
    table_keys = [k for k in ("hierarchy", "fine_column", "coarse_column") if config[k] is not None]
    if table_keys and source != "folder":
        raise ConfigError(f"Config key(s) {', '.join(table_keys)} apply to folder datasets (your own images with a "
                          f"hierarchy table); this config's dataset is {config['dataset']!r}. Use --dataset folder "
                          f"(or just --hierarchy TABLE with --data-dir DIR).")
    input_keys = [k for k in ("image_size", "normalization") if config[k] is not None]
    if input_keys and source == "synthetic":
        raise ConfigError(f"Config key(s) {', '.join(input_keys)} don't apply to the synthetic dataset (32x32, YUV).")
    size = config["image_size"]
    if size is not None and min([size] if isinstance(size, int) else size) < MIN_INPUT_SIDE[config["arch"]]:
        raise ConfigError(f"Config key 'image_size' is too small for {config['arch']}: it needs a side of at least "
                          f"{MIN_INPUT_SIDE[config['arch']]}. Received: {size!r}")
    if config["dataset"] == "folder" and config["hierarchy"] is None:
        raise ConfigError("Dataset 'folder' needs a hierarchy table mapping each class folder to its coarse class: "
                          "pass --hierarchy TABLE.tsv (or set `hierarchy:` in the config).")


def default_config_path(dataset, arch=None):
    """The dataset's config file in `configs/`; a folder dataset takes its network's (`NETWORK_CONFIGS`)."""
    try:
        config_file = get_dataset(dataset).config_file
    except UserError as e:
        raise ConfigError(str(e)) from None
    if config_file is None:
        if arch is not None and arch not in NETWORK_CONFIGS:
            raise ConfigError(f"Unknown arch. Expected one of {', '.join(NETWORK_CONFIGS)}. Received: arch={arch!r}")
        config_file = NETWORK_CONFIGS[arch or "alexnet"]
    return os.path.join(CONFIG_DIR, config_file)


def load_config(path=None, dataset=None, overrides=None):
    """Read and validate a YAML/JSON config file (or the dataset's default one).

    Args:
        path: str or None. The file; None takes the dataset's default (`default_config_path`), with
            `dataset` put in: a dataset may share another's settings file (cub42 runs Birdsnap34's
            Appendix B settings, a folder dataset its network's).
        overrides: dict or None. Top-level keys laid over the file before it is validated (e.g.
            `arch`, `hierarchy`: a folder dataset is valid only with its table).
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    given = path is not None
    if path is None:
        path = default_config_path(dataset, overrides.get("arch"))
        overrides = {"dataset": dataset, **overrides}
    if not os.path.isfile(path):
        raise ConfigError(f"Config file not found: {path}")
    config = _read_file(path)
    if overrides and isinstance(config, dict):
        config.update(overrides)
    if given and isinstance(config, dict):
        config = _over_defaults(config, dataset)
    return validate(config)


def _read_file(path):
    with open(path) as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            raise ConfigError(f"Config file {path} is not valid YAML/JSON: {where}"
                              f"{problem or str(e).splitlines()[0]}") from None


def _over_defaults(config, dataset=None):
    """A config file laid over its dataset's default config: a file may set only what it changes.

    Unknown keys are named first (with a suggestion), so a typo is not reported as a missing key.
    """
    for key in config:
        if key not in TOP_SCHEMA:
            raise _unknown(key, TOP_SCHEMA, "")
    for phase in ("cluster", "classify"):
        for key in config.get(phase) or {}:
            if key not in PHASE_SCHEMA:
                raise _unknown(key, PHASE_SCHEMA, f"{phase}.")
    name = config.get("dataset") or dataset or "synthetic"
    if name not in DATASETS:  # named, with a suggestion, by validate
        return config
    base = _read_file(default_config_path(name, config.get("arch")))
    if name != base.get("dataset"):  # a dataset sharing another's settings file: not its embedded-data settings
        base.pop("synthetic", None)
    merged = {**base, **{k: v for k, v in config.items() if k not in ("cluster", "classify")}, "dataset": name}
    for phase in ("cluster", "classify"):
        merged[phase] = dict(base.get(phase) or {}, **(config.get(phase) or {}))
    return merged


def set_value(config, dotted_key, value):
    """Override one (possibly nested, dot-separated) key, e.g. `cluster.weight_decay`; returns a new config."""
    config = copy.deepcopy(config)
    *parents, last = dotted_key.split(".")
    node = config
    for p in parents:
        if not isinstance(node.get(p), dict):
            close = did_you_mean(p, [k for k, v in node.items() if isinstance(v, dict)])
            hint = f" Did you mean {close!r}?" if close else ""
            raise ConfigError(f"Cannot set {dotted_key!r}: {p!r} is not a section of the config.{hint}")
        node = node[p]
    node[last] = value
    return validate(config)


def run_phases(config):
    """The phases a run trains: both, or `classify` alone for the `ce` baseline (it has no clusterer)."""
    return ("classify",) if config["variant"] == CLASSIFIER_VARIANT else PHASES


def phase_settings(config, phase):
    """The settings of one phase for the config's variant, scaled by `schedule_scale`.

    Epochs and learning-rate milestones are multiplied by `schedule_scale` and rounded (at least 1),
    so a shortened schedule keeps the paper's shape.
    """
    variant = config["variant"]
    settings = {}
    for key, value in config[phase].items():
        if isinstance(value, dict):
            if variant not in value:
                raise ConfigError(f"Config key {phase}.{key} has no value for variant {variant!r}.")
            value = value[variant]
        settings[key] = value
    scale = config["schedule_scale"]
    settings["epochs"] = max(1, round(settings["epochs"] * scale))
    settings["lr_milestones"] = sorted({max(1, round(m * scale)) for m in settings["lr_milestones"]})
    return settings


def learning_rate_at(epoch, settings):
    """Step schedule: the base rate times lr_factor for every milestone reached (epochs counted from 0)."""
    drops = sum(1 for m in settings["lr_milestones"] if epoch >= m)
    return settings["learning_rate"] * settings["lr_factor"] ** drops
