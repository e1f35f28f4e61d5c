"""Tests for pollen.config (RunConfig)."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from pollen.config import RunConfig
from pollen.errors import PollenError

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _app_config() -> dict:
    return _pyproject()["tool"]["flwr"]["app"]["config"]


# --- defaults: the Flower App and the CLI share one source of truth -------------------------


def test_every_pyproject_key_is_a_runconfig_field() -> None:
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}
    unknown = set(_app_config()) - fields
    assert not unknown, f"[tool.flwr.app.config] keys without a RunConfig field: {unknown}"


def test_runconfig_defaults_equal_pyproject_app_config() -> None:
    app_config = _app_config()
    defaults = RunConfig.declared_defaults()
    missing = set(defaults) - set(app_config)
    assert not missing, f"RunConfig fields missing from [tool.flwr.app.config]: {missing}"
    for key, value in app_config.items():
        assert defaults[key] == value, f"{key}: RunConfig {defaults[key]!r} != pyproject {value!r}"
        # Same TOML type, too: an int where the field is a float would still parse, but
        # `flwr run -c` overrides are typed by the default's type.
        assert type(defaults[key]) is type(value), key


def test_pyproject_defaults_validate() -> None:
    assert RunConfig.from_mapping(_app_config()) == RunConfig()


def test_to_mapping_from_mapping_round_trip() -> None:
    cfg = RunConfig(num_rounds=7, model="cnn", learning_rate=0.01, server_eval=False, out="/x")
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


# --- from_mapping: conversion ----------------------------------------------------------------


def test_from_mapping_converts_strings_and_numbers() -> None:
    cfg = RunConfig.from_mapping(
        {
            "num-rounds": "3",
            "batch-size": 16,
            "learning-rate": 1,
            "alpha": "0.25",
            "server-eval": "false",
            "model": "cnn",
            "round-timeout": 60,
            "num-classes": 3.0,
        }
    )
    assert cfg.num_rounds == 3 and type(cfg.num_rounds) is int
    assert cfg.batch_size == 16
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float
    assert cfg.alpha == 0.25
    assert cfg.server_eval is False
    assert cfg.round_timeout == 60.0 and type(cfg.round_timeout) is float
    assert cfg.num_classes == 3 and type(cfg.num_classes) is int
    assert cfg.model == "cnn"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("false", False),
        ("0", False),
        ("off", False),
        (True, True),
        (False, False),
    ],
)
def test_from_mapping_bool_values(text: object, expected: bool) -> None:
    assert RunConfig.from_mapping({"server-eval": text}).server_eval is expected


def test_from_mapping_ignores_unknown_keys() -> None:
    cfg = RunConfig.from_mapping({"num-rounds": 2, "not-a-key": "whatever", "num_rounds": 9})
    assert cfg == RunConfig(num_rounds=2)


@pytest.mark.parametrize(
    ("values", "phrase"),
    [
        ({"num-rounds": 0}, "rounds must be at least 1"),
        ({"num-rounds": "0"}, "rounds must be at least 1"),
        ({"model": "resnet9000"}, "Unknown model 'resnet9000'"),
        ({"partition": "weird"}, "Unknown partition method 'weird'"),
        ({"alpha": 0}, "alpha must be positive"),
        ({"alpha": -1.5}, "alpha must be positive"),
        ({"batch-size": "abc"}, "batch-size='abc' is not a valid int"),
        ({"fraction-train": 1.5}, "fraction-train must be in (0, 1]"),
        ({"fraction-train": 0}, "fraction-train must be in (0, 1]"),
        ({"keras-verbose": 5}, "keras-verbose must be 0, 1 or 2"),
        ({"num-rounds": 2.5}, "num-rounds=2.5 is not a valid int"),
        ({"num-rounds": "2.5"}, "num-rounds='2.5' is not a valid int"),
        ({"server-eval": "maybe"}, "server-eval='maybe' is not a valid bool"),
        ({"learning-rate": "fast"}, "learning-rate='fast' is not a valid float"),
        ({"learning-rate": -0.1}, "learning rate must be positive"),
        ({"batch-size": -1}, "batch size must be at least 1"),
        ({"lr-schedule": "linear"}, "Unknown learning-rate schedule"),
        ({"target-accuracy": 1.5}, "target accuracy must be in [0, 1]"),
        ({"min-clients": 0}, "min-clients must be at least 1"),
    ],
)
def test_from_mapping_rejects_bad_values(values: dict, phrase: str) -> None:
    with pytest.raises(PollenError) as err:
        RunConfig.from_mapping(values)
    message = str(err.value)
    assert phrase in message
    assert message.endswith(".")  # a full sentence, not a bare repr


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_from_mapping_rejects_seeds_the_models_cannot_use(seed: int) -> None:
    # build_model calls keras.utils.set_random_seed, i.e. np.random.seed, which only takes
    # 0 <= seed < 2**32: such a run would only fail later, inside every client.
    with pytest.raises(PollenError, match="seed"):
        RunConfig.from_mapping({"seed": seed})


def test_unknown_model_message_lists_the_registry() -> None:
    with pytest.raises(PollenError) as err:
        RunConfig.from_mapping({"model": "nope"})
    assert "cnn" in str(err.value) and "mobilenetv2" in str(err.value)


def test_replace_validates() -> None:
    assert RunConfig().replace(num_rounds=5).num_rounds == 5
    with pytest.raises(PollenError, match="rounds must be at least 1"):
        RunConfig().replace(num_rounds=0)


def test_training_settings_default_to_the_models_recipe() -> None:
    ref = RunConfig.from_mapping({"model": "mobilenetv2"})
    assert (ref.batch_size, ref.learning_rate, ref.lr_schedule) == (32, 0.001, "cosine")
    assert (RunConfig().batch_size, RunConfig().learning_rate) == (32, 0.001)  # the reference
    fast = RunConfig.from_mapping({"model": "fastnet"})
    assert (fast.batch_size, fast.learning_rate, fast.lr_schedule) == (64, 0.1, "onecycle")
    given = RunConfig.from_mapping(
        {"model": "fastnet", "batch-size": 64, "learning-rate": 0.05, "lr-schedule": "cosine"}
    )
    assert (given.batch_size, given.learning_rate, given.lr_schedule) == (64, 0.05, "cosine")
    # The resolved values travel to every process: no process resolves them differently.
    assert RunConfig.from_mapping(fast.to_mapping()) == fast


def test_the_strategy_registry_refuses_an_unknown_strategy() -> None:
    """Strategy names are checked by the strategy registry, not by RunConfig (no import circle)."""
    from pollen.server.strategies import check_config

    cfg = RunConfig.from_mapping({"strategy": "fedmagic"})
    with pytest.raises(PollenError, match="Unknown strategy 'fedmagic'"):
        check_config(cfg)
