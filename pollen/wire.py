"""Records on the wire: a record's many arrays sent as one.

Flower 1.42 moves every array of an ``ArrayRecord`` as an object of its own,
pushed and pulled with its own HTTP request on every hop (ServerApp to
SuperLink, SuperLink to SuperNode, SuperNode to the client app, and back).
MobileNetV2 has 262 arrays: on a loopback deployment its 9 MB of weights
took 12-17 s per hop (measured with Pollen's clients idle, tiny data), about
a minute of every round. Packed into one ``float32`` vector (which Flower cuts
into 5 MB chunks), the same weights are a handful of objects.

Both ends opt in, so messages of other senders pass untouched: the server
packs what it sends in :func:`pollen.server.exchange.exchange` and marks the message;
:func:`wire_mod`, a client mod, unpacks a marked message before the handler
sees it and packs the reply; the server unpacks the reply. Handlers,
strategies and checkpoints only ever see ordinary records. An
``ArrayRecord`` whose arrays are not all ``float32`` is sent as it is.

Why not a library: Flower has no option to batch a record's arrays into one
object, and its ``ArrayRecord`` keeps one object per array by design.

Weights a client already holds are not sent again (:class:`HeldWeights`,
deployments only): a round's train message carries the global weights that
the same clients received in the previous round's evaluate message, with
only the BatchNorm statistics merged since then. The server asks the
clients to keep the evaluate message's weights; a client whose app process
serves its later messages too (Pollen's warm app runner; Flower's own starts
a process per message) keeps them and says so in its reply. The server then
sends such a client only the arrays that changed, naming the weights they
build on, and :func:`wire_mod` rebuilds the whole record before the handler
sees it. A client that no longer holds them (its app restarted) replies
:data:`NOT_HELD`, and the server sends it the whole record. Flower has
nothing of the kind: its objects are content-addressed per message, and a
SuperNode keeps none between messages.

Compressed records (:mod:`pollen.compress`, ``--compress``/``--compress-down``):
the server sends the weights with its codec (:func:`pack_content`), and a
client sends its train reply's weights as the change to the weights it received,
compressed, with what the codec left out of its earlier updates added
(:func:`wire_mod`); the server rebuilds them as ``float32`` weights from the
ones it sent (:func:`unpack_reply`'s ``base``) before anything checks them.
The reply's other ``float32`` records (an evaluation's BatchNorm statistics)
then travel as ``fp16``. See ``docs/compression.md``.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from pollen.compress import CODECS, Codec, Feedback, Fp16, parse, with_feedback
from pollen.errors import PollenError

__all__ = [
    "HELD",
    "MARK",
    "NOT_HELD",
    "HeldWeights",
    "WireFormatError",
    "content_bytes",
    "held_weights",
    "pack_content",
    "pack_record",
    "serve_later_messages",
    "unpack_content",
    "unpack_record",
    "unpack_reply",
    "uplink_codec",
    "wire_array",
    "wire_mod",
]

#: Name of the ConfigRecord that marks a message whose ArrayRecords may be packed.
MARK = "pollen-wire"

_VALUES, _SHAPES, _KEYS = "packed-values", "packed-shapes", "packed-keys"
#: A compressed packed record: the codec's name (``+delta``: a change to the receiver's
#: weights) and its payload arrays, each named ``packed-<name>`` (see pollen.compress).
_CODEC, _PREFIX, _DELTA = "packed-codec", "packed-", "+delta"


class WireFormatError(PollenError, ValueError):
    """A record that arrived is malformed; the only error decoding raises.

    Whatever the bytes of a message (a hostile peer's, a corrupted one's),
    :func:`unpack_record`, :func:`unpack_content` and :func:`unpack_reply`
    raise this and nothing else, before allocating more than a small multiple
    of what arrived. It is a :class:`~pollen.errors.PollenError` (a one-paragraph
    message, shown without a traceback) and a :class:`ValueError` (the input is
    a bad value, as :func:`numpy.load` would say), so callers that already catch
    either keep working.
    """


#: The dtypes an array on the wire may have (numpy's ``dtype.str`` without its byte
#: order): booleans, integers and floats. Never objects (pickles), strings, structures.
WIRE_DTYPES = frozenset(("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"))
#: Most dimensions an array on the wire may have (Keras weights have at most 5).
MAX_NDIM = 32
#: Most arrays a packed record may hold (MobileNetV2 has 262, ResNet-152 about 900). Each
#: costs some 700 bytes once unpacked whatever its size, so this bounds what a record of
#: many empty arrays makes of a few bytes each.
MAX_ARRAYS = 1 << 16
#: Longest ``.npy`` header accepted, in bytes (numpy writes under 200 for MAX_NDIM dims).
_MAX_NPY_HEADER = 4096
_NPY_MAGIC = b"\x93NUMPY"
_DIM = rb"\d{1,19}"
#: The ``.npy`` header :func:`numpy.save` writes (a Python dict literal, keys sorted, padded
#: with spaces and a newline), matched exactly rather than evaluated.
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|])([a-z]\d{1,2})', 'fortran_order': (False|True), 'shape': "
    rb"(\(\)|\(" + _DIM + rb",\)|\(" + _DIM + rb"(?:, " + _DIM + rb")+\)), \} *\n"
)
#: Largest element count numpy may be asked to reshape to (ignoring zero dims).
_MAX_ELEMENTS = 1 << 56


def _short(value: object) -> str:
    """``repr(value)``, cut to 60 characters: what a peer sent may be long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _malformed(what: str, problem: str) -> WireFormatError:
    return WireFormatError(
        f"A record that arrived is malformed: {what} {problem}. It was refused: the "
        "sender runs another version of Pollen, or sent corrupt or hostile data."
    )


