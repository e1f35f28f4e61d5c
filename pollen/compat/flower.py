"""Flower's private internals that Pollen uses, each behind one named function.

Checked against :data:`pollen.compat.FLOWER`; ``tests/test_compat.py`` checks
each one. The Flower runtime pieces that :mod:`pollen.deploy.warm_clientapp`
builds its app runner from are listed, with the parameters it passes them, in
:data:`WARM_CLIENTAPP_NAMES` (the runner's logic stays in its own module).
Flower is imported inside the functions (heavy).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = [
    "PULL_FIRST_RETRY",
    "PULL_RETRY_CAP",
    "WARM_CLIENTAPP_NAMES",
    "cap_supernode_sleeps",
    "declare_heartbeat_interval",
    "is_simulation_grid",
    "quick_clientapp_pulls",
    "quick_pulls",
    "quick_serverapp_pulls",
    "quick_simulation_dispatch",
    "quick_supernode_pulls",
    "run_superexec_with",
    "simulation_partitions",
    "start_parent_process_monitor",
]


# --- Flower: object pulls ------------------------------------------------------------------

#: Seconds before a pull asks again for an object that has not arrived yet (Flower: 1 s).
PULL_FIRST_RETRY = 0.05
#: Longest wait between such retries, seconds (Flower: 10 s).
PULL_RETRY_CAP = 0.25


def quick_pulls(module: ModuleType, name: str) -> None:
    """Make ``module.<name>``, one of Flower's object pulls, retry sooner.

    A receiver in Flower learns of a message before its content has arrived:
    the SuperNode hands a task to the client app while it is still
    downloading the message, and a reply is listed to the ServerApp while the
    SuperNode is still uploading it. Flower's pulls then wait 1 s, 2 s, 4 s...
    (up to 10 s) between tries. Here the first retry comes after
    :data:`PULL_FIRST_RETRY` seconds, doubling up to :data:`PULL_RETRY_CAP`;
    the tries allowed are raised to keep Flower's patience
    (``PULL_MAX_TIME``, 7,200 s in all). Calling it again does nothing.
    (See docs/performance.md#loopback-deployment.)

    Relies on ``flwr.supercore.constant.PULL_MAX_TIME`` and on the keywords
    ``initial_backoff``, ``backoff_cap`` and ``max_tries_per_object`` of
    ``flwr.supercore.inflatable.inflatable_utils.pull_objects`` and
    ``pull_and_inflate_object_from_tree``, which the modules below import by
    name. Checked: flwr==1.42.0.

    Args:
        module: The module that imported the pull function (its global is
            replaced): ``flwr.supernode.start_client_internal`` (SuperNode),
            ``flwr.supernode.runtime.run_clientapp`` (client app) or
            ``flwr.superlink.grid.http_grid`` (ServerApp).
        name: ``"pull_objects"`` or ``"pull_and_inflate_object_from_tree"``.
    """
    from flwr.supercore.constant import PULL_MAX_TIME

    pull = getattr(module, name)
    if isinstance(pull, functools.partial):  # already done in this process
        return
    setattr(
        module,
        name,
        functools.partial(
            pull,
            initial_backoff=PULL_FIRST_RETRY,
            backoff_cap=PULL_RETRY_CAP,
            max_tries_per_object=int(PULL_MAX_TIME / PULL_RETRY_CAP),
        ),
    )


def quick_serverapp_pulls() -> None:
    """:func:`quick_pulls` for a deployed ServerApp's pulls of the clients' replies.

    Relies on ``flwr.superlink.grid.http_grid.pull_objects``. Checked: flwr==1.42.0.
    """
    from flwr.superlink.grid import http_grid

    quick_pulls(http_grid, "pull_objects")


def quick_clientapp_pulls() -> None:
    """:func:`quick_pulls` for a client app's pulls of its message from its SuperNode.

    Relies on ``flwr.supernode.runtime.run_clientapp.pull_and_inflate_object_from_tree``.
    Checked: flwr==1.42.0.
    """
    from flwr.supernode.runtime import run_clientapp

    quick_pulls(run_clientapp, "pull_and_inflate_object_from_tree")


def quick_supernode_pulls() -> None:
    """:func:`quick_pulls` for a SuperNode's pulls of a message's content from the server.

    Relies on ``flwr.supernode.start_client_internal.pull_objects``. Checked: flwr==1.42.0.
    """
    from flwr.supernode import start_client_internal

    quick_pulls(start_client_internal, "pull_objects")


# --- Flower: SuperNode, SuperExec, grids ---------------------------------------------------


def cap_supernode_sleeps(time_module: ModuleType) -> None:
    """Make the SuperNode in this process sleep with ``time_module.sleep``.

    Relies on ``flwr.supernode.start_client_internal`` calling ``time.sleep``
    through its module global ``time``: 3 s between idle polls of the server,
    0.5 s while waiting on its own app and object store. Checked: flwr==1.42.0.

    Args:
        time_module: A stand-in for the ``time`` module (e.g.
            :func:`pollen.deploy.supernode.capped_time`).
    """
    from flwr.supernode import start_client_internal

    start_client_internal.time = time_module


def declare_heartbeat_interval(seconds: int) -> None:
    """Make the SuperNode in this process declare a heartbeat every ``seconds`` to the SuperLink.

    Relies on ``flwr.supernode.fleet_http_connection`` sending its module global
    ``HEARTBEAT_DEFAULT_INTERVAL`` (30 s) as the interval when it activates the
    node and with every heartbeat; the SuperLink takes a node for gone after
    twice that without one. The heartbeats themselves still leave every ~20 s
    (``flwr.supercore.heartbeat`` keeps its own constant). Checked: flwr==1.42.0.
    """
    from flwr.supernode import fleet_http_connection

    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = seconds


def start_parent_process_monitor(parent_pid: int) -> None:
    """Interrupt this process (as Ctrl-C would) once process ``parent_pid`` has ended.

    Relies on ``flwr.supercore.app_utils.start_parent_process_monitor(parent_pid)``
    (a daemon thread that polls the parent). Checked: flwr==1.42.0.

    Args:
        parent_pid: Process id to watch.
    """
    from flwr.supercore.app_utils import start_parent_process_monitor as monitor

    monitor(parent_pid)


def run_superexec_with(
    executor: Callable[[], Any],
    time_module: ModuleType | None = None,
    *,
    signals: bool = True,
    **kwargs: Any,
) -> None:
    """Run Flower's SuperExec loop with ``executor()`` in place of the one it picks.

    Relies on ``flwr.supercore.superexec.run_superexec``: ``run_superexec(...)``
    gets its executor from the module global ``get_executor`` (subprocess or
    Kubernetes, by name), the one place to hand it another, and waits between
    two requests for tasks with ``time.sleep`` through its module global
    ``time``. Checked: flwr==1.42.0.

    Args:
        executor: Builds the executor (a ``flwr`` ``Executor``; called once).
        time_module: A stand-in for the ``time`` module whose ``sleep`` the loop
            waits with between two requests for tasks (None: Flower's).
        signals: Whether the loop registers Flower's signal handlers (module global
            ``register_signal_handlers``). ``False`` for a loop on a thread beside
            a SuperNode, whose own handlers end the process (Python sets signal
            handlers on the main thread only).
        **kwargs: ``run_superexec``'s keywords: ``runtime_api_address``,
            ``insecure``, ``root_certificates_path``, ``superexec_auth_secret``
            (bytes that sign its requests for tasks), ``parent_pid``.
    """
    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")
    superexec.get_executor = lambda *_, **__: executor()
    if time_module is not None:
        superexec.time = time_module
    if not signals:
        superexec.register_signal_handlers = lambda **_: None
    superexec.run_superexec(**kwargs)


def is_simulation_grid(grid: Any) -> bool:
    """Whether ``grid`` is Flower's simulation engine's (its messages stay in memory).

    Relies on ``flwr.superlink.grid.inmemory_grid.InMemoryGrid``. Checked: flwr==1.42.0.
    """
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def simulation_partitions(grid: Any) -> dict[int, int]:
    """Node id to partition id of the simulation engine's clients, without asking them.

    Flower's simulation engine registers its nodes one after the other, node ``i``
    getting ``partition-id`` ``i`` (``flwr.server.superlink.fleet.vce.vce_api.
    _register_nodes``), in the in-memory link state the simulation's grid holds
    (``InMemoryGrid.state``), whose ``nodes`` dict keeps registration order. A server
    of a simulation thus knows every client's partition (and so its name) without a
    message to each of thousands of clients (docs/scale.md). Nodes registered by then
    only; ``{}`` for any other grid. Checked: flwr==1.42.0.
    """
    if not is_simulation_grid(grid):
        return {}
    state = getattr(grid, "state", None)
    nodes = getattr(state, "nodes", None)
    lock = getattr(state, "lock", None)
    if not isinstance(nodes, dict) or lock is None:
        return {}
    with lock:
        return {node: partition for partition, node in enumerate(nodes)}


#: Seconds between two looks at which nodes have messages waiting
#: (:func:`quick_simulation_dispatch`).
DISPATCH_REFRESH = 0.05


def quick_simulation_dispatch(grid: Any) -> bool:
    """Make the simulation engine find its clients' messages without scanning every node.

    Flower's engine hands messages to its workers from a thread that, every 0.1 s, asks
    the link state for each of its nodes in turn whether a message waits for it
    (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``:
    ``state.get_message_ins(node_id=..., limit=1)`` per node); each such call checks
    every stored message (``InMemoryLinkState.get_message_ins``). With 10,000 defined
    clients that is 10,000 scans of the store per sweep for the 10 a round samples, and
    the thread holds the interpreter most of the time (docs/scale.md). Here the state's
    ``get_message_ins`` (the one object the engine and the ServerApp share: the grid's
    ``state``) first looks the node up in the set of nodes with an undelivered message,
    rebuilt at most every :data:`DISPATCH_REFRESH` seconds under the state's lock; only
    those nodes go on to Flower's own method. A message stored just after a rebuild is
    found one sweep later. Returns whether the grid is a simulation's (patched once).
    Checked: flwr==1.42.0.
    """
    import time

    if not is_simulation_grid(grid):
        return False
    state = grid.state
    if getattr(state, "_pollen_quick_dispatch", False):
        return True
    flower_get = type(state).get_message_ins
    pending: dict[str, Any] = {"at": float("-inf"), "nodes": frozenset()}

    def get_message_ins(node_id: int, limit: int | None, *, run_id: int | None = None):
        now = time.monotonic()
        if now - pending["at"] > DISPATCH_REFRESH:
            with state.lock:
                waiting = frozenset(
                    m.metadata.dst_node_id
                    for m in state.message_ins_store.values()
                    if m.metadata.delivered_at == ""
                )
            pending.update(at=now, nodes=waiting)
        if node_id not in pending["nodes"]:
            return []
        return flower_get(state, node_id, limit, run_id=run_id)

    state.get_message_ins = get_message_ins
    state._pollen_quick_dispatch = True
    return True


#: Flower's runtime names that :mod:`pollen.deploy.warm_clientapp` imports to run
#: ClientApp tasks in one process as ``flwr-clientapp`` would (its ``run_task`` is
#: ``flwr.supernode.runtime.run_clientapp.run_clientapp`` without the exit), each
#: with the parameters it passes (``()``: it only subclasses, reads or calls it without
#: arguments). Module -> name -> parameter names. Checked: flwr==1.42.0.
WARM_CLIENTAPP_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "flwr.supercore.superexec.executor.subprocess_executor": {
        "SubprocessExecutor": (),
        "SubprocessExecutor.launch": ("spec",),
        "SubprocessExecutor.get_eligible_capacity": ("supported_task_types",),
    },
    "flwr.supercore.superexec.executor.types": {
        "ExecutionSpec": (
            "task_id",
            "task_type",
            "token",
            "runtime_api_address",
            "insecure",
            "root_certificates_path",
        ),
        "LaunchResult.accepted": (),
        "LaunchResult.failed": ("message",),
    },
    "flwr.clientapp.client_app": {"LoadClientAppError": ()},
    "flwr.common.constant": {"ErrorCode": (), "SubStatus": ()},
    "flwr.supercore": {"log": ()},
    "flwr.supercore.constant": {"TaskType": ()},
    "flwr.proto.runtime_pb2": {"SendTaskHeartbeatRequest": ()},
    "flwr.supercore.heartbeat": {"HeartbeatSender": ("heartbeat_fn",)},
    "flwr.supercore.interceptors": {
        "RuntimeTokenHttpInterceptor": ("token",),
        "RuntimeVersionHttpInterceptor": ("component_name",),
    },
    "flwr.supercore.retry": {
        "RetryInvoker": ("should_giveup",),
        "make_simple_http_retry_invoker": (),
    },
    "flwr.supercore.runtime": {
        "RuntimeHttpClient.SendTaskHeartbeat": ("request",),
        "RuntimeHttpClient.from_server_address": (
            "server_address",
            "insecure",
            "root_certificates",
            "interceptors",
            "retry_invoker",
        ),
    },
    "flwr.supercore.runtime.tracing": {"RuntimeTracingInterceptor": ()},
    "flwr.supercore.tls": {
        "validate_and_resolve_root_certificates": ("root_cert_path", "insecure"),
    },
    "flwr.supernode.runtime.run_clientapp": {
        "pull_task_input": ("client",),
        "push_message": ("client", "message", "context"),
        "push_task_output": ("client", "context", "sub_status", "details"),
    },
}
