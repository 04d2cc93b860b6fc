"""Experiment configs: the paper's Appendix B settings as YAML files, validated on load.

A phase field (under `cluster:` / `classify:`) may be one value or a mapping variant -> value
(e.g. Birdsnap's clustering batch size is 1024 for A and 128 for B-D).
"""

import copy
import dataclasses
import functools
import math
import os

import yaml

from keras_cwsn.constants import (ARCHS, BATCHNORMS, CRITERIA, EVAL_SPLITS, HEADS, INITS, LAST_LAYER, MIN_INPUT_SIDE,
                                  NORMALIZATIONS, PHASES, PRECISIONS, STRATEGIES, WEIGHT_DECAY_MODES)
from keras_cwsn.data.registry import DATASETS, NETWORK_CONFIGS, get_dataset
from keras_cwsn.errors import UserError, did_you_mean
from keras_cwsn.variants import ALL_VARIANTS, CLASSIFIER_VARIANT

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(UserError):
    """A config that names an unknown key or holds a value of the wrong type or range."""


def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _non_negative_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _positive_number(v):
    return _non_negative_number(v) and v > 0


_REQUIRED = object()  # a key every config must give
_NEW = object()  # a key every run has had


@dataclasses.dataclass(frozen=True)
class Key:
    """Everything about one config key, so that a new key is one entry of `KEYS` (or `PHASE_KEYS`).

    Args:
        check: callable. Whether a value is valid.
        expected: str. What a valid value is, for the error message ("an integer >= 1").
        default: What a config without the key gets. Defaults to none: the key is required.
        before: The value runs had before the key existed: a saved config without it is read so
            (resuming, the results table). Defaults to none: every run has had the key.
        resumable: bool. Whether an unfinished run may be resumed with another value (e.g. more
            epochs, another machine's `data_dir`). Defaults to False.
        row: callable or None. value -> the results table's row-label suffix where the value is not
            the default (e.g. "mcl"): runs with another value get a row of their own. Defaults to None.
        clusterer_only: bool. With `row`: the setting concerns clusterers only, so `ce` rows leave it
            out. Defaults to False.
        hparam: callable or None. value -> its TensorBoard HParams value (str, int, float or bool);
            None: not an HParam. Defaults to None.
    """

    check: object
    expected: str
    default: object = _REQUIRED
    before: object = _NEW
    resumable: bool = False
    row: object = None
    clusterer_only: bool = False
    hparam: object = None


def _non_negative_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _name_or_none(v):
    return v is None or (isinstance(v, str) and bool(v))


def _image_size(v):
    return v is None or (_positive_int(v) and v >= 16) or (
        isinstance(v, list) and len(v) == 2 and all(_positive_int(s) and s >= 16 for s in v))


def _one_of(choices):
    return Key(lambda v: v in choices, f"one of {', '.join(choices)}")


def _flag(**fields):
    return Key(lambda v: isinstance(v, bool), "true or false", **fields)


def _mapping(expected, **fields):
    return Key(lambda v: isinstance(v, dict), expected, **fields)


def _with(key, **fields):
    return dataclasses.replace(key, **fields)