def _shape_ok(shape: tuple[int, ...], size: int) -> bool:
    """Whether numpy can make an array of ``shape`` holding ``size`` elements."""
    nonzero = math.prod(d for d in shape if d)
    return len(shape) <= MAX_NDIM and math.prod(shape) == size and nonzero <= _MAX_ELEMENTS


def wire_array(array: Array, what: str = "an array") -> np.ndarray:
    """The numpy array ``array`` carries, read-only, refusing anything malformed.

    Reads what :func:`numpy.save` writes (Flower's ``Array`` serialisation) without
    :func:`numpy.load`, which allocates whatever its header claims before reading the
    data: the header must be numpy's own, with a dtype of :data:`WIRE_DTYPES`, a
    shape of non-negative dims whose size is exactly the bytes that follow, and the
    same dtype and shape as the ``Array``'s own fields. No copy is made.

    Raises:
        WireFormatError: Anything else.
    """
    data = array.data
    if array.stype != "numpy.ndarray" or not isinstance(data, bytes):
        raise _malformed(what, f"is not a serialised numpy array (stype {_short(array.stype)})")
    if data[:6] != _NPY_MAGIC or data[6:8] not in (b"\x01\x00", b"\x02\x00"):
        raise _malformed(what, "does not start as a .npy array of version 1 or 2")
    start = 10 if data[6] == 1 else 12
    header_len = int.from_bytes(data[8:start], "little")
    if len(data) < start or header_len > min(_MAX_NPY_HEADER, len(data) - start):
        raise _malformed(what, f"claims a header of {header_len} bytes")
    match = _NPY_HEADER.fullmatch(data, start, start + header_len)
    if match is None or match[2].decode() not in WIRE_DTYPES:
        raise _malformed(what, "has no numpy header of a numeric dtype")
    dtype = np.dtype((match[1] + match[2]).decode())
    shape = tuple(int(d) for d in re.findall(rb"\d+", match[4]))
    offset = start + header_len
    size, rest = divmod(len(data) - offset, dtype.itemsize)
    if rest or not _shape_ok(shape, size):
        raise _malformed(what, f"of shape {shape} does not hold {len(data) - offset} bytes")
    if array.dtype != str(dtype) or tuple(array.shape) != shape:
        raise _malformed(what, f"says it is {_short((array.dtype, array.shape))}, not {shape}")
    flat = np.frombuffer(data, dtype=dtype, count=size, offset=offset)
    return flat.reshape(shape[::-1]).T if match[3] == b"True" else flat.reshape(shape)


