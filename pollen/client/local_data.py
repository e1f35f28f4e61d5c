"""Which data a client holds: its node config and the run config resolved to arrays.

A client's data comes from its node config (``flower-supernode
--node-config``, set by ``pollen client``; or Flower's simulation engine):
``data-dir`` (else CIFAR-10 from the local cache) and, if ``num-partitions``
is present, ``partition-id`` of ``num-partitions``.

The server writes the run config, never a client's node config: a deployed
client therefore never takes its data path from the run config (a server could
otherwise point it at any file it can read). Only a client of Flower's
simulation engine does, where server and clients are one process tree on one
machine: its node config is exactly the engine's ``partition-id`` and
``num-partitions`` (:func:`is_simulated`), while ``pollen client`` always adds
its own keys (``threads``, the done file). See docs/security.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from pollen.config import RunConfig
from pollen.data.load import load_dataset
from pollen.data.partition import partition_dataset


@dataclass(frozen=True)
class ClientData:
    """Which slice of which dataset this client trains on."""

    data_dir: str
    partition_id: int | None
    num_partitions: int | None
    method: str
    alpha: float
    seed: int
    image_size: tuple[int, int] = (32, 32)


#: The node config keys, and only those, of a client in Flower's simulation engine.
SIMULATION_NODE_KEYS = frozenset({"partition-id", "num-partitions"})


def is_simulated(node_config: dict[str, Any]) -> bool:
    """Whether this client runs in Flower's simulation engine (not a deployed SuperNode).

    The engine gives each virtual client a node config of exactly ``partition-id`` and
    ``num-partitions``; ``pollen client`` always sets more (``threads``, the done
    file), and an empty node config (a bare ``flower-supernode``) is no simulation.
    The server controls the run config, not the node config, so it cannot make a
    deployed client look simulated.
    """
    return set(node_config) == SIMULATION_NODE_KEYS


def client_data_spec(cfg: RunConfig, node_config: dict[str, Any]) -> ClientData:
    """Resolve the client's data from its node config (and, in simulation, the run config).

    ``data-dir`` comes from the node config; only a simulated client
    (:func:`is_simulated`) falls back to the run config's ``data-dir``. Otherwise
    no ``data-dir`` means CIFAR-10 from the local cache.
    """
    num_partitions = node_config.get("num-partitions")
    partition_id = node_config.get("partition-id")
    run_data_dir = cfg.data_dir if is_simulated(node_config) else ""
    return ClientData(
        data_dir=str(node_config.get("data-dir") or run_data_dir or ""),
        partition_id=None if num_partitions is None else int(partition_id or 0),
        num_partitions=None if num_partitions is None else int(num_partitions),
        method=cfg.partition,
        alpha=cfg.alpha,
        seed=cfg.seed,
        image_size=cfg.image_hw,
    )


@functools.lru_cache(maxsize=1)
def _load_whole_dataset(data_dir: str, image_size: tuple[int, int] = (32, 32)):
    """The whole dataset at ``data_dir``, resized to ``image_size``, loaded once per process.

    A simulation worker plays many clients in turn (100 clients on 2 workers):
    each of them slices its partition out of this one copy. What a worker holds
    does not grow with the clients defined (docs/scale.md): this one dataset,
    and the shares of the last two clients it played (:func:`load_client_data`),
    each computed alone (:mod:`pollen.data.partition`).
    """
    return load_dataset(data_dir or None, image_size=image_size)


@functools.lru_cache(maxsize=2)
def load_client_data(spec: ClientData):
    """Load (once per process) the client's own train/test arrays."""
    ds = _load_whole_dataset(spec.data_dir, spec.image_size)
    if spec.num_partitions is not None:
        ds = partition_dataset(
            ds,
            spec.num_partitions,
            spec.partition_id or 0,
            method=spec.method,
            alpha=spec.alpha,
            seed=spec.seed,
        )
    return ds
