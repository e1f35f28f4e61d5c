"""Which data a client holds: its node config and the run config resolved to arrays.

A client's data comes from its node config (``flower-supernode
--node-config``, set by ``pollen client``; or Flower's simulation engine):
``data-dir`` (else the run config's ``data-dir``; else CIFAR-10) and, if
``num-partitions`` is present, ``partition-id`` of ``num-partitions``.
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


def client_data_spec(cfg: RunConfig, node_config: dict[str, Any]) -> ClientData:
    """Resolve the client's data from its node config and the run config."""
    num_partitions = node_config.get("num-partitions")
    partition_id = node_config.get("partition-id")
    return ClientData(
        data_dir=str(node_config.get("data-dir") or cfg.data_dir or ""),
        partition_id=None if num_partitions is None else int(partition_id or 0),
        num_partitions=None if num_partitions is None else int(num_partitions),
        method=cfg.partition,
        alpha=cfg.alpha,
        seed=cfg.seed,
    )


@functools.lru_cache(maxsize=1)
def _load_whole_dataset(data_dir: str):
    """The whole dataset at ``data_dir``, loaded once per process.

    A simulation worker plays many clients in turn (100 clients on 2 workers):
    each of them slices its partition out of this one copy.
    """
    return load_dataset(data_dir or None)


@functools.lru_cache(maxsize=2)
def load_client_data(spec: ClientData):
    """Load (once per process) the client's own train/test arrays."""
    ds = _load_whole_dataset(spec.data_dir)
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