PHASE_KEYS = {
    "epochs": Key(_positive_int, "an integer >= 1", resumable=True, hparam=int),
    "batch_size": Key(_positive_int, "an integer >= 1", hparam=int),
    "learning_rate": Key(_positive_number, "a number > 0", resumable=True, hparam=float),
    "lr_milestones": Key(lambda v: isinstance(v, list) and all(_positive_int(m) for m in v), "a list of epochs >= 1",
                         resumable=True),
    "lr_factor": Key(lambda v: _positive_number(v) and v <= 1, "a number in (0, 1]", resumable=True),
    "momentum": Key(lambda v: _non_negative_number(v) and v < 1, "a number in [0, 1)"),
    "weight_decay": Key(_non_negative_number, "a number >= 0", hparam=float),
}
# The paper's settings are the defaults. Keys with a `row` are in the order their suffixes take in a row label.
KEYS = {
    "dataset": Key(lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}", hparam=str),
    "arch": Key(lambda v: v in ARCHS, f"one of {ARCHS}", hparam=str),
    "variant": Key(lambda v: v in ALL_VARIANTS, f"one of {ALL_VARIANTS}", default="D", hparam=str),
    "double": _flag(default=False, hparam=bool),
    "criterion": _with(_one_of(CRITERIA), default="kcl", before="kcl", row=str, clusterer_only=True, hparam=str),
    "margin": Key(_positive_number, "a number > 0", default=2.0, row=lambda v: f"margin-{v:g}", clusterer_only=True,
                  hparam=float),
    "head": _with(_one_of(HEADS), default="hungarian", row=lambda v: f"{v}-head", clusterer_only=True, hparam=str),
    "schedule_scale": Key(lambda v: _positive_number(v) and v <= 1, "a number in (0, 1]", default=1.0,
                          resumable=True, hparam=float),
    "eval_split": Key(lambda v: v == "auto" or v in EVAL_SPLITS, f"auto or one of {', '.join(EVAL_SPLITS)}",
                      default="auto", hparam=str),  # the HParam is the split "auto" resolved to
    "val_per_class": Key(_positive_int, "an integer >= 1", default=500),
    "data_dir": Key(lambda v: v is None or isinstance(v, str), "a folder path or null", default=None, resumable=True),
    # resumable: the file may move (another machine); its content must not (`check_resume_config`)
    "hierarchy": Key(_name_or_none, "a TSV/CSV file path or null", default=None, resumable=True),
    "fine_column": Key(_name_or_none, "a column name or null (the first)", default=None),
    "coarse_column": Key(_name_or_none, "a column name or null", default=None),
    # a size or normalisation other than the network's is a row of its own in the results tables
    "image_size": Key(_image_size, "null (the network's), a side >= 16 or [height, width]", default=None,
                      row=lambda v: f"{v}px" if isinstance(v, int) else f"{v[0]}x{v[1]}px"),
    "normalization": Key(lambda v: v is None or v in NORMALIZATIONS,
                         f"null (the network's) or one of {', '.join(NORMALIZATIONS)}", default=None,
                         row=lambda v: f"{v}-norm"),
    "xla": Key(lambda v: v == "auto" or isinstance(v, bool), "auto, true or false", default="auto", resumable=True),
    "weight_decay_mode": _with(_one_of(WEIGHT_DECAY_MODES), default="coupled", before="decoupled",
                               row=lambda v: f"{v}-wd", hparam=str),
    "init": _with(_one_of(INITS), default="torch", before="keras", row=lambda v: f"{v}-init", hparam=str),
    "batchnorm": _with(_one_of(BATCHNORMS), default="keras", before="keras", row=lambda v: f"{v}-bn", hparam=str),
    "alexnet_bn": _flag(default=False, before=False, row=lambda v: "alexnet-bn", hparam=bool),
    "precision": _with(_one_of(PRECISIONS), default="float32", hparam=str),
    "seed": Key(_non_negative_int, "an integer >= 0", default=0, hparam=int),
    "augment": _flag(default=False, row=lambda v: "augment"),
    "last_layer_weight_decay": _flag(default=True, before=True, row=lambda v: f"no-{LAST_LAYER}-wd", hparam=bool),
    "metrics_every": Key(_positive_int, "an integer >= 1", default=1, resumable=True),
    "steps_per_execution": Key(lambda v: v == "auto" or _positive_int(v), "auto or an integer >= 1", default="auto",
                               resumable=True),
    "metrics_sample": Key(_positive_int, "an integer >= 1", default=5000, resumable=True),
    "embedding_sample": Key(_non_negative_int, "an integer >= 0", default=500, resumable=True),
    "strategy": _with(_one_of(STRATEGIES), default="auto", resumable=True),
    "synthetic": _mapping("a mapping", default={}),
    "cluster": _mapping("a mapping of phase settings"),
    "classify": _mapping("a mapping of phase settings"),
}
TOP_SCHEMA = {name: (key.check, key.expected) for name, key in KEYS.items()}
PHASE_SCHEMA = {name: (key.check, key.expected) for name, key in PHASE_KEYS.items()}
DEFAULTS = {name: key.default for name, key in KEYS.items() if key.default is not _REQUIRED}
REQUIRED = tuple(name for name, key in KEYS.items() if key.default is _REQUIRED)
# What the code did before each of these keys existed: a saved config without the key ran that way (a run
# from before `weight_decay_mode` used Keras's decoupled decay). Resuming and the results table read old
# configs through this.
VALUES_BEFORE_THE_KEY = {name: key.before for name, key in KEYS.items() if key.before is not _NEW}
# Settings that may differ when an unfinished run is resumed (e.g. a lower learning rate after a
# divergence, more epochs, another machine); anything else must match the run's config.json.
RESUMABLE_CHANGES = tuple(name for name, key in KEYS.items() if key.resumable) + tuple(
    f"{phase}.{name}" for phase in PHASES for name, key in PHASE_KEYS.items() if key.resumable)
