"""Tests for pollen.deploy.warm_clientapp: a deployed client runs only Pollen's own app.

The attacker here is whoever can submit a run to the server's SuperLink (Flower
1.42's Control API on loopback has no authentication): it ships an app bundle
(FAB) of its own, built with Flower's own build function. The client must refuse
it, name it in its log, never run a line of it, and go on serving Pollen's runs.
"""

from __future__ import annotations

import hashlib
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import Message, Metadata, RecordDict
from flwr.cli.build import build_fab_from_files
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.types import ExecutionSpec

import pollen
import pollen.deploy.warm_clientapp as warm
from pollen.deploy.runtime import APP_COMPONENTS, APP_NAME, APP_PUBLISHER, app_dir

ROOT = Path(__file__).resolve().parents[2]
POLLEN_ID = f"{APP_PUBLISHER}/{APP_NAME}"


def _pollen_pyproject(tmp_path: Path) -> str:
    return (app_dir(tmp_path) / "pyproject.toml").read_text(encoding="utf-8")


def _fab(pyproject: str, extra: dict[str, bytes] | None = None) -> SimpleNamespace:
    """An app bundle as Flower builds it (``flwr run``), as the client receives it."""
    content, _ = build_fab_from_files({"pyproject.toml": pyproject.encode(), **(extra or {})})
    return SimpleNamespace(content=content, hash_str=hashlib.sha256(content).hexdigest())


def _raw_fab(files: dict[str, bytes]) -> SimpleNamespace:
    """A bundle written by hand, past Flower's build checks."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in files.items():
            bundle.writestr(name, data)
    content = buffer.getvalue()
    return SimpleNamespace(content=content, hash_str=hashlib.sha256(content).hexdigest())


def _run(run_id: int = 7, fab_id: str = POLLEN_ID, version: str | None = None):
    return SimpleNamespace(run_id=run_id, fab_id=fab_id, fab_version=version or pollen.__version__)


def _evil_code(marker: Path) -> bytes:
    """A module that leaves ``marker`` when imported, and exposes a ClientApp."""
    return (
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('pwned')\n"
        "from flwr.clientapp import ClientApp\napp = ClientApp()\n"
    ).encode()


def _attacks(tmp_path: Path, marker: Path) -> dict[str, tuple[SimpleNamespace, object]]:
    """Attacker bundles (and their runs), each with the reason the client must give."""
    own = _pollen_pyproject(tmp_path)
    evil = {"evil.py": _evil_code(marker)}
    other_component = own.replace('"pollen.client.app:app"', '"evil:app"')
    assert other_component != own
    return {
        "another component and its code": (_fab(other_component, evil), _run()),
        "Pollen's components with a Python file": (_fab(own, evil), _run()),
        "a shadowing pollen module": (
            _fab(own, {"pollen/client/app.py": _evil_code(marker)}),
            _run(),
        ),
        "another version": (
            _fab(own.replace(f'version = "{pollen.__version__}"', 'version = "9.9.9"')),
            _run(version="9.9.9"),
        ),
        "another publisher": (
            _fab(own.replace('publisher = "pollen"', 'publisher = "mallory"')),
            _run(fab_id=f"mallory/{APP_NAME}"),
        ),
        "an extra component": (
            _fab(
                own.replace(
                    "[tool.flwr.app.components]\n",
                    '[tool.flwr.app.components]\nextra = "evil:app"\n',
                ),
                evil,
            ),
            _run(),
        ),
        "a pyproject whose tables are not tables": (
            _raw_fab({"pyproject.toml": b"tool = 1\nproject = 'x'\n"}),
            _run(),
        ),
        "a pyproject that is not TOML": (_raw_fab({"pyproject.toml": b"\xff[[["}), _run()),
        "no pyproject at all": (_raw_fab({".info/CONTENT": b""}), _run()),
        "a run that names another app": (_fab(own), _run(fab_id="mallory/other")),
        "a bundle that is not its hash": (
            SimpleNamespace(content=_fab(own).content, hash_str="0" * 64),
            _run(),
        ),
        "not a zip": (
            SimpleNamespace(content=b"PK nope", hash_str=hashlib.sha256(b"PK nope").hexdigest()),
            _run(),
        ),
    }


# --- the identity the server ships and the client expects -----------------------------------


def test_the_checkouts_app_is_pollens_identity() -> None:
    """``flwr run`` from a checkout ships pyproject.toml: it must name what clients expect."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert config["project"]["name"] == APP_NAME
    assert config["project"]["version"] == pollen.__version__
    assert config["tool"]["flwr"]["app"]["publisher"] == APP_PUBLISHER
    assert config["tool"]["flwr"]["app"]["components"] == APP_COMPONENTS


