"""Which data a client holds (pollen.client.local_data)."""

from __future__ import annotations

from pollen.client.local_data import client_data_spec
from pollen.config import RunConfig


def test_client_data_spec_node_config_wins() -> None:
    cfg = RunConfig(data_dir="/run/data", partition="dirichlet", alpha=0.3, seed=5)
    spec = client_data_spec(cfg, {"data-dir": "/node/data", "partition-id": 1, "num-partitions": 4})
    assert (spec.data_dir, spec.partition_id, spec.num_partitions) == ("/node/data", 1, 4)
    assert (spec.method, spec.alpha, spec.seed) == ("dirichlet", 0.3, 5)
    whole = client_data_spec(cfg, {})
    assert (whole.data_dir, whole.partition_id, whole.num_partitions) == ("/run/data", None, None)