SYNTHETIC_SCHEMA = {
    "train_size": (_positive_int, "an integer >= 1"),
    "eval_size": (_positive_int, "an integer >= 1"),
    "num_coarse": (lambda v: _positive_int(v) and 2 <= v <= 4, "an integer in 2..4"),
    "fine_per_coarse": (lambda v: _positive_int(v) and 2 <= v <= 5, "an integer in 2..5"),
    "data_seed": (_non_negative_int, "an integer >= 0"),
    "noise": (_non_negative_number, "a number >= 0"),
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
    for required in REQUIRED:
        if required not in config:
            raise ConfigError(f"Config is missing the required key {required!r}.")
    _check(TOP_SCHEMA, config, "")
    _check(SYNTHETIC_SCHEMA, config["synthetic"], "synthetic.")
    if config["synthetic"] and config["dataset"] != "synthetic":  # it would be silently ignored
        raise ConfigError(f"Config key 'synthetic' applies to dataset 'synthetic' only; this config's dataset is "
                          f"{config['dataset']!r}. Remove the synthetic settings or use --dataset synthetic.")
    _check_data_keys(config)
    for phase in PHASES:
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
    if config.get("alexnet_bn") and config["arch"] != "alexnet":
        raise ConfigError(f"Config key 'alexnet_bn' applies to arch alexnet only; this config's arch is "
                          f"{config['arch']!r} (LeNet has BatchNorm already).")
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


@functools.lru_cache(maxsize=None)
def recipe_defaults(dataset, arch=None):
    """The paper's recipe for a dataset: its config file's top-level settings over `DEFAULTS` (cub42 and
    Birdsnap start AlexNet from Glorot's init, CIFAR-10 LeNet from PyTorch's); `DEFAULTS` for an unknown one."""
    try:
        settings = _read_file(default_config_path(dataset, arch)) or {}
    except UserError:
        settings = {}
    return {key: settings.get(key, default) for key, default in DEFAULTS.items()}


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
    for phase in PHASES:
        for key in config.get(phase) or {}:
            if key not in PHASE_SCHEMA:
                raise _unknown(key, PHASE_SCHEMA, f"{phase}.")
    # A hierarchy table names your own data, as `--hierarchy` alone does on the command line.
    name = config.get("dataset") or dataset or ("folder" if config.get("hierarchy") else "synthetic")
    if name not in DATASETS:  # named, with a suggestion, by validate
        return config
    base = _read_file(default_config_path(name, config.get("arch")))
    if name != base.get("dataset"):  # a dataset sharing another's settings file: not its embedded-data settings
        base.pop("synthetic", None)
    merged = {**base, **{k: v for k, v in config.items() if k not in PHASES}, "dataset": name}
    for phase in PHASES:
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
