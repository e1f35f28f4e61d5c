"""A deployed client's app runner: one warm process for all of a run's messages.

Flower 1.42's SuperNode, in its default ``subprocess`` isolation, starts a
SuperExec that launches a fresh ``flwr-clientapp`` process for every message
(each train and each evaluate request). Every message then pays Python's and
Keras's imports, the client's data loading, the model build and the first
traced train step again (see docs/performance.md#warm-clientapp).

``pollen client`` instead runs its SuperNode with ``--isolation process`` and
this module on a thread of the SuperNode's process (:func:`serve_beside_supernode`;
``python -m pollen.deploy.warm_clientapp`` runs it alone): Flower's own
SuperExec loop (``run_superexec``: it polls the SuperNode's Runtime API for
tasks and hands each to an executor), given :class:`WarmExecutor`, which runs
ClientApp tasks in this process, one after the other, on one worker thread.
Imported modules stay imported, so the client app's per-process caches (its
data, its compiled model) serve every message of the run.

Only Pollen's own app runs here (:func:`check_app`): a task whose app bundle
(FAB) is not Pollen's, at this client's version, with Pollen's two components
and nothing but its ``pyproject.toml``, is refused and named in the log, and
the client goes on serving Pollen's runs. The bundle is never installed: the
client app is imported from the installed ``pollen`` package. The SuperNode's
Runtime API on loopback hands tasks only to a runner holding the client's
secret (``--superexec-auth-secret-file``). See docs/security.md.

Why not a library: Flower 1.42 ships a subprocess executor and a Kubernetes
one (whose "warm" pods are pre-started, not reused), and ``run_clientapp``
ends in ``flwr_exit``, which ends the process. :func:`run_task` is therefore
``run_clientapp``'s body without the exit, on Flower's own helpers.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import io
import os
import queue
import signal
import threading
import time
import tomllib
import zipfile
import zlib
from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.clientapp.client_app import LoadClientAppError
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from pollen.compat.flower import quick_clientapp_pulls, run_superexec_with
from pollen.deploy.runtime import APP_COMPONENTS, APP_NAME, APP_PUBLISHER, app_version
from pollen.errors import PollenError

__all__ = ["FAB_FILES", "ForeignAppError", "WarmExecutor", "check_app", "main", "run_task"]

#: The files a Pollen app bundle holds: its ``pyproject.toml`` and Flower's manifest.
FAB_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
#: Largest ``pyproject.toml`` read from a bundle, bytes (Pollen's: about 30 KB).
MAX_PYPROJECT_BYTES = 1 << 20


class ForeignAppError(Exception):
    """A task's app is not this client's Pollen: it is refused, and none of it runs."""


def check_app(run: Any, fab: Any) -> None:
    """Accept a task's app only if it is Pollen's own, as installed in this process.

    Pollen's app bundle holds no code: only a ``pyproject.toml`` naming publisher
    ``pollen``, project ``pollen-fl``, this package's version and the components
    ``pollen.server.app:app`` and ``pollen.client.app:app`` (plus Flower's
    manifest). Anything else (another app, another version, another component,
    a Python file) is refused.

    Args:
        run: The task's run (``fab_id``, ``fab_version``).
        fab: The task's app bundle (``hash_str``, ``content``: the zip's bytes).

    Raises:
        ForeignAppError: Why the app is not Pollen's own.
    """
    if hashlib.sha256(fab.content).hexdigest() != fab.hash_str:
        raise ForeignAppError("its app bundle does not match its hash")
    _check_bundle(fab.content)
    want_id, want_version = f"{APP_PUBLISHER}/{APP_NAME}", app_version()
    if (run.fab_id, run.fab_version) != (want_id, want_version):
        raise ForeignAppError(f"the run names the app {run.fab_id} {run.fab_version}")


@functools.lru_cache(maxsize=4)  # a run's tasks share one bundle: checked once
def _check_bundle(content: bytes) -> None:
    """Raise ForeignAppError unless the bundle ``content`` is Pollen's, at this version."""
    config = _bundle_config(content)
    app = _table(_table(_table(config, "tool"), "flwr"), "app")
    project = _table(config, "project")
    fab_id = f"{app.get('publisher')}/{project.get('name')}"
    want_id, want_version = f"{APP_PUBLISHER}/{APP_NAME}", app_version()
    if (fab_id, project.get("version")) != (want_id, want_version):
        raise ForeignAppError(
            f"its app is {fab_id} {project.get('version')}, not {want_id} {want_version}"
        )
    if app.get("components") != APP_COMPONENTS:
        raise ForeignAppError(f"its app's components are {app.get('components')!r}")


