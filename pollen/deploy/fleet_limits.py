"""What one request to the federation port, and all of them together, may cost.

Contract:
    The port is public, so memory and time are bounded per request and in all,
    and nothing is buffered beyond these bounds (:class:`FleetLimits`):

    - A body is at most ``max_body_bytes`` (64 MiB): a larger Content-Length is
      answered 413 at once, a chunked body the moment it passes the cap. A
      ``push-object`` body (one object) is at most ``max_object_bytes`` (6 MiB:
      Flower cuts arrays into objects of at most 5 MiB, so no honest call comes
      near either cap).
    - A ``push-messages`` call may declare at most ``max_objects`` objects in its
      object trees (413 beyond, :func:`count_declared_objects`): with the object
      cap this bounds what one message can make the SuperLink store. That the
      pushed objects are those a message declared Flower checks itself (an object
      must be pending in the push session its message opened, and hash to its id).
    - All bodies being read or relayed together hold at most
      ``max_inflight_bytes`` (256 MiB, :class:`ByteBudget`). A body books room for
      what has arrived, not for what it declares: at most an object's worth
      (``max_object_bytes``) ahead of its bytes, so honest objects are booked
      whole before they are read (no two half-read bodies wait on each other),
      and the rest step by step as it arrives. A call that finds no room waits
      ``queue_timeout`` seconds, then gets 503 (Flower's clients retry 503).
    - A body must keep a minimum pace (:class:`Pace`): after ``rate_grace``
      seconds it must have arrived at ``min_rate`` bytes per second on average
      (time spent waiting for room does not count), with no pause longer than
      ``rate_grace`` seconds, and whole within
      ``body_timeout`` seconds (408 otherwise, :class:`Intake`). An answer is
      written to the client at the same pace, or abandoned and the connection
      closed (a client that never reads holds nothing for long).
    - The request line and headers must arrive within ``head_timeout`` seconds
      and ``max_head_bytes`` bytes, counted as raw bytes as they arrive (the
      connection is closed otherwise, :func:`bounded_http`); idle keep-alive
      connections close after 5 s, and at most ``max_connections`` connections
      are served at once (503 beyond).

    The operator can set limits with environment variables
    (:meth:`FleetLimits.from_env`): ``POLLEN_FLEET_MAX_BODY_MIB``,
    ``POLLEN_FLEET_MAX_INFLIGHT_MIB``, ``POLLEN_FLEET_MAX_OBJECT_MIB``,
    ``POLLEN_FLEET_MAX_OBJECTS`` and ``POLLEN_FLEET_MIN_RATE_KIB`` (KiB per
    second); the code takes a :class:`FleetLimits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from flwr.proto.fleet_pb2 import PushMessagesRequest
from google.protobuf.message import DecodeError
from starlette.types import Message, Receive, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pollen.errors import PollenError

__all__ = [
    "BUSY_TEXT",
    "DEFAULT_MAX_BODY_BYTES",
    "ENV_MAX_BODY",
    "ENV_MAX_INFLIGHT",
    "ENV_MAX_OBJECT",
    "ENV_MAX_OBJECTS",
    "ENV_MIN_RATE",
    "OBJECT_PATH",
    "SLOW_BODY_TEXT",
    "TOO_LARGE_TEXT",
    "ByteBudget",
    "FleetLimits",
    "Intake",
    "Pace",
    "bounded_http",
    "count_declared_objects",
    "declared_length",
    "send_text",
]

TOO_LARGE_TEXT = "pollen: request body too large\n"
BUSY_TEXT = "pollen: the server is busy receiving other requests; retry later\n"
SLOW_BODY_TEXT = "pollen: the request body did not arrive in time\n"

_KIB = 1024
_MIB = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 64 * _MIB
ENV_MAX_BODY = "POLLEN_FLEET_MAX_BODY_MIB"
ENV_MAX_INFLIGHT = "POLLEN_FLEET_MAX_INFLIGHT_MIB"
ENV_MAX_OBJECT = "POLLEN_FLEET_MAX_OBJECT_MIB"
ENV_MAX_OBJECTS = "POLLEN_FLEET_MAX_OBJECTS"
ENV_MIN_RATE = "POLLEN_FLEET_MIN_RATE_KIB"
#: The Fleet call that carries one object (at most Flower's 5 MiB chunk, plus headers).
OBJECT_PATH = "/v1/fleet/push-object"
# Chunked bodies (no Content-Length) claim in-flight room in steps of this size.
_RESERVE_STEP = 1 * _MIB


@dataclass(frozen=True)
class FleetLimits:
    """What one request, and all of them together, may cost the proxy.

    Attributes:
        max_body_bytes: Largest request body (413 beyond). Flower 1.42 moves model
            content as objects of at most 5 MiB (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``),
            and Pollen packs a model's weights into such chunks, so honest calls
            stay far below the 64 MiB default.
        max_inflight_bytes: Bytes of all bodies being read or relayed at once; a
            call that finds no room waits ``queue_timeout`` s, then gets 503.
        max_object_bytes: Largest ``push-object`` body (one object: Flower's
            5 MiB chunk plus its header and the request's fields); also how far a
            body may book room ahead of the bytes that arrived.
        max_objects: Most objects one ``push-messages`` call may declare. Pollen's
            largest model (MobileNetV2, 262 arrays) is 10 objects packed and 164
            unpacked; the 512 default leaves 3x over the unpacked case and bounds
            one message at 512 x 6 MiB.
        min_rate: Bytes per second a body must arrive at, and an answer be read
            at, on average once ``rate_grace`` s have passed (408, or the answer is
            abandoned, below that).
        rate_grace: Seconds before ``min_rate`` applies, and the longest a body or
            an answer may stall at once.
        queue_timeout: Seconds a call waits for in-flight room.
        body_timeout: Seconds a whole body may take to arrive (408 beyond).
        head_timeout: Seconds the request line and headers may take (the
            connection is closed beyond).
        max_head_bytes: Largest request line plus headers (400 beyond).
        max_connections: Connections served at once (uvicorn answers 503 beyond).
        keep_alive: Seconds an idle keep-alive connection stays open.
    """

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_inflight_bytes: int = 256 * _MIB
    max_object_bytes: int = 6 * _MIB
    max_objects: int = 512
    min_rate: int = 64 * _KIB
    rate_grace: float = 10.0
    queue_timeout: float = 30.0
    body_timeout: float = 120.0
    head_timeout: float = 30.0
    max_head_bytes: int = 64 * 1024
    max_connections: int = 1024
    keep_alive: float = 5.0

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or self.max_inflight_bytes < self.max_body_bytes:
            raise PollenError(
                f"the federation port's body limits do not fit: one request may carry up "
                f"to {self.max_body_bytes} bytes but all requests together only "
                f"{self.max_inflight_bytes}; set {ENV_MAX_INFLIGHT} at least as large as "
                f"{ENV_MAX_BODY} (both in MiB, both positive)."
            )
        if self.max_object_bytes < 1 or self.max_objects < 1 or self.min_rate < 1:
            raise PollenError(
                f"the federation port's object limits must be positive: set "
                f"{ENV_MAX_OBJECT} (MiB), {ENV_MAX_OBJECTS} and {ENV_MIN_RATE} (KiB/s) to "
                "positive whole numbers, or unset them for the defaults."
            )

    def body_cap(self, path: str) -> int:
        """The largest body a call to ``path`` may carry."""
        if path == OBJECT_PATH:
            return min(self.max_object_bytes, self.max_body_bytes)
        return self.max_body_bytes

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FleetLimits:
        """The defaults, with the ``POLLEN_FLEET_*`` variables of the module doc applied.

        Raises:
            PollenError: A variable is not a positive whole number, or the
                in-flight limit is below the body limit.
        """
        environ = os.environ if environ is None else environ
        limits = cls()
        for name, field, unit, unit_name in (
            (ENV_MAX_OBJECT, "max_object_bytes", _MIB, "MiB"),
            (ENV_MAX_OBJECTS, "max_objects", 1, ""),
            (ENV_MIN_RATE, "min_rate", _KIB, "KiB per second"),
        ):
            value = _env_count(environ, name, unit_name)
            if value is not None:
                limits = replace(limits, **{field: value * unit})
        body = _env_mib(environ, ENV_MAX_BODY)
        inflight = _env_mib(environ, ENV_MAX_INFLIGHT)
        if body is not None:
            limits = replace(
                limits,
                max_body_bytes=body,
                max_inflight_bytes=max(limits.max_inflight_bytes, body)
                if inflight is None
                else inflight,
            )
        elif inflight is not None:
            limits = replace(limits, max_inflight_bytes=inflight)
        return limits


def _env_mib(environ: Mapping[str, str], name: str) -> int | None:
    mib = _env_count(environ, name, "MiB")
    return None if mib is None else mib * _MIB


def _env_count(environ: Mapping[str, str], name: str, unit: str = "") -> int | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        what = f"a positive whole number of {unit}" if unit else "a positive whole number"
        raise PollenError(
            f"{name}={text!r} is not valid: give {what} (e.g. {name}=64), or unset it "
            "for the default."
        )
    return value


def _malloc_trim() -> Any:
    """The C library's ``malloc_trim`` (glibc; None elsewhere): gives freed pages back."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_MALLOC_TRIM = _malloc_trim()
# After this many body bytes were released and none are held, freed pages go back.
_TRIM_AFTER = 32 * _MIB


class ByteBudget:
    """Bytes of request bodies held at once, shared by all requests of one proxy.

    A body arrives in many small pieces, so once it is freed the C allocator
    keeps the pages it spread over: after a burst (:data:`_TRIM_AFTER` bytes,
    nothing held any more) they are handed back to the OS, in a worker thread.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._released = 0

    async def acquire(self, size: int, deadline: float) -> bool:
        """Claim ``size`` bytes, waiting until ``deadline`` (loop time); False if no room."""
        loop = asyncio.get_running_loop()
        while self.used + size > self.total:
            remaining = deadline - loop.time()
            if remaining <= 0 or size > self.total:
                return False
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return False
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self.used += size
        return True

    def release(self, size: int) -> None:
        """Give back ``size`` bytes and wake the waiting requests."""
        self.used -= size
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._released += size
        if self.used == 0 and self._released >= _TRIM_AFTER and _MALLOC_TRIM is not None:
            self._released = 0
            asyncio.get_running_loop().run_in_executor(None, _MALLOC_TRIM, 0)


_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; "
    b"charset=utf-8\r\ncontent-length: 31\r\nconnection: close\r\n\r\n"
    b"pollen: request head too large\n"
)


def bounded_http(limits: FleetLimits) -> type[HttpToolsProtocol]:
    """Uvicorn's httptools protocol, with a deadline and a size cap on each request head.

    Uvicorn has neither: a connection that sends a few bytes of a request line
    and then nothing holds its place forever, and the URL and header list grow
    without bound while they arrive. The size is counted in raw bytes as they
    arrive, not per parsed header: httptools hands a header over only once its
    value is complete, buffering (and re-joining) its pieces until then. The
    request's scope gets the extension ``pollen.abort``, which drops the
    connection and what is queued on it (an answer the client does not read in
    time is abandoned so).
    """

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0
        _in_head = True  # the bytes now arriving belong to a request line or headers
        _raw_head = 0
        _ended = False  # the piece being parsed ended a request

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm_head_timer()  # the first bytes of the next request on this connection
            self._ended = False
            super().data_received(data)
            if self._in_head and not self._ended and not self.transport.is_closing():
                # Counted after parsing, and not in a piece that ended a request: a piece
                # may carry a head's end with body bytes, or a body's end with a new head.
                self._raw_head += len(data)
                if self._raw_head > limits.max_head_bytes:
                    self._head_too_large()

        def on_message_begin(self) -> None:
            self._head_bytes = 0
            super().on_message_begin()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._raw_head, self._ended = True, 0, True

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._cancel_head_timer()
            self._in_head, self._raw_head = False, 0
            extensions = self.scope.setdefault("extensions", {})
            extensions["pollen.abort"] = {"abort": self.transport.abort}
            super().on_headers_complete()

        def _head_too_large(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no answer under way
                self.transport.write(_HEAD_TOO_LARGE)
            self.transport.close()

        def _count_head(self, size: int) -> None:
            self._head_bytes += size
            if self._head_bytes > limits.max_head_bytes:
                # httptools turns this into a parser error: uvicorn answers 400 and closes.
                raise ValueError("request head too large")

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(limits.head_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return BoundedHttpToolsProtocol


async def send_text(
    send: Send,
    status: int,
    text: str,
    *,
    close: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer ``status`` with ``text`` as plain text (``close``: and close the connection)."""
    body = text.encode("utf-8")
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
        *(headers or []),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length a request declares (None: none, chunked).

    Raises:
        ValueError: It is not a non-negative integer, or two disagree.
    """
    declared: int | None = None
    for name, value in headers:
        if name.lower() == b"content-length":
            length = int(value)
            if length < 0 or (declared is not None and declared != length):
                raise ValueError("bad content-length")
            declared = length
    return declared


class Pace:
    """Holds a transfer to a minimum average rate once a grace period has passed.

    Only the time spent in the transfer's own waits counts (between :meth:`arm`
    and :meth:`disarm`), so a body is not blamed for the time the proxy kept it
    waiting for room, nor an answer for the time the SuperLink took. No single
    wait may outlast the grace period either: bytes an answer hands to the
    socket buffers earn it credit (megabytes on a fast link) whether or not the
    client reads them. One timer serves the whole transfer (``async with pace:``
    around it), moved at each wait: a few microseconds per piece.

    Raises:
        TimeoutError: On leaving ``async with``, when a wait outlasted what the
            bytes moved so far allow.
    """

    def __init__(self, limits: FleetLimits) -> None:
        self.rate = limits.min_rate
        self.grace = limits.rate_grace
        self.moved = 0
        self.spent = 0.0
        self._size = 0
        self._started = 0.0
        self._timer = asyncio.timeout(None)
        self._loop = asyncio.get_running_loop()

    async def __aenter__(self) -> Pace:
        await self._timer.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._timer.__aexit__(*exc_info)

    def arm(self, size: int = 0) -> None:
        """A wait begins that will move ``size`` bytes (0: not known yet, see :meth:`add`)."""
        self._size = size
        self._started = now = self._loop.time()
        allowed = self.grace + (self.moved + size) / self.rate - self.spent
        self._timer.reschedule(now + min(max(allowed, 0.0), self.grace))

    def disarm(self) -> None:
        """The wait is over: count its time and bytes, stop the clock."""
        self._timer.reschedule(None)
        self.spent += self._loop.time() - self._started
        self.moved += self._size

    def add(self, size: int) -> None:
        """Count ``size`` bytes that arrived."""
        self.moved += size


def count_declared_objects(body: bytes, bound: int) -> int:
    """How many objects a ``push-messages`` body declares in its object trees.

    Counting stops past ``bound`` (the answer is then ``bound + 1``), so neither
    time nor memory grows with what the body claims; the protobuf library bounds
    nesting (100 levels).

    Raises:
        ValueError: The body is not a ``PushMessagesRequest``.
    """
    try:
        request = PushMessagesRequest.FromString(body)
    except DecodeError as exc:
        raise ValueError("not a PushMessagesRequest") from exc
    stack = list(request.message_object_trees)
    if len(stack) > bound:
        return bound + 1
    count = 0
    while stack:
        node = stack.pop()
        count += 1
        children = node.children
        if count + len(stack) + len(children) > bound:
            return bound + 1
        stack.extend(children)
    return count


class Intake:
    """Reads one request body within the limits, holding its room in the in-flight budget.

    Room is booked for the bytes that arrived, at most ``max_object_bytes`` ahead
    of them (a body up to that size is booked whole before it is read, so honest
    objects never wait for room half-read). Every refusal is answered here (413
    too large, 503 no room in time, 408 too slow, with ``connection: close``) and
    counted in ``state.limited``; the caller must call :meth:`release` when the
    body is no longer needed.
    """

    def __init__(self, limits: FleetLimits, budget: ByteBudget, state: Any) -> None:
        self.limits = limits
        self.budget = budget
        self.state = state
        self.reserved = 0
        self.cap = limits.max_body_bytes

    async def read(
        self, receive: Receive, send: Send, declared: int | None, cap: int | None = None
    ) -> bytes | None:
        """The whole body (at most ``cap`` bytes), or None once a refusal was sent."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        self.cap = limits.max_body_bytes if cap is None else cap
        ahead = min(limits.max_object_bytes, self.cap)
        first = min(declared, ahead) if declared is not None else min(_RESERVE_STEP, self.cap)
        if not await self._reserve(first, loop.time() + limits.queue_timeout):
            return await self._refuse(send, 503, BUSY_TEXT, "busy")
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(limits.body_timeout):
                refusal = await self._receive_all(receive, chunks, declared)
        except TimeoutError:
            refusal = (408, SLOW_BODY_TEXT, "slow body")
        if refusal is not None:
            chunks.clear()
            return await self._refuse(send, *refusal) if refusal[0] else None
        body = b"".join(chunks)
        chunks.clear()
        return body

    async def _receive_all(
        self, receive: Receive, chunks: list[bytes], declared: int | None
    ) -> tuple[int, str, str] | None:
        """Append the body's pieces to ``chunks``; a refusal (status 0: the client left).

        Raises:
            TimeoutError: The body fell below the minimum pace (:class:`Pace`).
        """
        loop = asyncio.get_running_loop()
        limits = self.limits
        limit = self.cap if declared is None else min(declared, self.cap)
        size = 0
        async with Pace(limits) as pace:
            while True:
                pace.arm()
                message: Message = await receive()
                pace.disarm()
                if message["type"] == "http.disconnect":
                    return 0, "", ""
                chunk = message.get("body", b"")
                size += len(chunk)
                pace.add(len(chunk))
                if size > self.cap:
                    return 413, TOO_LARGE_TEXT, "too large"
                if size > self.reserved:  # the body grows its claim as its bytes arrive
                    wanted = max(_RESERVE_STEP, size - self.reserved)
                    step = min(wanted, max(limit, size) - self.reserved)
                    if not await self._reserve(step, loop.time() + limits.queue_timeout):
                        return 503, BUSY_TEXT, "busy"
                if chunk:
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    return None

    async def _reserve(self, size: int, deadline: float) -> bool:
        if await self.budget.acquire(size, deadline):
            self.reserved += size
            return True
        return False

    async def _refuse(self, send: Send, status: int, text: str, reason: str) -> None:
        self.state.limited[reason] += 1
        headers = {503: [(b"retry-after", b"5")]}.get(status, [])
        await send_text(send, status, text, close=True, headers=headers)

    def release(self) -> None:
        """Give the body's room back to the budget (safe to call more than once)."""
        if self.reserved:
            self.budget.release(self.reserved)
            self.reserved = 0
