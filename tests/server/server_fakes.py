"""Fakes for the server's tests: a Grid whose nodes answer by behaviour, and client replies."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from pollen.server.history import ClientRound, History, RoundRecord
from pollen.wire import wire_mod


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages built outside a running app need a run id (a ServerApp sets it)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


@pytest.fixture
def fake_model(monkeypatch):
    """The server's model is :func:`_arrays`' (the fakes' initial weights), not the config's.

    A test module that runs ``run_federation`` with the fake clients imports it
    (``from server_fakes import fake_model as fake_model``) and marks its tests
    ``@pytest.mark.usefixtures("fake_model")``.
    """
    from pollen.server import app as server_app
    from pollen.server.replies import ModelReference

    reference = ModelReference.of(_arrays().to_numpy_ndarrays())
    monkeypatch.setattr(server_app, "_model_reference", lambda files: reference)


def _global() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
        rng.normal(size=(4,)).astype(np.float32),
        np.arange(3, dtype=np.int64),
    ]


# --- a fake Grid --------------------------------------------------------------------------------


class FakeGrid:
    """A Grid whose nodes answer by a per-node behaviour.

    Behaviours: a function ``(message) -> RecordDict`` (a reply), ``"error"``
    (an error reply), ``"silent"`` (never replies) or ``"hang"``
    (``pull_messages`` blocks, as Flower's does when a reply's objects never arrive).
    """

    def __init__(self, behaviours: dict) -> None:
        self.behaviours = behaviours
        self.sent: dict[str, Message] = {}
        self.release = threading.Event()
        self.pulls = 0

    def get_node_ids(self):
        return list(self.behaviours)

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            mid = f"m{len(self.sent)}-{i}"
            self.sent[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in message_ids:
            msg = self.sent[mid]
            node = msg.metadata.dst_node_id
            behaviour = self.behaviours[node]
            if behaviour == "silent":
                continue
            if behaviour == "hang":
                self.release.wait()
                continue
            meta = Metadata(
                run_id=1,
                message_id=f"reply-{mid}",
                src_node_id=node,
                dst_node_id=0,
                reply_to_message_id=mid,
                group_id="",
                created_at=time.time(),
                ttl=3600,
                message_type=msg.metadata.message_type,
            )
            if behaviour == "error":
                err = Error(code=2, reason="<class 'ValueError'>:<'broken client'>")
                out.append(Message(metadata=meta, error=err))
            else:  # the node sees and sends records as a real client does (pollen.wire)
                try:
                    content = _through_wire(msg, behaviour)
                except Exception as ex:  # an error reply, as Flower makes of a raising app
                    reason = f"<class '{type(ex).__module__}.{type(ex).__name__}'>:<'{ex}'>"
                    out.append(Message(metadata=meta, error=Error(code=1, reason=reason)))
                    continue
                out.append(Message(metadata=meta, content=content))
        return out


def _through_wire(msg: Message, behaviour) -> RecordDict:
    """The content of the reply of ``behaviour``, a client's handler behind ``wire_mod``."""
    node = msg.metadata.dst_node_id
    context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})

    def handler(received: Message, _context: Context) -> Message:
        return Message(metadata=received.metadata, content=behaviour(received))

    # A copy: wire_mod replaces the content of the message it gets.
    return wire_mod(Message(metadata=msg.metadata, content=msg.content), context, handler).content


def _trainer(name: str, shift: float = 0.01, n: int = 10, tamper=None):
    def reply(msg: Message) -> RecordDict:
        config = msg.content.config_records.get("config", ConfigRecord())
        if config.get("request") == "hello":
            return RecordDict({"client": ConfigRecord({"name": name})})
        arrays = [a + shift for a in msg.content["arrays"].to_numpy_ndarrays()]
        if tamper is not None:
            arrays = tamper(arrays)
        metrics = {"num-examples": n, "train_loss": 1.0, "eval_loss": 1.0, "eval_accuracy": 0.5}
        return RecordDict(
            {
                "arrays": ArrayRecord(arrays),
                "metrics": MetricRecord(metrics),
                "client": ConfigRecord({"name": name}),
            }
        )

    return reply


def _arrays() -> ArrayRecord:
    return ArrayRecord([np.zeros((2, 3), np.float32), np.ones(3, np.float32)])


def _strategy(min_nodes: int = 1) -> FedAvg:
    return FedAvg(min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes, min_available_nodes=1)


def _nan(arrays):
    return [np.full_like(a, np.nan) for a in arrays]


def _deterministic_client(name: str, seed: int):
    """Initial weights on request; a training step that depends only on the weights sent."""

    def reply(msg: Message) -> RecordDict:
        config = msg.content.config_records.get("config", ConfigRecord())
        info = ConfigRecord({"name": name, "classes": ["a", "b"]})
        if config.get("request") == "initial-arrays":
            return RecordDict({"arrays": _arrays(), "client": info})
        if config.get("request") in ("hello", "prepare"):
            return RecordDict({"client": info})
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        # Like Keras: the client's model is float32 whatever dtype it was sent.
        new = [np.tanh(a + 0.1 * (seed + 1)).astype(np.float32) for a in arrays]
        metrics = {"num-examples": 10 + seed, "train_loss": 1.0, "eval_loss": 1.0}
        return RecordDict(
            {"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics), "client": info}
        )

    return reply


def _history(rounds: int) -> History:
    return History(
        config={"num-rounds": 5},
        rounds=[
            RoundRecord(round=r, clients=[ClientRound(node_id=7, name="c", error="train: x")])
            for r in range(1, rounds + 1)
        ],
    )
