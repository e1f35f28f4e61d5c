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


# --- malformed records: one error type, bounded memory ------------------------------------

WireFormatError = wire.WireFormatError


def _npy(a: np.ndarray) -> bytes:
    return Array(a).data


def _raw(data: bytes, dtype: str = "float32", shape=(0,)) -> Array:
    """An Array of any bytes, as Flower rebuilds one from what arrived."""
    return Array(dtype=dtype, shape=tuple(shape), stype="numpy.ndarray", data=data)


def _packed(values: np.ndarray, dims, keys: bytes) -> ArrayRecord:
    """A packed record of chosen parts (what a hostile peer can send)."""
    return ArrayRecord(
        array_dict={
            "packed-values": Array(np.asarray(values, np.float32)),
            "packed-shapes": Array(np.asarray(dims, np.int64)),
            "packed-keys": Array(np.frombuffer(keys, np.uint8).copy()),
        }
    )


def _header(shape: str, descr: str = "<f4") -> bytes:
    """A .npy v1 header claiming ``shape`` (written as Python would)."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


MALFORMED = {
    "negative dim": _packed(np.zeros(4), [2, -2, -2], b"a"),
    "negative rank": _packed(np.zeros(4), [-1, 4], b"a"),
    "duplicate key": _packed(np.zeros(4), [1, 2, 1, 2], b"a\na"),
    "keys not UTF-8": _packed(np.zeros(2), [1, 2], b"\xff\xfe"),
    "shapes run out": _packed(np.zeros(8), [1, 4], b"a\nb"),
    "rank beyond the shapes": _packed(np.zeros(8), [3, 2], b"a"),
    "values run out": _packed(np.zeros(3), [1, 4], b"a"),
    "values left over": _packed(np.zeros(5), [1, 4], b"a"),
    "dims left over": _packed(np.zeros(4), [1, 4, 7], b"a"),
    "huge rank": _packed(np.zeros(1), [10**6, 1], b"a"),
    "dims that overflow": _packed(np.zeros(0), [3, 0, 2**62, 2**62], b"a"),
    "values not float32": ArrayRecord(
        array_dict={
            "packed-values": Array(np.zeros(4, np.float64)),
            "packed-shapes": Array(np.array([1, 4], np.int64)),
            "packed-keys": Array(np.frombuffer(b"a", np.uint8).copy()),
        }
    ),
    "a part missing": ArrayRecord(array_dict={"packed-values": Array(np.zeros(4, np.float32))}),
    "an extra array": ArrayRecord(
        array_dict={**_packed(np.zeros(4), [1, 4], b"a"), "x": Array(np.zeros(1, np.float32))}
    ),
    "trailing bytes": ArrayRecord(
        array_dict={
            **_packed(np.zeros(4), [1, 4], b"a"),
            "packed-values": _raw(_npy(np.zeros(4, np.float32)) + b"junk", shape=(4,)),
        }
    ),  # fmt: skip
    "object dtype": ArrayRecord(
        array_dict={"w": _raw(_header("(1,)", "|O") + b"\0" * 8, "object", (1,))}
    ),
    "complex dtype": ArrayRecord(array_dict={"w": Array(np.zeros(2, np.complex64))}),
    "string dtype": ArrayRecord(array_dict={"w": Array(np.array(["ab"]))}),
    "structured dtype": ArrayRecord(array_dict={"w": Array(np.zeros(2, "i4,f4"))}),
    "a header claiming 1 GiB": ArrayRecord(
        array_dict={"w": _raw(_header(f"({2**28},)") + b"\0" * 64, shape=(2**28,))}
    ),
    "a negative dim in the header": ArrayRecord(
        array_dict={"w": _raw(_header("(-4,)") + b"\0" * 16, shape=(-4,))}
    ),
    "a header that is code": ArrayRecord(
        array_dict={"w": _raw(_header("(1,)").replace(b"(1,)", b"__import__('os')") + b"\0" * 4)}
    ),
    "not .npy": ArrayRecord(array_dict={"w": _raw(b"\x93NUMPY")}),
    "not numpy": ArrayRecord(
        array_dict={"w": Array(dtype="float32", shape=(1,), stype="torch", data=b"\0" * 4)}
    ),
    "its fields disagree with its bytes": ArrayRecord(
        array_dict={"w": _raw(_npy(np.zeros(4, np.float32)), shape=(2, 2))}
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_record_raises_wire_format_error_and_nothing_else(case: str) -> None:
    import tracemalloc

    record = MALFORMED[case]
    tracemalloc.start()
    try:
        with pytest.raises(WireFormatError, match="A record that arrived is malformed"):
            unpack_record(record)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decoding {case} allocated {peak} bytes"
    assert isinstance(WireFormatError("x"), PollenError | ValueError)


def test_a_record_with_zero_sized_and_scalar_arrays_still_round_trips() -> None:
    record = _record({"": (), "s": (), "z": (0, 7), "zz": (3, 0, 2), "\u00e9\U0001f600": (2,)})
    _same(unpack_record(pack_record(record)), record)
    keyed = ArrayRecord(array_dict={"a\nb": Array(np.zeros(2, np.float32))})
    assert pack_record(keyed) is keyed  # a key with a newline cannot be packed: sent as it is
    assert unpack_record(keyed) is keyed


@pytest.fixture
def task_identity(monkeypatch) -> None:
    """Messages built outside a running app need a run id (a ServerApp sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def _reply(node: int, content: RecordDict) -> Message:
    metadata = Metadata(
        run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
        reply_to_message_id=f"m{node}", group_id="1", created_at=time.time(),
        ttl=DEFAULT_TTL, message_type=MessageType.TRAIN,
    )  # fmt: skip
    return Message(metadata=metadata, content=content)


def test_a_malformed_reply_becomes_that_clients_error_reply(task_identity) -> None:
    """The server's pull thread no longer dies: the client is rejected, the others go on."""
    from pollen.server.exchange import exchange, readable_reason

    good = pack_content(RecordDict({"arrays": _record({"0": (2, 2)})}))
    bad = RecordDict({"arrays": MALFORMED["shapes run out"], MARK: ConfigRecord({"packed": True})})

    class Grid:  # two clients: one honest, one sending a malformed record
        def push_messages(self, messages):
            return [f"m{m.metadata.dst_node_id}" for m in messages]

        def pull_messages(self, ids):
            return [_reply(int(i[1:]), good if i == "m1" else bad) for i in ids]

    messages = [Message(RecordDict({"x": ConfigRecord({})}), n, MessageType.TRAIN) for n in (1, 2)]
    result = exchange(Grid(), messages, timeout=5.0, poll_interval=0.01)
    assert set(result.replies) == {1, 2} and not result.missing
    assert result.replies[1].has_content() and "0" in result.replies[1].content["arrays"]
    failed = result.replies[2]
    assert failed.has_error() and failed.metadata.src_node_id == 2
    reason = readable_reason(failed.error.reason)
    assert reason.startswith("rejected: A record that arrived is malformed: packed-shapes")


def test_a_client_answers_a_malformed_message_with_an_error_not_a_crash() -> None:
    called: list[Message] = []

    def handler(msg: Message, _context: Context) -> Message:
        called.append(msg)
        return Message(metadata=msg.metadata, content=RecordDict())

    bad = RecordDict({"arrays": MALFORMED["keys not UTF-8"], MARK: ConfigRecord({"packed": True})})
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = wire_mod(_message(bad), context, handler)
    assert not called and reply.has_error()
    assert "packed-keys are not UTF-8" in reply.error.reason


# --- fuzzing: random bytes and mutated valid records ------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

#: A few seconds in all: CI runs these on every push. No example database (no .hypothesis/).
FUZZ = settings(
    max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
_records = st.dictionaries(st.text(max_size=8), _shapes, min_size=1, max_size=5)
_packable = st.dictionaries(  # keys pack_record packs: UTF-8 (no lone surrogate), no newline
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=8),
    _shapes,
    min_size=1,
    max_size=5,
)


def _valid(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        array_dict={
            k: Array(rng.integers(0, 2**32, size=s, dtype=np.uint32).view(np.float32))
            for k, s in shapes.items()
        }
    )  # any bit pattern: NaNs and infinities too


def _decodes_or_refuses(record: ArrayRecord) -> ArrayRecord | None:
    """Decode ``record``: it either decodes or raises WireFormatError (anything else fails)."""
    try:
        return unpack_record(record)
    except WireFormatError:
        return None


def _input_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


@FUZZ
@given(_records, st.integers(0, 2**16))
def test_valid_records_round_trip_exactly(shapes, seed) -> None:
    record = _valid(shapes, seed)
    back = unpack_record(pack_record(record))
    assert list(back) == list(record)
    for key in record:
        assert back[key].numpy().tobytes() == record[key].numpy().tobytes()
        assert back[key].numpy().shape == record[key].numpy().shape


_PARTS = ("packed-values", "packed-shapes", "packed-keys")


@st.composite
def _mutated(draw) -> ArrayRecord:
    """A valid packed record with one part's bytes flipped, cut, extended or its dims changed."""
    packed = pack_record(_valid(draw(_packable)))
    part = draw(st.sampled_from(_PARTS))
    array = packed[part]
    data = bytearray(array.data)
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "dim", "header"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif kind == "extend":
        data += draw(st.binary(min_size=1, max_size=64))
    elif kind == "dim":  # a length field: one of the ranks or dims of packed-shapes
        dims = packed["packed-shapes"].numpy().copy()
        dims[draw(st.integers(0, len(dims) - 1))] = draw(
            st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 70))
        )
        part, data = "packed-shapes", bytearray(Array(dims).data)
    else:  # the shape numpy's header claims
        start = data.index(b"'shape': (") + 10
        claim = str(draw(st.integers(-(2**40), 2**64))).encode()
        data[start : data.index(b")", start)] = claim + b","
    out = dict(packed.items())
    out[part] = _raw(bytes(data), array.dtype, array.shape)
    return ArrayRecord(array_dict=out)


