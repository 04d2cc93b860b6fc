"""Tests for keras_cwsn.config: every shipped config loads with the paper's Appendix B values, every bad
value is refused with a message naming its key, and the schedule (`phase_settings`, `learning_rate_at`)
gives the epochs, milestones and rates worked out by hand below.
"""

import os

import pytest

from conftest import ROOT
from keras_cwsn.config import (
    ConfigError,
    learning_rate_at,
    load_config,
    phase_settings,
    set_value,
    validate,
)

CONFIGS = os.path.join(ROOT, "configs")


def _base():
    return load_config(dataset="synthetic")


# ---------------------------------------------------------------------------------------------
# The shipped configs: Appendix B (Tables 6-10) pinned value by value
# ---------------------------------------------------------------------------------------------

CIFAR10_PHASE = {"epochs": 95, "batch_size": 16, "learning_rate": 0.01, "lr_milestones": [25, 50, 75, 100],
                 "lr_factor": 0.5, "momentum": 0.9, "weight_decay": 0.0005}


@pytest.mark.parametrize("variant", ["A", "B", "C", "D"])
@pytest.mark.parametrize("phase", ["cluster", "classify"])
def test_cifar10_is_appendix_b_for_every_variant_and_phase(variant, phase):
    config = set_value(load_config(dataset="cifar10"), "variant", variant)
    assert (config["dataset"], config["arch"], config["margin"]) == ("cifar10", "lenet", 2.0)
    assert phase_settings(config, phase) == CIFAR10_PHASE


def test_cifar100_loads_with_the_cifar10_settings():
    config = load_config(dataset="cifar100")
    assert (config["dataset"], config["arch"]) == ("cifar100", "lenet")
    for phase in ("cluster", "classify"):
        assert phase_settings(config, phase) == CIFAR10_PHASE


@pytest.mark.parametrize("dataset", ["birdsnap34", "birdsnap"])
@pytest.mark.parametrize("variant, batch, decay", [("A", 1024, 0.001), ("B", 128, 0.0005), ("C", 128, 0.0005),
                                                    ("D", 128, 0.0005)])
def test_birdsnap_clustering_batch_and_decay_per_variant(dataset, variant, batch, decay):
    """Appendix B: Birdsnap34's clusterer uses batch 1024 / weight decay 0.001 for A, 128 / 0.0005 for B-D."""
    config = set_value(load_config(dataset=dataset), "variant", variant)
    assert (config["dataset"], config["arch"], config["margin"], config["eval_split"]) == (
        dataset, "alexnet", 2.0, "test")
    cluster = phase_settings(config, "cluster")
    assert cluster == {"epochs": 195, "batch_size": batch, "learning_rate": 0.01,
                       "lr_milestones": [50, 100, 150, 200], "lr_factor": 0.5, "momentum": 0.9,
                       "weight_decay": decay}
    # The classifier (Table 6, the cross-entropy baseline's row) is the same for every variant.
    assert phase_settings(config, "classify") == {
        "epochs": 195, "batch_size": 16, "learning_rate": 0.01, "lr_milestones": [50, 100, 150, 200],
        "lr_factor": 0.5, "momentum": 0.9, "weight_decay": 0.001}


def test_synthetic_config_loads():
    config = _base()
    assert config["dataset"] == "synthetic" and config["variant"] == "D"
    assert phase_settings(config, "cluster")["lr_milestones"] == [4]
    assert config["synthetic"]["train_size"] == 3000


def test_every_file_in_configs_loads():
    names = sorted(f for f in os.listdir(CONFIGS) if f.endswith((".yaml", ".yml", ".json")))
    assert len(names) >= 5, names
    for name in names:
        config = load_config(os.path.join(CONFIGS, name))
        for phase in ("cluster", "classify"):
            phase_settings(config, phase)


