"""``pollen server``: coordinate one run for clients on other machines.

:func:`serve` runs a ``flower-superlink`` on a private loopback port and puts
:class:`pollen.deploy.fleet_proxy.FleetProxy` on the public address: clients
reach the Fleet API through it, while run submission (the Control API) and the
ServerApp's Runtime API stay reachable from this machine only. It then submits
this app with ``flwr run`` and returns when the run is over.

With certificates (:mod:`pollen.deploy.tls`) the proxy serves TLS with the
operator's server certificate, the SuperLink runs TLS on its loopback port
(with a throwaway certificate, :func:`pollen.deploy.certs.loopback_tls`) and
``--enable-supernode-auth``, and every key in ``authorized-clients`` is
registered before the port opens. The proxy refuses calls signed by other keys
from their headers, before reading their bodies (Flower would refuse them too),
and logs each refusal with the peer address.

After Ctrl-C or SIGTERM the run folder's ``status.json`` says ``interrupted``
with the last completed round and the command that resumes the run.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from pollen.config import RunConfig
from pollen.deploy.certs import loopback_tls
from pollen.deploy.console import ConsoleRouter, in_process_logs
from pollen.deploy.fleet_proxy import FleetProxy
from pollen.deploy.processes import (
    ManagedProcess,
    free_port,
    sigterm_as_interrupt,
    temporary_home,
)
from pollen.deploy.runtime import (
    register_supernodes,
    split_address,
    start_superlink,
    submit_run,
    write_connection,
)
from pollen.deploy.tls import ServerCerts, load_authorized_key
from pollen.errors import PollenError
from pollen.server.checkpoint import RunLock, read_manifest
from pollen.server.history import read_status, write_status


def serve(
    cfg: RunConfig, address: str, *, tls: ServerCerts | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Coordinate one run for remote clients dialling ``address``.

    Args:
        cfg: The run config (``cfg.out`` absolute).
        address: ``HOST:PORT`` to listen on for clients.
        tls: Checked certificates (:func:`pollen.deploy.tls.load_server_certs`): serve
            TLS and admit only the clients in its ``authorized-clients``. None:
            plaintext, any client may join.
        verbose: Show Flower's, uvicorn's and TensorFlow's output on the console
            too; it goes to the run's ``logs/`` either way (:data:`SERVER_LOGS`).

    Returns:
        The run folder's ``status.json`` content.

    Raises:
        PollenError: The port is taken, Flower failed to start, or the run failed.
    """
    host, port = split_address(address)
    run_dir = Path(cfg.out)
    logs = run_dir / "logs"
    created = _outermost_new_folder(run_dir)
    logs.mkdir(parents=True, exist_ok=True)
    with (
        temporary_home("pollen-server-") as home,
        in_process_logs(logs / SERVER_LOGS["relay"], verbose=verbose),
    ):
        internal = free_port()
        proxy, link_args, root_cert = _front(host, port, internal, home, tls)
        superlink: ManagedProcess | None = None
        interrupted = submitted = False
        try:
            if tls is None:
                proxy.start()
            superlink = start_superlink(
                home,
                "127.0.0.1",
                internal,
                extra_args=link_args,
                log=logs / SERVER_LOGS["superlink"],
            )
            write_connection(
                home, f"127.0.0.1:{internal}", insecure=tls is None, root_cert=root_cert
            )
            if tls is not None:
                # Keys first, port second: a client that came earlier would be refused.
                register_supernodes(home, tls.authorized)
                proxy.start()
                print(
                    f"pollen: TLS on; {len(tls.authorized)} authorized client key(s) from "
                    f"{tls.folder / 'authorized-clients'}",
                    flush=True,
                )
            print(
                f"pollen: server listening on {host}:{proxy.port} for clients only; "
                f"waiting for {cfg.min_clients} client(s); run folder {run_dir}"
                + ("" if verbose else f" (Flower's output: {logs}/)"),
                flush=True,
            )
            submitted = True
            router = ConsoleRouter(logs / SERVER_LOGS["app"], verbose=verbose)
            try:
                with sigterm_as_interrupt():
                    submit_run(home, cfg.to_mapping(), stream=True, router=router)
            finally:
                router.close()
        except KeyboardInterrupt:
            interrupted = True
            raise
        except PollenError:
            if created is not None and not submitted:  # failed before the run began
                shutil.rmtree(created, ignore_errors=True)
            raise
        finally:
            proxy.stop()
            if superlink is not None:
                superlink.stop()
            if interrupted:
                _mark_interrupted(run_dir)
    return _completed_status(run_dir, logs)