def _table(config: dict[str, Any], key: str) -> dict[str, Any]:
    """``config[key]`` if it is a table, else an empty one."""
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def _bundle_config(content: bytes) -> dict[str, Any]:
    """The ``pyproject.toml`` of an app bundle that holds nothing else but the manifest.

    Raises:
        ForeignAppError: The bundle holds other files, or no readable ``pyproject.toml``.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as bundle:
            names = bundle.namelist()
            extra = sorted(set(names) - FAB_FILES)
            if extra or len(set(names)) != len(names):
                shown = ", ".join(extra[:5]) or "duplicate entries"
                raise ForeignAppError(f"its app bundle carries files Pollen's never does: {shown}")
            with bundle.open("pyproject.toml") as f:  # its declared size may lie: read a cap
                raw = f.read(MAX_PYPROJECT_BYTES + 1)
        if len(raw) > MAX_PYPROJECT_BYTES:
            raise ForeignAppError("its app bundle's pyproject.toml is oversized")
        return tomllib.loads(raw.decode("utf-8"))
    except (zipfile.BadZipFile, zlib.error, KeyError, ValueError, RuntimeError, EOFError,
            NotImplementedError, OSError) as ex:  # fmt: skip
        # ValueError: also UnicodeDecodeError and TOMLDecodeError; RuntimeError: encrypted.
        raise ForeignAppError(f"its app bundle is not a readable Flower app ({ex})") from None


@functools.cache
def _client_app() -> Any:
    """Pollen's ClientApp, imported from the installed package (never from a bundle)."""
    module, _, attr = APP_COMPONENTS["clientapp"].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as ex:
        raise LoadClientAppError(f"Cannot import {APP_COMPONENTS['clientapp']}: {ex}") from ex


# This runner is a thread of the SuperNode's process (serve_beside_supernode). Flower's
# runtime client pieces end their process with SIGINT when the SuperNode no longer knows a
# task (made for a `flwr-clientapp` process of its own): here that signal would stop the
# SuperNode. At 25 clients on 2 cores one heartbeat that left as its task was closed ended
# a client's SuperNode between two rounds (it joined again and missed round 3). The two
# below keep Flower's behaviour but for the signal: a task that is over ends its calls.


def without_signals(invoker: RetryInvoker) -> RetryInvoker:
    """Flower's HTTP retry invoker, but an HTTP 401 gives up the call instead of sending SIGINT.

    ``flwr.supercore.retry.make_simple_http_retry_invoker``'s ``should_giveup``
    signals its own process on a 401 (for the runtime API: "Runtime task-token
    authentication failed", the task is over). Checked: flwr==1.42.0.
    """
    flowers = invoker.should_giveup

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401:
            return True
        return bool(flowers(exc)) if flowers is not None else False

    invoker.should_giveup = should_giveup
    return invoker


def task_heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """A task's heartbeat to its SuperNode, without the SIGINT of Flower's own.

    Flower's ``flwr.supercore.heartbeat.make_task_heartbeat_fn_http`` signals its
    process when the SuperNode no longer knows the task. Checked: flwr==1.42.0.

    Returns:
        The function a ``HeartbeatSender`` calls: False to try again soon (the
        SuperNode did not answer), True otherwise (a task that is over has nothing
        to keep alive).
    """
    request = SendTaskHeartbeatRequest()

    def heartbeat() -> bool:
        try:
            client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            return err.response.status_code not in (503, 504)
        return True

    return heartbeat