@FUZZ
@given(_mutated())
def test_mutated_records_decode_or_raise_wire_format_error(record) -> None:
    out = _decodes_or_refuses(record)
    if out is not None:  # a mutation that still makes sense (a flipped value bit, say)
        assert sum(a.numpy().nbytes for a in out.values()) <= _input_bytes(record)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from([*_PARTS, "w"]),
        st.tuples(st.binary(max_size=300), st.sampled_from(["float32", "int64", "uint8"])),
        min_size=1,
    )
)
def test_random_bytes_decode_or_raise_wire_format_error(parts) -> None:
    record = ArrayRecord(
        array_dict={k: _raw(data, dtype, (len(data),)) for k, (data, dtype) in parts.items()}
    )
    _decodes_or_refuses(record)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(["(1,)", "(3, 4)", "()", "(0, 9)"]))
def test_random_bytes_after_a_numpy_header_decode_or_raise_wire_format_error(data, shape) -> None:
    _decodes_or_refuses(ArrayRecord(array_dict={"w": _raw(_header(shape) + data)}))


@settings(FUZZ, max_examples=40)
@given(_mutated())
def test_decoding_allocates_at_most_a_small_multiple_of_what_arrived(record) -> None:
    import tracemalloc

    size = _input_bytes(record)
    tracemalloc.start()
    try:
        _decodes_or_refuses(record)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 64 * size + (64 << 10), f"{peak} bytes allocated for {size} bytes"