def pack_record(
    record: ArrayRecord,
    codec: Codec | None = None,
    base: ArrayRecord | None = None,
    feedback: Feedback | None = None,
) -> ArrayRecord:
    """One record of a few arrays holding all of ``record``'s ``float32`` arrays.

    ``packed-values``: every array flattened, in key order, concatenated;
    ``packed-shapes``: ``int64``, for each array its rank and then its dims;
    ``packed-keys``: the keys, UTF-8, newline-separated. A record that is
    empty, holds any other dtype or has a key that is not UTF-8 without newlines
    is returned unchanged.

    With a ``codec`` (:mod:`pollen.compress`) the values travel as its payload
    (``packed-<name>`` arrays) and ``packed-codec`` names it. With ``base`` too
    (the weights the receiver sent, of the same keys, shapes and dtypes) what
    travels is the change ``record - base`` (``packed-codec`` ends in
    ``+delta``), plus what ``feedback`` carried over from earlier updates
    (:func:`pollen.compress.with_feedback`). Without a ``base`` of the same
    shapes a codec that needs one (``topk``) is not applied.
    """
    arrays = [record[key].numpy() for key in record]
    if not arrays or any(a.dtype != np.float32 for a in arrays):
        return record
    try:
        joined = "\n".join(record).encode()
    except UnicodeEncodeError:  # a lone surrogate
        return record
    if joined.count(b"\n") != len(arrays) - 1:  # a key with a newline
        return record
    shapes = np.array([d for a in arrays for d in (a.ndim, *a.shape)], dtype=np.int64)
    keys = np.frombuffer(joined, dtype=np.uint8).copy()
    values = np.concatenate([a.ravel() for a in arrays])
    packed = {_SHAPES: Array(shapes), _KEYS: Array(keys)}
    if base is not None and not _same_layout(record, base):
        base = None
    if codec is None or (base is None and not codec.bounded):
        return ArrayRecord(array_dict={_VALUES: Array(values), **packed})
    sizes = [a.size for a in arrays]
    if base is not None:
        values = values - _flat(base)
        payload = with_feedback(codec, values, sizes, feedback)
    else:
        payload = codec.encode(values, sizes)
    name = codec.name + (_DELTA if base is not None else "")
    packed[_CODEC] = Array(np.frombuffer(name.encode(), dtype=np.uint8).copy())
    packed.update({_PREFIX + k: Array(v) for k, v in payload.items()})
    return ArrayRecord(array_dict=packed)


def _same_layout(record: ArrayRecord, base: ArrayRecord) -> bool:
    """Whether ``record`` and ``base`` have the same keys, in order, shapes and dtypes."""
    return list(record) == list(base) and all(
        (record[k].dtype, tuple(record[k].shape)) == (base[k].dtype, tuple(base[k].shape))
        for k in record
    )


def _flat(record: ArrayRecord) -> np.ndarray:
    """``record``'s arrays flattened, in key order, concatenated, as ``float32``."""
    arrays = [np.asarray(a.numpy(), dtype=np.float32).ravel() for a in record.values()]
    return np.concatenate(arrays) if arrays else np.zeros(0, np.float32)


def as_received(record: ArrayRecord, codec: Codec | None) -> ArrayRecord:
    """``record`` as its receiver decodes it when sent with ``codec`` (unchanged for None)."""
    return record if codec is None else unpack_record(pack_record(record, codec))


