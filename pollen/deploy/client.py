"""``pollen client``: take part in a federation run by a ``pollen server``.

:func:`join` runs Flower's SuperNode (through :mod:`pollen.deploy.supernode`,
which polls more often) against the server; the same process runs
:mod:`pollen.deploy.warm_clientapp` on a thread, the client app warm for all
messages. :class:`_NodeWatch` watches that process: the SuperNode never exits
on its own, so the client app leaves a marker file when the server announces
the end of the run, and the watchdog then stops it and returns 0. A SuperNode
that stops, or a server that restarts, makes the client join again.

With a client bundle (:mod:`pollen.deploy.tls`) the client verifies the server
against its ``ca.crt`` and signs its requests with ``client.key``.

The SuperNode's Runtime API (loopback, where the app runner asks for tasks)
hands tasks only to a runner that signs its requests with the client's own
random secret (:func:`write_secret`; Flower's ``--superexec-auth-secret-file``),
kept 0600 in the client's private temporary folder: another local process
cannot take this client's tasks. See docs/security.md.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from pollen.deploy.console import ConsoleRouter
from pollen.deploy.processes import (
    ManagedProcess,
    free_port,
    port_open,
    probe_port,
    sigterm_as_interrupt,
    temporary_home,
)
from pollen.deploy.runtime import flower_env, split_address
from pollen.deploy.supernode import PARENT_ENV, heartbeat_seconds, poll_seconds
from pollen.deploy.tls import ClientCerts, probe_tls
from pollen.errors import PollenError
from pollen.protocol import DONE_FILE_KEY

#: Seconds a client keeps its SuperNode up after the run-over announcement.
RUN_OVER_GRACE = 4.0

#: Seconds the server's port must have been closed for the client to take it
#: for a server restart (and join the new SuperLink afresh).
SERVER_RESTART_SECONDS = 2.0

#: Seconds between two checks that the server's port is still there, and how long one
#: check waits for an answer. Fifty clients checking each second with a 0.5-s wait,
#: on 2 loaded cores, took the server's slow answers for its end and rejoined as new
#: nodes in the middle of rounds (benchmarks/scale_deploy.py); a check now waits
#: longer, comes less often, and only a refused connection counts as the port closed.
PROBE_SECONDS, PROBE_TIMEOUT = 2.0, 3.0

#: A SuperNode that exits sooner than this after its start counts as a quick failure.
QUICK_FAILURE_SECONDS = 20.0

#: Quick failures in a row after which ``pollen client`` gives up.
MAX_QUICK_FAILURES = 3


def join(
    server: str,
    node_config: dict[str, Any],
    *,
    connect_timeout: float = 120.0,
    tls: ClientCerts | None = None,
    log_dir: Path | None = None,
    verbose: bool = False,
) -> int:
    """Take part in the federation at ``server`` until its run is over.

    Args:
        server: ``HOST:PORT`` of a ``pollen server``.
        node_config: This client's node config (``data-dir``, ``partition-id``,
            ``num-partitions``, ``name``, ``threads``).
        connect_timeout: Seconds the server may be unreachable (at start or
            while running) before the client gives up.
        tls: Checked client bundle (:func:`pollen.deploy.tls.load_client_certs`):
            verify the server against its ``ca.crt`` and authenticate with its
            ``client.key``. None: plaintext.
        log_dir: Folder for the SuperNode's and app runner's output
            (``supernode-N.log``, one per join); None: the client's temporary
            folder, removed at the end.
        verbose: Show all of that output on the console; otherwise only
            Pollen's lines, Flower's errors and Keras's progress bars
            (:class:`pollen.deploy.console.ConsoleRouter`).

    Returns:
        0 once the server's run is over.

    Raises:
        PollenError: The server cannot be reached, its certificate fails the
            check, it refused this client's key, or the SuperNode failed.
    """
    poll_seconds()  # a bad POLLEN_SUPERNODE_POLL fails here, not inside the SuperNode
    heartbeat_seconds()  # and a bad POLLEN_SUPERNODE_HEARTBEAT
    host, port = split_address(server)
    _wait_for_server(host, port, connect_timeout)
    probe_tls(host, port, tls.ca if tls else None)
    with temporary_home("pollen-client-") as home:
        done_file = home / "run-done"
        config = {**node_config, DONE_FILE_KEY: str(done_file)}
        argv = _supernode_argv(host, port, config, tls, write_secret(home / "superexec-secret"))
        # The SuperNode's output goes to a file whose lines that matter the watchdog
        # copies to stdout; the file tells a refusal apart from other failures.
        # SIGTERM stops the client like Ctrl-C: through `finally`, which stops the
        # SuperNode (the default SIGTERM would leave it running, orphaned).
        sigterm = sigterm_as_interrupt()
        sigterm.__enter__()
        logs = log_dir or home
        logs.mkdir(parents=True, exist_ok=True)
        watch = _NodeWatch(argv, home, logs, ConsoleRouter(None, verbose=verbose))
        print(
            f"pollen: client joined {host}:{port}; waiting for rounds"
            + ("" if verbose else f" (Flower's output: {logs}/)"),
            flush=True,
        )
        try:
            _watch_until_done(watch, done_file, host, port, connect_timeout, tls)
            # Let the SuperNode push its reply to the announcement before it stops:
            # the server would otherwise wait for that reply's content.
            time.sleep(RUN_OVER_GRACE)
        finally:
            watch.stop()
            watch.router.close()
            sigterm.__exit__(None, None, None)
    print("pollen: the server's run is over; client exiting.", flush=True)
    return 0


def write_secret(path: Path) -> Path:
    """Write a fresh random secret to ``path`` (created, mode 0600); return ``path``.

    The SuperNode and its app runner share it (``--superexec-auth-secret-file``):
    the SuperNode hands tasks only to requests signed with it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(32))
    return path


