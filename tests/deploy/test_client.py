"""Tests for pollen.deploy.client: the watchdog over a client's SuperNode and app runner."""

from __future__ import annotations

from pathlib import Path

import pollen.deploy.processes as processes

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

    from pollen.deploy.client import _NodeWatch

    watch = object.__new__(_NodeWatch)  # its two processes, without Flower
    watch.log, watch.shown = tmp_path / "supernode.log", 0
    watch.node = processes.ManagedProcess("supernode", [sys.executable, "-c", "pass"], {}, None)
    watch.apps = processes.ManagedProcess("clientapp", [sys.executable, "-c", SAYS_SIGTERM], {},
                                        watch.log)  # fmt: skip
    deadline = time.monotonic() + 30
    while "up" not in watch.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    watch.node.proc.wait(30)
    watch.stop()
    assert not watch.apps.alive()
    assert "got SIGTERM" not in watch.log.read_text()
    # A SuperNode that is still up: both get SIGTERM as usual.
    watch.node = processes.ManagedProcess("supernode", [sys.executable, "-c", SAYS_SIGTERM], {},
                                        tmp_path / "node.log")  # fmt: skip
    while "up" not in (tmp_path / "node.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    watch.apps = processes.ManagedProcess("clientapp", [sys.executable, "-c", SAYS_SIGTERM], {},
                                        tmp_path / "apps.log")  # fmt: skip
    while "up" not in (tmp_path / "apps.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    watch.stop()
    assert "got SIGTERM" in (tmp_path / "apps.log").read_text()
    assert "got SIGTERM" in (tmp_path / "node.log").read_text()