def unpack_record(record: ArrayRecord, base: ArrayRecord | None = None) -> ArrayRecord:
    """Inverse of :func:`pack_record`; a record that is not packed is returned unchanged.

    Every array is checked (:func:`wire_array`), packed or not, so that a later
    :meth:`Array.numpy` reads no more than the bytes that arrived. A
    compressed record is decoded to ``float32``; one sent as a change is
    added to ``base``, the weights this end sent (None: refused).

    Raises:
        WireFormatError: The record is malformed: an array is (see :func:`wire_array`),
            or a packed record's keys, ranks, dims and values do not add up exactly
            (negative, missing or extra dims, values or bytes; a duplicate key; a key
            that is not UTF-8), or its compressed payload does not fit them, or it
            is a change to weights this end did not send.
    """
    if not {_VALUES, _SHAPES, _KEYS, _CODEC} & set(record):
        for key, array in record.items():
            wire_array(array, f"the array {_short(key)}")
        return record
    if _CODEC in record:
        return _decompressed(record, base)
    if set(record) != {_VALUES, _SHAPES, _KEYS}:
        raise _malformed("a packed record", f"has {len(record)} arrays, not its three")
    values = wire_array(record[_VALUES], _VALUES)
    keys, dims = _keys_and_dims(record)
    if values.ndim != 1 or values.dtype.str != "<f4":
        raise _malformed("a packed record", "has arrays of the wrong dtype or rank")
    shapes = _shapes(dims, keys, values.size)
    if sum(math.prod(s) for s in shapes) != values.size:
        raise _malformed("a packed record", "has values or dims left over")
    return ArrayRecord(array_dict=_split(values, shapes, keys))


def _keys_and_dims(record: ArrayRecord) -> tuple[list[str], list[int]]:
    """The keys and the flat rank-and-dims list of a packed record, checked."""
    dims = wire_array(record[_SHAPES], _SHAPES)
    raw = wire_array(record[_KEYS], _KEYS)
    if dims.ndim != 1 or dims.dtype.str != "<i8" or raw.ndim != 1 or raw.dtype.str != "|u1":
        raise _malformed("a packed record", "has arrays of the wrong dtype or rank")
    joined = raw.tobytes()
    if joined.count(b"\n") >= MAX_ARRAYS:
        raise _malformed(_KEYS, f"name more than {MAX_ARRAYS} arrays")
    try:
        keys = joined.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise _malformed(_KEYS, "are not UTF-8") from None
    if len(set(keys)) != len(keys):
        raise _malformed(_KEYS, "name an array twice")
    return keys, dims.tolist()


def _shapes(dims: list[int], keys: list[str], limit: int | None) -> list[tuple[int, ...]]:
    """The shape of each of ``keys`` from ``dims`` (ranks, then dims), checked.

    ``limit``: most values the shapes may hold together (None: no limit).
    """
    shapes: list[tuple[int, ...]] = []
    total = i = 0
    for key in keys:
        if i >= len(dims):
            raise _malformed(_SHAPES, f"end before the dims of {_short(key)}")
        ndim = dims[i]
        shape = tuple(dims[i + 1 : i + 1 + ndim]) if 0 <= ndim <= MAX_NDIM else ()
        size = math.prod(shape)
        too_many = limit is not None and total + size > limit
        if len(shape) != ndim or min(shape, default=0) < 0 or too_many:
            raise _malformed(_SHAPES, f"give {_short(key)} the rank {ndim}, dims {_short(shape)}")
        if not _shape_ok(shape, size):
            raise _malformed(_SHAPES, f"give {_short(key)} the dims {_short(shape)}")
        shapes.append(shape)
        total += size
        i += 1 + ndim
    if i != len(dims):
        raise _malformed("a packed record", "has values or dims left over")
    return shapes


def _split(values: np.ndarray, shapes: list[tuple[int, ...]], keys: list[str]) -> dict[str, Array]:
    """``keys`` -> their arrays, cut from ``values`` by ``shapes``."""
    arrays: dict[str, Array] = {}
    start = 0
    for key, shape in zip(keys, shapes, strict=True):
        size = math.prod(shape)
        arrays[key] = Array(values[start : start + size].reshape(shape))
        start += size
    return arrays


