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


NICED_PARENT = """
import sys
from pathlib import Path
from pollen.deploy.processes import ManagedProcess
proc = ManagedProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], {}, None)
print(Path(f"/proc/{proc.proc.pid}/autogroup").read_text().split()[-1], flush=True)
proc.stop(timeout=5)
"""


def test_a_child_in_a_new_session_keeps_its_parents_niceness() -> None:
    """Under Linux's autogroups a new session is a scheduling group of its own, where the
    parent's ``nice`` would count for nothing: ``nice pollen client`` must nice its
    SuperNode too (the 50-client benchmark's server waited for the CPU without this)."""
    import os
    import subprocess
    import sys

    import pytest

    try:  # "/autogroup-676 nice 0"; absent, or empty in some sandboxes (CI's)
        ours = int(Path("/proc/self/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        pytest.skip("no readable autogroups on this system: nice works across sessions as it is")
    prio = os.getpriority(os.PRIO_PROCESS, 0)  # what this test runs at
    out = subprocess.run(
        ["nice", "-n", "7", sys.executable, "-c", NICED_PARENT],
        capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    assert out.stdout.split() == [str(max(ours, min(19, prio + 7)))]
    # Not niced (beyond what this test runs at): the child's group keeps that weight.
    expected = str(max(0, ours, prio))
    out = subprocess.run(
        [sys.executable, "-c", NICED_PARENT], capture_output=True, text=True, timeout=60,
        check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    assert out.stdout.split() == [expected]