def test_pollens_own_app_is_accepted(tmp_path: Path, monkeypatch) -> None:
    warm.check_app(_run(), _fab(_pollen_pyproject(tmp_path)))
    # An installed wheel (no checkout): app_dir generates the pyproject.toml, also accepted.
    import pollen.deploy.runtime as runtime

    monkeypatch.setattr(runtime, "__file__", str(tmp_path / "site/pollen/deploy/runtime.py"))
    (tmp_path / "wheel").mkdir()
    generated = (app_dir(tmp_path / "wheel") / "pyproject.toml").read_text(encoding="utf-8")
    assert generated != (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    warm.check_app(_run(), _fab(generated))


def test_every_attacker_app_is_refused_with_a_reason(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for name, (fab, run) in _attacks(tmp_path, marker).items():
        with pytest.raises(warm.ForeignAppError) as refused:
            warm.check_app(run, fab)
        assert str(refused.value), name
    assert not marker.exists()


# --- a task end to end through run_task, with the SuperNode's Runtime API faked -------------


class _FakeRuntime:
    """The SuperNode side of the app runner: serves tasks by token, records the pushes."""

    def __init__(self, monkeypatch, tasks: dict[str, tuple]) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        monkeypatch.setattr(TaskIdentity, "_run_id", 1)
        monkeypatch.setattr(TaskIdentity, "_node_id", 1)
        monkeypatch.setattr(TaskIdentity, "_task_id", 1)
        self.tasks = tasks
        self.replies: dict[str, Message] = {}
        self.outputs: dict[str, tuple] = {}
        self.logs: list[str] = []
        runtime = self

        class Client:
            def __init__(self, token: str) -> None:
                self.token = token

            def close(self) -> None:
                pass

        class Heartbeat:
            is_running = False

            def __init__(self, _fn) -> None:
                pass

            def start(self) -> None:
                pass

        def from_server_address(**kwargs):
            token = next(i for i in kwargs["interceptors"] if hasattr(i, "_token"))._token
            return Client(token)

        monkeypatch.setattr(
            warm.RuntimeHttpClient, "from_server_address", staticmethod(from_server_address)
        )
        monkeypatch.setattr(warm, "HeartbeatSender", Heartbeat)
        monkeypatch.setattr(warm, "task_heartbeat", lambda client: None)
        monkeypatch.setattr(warm, "pull_task_input", lambda client: runtime.tasks[client.token])
        monkeypatch.setattr(warm, "push_message", self._push_message)
        monkeypatch.setattr(warm, "push_task_output", self._push_task_output)
        monkeypatch.setattr(
            warm, "log", lambda level, msg, *args, **_: self.logs.append(msg % args)
        )

    def _log(self, level, msg, *args, **_) -> None:
        self.logs.append(msg % args)

    def _push_message(self, client, message, context) -> None:
        self.replies[client.token] = message

    def _push_task_output(self, client, context, sub_status, details) -> None:
        self.outputs[client.token] = (sub_status, details)


def _task(run, fab, run_id: int = 7) -> tuple:
    from flwr.app import Context

    meta = Metadata(
        run_id=run_id,
        message_id=f"msg-{run_id}",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600,
        message_type="query",
    )
    message = Message(metadata=meta, content=RecordDict())
    context = Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return message, context, SimpleNamespace(**{**vars(run), "run_id": run_id}), fab


def _spec(token: str, task_id: int = 1, task_type: TaskType = TaskType.CLIENT_APP):
    return ExecutionSpec(
        task_id=task_id,
        task_type=task_type,
        token=token,
        runtime_api_address="127.0.0.1:1",
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=None,
        suppress_output=False,
    )


def test_an_attacker_app_is_refused_named_and_never_run(tmp_path: Path, monkeypatch) -> None:
    """Every attacker bundle: an error reply naming the refusal, a log line naming the run,
    and its code never imported (Flower's own runner installs and imports it)."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    marker = tmp_path / "pwned"
    attacks = _attacks(tmp_path, marker)
    tasks = {name: _task(run, fab, 100 + i) for i, (name, (fab, run)) in enumerate(attacks.items())}
    runtime = _FakeRuntime(monkeypatch, tasks)
    for name in attacks:
        warm.run_task(_spec(name))
        assert not marker.exists(), f"{name}: the attacker's code ran"
        reply = runtime.replies[name]
        assert reply.has_error() and "refused by the client" in reply.error.reason, name
        assert runtime.outputs[name][0] == "failed", name
    refusals = [line for line in runtime.logs if line.startswith("[pollen] refused run ")]
    assert len(refusals) == len(attacks), runtime.logs
    assert all(f"run {100 + i} " in refusals[i] for i in range(len(attacks))), refusals
    assert not (tmp_path / "flwr-home").exists()  # nothing installed


def test_the_client_keeps_serving_pollens_runs_after_a_refusal(tmp_path: Path, monkeypatch) -> None:
    """Through the warm executor: the attacker's task is refused, Pollen's next one runs
    with the installed ClientApp."""
    marker = tmp_path / "pwned"
    own = _pollen_pyproject(tmp_path)
    evil = _fab(
        own.replace('"pollen.client.app:app"', '"evil:app"'), {"evil.py": _evil_code(marker)}
    )
    tasks = {"evil": _task(_run(8), evil, 8), "good": _task(_run(9), _fab(own), 9)}
    runtime = _FakeRuntime(monkeypatch, tasks)
    served: list[int] = []

    def pollen_app(message, context):
        served.append(context.run_id)
        return Message(RecordDict(), reply_to=message)

    monkeypatch.setattr(warm, "_client_app", lambda: pollen_app)
    executor = warm.WarmExecutor()
    assert executor.launch(_spec("evil", 1)).status == "accepted"
    assert executor.launch(_spec("good", 2)).status == "accepted"
    executor.close()
    executor._worker.join(30)
    assert served == [9]
    assert runtime.outputs == {
        "evil": ("failed", runtime.outputs["evil"][1]),
        "good": ("completed", ""),
    }
    assert not runtime.replies["good"].has_error()
    assert (
        "[pollen] task 1: refused" in runtime.logs and "[pollen] task 2: completed" in runtime.logs
    )
    assert not marker.exists()


def test_the_installed_client_app_is_pollens() -> None:
    from pollen.client.app import app

    assert warm._client_app() is app


# --- no other kind of task, no other process -------------------------------------------------


def test_no_task_starts_a_flower_process(monkeypatch) -> None:
    """Flower's executor would start flwr-serverapp & co., which install and run the bundle."""
    import flwr.supercore.superexec.executor.subprocess_executor as flower_executor

    started: list = []
    monkeypatch.setattr(flower_executor.subprocess, "Popen", lambda *a, **k: started.append(a))
    executor = warm.WarmExecutor()
    try:
        for kind in TaskType:
            if kind != TaskType.CLIENT_APP:
                assert executor.launch(_spec("x", task_type=kind)).status == "failed", kind
        eligible, _ = executor.get_eligible_capacity(set(TaskType), insecure=True)
        assert eligible == {TaskType.CLIENT_APP}
    finally:
        executor.close()
    assert started == []


# --- the runner signs its task requests with the client's secret -----------------------------


def test_main_hands_the_secret_to_flowers_superexec_loop(tmp_path: Path, monkeypatch) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cret")
    seen: dict = {}
    monkeypatch.setattr(warm, "run_superexec_with", lambda executor, **kw: seen.update(kw))
    monkeypatch.setattr(warm, "quick_clientapp_pulls", lambda: None)
    monkeypatch.setattr("pollen.wire.serve_later_messages", lambda: None)
    warm.main(
        [
            "--runtime-api-address",
            "127.0.0.1:1",
            "--insecure",
            "--superexec-auth-secret-file",
            str(secret),
        ]
    )
    assert seen["superexec_auth_secret"] == b"s3cret"
    secret.write_bytes(b"")
    with pytest.raises(SystemExit):
        warm.main(
            [
                "--runtime-api-address",
                "127.0.0.1:1",
                "--insecure",
                "--superexec-auth-secret-file",
                str(secret),
            ]
        )


def test_the_runner_asks_for_tasks_less_often_the_longer_none_came(monkeypatch) -> None:
    """At 10 asks a second, 50 idle clients on one machine kept a core busy."""
    import time

    monkeypatch.setattr(warm, "BUSY_WINDOW_SECONDS", 0.2)
    monkeypatch.setattr(warm, "IDLE_RAMP_SECONDS", 0.1)
    monkeypatch.setattr(warm, "IDLE_WAIT_MAX_SECONDS", 0.4)
    last_task = [time.monotonic()]
    waits = warm.task_wait_time(last_task)

    def slept(seconds: float) -> float:
        start = time.monotonic()
        waits.sleep(seconds)
        return time.monotonic() - start

    assert slept(0.05) < 0.15  # just after a task: the quick interval
    time.sleep(0.6)  # idle 0.4 s past the window: 0.05 s x (1 + 0.4 / 0.1)
    assert 0.2 <= slept(0.05) < 0.4
    time.sleep(1.0)
    assert 0.35 <= slept(0.05) < 0.7  # long idle: the maximum
    last_task[0] = time.monotonic()  # a task came
    assert slept(0.05) < 0.15
    assert waits.monotonic is time.monotonic


# --- no SIGINT from a thread of the SuperNode's process ---------------------------------


def _status_error(code: int):
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1:1/v1/runtime/send-task-heartbeat")
    return httpx.HTTPStatusError("refused", request=request, response=httpx.Response(code))


def test_a_refused_runtime_call_gives_up_without_signalling_the_supernodes_process(
    monkeypatch,
) -> None:
    """Flower's retry invoker sends SIGINT to its process on a 401; here that process is the
    SuperNode's (a heartbeat that left as its task was closed ended a client's SuperNode)."""
    import os

    from flwr.supercore.retry import make_simple_http_retry_invoker

    signals: list = []
    monkeypatch.setattr(os, "kill", lambda *args: signals.append(args))
    invoker = warm.without_signals(make_simple_http_retry_invoker())
    assert invoker.should_giveup(_status_error(401)) is True  # the task is over: give up
    assert invoker.should_giveup(_status_error(503)) is False  # Flower's: try again
    assert signals == []


def test_the_task_heartbeat_never_signals(monkeypatch) -> None:
    import signal

    import httpx

    raised: list = []
    monkeypatch.setattr(signal, "raise_signal", raised.append)
    answers = iter([_status_error(401), httpx.ConnectError("down"), _status_error(503), None])

    class Client:
        def SendTaskHeartbeat(self, request):  # noqa: N802 - Flower's name
            answer = next(answers)
            if answer is not None:
                raise answer
            return object()  # Flower's answer; its `success` is not read

    beat = warm.task_heartbeat(Client())
    assert [beat(), beat(), beat(), beat()] == [True, False, False, True]
    assert raised == []