def _decompressed(record: ArrayRecord, base: ArrayRecord | None) -> ArrayRecord:
    """The ``float32`` record a compressed packed record encodes (see :func:`pack_record`)."""
    raw = wire_array(record[_CODEC], _CODEC)
    name = raw.tobytes().decode("ascii", "replace") if raw.dtype.str == "|u1" else ""
    delta = name.endswith(_DELTA)
    codec = CODECS.get(name.removesuffix(_DELTA))
    if codec is None:
        raise _malformed(_CODEC, f"names no codec Pollen knows ({_short(name)})")
    expected = {_SHAPES, _KEYS, _CODEC} | {_PREFIX + k for k in codec.payload_keys}
    if set(record) != expected:
        raise _malformed("a compressed record", f"has the arrays {_short(sorted(record))}")
    keys, dims = _keys_and_dims(record)
    payload = {k: wire_array(record[_PREFIX + k], _PREFIX + k) for k in codec.payload_keys}
    shapes = _shapes(dims, keys, None)
    if delta and (base is None or not _base_fits(base, keys, shapes)):
        raise _malformed("a compressed record", "is a change to weights this end did not send")
    if not (delta or codec.bounded):
        raise _malformed("a compressed record", f"of codec {codec.name} is not a change")
    try:
        values = codec.decode(payload, [math.prod(s) for s in shapes])
    except ValueError as err:
        raise _malformed(f"a record compressed with {codec.name}", str(err)) from None
    if delta:
        values += _flat(base)
    return ArrayRecord(array_dict=_split(values, shapes, keys))


def _base_fits(base: ArrayRecord, keys: list[str], shapes: list[tuple[int, ...]]) -> bool:
    """Whether ``base`` holds exactly ``keys``, of ``shapes``, all ``float32``."""
    return list(base) == keys and all(
        base[k].dtype == "float32" and tuple(base[k].shape) == s
        for k, s in zip(keys, shapes, strict=True)
    )


def pack_content(
    content: RecordDict,
    codec: Codec | None = None,
    base: ArrayRecord | None = None,
    feedback: Feedback | None = None,
    others: Codec | None = None,
) -> RecordDict:
    """``content`` with every ArrayRecord packed, and marked.

    ``codec``, ``base`` and ``feedback`` apply to its ``arrays`` record (the
    model's weights) only; see :func:`pack_record`. ``others`` compresses its
    other records (a client's BatchNorm statistics: ``fp16``), each one that
    the codec keeps finite (else it is packed as it is).
    """
    out = RecordDict(
        {
            k: (
                pack_record(v, codec, base, feedback)
                if k == "arrays"
                else pack_record(v, others if _keeps_finite(others, v) else None)
            )
            if isinstance(v, ArrayRecord)
            else v
            for k, v in content.items()
        }
    )
    out[MARK] = ConfigRecord({"packed": True})
    return out


def _keeps_finite(codec: Codec | None, record: ArrayRecord) -> bool:
    """Whether ``codec`` (``fp16``) keeps every finite value of ``record`` finite."""
    if codec is None:
        return False
    with np.errstate(over="ignore"):
        for array in record.values():
            a = array.numpy()
            if a.dtype == np.float32 and not np.array_equal(
                np.isfinite(a), np.isfinite(a.astype(np.float16))
            ):
                return False
    return True


def unpack_content(content: RecordDict, base: ArrayRecord | None = None) -> RecordDict:
    """``content`` with every packed ArrayRecord unpacked and the mark removed.

    ``base``: the weights this end sent, which an ``arrays`` record sent as
    a change to them builds on (see :func:`unpack_record`).

    Raises:
        WireFormatError: An ArrayRecord is malformed (see :func:`unpack_record`).
    """
    return RecordDict(
        {
            k: unpack_record(v, base if k == "arrays" else None)
            if isinstance(v, ArrayRecord)
            else v
            for k, v in content.items()
            if k != MARK
        }
    )


def content_bytes(content: RecordDict) -> int:
    """Bytes of the arrays of ``content``'s ArrayRecords, as they travel (``.npy`` headers too)."""
    return sum(len(a.data) for r in content.array_records.values() for a in r.values())


def unpack_reply(reply: Message, base: ArrayRecord | None = None) -> Message:
    """``reply`` with its content unpacked; a malformed one becomes an error reply.

    ``base``: the weights the server sent, which a compressed update builds on.
    The error reply keeps the reply's metadata and says ``rejected: <why>``, so that
    the server counts it as that client's failure, like any other error reply.
    """
    if not reply.has_content():
        return reply
    try:
        reply.content = unpack_content(reply.content, base)
    except WireFormatError as err:
        error = Error(code=ErrorCode.UNKNOWN, reason=f"rejected: {err}")
        return Message(metadata=reply.metadata, error=error)
    return reply


