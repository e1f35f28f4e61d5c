"""Federations across machines on Flower's deployment runtime.

``pollen server`` (:func:`serve`) runs a ``flower-superlink`` on a private
loopback port and puts :class:`pollen.fleet_proxy.FleetProxy` on the public
address: clients reach the Fleet API through it, while run submission (the
Control API) and the ServerApp's Runtime API stay reachable from this machine
only. It then submits this app with ``flwr run`` and returns when the run
is over.

``pollen client`` (:func:`join`) runs a ``flower-supernode`` against the
server and watches it: the SuperNode never exits on its own, so the client
app leaves a marker file when the server announces the end of the run, and
the watchdog then stops the SuperNode and returns 0.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.history import read_status
from pollen.runtime import (
    ManagedProcess,
    flower_bin,
    flower_env,
    free_port,
    port_open,
    split_address,
    start_superlink,
    submit_run,
    temporary_home,
    write_connection,
)

#: Node-config key naming the file a client app touches when the run is over.
DONE_FILE_KEY = "pollen-done-file"

#: Seconds a client keeps its SuperNode up after the run-over announcement.
RUN_OVER_GRACE = 4.0


def serve(cfg: RunConfig, address: str) -> dict[str, Any]:
    """Coordinate one run for remote clients dialling ``address``.

    Args:
        cfg: The run config (``cfg.out`` absolute).
        address: ``HOST:PORT`` to listen on for clients.

    Returns:
        The run folder's ``status.json`` content.

    Raises:
        PollenError: The port is taken, Flower failed to start, or the run failed.
    """
    from pollen.fleet_proxy import FleetProxy

    host, port = split_address(address)
    run_dir = Path(cfg.out)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with temporary_home("pollen-server-") as home:
        internal = free_port()
        proxy = FleetProxy(host, port, f"http://127.0.0.1:{internal}")
        proxy.start()
        superlink: ManagedProcess | None = None
        try:
            superlink = start_superlink(home, "127.0.0.1", internal, log=logs / "superlink.log")
            print(
                f"pollen: server listening on {host}:{proxy.port} for clients only; "
                f"waiting for {cfg.min_clients} client(s); run folder {run_dir}",
                flush=True,
            )
            write_connection(home, f"127.0.0.1:{internal}")
            submit_run(home, cfg.to_mapping(), stream=True)
        finally:
            proxy.stop()
            if superlink is not None:
                superlink.stop()
    status = read_status(run_dir)
    if status is None or status.get("status") != "completed":
        reason = (status or {}).get("error") or "the server app ended before writing a status"
        raise PollenError(
            f"The run did not complete: {reason}. Run folder: {run_dir}; Flower's log: "
            f"{logs / 'superlink.log'}."
        )
    return status


def join(server: str, node_config: dict[str, Any], *, connect_timeout: float = 120.0) -> int:
    """Take part in the federation at ``server`` until its run is over.

    Args:
        server: ``HOST:PORT`` of a ``pollen server``.
        node_config: This client's node config (``data-dir``, ``partition-id``,
            ``num-partitions``, ``name``, ``threads``).
        connect_timeout: Seconds the server may be unreachable (at start or
            while running) before the client gives up.

    Returns:
        0 once the server's run is over.

    Raises:
        PollenError: The server cannot be reached, or the SuperNode failed.
    """
    host, port = split_address(server)
    _wait_for_server(host, port, connect_timeout)
    with temporary_home("pollen-client-") as home:
        done_file = home / "run-done"
        config = {**node_config, DONE_FILE_KEY: str(done_file)}
        argv = [
            flower_bin("flower-supernode"),
            "--insecure",
            "--superlink",
            f"{host}:{port}",
            "--node-config",
            " ".join(f"{k}={json.dumps(v)}" for k, v in config.items()),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ]
        node = ManagedProcess("supernode", argv, flower_env(home), None)
        print(f"pollen: client joined {host}:{port}; waiting for rounds", flush=True)
        try:
            unreachable_since: float | None = None
            while not done_file.exists():
                if not node.alive():
                    raise PollenError(
                        f"Flower's SuperNode stopped unexpectedly (exit code "
                        f"{node.proc.returncode}); its output is above."
                    )
                if port_open(host, port):
                    unreachable_since = None
                elif unreachable_since is None:
                    unreachable_since = time.monotonic()
                elif time.monotonic() - unreachable_since > connect_timeout:
                    raise PollenError(
                        f"Lost the server at {host}:{port} for more than {connect_timeout:.0f} s "
                        "before its run was over. Check that the server is running, then start "
                        "this client again."
                    )
                time.sleep(1.0)
            # Let the SuperNode push its reply to the announcement before it stops:
            # the server would otherwise wait for that reply's content.
            time.sleep(RUN_OVER_GRACE)
        finally:
            node.stop()
    print("pollen: the server's run is over; client exiting.", flush=True)
    return 0


def _wait_for_server(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if time.monotonic() > deadline:
            raise PollenError(
                f"Cannot reach a pollen server at {host}:{port} (tried for {timeout:.0f} s). "
                "Check the address, that `pollen server` is running there, and that no "
                "firewall blocks the port; --connect-timeout sets how long to keep trying."
            )
        time.sleep(0.5)


def announce_run_over(grid, timeout: float = 15.0) -> None:
    """Tell every connected client that the run is over (they then exit)."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"request": "run-over"})}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in grid.get_node_ids()
    ]
    if messages:
        list(grid.send_and_receive(messages, timeout=timeout))
