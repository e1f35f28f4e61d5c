"""pollen.wire with pollen.compress: compressed records, updates as changes, error feedback."""

from __future__ import annotations

import time
import zlib

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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pollen import wire
from pollen.compress import Fp16, Int8, TopK
from pollen.wire import (
    WireFormatError,
    content_bytes,
    pack_content,
    pack_record,
    unpack_content,
    unpack_record,
    unpack_reply,
    wire_mod,
)

RNG = np.random.default_rng(1)
SHAPES = {"0": (3, 3, 3, 16), "1": (16,), "2": (), "3": (256, 40), "4": (0,), "5": (10,)}


def _record(shapes=SHAPES, scale: float = 0.1, rng: np.random.Generator = RNG) -> ArrayRecord:
    return ArrayRecord(
        array_dict={
            k: Array(rng.normal(scale=scale, size=s).astype(np.float32)) for k, s in shapes.items()
        }
    )


def _plus(record: ArrayRecord, scale: float, rng: np.random.Generator = RNG) -> ArrayRecord:
    return ArrayRecord(
        array_dict={
            k: Array(np.asarray(a.numpy() + rng.normal(scale=scale, size=a.shape), np.float32))
            for k, a in record.items()
        }
    )


def _bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


def _close(a: ArrayRecord, b: ArrayRecord, atol: float) -> None:
    assert list(a) == list(b)
    for k in a:
        x, y = a[k].numpy(), b[k].numpy()
        assert x.shape == y.shape and y.dtype == np.float32
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize(("codec", "atol", "share"), [(Fp16(), 1e-3, 0.55), (Int8(), 4e-3, 0.3)])
def test_weights_travel_compressed_and_arrive_as_float32(codec, atol, share) -> None:
    weights = _record()
    packed = pack_record(weights, codec)
    assert "packed-values" in packed and "packed-codec" in packed
    assert _bytes(packed) < share * _bytes(pack_record(weights))
    _close(unpack_record(packed), weights, atol)


def test_an_update_travels_as_its_change_and_is_rebuilt_from_the_weights_sent() -> None:
    sent = _record(scale=1.0)
    trained = _plus(sent, 0.001)
    packed = pack_record(trained, Int8(), base=sent)
    assert bytes(packed["packed-codec"].numpy()) == b"int8+delta"
    # The change is 1000 times smaller than the weights: so is the error.
    _close(unpack_record(packed, base=sent), trained, atol=2e-5)
    with pytest.raises(WireFormatError, match="change to weights this end did not send"):
        unpack_record(packed)
    other = _record({**SHAPES, "1": (17,)})
    with pytest.raises(WireFormatError, match="change to weights this end did not send"):
        unpack_record(packed, base=other)
    # Top-k is only sent as a change: without weights of the same shapes, whole.
    assert "packed-codec" not in pack_record(trained, TopK(0.1))
    assert "packed-codec" not in pack_record(trained, TopK(0.1), base=other)
    topk = pack_record(trained, TopK(0.1), base=sent)
    assert _bytes(topk) < 0.3 * _bytes(pack_record(trained))


def test_top_k_not_sent_as_a_change_is_refused() -> None:
    packed = dict(pack_record(_record(), TopK(0.5), base=_record()).items())
    packed["packed-codec"] = Array(np.frombuffer(b"topk", np.uint8).copy())
    with pytest.raises(WireFormatError, match="topk is not a change"):
        unpack_record(ArrayRecord(array_dict=packed))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"packed-codec": np.frombuffer(b"zip", np.uint8).copy()}, "names no codec"),
        ({"packed-scales": np.ones(2, np.float32)}, "2 scales for 6 arrays"),
        ({"packed-values": np.zeros(3, np.int8)}, "not deflated bytes"),
        ({"packed-values": np.frombuffer(zlib.compress(bytes(3)), np.uint8)}, "bytes for"),
        ({"packed-values": np.arange(2000, dtype=np.uint8)}, "not a deflate stream"),
        ({"packed-index": np.zeros(3, np.uint32)}, "has the arrays"),
        ({"packed-scales": -np.ones(6, np.float32)}, "negative"),
    ],
)
def test_a_bad_compressed_record_raises_wire_format_error(change, problem) -> None:
    packed = dict(pack_record(_record(), Int8()).items())
    packed.update({k: Array(v) for k, v in change.items()})
    with pytest.raises(WireFormatError, match=problem):
        unpack_record(ArrayRecord(array_dict=packed))