def _supernode_argv(
    host: str, port: int, config: dict[str, Any], tls: ClientCerts | None, secret: Path
) -> list[str]:
    """The SuperNode's command line for the server at ``host:port`` with node ``config``.

    ``secret``: the file whose secret the app runner must sign its task requests with.
    """
    if tls is None:
        transport = ["--insecure"]
    else:
        transport = [
            *("--root-certificates", str(tls.ca)),
            *("--auth-supernode-private-key", str(tls.key)),
        ]
    return [
        # Flower's SuperNode with its idle poll shortened from 3 s (pollen.deploy.supernode).
        *(sys.executable, "-m", "pollen.deploy.supernode"),
        *transport,
        "--superlink",
        f"{host}:{port}",
        "--node-config",
        " ".join(f"{k}={json.dumps(v)}" for k, v in config.items()),
        # Pollen's own app runner serves the SuperNode's tasks on a thread of its
        # process (pollen.deploy.warm_clientapp), instead of a process per message.
        *("--isolation", "process"),
        *("--superexec-auth-secret-file", str(secret)),
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
    ]


def _watch_until_done(
    watch: _NodeWatch,
    done_file: Path,
    host: str,
    port: int,
    connect_timeout: float,
    tls: ClientCerts | None,
) -> None:
    """Echo the SuperNode's output each second until ``done_file`` appears.

    Joins again when the SuperNode stops (not refused) or the server restarts.

    Raises:
        PollenError: The SuperNode failed for good, or the server stayed
            unreachable for more than ``connect_timeout`` seconds.
    """
    unreachable_since: float | None = None  # no answer or refused, since
    closed_since: float | None = None  # refused (nothing listens), since
    said_lost = False
    next_probe = time.monotonic() + PROBE_SECONDS
    while not done_file.exists():
        watch.echo()
        if not watch.node.alive():
            watch.echo()
            failure = _supernode_failure(watch.node, f"{host}:{port}", tls)
            if not _restartable(failure) or not watch.may_restart():
                raise failure
            # Flower's SuperNode exits when a restarted SuperLink does not know
            # it (HTTP 401): join again once the server is back.
            _wait_for_server(host, port, connect_timeout)
            watch.restart("its SuperNode stopped")
            unreachable_since = closed_since = None
            said_lost = False
        elif time.monotonic() >= next_probe:
            state = probe_port(host, port, PROBE_TIMEOUT)
            next_probe = time.monotonic() + PROBE_SECONDS
            now = time.monotonic()
            if state == "open":
                if closed_since is not None and now - closed_since >= SERVER_RESTART_SECONDS:
                    # The server went away and is back: a new SuperLink that does
                    # not know this node. Join it afresh instead of waiting for
                    # the old SuperNode to notice.
                    watch.restart("the server restarted")
                unreachable_since = closed_since = None
                said_lost = False
            else:
                if state == "closed" and closed_since is None:
                    closed_since = now
                first = unreachable_since is None
                if first:
                    unreachable_since = now
                elif now - unreachable_since > connect_timeout:
                    raise PollenError(
                        f"Lost the server at {host}:{port} for more than "
                        f"{connect_timeout:.0f} s before its run was over. Check that the "
                        "server is running, then start this client again."
                    )
                # A refusal is news at once; a busy server's one late answer is not.
                if not said_lost and (state == "closed" or not first):
                    _say_lost(host, port, connect_timeout)
                    said_lost = True
        time.sleep(1.0)


