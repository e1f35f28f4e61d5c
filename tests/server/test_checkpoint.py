"""Checkpoints: round trip, only the latest round, kills mid-write, run lock, strategies pickle."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg
from server_fakes import _history

from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.server.checkpoint import RunLock, load_checkpoint, read_manifest, save_checkpoint
from pollen.server.strategies import STRATEGIES

# --- checkpoints -------------------------------------------------------------------------------


def _fedadam_with_state() -> FedAdam:
    strategy = FedAdam()
    strategy.current_arrays = ArrayRecord([np.ones(3, np.float32)])
    strategy.m_t = {"0": np.full(3, 0.5)}
    strategy.v_t = {"0": np.full(3, 0.25)}
    return strategy


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    arrays = {"0": np.arange(6, dtype=np.float32).reshape(2, 3), "1": np.ones(2, np.float64)}
    save_checkpoint(tmp_path, 2, arrays, _fedadam_with_state(), _history(2), {"model": "cnn"})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 2 and ckpt.config == {"model": "cnn"}
    assert list(ckpt.arrays) == ["0", "1"]
    for k, v in arrays.items():
        np.testing.assert_array_equal(ckpt.arrays[k], v)
        assert ckpt.arrays[k].dtype == v.dtype
    assert isinstance(ckpt.strategy, FedAdam)
    np.testing.assert_array_equal(ckpt.strategy.m_t["0"], np.full(3, 0.5))
    np.testing.assert_array_equal(ckpt.strategy.v_t["0"], np.full(3, 0.25))
    np.testing.assert_array_equal(ckpt.strategy.current_arrays.to_numpy_ndarrays()[0], np.ones(3))
    assert ckpt.history.to_dict() == _history(2).to_dict()


def test_checkpoint_keeps_only_the_latest_round(tmp_path: Path) -> None:
    for rnd in (1, 2, 3):
        save_checkpoint(tmp_path, rnd, {"0": np.full(2, rnd)}, FedAvg(), _history(rnd), {})
    names = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert names == ["arrays-0003.npz", "history-0003.json", "manifest.json", "strategy-0003.pkl"]
    assert load_checkpoint(tmp_path).round == 3


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_a_kill_mid_checkpoint_leaves_the_previous_one(
    tmp_path: Path, monkeypatch, fail_at
) -> None:
    """os.replace fails at the n-th file of round 2's checkpoint: round 1's still loads."""
    save_checkpoint(tmp_path, 1, {"0": np.full(2, 1.0)}, FedAvg(), _history(1), {})
    calls = {"n": 0}
    real_replace = os.replace

    def flaky_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError("killed mid-checkpoint")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, 2, {"0": np.full(2, 2.0)}, FedAvg(), _history(2), {})
    monkeypatch.setattr(os, "replace", real_replace)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 1
    np.testing.assert_array_equal(ckpt.arrays["0"], np.full(2, 1.0))
    assert len(ckpt.history.rounds) == 1
    # ... and the next checkpoint works and tidies up.
    save_checkpoint(tmp_path, 2, {"0": np.full(2, 2.0)}, FedAvg(), _history(2), {})
    assert load_checkpoint(tmp_path).round == 2


def test_damaged_or_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PollenError, match="has no checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 1, {"0": np.zeros(2)}, FedAvg(), _history(1), {})
    manifest = read_manifest(tmp_path)
    (tmp_path / "checkpoint" / manifest["files"]["arrays"]["name"]).write_bytes(b"garbage")
    with pytest.raises(PollenError, match="damaged"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_pickles(name: str) -> None:
    strategy = STRATEGIES[name](RunConfig(model="cnn"))
    assert type(pickle.loads(pickle.dumps(strategy))) is type(strategy)


def test_run_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire()
    assert first.holder() == str(os.getpid())
    assert not second.acquire(timeout=0.3)
    first.release()
    assert second.acquire()
    second.release()
