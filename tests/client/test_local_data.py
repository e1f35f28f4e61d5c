"""Which data a client holds (pollen.client.local_data)."""

from __future__ import annotations

import pytest

import pollen.client.local_data as local_data
from pollen.client.local_data import client_data_spec, is_simulated
from pollen.config import RunConfig
from pollen.protocol import DONE_FILE_KEY


def test_client_data_spec_node_config_wins() -> None:
    cfg = RunConfig(data_dir="/run/data", partition="dirichlet", alpha=0.3, seed=5)
    spec = client_data_spec(cfg, {"data-dir": "/node/data", "partition-id": 1, "num-partitions": 4})
    assert (spec.data_dir, spec.partition_id, spec.num_partitions) == ("/node/data", 1, 4)
    assert (spec.method, spec.alpha, spec.seed) == ("dirichlet", 0.3, 5)


def test_a_simulated_client_takes_the_run_configs_data_dir() -> None:
    """Flower's simulation engine: node config = exactly partition-id and num-partitions."""
    cfg = RunConfig(data_dir="/run/data")
    spec = client_data_spec(cfg, {"partition-id": 2, "num-partitions": 4})
    assert (spec.data_dir, spec.partition_id, spec.num_partitions) == ("/run/data", 2, 4)


# What `pollen client` sets (pollen.cli.client, pollen.deploy.client), with and without
# --data-dir and --partition-id; and a bare flower-supernode with no node config.
DEPLOYED = [
    {"threads": 0, DONE_FILE_KEY: "/tmp/x/run-done"},
    {"partition-id": 0, "num-partitions": 2, "threads": 0, DONE_FILE_KEY: "/tmp/x/run-done"},
    {"partition-id": 0, "num-partitions": 2, "name": "alice", "threads": 4},
    {},
]


@pytest.mark.parametrize("node_config", DEPLOYED)
def test_a_deployed_client_never_takes_its_data_path_from_the_server(node_config) -> None:
    """The server writes the run config: its data-dir must not reach a deployed client
    (it would make the client read, train on and report on any file the server names)."""
    hostile = RunConfig(data_dir="/home/alice/.ssh")
    assert not is_simulated(node_config)
    assert client_data_spec(hostile, node_config).data_dir == ""  # CIFAR-10 from the cache
    own = client_data_spec(hostile, {**node_config, "data-dir": "/alice/data"})
    assert own.data_dir == "/alice/data"


def test_a_deployed_client_loads_its_own_data_whatever_the_run_config_says(monkeypatch) -> None:
    loaded: list = []
    monkeypatch.setattr(local_data, "load_dataset", lambda d, **_: loaded.append(d) or "dataset")
    local_data._load_whole_dataset.cache_clear()
    local_data.load_client_data.cache_clear()
    hostile = RunConfig(data_dir="/etc/hostile")
    try:
        local_data.load_client_data(client_data_spec(hostile, DEPLOYED[0]))
        own = {**DEPLOYED[0], "data-dir": "/alice/data"}
        local_data.load_client_data(client_data_spec(hostile, own))
    finally:
        local_data._load_whole_dataset.cache_clear()
        local_data.load_client_data.cache_clear()
    assert loaded == [None, "/alice/data"]  # the cache's CIFAR-10, then the node's own folder
