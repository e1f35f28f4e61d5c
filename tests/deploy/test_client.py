"""Tests for pollen.deploy.client: the watchdog over a client's SuperNode and app runner."""

from __future__ import annotations

from pathlib import Path

import pytest

import pollen.deploy.processes as processes

# --- the SuperNode's Runtime API takes task requests from the client's own runner only ----------


def _argv(tmp_path: Path, port: int = 9) -> list[str]:
    import os

    from pollen.deploy.client import _supernode_argv, write_secret

    home = tmp_path / "home"
    home.mkdir(mode=0o700, exist_ok=True)
    secret = home / "superexec-secret"
    if not secret.exists():
        write_secret(secret)
    assert os.stat(secret).st_mode & 0o777 == 0o600
    return _supernode_argv("127.0.0.1", port, {"threads": 0}, None, secret)


def test_the_supernode_and_its_runner_share_a_private_secret(tmp_path: Path) -> None:
    """Flower's SuperExec auth: the SuperNode hands tasks only to requests signed with it."""
    from pollen.deploy.client import write_secret

    argv = _argv(tmp_path)
    secret = Path(argv[argv.index("--superexec-auth-secret-file") + 1])
    assert argv[argv.index("--isolation") + 1] == "process"  # never flwr-clientapp per task
    assert len(secret.read_bytes()) >= 32
    other = write_secret(tmp_path / "other")
    assert other.read_bytes() != secret.read_bytes()  # random per client
    with pytest.raises(FileExistsError):  # never written through a planted file or link
        write_secret(other)


def test_the_supernode_process_runs_its_app_runner_on_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process per client for the SuperNode and its runner, which signs with the
    client's secret; a runner that stops ends the process (the client joins again)."""
    import os
    import signal

    import pollen.deploy.warm_clientapp as warm
    from pollen.errors import PollenError

    argv = _argv(tmp_path)
    calls: list[tuple[str, dict]] = []
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(warm, "serve", lambda address, **kw: calls.append((address, kw)))
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append((pid, sig)))
    warm.serve_beside_supernode(argv[3:]).join(30)  # the arguments after `-m MODULE`
    secret = Path(argv[argv.index("--superexec-auth-secret-file") + 1]).read_bytes()
    port = argv[argv.index("--port") + 1]
    assert calls == [(f"127.0.0.1:{port}", {"secret": secret, "signals": False})]
    assert kills == [(os.getpid(), signal.SIGTERM)]
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    argv[argv.index("--superexec-auth-secret-file") + 1] = str(empty)
    with pytest.raises(PollenError, match="empty"):
        warm.serve_beside_supernode(argv)


ACQUIRE_TASK = "/v1/runtime/acquire-task"


def test_another_local_process_cannot_take_the_clients_tasks(tmp_path: Path) -> None:
    """A real SuperNode started as `pollen client` starts it: an unsigned request for a task
    is refused (HTTP 401); one signed with the client's secret is served."""
    import time
    import urllib.error
    import urllib.request

    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    from pollen.deploy.processes import free_port, port_open
    from pollen.deploy.runtime import flower_env

    argv = _argv(tmp_path, free_port())  # nobody listens there: the SuperNode keeps retrying
    port = int(argv[argv.index("--port") + 1])
    node = processes.ManagedProcess(
        "supernode", argv, flower_env(tmp_path / "home"), tmp_path / "node.log"
    )
    try:
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", port):
            assert node.alive() and time.monotonic() < deadline, node.tail()
            time.sleep(0.2)
        body = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]).SerializeToString()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{ACQUIRE_TASK}",
            data=body,
            headers={"content-type": "application/protobuf"},
        )
        try:
            urllib.request.urlopen(request, timeout=10)
            status = 200
        except urllib.error.HTTPError as refused:
            status = refused.code
        assert status == 401, f"an unsigned request for a task got HTTP {status}"
        secret = Path(argv[argv.index("--superexec-auth-secret-file") + 1]).read_bytes()
        signer = SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})
        )
        client = RuntimeHttpClient.from_server_address(
            server_address=f"127.0.0.1:{port}",
            insecure=True,
            root_certificates=None,
            interceptors=[signer],
            retry_invoker=None,
        )
        assert not client.AcquireTask(AcquireTaskRequest()).HasField("task")  # served: no task
        client.close()
    finally:
        node.stop()


def test_probe_port_tells_open_from_closed() -> None:
    import socket

    from pollen.deploy.processes import free_port, probe_port

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert probe_port("127.0.0.1", listener.getsockname()[1], 2.0) == "open"
    assert probe_port("127.0.0.1", free_port(), 2.0) == "closed"


class _FakeWatch:
    """What ``_watch_until_done`` uses of a ``_NodeWatch``: alive processes and restarts."""

    class _Alive:
        def alive(self) -> bool:
            return True

    def __init__(self) -> None:
        self.node = self._Alive()
        self.restarts: list[str] = []

    def echo(self) -> None:
        pass

    def restart(self, why: str) -> None:
        self.restarts.append(why)


def _watch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, probes: list[str]) -> _FakeWatch:
    """Run the watch loop on a fake clock over ``probes`` (one per check); the run then ends."""
    import pollen.deploy.client as client

    clock = [0.0]
    done = tmp_path / "done"
    answers = iter(probes)

    class FakeTime:
        @staticmethod
        def monotonic() -> float:
            return clock[0]

        @staticmethod
        def sleep(seconds: float) -> None:
            clock[0] += seconds

    def probe(host: str, port: int, timeout: float) -> str:
        state = next(answers, None)
        if state is None:
            done.touch()
            return "open"
        return state

    monkeypatch.setattr(client, "time", FakeTime)
    monkeypatch.setattr(client, "probe_port", probe)
    watch = _FakeWatch()
    client._watch_until_done(watch, done, "127.0.0.1", 1, 120.0, None)  # type: ignore[arg-type]
    return watch


def test_a_busy_server_that_answers_late_is_not_taken_for_a_restart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under load, checks time out; rejoining then made a new node in mid-round."""
    watch = _watch(monkeypatch, tmp_path, ["silent", "silent", "silent", "open", "open"])
    assert watch.restarts == []
    assert capsys.readouterr().out.count("lost the server") == 1  # said once, not per check


def test_a_server_whose_port_closed_and_came_back_is_joined_afresh(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    watch = _watch(monkeypatch, tmp_path, ["closed", "closed", "open"])
    assert watch.restarts == ["the server restarted"]


def test_a_server_silent_past_the_connect_timeout_ends_the_client(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pollen.errors import PollenError

    with pytest.raises(PollenError, match="for more than 120 s"):
        _watch(monkeypatch, tmp_path, ["silent"] * 100)
