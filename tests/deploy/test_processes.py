"""Tests for pollen.deploy.processes: child processes stopped with everything they spawned."""

from __future__ import annotations

from pathlib import Path

import pollen.deploy.processes as processes

SPAWNS_OWN_SESSION = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(300)
"""


def test_managed_process_stop_reaches_children_in_their_own_sessions(tmp_path: Path) -> None:
    """Flower's SuperLink starts its SuperExec (and a simulation's server app and Ray
    workers under it) in new sessions, outside the SuperLink's process group: stopping
    the SuperLink must stop them too."""
    import sys
    import time

    log = tmp_path / "spawner.log"
    proc = processes.ManagedProcess("spawner", [sys.executable, "-c", SPAWNS_OWN_SESSION],
                                  {}, log)  # fmt: skip
    deadline = time.monotonic() + 30
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(log.read_text().split()[0])
    assert processes.descendants(proc.proc.pid) == [proc.proc.pid, child]
    proc.stop(timeout=5)
    assert not proc.alive()
    assert not processes.is_running(child)
