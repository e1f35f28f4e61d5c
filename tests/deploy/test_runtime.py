"""Tests for pollen.deploy.runtime: run-config TOML, the Flower App folder, addresses."""

from __future__ import annotations

import os
import stat
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
    gen = runtime.app_dir(tmp_path)
    assert gen == tmp_path / "app"
    generated = tomllib.loads((gen / "pyproject.toml").read_text(encoding="utf-8"))
    real = _pyproject()
    for key in ("name", "version"):
        assert generated["project"][key] == real["project"][key]
    assert generated["tool"]["flwr"]["app"]["publisher"] == real["tool"]["flwr"]["app"]["publisher"]
    assert (
        generated["tool"]["flwr"]["app"]["components"] == real["tool"]["flwr"]["app"]["components"]
    )
    assert generated["tool"]["flwr"]["app"]["config"] == real["tool"]["flwr"]["app"]["config"]


def test_app_dir_holds_the_checkouts_pyproject_only(tmp_path: Path) -> None:
    """From a checkout, flwr run gets its pyproject.toml alone (not a walk over .venv)."""
    gen = runtime.app_dir(tmp_path)
    assert [p.name for p in gen.iterdir()] == ["pyproject.toml"]
    assert (gen / "pyproject.toml").read_bytes() == (ROOT / "pyproject.toml").read_bytes()
    assert "flwr" in _pyproject()["tool"]
    assert runtime.app_dir(tmp_path) == gen  # reused, not rewritten
    assert [p.name for p in gen.iterdir()] == ["pyproject.toml"]  # no temporary file left


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_app_folders_are_private(tmp_path: Path, monkeypatch) -> None:
    """No /tmp/pollen-app-<hash> that any local user could create first or write into."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fresh = runtime.app_dir()
    assert fresh.parent == tmp_path and _mode(fresh) == 0o700
    again = runtime.app_dir()
    assert again != fresh and _mode(again) == 0o700  # a new folder each time, never guessed
    (tmp_path / "home").mkdir()
    assert _mode(runtime.app_dir(tmp_path / "home")) == 0o700


@pytest.mark.parametrize("mode", [0o755, 0o777, 0o770, 0o701])
def test_an_app_folder_open_to_others_is_not_reused(tmp_path: Path, mode: int) -> None:
    planted = tmp_path / "app"
    planted.mkdir()
    planted.chmod(mode)
    (planted / "pyproject.toml").write_text("[tool.flwr.app.components]\nclientapp = 'evil:app'\n")
    with pytest.raises(PollenError, match="not private"):
        runtime.app_dir(tmp_path)
    assert "evil" in (planted / "pyproject.toml").read_text()  # not used, not written


def test_an_app_folder_of_another_user_or_a_link_is_not_reused(tmp_path: Path, monkeypatch) -> None:
    planted = tmp_path / "app"
    planted.mkdir(mode=0o700)
    real_uid = os.getuid()
    monkeypatch.setattr(runtime.os, "getuid", lambda: real_uid + 1)  # as seen by another user
    with pytest.raises(PollenError, match="not private"):
        runtime.app_dir(tmp_path)
    monkeypatch.setattr(runtime.os, "getuid", lambda: real_uid)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    link_home = tmp_path / "home"
    link_home.mkdir()
    (link_home / "app").symlink_to(elsewhere)
    with pytest.raises(PollenError, match="not private"):
        runtime.app_dir(link_home)
    assert not (elsewhere / "pyproject.toml").exists()


def test_submit_run_uses_a_private_app_folder_in_its_home(tmp_path: Path, monkeypatch) -> None:
    seen: list = []

    class Popen:
        def __init__(self, argv, **_):
            seen.append(argv)

    monkeypatch.setattr(runtime.subprocess, "Popen", Popen)
    monkeypatch.setattr(runtime, "wait_interruptibly", lambda proc: 0)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    assert runtime.submit_run(home, {"num-rounds": 1}) == 0
    app = Path(seen[0][2])
    assert app == home / "app" and _mode(app) == 0o700
    assert not str(app).startswith(tempfile.gettempdir() + "/pollen-app-")


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
