"""What one request to the federation port, and all of them together, may cost.

Contract:
    The port is public, so memory and time are bounded per request and in all,
    and nothing is buffered beyond these bounds (:class:`FleetLimits`):

    - A body is at most ``max_body_bytes`` (64 MiB; Flower cuts arrays into
      5 MiB objects, so no honest call comes near): a larger Content-Length is
      answered 413 at once, a chunked body the moment it passes the cap.
    - All bodies being read or relayed together hold at most
      ``max_inflight_bytes`` (256 MiB, :class:`ByteBudget`); a call that finds no
      room waits ``queue_timeout`` seconds, then gets 503 (Flower's clients retry
      503).
    - A body must arrive within ``body_timeout`` seconds (408 otherwise,
      :class:`Intake`), the request line and headers within ``head_timeout``
      seconds and ``max_head_bytes`` bytes (the connection is closed otherwise,
      :func:`bounded_http`), idle keep-alive connections close after 5 s, and at
      most ``max_connections`` connections are served at once (503 beyond).

    The operator can set the two byte limits with the environment variables
    ``POLLEN_FLEET_MAX_BODY_MIB`` and ``POLLEN_FLEET_MAX_INFLIGHT_MIB``
    (:meth:`FleetLimits.from_env`); the code takes a :class:`FleetLimits`.
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

from starlette.types import Message, Receive, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pollen.errors import PollenError

__all__ = [
    "BUSY_TEXT",
    "DEFAULT_MAX_BODY_BYTES",
    "ENV_MAX_BODY",
    "ENV_MAX_INFLIGHT",
    "SLOW_BODY_TEXT",
    "TOO_LARGE_TEXT",
    "ByteBudget",
    "FleetLimits",
    "Intake",
    "bounded_http",
    "declared_length",
    "send_text",
]

TOO_LARGE_TEXT = "pollen: request body too large\n"
BUSY_TEXT = "pollen: the server is busy receiving other requests; retry later\n"
SLOW_BODY_TEXT = "pollen: the request body did not arrive in time\n"

_MIB = 1024 * 1024
DEFAULT_MAX_BODY_BYTES = 64 * _MIB
ENV_MAX_BODY = "POLLEN_FLEET_MAX_BODY_MIB"
ENV_MAX_INFLIGHT = "POLLEN_FLEET_MAX_INFLIGHT_MIB"
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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FleetLimits:
        """The defaults, with ``POLLEN_FLEET_MAX_BODY_MIB``/``..._MAX_INFLIGHT_MIB`` applied.

        Raises:
            PollenError: A variable is not a positive whole number of MiB, or the
                in-flight limit is below the body limit.
        """
        environ = os.environ if environ is None else environ
        limits = cls()
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
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        mib = int(text)
    except ValueError:
        mib = 0
    if mib < 1:
        raise PollenError(
            f"{name}={text!r} is not a size: give a positive whole number of MiB "
            f"(e.g. {name}=64), or unset it for the default."
        )
    return mib * _MIB


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


def bounded_http(limits: FleetLimits) -> type[HttpToolsProtocol]:
    """Uvicorn's httptools protocol, with a deadline and a size cap on each request head.

    Uvicorn has neither: a connection that sends a few bytes of a request line
    and then nothing holds its place forever, and the URL and header list grow
    without bound while they arrive.
    """

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm_head_timer()  # the first bytes of the next request on this connection
            super().data_received(data)

        def on_message_begin(self) -> None:
            self._head_bytes = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._cancel_head_timer()
            super().on_headers_complete()

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


class Intake:
    """Reads one request body within the limits, holding its room in the in-flight budget.

    Every refusal is answered here (413 too large, 503 no room in time, 408 too
    slow, with ``connection: close``) and counted in ``state.limited``; the
    caller must call :meth:`release` when the body is no longer needed.
    """

    def __init__(self, limits: FleetLimits, budget: ByteBudget, state: Any) -> None:
        self.limits = limits
        self.budget = budget
        self.state = state
        self.reserved = 0

    async def read(self, receive: Receive, send: Send, declared: int | None) -> bytes | None:
        """The whole body, or None once a refusal was sent (or the client left)."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        first = declared if declared is not None else min(_RESERVE_STEP, limits.max_body_bytes)
        if not await self._reserve(first, loop.time() + limits.queue_timeout):
            return await self._refuse(send, 503, BUSY_TEXT, "busy")
        chunks: list[bytes] = []
        try:
            async with asyncio.timeout(limits.body_timeout):
                refusal = await self._receive_all(receive, chunks)
        except TimeoutError:
            refusal = (408, SLOW_BODY_TEXT, "slow body")
        if refusal is not None:
            chunks.clear()
            return await self._refuse(send, *refusal) if refusal[0] else None
        body = b"".join(chunks)
        chunks.clear()
        return body

    async def _receive_all(
        self, receive: Receive, chunks: list[bytes]
    ) -> tuple[int, str, str] | None:
        """Append the body's pieces to ``chunks``; a refusal (status 0: the client left)."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        size = 0
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                return 0, "", ""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limits.max_body_bytes:
                return 413, TOO_LARGE_TEXT, "too large"
            if size > self.reserved:  # a chunked body grows its claim step by step
                step = min(
                    max(_RESERVE_STEP, size - self.reserved),
                    limits.max_body_bytes - self.reserved,
                )
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