def wire_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Client mod: unpack a marked message for the handler, pack its reply.

    Weights the server asks this client to keep are kept where this process
    serves the node's later messages too (:func:`serve_later_messages`), and
    the reply says so; a record sent as changes to kept weights is rebuilt
    (:func:`held_weights`). A train reply's weights travel compressed as the
    change to the weights received when the run config's ``compress`` names a
    codec (:func:`uplink_codec`), with what the codec left out of this node's
    earlier updates in this process carried over (error feedback). With a codec,
    a reply's other ``float32`` records (an evaluation's ``bn-stats``) travel as
    ``fp16``, which the server decodes like the weights (:func:`unpack_reply`).
    """
    if not msg.has_content() or MARK not in msg.content:
        return call_next(msg, context)
    node = context.node_id
    note = msg.content.config_records.get(HELD, ConfigRecord())
    try:
        content = unpack_content(msg.content)
    except WireFormatError as err:  # answered as an error, without a traceback
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=msg
        )
    msg.content = held_weights(content, node)
    train = msg.metadata.message_type == MessageType.TRAIN
    base = msg.content.array_records.get("arrays") if train else None
    reply = call_next(msg, context)
    if reply.has_content():
        if "keep" in note and _kept.get(node, ("",))[0] == note["keep"]:
            reply.content[HELD] = ConfigRecord({"kept": note["keep"]})
        codec = uplink_codec(context.run_config)
        # The update's codec for the weights; fp16 for the rest (BatchNorm statistics:
        # int8 would lose small variances' relative precision).
        update = codec if base is not None else None
        feedback = _feedback.setdefault((context.run_id, node), Feedback()) if update else None
        others = Fp16() if codec is not None else None
        reply.content = pack_content(reply.content, update, base, feedback, others)
    return reply


def uplink_codec(run_config: Mapping) -> Codec | None:
    """The codec of client updates the run config's ``compress`` names (None: ``none``)."""
    return parse(str(run_config.get("compress", "none")))


#: What the codec left out of each node's updates so far, by (run id, node id): error
#: feedback. Kept by the process that trained (Pollen's warm app runner serves a node's
#: every message; Flower's own runner starts a process per message, where it starts again
#: from zero each round; in simulation each worker keeps the part it left out).
_feedback: dict[tuple[int, int], Feedback] = {}


# --- weights a client already holds ----------------------------------------------

#: Name of the ConfigRecord in a message that refers to held weights: ``keep``
#: (keep this message's ``arrays`` under this id) or ``changes-to`` (this
#: message's ``arrays`` are changes to the weights kept under this id); in a
#: reply, ``kept`` (the client kept the weights of that id).
HELD = "pollen-held"
#: Opens the error of a client asked to rebuild weights it does not hold.
NOT_HELD = "pollen-weights-not-held"

#: Weights kept by this process's client app: node id -> (id, weights). One entry per
#: node (a deployed client's app serves one node), dropped once used.
_kept: dict[int, tuple[str, ArrayRecord]] = {}
#: Whether this process serves its node's later messages too (see serve_later_messages).
_serves_later = [False]


def serve_later_messages(enabled: bool = True) -> None:
    """Say whether this process serves its node's later messages too, so it may keep weights.

    Pollen's warm app runner (:mod:`pollen.deploy.warm_clientapp`) does. Flower's own
    runner starts a process per message, whose kept weights would be gone by
    the next one: there a client keeps nothing, says so by not confirming,
    and gets whole weights.
    """
    _serves_later[0] = enabled
    if not enabled:
        _kept.clear()


