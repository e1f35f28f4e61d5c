"""Tests for pollen.data.partition (flwr-datasets partitioners over label arrays)."""

from __future__ import annotations

import numpy as np
import pytest

from pollen.data.dataset import Dataset
from pollen.data.partition import label_histogram, partition_dataset, partition_indices
from pollen.errors import PollenError

LABELS = np.random.default_rng(0).integers(0, 10, 1000)


def _all(labels: np.ndarray, n: int, **kwargs: object) -> list[np.ndarray]:
    return [partition_indices(labels, n, pid, **kwargs) for pid in range(n)]


def _check_cover(parts: list[np.ndarray], size: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no repeats
    joined = np.concatenate(parts)
    assert len(joined) == size  # disjoint ...
    np.testing.assert_array_equal(np.sort(joined), np.arange(size))  # ... and complete


def _mean_max_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    shares = [label_histogram(labels[p], 10).max() / len(p) for p in parts if len(p)]
    return float(np.mean(shares))


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_disjoint_complete_deterministic(method: str) -> None:
    parts = _all(LABELS, 7, method=method, seed=3)
    _check_cover(parts, len(LABELS))
    again = _all(LABELS, 7, method=method, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = _all(LABELS, 7, method=method, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_balanced_and_random() -> None:
    parts = _all(LABELS, 6, method="iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert parts[0][-1] > len(LABELS) // 2  # shuffled, not contiguous blocks
    assert _mean_max_share(LABELS, _all(LABELS, 10, method="iid")) < 0.2


def test_dirichlet_is_skewed() -> None:
    parts = _all(LABELS, 10, method="dirichlet", alpha=0.1, seed=42)
    _check_cover(parts, len(LABELS))
    assert _mean_max_share(LABELS, parts) > 0.4
    assert min(len(p) for p in parts) >= 10  # default minimum partition size


def test_returned_indices_are_private_copies() -> None:
    first = partition_indices(LABELS, 4, 0)
    first[:] = -1
    assert partition_indices(LABELS, 4, 0).min() >= 0


def test_partition_dataset_splits_test_too() -> None:
    rng = np.random.default_rng(1)
    ds = Dataset(
        x_train=rng.integers(0, 256, (100, 4, 4, 3), dtype=np.uint8),
        y_train=rng.integers(0, 3, 100),
        x_test=rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8),
        y_test=rng.integers(0, 3, 30),
        class_names=("a", "b", "c"),
    )
    for method in ("iid", "dirichlet"):
        views = [partition_dataset(ds, 3, pid, method=method, alpha=1.0) for pid in range(3)]
        assert sum(len(v.x_train) for v in views) == 100
        assert sum(len(v.x_test) for v in views) == 30
        assert all(0 < len(v.x_test) < 30 for v in views)
        for pid, v in enumerate(views):
            idx = partition_indices(ds.y_test, 3, pid, method=method, alpha=1.0)
            np.testing.assert_array_equal(v.x_test, ds.x_test[idx])
            np.testing.assert_array_equal(v.y_test, ds.y_test[idx])
            assert v.class_names == ds.class_names
            assert len(v.x_train) == len(v.y_train)


def test_label_histogram() -> None:
    np.testing.assert_array_equal(label_histogram(np.array([0, 2, 2]), 4), [1, 0, 2, 0])
    with pytest.raises(ValueError):
        label_histogram(np.array([5]), 3)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, 0), {}, "at least 1"),
        ((3, 3), {}, "out of range"),
        ((3, -1), {}, "out of range"),
        ((3, 0), {"method": "shards"}, "Unknown partitioning method"),
        ((3, 0), {"method": "dirichlet", "alpha": 0.0}, "alpha must be a positive"),
        ((3, 0), {"method": "dirichlet", "alpha": -1.0}, "alpha must be a positive"),
        ((2000, 0), {}, "more partitions than examples"),
        ((10, 0), {"method": "dirichlet", "alpha": 0.01, "min_partition_size": 90}, "at least 90"),
    ],
)
def test_bad_arguments(args: tuple[int, int], kwargs: dict, match: str) -> None:
    with pytest.raises(PollenError, match=match):
        partition_indices(LABELS, *args, **kwargs)
