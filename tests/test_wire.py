"""pollen.wire: records packed for the wire and back."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)

from pollen import wire
from pollen.errors import PollenError
from pollen.wire import (
    HELD,
    MARK,
    NOT_HELD,
    HeldWeights,
    pack_content,
    pack_record,
    unpack_content,
    unpack_record,
    wire_mod,
)

RNG = np.random.default_rng(0)


def _record(shapes: dict[str, tuple[int, ...]], dtype=np.float32) -> ArrayRecord:
    return ArrayRecord(
        array_dict={k: Array(RNG.normal(size=s).astype(dtype)) for k, s in shapes.items()}
    )


def _same(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a) == list(b)
    for key in a:
        x, y = a[key].numpy(), b[key].numpy()
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_pack_record_round_trip_keeps_keys_order_shapes_and_values() -> None:
    record = _record({"7": (3, 3, 3, 24), "8": (24,), "12": (), "0": (1, 2, 1, 5), "x y": (0,)})
    packed = pack_record(record)
    assert len(packed) == 3  # three arrays on the wire instead of five
    assert packed["packed-values"].numpy().size == sum(record[k].numpy().size for k in record)
    _same(unpack_record(packed), record)


def test_records_that_are_not_all_float32_travel_as_they_are() -> None:
    mixed = _record({"a": (2,), "b": (3,)})
    mixed["c"] = Array(np.arange(4, dtype=np.int64))
    assert pack_record(mixed) is mixed
    empty = ArrayRecord()
    assert pack_record(empty) is empty
    plain = _record({"a": (2, 2)})
    assert unpack_record(plain) is plain


def test_content_is_marked_and_unmarked() -> None:
    content = RecordDict({"arrays": _record({"0": (4, 4), "1": (4,)}),
                          "config": ConfigRecord({"server-round": 3})})  # fmt: skip
    packed = pack_content(content)
    assert MARK in packed and "packed-values" in packed["arrays"]
    back = unpack_content(packed)
    assert MARK not in back and back["config"]["server-round"] == 3
    _same(back["arrays"], content["arrays"])


def _message(content: RecordDict, node: int = 1, kind: str = MessageType.TRAIN) -> Message:
    """A message to ``node``, as the server sends it and the client receives it."""
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=node, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=kind,
    )  # fmt: skip
    return Message(metadata=metadata, content=content)


def test_wire_mod_unpacks_for_the_handler_and_packs_the_reply() -> None:
    weights = _record({"0": (3, 5), "1": (5,)})
    seen: list[RecordDict] = []

    def handler(msg: Message, _context: Context) -> Message:
        seen.append(msg.content)
        return Message(metadata=msg.metadata, content=RecordDict({"arrays": msg.content["arrays"]}))

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = wire_mod(_message(pack_content(RecordDict({"arrays": weights}))), context, handler)
    assert MARK not in seen[0] and list(seen[0]["arrays"]) == ["0", "1"]
    assert MARK in reply.content and "packed-values" in reply.content["arrays"]
    _same(unpack_content(reply.content)["arrays"], weights)

    # An unmarked message (Flower's SecAgg+ workflow, say) passes both ways untouched.
    reply = wire_mod(_message(RecordDict({"arrays": weights})), context, handler)
    assert MARK not in reply.content and list(reply.content["arrays"]) == ["0", "1"]


def test_quick_pulls_retry_an_object_that_has_not_arrived_soon() -> None:
    """Flower's pull_objects waits 1 s before its second try; after quick_pulls, 0.05 s."""
    import time
    import types

    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

    from pollen.compat.flower import PULL_FIRST_RETRY, quick_pulls

    module = types.ModuleType("receiver")
    module.pull_objects = pull_objects
    quick_pulls(module, "pull_objects")
    first = module.pull_objects
    quick_pulls(module, "pull_objects")  # idempotent: one wrapper, not two
    assert module.pull_objects is first and first.func is pull_objects

    tries: list[float] = []

    def pull_object(object_id: str) -> bytes:
        tries.append(time.monotonic())
        if len(tries) == 1:  # the content is still on its way
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert module.pull_objects(["abc"], pull_object) == {"abc": b"content"}
    assert len(tries) == 2
    assert tries[1] - tries[0] < 0.5  # Flower's own first retry: 0.8-1.2 s
    assert tries[1] - tries[0] >= PULL_FIRST_RETRY * 0.8 - 0.01  # with Flower's ±20% jitter


# --- weights a client already holds -----------------------------------------------------


def _deliver(msg: Message, seen: dict[int, RecordDict]) -> Message:
    """Send ``msg`` through the wire to its node's client app (wire_mod), as a deployment does."""
    node = msg.metadata.dst_node_id

    def handler(m: Message, _context: Context) -> Message:
        seen[node] = m.content
        return Message(metadata=m.metadata, content=RecordDict({"ok": ConfigRecord({})}))

    context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
    received = _message(pack_content(msg.content), node, msg.metadata.message_type)
    return wire_mod(received, context, handler)


def _to(nodes, content: RecordDict, kind: str) -> list[Message]:
    """One message per node, all sharing ``content`` (as Flower's strategies build them)."""
    return [_message(content, n, kind) for n in nodes]


@pytest.fixture
def warm(monkeypatch) -> None:
    """This process serves its node's later messages too (as pollen.deploy.warm_clientapp does)."""
    monkeypatch.setattr(wire, "_kept", {})
    monkeypatch.setattr(wire, "_serves_later", [True])


