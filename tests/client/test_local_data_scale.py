"""A simulated client of thousands builds its own data only (pollen.client.local_data)."""

from __future__ import annotations

import numpy as np

import pollen.client.local_data as local_data
import pollen.data.partition as partition
from pollen.config import RunConfig
from pollen.data.dataset import Dataset
from pollen.data.partition import partition_indices


class RecordingArray(np.ndarray):
    """An image array that records the rows read from it."""

    rows: list

    def __getitem__(self, key):
        if isinstance(key, np.ndarray):
            self.rows.append(key)
        return np.asarray(self).__getitem__(key)


def _recording(array: np.ndarray) -> RecordingArray:
    out = array.view(RecordingArray)
    out.rows = []
    return out


def test_building_client_999s_data_touches_no_other_clients(monkeypatch) -> None:
    rng = np.random.default_rng(3)
    whole = Dataset(
        x_train=_recording(rng.integers(0, 256, (50_000, 1, 1, 1), dtype=np.uint8)),
        y_train=rng.integers(0, 10, 50_000),
        x_test=_recording(rng.integers(0, 256, (10_000, 1, 1, 1), dtype=np.uint8)),
        y_test=rng.integers(0, 10, 10_000),
        class_names=tuple("abcdefghij"),
    )
    monkeypatch.setattr(local_data, "load_dataset", lambda *a, **k: whole)
    built: list[int] = []
    iid = partition._iid_partition
    monkeypatch.setattr(
        partition,
        "_iid_partition",
        lambda n, k, pid, seed: built.append(pid) or iid(n, k, pid, seed),
    )
    local_data._load_whole_dataset.cache_clear()
    local_data.load_client_data.cache_clear()
    try:
        spec = local_data.client_data_spec(
            RunConfig(seed=5), {"partition-id": 999, "num-partitions": 1000}
        )
        mine = local_data.load_client_data(spec)
    finally:
        local_data._load_whole_dataset.cache_clear()
        local_data.load_client_data.cache_clear()
    assert built == [999, 999]  # no other client's share was computed, nor its rows read
    (train_rows,) = whole.x_train.rows  # one read of the images: client 999's rows
    (test_rows,) = whole.x_test.rows
    np.testing.assert_array_equal(train_rows, partition_indices(whole.y_train, 1000, 999, seed=5))
    np.testing.assert_array_equal(test_rows, partition_indices(whole.y_test, 1000, 999, seed=5))
    assert (len(mine.y_train), len(mine.y_test)) == (50, 10)
    assert local_data.load_client_data.cache_info().maxsize == 2  # a bounded cache
