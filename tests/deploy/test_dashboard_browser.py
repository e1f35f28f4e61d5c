"""The status page in a real headless Chromium, beside a real server and two real clients.

Needs Debian's ``chromium`` (``apt-get install chromium``) and the ``playwright``
package (a dev dependency; its own browser download is never used): Playwright
drives ``/usr/bin/chromium``. Without that binary the test skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import pollen_cmd

from pollen.deploy.processes import free_port, port_open

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
NAMES = ("client-alpha", "client-beta")
ROUNDS = 3
#: Where to keep the page's screenshot besides the test's folder (docs/dashboard.png is one).
SCREENSHOT_ENV = "POLLEN_DASHBOARD_SCREENSHOT"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="no /usr/bin/chromium: apt-get install chromium"
    ),
]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def start_federation(tmp_path: Path, tiny_data: Path, env: dict, board: int, logs: dict):
    """``pollen server --insecure --dashboard`` on loopback; the clients come later."""
    port = free_port()
    server = subprocess.Popen(
        pollen_cmd(
            "server",
            *("--insecure", "--address", f"127.0.0.1:{port}"),
            *("--dashboard", f"127.0.0.1:{board}"),
            *("--rounds", str(ROUNDS), "--model", "cnn", "--num-classes", "3"),
            *("--test-data", str(tiny_data), "--out", str(tmp_path / "run")),
            *("--lr", "0.003", "--bn-calibration-examples", "32"),
        ),
        env=env,
        stdout=logs["server"],
        stderr=subprocess.STDOUT,
    )
    return server, port


def start_clients(port: int, tiny_data: Path, env: dict, logs: dict) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            pollen_cmd(
                "client",
                *("--insecure", "--server", f"127.0.0.1:{port}", "--name", name),
                *("--data-dir", str(tiny_data), "--partition-id", str(i), "--num-partitions", "2"),
            ),
            env=env,
            stdout=logs[name],
            stderr=subprocess.STDOUT,
        )
        for i, name in enumerate(NAMES)
    ]


def watch(page, server: subprocess.Popen, timeout: float) -> tuple[list[int], set[str]]:
    """Read the page as a person would, every 0.2 s, until it says the run is over.

    Returns:
        The round numbers it showed, in order (repeats dropped), and the client
        names its table showed.
    """
    rounds: list[int] = []
    names: set[str] = set()
    deadline = time.monotonic() + timeout
    while page.evaluate("document.body.dataset.status") != "completed":
        assert time.monotonic() < deadline, f"the page never said completed: {rounds}"
        assert server.poll() in (None, 0), "the server failed"
        shown = page.evaluate("document.getElementById('round').textContent")
        if shown.isdigit() and (not rounds or rounds[-1] != int(shown)):
            rounds.append(int(shown))
        names.update(page.locator("#clients tbody td.name").all_text_contents())
        time.sleep(0.2)
    rounds.append(int(page.evaluate("document.getElementById('round').textContent")))
    names.update(page.locator("#clients tbody td.name").all_text_contents())
    return rounds, names


def test_dashboard_in_a_real_browser(tmp_path, tiny_data, pollen_env):
    from playwright.sync_api import sync_playwright

    board = free_port()
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("server", *NAMES)}
    server, port = start_federation(tmp_path, tiny_data, pollen_env, board, logs)
    clients: list[subprocess.Popen] = []
    problems: list[str] = []
    try:
        try:
            wait_for(
                lambda: port_open("127.0.0.1", board) or server.poll() is not None,
                240,
                "the dashboard's port",
            )
            assert server.poll() is None, "the server exited"
        except AssertionError as err:
            raise AssertionError(
                f"{err}: {(tmp_path / 'server.log').read_text()[-3000:]}"
            ) from None
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
            )
            page = browser.new_page(viewport={"width": 1000, "height": 1100})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda err: problems.append(f"uncaught: {err}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(f"http://127.0.0.1:{board}/")
            wait_for(
                lambda: page.evaluate("document.body.dataset.status") == "running", 60, "running"
            )
            clients = start_clients(port, tiny_data, pollen_env, logs)
            rounds, names = watch(page, server, timeout=480)
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get(SCREENSHOT_ENV):
                shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])
            progress = page.get_attribute("#bar", "aria-valuenow")
            browser.close()
        assert server.wait(timeout=120) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for name, client in zip(NAMES, clients, strict=True):
            assert client.wait(timeout=120) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        for proc in [server, *clients]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in logs.values():
            f.close()
    # Both clients by the names they chose; the round went up while the page watched.
    assert set(NAMES) <= names, names
    assert rounds == sorted(rounds) and rounds[-1] == ROUNDS and len(set(rounds)) >= 2, rounds
    assert progress == str(ROUNDS)
    assert problems == []