def _say_lost(host: str, port: int, connect_timeout: float) -> None:
    print(
        f"pollen: lost the server at {host}:{port}; waiting up to "
        f"{connect_timeout:.0f} s for it to come back",
        flush=True,
    )


class _NodeWatch:
    """The client's SuperNode and its warm app runner, restartable, with their output echoed."""

    def __init__(self, argv: list[str], home: Path, logs: Path, router: ConsoleRouter) -> None:
        self.argv = argv
        self.home = home
        self.logs = logs
        self.router = router
        self.starts = 0
        self.quick_failures = 0
        self._start()

    def _start(self) -> None:
        self.starts += 1
        argv = list(self.argv)
        argv[argv.index("--port") + 1] = str(free_port())
        self.log = self.logs / f"supernode-{self.starts}.log"
        self.shown = 0
        self.started = time.monotonic()
        # The app runner asks its SuperNode for tasks every 0.1 s (Flower's default: 1 s).
        # The SuperNode stops once this process is gone, even after a SIGKILL
        # (pollen.deploy.supernode).
        env = flower_env(
            self.home,
            {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1", PARENT_ENV: str(os.getpid())},
        )
        # Its app runner is a thread of the same process (pollen.deploy.warm_clientapp).
        self.node = ManagedProcess("supernode", argv, env, self.log)

    def echo(self) -> None:
        """Pass the SuperNode's new output to the console router (what matters: to stdout)."""
        self.shown = _echo(self.log, self.shown, self.router)

    def may_restart(self) -> bool:
        """Whether another restart is allowed (not too many quick failures in a row)."""
        quick = time.monotonic() - self.started < QUICK_FAILURE_SECONDS
        self.quick_failures = self.quick_failures + 1 if quick else 0
        return self.quick_failures < MAX_QUICK_FAILURES

    def restart(self, why: str) -> None:
        """Stop the SuperNode (if running) and start a fresh one."""
        self.stop()
        print(f"pollen: {why}; joining the server again", flush=True)
        self._start()

    def stop(self) -> None:
        """Stop the SuperNode (and its app runner); show the rest of their output."""
        self.node.stop()
        self.echo()


def _restartable(failure: PollenError) -> bool:
    """Whether a SuperNode failure may be cured by joining again (not a refusal)."""
    return str(failure).startswith("Flower's SuperNode stopped unexpectedly")


def _echo(log: Path, offset: int, router: ConsoleRouter) -> int:
    """Pass what ``log`` gained since ``offset`` (bytes) to ``router``; return the new offset.

    Reads whole lines only (up to the last newline), so a multi-byte character
    is never split.
    """
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return offset
    data = data[: data.rfind(b"\n") + 1]
    if data:
        router.write(data.decode("utf-8", errors="replace"))
    return offset + len(data)


def _supernode_failure(node: ManagedProcess, server: str, tls: ClientCerts | None) -> PollenError:
    """The PollenError for a SuperNode that exited: refusal, TLS failure or other."""
    text = node.log_path.read_text(errors="replace") if node.log_path else ""
    if "Failed to activate SuperNode" in text:
        fingerprint = f" (fingerprint {tls.fingerprint})" if tls else ""
        return PollenError(
            f"The server at {server} refused this client: its public key{fingerprint} is not "
            "among the server's authorized clients. Ask the server's operator to copy this "
            "bundle's client.pub into the server's authorized-clients folder and restart the "
            "server, or use the bundle made for you (DIR/clients/client-i)."
        )
    if "must be registered via the CLI" in text:
        return PollenError(
            f"The server at {server} admits only authorized clients, and this client has no "
            "key. Start it with --certs DIR/clients/client-i, the bundle the server's "
            "operator made with `pollen certs`."
        )
    if "SSL/TLS handshake error" in text or "CERTIFICATE_VERIFY_FAILED" in text:
        return PollenError(
            f"The TLS connection to {server} failed: the server's certificate did not verify "
            "against this bundle's ca.crt (another CA, or a name the certificate does not "
            "cover). Use the bundle made with the server's certificates and dial one of the "
            f"names in it; Flower's message is in {node.log_path}."
        )
    return PollenError(
        f"Flower's SuperNode stopped unexpectedly (exit code {node.proc.returncode}); its "
        f"output is in {node.log_path}."
    )


def _wait_for_server(host: str, port: int, timeout: float) -> None:
    """Wait until ``host:port`` accepts connections, at most ``timeout`` seconds.

    Raises:
        PollenError: It did not in time.
    """
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if time.monotonic() > deadline:
            raise PollenError(
                f"Cannot reach a pollen server at {host}:{port} (tried for {timeout:.0f} s). "
                "Check the address, that `pollen server` is running there, and that no "
                "firewall blocks the port; --connect-timeout sets how long to keep trying."
            )
        time.sleep(0.5)