def _train(node: int = 1) -> Message:
    metadata = Metadata(
        run_id=7, message_id="m1", src_node_id=0, dst_node_id=node, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=MessageType.TRAIN,
    )  # fmt: skip
    return Message(metadata=metadata, content=RecordDict())


def test_a_client_sends_its_update_compressed_and_carries_what_top_k_left_out() -> None:
    wire._feedback.clear()
    sent = _record()
    step = _plus(sent, 0.01)
    delta = {k: step[k].numpy() - sent[k].numpy() for k in sent}

    def handler(msg: Message, _context: Context) -> Message:
        arrays = msg.content["arrays"].items()
        trained = {k: Array(np.asarray(a.numpy() + delta[k], np.float32)) for k, a in arrays}
        content = RecordDict({"arrays": ArrayRecord(array_dict=trained)})
        return Message(metadata=msg.metadata, content=content)

    config = {"compress": "topk:0.25"}
    context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config=config)
    arrived = []
    for _ in range(3):
        msg = _train()
        msg.content = pack_content(RecordDict({"arrays": sent}))
        reply = wire_mod(msg, context, handler)
        assert bytes(reply.content["arrays"]["packed-codec"].numpy()) == b"topk+delta"
        arrived.append(unpack_content(reply.content, base=sent)["arrays"])
    residual = wire._feedback[(7, 1)].residual
    flat = lambda r: np.concatenate([r[k].numpy().ravel() for k in r])  # noqa: E731
    # Three updates' changes arrived, plus what is still carried: three times the change.
    total = sum(flat(r) - flat(sent) for r in arrived) + residual
    np.testing.assert_allclose(total, 3 * (flat(step) - flat(sent)), atol=1e-6)
    # The second update sent values the first left out (the residual was added).
    first, second = (flat(r) - flat(sent) for r in arrived[:2])
    assert not np.array_equal(np.flatnonzero(first), np.flatnonzero(second))

    # Other messages' replies (an evaluation, a query) are packed, not compressed.
    msg = _train()
    msg.metadata.message_type = MessageType.EVALUATE
    msg.content = pack_content(RecordDict({"arrays": sent}))
    reply = wire_mod(msg, context, handler)
    assert "packed-codec" not in reply.content["arrays"]


def test_an_int8_update_travels_in_under_a_quarter_of_its_fp32_bytes() -> None:
    sent = _record(scale=0.1)
    # A change as training makes it: heavier-tailed than a Gaussian.
    trained = ArrayRecord(
        array_dict={
            k: Array(np.asarray(a.numpy() + 1e-3 * RNG.standard_t(3, a.shape), np.float32))
            for k, a in sent.items()
        }
    )
    plain = content_bytes(pack_content(RecordDict({"arrays": trained})))
    packed = pack_content(RecordDict({"arrays": trained}), Int8(), base=sent)
    values = packed["arrays"]["packed-values"].numpy()
    assert values.nbytes < 0.7 * sum(a.numpy().size for a in trained.values())  # deflated
    assert content_bytes(packed) < 0.25 * plain  # .npy headers, keys, shapes and scales too
    _close(unpack_content(packed, base=sent)["arrays"], trained, atol=1e-3)