def test_defaults_are_filled():
    config = validate({key: value for key, value in _base().items()
                       if key in ("dataset", "arch", "cluster", "classify")})
    assert config["variant"] == "D" and config["margin"] == 2.0 and config["head"] == "hungarian"
    assert config["schedule_scale"] == 1.0 and config["double"] is False and config["precision"] == "float32"


# ---------------------------------------------------------------------------------------------
# Bad values: refused, naming the key
# ---------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("arch", "resnet"), ("arch", None),
    ("variant", "E"), ("variant", "a"),
    ("double", "yes"), ("double", 1),
    ("margin", 0), ("margin", -1.0), ("margin", float("inf")), ("margin", float("nan")), ("margin", True),
    ("head", "permute"), ("head", None),
    ("schedule_scale", 0), ("schedule_scale", 1.5), ("schedule_scale", -0.5), ("schedule_scale", "half"),
    ("eval_split", "train"), ("eval_split", "validation"),
    ("val_per_class", 0), ("val_per_class", 2.5), ("val_per_class", True), ("val_per_class", "10"),
    ("xla", "yes"), ("xla", 2), ("xla", "on"),
    ("precision", "float16"), ("precision", "bf16"),
    ("seed", -1), ("seed", 1.5), ("seed", True),
    ("augment", "true"), ("augment", 0),
    ("metrics_every", 0), ("metrics_every", 1.5), ("metrics_every", False),
    ("steps_per_execution", 0), ("steps_per_execution", -4), ("steps_per_execution", 2.5),
    ("steps_per_execution", True), ("steps_per_execution", "many"),
    ("embedding_sample", -1), ("embedding_sample", 1.5), ("embedding_sample", True),
    ("strategy", "ring"),
    ("init", "glorot"), ("init", None),
    ("batchnorm", "pytorch"), ("batchnorm", None),
    ("data_dir", 5),
    ("synthetic", [1, 2]),
]


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_bad_top_level_value_is_refused(key, value):
    with pytest.raises(ConfigError, match=f"'{key}' must be"):
        set_value(_base(), key, value)


BAD_PHASE_VALUES = [
    ("epochs", 0), ("epochs", 2.5), ("epochs", True),
    ("batch_size", 0), ("batch_size", -16), ("batch_size", "16"),
    ("learning_rate", 0), ("learning_rate", -0.01), ("learning_rate", float("nan")), ("learning_rate", "0.01"),
    ("lr_milestones", 25), ("lr_milestones", [0, 25]), ("lr_milestones", [2.5]), ("lr_milestones", [True]),
    ("lr_factor", 0), ("lr_factor", 1.5), ("lr_factor", -0.5),
    ("momentum", 1.0), ("momentum", -0.1), ("momentum", 1.5), ("momentum", "0.9"),
    ("weight_decay", -0.0005), ("weight_decay", float("inf")), ("weight_decay", "5e-4"),
]


@pytest.mark.parametrize("phase", ["cluster", "classify"])
@pytest.mark.parametrize("key, value", BAD_PHASE_VALUES)
def test_bad_phase_value_is_refused(phase, key, value):
    with pytest.raises(ConfigError, match=f"'{phase}.{key}' must be"):
        set_value(_base(), f"{phase}.{key}", value)


@pytest.mark.parametrize("key, value", BAD_PHASE_VALUES[::3])
def test_bad_value_inside_a_per_variant_mapping_is_refused(key, value):
    good = _base()["cluster"][key]
    with pytest.raises(ConfigError, match=f"'cluster.{key}' must be"):
        set_value(_base(), f"cluster.{key}", {"A": good, "D": value})


@pytest.mark.parametrize("key, value", [
    ("train_size", 0), ("train_size", 2.5), ("eval_size", 0), ("eval_size", -3),
    ("num_coarse", 1), ("num_coarse", 5), ("fine_per_coarse", 1), ("fine_per_coarse", 6),
    ("data_seed", -1), ("noise", -0.5), ("noise", float("nan")),
])
def test_bad_synthetic_option_is_refused(key, value):
    with pytest.raises(ConfigError, match=f"'synthetic.{key}' must be"):
        set_value(_base(), f"synthetic.{key}", value)


