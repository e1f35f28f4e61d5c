"""One-machine federations on Flower's simulation engine.

:func:`simulate` starts a private ``flower-superlink --simulation`` on a free
loopback port, submits this app with ``flwr run`` (so the run is exactly the
one ``flwr run .`` would do), streams its output, stops the SuperLink and
returns the run folder's status.

Threads: the simulation engine runs clients in parallel, one per
``client-resources-num-cpus`` share of the machine. Pollen gives each client
one CPU share and, unless ``client-threads`` says otherwise, lets each
client's TensorFlow use ``cores // parallel clients`` intra-op threads and a
single inter-op thread, so two clients on two cores each get one core
instead of both fighting over two.

Backend: the server app and client workers run Keras on the model's
preferred backend (``pollen.models.registry.preferred_backend``: ``KERAS_BACKEND`` if
set, else e.g. torch for ``fastnet`` when torch is installed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pollen.config import RunConfig
from pollen.deploy.processes import free_port, sigterm_as_interrupt, temporary_home
from pollen.deploy.runtime import start_superlink, submit_run, write_connection
from pollen.errors import PollenError
from pollen.models.registry import preferred_backend
from pollen.server.history import read_status


def simulate(cfg: RunConfig, num_clients: int, *, stream: bool = True) -> dict[str, Any]:
    """Run a whole federation of ``num_clients`` simulated clients.

    Args:
        cfg: The run config; ``cfg.out`` must be an absolute path.
        num_clients: Simulated clients (each gets partition i of num_clients).
        stream: Print the run's log while it runs.

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
    cores = os.cpu_count() or 1
    parallel = max(1, min(num_clients, cores))
    federation = (
        f"num-supernodes={num_clients} client-resources-num-cpus={max(1, cores // parallel)} "
        "client-resources-num-gpus=0.0"
    )
    # SIGTERM unwinds like Ctrl-C, so the SuperLink below is stopped either way.
    with sigterm_as_interrupt(), temporary_home("pollen-sim-") as home:
        port = free_port()
        superlink = start_superlink(
            home,
            "127.0.0.1",
            port,
            simulation=True,
            # Flower's workers load Keras before the client app runs: choose its backend here.
            extra_env={"KERAS_BACKEND": preferred_backend(cfg.model)},
            log=home / "superlink.log",
        )
        try:
            write_connection(home, f"127.0.0.1:{port}")
            submit_run(home, cfg.to_mapping(), federation_config=federation, stream=stream)
        finally:
            superlink.stop()
            log_tail = superlink.tail(30)
    status = read_status(run_dir)
    if status is None or status.get("status") != "completed":
        reason = (status or {}).get("error") or "the server app ended before writing a status"
        raise PollenError(
            f"The simulation did not complete: {reason.rstrip('.')}. Run folder: {run_dir}."
            + (f"\nSuperLink log (last lines):\n{log_tail}" if status is None else "")
        )
    return status
