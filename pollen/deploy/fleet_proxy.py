"""A gate in front of the SuperLink that lets only federation clients through.

Why this exists:
    Flower 1.42's SuperLink (``flower-superlink``) is a single FastAPI/uvicorn
    HTTP server. On the one ``--host``/``--port`` it is given it serves the
    Fleet API (``/v1/fleet/*``, what SuperNodes call to register, pull work and
    push results), the Control API (``/v1/control/*``: ``start-run``,
    ``list-runs``, ``stop-run``, ...), the Runtime API (``/v1/runtime/*``, used by
    ServerApp processes) and ``/health`` and ``/docs``. The clients must reach
    that port, so anyone who can reach it can also call
    ``/v1/control/start-run``: submit a Flower App and run code on the server.

    Pollen closes that hole: the SuperLink listens on 127.0.0.1 on a private
    port, and this small reverse proxy listens on the public address (by default
    0.0.0.0:8080). It passes through exactly the Fleet API endpoints (``POST``,
    exact paths from :data:`FLEET_ENDPOINTS`) and answers everything else with
    HTTP 403 and a WARNING log line naming the caller.

Why it is hand-written:
    Flower 1.42 has no option to serve the Fleet API alone on its own listener:
    the routers are fixed in ``flwr.superlink.main.create_app`` and the
    deprecated ``--fleet-api-address``/``--control-api-address`` options no
    longer move the HTTP APIs. A general-purpose proxy (nginx, Caddy) would do,
    but would be one more thing to install and configure. This module needs only
    starlette, httpx and uvicorn, which Flower already depends on.

What is forwarded:
    Every Fleet endpoint is a unary protobuf-over-HTTP call
    (``content-type: application/protobuf``); none streams. Request bodies are
    buffered (within :class:`FleetLimits`), responses are streamed back as raw
    bytes (any content encoding passes through untouched). All headers pass
    except hop-by-hop ones, so the SuperNode authentication headers
    (``flwr-public-key``, ``flwr-timestamp``, ``flwr-signature``) and the
    version headers reach the SuperLink unchanged. Forwarding headers sent by the
    client (``x-forwarded-for`` and friends) are replaced with the real peer
    address, because the SuperLink's uvicorn trusts them from 127.0.0.1.

What a stranger can cost:
    The port is public, so memory and time are bounded per request and in all,
    and nothing is buffered for a caller the server will refuse anyway. Each
    call is checked from its headers alone before any of its body is read: with
    client authentication (``pollen server --certs``) it must be signed by an
    authorized client key (:mod:`pollen.deploy.fleet_keys`, refused with the
    answer Flower would give), and its declared length must fit the body cap.
    Its body is then read within :class:`~pollen.deploy.fleet_limits.FleetLimits`
    (:mod:`pollen.deploy.fleet_limits`: body caps, 6 MiB for ``push-object``;
    an in-flight byte budget booked as bytes arrive; a minimum pace for bodies
    and for answers, whose client is cut off below it; head size counted in raw
    bytes; deadlines; a connection cap; the operator sets them with
    ``POLLEN_FLEET_*`` variables). A ``push-messages`` body is parsed and refused
    when its object trees list more than ``max_objects`` objects, so one message
    cannot make the SuperLink store without bound. Calls to the SuperLink keep
    bounded timeouts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import logging
import posixpath
import signal
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from pollen.deploy.certs import pem_key_fingerprint
from pollen.deploy.fleet_keys import (
    KEY_HEADER_MAX,
    PUBLIC_KEY_HEADER,
    UNKNOWN_KEY,
    NodeKeys,
    flower_refusal,
)
from pollen.deploy.fleet_limits import (
    TOO_LARGE_TEXT,
    ByteBudget,
    FleetLimits,
    Intake,
    Pace,
    bounded_http,
    count_declared_objects,
    declared_length,
    send_text,
)
from pollen.errors import PollenError

__all__ = [
    "FLEET_ENDPOINTS",
    "FLEET_PATHS",
    "FleetProxy",
    "create_app",
    "is_allowed",
]

#: The Fleet API endpoints, as in ``flwr/superlink/routers/fleet/router.py`` (Flower 1.42).
#: Every one is ``POST /v1/fleet/<name>``. Nothing else passes the proxy.
FLEET_ENDPOINTS: tuple[str, ...] = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)

FLEET_PATHS: frozenset[str] = frozenset(f"/v1/fleet/{name}" for name in FLEET_ENDPOINTS)

REFUSAL_TEXT = "pollen: this port serves federation clients only\n"
UNREACHABLE_TEXT = "pollen: the federation server behind this port is not reachable\n"
TIMEOUT_TEXT = "pollen: the federation server behind this port did not answer in time\n"
BAD_REQUEST_TEXT = "pollen: malformed request\n"
TOO_MANY_OBJECTS_TEXT = "pollen: the message declares more objects than this server accepts\n"

# RFC 9110 section 7.6.1 hop-by-hop headers, plus the ones the proxy recomputes.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers that are not passed upstream: hop-by-hop, recomputed by httpx
# (host, content-length), handled by the proxy itself (expect), or spoofable
# forwarding information (replaced with the real peer address).
_REQUEST_DROP = _HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"x-forwarded-port",
    b"x-real-ip",
}

# The Fleet call whose body declares a message's objects (its object tree).
_MESSAGES_PATH = "/v1/fleet/push-messages"
# Fleet calls with which a SuperNode joins; an error answer means Flower refused it.
_JOIN_PATHS = frozenset({"/v1/fleet/register-node", "/v1/fleet/activate-node"})

_UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=300.0, pool=30.0)
# Idle upstream connections are dropped after 2 s, before the SuperLink's uvicorn drops
# them (its keep-alive timeout is 5 s, httpx's default expiry too): with equal timeouts a
# request sent on a connection the SuperLink was closing failed with ReadError('') and
# its SuperNode got a 502 (seen at 25 clients on 2 loaded cores).
_UPSTREAM_LIMITS = httpx.Limits(
    max_connections=1000, max_keepalive_connections=100, keepalive_expiry=2.0
)
_LOG_PATH_MAX = 200
_REFUSED_KEYS_MAX = 1024

_default_log = logging.getLogger(__name__)


def is_allowed(method: str, path: str) -> bool:
    """Return whether a request with this method and path may pass to the SuperLink.

    Only ``POST`` to one of the exact Fleet API paths passes. The path must be
    the same raw, percent-decoded and dot-segment-normalized, so encoded or
    dotted variants (``/v1/fleet/../control/start-run``, ``%2e%2e``, ``//``),
    trailing slashes and query strings are all refused.

    Args:
        method: The HTTP method, as sent (methods are case-sensitive).
        path: The request path, raw or decoded.

    Returns:
        True if the request is a Fleet API call.
    """
    if method != "POST" or path not in FLEET_PATHS:
        return False
    # The exact match above already rejects every variant; these checks keep
    # the rule true even if the allow-list ever gained an odd entry.
    decoded = unquote(path)
    return decoded == path and posixpath.normpath(decoded) == path


def _printable(text: str) -> str:
    """Shorten and escape a client-supplied string for a log line."""
    if len(text) > _LOG_PATH_MAX:
        text = text[:_LOG_PATH_MAX] + "..."
    return ascii(text)[1:-1]


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "unknown"
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _fingerprint(header: bytes) -> str:
    """SHA-256 fingerprint of the base64 PEM public key a SuperNode sends."""
    try:
        pem = base64.b64decode(header, validate=True)
    except (ValueError, binascii.Error):
        return "(unreadable)"
    return pem_key_fingerprint(pem) or "(unreadable)"


def _verify_arg(upstream_verify: ssl.SSLContext | str | bool) -> ssl.SSLContext | bool:
    """Turn a CA bundle path into an SSL context (httpx 0.28 deprecates str)."""
    if isinstance(upstream_verify, str):
        return ssl.create_default_context(cafile=upstream_verify)
    return upstream_verify


class _Upstream:
    """The SuperLink address and a lazily created, shared HTTP client for it."""

    def __init__(self, base_url: str, verify: ssl.SSLContext | str | bool) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"upstream must be an http(s) URL like http://127.0.0.1:9093, got {base_url!r}"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"upstream must not have a query or fragment: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._verify = _verify_arg(verify)
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                verify=self._verify,
                timeout=_UPSTREAM_TIMEOUT,
                limits=_UPSTREAM_LIMITS,
                trust_env=False,  # never route the loopback hop through an env proxy
                follow_redirects=False,
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in ``Connection`` (hop-by-hop by declaration)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


class _RefusalLog:
    """Counts and logs refused requests and clients Flower refused, in bounded memory."""

    def __init__(self, state: Any, log: logging.Logger) -> None:
        self.state = state
        self.log = log

    def request(self, scope: Scope, method: str, path: str) -> None:
        """Count and log a request the gate refused (not a Fleet API call)."""
        refused = self.state.refused
        key = (method[:_LOG_PATH_MAX], path[:_LOG_PATH_MAX])
        if key not in refused and len(refused) >= _REFUSED_KEYS_MAX:
            key = ("*", "*")  # scanners send endless distinct paths: keep memory bounded
        refused[key] += 1
        self.log.warning(
            "pollen: refused %s %s from %s: this port serves federation clients only",
            _printable(method),
            _printable(path),
            _peer(scope),
        )

    def client(self, scope: Scope, path: str, status: int, reason: str | None = None) -> None:
        """Log that Flower (or, with ``reason``, the proxy) refused a client's key."""
        fingerprint = "no key"
        for name, value in scope["headers"]:
            if name.lower() == PUBLIC_KEY_HEADER:
                fingerprint = _fingerprint(value[:KEY_HEADER_MAX])
        by_proxy = reason is not None
        if reason is None:
            reason = flower_refusal(path, status)
        counts = self.state.refused_clients
        if fingerprint not in counts and len(counts) >= _REFUSED_KEYS_MAX:
            fingerprint = "*"  # keep memory bounded against a flood of made-up keys
        counts[fingerprint] += 1
        self.log.warning(
            "pollen: refused client %s with key %s: %s (%s answered HTTP %d)",
            _peer(scope),
            fingerprint,
            reason,
            path.rsplit("/", 1)[-1] + (" at the federation port" if by_proxy else ""),
            status,
        )


def _upstream_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The request's headers for the SuperLink: end-to-end ones, plus the real peer address."""
    raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
    dropped = _REQUEST_DROP | _connection_tokens(raw_headers)
    headers = [(n, v) for n, v in raw_headers if n.lower() not in dropped]
    client = scope.get("client")
    if client:
        headers.append((b"x-forwarded-for", str(client[0]).encode("latin-1")))
    headers.append((b"x-forwarded-proto", str(scope.get("scheme", "http")).encode("latin-1")))
    return headers


class _FleetGate:
    """Pure ASGI middleware: forwards Fleet API calls, refuses everything else.

    It answers every HTTP request itself and never calls the wrapped app,
    except for the lifespan protocol, which Starlette's router handles.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        upstream: _Upstream,
        state: Any,
        limits: FleetLimits,
        keys: NodeKeys | None,
        log: logging.Logger,
    ) -> None:
        self.app = app
        self.upstream = upstream
        self.state = state
        self.limits = limits
        self.keys = keys
        self.budget: ByteBudget = state.budget
        self.log = log
        self.refusals = _RefusalLog(state, log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            self.refusals.request(scope, "WEBSOCKET", scope.get("path", ""))
            await send({"type": "websocket.close", "code": 1008})
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        raw = scope.get("raw_path")
        raw_path = raw.decode("latin-1") if raw else path
        query = scope.get("query_string", b"")
        if query or not (is_allowed(method, raw_path) and is_allowed(method, path)):
            shown = raw_path + ("?" + query.decode("latin-1") if query else "")
            self.refusals.request(scope, method, shown)
            await send_text(send, 403, REFUSAL_TEXT)
            return
        await self._forward(scope, receive, send, path)

    async def _admit(self, scope: Scope, send: Send, path: str) -> tuple[bool, int | None]:
        """Check a Fleet call from its headers alone, before any of its body is read.

        Returns:
            Whether it may go on (False once a refusal was sent: 401 for a key
            that is not authorized, 400 for a malformed length, 413 for a body
            declared larger than the path's cap), and its declared body length
            (None: chunked).
        """
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if self.keys is not None:
            reason = self.keys.refusal(headers)
            if reason is not None:
                # Answer as Flower would have: its SuperNode then says what went wrong.
                status, answer = self.keys.answers.get(
                    path if reason == UNKNOWN_KEY else "", self.keys.answers[""]
                )
                self.state.limited["unauthorized"] += 1
                self.refusals.client(scope, path, status, reason)
                await _send_json(send, status, answer)
                return False, None
        try:
            declared = declared_length(headers)
        except ValueError:
            await send_text(send, 400, BAD_REQUEST_TEXT, close=True)
            return False, None
        if declared is not None and declared > self.limits.body_cap(path):
            self.state.limited["too large"] += 1
            await send_text(send, 413, TOO_LARGE_TEXT, close=True)
            return False, None
        return True, declared

    async def _forward(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        admitted, declared = await self._admit(scope, send, path)
        if not admitted:
            return
        intake = Intake(self.limits, self.budget, self.state)
        body: bytes | None = None
        try:
            body = await intake.read(receive, send, declared, self.limits.body_cap(path))
            if body is not None and await self._objects_fit(scope, send, path, body):
                await self._pass_on(scope, send, path, body)
        finally:
            del body  # no reference may outlive its room in the budget
            intake.release()

    async def _objects_fit(self, scope: Scope, send: Send, path: str, body: bytes) -> bool:
        """Whether a ``push-messages`` call declares at most ``max_objects`` objects.

        Flower 1.42's SuperLink stores every object a message's tree lists, each
        up to the object cap: the tree is the one place that bounds a message.
        False once a refusal was sent (413; 400 for a body that is no such call).
        """
        if path != _MESSAGES_PATH:
            return True
        bound = self.limits.max_objects
        try:
            count = count_declared_objects(body, bound)
        except ValueError:
            await send_text(send, 400, BAD_REQUEST_TEXT, close=True)
            return False
        if count <= bound:
            return True
        self.state.limited["too many objects"] += 1
        self.log.warning(
            "pollen: refused a message from %s: it declares more than %d objects "
            "(POLLEN_FLEET_MAX_OBJECTS)",
            _peer(scope),
            bound,
        )
        await send_text(send, 413, TOO_MANY_OBJECTS_TEXT, close=True)
        return False

    async def _pass_on(self, scope: Scope, send: Send, path: str, body: bytes) -> None:
        """Send the call upstream and relay the answer."""
        # `path` equals an allow-list entry, so the upstream URL is one of twelve fixed ones.
        request = httpx.Request(
            "POST", self.upstream.base_url + path, headers=_upstream_headers(scope), content=body
        )
        del body
        response = await self._send_upstream(request, send, path)
        if response is None:
            return
        try:
            self.state.forwarded[(path, response.status_code)] += 1
            if response.status_code == 401 or (
                path in _JOIN_PATHS and 400 <= response.status_code < 500
            ):
                self.refusals.client(scope, path, response.status_code)
            try:
                await _relay(response, send, Pace(self.limits))
            except TimeoutError:
                await self._abandon(scope, path)
        finally:
            await response.aclose()
            # httpx's response stream points back at the response: break that cycle, so
            # the request and its body go now, not at the next garbage collection.
            response.stream = httpx.ByteStream(b"")

    async def _abandon(self, scope: Scope, path: str) -> None:
        """Drop the connection of a client that did not read its answer at the minimum pace."""
        self.state.limited["slow reader"] += 1
        self.log.warning(
            "pollen: abandoned the answer to %s for %s: it was not read in time",
            path.rsplit("/", 1)[-1],
            _peer(scope),
        )
        abort = scope.get("extensions", {}).get("pollen.abort")
        if abort is not None:
            abort["abort"]()  # not close(): that would wait for the client to read
            await asyncio.sleep(0)  # the server sees the connection gone, not an unended answer

    async def _send_upstream(
        self, request: httpx.Request, send: Send, path: str
    ) -> httpx.Response | None:
        """Send ``request`` upstream; on a transport error answer 502/504 and return None."""
        try:
            return await self.upstream.client().send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self.log.warning(
                "pollen: cannot reach the federation server at %s: %s", self.upstream.base_url, exc
            )
            await send_text(send, 502, UNREACHABLE_TEXT)
        except httpx.TimeoutException as exc:
            self.log.warning(
                "pollen: the federation server at %s timed out on %s: %r",
                self.upstream.base_url,
                path,
                exc,
            )
            await send_text(send, 504, TIMEOUT_TEXT)
        except httpx.TransportError as exc:
            self.log.warning(
                "pollen: error talking to the federation server at %s: %r",
                self.upstream.base_url,
                exc,
            )
            await send_text(send, 502, UNREACHABLE_TEXT)
        return None


async def _relay(response: httpx.Response, send: Send, pace: Pace) -> None:
    """Stream the SuperLink's answer back, without its hop-by-hop headers.

    Raises:
        TimeoutError: The client did not read it at ``pace`` (only the time spent
            waiting for the client counts, not the SuperLink's).
    """
    up_headers = response.headers.raw
    drop = _HOP_BY_HOP | _connection_tokens(up_headers)
    out_headers = [(n.lower(), v) for n, v in up_headers if n.lower() not in drop]
    async with pace:
        pace.arm()
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": out_headers,
            }
        )
        pace.disarm()
        async for chunk in response.aiter_raw():
            if chunk:
                pace.arm(len(chunk))
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                pace.disarm()
        pace.arm()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        pace.disarm()


def create_app(
    upstream: str,
    *,
    upstream_verify: ssl.SSLContext | str | bool = True,
    limits: FleetLimits | None = None,
    authorized_keys: Iterable[ec.EllipticCurvePublicKey] | None = None,
    max_body_bytes: int | None = None,
    log: logging.Logger | None = None,
) -> Starlette:
    """Build the ASGI app that forwards the Fleet API to ``upstream`` and refuses the rest.

    Args:
        upstream: Base URL of the SuperLink, e.g. ``http://127.0.0.1:9093``.
        upstream_verify: TLS verification for an ``https`` upstream: True (system
            CAs), False, a CA bundle path, or an :class:`ssl.SSLContext`.
        limits: What requests may cost (default: :meth:`FleetLimits.from_env`).
        authorized_keys: The client keys the SuperLink admits: a Fleet call not
            signed by one of them is refused from its headers (None: no check,
            for plaintext trials where Flower admits any client).
        max_body_bytes: Shortcut for ``limits.max_body_bytes``.
        log: Logger for refusals and upstream errors (default: this module's).

    Returns:
        A Starlette app. ``app.state.forwarded`` counts forwarded calls by
        ``(path, upstream status)``; ``app.state.refused`` counts refusals by
        ``(method, path)`` (at most 1024 distinct keys, then under ``("*", "*")``);
        ``app.state.refused_clients`` counts clients Flower refused (HTTP 401, or
        an error answer to register-node/activate-node) by key fingerprint, each
        also logged as a WARNING with the peer address; ``app.state.limited``
        counts calls refused by the limits (``"unauthorized"``, ``"too large"``,
        ``"busy"``, ``"slow body"``, ``"too many objects"``, ``"slow reader"``);
        ``app.state.budget.used`` is the body bytes
        held right now.
    """
    target = _Upstream(upstream, upstream_verify)
    limits = limits or FleetLimits.from_env()
    if max_body_bytes is not None:
        limits = replace(
            limits,
            max_body_bytes=max_body_bytes,
            max_inflight_bytes=max(limits.max_inflight_bytes, max_body_bytes),
        )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await target.aclose()

    app = Starlette(lifespan=lifespan)
    app.state.forwarded = Counter()
    app.state.refused = Counter()
    app.state.refused_clients = Counter()
    app.state.limited = Counter()
    app.state.budget = ByteBudget(limits.max_inflight_bytes)
    app.state.limits = limits
    app.state.upstream = target.base_url
    app.add_middleware(
        _FleetGate,
        upstream=target,
        state=app.state,
        limits=limits,
        keys=None if authorized_keys is None else NodeKeys(authorized_keys),
        log=log or _default_log,
    )
    return app


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(host: str, port: int) -> socket.socket:
    """Create the listening socket, translating failures into a PollenError."""
    address = _format_address(host, port)
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise PollenError(
            f"cannot listen on {address}: {host!r} is not an address or host name this "
            f"machine knows ({exc.strerror}); use 0.0.0.0 to listen on all network "
            "interfaces, or one of this machine's own addresses, with --address"
        ) from exc
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if sys.platform == "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:
            # Allows a restart while old connections linger in TIME_WAIT; on POSIX it
            # does not allow two listeners on the same port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            raise PollenError(
                f"address {address} is already in use: another program (perhaps another "
                "pollen server) listens there; stop it or choose another --address"
            ) from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PollenError(
                f"cannot listen on {address}: permission denied; ports below 1024 need "
                "administrator rights, so choose a port above 1024 with --address"
            ) from exc
        if exc.errno == errno.EADDRNOTAVAIL:
            raise PollenError(
                f"cannot listen on {address}: this machine has no address {host}; use "
                "0.0.0.0 to listen on all network interfaces, or one of this machine's "
                "own addresses, with --address"
            ) from exc
        raise PollenError(
            f"cannot listen on {address}: {exc.strerror or exc}; choose another --address"
        ) from exc
    return sock


def _uvicorn_config(
    app: ASGIApp, certfile: str | None, keyfile: str | None, limits: FleetLimits
) -> uvicorn.Config:
    """Uvicorn's settings for the proxy, loaded (so TLS file errors surface here).

    From ``limits``: a head deadline and size cap (uvicorn has neither), the
    connection cap and the keep-alive time. A TLS handshake must finish within
    asyncio's 60 s.

    Raises:
        PollenError: The TLS certificate or key cannot be loaded.
    """
    config = uvicorn.Config(
        app,
        http=bounded_http(limits),
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=max(1, round(limits.keep_alive)),
        log_config=None,  # leave the process's logging setup alone
        log_level="warning",
        access_log=False,
        proxy_headers=False,  # the peer address is the real client: trust no header
        server_header=False,  # upstream's server/date headers pass through
        date_header=False,
        ws="none",
        lifespan="on",
        timeout_graceful_shutdown=5,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
    )
    try:
        config.load()
    except (OSError, ssl.SSLError) as exc:
        raise PollenError(
            f"cannot load the TLS certificate {certfile!r} / key {keyfile!r}: "
            f"{exc}; check that both files exist, are readable PEM files and belong "
            "together"
        ) from exc
    return config


class FleetProxy:
    """Runs the Fleet-only proxy (:func:`create_app`) with uvicorn in a background thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop`::

        with FleetProxy("0.0.0.0", 8080, "http://127.0.0.1:9093") as proxy:
            ...  # clients dial port proxy.port

    The listening socket is bound in :meth:`start` (so ``listen_port=0`` picks a
    free port, see :attr:`port`), and bind errors surface there as
    :class:`~pollen.errors.PollenError`. With ``certfile``/``keyfile`` the proxy
    serves HTTPS; with ``authorized_keys`` it refuses, from the headers, Fleet
    calls not signed by one of them; ``limits`` default to
    :meth:`FleetLimits.from_env`.
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        upstream: str,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
        upstream_verify: ssl.SSLContext | str | bool = True,
        authorized_keys: Iterable[ec.EllipticCurvePublicKey] | None = None,
        limits: FleetLimits | None = None,
    ) -> None:
        if keyfile and not certfile:
            raise PollenError(
                "a TLS key file was given without a certificate file; pass both (or a "
                "certificate file that also holds the key) to serve HTTPS"
            )
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.upstream = upstream
        self.certfile = certfile
        self.keyfile = keyfile
        self.limits = limits or FleetLimits.from_env()
        self.app = create_app(
            upstream,
            upstream_verify=upstream_verify,
            limits=self.limits,
            authorized_keys=authorized_keys,
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._port: int | None = None
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        """The port the proxy listens on (the real one once started, even with port 0)."""
        return self._port if self._port is not None else self.listen_port

    @property
    def address(self) -> str:
        """``host:port`` the proxy listens on."""
        return _format_address(self.listen_host, self.port)

    def start(self, timeout: float = 10.0) -> None:
        """Bind the port and serve in a background thread; return once it accepts connections.

        Args:
            timeout: Seconds to wait for the server to come up.

        Raises:
            PollenError: The address is in use or cannot be bound, the TLS files
                cannot be loaded, or the server did not start in time.
        """
        if self._thread is not None:
            raise RuntimeError("FleetProxy already started")
        sock = _bind(self.listen_host, self.listen_port)
        self._port = sock.getsockname()[1]
        try:
            config = _uvicorn_config(self.app, self.certfile, self.keyfile, self.limits)
        except PollenError:
            sock.close()
            self._port = None
            raise
        server = uvicorn.Server(config)
        self._sock, self._server, self._error = sock, server, None
        thread = threading.Thread(
            target=self._run,
            args=(server, sock),
            name=f"pollen-fleet-proxy-{self._port}",
            daemon=True,
        )
        self._thread = thread
        thread.start()
        self._wait_started(server, thread, timeout)

    def _wait_started(
        self, server: uvicorn.Server, thread: threading.Thread, timeout: float
    ) -> None:
        """Wait until ``server`` accepts connections; clean up and raise if it does not."""
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                error = self._error
                self._cleanup()
                raise PollenError(
                    f"the federation port {self.address} stopped while starting"
                    + (f": {error!r}" if error else "")
                    + "; see the log above"
                ) from error
            if time.monotonic() > deadline:
                self.stop()
                raise PollenError(
                    f"the federation port {self.address} did not start within {timeout:g} s"
                )
            time.sleep(0.01)

    def _run(self, server: uvicorn.Server, sock: socket.socket) -> None:
        # Ctrl-C and SIGTERM are for the main thread (which stops the server): block
        # them here so the kernel does not hand them to this thread.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            # Not the main thread, so uvicorn installs no signal handlers.
            server.run(sockets=[sock])
        except BaseException as exc:  # reported by start()
            self._error = exc

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and close the port. Safe to call more than once."""
        server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(timeout)
            if thread.is_alive():
                server.force_exit = True
                thread.join(5.0)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._server = None
        self._thread = None

    def __enter__(self) -> FleetProxy:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