#: The run's ``logs/`` files: the server app's output as Flower streams it (Pollen's
#: lines, Flower's), the SuperLink's, and this process's own (the fleet relay's uvicorn).
SERVER_LOGS = {"app": "server-app.log", "superlink": "superlink.log", "relay": "relay.log"}


def _outermost_new_folder(run_dir: Path) -> Path | None:
    """The outermost folder that creating ``run_dir`` would create; None if it exists."""
    created = None if run_dir.exists() else run_dir
    while created is not None and not created.parent.exists():
        created = created.parent
    return created


def _front(
    host: str, port: int, internal: int, home: Path, tls: ServerCerts | None
) -> tuple[FleetProxy, list[str], str | None]:
    """The public proxy in front of the SuperLink on loopback port ``internal``.

    Returns:
        The proxy (not started), the SuperLink's extra arguments, and the CA file
        the ``flwr`` CLI trusts for the loopback hop (None: plaintext).
    """
    if tls is None:
        return FleetProxy(host, port, f"http://127.0.0.1:{internal}"), [], None
    loop = loopback_tls(home / "loopback-tls")
    root_cert = str(loop.ca)
    link_args = [
        *("--ssl-ca-certfile", str(loop.ca)),
        *("--ssl-certfile", str(loop.cert)),
        *("--ssl-keyfile", str(loop.key)),
        "--enable-supernode-auth",
    ]
    proxy = FleetProxy(
        host,
        port,
        f"https://127.0.0.1:{internal}",
        certfile=str(tls.cert),
        keyfile=str(tls.key),
        upstream_verify=root_cert,
        # The proxy refuses other keys from the headers, before buffering a body.
        authorized_keys=[load_authorized_key(path) for path in tls.authorized],
    )
    return proxy, link_args, root_cert


def _completed_status(run_dir: Path, logs: Path) -> dict[str, Any]:
    """The run folder's status if the run completed.

    Raises:
        PollenError: It did not: the reason, and how to resume if rounds are saved.
    """
    status = read_status(run_dir)
    if status is None or status.get("status") != "completed":
        reason = (status or {}).get("error") or "the server app ended before writing a status"
        last = _last_completed_round(run_dir)
        resume = (
            f" Rounds 1-{last} are checkpointed: fix the cause, then continue with "
            f"`pollen server --resume {run_dir}`."
            if last
            else ""
        )
        raise PollenError(
            f"The run did not complete: {reason}. Run folder: {run_dir}; logs: "
            f"{logs / SERVER_LOGS['app']} and {logs / SERVER_LOGS['superlink']}.{resume}"
        )
    return status


def _last_completed_round(run_dir: Path) -> int:
    """The last checkpointed round in ``run_dir`` (0: none, or an unreadable manifest)."""
    try:
        manifest = read_manifest(run_dir)
    except PollenError:
        return 0
    return int(manifest["round"]) if manifest else 0


def _mark_interrupted(run_dir: Path) -> None:
    """After Ctrl-C: wait for the server app to let go of the run, record, tell how to resume."""
    lock = RunLock(run_dir)
    if not lock.acquire(timeout=20.0):
        print(
            f"pollen: warning: the server app (process {lock.holder()}) still holds {run_dir}.",
            file=sys.stderr,
            flush=True,
        )
    try:
        last = _last_completed_round(run_dir)
        write_status(
            run_dir,
            "interrupted",
            "stopped by the user",
            last_completed_round=last,
            resume=f"pollen server --resume {run_dir}",
        )
    finally:
        lock.release()
    if last:
        print(
            f"pollen: interrupted; rounds 1-{last} are saved in {run_dir}. Continue with:\n"
            f"  pollen server --resume {run_dir}",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(
            "pollen: interrupted before any round completed; nothing to resume.",
            file=sys.stderr,
            flush=True,
        )
