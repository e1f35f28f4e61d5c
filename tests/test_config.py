"""Tests for pollen.config (RunConfig) and the run-config plumbing in pollen.deploy.runtime."""

from __future__ import annotations

import dataclasses
import tempfile
import tomllib
from pathlib import Path

import pytest

import pollen.deploy.runtime as runtime
from pollen.client.app import client_data_spec
from pollen.config import RunConfig
from pollen.deploy.runtime import split_address, toml_value, write_run_config
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


# --- client data spec ------------------------------------------------------------------------


def test_client_data_spec_node_config_wins() -> None:
    cfg = RunConfig(data_dir="/run/data", partition="dirichlet", alpha=0.3, seed=5)
    spec = client_data_spec(cfg, {"data-dir": "/node/data", "partition-id": 1, "num-partitions": 4})
    assert (spec.data_dir, spec.partition_id, spec.num_partitions) == ("/node/data", 1, 4)
    assert (spec.method, spec.alpha, spec.seed) == ("dirichlet", 0.3, 5)
    whole = client_data_spec(cfg, {})
    assert (whole.data_dir, whole.partition_id, whole.num_partitions) == ("/run/data", None, None)


# --- TOML rendering ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "",
        'say "hi"',
        "C:\\data\\cifar",
        "trailing backslash \\",
        'both \\" mixed',
        "/tmp/pollen runs/é ü 🌼",
        "tab\there",
        0,
        -7,
        12345678901,
        0.001,
        3600.0,
        1e-05,
        -2.5,
        True,
        False,
    ],
)
def test_toml_value_round_trips(value: object) -> None:
    parsed = tomllib.loads(f"v = {toml_value(value)}\n")["v"]
    assert parsed == value
    assert type(parsed) is type(value)


@pytest.mark.parametrize("value", ["line\nbreak", "bell\x07"])
def test_toml_value_escapes_control_characters(value: str) -> None:
    # A path may legally contain control characters; TOML basic strings must escape them.
    parsed = tomllib.loads(f"v = {toml_value(value)}\n")["v"]
    assert parsed == value


def test_write_run_config_round_trips(tmp_path: Path) -> None:
    values = {
        **RunConfig().to_mapping(),
        "out": str(tmp_path / 'a "quoted" dir\\with backslash'),
        "data-dir": "/data/cifar-10-python.tar.gz",
        "learning-rate": 0.0003,
        "server-eval": False,
        "num-rounds": 12,
    }
    path = write_run_config(tmp_path / "run-config.toml", values)
    assert path == tmp_path / "run-config.toml"
    assert tomllib.loads(path.read_text(encoding="utf-8")) == values


def test_generated_app_dir_matches_pyproject(tmp_path: Path, monkeypatch) -> None:
    """An installed wheel has no pyproject.toml: app_dir() generates an equivalent one."""
    monkeypatch.setattr(
        runtime, "__file__", str(tmp_path / "site" / "pollen" / "deploy" / "runtime.py")
    )
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    gen = runtime.app_dir()
    assert gen.parent == tmp_path / "tmp"
    generated = tomllib.loads((gen / "pyproject.toml").read_text(encoding="utf-8"))
    real = _pyproject()
    assert (
        generated["tool"]["flwr"]["app"]["components"] == real["tool"]["flwr"]["app"]["components"]
    )
    assert generated["tool"]["flwr"]["app"]["config"] == real["tool"]["flwr"]["app"]["config"]


