"""`flwr run .` from the checkout, as a Flower user runs it (docs/deployment.md, Flower App).

The user's venv is active and has Pollen's dependencies, so the local SuperLink that
`flwr run` starts is told not to install them again (FLWR_DISABLE_RUNTIME_DEPENDENCY_
INSTALLATION=1: no `uv sync`, no network). `flwr run` exits 0 even when the run fails,
so the run's status is read back with `flwr ls` and from the run folder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
#: Environment variable whose value marks every process this test starts (the local
#: SuperLink is detached from `flwr run`, and its SuperExec, simulation and Ray workers
#: from it): the test ends exactly those.
MARK = "POLLEN_TEST_FLWR_RUN"


def _marked_pids(mark: str) -> list[int]:
    """Processes (other than this one) whose environment holds ``MARK=mark``."""
    needle = f"{MARK}={mark}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def _end_marked(mark: str) -> list[int]:
    """SIGTERM, then SIGKILL, every process marked ``mark``; returns those still alive."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _marked_pids(mark):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while _live(_marked_pids(mark)) and time.monotonic() < deadline:
            time.sleep(0.2)
    return _live(_marked_pids(mark))


def _live(pids: list[int]) -> list[int]:
    """The pids that are not zombies (a zombie's parent reaps it; it holds nothing)."""
    alive = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            alive.append(pid)
    return alive


@pytest.fixture
def flwr_env(tmp_path, pollen_env):
    """A Flower user's shell: the venv active, a fresh FLWR_HOME, a private local SuperLink port."""
    mark = uuid.uuid4().hex
    venv_bin = str(Path(sys.executable).parent)
    env = dict(pollen_env)
    env.update(
        {
            MARK: mark,
            "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
            "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
            "FLWR_HOME": str(tmp_path / "flwr-home"),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }
    )
    yield env
    left = _end_marked(mark)
    assert not left, f"processes started by `flwr run` outlived the test: {left}"


def _flwr(env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_flwr_run_dot_completes_a_round_and_writes_the_run_folder(
    tiny_data, tmp_path, flwr_env
) -> None:
    out = tmp_path / "run"
    config = f"data-dir='{tiny_data}' model='cnn' num-rounds=1 out='{out}'"
    started = time.monotonic()
    run = _flwr(flwr_env, "run", ".", "--run-config", config, "--stream", timeout=240)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    found = re.search(r"Successfully started run (\d+)", log)
    assert found, log[-4000:]
    run_id = found.group(1)

    # `flwr run` says nothing of the outcome: ask the SuperLink (the stream ended with the run).
    status = "running"
    while time.monotonic() - started < 240:
        listing = _flwr(flwr_env, "ls", "--run-id", run_id, "--format", "json", timeout=60)
        runs = json.loads(listing.stdout)["runs"]
        status = runs[0]["status"]
        if status.startswith("finished"):
            break
        time.sleep(1)
    assert status == "finished:completed", f"{status}: {runs[0]['status-details']}\n{log[-4000:]}"

    assert json.loads((out / "status.json").read_text())["status"] == "completed"
    history = json.loads((out / "history.json").read_text())
    assert history["config"]["model"] == "cnn"
    assert len(history["rounds"]) == 1
    for name in ("model.keras", "history.csv", "classes.json"):
        assert (out / name).is_file(), name
