"""The ServerApp's federation: a client the seed picks starts it; resume equals no break."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType
from server_fakes import FakeGrid, _deterministic_client
from server_fakes import fake_model as fake_model  # noqa: F401 - used by pytestmark
from server_fakes import task_identity as task_identity  # noqa: F401 - an autouse fixture

from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.server import app as server_app
from pollen.server.checkpoint import load_checkpoint
from pollen.server.model_files import ModelFiles
from pollen.server.sampling import seeded_order

pytestmark = pytest.mark.usefixtures("fake_model")  # the fake clients' model


@pytest.mark.parametrize("a_node", [1, 2])
def test_the_client_the_seed_picks_starts_the_run_while_the_others_prepare(
    tmp_path: Path, monkeypatch, a_node: int
) -> None:
    """The seed picks a node id, whatever names the clients chose; the other prepares meanwhile."""
    monkeypatch.setattr(ModelFiles, "save", lambda self, run_dir, arrays: None)
    b_node = 3 - a_node
    grid = FakeGrid({b_node: _deterministic_client("b", 1), a_node: _deterministic_client("a", 0)})
    cfg = RunConfig(model="cnn", server_eval=False, min_clients=2, round_timeout=5, num_rounds=1)
    first = seeded_order([1, 2], cfg.seed)[0]
    server_app.run_federation(grid, cfg.replace(out=str(tmp_path)), tmp_path)
    queries = [
        (m.metadata.dst_node_id, m.content["config"].get("request"))
        for m in grid.sent.values()
        if m.metadata.message_type == MessageType.QUERY
    ]
    assert sorted(q for q in queries if q[1] != "hello") == sorted(
        [(first, "initial-arrays"), (3 - first, "prepare")]
    )
    assert queries.index((first, "initial-arrays")) > max(
        queries.index((n, "hello")) for n in (1, 2)
    )  # names first: round 1's sample is drawn by name


def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, monkeypatch) -> None:
    """Weights and FedAdam's optimizer state survive the checkpoint exactly."""
    monkeypatch.setattr(ModelFiles, "save", lambda self, run_dir, arrays: None)

    def grid():
        return FakeGrid({1: _deterministic_client("a", 0), 2: _deterministic_client("b", 1)})

    base = RunConfig(
        model="cnn", strategy="fedadam", server_eval=False, min_clients=2, round_timeout=5
    )
    whole, split = tmp_path / "whole", tmp_path / "split"
    server_app.run_federation(grid(), base.replace(num_rounds=3, out=str(whole)), whole)
    server_app.run_federation(grid(), base.replace(num_rounds=2, out=str(split)), split)
    assert load_checkpoint(split).round == 2
    history = server_app.run_federation(
        grid(), base.replace(num_rounds=3, out=str(split), resume=True), split
    )
    assert [r.round for r in history.rounds] == [1, 2, 3]
    a, b = load_checkpoint(whole), load_checkpoint(split)
    assert a.round == b.round == 3
    for k in a.arrays:
        np.testing.assert_allclose(a.arrays[k], b.arrays[k], rtol=1e-6)
    for k in a.strategy.m_t:
        np.testing.assert_allclose(a.strategy.m_t[k], b.strategy.m_t[k], rtol=1e-6)
        np.testing.assert_allclose(a.strategy.v_t[k], b.strategy.v_t[k], rtol=1e-6)
    assert [r.round for r in b.history.rounds] == [1, 2, 3]
    # FedAdam computes in float64; the global model stays float32 and no update is rejected.
    assert all(a.dtype == np.float32 for a in b.arrays.values())
    assert all(c.error is None for r in history.rounds for c in r.clients)
    assert json.loads((split / "history.json").read_text())["rounds"][-1]["round"] == 3
    with pytest.raises(PollenError, match="already completed all 3 rounds"):
        server_app.run_federation(
            grid(), base.replace(num_rounds=3, out=str(split), resume=True), split
        )