def test_good_boundary_values_are_accepted():
    """The checks above refuse the bad values, not everything: their neighbours pass."""
    config = _base()
    for key, value in [("schedule_scale", 1.0), ("schedule_scale", 0.01), ("val_per_class", 1), ("xla", True),
                       ("xla", "auto"), ("precision", "mixed_bfloat16"), ("seed", 0), ("embedding_sample", 0),
                       ("steps_per_execution", 4), ("metrics_every", 3), ("double", True), ("head", "fresh"),
                       ("cluster.momentum", 0.0), ("cluster.weight_decay", 0), ("cluster.lr_factor", 1.0),
                       ("cluster.lr_milestones", []), ("synthetic.num_coarse", 4), ("synthetic.noise", 0),
                       ("cluster.batch_size", {"A": 1024, "B": 128, "C": 128, "D": 128})]:
        config = set_value(config, key, value)
    assert config["cluster"]["batch_size"]["A"] == 1024


@pytest.mark.parametrize("key", ["arch", "cluster", "classify", "dataset"])
def test_missing_required_key_is_named(key):
    config = {k: v for k, v in _base().items() if k != key}
    with pytest.raises(ConfigError, match=f"missing the required key '{key}'"):
        validate(config)


@pytest.mark.parametrize("key", ["epochs", "momentum", "weight_decay", "lr_milestones"])
def test_missing_phase_key_is_named(key):
    config = _base()
    del config["classify"][key]
    with pytest.raises(ConfigError, match=rf"'classify' is missing \['{key}'\]"):
        validate(config)


def test_unknown_keys_are_named_with_a_suggestion():
    with pytest.raises(ConfigError, match="Unknown config key 'margn'. Did you mean 'margin'"):
        set_value(_base(), "margn", 2.0)
    with pytest.raises(ConfigError, match="Unknown config key 'cluster.momentun'. Did you mean 'momentum'"):
        set_value(_base(), "cluster.momentun", 0.9)
    with pytest.raises(ConfigError, match="Unknown config key 'synthetic.trian_size'"):
        set_value(_base(), "synthetic.trian_size", 5)
    with pytest.raises(ConfigError, match="'clustr' is not a section"):
        set_value(_base(), "clustr.epochs", 5)


def test_per_variant_mapping_naming_an_unknown_variant_is_refused():
    with pytest.raises(ConfigError, match="names unknown variant 'E'"):
        set_value(_base(), "cluster.batch_size", {"A": 16, "E": 16})


def test_per_variant_mapping_without_the_runs_variant_is_refused_when_used():
    config = set_value(_base(), "cluster.batch_size", {"A": 1024, "B": 128})  # valid: the variant may change
    assert phase_settings(set_value(config, "variant", "A"), "cluster")["batch_size"] == 1024
    with pytest.raises(ConfigError, match="cluster.batch_size has no value for variant 'D'"):
        phase_settings(config, "cluster")


