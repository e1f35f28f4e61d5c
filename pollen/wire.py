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
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from pollen.errors import PollenError

__all__ = [
    "HELD",
    "MARK",
    "NOT_HELD",
    "HeldWeights",
    "held_weights",
    "pack_content",
    "pack_record",
    "serve_later_messages",
    "unpack_content",
    "unpack_record",
    "wire_mod",
]

#: Name of the ConfigRecord that marks a message whose ArrayRecords may be packed.
MARK = "pollen-wire"

_VALUES, _SHAPES, _KEYS = "packed-values", "packed-shapes", "packed-keys"


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """One record of three arrays holding all of ``record``'s ``float32`` arrays.

    ``packed-values``: every array flattened, in key order, concatenated;
    ``packed-shapes``: ``int64``, for each array its rank and then its dims;
    ``packed-keys``: the keys, UTF-8, newline-separated. A record that is
    empty or holds any other dtype is returned unchanged.
    """
    arrays = [record[key].numpy() for key in record]
    if not arrays or any(a.dtype != np.float32 for a in arrays):
        return record
    shapes = np.array([d for a in arrays for d in (a.ndim, *a.shape)], dtype=np.int64)
    keys = np.frombuffer("\n".join(record).encode(), dtype=np.uint8).copy()
    values = np.concatenate([a.ravel() for a in arrays])
    return ArrayRecord(
        array_dict={_VALUES: Array(values), _SHAPES: Array(shapes), _KEYS: Array(keys)}
    )


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """Inverse of :func:`pack_record`; a record that is not packed is returned unchanged."""
    if _VALUES not in record:
        return record
    values = record[_VALUES].numpy()
    dims = record[_SHAPES].numpy().tolist()
    keys = record[_KEYS].numpy().tobytes().decode().split("\n")
    arrays: dict[str, Array] = {}
    start = i = 0
    for key in keys:
        ndim = dims[i]
        shape = tuple(dims[i + 1 : i + 1 + ndim])
        i += 1 + ndim
        size = int(np.prod(shape, dtype=np.int64))
        arrays[key] = Array(values[start : start + size].reshape(shape))
        start += size
    if start != values.size or i != len(dims):
        raise ValueError("a packed record's shapes do not match its values")
    return ArrayRecord(array_dict=arrays)


def pack_content(content: RecordDict) -> RecordDict:
    """``content`` with every ArrayRecord packed, and marked."""
    out = RecordDict(
        {k: pack_record(v) if isinstance(v, ArrayRecord) else v for k, v in content.items()}
    )
    out[MARK] = ConfigRecord({"packed": True})
    return out


def unpack_content(content: RecordDict) -> RecordDict:
    """``content`` with every packed ArrayRecord unpacked and the mark removed."""
    return RecordDict(
        {
            k: unpack_record(v) if isinstance(v, ArrayRecord) else v
            for k, v in content.items()
            if k != MARK
        }
    )


def wire_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Client mod: unpack a marked message for the handler, pack its reply.

    Weights the server asks this client to keep are kept where this process
    serves the node's later messages too (:func:`serve_later_messages`), and
    the reply says so; a record sent as changes to kept weights is rebuilt
    (:func:`held_weights`).
    """
    if not msg.has_content() or MARK not in msg.content:
        return call_next(msg, context)
    node = context.node_id
    note = msg.content.config_records.get(HELD, ConfigRecord())
    msg.content = held_weights(unpack_content(msg.content), node)
    reply = call_next(msg, context)
    if reply.has_content():
        if "keep" in note and _kept.get(node, ("",))[0] == note["keep"]:
            reply.content[HELD] = ConfigRecord({"kept": note["keep"]})
        reply.content = pack_content(reply.content)
    return reply


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
