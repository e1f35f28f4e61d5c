"""Compressed updates: codecs that shrink a flat ``float32`` vector for the wire.

A codec turns the values of a packed record (:mod:`pollen.wire`: every array
flattened and concatenated, with the arrays' sizes) into a few small arrays,
its *payload*, and back. The wire layer applies them, so handlers,
strategies, validation and checkpoints only ever see ``float32`` arrays.

- ``fp16``: every value as a half-precision float (50 % of fp32); exact for
  values half precision represents.
- ``int8``: per array, values rounded to ``scale * q`` with ``q`` an ``int8``
  in [-127, 127] and ``scale = max|x| / 127`` sent along (one ``float32`` per
  array); the error is at most ``scale / 2`` per value. The ``q`` of all
  arrays travel deflated (:mod:`zlib`, Huffman coding only), a lossless stage:
  25 % of fp32 before it, about 21.5 % after it for a Gaussian change, less
  for the heavier-tailed changes of training (``docs/compression.md``); never
  more than :data:`MAX_INFLATION` values per byte.
- ``topk:K``: per array, only the ``ceil(K * size)`` values of largest
  magnitude (at least one), as ``uint32`` positions and ``float32`` values
  (``8 K`` bytes per value: 20 % of fp32 at ``K = 0.1``); ``K`` a fraction
  (``0.05``) or a percentage (``5%``). Sensible only for a change to weights
  the receiver holds, never for weights themselves.

A client sends its update as the change to the weights it received (the
*delta*), compressed; what a lossy codec dropped is carried over to its next
update (:func:`with_feedback`, error feedback), so nothing is lost for good.

Decoding checks a payload against the sizes before it allocates anything:
a bad payload raises :class:`ValueError` (the wire layer turns it into its
``WireFormatError``). A codec whose decoding allocates more than a small
multiple of its payload (``topk``) says so (:attr:`Codec.bounded`); the wire
layer then decodes it only as a change to weights of the same shapes that
the receiver sent itself.

Adding a codec: one subclass of :class:`Codec` here, named in :data:`CODECS`.

Why not a library: the codecs are a few lines of numpy each, and the decoders
must refuse hostile input before allocating, which general compression
libraries (blosc, a whole-message ``zlib.decompress``) do not promise for
their own formats. The lossless stage of ``int8`` is Python's :mod:`zlib`
(deflate), used only where its decoding is bounded: a payload must hold at
least one byte per :data:`MAX_INFLATION` values (what Huffman coding never
beats: a bit per value), checked before inflating, and it is inflated with
``max_length`` set to the values expected (plus one byte, to see a stream that
goes on), so a zip bomb stops there; a stream that is short, unfinished,
corrupt (its Adler-32) or followed by more bytes is refused.
"""

from __future__ import annotations

import abc
import math
import zlib
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from pollen.errors import PollenError

__all__ = [
    "CODECS",
    "MAX_INFLATION",
    "Codec",
    "Fp16",
    "Int8",
    "Payload",
    "TopK",
    "parse",
    "with_feedback",
]

#: A codec's arrays, by name (the wire layer sends each as ``packed-<name>``).
Payload = dict[str, np.ndarray]


class Codec(abc.ABC):
    """One way to compress a flat ``float32`` vector made of arrays of ``sizes``.

    Attributes:
        name: The codec's name on the command line and on the wire.
        payload_keys: The names of the arrays :meth:`encode` returns.
        bounded: Whether :meth:`decode` allocates at most a small multiple of
            its payload's bytes (else it may decode only a change to known weights).
        downlink: Whether the server may send weights compressed with it.
    """

    name: ClassVar[str]
    payload_keys: ClassVar[frozenset[str]]
    bounded: ClassVar[bool] = True
    downlink: ClassVar[bool] = True

    @abc.abstractmethod
    def encode(self, flat: np.ndarray, sizes: Sequence[int]) -> Payload:
        """The payload of ``flat`` (``float32``, ``sum(sizes)`` values)."""

    @classmethod
    @abc.abstractmethod
    def decode(cls, payload: Payload, sizes: Sequence[int]) -> np.ndarray:
        """The ``float32`` vector of ``sum(sizes)`` values ``payload`` encodes.

        Raises:
            ValueError: The payload does not fit ``sizes`` (checked before allocating).
        """

    @property
    def spec(self) -> str:
        """The codec as the command line names it (``int8``, ``topk:0.05``)."""
        return self.name