def test_train_messages_to_clients_that_evaluated_carry_only_what_changed(warm) -> None:
    weights = _record({"kernel": (40, 30), "mean": (30,), "var": (30,)})
    evaluate = RecordDict({"arrays": weights, "config": ConfigRecord({})})
    held, seen = HeldWeights(), {}
    messages = _to([1, 2, 3], evaluate, MessageType.EVALUATE)
    held.keep(messages, weights)
    assert HELD not in evaluate  # the strategy's shared content is left alone
    replies = {m.metadata.dst_node_id: _deliver(m, seen) for m in messages[:2]}  # not node 3
    assert replies[1].content[HELD]["kept"] == held.id  # the client confirms
    held.held_by(replies.items())
    assert held.nodes == {1, 2}
    assert HELD not in seen[1] and list(seen[1]["arrays"]) == ["kernel", "mean", "var"]

    # The server merged BatchNorm statistics: two small arrays changed.
    merged = ArrayRecord(array_dict=dict(weights.items()))
    merged["mean"], merged["var"] = (
        Array(np.full(30, 0.5, np.float32)),
        Array(np.ones(30, np.float32)),
    )
    train = RecordDict({"arrays": merged, "config": ConfigRecord({"server-round": 2})})
    messages = _to([1, 2, 3], train, MessageType.TRAIN)
    whole = held.shorten(messages, merged)
    assert set(whole) == {1, 2} and whole[1] is train
    assert list(messages[0].content["arrays"]) == ["mean", "var"]
    assert messages[0].content[HELD]["changes-to"] == held.id
    assert messages[2].content is train  # node 3 did not evaluate: the whole weights

    for m in messages:
        _deliver(m, seen)
    for node in (1, 2, 3):  # every handler sees the whole merged weights, and no note
        assert HELD not in seen[node] and seen[node]["config"]["server-round"] == 2
        _same(seen[node]["arrays"], merged)

    # Kept weights serve one train message: sent again, it is refused with NOT_HELD.
    reply = None
    with pytest.raises(PollenError, match=NOT_HELD):
        reply = _deliver(messages[0], seen)
    assert reply is None


def test_a_client_that_lost_the_weights_says_so(warm) -> None:
    weights = _record({"kernel": (40, 30), "mean": (30,)})
    held, seen = HeldWeights(), {}
    (message,) = _to([1], RecordDict({"arrays": weights}), MessageType.EVALUATE)
    held.keep([message], weights)
    held.held_by([(1, _deliver(message, seen))])
    wire._kept.clear()  # the client's app restarted
    merged = ArrayRecord(
        array_dict={**dict(weights.items()), "mean": Array(np.zeros(30, np.float32))}
    )
    (message,) = _to([1], RecordDict({"arrays": merged}), MessageType.TRAIN)
    assert held.shorten([message], merged)
    with pytest.raises(PollenError, match=f"^{NOT_HELD}: this client no longer holds"):
        _deliver(message, seen)


def test_a_process_per_message_keeps_nothing_and_gets_whole_weights(monkeypatch) -> None:
    """Flower's own app runner: the client neither keeps nor confirms."""
    monkeypatch.setattr(wire, "_kept", {})
    monkeypatch.setattr(wire, "_serves_later", [False])
    weights = _record({"kernel": (40, 30), "mean": (30,)})
    held, seen = HeldWeights(), {}
    (message,) = _to([1], RecordDict({"arrays": weights}), MessageType.EVALUATE)
    held.keep([message], weights)
    reply = _deliver(message, seen)
    _same(seen[1]["arrays"], weights)
    assert HELD not in reply.content and wire._kept == {}
    held.held_by([(1, reply)])
    assert held.nodes == set()
    merged = ArrayRecord(
        array_dict={**dict(weights.items()), "mean": Array(np.zeros(30, np.float32))}
    )
    messages = _to([1], RecordDict({"arrays": merged}), MessageType.TRAIN)
    assert held.shorten(messages, merged) == {}
    assert HELD not in messages[0].content


def test_weights_that_changed_mostly_or_in_shape_are_sent_whole(warm) -> None:
    weights = _record({"kernel": (40, 30), "mean": (30,)})
    held = HeldWeights()
    (message,) = _to([1], RecordDict({"arrays": weights}), MessageType.EVALUATE)
    held.keep([message], weights)
    held.held_by([(1, _deliver(message, {}))])
    assert held.nodes == {1}
    for other in (
        _record({"kernel": (40, 30), "mean": (30,)}),  # every array changed
        _record({"kernel": (30, 40), "mean": (30,)}),  # shapes changed
        _record({"mean": (30,), "kernel": (40, 30)}),  # other keys order
        ArrayRecord(array_dict={"kernel": weights["kernel"]}),  # fewer keys
    ):
        messages = _to([1], RecordDict({"arrays": other}), MessageType.TRAIN)
        content = messages[0].content
        assert held.shorten(messages, other) == {}
        assert messages[0].content is content
    # Before any evaluate message, and for a record other than the one sent: whole.
    fresh = HeldWeights()
    messages = _to([1], RecordDict({"arrays": weights}), MessageType.TRAIN)
    assert fresh.shorten(messages, weights) == {}
    messages = _to([1], RecordDict({"arrays": _record({"a": (2,)})}), MessageType.TRAIN)
    assert held.shorten(messages, weights) == {}
