"""A deployed client's app runner: one warm process for all of a run's messages.

Flower 1.42's SuperNode, in its default ``subprocess`` isolation, starts a
SuperExec that launches a fresh ``flwr-clientapp`` process for every message
(each train and each evaluate request). Every message then pays Python's and
Keras's imports, the client's data loading, the model build and the first
traced train step again (see docs/performance.md#warm-clientapp).

``pollen client`` instead runs its SuperNode with ``--isolation process`` and
this module beside it (``python -m pollen.deploy.warm_clientapp``): Flower's own
SuperExec loop (``run_superexec``: it polls the SuperNode's Runtime API for
tasks and hands each to an executor), given :class:`WarmExecutor`, which runs
ClientApp tasks in this process, one after the other, on one worker thread.
Imported modules stay imported, so the client app's per-process caches (its
data, its compiled model) serve every message of the run.

Why not a library: Flower 1.42 ships a subprocess executor and a Kubernetes
one (whose "warm" pods are pre-started, not reused), and ``run_clientapp``
ends in ``flwr_exit``, which ends the process. :func:`run_task` is therefore
``run_clientapp``'s body without the exit, on Flower's own helpers.
"""

from __future__ import annotations

import argparse
import queue
import threading
from logging import ERROR, INFO
from typing import Any

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
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

__all__ = ["WarmExecutor", "main", "run_task"]


def run_task(spec: ExecutionSpec) -> str:
    """Run one ClientApp task in this process, as ``flwr-clientapp --token`` would.

    Pulls the message, its context and the app bundle from the SuperNode,
    loads the ClientApp (a module imported once stays imported), runs it, and
    pushes the reply and the task's final status. An exception in the app is
    reported to the SuperNode as the reply's error, as Flower does.

    Args:
        spec: The task: its token and the SuperNode's Runtime API address.

    Returns:
        The task's final sub-status (``"completed"`` or ``"failed"``).
    """
    retry_invoker = make_simple_http_retry_invoker()
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
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message: Any = None
    reply: Any = None
    context: Any = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        install_from_fab(fab.content, skip_prompt=True)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        app = load(run.fab_id, run.fab_version, fab.hash_str)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
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
        retry_invoker.max_tries = 1  # do not hang on a SuperNode that is gone
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return status


class WarmExecutor(SubprocessExecutor):
    """Runs ClientApp tasks in this process on one worker thread, in arrival order.

    Other task types (which a SuperNode does not send) start processes as in
    Flower's subprocess executor.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tasks: queue.Queue[ExecutionSpec | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="pollen-clientapp", daemon=True)
        self._worker.start()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Queue a ClientApp task for the worker thread; launch anything else as Flower does."""
        if spec.task_type != TaskType.CLIENT_APP:
            return super().launch(spec)
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


def main(argv: list[str] | None = None) -> None:
    """``python -m pollen.deploy.warm_clientapp``: Flower's SuperExec loop with :class:`WarmExecutor`.

    Takes the arguments of ``flower-superexec`` that a SuperNode passes to it:
    ``--runtime-api-address``, ``--insecure`` or ``--root-certificates``, and
    ``--parent-pid`` (exit when that process does).
    """  # noqa: E501 - the first line is also the --help description
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)

    from pollen.wire import serve_later_messages

    # A task arrives while the SuperNode is still downloading its message.
    quick_clientapp_pulls()
    serve_later_messages()  # weights kept for the next message are still here then
    # Flower 1.42 picks its executor by name (subprocess or kubernetes) inside
    # run_superexec; compat hands it ours.
    run_superexec_with(
        WarmExecutor,
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
    )


if __name__ == "__main__":
    main()