def run_task(spec: ExecutionSpec) -> str:
    """Run one ClientApp task in this process, as ``flwr-clientapp --token`` would.

    Pulls the message, its context and the app bundle from the SuperNode,
    checks that the app is Pollen's own (:func:`check_app`; else the task is
    refused, named in the log, and its reply is an error), runs Pollen's
    ClientApp (imported once, from the installed package), and pushes the
    reply and the task's final status. An exception in the app is reported to
    the SuperNode as the reply's error, as Flower does.

    Args:
        spec: The task: its token and the SuperNode's Runtime API address.

    Returns:
        ``"completed"``, ``"failed"`` or ``"refused"`` (another app's task).
    """
    retry_invoker = without_signals(make_simple_http_retry_invoker())
    client = RuntimeHttpClient.from_server_address(
        server_address=spec.runtime_api_address,
        insecure=spec.insecure,
        root_certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        interceptors=[
            RuntimeTracingInterceptor(),
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(spec.token),
        ],
        retry_invoker=retry_invoker,
    )
    heartbeat = HeartbeatSender(task_heartbeat(client))
    message: Any = None
    reply: Any = None
    context: Any = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    outcome = "failed"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        check_app(run, fab)
        reply = _client_app()(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
        outcome = "completed"
    except ForeignAppError as ex:
        details, outcome = f"refused by the client: {ex}", "refused"
        log(
            WARNING,
            "[pollen] refused run %s (task %s): %s. This client runs only Pollen %s's own "
            "app; nothing of this run was installed or run.",
            run.run_id,
            spec.task_id,
            ex,
            app_version(),
        )
        error = Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=details)
        reply = Message(error, reply_to=message)
    except Exception as ex:  # noqa: BLE001 - reported to the SuperNode, like flwr-clientapp
        if isinstance(ex, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            details = "An exception was raised when attempting to load `ClientApp`"
        else:
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(ex)}:<'{ex}'>"
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001
                log(ERROR, "Failed to push reply message", exc_info=ex)
        # Before the task is closed: a heartbeat for a closed task is refused.
        if heartbeat.is_running:
            heartbeat.stop()
        retry_invoker.max_tries = 1  # do not hang on a SuperNode that is gone
        push_task_output(client=client, context=context, sub_status=status, details=details)
        client.close()
    return outcome


#: Seconds after its last task during which the runner asks its SuperNode for the next
#: one at the quick interval (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, 0.1 s); after that the
#: wait grows by that interval every IDLE_RAMP_SECONDS, up to Flower's own 1 s. Each ask is
#: an HTTP request the SuperNode answers: at 10 a second, 50 idle clients on one machine
#: kept a core busy (benchmarks/scale_deploy.py).
BUSY_WINDOW_SECONDS, IDLE_RAMP_SECONDS, IDLE_WAIT_MAX_SECONDS = 10.0, 2.0, 1.0


def task_wait_time(last_task: list[float]) -> ModuleType:
    """A stand-in for ``time`` whose ``sleep`` waits longer the longer no task came.

    Args:
        last_task: One monotonic time, of the runner's start or last task
            (:class:`WarmExecutor` updates it).
    """

    def sleep(seconds: float) -> None:
        idle = time.monotonic() - last_task[0] - BUSY_WINDOW_SECONDS
        if idle > 0:
            seconds = max(
                seconds, min(seconds * (1 + idle / IDLE_RAMP_SECONDS), IDLE_WAIT_MAX_SECONDS)
            )
        time.sleep(seconds)

    stand_in = ModuleType("time")
    stand_in.__dict__.update(vars(time))
    stand_in.sleep = sleep
    return stand_in


