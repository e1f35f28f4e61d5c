"""Records on the wire: a record's many arrays sent as one.

Flower 1.42 moves every array of an ``ArrayRecord`` as an object of its own,
pushed and pulled with its own HTTP request on every hop (ServerApp to
SuperLink, SuperLink to SuperNode, SuperNode to the client app, and back).
MobileNetV2 has 262 arrays: on a loopback deployment its 9 MB of weights
took 12-17 s per hop (measured with Pollen's clients idle, tiny data), about
a minute of every round. Packed into one ``float32`` vector (which Flower cuts
into 5 MB chunks), the same weights are a handful of objects.

Both ends opt in, so messages of other senders pass untouched: the server
packs what it sends in :func:`pollen.rounds.exchange` and marks the message;
:func:`wire_mod`, a client mod, unpacks a marked message before the handler
sees it and packs the reply; the server unpacks the reply. Handlers,
strategies and checkpoints only ever see ordinary records. An
``ArrayRecord`` whose arrays are not all ``float32`` is sent as it is.

Why not a library: Flower has no option to batch a record's arrays into one
object, and its ``ArrayRecord`` keeps one object per array by design.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

__all__ = [
    "MARK",
    "pack_content",
    "pack_record",
    "quick_pulls",
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
    """Client mod: unpack a marked message for the handler, pack its reply."""
    if not msg.has_content() or MARK not in msg.content:
        return call_next(msg, context)
    msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack_content(reply.content)
    return reply


#: Seconds before a pull asks again for an object that has not arrived yet (Flower: 1 s).
PULL_FIRST_RETRY = 0.05
#: Longest wait between such retries, seconds (Flower: 10 s).
PULL_RETRY_CAP = 1.0


def quick_pulls(module: ModuleType, name: str) -> None:
    """Make ``module.<name>``, one of Flower's object pulls, retry sooner.

    A receiver in Flower 1.42 learns of a message before its content has
    arrived: the SuperNode hands a task to the client app while it is still
    downloading the message, and a reply is listed to the ServerApp while the
    SuperNode is still uploading it. ``pull_objects`` then waits 1 s, 2 s,
    4 s... (up to 10 s) between tries; measured on loopback with MobileNetV2,
    nearly every 9-MB message paid the first whole second at each of those
    hops. Here the first retry comes after :data:`PULL_FIRST_RETRY` seconds,
    doubling up to :data:`PULL_RETRY_CAP`; the tries allowed are raised to
    keep Flower's patience (7,200 s in all).

    Args:
        module: The module that imported the pull function (its global is
            replaced): ``flwr.supernode.start_client_internal`` (SuperNode),
            ``flwr.supernode.runtime.run_clientapp`` (client app) or
            ``flwr.superlink.grid.http_grid`` (ServerApp).
        name: ``"pull_objects"`` or ``"pull_and_inflate_object_from_tree"``;
            both take the ``initial_backoff``, ``backoff_cap`` and
            ``max_tries_per_object`` keywords.
    """
    from flwr.supercore.constant import PULL_MAX_TIME

    pull = getattr(module, name)
    if isinstance(pull, functools.partial):  # already done in this process
        return
    setattr(
        module,
        name,
        functools.partial(
            pull,
            initial_backoff=PULL_FIRST_RETRY,
            backoff_cap=PULL_RETRY_CAP,
            max_tries_per_object=int(PULL_MAX_TIME / PULL_RETRY_CAP),
        ),
    )
