"""Lazy partitions for many clients (pollen.data.partition, docs/scale.md)."""

from __future__ import annotations

import numpy as np
import pytest

import pollen.data.partition as partition
from pollen.data.dataset import Dataset
from pollen.data.partition import check_partitions, partition_dataset, partition_indices
from pollen.errors import PollenError


class RecordingArray:
    """An image array that records which rows are read from it."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.rows: list[np.ndarray] = []

    def __getitem__(self, key: np.ndarray) -> np.ndarray:
        self.rows.append(np.asarray(key))
        return self.array[key]

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape


def _dataset(n_train: int, n_test: int) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(
        x_train=RecordingArray(rng.integers(0, 256, (n_train, 2, 2, 1), dtype=np.uint8)),
        y_train=rng.integers(0, 10, n_train),
        x_test=RecordingArray(rng.integers(0, 256, (n_test, 2, 2, 1), dtype=np.uint8)),
        y_test=rng.integers(0, 10, n_test),
        class_names=tuple("abcdefghij"),
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(("n", "k", "seed"), [(1000, 7, 3), (103, 10, 42), (50, 50, 0)])
def test_iid_is_flwr_datasets_iid_partitioner(n: int, k: int, seed: int) -> None:
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    table = datasets.Dataset.from_dict({"idx": np.arange(n)}).with_format("arrow")
    partitioner = IidPartitioner(num_partitions=k)
    partitioner.dataset = table.shuffle(seed=seed)
    labels = np.zeros(n, dtype=np.int64)
    for pid in range(k):
        theirs = np.sort(partitioner.load_partition(pid)["idx"].to_numpy())
        np.testing.assert_array_equal(partition_indices(labels, k, pid, seed=seed), theirs)


def test_building_client_999s_data_touches_no_other_clients(monkeypatch) -> None:
    ds = _dataset(5000, 1000)
    built: list[int] = []
    iid = partition._iid_partition
    monkeypatch.setattr(
        partition,
        "_iid_partition",
        lambda n, k, pid, seed: built.append(pid) or iid(n, k, pid, seed),
    )
    mine = partition_dataset(ds, 1000, 999, seed=7)
    assert built == [999, 999]  # its training share, its test share: no other partition
    (train_rows,) = ds.x_train.rows
    (test_rows,) = ds.x_test.rows
    np.testing.assert_array_equal(train_rows, partition_indices(ds.y_train, 1000, 999, seed=7))
    np.testing.assert_array_equal(test_rows, partition_indices(ds.y_test, 1000, 999, seed=7))
    assert len(mine.x_train) == 5 and len(mine.x_test) == 1


def test_dirichlet_draws_once_and_caches_two_arrays(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(partition, "default_cache_dir", lambda: tmp_path)
    partition._dirichlet_partitions.cache_clear()
    calls: list[int] = []
    compute = partition._compute_dirichlet
    monkeypatch.setattr(partition, "_compute_dirichlet", lambda *a: calls.append(1) or compute(*a))
    labels = np.random.default_rng(1).integers(0, 10, 3000)
    parts = [
        partition_indices(labels, 300, p, method="dirichlet", alpha=50.0, seed=2)
        for p in range(300)
    ]
    assert calls == [1]
    assert min(len(p) for p in parts) >= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(3000))
    (cache,) = (tmp_path / "partitions").iterdir()
    with np.load(cache) as z:
        assert sorted(z.files) == ["indices", "offsets"]
    partition._dirichlet_partitions.cache_clear()  # a new process reads the disk cache
    again = partition_indices(labels, 300, 299, method="dirichlet", alpha=50.0, seed=2)
    assert calls == [1]
    np.testing.assert_array_equal(again, parts[299])
    partition._dirichlet_partitions.cache_clear()


def test_a_test_split_smaller_than_the_clients_is_refused_with_what_to_do() -> None:
    ds = _dataset(10_000, 2_000)
    check_partitions(ds, 2_000)
    with pytest.raises(PollenError, match=r"test data \(2000 examples\).*at most 2000 clients"):
        check_partitions(ds, 10_000)
    with pytest.raises(PollenError, match=r"training data \(10000 examples\)"):
        check_partitions(ds, 10_001)
    assert ds.x_train.rows == [] and ds.x_test.rows == []  # no image was read to check


def test_every_dirichlet_client_gets_a_test_example_or_the_run_is_refused() -> None:
    ds = _dataset(1000, 300)
    check_partitions(ds, 30, method="dirichlet", alpha=100.0, seed=1)
    views = [
        partition_dataset(ds, 30, p, method="dirichlet", alpha=100.0, seed=1) for p in range(30)
    ]
    assert min(len(v.y_test) for v in views) >= 1
    assert sum(len(v.y_test) for v in views) == 300
    with pytest.raises(PollenError, match="Dirichlet"):
        check_partitions(ds, 30, method="dirichlet", alpha=0.001, seed=1)