def held_weights(content: RecordDict, node_id: int) -> RecordDict:
    """Keep or rebuild the weights of a message's content, as the server asked.

    Content without a :data:`HELD` record is returned as it is. With
    ``keep``, its ``arrays`` are kept for ``node_id`` (replacing what was
    kept) if this process serves later messages (:func:`serve_later_messages`).
    With ``changes-to``, its ``arrays`` replace arrays of the same
    keys in the weights kept under that id, and the whole record is returned
    (the kept weights are dropped). The :data:`HELD` record is removed.

    Raises:
        PollenError: ``changes-to`` names weights this process does not hold
            for ``node_id`` (the message starts with :data:`NOT_HELD`).
    """
    if HELD not in content:
        return content
    note = content[HELD]
    out = RecordDict({k: v for k, v in content.items() if k != HELD})
    if "keep" in note and "arrays" in out and _serves_later[0]:
        _kept[node_id] = (str(note["keep"]), out["arrays"])
    elif "changes-to" in note:
        kept = _kept.pop(node_id, None)
        if kept is None or kept[0] != note["changes-to"] or "arrays" not in out:
            raise PollenError(
                f"{NOT_HELD}: this client no longer holds the weights the server's message "
                "builds on (its app restarted since it evaluated); the server sends them whole."
            )
        changes = out["arrays"]
        out["arrays"] = ArrayRecord(
            array_dict={k: changes[k] if k in changes else a for k, a in kept[1].items()}
        )
    return out


class HeldWeights:
    """What the server knows its clients hold: the weights of the last evaluate message.

    :meth:`keep` asks the receivers of evaluate messages to keep their
    weights, :meth:`held_by` notes who confirmed it, and :meth:`shorten` turns a
    later train message to one of them into the arrays that differ from what
    it holds. With MobileNetV2 under FedAvg a round's train message to a
    client that evaluated then carries its BatchNorm statistics (0.15 MB)
    instead of the 9-MB model.
    """

    def __init__(self) -> None:
        self.id: str | None = None
        self.arrays: ArrayRecord | None = None
        self.nodes: set[int] = set()

    def keep(self, messages: Iterable[Message], arrays: ArrayRecord) -> None:
        """Ask each receiver of ``messages`` that carries ``arrays`` to keep them.

        Forgets what was kept before: a client keeps one set of weights.
        """
        self.id, self.arrays, self.nodes = uuid.uuid4().hex, arrays, set()
        for m in messages:
            if m.content.get("arrays") is arrays:
                m.content = _with(m.content, HELD, ConfigRecord({"keep": self.id}))

    def held_by(self, replies: Iterable[tuple[int, Message]]) -> None:
        """Note the nodes whose reply ``(node id, reply)`` confirms they kept the weights."""
        for node, reply in replies:
            note = reply.content.config_records.get(HELD) if reply.has_content() else None
            if note is not None and note.get("kept") == self.id:
                self.nodes.add(node)

    def shorten(self, messages: Iterable[Message], arrays: ArrayRecord) -> dict[int, RecordDict]:
        """Send ``arrays`` to clients that hold the kept weights as the arrays that differ.

        A message is changed when it carries ``arrays``, goes to a client
        noted by :meth:`held_by`, and ``arrays`` has the kept weights' keys,
        shapes and dtypes with fewer than half of its bytes changed.

        Returns:
            The whole content of each changed message, by destination node,
            to send again to a client that replies :data:`NOT_HELD`.
        """
        changed = self._changes(arrays)
        whole: dict[int, RecordDict] = {}
        if changed is None:
            return whole
        for m in messages:
            node = m.metadata.dst_node_id
            if node in self.nodes and m.content.get("arrays") is arrays:
                whole[node] = m.content
                short = _with(m.content, "arrays", changed)
                m.content = _with(short, HELD, ConfigRecord({"changes-to": self.id}))
        return whole

    def _changes(self, arrays: ArrayRecord) -> ArrayRecord | None:
        kept = self.arrays
        if self.id is None or kept is None or list(kept) != list(arrays):
            return None
        changed = {}
        for key, new in arrays.items():
            old = kept[key]
            if new is old:
                continue
            if (old.dtype, old.shape) != (new.dtype, new.shape):
                return None
            if old.data != new.data:
                changed[key] = new
        size = sum(len(a.data) for a in arrays.values())
        if 2 * sum(len(a.data) for a in changed.values()) >= size:
            return None
        return ArrayRecord(array_dict=changed)


def _with(content: RecordDict, key: str, record) -> RecordDict:
    """A new RecordDict: ``content`` with ``record`` under ``key`` (``content`` is shared)."""
    out = RecordDict(dict(content.items()))
    out[key] = record
    return out
