"""``pollen simulate`` refuses data too small for its clients before anything starts."""

from __future__ import annotations

import pytest

from pollen.cli import app
from pollen.deploy import simulation


def test_a_test_split_smaller_than_the_clients_is_refused_up_front(
    tiny_data, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path / "cache"))
    started: list = []
    monkeypatch.setattr(simulation, "simulate", lambda *a, **k: started.append(a) or {})
    argv = ["simulate", "--model", "cnn", "--data-dir", str(tiny_data), "--fraction-train", "0.1"]
    code = app.main([*argv, "--clients", "30", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and started == []  # refused before the simulation engine starts
    assert "--clients 30 does not fit the data" in err
    assert "test data (24 examples)" in err and "at most 24 clients" in err
    assert app.main([*argv, "--clients", "24", "--out", str(tmp_path / "ok")]) == 0
    assert len(started) == 1


@pytest.mark.parametrize(("address", "gpus"), [(None, 0.0), ("10.0.0.1:6379", 0.5)])
def test_each_simulated_client_reserves_the_threads_it_runs(address, gpus, monkeypatch) -> None:
    from pollen.config import RunConfig

    monkeypatch.setattr(simulation.os, "cpu_count", lambda: 8)
    assert simulation.client_resources(RunConfig(client_threads=2), 100, address, gpus) == (
        2,
        gpus,
    )
    auto = simulation.client_resources(RunConfig(), 100, address, gpus)
    assert auto == (1, gpus)  # one thread each (cores / parallel clients, or 1 on a cluster)
    assert simulation.client_resources(RunConfig(), 2, None)[0] == 4  # 8 cores, 2 clients
    if address is None:  # never more than this machine has: Ray could place no client
        assert simulation.client_resources(RunConfig(client_threads=16), 100)[0] == 8
    else:
        assert simulation.client_resources(RunConfig(client_threads=16), 100, address)[0] == 16


def test_an_example_dp_budget_no_client_can_keep_is_refused_up_front(
    tiny_data, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("POLLEN_CACHE_DIR", str(tmp_path / "cache"))
    started: list = []
    monkeypatch.setattr(simulation, "simulate", lambda *a, **k: started.append(a) or {})
    argv = ["simulate", "--data-dir", str(tiny_data), "--clients", "2", "--dp", "example"]
    argv += ["--model", "cnn-gn", "--batch-size", "8", "--rounds", "50"]
    code = app.main([*argv, "--dp-epsilon", "0.001", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and started == []  # refused before the simulation engine starts
    assert "training examples cannot start" in err and "Traceback" not in err
    assert "cannot keep epsilon=0.001" in err
    assert app.main([*argv, "--dp-epsilon", "8", "--out", str(tmp_path / "ok")]) == 0
    assert len(started) == 1


def test_check_partitions_gives_every_clients_training_size(tiny_data) -> None:
    from pollen.data.load import load_dataset
    from pollen.data.partition import check_partitions, partition_dataset

    ds = load_dataset(str(tiny_data))
    for method in ("iid", "dirichlet"):
        sizes = check_partitions(ds, 5, method=method, alpha=0.5, seed=3)
        parts = [partition_dataset(ds, 5, i, method=method, alpha=0.5, seed=3) for i in range(5)]
        assert sizes.tolist() == [len(p.y_train) for p in parts]
