"""pollen.deploy.supernode: Flower's SuperNode with its idle poll capped."""

from __future__ import annotations

import sys
import time

import pytest

from pollen.deploy import supernode


def _slept(capped, seconds: float) -> float:
    start = time.monotonic()
    capped.sleep(seconds)
    return time.monotonic() - start


def test_capped_time_caps_sleep_and_forwards_the_rest() -> None:
    capped = supernode.capped_time(0.05, window=0)
    assert _slept(capped, 3) < 1.0  # Flower's idle wait
    assert _slept(capped, 0.01) >= 0.009  # shorter waits are kept
    assert capped.monotonic is time.monotonic and capped.time is time.time
    with pytest.raises(ValueError, match="positive"):
        supernode.capped_time(0)


def test_polls_are_quick_right_after_a_message_and_local_waits_short() -> None:
    capped = supernode.capped_time(0.4, busy=0.02, window=1.5, local=0.01)
    assert _slept(capped, 3) < 0.2  # the node's start opens a busy window
    time.sleep(1.6)
    assert 0.35 <= _slept(capped, 3) < 1.0  # idle: the poll cap
    assert _slept(capped, 0.5) < 0.2  # Flower's wait for the app's reply: the local cap
    assert _slept(capped, 3) < 0.2  # and the next polls come quickly for a while
    time.sleep(1.6)
    assert _slept(capped, 3) >= 0.35  # until the window has passed
    assert _slept(capped, 0.4) < 0.2
    assert _slept(supernode.capped_time(0.4, window=0), 3) >= 0.35  # no window


def test_an_idle_node_polls_less_and_less_often_up_to_flowers_own_wait(monkeypatch) -> None:
    """Fifty nodes polling every 0.5 s kept 2 cores busy; idle ones now back off."""
    monkeypatch.setattr(supernode, "IDLE_RAMP_SECONDS", 0.2)
    monkeypatch.setattr(supernode, "IDLE_POLL_MAX_SECONDS", 0.4)
    capped = supernode.capped_time(0.1, window=0)
    assert _slept(capped, 3) < 0.2  # just idle: the poll cap
    time.sleep(0.3)
    assert 0.2 <= _slept(capped, 3) < 0.6  # idle a while: longer, at most the maximum
    assert _slept(capped, 0.01) < 0.1  # a message: the node is busy again
    assert _slept(capped, 3) < 0.2


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, supernode.DEFAULT_POLL_SECONDS), ("", 0.5), ("0.2", 0.2)]
)
def test_poll_seconds_from_the_environment(monkeypatch, raw, expected) -> None:
    if raw is None:
        monkeypatch.delenv(supernode.POLL_ENV, raising=False)
    else:
        monkeypatch.setenv(supernode.POLL_ENV, raw)
    assert supernode.poll_seconds() == pytest.approx(expected)


@pytest.mark.parametrize("raw", ["zero", "-1", "0", "nan", "inf"])
def test_a_bad_poll_setting_is_refused_with_a_message(monkeypatch, raw) -> None:
    from pollen.errors import PollenError

    monkeypatch.setenv(supernode.POLL_ENV, raw)
    with pytest.raises(PollenError, match="POLLEN_SUPERNODE_POLL=.*positive number of seconds"):
        supernode.poll_seconds()


@pytest.mark.parametrize(("raw", "expected"), [(None, 60), ("", 60), ("30", 30), (" 1800 ", 1800)])
def test_heartbeat_seconds_from_the_environment(monkeypatch, raw, expected) -> None:
    if raw is None:
        monkeypatch.delenv(supernode.HEARTBEAT_ENV, raising=False)
    else:
        monkeypatch.setenv(supernode.HEARTBEAT_ENV, raw)
    assert supernode.heartbeat_seconds() == expected
    assert raw or expected == supernode.HEARTBEAT_DECLARED_SECONDS


@pytest.mark.parametrize("raw", ["9", "10", "29", "1801", "2.5", "-30", "soon"])
def test_a_bad_heartbeat_setting_is_refused_with_a_message(monkeypatch, raw) -> None:
    from pollen.errors import PollenError

    monkeypatch.setenv(supernode.HEARTBEAT_ENV, raw)
    with pytest.raises(PollenError, match="POLLEN_SUPERNODE_HEARTBEAT=.*from 30 to 1800"):
        supernode.heartbeat_seconds()


def test_main_runs_flowers_supernode_with_the_capped_poll(monkeypatch, capsys) -> None:
    from flwr.supernode import fleet_http_connection, start_client_internal

    monkeypatch.setattr(start_client_internal, "time", time)  # restored after the test
    monkeypatch.setattr(fleet_http_connection, "HEARTBEAT_DEFAULT_INTERVAL", 30)
    monkeypatch.setenv(supernode.POLL_ENV, "0.05")
    monkeypatch.delenv(supernode.HEARTBEAT_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["pollen.deploy.supernode", "--help"])
    with pytest.raises(SystemExit) as exit_:
        supernode.main()
    assert exit_.value.code == 0
    assert "--superlink" in capsys.readouterr().out  # Flower's own argument parser answered
    patched = start_client_internal.time
    assert patched is not time
    start = time.monotonic()
    patched.sleep(3)
    assert time.monotonic() - start < 1.0
    assert fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == 60  # declared to the SuperLink


def test_pollen_client_refuses_a_bad_poll_setting_before_it_starts(monkeypatch) -> None:
    from pollen.deploy import client
    from pollen.errors import PollenError

    monkeypatch.setenv(supernode.POLL_ENV, "abc")
    started: list = []
    monkeypatch.setattr(client, "_wait_for_server", lambda *a: started.append(a))
    with pytest.raises(PollenError, match="positive number of seconds"):
        client.join("127.0.0.1:9", {}, connect_timeout=1.0, tls=None)
    assert not started  # refused before dialling the server


SPAWNS_A_SUPERNODE = """
import os, subprocess, sys
argv = [sys.executable, "-m", "pollen.deploy.supernode", "--insecure", "--superlink", sys.argv[1],
        "--isolation", "process", "--host", "127.0.0.1", "--port", sys.argv[2]]
node = subprocess.Popen(argv, env={**os.environ, "POLLEN_PARENT_PID": str(os.getpid())},
                        start_new_session=True, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
print(node.pid, flush=True)
node.wait()
"""


def test_a_supernode_stops_once_the_pollen_client_that_started_it_is_killed() -> None:
    """`pollen client` killed with SIGKILL cannot stop its SuperNode: the SuperNode notices."""
    import os
    import signal
    import subprocess

    from pollen.deploy.processes import free_port, is_running

    dead_server = f"127.0.0.1:{free_port()}"  # nobody listens: the SuperNode keeps retrying
    parent = subprocess.Popen(
        [sys.executable, "-c", SPAWNS_A_SUPERNODE, dead_server, str(free_port())],
        stdout=subprocess.PIPE,
        text=True,
    )
    node = int(parent.stdout.readline())
    try:
        time.sleep(8)  # imports done, retrying the connection
        assert is_running(node)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 30
        while is_running(node) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not is_running(node)
    finally:
        if is_running(node):
            os.kill(node, signal.SIGKILL)