def test_app_dir_holds_the_checkouts_pyproject_only(tmp_path: Path, monkeypatch) -> None:
    """From a checkout, flwr run gets its pyproject.toml alone (not a walk over .venv)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gen = runtime.app_dir()
    assert gen.parent == tmp_path
    assert [p.name for p in gen.iterdir()] == ["pyproject.toml"]
    assert (gen / "pyproject.toml").read_bytes() == (ROOT / "pyproject.toml").read_bytes()
    assert "flwr" in _pyproject()["tool"]
    assert runtime.app_dir() == gen  # reused, not rewritten
    assert [p.name for p in tmp_path.iterdir()] == [gen.name]  # no temporary file left


# --- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("0.0.0.0:8080", ("0.0.0.0", 8080)),
        ("[::1]:9000", ("::1", 9000)),
        ("host", ("host", 8080)),
        ("example.org:1", ("example.org", 1)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
    ],
)
def test_split_address(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected


def test_split_address_default_port() -> None:
    assert split_address("host", default_port=9092) == ("host", 9092)


@pytest.mark.parametrize(
    "address", ["host:abc", "host:70000", ":80", "host:0", "host:", "", "host:-1", "[]:80"]
)
def test_split_address_rejects(address: str) -> None:
    with pytest.raises(PollenError, match="HOST:PORT"):
        split_address(address)


def test_split_address_bare_ipv6_is_not_misparsed() -> None:
    # "::1" has no port; it must not become host ":" on port 1.
    try:
        result = split_address("::1")
    except PollenError:
        return
    assert result == ("::1", 8080)


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


SPAWNS_OWN_SESSION = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(300)
"""


SAYS_SIGTERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(3)))
print("up", flush=True)
time.sleep(300)
"""


def test_a_client_whose_supernode_is_gone_stops_its_app_runner_without_sigterm(
    tmp_path: Path,
) -> None:
    """The app runner is then already exiting on Flower's SIGINT; a SIGTERM on top made
    CPython print a traceback ("Signal 15 ignored due to race condition")."""
    import sys
    import time

    from pollen.deploy.deployment import _NodeWatch

    watch = object.__new__(_NodeWatch)  # its two processes, without Flower
    watch.log, watch.shown = tmp_path / "supernode.log", 0
    watch.node = runtime.ManagedProcess("supernode", [sys.executable, "-c", "pass"], {}, None)
    watch.apps = runtime.ManagedProcess("clientapp", [sys.executable, "-c", SAYS_SIGTERM], {},
                                        watch.log)  # fmt: skip
    deadline = time.monotonic() + 30
    while "up" not in watch.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    watch.node.proc.wait(30)
    watch.stop()
    assert not watch.apps.alive()
    assert "got SIGTERM" not in watch.log.read_text()
    # A SuperNode that is still up: both get SIGTERM as usual.
    watch.node = runtime.ManagedProcess("supernode", [sys.executable, "-c", SAYS_SIGTERM], {},
                                        tmp_path / "node.log")  # fmt: skip
    while "up" not in (tmp_path / "node.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    watch.apps = runtime.ManagedProcess("clientapp", [sys.executable, "-c", SAYS_SIGTERM], {},
                                        tmp_path / "apps.log")  # fmt: skip
    while "up" not in (tmp_path / "apps.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    watch.stop()
    assert "got SIGTERM" in (tmp_path / "apps.log").read_text()
    assert "got SIGTERM" in (tmp_path / "node.log").read_text()


def test_managed_process_stop_reaches_children_in_their_own_sessions(tmp_path: Path) -> None:
    """Flower's SuperLink starts its SuperExec (and a simulation's server app and Ray
    workers under it) in new sessions, outside the SuperLink's process group: stopping
    the SuperLink must stop them too."""
    import sys
    import time

    log = tmp_path / "spawner.log"
    proc = runtime.ManagedProcess("spawner", [sys.executable, "-c", SPAWNS_OWN_SESSION],
                                  {}, log)  # fmt: skip
    deadline = time.monotonic() + 30
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(log.read_text().split()[0])
    assert runtime.descendants(proc.proc.pid) == [proc.proc.pid, child]
    proc.stop(timeout=5)
    assert not proc.alive()
    assert not runtime.is_running(child)


def test_the_strategy_registry_refuses_an_unknown_strategy() -> None:
    """Strategy names are checked by the strategy registry, not by RunConfig (no import circle)."""
    from pollen.server.strategies import check_config

    cfg = RunConfig.from_mapping({"strategy": "fedmagic"})
    with pytest.raises(PollenError, match="Unknown strategy 'fedmagic'"):
        check_config(cfg)