class WarmExecutor(SubprocessExecutor):
    """Runs ClientApp tasks in this process on one worker thread, in arrival order.

    It asks its SuperNode for ClientApp tasks only, and refuses any other task
    type (a SuperNode sends none): no task ever starts a Flower process (which
    would install and run the task's app bundle).
    """

    def __init__(self, last_task: list[float] | None = None) -> None:
        super().__init__()
        #: Monotonic time of the start or the last task, for :func:`task_wait_time`.
        self.last_task = last_task if last_task is not None else [time.monotonic()]
        self._tasks: queue.Queue[ExecutionSpec | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="pollen-clientapp", daemon=True)
        self._worker.start()

    def get_eligible_capacity(
        self, supported_task_types: set[TaskType], **_: Any
    ) -> tuple[set[TaskType], set[str]]:
        """Only ClientApp tasks, always (they queue for the worker thread)."""
        return supported_task_types & {TaskType.CLIENT_APP}, set()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Queue a ClientApp task for the worker thread; refuse any other task type."""
        if spec.task_type != TaskType.CLIENT_APP:
            log(WARNING, "[pollen] refused task %s of type %s", spec.task_id, spec.task_type)
            return LaunchResult.failed(f"pollen runs only ClientApp tasks, not {spec.task_type}")
        self.last_task[0] = time.monotonic()
        self._tasks.put(spec)
        return LaunchResult.accepted()

    def close(self) -> None:
        """Let the worker finish its task, then stop it."""
        self._tasks.put(None)

    def _work(self) -> None:
        while (spec := self._tasks.get()) is not None:
            try:
                log(INFO, "[pollen] task %s: %s", spec.task_id, run_task(spec))
            except Exception as ex:  # noqa: BLE001 - keep serving the next tasks
                log(ERROR, "[pollen] task %s could not run", spec.task_id, exc_info=ex)
            self.last_task[0] = time.monotonic()  # the next message follows soon


def serve(
    runtime_api_address: str,
    *,
    insecure: bool = True,
    root_certificates: str | None = None,
    secret: bytes | None = None,
    parent_pid: int | None = None,
    signals: bool = True,
) -> None:
    """Serve the SuperNode at ``runtime_api_address``'s ClientApp tasks until the process ends.

    Flower's SuperExec loop with :class:`WarmExecutor`. ``secret`` signs this
    runner's requests for tasks (the SuperNode's ``--superexec-auth-secret-file``);
    ``parent_pid``: stop when that process is gone; ``signals``: register Flower's
    signal handlers (main thread only).
    """
    from pollen.server.console import tag_pollen_lines
    from pollen.wire import serve_later_messages

    tag_pollen_lines()  # `pollen client` shows the client app's own lines, not Flower's
    # A task arrives while the SuperNode is still downloading its message.
    quick_clientapp_pulls()
    serve_later_messages()  # weights kept for the next message are still here then
    # Flower 1.42 picks its executor by name (subprocess or kubernetes) inside
    # run_superexec; compat hands it ours.
    last_task = [time.monotonic()]
    run_superexec_with(
        lambda: WarmExecutor(last_task),
        time_module=task_wait_time(last_task),
        signals=signals,
        runtime_api_address=runtime_api_address,
        insecure=insecure,
        root_certificates_path=root_certificates,
        superexec_auth_secret=secret,
        parent_pid=parent_pid,
    )


def serve_beside_supernode(supernode_argv: list[str]) -> threading.Thread:
    """Start :func:`serve` on a daemon thread of this process, a SuperNode's, for its tasks.

    ``supernode_argv``: the SuperNode's arguments (``--port`` of its Runtime API on
    loopback, ``--superexec-auth-secret-file``). One process for the SuperNode and
    its app runner holds Python, Flower and their libraries once: 55 MB less
    per client than two processes (docs/scale.md#many-deployed-clients). Should the
    runner stop (a Flower exit on a broken Runtime API), the process ends with
    SIGTERM, as the SuperNode does on its own failures: the client joins again.
    """
    port = supernode_argv[supernode_argv.index("--port") + 1]
    key = None  # a SuperNode without a secret hands tasks to any local runner
    if "--superexec-auth-secret-file" in supernode_argv:
        secret = Path(supernode_argv[supernode_argv.index("--superexec-auth-secret-file") + 1])
        if not (key := secret.read_bytes()):
            raise PollenError(f"The app runner's secret file {secret} is empty.")

    def run() -> None:
        try:
            serve(f"127.0.0.1:{port}", secret=key, signals=False)
        finally:
            log(ERROR, "[pollen] the client's app runner stopped; stopping its SuperNode")
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, name="pollen-apprunner", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    """``python -m pollen.deploy.warm_clientapp``: Flower's SuperExec loop with :class:`WarmExecutor`.

    Takes the arguments of ``flower-superexec`` that a SuperNode passes to it:
    ``--runtime-api-address``, ``--insecure`` or ``--root-certificates``,
    ``--parent-pid`` (exit when that process does) and
    ``--superexec-auth-secret-file`` (the secret the SuperNode was started with:
    it signs this runner's requests for tasks). ``pollen client`` runs the same
    loop on a thread of its SuperNode's process instead (:func:`serve_beside_supernode`).
    """  # noqa: E501 - the first line is also the --help description
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--superexec-auth-secret-file", type=Path, default=None)
    args = parser.parse_args(argv)
    secret = (
        args.superexec_auth_secret_file.read_bytes() if args.superexec_auth_secret_file else None
    )
    if secret == b"":
        parser.error("--superexec-auth-secret-file: the file is empty")
    serve(
        args.runtime_api_address,
        insecure=args.insecure,
        root_certificates=args.root_certificates,
        secret=secret,
        parent_pid=args.parent_pid,
    )


if __name__ == "__main__":
    main()