def _check(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(problem)


def _offsets(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, end)`` of each array in the flat vector."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


class Fp16(Codec):
    """Every value as an IEEE half-precision float."""

    name = "fp16"
    payload_keys = frozenset({"values"})

    def encode(self, flat: np.ndarray, sizes: Sequence[int]) -> Payload:  # noqa: D102
        with np.errstate(over="ignore"):  # beyond 65504: inf, which validation refuses
            return {"values": flat.astype(np.float16)}

    @classmethod
    def decode(cls, payload: Payload, sizes: Sequence[int]) -> np.ndarray:  # noqa: D102
        values = payload["values"]
        _check(values.dtype == np.float16 and values.ndim == 1, "values are not float16")
        _check(values.size == sum(sizes), f"{values.size} values for {sum(sizes)}")
        return values.astype(np.float32)


#: Most ``int8`` values one byte of a deflated ``int8`` payload may hold. Huffman
#: coding spends at least a bit per value, so what :class:`Int8` sends never holds
#: more; a payload that claims more (deflate's matches reach about 1,000) is refused
#: before inflating, which keeps decoding within a small multiple of what arrived.
MAX_INFLATION = 8


def _deflate(q: np.ndarray) -> np.ndarray:
    """``q``'s bytes deflated (zlib format, Huffman coding only), as ``uint8``."""
    # Huffman only: on int8 of changes as small as level 6 with matches, 3-10x faster,
    # and never below a bit per value (MAX_INFLATION).
    deflater = zlib.compressobj(6, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    data = deflater.compress(q.tobytes()) + deflater.flush()
    return np.frombuffer(data, dtype=np.uint8).copy()


def _inflate(data: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` ``int8`` values that ``data`` deflates, never inflating more.

    Raises:
        ValueError: ``data`` is no zlib stream of exactly ``size`` bytes and nothing after.
    """
    inflater = zlib.decompressobj()
    try:  # one byte more than expected shows a stream that goes on (max_length 0: no limit)
        out = inflater.decompress(np.ascontiguousarray(data), size + 1)
    except zlib.error as err:
        raise ValueError(f"values are not a deflate stream ({err})") from None
    _check(len(out) <= size, f"values inflate to more than {size} bytes")
    _check(inflater.eof, f"values end before their deflate stream does ({len(out)} bytes)")
    _check(len(out) == size, f"values inflate to {len(out)} bytes for {size} values")
    _check(not (inflater.unconsumed_tail or inflater.unused_data), "bytes follow the values")
    return np.frombuffer(out, dtype=np.int8)


class Int8(Codec):
    """Per array: ``int8`` values and one ``float32`` scale, ``x ~ scale * q``; ``q`` deflated."""

    name = "int8"
    payload_keys = frozenset({"values", "scales"})

    def encode(self, flat: np.ndarray, sizes: Sequence[int]) -> Payload:  # noqa: D102
        q = np.zeros(flat.size, dtype=np.int8)
        scales = np.zeros(len(sizes), dtype=np.float32)
        for i, (start, end) in enumerate(_offsets(sizes)):
            x = flat[start:end]
            if x.size == 0:
                continue
            if not np.isfinite(x).all():  # decodes to NaN: the receiver's checks refuse it
                scales[i] = np.nan
                continue
            top = float(np.abs(x).max())
            if top == 0.0:
                continue
            scales[i] = np.float32(top / 127.0)
            if scales[i] == 0:  # below float32's smallest scale: sent as zeros
                continue
            q[start:end] = np.clip(np.rint(x / scales[i]), -127, 127)
        return {"values": _deflate(q), "scales": scales}

    @classmethod
    def decode(cls, payload: Payload, sizes: Sequence[int]) -> np.ndarray:  # noqa: D102
        data, scales = payload["values"], payload["scales"]
        _check(data.dtype == np.uint8 and data.ndim == 1, "values are not deflated bytes")
        _check(scales.dtype == np.float32 and scales.ndim == 1, "scales are not float32")
        total = sum(sizes)
        _check(total <= MAX_INFLATION * data.size, f"{data.size} bytes for {total} values")
        _check(scales.size == len(sizes), f"{scales.size} scales for {len(sizes)} arrays")
        _check(not (scales < 0).any(), "a scale is negative")
        out = _inflate(data, total).astype(np.float32)
        with np.errstate(invalid="ignore"):  # NaN scale: a non-finite update, refused later
            for scale, (start, end) in zip(scales.tolist(), _offsets(sizes), strict=True):
                out[start:end] *= scale
        return out


class TopK(Codec):
    """Per array the ``ceil(fraction * size)`` values of largest magnitude, the rest 0."""

    name = "topk"
    payload_keys = frozenset({"index", "values"})
    bounded = False  # K values decode to the whole vector
    downlink = False  # top-k of weights (not of a change) drops most of the model

    def __init__(self, fraction: float = 0.1) -> None:
        self.fraction = fraction

    @property
    def spec(self) -> str:  # noqa: D102
        return f"topk:{self.fraction:g}"

    def kept(self, size: int) -> int:
        """How many of an array's ``size`` values are kept."""
        return min(size, max(1, math.ceil(self.fraction * size))) if size else 0

    def encode(self, flat: np.ndarray, sizes: Sequence[int]) -> Payload:  # noqa: D102
        picks = []
        for start, end in _offsets(sizes):
            k = self.kept(end - start)
            if k == 0:
                continue
            key = np.abs(flat[start:end])
            key[np.isnan(key)] = np.inf  # a NaN is sent, so the receiver refuses the update
            picks.append(start + np.sort(np.argpartition(key, key.size - k)[key.size - k :]))
        index = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
        dtype = np.uint32 if flat.size <= np.iinfo(np.uint32).max else np.uint64
        return {"index": index.astype(dtype), "values": flat[index].astype(np.float32)}

    @classmethod
    def decode(cls, payload: Payload, sizes: Sequence[int]) -> np.ndarray:  # noqa: D102
        index, values = payload["index"], payload["values"]
        _check(index.dtype in (np.uint32, np.uint64) and index.ndim == 1, "index is not uint")
        _check(values.dtype == np.float32 and values.ndim == 1, "values are not float32")
        _check(index.size == values.size, f"{index.size} positions for {values.size} values")
        total = sum(sizes)
        _check(index.size <= total, f"{index.size} values for {total}")
        if index.size:
            _check(bool((index[1:] > index[:-1]).all()), "positions are not increasing")
            _check(int(index[-1]) < total, f"a position is beyond {total}")
        out = np.zeros(total, dtype=np.float32)
        out[index] = values
        return out

    @classmethod
    def from_argument(cls, argument: str) -> TopK:
        """``topk:K``'s codec: ``K`` a fraction in (0, 1] (``0.05``) or a percentage (``5%``)."""
        text = argument.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            value = math.nan
        if not 0 < value <= 1:
            raise PollenError(
                f"Invalid compression topk:{argument}: K is the fraction of each array's "
                "values kept, a number in (0, 1] such as topk:0.05 or a percentage such as "
                "topk:5%."
            )
        return cls(value)


#: The codecs by name. ``none`` is no codec.
CODECS: dict[str, type[Codec]] = {c.name: c for c in (Fp16, Int8, TopK)}


def parse(spec: str, *, downlink: bool = False) -> Codec | None:
    """The codec ``spec`` names (``none``, ``fp16``, ``int8``, ``topk:K``); None for ``none``.

    Raises:
        PollenError: ``spec`` names no codec, or one the server may not send
            weights with (``downlink``).
    """
    name, _, argument = spec.strip().partition(":")
    if name == "none" and not argument:
        return None
    cls = CODECS.get(name)
    allowed = ["none", *(n if c.bounded else f"{n}:K" for n, c in CODECS.items())]
    if downlink:
        allowed = ["none", *(n for n, c in CODECS.items() if c.downlink)]
    if cls is None or (downlink and not cls.downlink) or (bool(argument) != (cls is TopK)):
        which = "the weights the server sends" if downlink else "client updates"
        raise PollenError(
            f"Unknown compression {spec!r} for {which}: use one of {', '.join(allowed)}"
            + (
                " (top-k keeps a few values of a change, which weights the server sends are not)."
                if downlink and name == "topk"
                else "."
            )
        )
    return TopK.from_argument(argument) if cls is TopK else cls()


class Feedback:
    """What a lossy codec left out of one sender's updates so far (error feedback)."""

    def __init__(self) -> None:
        self.residual: np.ndarray | None = None


def with_feedback(
    codec: Codec, flat: np.ndarray, sizes: Sequence[int], feedback: Feedback | None
) -> Payload:
    """``codec``'s payload of ``flat`` plus what earlier payloads left out.

    ``feedback.residual`` is added to ``flat`` before encoding and becomes
    what this payload leaves out (the sum minus its decoding), so the values
    a payload drops are sent with a later one. A residual of another size (the
    model changed) or not finite (a broken update) starts again from zero.
    """
    residual = feedback.residual if feedback is not None else None
    target = flat if residual is None or residual.shape != flat.shape else flat + residual
    payload = codec.encode(target, sizes)
    if feedback is not None:
        left = target - codec.decode(payload, sizes)
        feedback.residual = left if np.isfinite(left).all() else None
    return payload
