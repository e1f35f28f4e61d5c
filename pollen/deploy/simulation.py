"""One-machine federations on Flower's simulation engine.

:func:`simulate` starts a private ``flower-superlink --simulation`` on a free
loopback port, submits this app with ``flwr run`` (so the run is exactly the
one ``flwr run .`` would do), streams its output, stops the SuperLink and
returns the run folder's status.

Threads: the simulation engine runs clients in parallel, one per
``client-resources-num-cpus`` share of the machine. Pollen reserves for each
client the CPUs its TensorFlow uses (:func:`client_resources`): unless
``client-threads`` says otherwise, ``cores // parallel clients`` intra-op
threads and a single inter-op thread, so two clients on two cores each get one
core instead of both fighting over two.

Ray: a private Ray instance on this machine, or with ``ray_address`` an
existing Ray cluster that runs the clients (docs/scale.md).

Backend: the server app and client workers run Keras on the model's
preferred backend (``pollen.models.registry.preferred_backend``: ``KERAS_BACKEND`` if
set, else e.g. torch for ``fastnet`` when torch is installed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pollen.config import RunConfig
from pollen.deploy.console import ConsoleRouter
from pollen.deploy.processes import free_port, sigterm_as_interrupt, temporary_home
from pollen.deploy.runtime import start_superlink, submit_run, write_connection
from pollen.errors import PollenError
from pollen.models.registry import preferred_backend
from pollen.server.history import read_status

#: The run's ``logs/`` files: the run's output as Flower streams it (the server
#: app's and the simulated clients': Pollen's lines, Flower's, Ray's), and the SuperLink's.
SIMULATION_LOGS = {"app": "simulation.log", "superlink": "superlink.log"}


def client_resources(
    cfg: RunConfig, num_clients: int, ray_address: str | None = None, client_gpus: float = 0.0
) -> tuple[int, float]:
    """``(CPUs, GPUs)`` Ray reserves for each simulated client (docs/scale.md).

    The CPUs are the threads the client's TensorFlow or torch runs
    (:func:`pollen.backend.configure_threads`): ``client-threads`` if set, so that Ray
    places as many clients on a machine as its cores hold; else, on this machine, its
    cores shared by the clients that run at once (one each once there are as many
    clients as cores), and on a Ray cluster one (its clients then take one thread each).
    On this machine a client never reserves more CPUs than it has (Ray could place none).

    Raises:
        PollenError: ``client_gpus`` is negative.
    """
    if client_gpus < 0:
        raise PollenError(f"--client-gpus must be 0 or more, not {client_gpus}.")
    cores = os.cpu_count() or 1
    if cfg.client_threads > 0:
        cpus = cfg.client_threads if ray_address else min(cfg.client_threads, cores)
    elif ray_address:
        cpus = 1
    else:
        cpus = max(1, cores // max(1, min(num_clients, cores)))
    return cpus, float(client_gpus)


def simulate(
    cfg: RunConfig,
    num_clients: int,
    *,
    stream: bool = True,
    verbose: bool = False,
    ray_address: str | None = None,
    client_gpus: float = 0.0,
) -> dict[str, Any]:
    """Run a whole federation of ``num_clients`` simulated clients.

    Args:
        cfg: The run config; ``cfg.out`` must be an absolute path.
        num_clients: Simulated clients (each gets partition i of num_clients).
        ray_address: An existing Ray cluster's address (``HOST:PORT`` of its head) to
            run the clients on; None: a private Ray instance on this machine.
        client_gpus: GPUs (or a fraction of one) Ray reserves for each client.
        stream: Follow the run's log while it runs: all of it to ``<run>/logs/``
            (:data:`SIMULATION_LOGS`), Pollen's lines to the console.
        verbose: Show Flower's and Ray's lines on the console too.

    Returns:
        The run folder's ``status.json`` content.

    Raises:
        PollenError: The run did not complete; the message says why.
    """
    if num_clients < 1:
        raise PollenError("--clients must be at least 1.")
    if cfg.min_clients > num_clients:
        raise PollenError(
            f"--min-clients {cfg.min_clients} is more than --clients {num_clients}: the "
            "run would wait forever. Lower --min-clients or simulate more clients."
        )
    run_dir = Path(cfg.out)
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cpus, gpus = client_resources(cfg, num_clients, ray_address, client_gpus)
    federation = (
        f"num-supernodes={num_clients} client-resources-num-cpus={cpus} "
        f"client-resources-num-gpus={gpus}"
    )
    # Flower's engine calls ray.init() without an address, which Ray reads from
    # RAY_ADDRESS, else joins any cluster `ray start` left on this machine: say which.
    ray_env = {"RAY_ADDRESS": ray_address or "local"}
    # SIGTERM unwinds like Ctrl-C, so the SuperLink below is stopped either way.
    with sigterm_as_interrupt(), temporary_home("pollen-sim-") as home:
        port = free_port()
        superlink = start_superlink(
            home,
            "127.0.0.1",
            port,
            simulation=True,
            # Flower's workers load Keras before the client app runs: choose its backend here.
            extra_env={"KERAS_BACKEND": preferred_backend(cfg.model), **ray_env},
            log=logs / SIMULATION_LOGS["superlink"],
        )
        router = ConsoleRouter(logs / SIMULATION_LOGS["app"], verbose=verbose)
        try:
            write_connection(home, f"127.0.0.1:{port}")
            submit_run(
                home,
                cfg.to_mapping(),
                federation_config=federation,
                stream=stream,
                router=router,
            )
        finally:
            router.close()
            superlink.stop()
            log_tail = superlink.tail(30)
    status = read_status(run_dir)
    if status is None or status.get("status") != "completed":
        reason = (status or {}).get("error") or "the server app ended before writing a status"
        raise PollenError(
            f"The simulation did not complete: {reason.rstrip('.')}. Run folder: {run_dir}; "
            f"logs: {logs}."
            + (f"\nSuperLink log (last lines):\n{log_tail}" if status is None else "")
        )
    return status