def test_unknown_dataset_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="Unknown dataset"):
        load_config(dataset="mnist")
    with pytest.raises(ConfigError, match="Config file not found"):
        load_config(str(tmp_path / "none.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(str(tmp_path / "list.yaml"))
    (tmp_path / "broken.yaml").write_text("arch: [lenet\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "broken.yaml"))


def test_set_value_does_not_touch_its_input():
    config = _base()
    changed = set_value(config, "cluster.epochs", 2)
    assert changed["cluster"]["epochs"] == 2 and config["cluster"]["epochs"] == 6


# ---------------------------------------------------------------------------------------------
# The schedule: phase_settings and learning_rate_at, by hand
# ---------------------------------------------------------------------------------------------


def test_schedule_scale_multiplies_epochs_and_milestones_and_rounds():
    config = set_value(load_config(dataset="cifar10"), "schedule_scale", 0.124)
    settings = phase_settings(config, "cluster")
    # 95 x 0.124 = 11.78 -> 12; milestones 25, 50, 75, 100 x 0.124 = 3.1, 6.2, 9.3, 12.4 -> 3, 6, 9, 12
    assert settings["epochs"] == 12
    assert settings["lr_milestones"] == [3, 6, 9, 12]
    # Nothing else is scaled.
    assert {k: v for k, v in settings.items() if k not in ("epochs", "lr_milestones")} == {
        "batch_size": 16, "learning_rate": 0.01, "lr_factor": 0.5, "momentum": 0.9, "weight_decay": 0.0005}
    config = set_value(config, "schedule_scale", 0.2)
    assert phase_settings(config, "classify")["epochs"] == 19  # 95 x 0.2
    assert phase_settings(config, "classify")["lr_milestones"] == [5, 10, 15, 20]


def test_tiny_schedule_scale_keeps_one_epoch_and_merges_milestones():
    config = set_value(load_config(dataset="birdsnap34"), "schedule_scale", 0.001)
    settings = phase_settings(config, "cluster")
    assert settings["epochs"] == 1  # 195 x 0.001 = 0.195, at least 1
    assert settings["lr_milestones"] == [1]  # 0.05, 0.1, 0.15, 0.2 -> all at least 1, once


def test_phase_settings_does_not_change_the_config():
    config = set_value(load_config(dataset="birdsnap34"), "schedule_scale", 0.5)
    phase_settings(config, "cluster")
    assert config["cluster"]["epochs"] == 195 and config["cluster"]["batch_size"]["A"] == 1024


def test_learning_rate_steps_at_each_milestone():
    settings = {"learning_rate": 0.01, "lr_milestones": [25, 50, 75, 100], "lr_factor": 0.5}
    # Epochs counted from 0: epoch 25 (the 26th) is the first at half the rate.
    expected = {0: 0.01, 1: 0.01, 24: 0.01, 25: 0.005, 49: 0.005, 50: 0.0025, 74: 0.0025, 75: 0.00125,
                94: 0.00125, 99: 0.00125, 100: 0.000625, 150: 0.000625}
    for epoch, rate in expected.items():
        assert learning_rate_at(epoch, settings) == pytest.approx(rate, rel=1e-12), epoch


def test_learning_rate_with_other_factor_and_no_milestones():
    assert learning_rate_at(7, {"learning_rate": 0.1, "lr_milestones": [], "lr_factor": 0.5}) == pytest.approx(0.1)
    settings = {"learning_rate": 0.1, "lr_milestones": [2, 4], "lr_factor": 0.1}
    assert [learning_rate_at(e, settings) for e in range(6)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    # Milestones need not be sorted in the file.
    unsorted = {"learning_rate": 1.0, "lr_milestones": [4, 2], "lr_factor": 0.5}
    assert [learning_rate_at(e, unsorted) for e in range(6)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])


def test_synthetic_settings_on_another_dataset_are_refused_not_ignored():
    config = load_config(dataset="cifar10")
    with pytest.raises(ConfigError, match="'synthetic' applies to dataset 'synthetic' only; .* 'cifar10'"):
        set_value(config, "synthetic.train_size", 100)
    assert set_value(load_config(dataset="synthetic"), "synthetic.train_size", 100)["synthetic"]["train_size"] == 100


def test_alexnet_bn_is_off_by_default_and_refused_for_lenet():
    assert load_config(dataset="cub42")["alexnet_bn"] is False
    assert set_value(load_config(dataset="cub42"), "alexnet_bn", True)["alexnet_bn"] is True
    with pytest.raises(ConfigError, match="'alexnet_bn' applies to arch alexnet only"):
        set_value(load_config(dataset="cifar10"), "alexnet_bn", True)
