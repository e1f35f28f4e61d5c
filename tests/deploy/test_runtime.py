"""Tests for pollen.deploy.runtime: run-config TOML, the Flower App folder, addresses."""

from __future__ import annotations

import tempfile
import tomllib
from pathlib import Path

import pytest

import pollen.deploy.runtime as runtime
from pollen.config import RunConfig
from pollen.deploy.runtime import split_address, toml_value, write_run_config
from pollen.errors import PollenError

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


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
