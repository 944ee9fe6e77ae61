from pathlib import Path

import pytest

from bench.config import (
    CONFIG_DIR,
    ConfigError,
    Experiment,
    apply_override,
    experiment_from_dict,
    load_experiment,
)


def test_bundled_omniglot_loads_with_typed_values():
    exp = load_experiment("omniglot")
    assert exp.data.name == "omniglot" and exp.loss.name == "smooth_ap"
    assert isinstance(exp.optim.lr, float) and isinstance(exp.train.epochs, int)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_bundled_config_builds_and_round_trips(path: Path):
    exp = load_experiment(path.stem)
    assert experiment_from_dict(exp.to_dict()) == exp


def test_overrides_set_nested_values_parsed_as_yaml():
    exp = load_experiment(
        "omniglot",
        [
            "optim.lr=3e-4",
            "optim.lr_decay_epochs=[2, 5]",
            "loss.params.temperature=0.05",
            "optim.head_lr=null",
            "data.augment=false",
        ],
    )
    assert exp.optim.lr == pytest.approx(3e-4)
    assert exp.optim.lr_decay_epochs == [2, 5]
    assert exp.loss.params == {"temperature": 0.05}
    assert exp.optim.head_lr is None and exp.data.augment is False


def test_unknown_key_names_its_full_path():
    with pytest.raises(ConfigError, match=r"unknown key optim\.lrr"):
        load_experiment("omniglot", ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key bogus"):
        load_experiment("omniglot", ["bogus=1"])


def test_wrong_type_names_key_path_and_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("name: x\ntrain:\n  epochs: ten\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.epochs: expected int, got 'ten'"):
        load_experiment(str(config))
    with pytest.raises(ConfigError, match=r"optim\.lr_decay_epochs\[1\]: expected int"):
        load_experiment("omniglot", ["optim.lr_decay_epochs=[1, x]"])
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got True"):
        load_experiment("omniglot", ["train.epochs=true"])


def test_section_given_a_scalar_and_bad_override_syntax():
    with pytest.raises(ConfigError, match=r"optim: expected a mapping"):
        load_experiment("omniglot", ["optim=3"])
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_override({}, "optim.lr")
    with pytest.raises(ConfigError, match="optim.lr is not a section"):
        apply_override({"optim": {"lr": 1}}, "optim.lr.x=2")


def test_unknown_bundled_name_lists_available():
    with pytest.raises(ConfigError, match="omniglot"):
        load_experiment("no_such_config")


def test_invalid_yaml_names_file(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_experiment(str(config))


def test_flat_params_use_dotted_keys():
    flat = Experiment().flat()
    assert flat["optim.lr"] == Experiment().optim.lr
    assert "data.batch_size" in flat and "loss.name" in flat


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.name=sgd", r"optim\.name: must be one of adam, adamw, got 'sgd'"),
        ("tune.pruner=medain", r"tune\.pruner: must be one of median, hyperband, none, got 'medain'"),
        ("eval.backend=gpu", r"eval\.backend: must be one of auto, faiss, torch, got 'gpu'"),
        ("tune.trials=0", r"tune\.trials must be at least 1, got 0"),
        ("tune.cv_folds=0", r"tune\.cv_folds must be at least 1, got 0"),
        (
            "tune.shared_space={optim.lr: {low: 1e-4, hgih: 1e-2}}",
            r"tune\.shared_space\.optim\.lr: unknown field",
        ),
        ("tune.shared_space={optim.lr: {low: 1e-4}}", r"tune\.shared_space\.optim\.lr: needs low and high"),
        (
            "tune.shared_space={optim.lr: {choices: []}}",
            r"tune\.shared_space\.optim\.lr\.choices: expected a non-empty",
        ),
    ],
)
def test_option_strings_and_tuning_settings_are_rejected_at_load_with_their_key_path(override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment("omniglot", [override])


def test_valid_option_strings_load():
    exp = load_experiment("omniglot", ["optim.name=adamw", "tune.pruner=median", "eval.backend=torch"])
    assert (exp.optim.name, exp.tune.pruner, exp.eval.backend) == ("adamw", "median", "torch")