def _evaluate_reply(stats: dict[str, np.ndarray], config: dict) -> Message:
    """What wire_mod sends back for an evaluate message whose handler re-estimated ``stats``."""

    def handler(msg: Message, _context: Context) -> Message:
        arrays = {k: Array(v) for k, v in stats.items()}
        content = RecordDict({"bn-stats": ArrayRecord(array_dict=arrays)})
        return Message(metadata=msg.metadata, content=content)

    context = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config=config)
    msg = _train()
    msg.metadata.message_type = MessageType.EVALUATE
    msg.content = pack_content(RecordDict({"arrays": _record()}))
    return wire_mod(msg, context, handler)


def test_batchnorm_statistics_travel_as_fp16_under_an_uplink_codec() -> None:
    means = RNG.normal(scale=0.5, size=64).astype(np.float32)
    variances = np.r_[RNG.uniform(1e-3, 4.0, 63), 1e-7].astype(np.float32)  # one tiny
    stats = {"3": means, "4": variances}
    reply = _evaluate_reply(stats, {"compress": "int8"})
    sent = reply.content["bn-stats"]
    assert bytes(sent["packed-codec"].numpy()) == b"fp16"
    assert sent["packed-values"].numpy().dtype == np.float16
    plain = _evaluate_reply(stats, {"compress": "none"}).content["bn-stats"]
    assert "packed-codec" not in plain
    assert sent["packed-values"].numpy().nbytes == plain["packed-values"].numpy().nbytes / 2
    # The server decodes them (unpack_reply) before anything checks or uses them.
    arrived = unpack_reply(reply)
    assert arrived.has_content() and wire.MARK not in arrived.content
    for key, value in stats.items():
        got = arrived.content["bn-stats"][key].numpy()
        assert got.dtype == np.float32 and got.shape == value.shape
        np.testing.assert_allclose(got, value, rtol=2**-11, atol=2**-25)
        assert not np.array_equal(got, value)  # rounded: they did travel as fp16
    # Statistics beyond fp16's range travel as they are, not as inf.
    big = {"3": means, "4": np.r_[variances[:-1], 1e5].astype(np.float32)}
    sent = _evaluate_reply(big, {"compress": "int8"}).content["bn-stats"]
    assert "packed-codec" not in sent
    np.testing.assert_array_equal(unpack_record(sent)["4"].numpy(), big["4"])


def test_content_bytes_counts_what_travels() -> None:
    content = RecordDict({"arrays": _record(), "config": ConfigRecord({"a": 1})})
    whole = content_bytes(pack_content(content))
    assert whole == _bytes(pack_content(content)["arrays"])
    assert content_bytes(pack_content(content, Int8())) < 0.3 * whole


# --- fuzzing: mutated compressed records -------------------------------------------------

FUZZ = settings(
    max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
_packable = st.dictionaries(
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"), max_size=8),
    _shapes,
    min_size=1,
    max_size=5,
)


@st.composite
def _mutated(draw) -> tuple[ArrayRecord, ArrayRecord]:
    """A compressed record (and its base) with one part's bytes flipped, cut or extended."""
    shapes = draw(_packable)
    # Seeded per case: a deflated payload's length depends on the values.
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = _record(shapes, rng=rng)
    codec = draw(st.sampled_from([Fp16(), Int8(), TopK(0.3)]))
    packed = pack_record(_plus(base, 0.1, rng), codec, base=base)
    part = draw(st.sampled_from(sorted(packed)))
    data = bytearray(packed[part].data)
    kind = draw(st.sampled_from(["flip", "truncate", "extend"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    else:
        data += draw(st.binary(min_size=1, max_size=64))
    out = dict(packed.items())
    array = packed[part]
    out[part] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=bytes(data))
    return ArrayRecord(array_dict=out), base


@FUZZ
@given(_mutated())
def test_mutated_compressed_records_decode_or_raise_wire_format_error(case) -> None:
    import tracemalloc

    record, base = case
    size = _bytes(record) + _bytes(base)
    tracemalloc.start()
    try:
        try:
            unpack_record(record, base=base)
        except WireFormatError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 64 * size + (64 << 10), f"{peak} bytes allocated for {size} bytes"
