"""Tests for pollen.deploy.fleet_proxy: only the Fleet API passes; everything else is refused."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
import ipaddress
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pollen.deploy.fleet_proxy import (
    FLEET_ENDPOINTS,
    FLEET_PATHS,
    REFUSAL_TEXT,
    FleetProxy,
    create_app,
    is_allowed,
)
from pollen.errors import PollenError

# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(app, **config_kwargs) -> Iterator[int]:
    """Serve an ASGI app with uvicorn on 127.0.0.1:<free port> in a thread; yield the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_config=None, log_level="warning", access_log=False, ws="none", **config_kwargs
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "test server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class FakeSuperLink:
    """A tiny upstream that records every call and echoes the request body."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.app = Starlette(
            routes=[
                Route(
                    "/{rest:path}",
                    self.handle,
                    methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"],
                )
            ]
        )

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        self.calls.append(
            {
                "method": request.method,
                "path": request.url.path,
                "headers": list(request.headers.raw),
                "body": body,
            }
        )
        path = request.url.path
        if path == "/v1/fleet/get-fab":  # an error answer, like Flower's node-auth failure
            return JSONResponse({"detail": "Invalid SuperNode authentication"}, status_code=401)
        if path == "/v1/fleet/pull-object":  # a chunked (streamed) answer
            if body.startswith(b"repeat:"):  # a large answer to a small call
                size = int(body.removeprefix(b"repeat:"))
                body = bytes(size)

            async def chunks():
                for i in range(0, len(body), 65536):
                    yield body[i : i + 65536]

            return StreamingResponse(chunks(), media_type="application/protobuf")
        response = Response(body, media_type="application/protobuf")
        response.raw_headers.append((b"x-echo-path", path.encode()))
        response.raw_headers.append((b"x-multi", b"one"))
        response.raw_headers.append((b"x-multi", b"two"))
        return response

    def headers_of(self, call: dict) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, value in call["headers"]:
            out.setdefault(name.decode().lower(), []).append(value.decode())
        return out


@pytest.fixture(scope="module")
def _shared_upstream() -> Iterator[tuple[FakeSuperLink, int]]:
    fake = FakeSuperLink()
    with _serve(fake.app) as port:
        yield fake, port


@pytest.fixture(scope="module")
def _shared_proxy(_shared_upstream) -> Iterator[FleetProxy]:
    _, port = _shared_upstream
    with FleetProxy("127.0.0.1", 0, f"http://127.0.0.1:{port}") as p:
        yield p


@pytest.fixture
def upstream(_shared_upstream) -> tuple[FakeSuperLink, int]:
    """The fake SuperLink, with an empty call record."""
    _shared_upstream[0].calls.clear()
    return _shared_upstream


@pytest.fixture
def proxy(_shared_proxy, upstream) -> FleetProxy:
    """A FleetProxy in front of the fake SuperLink, with zeroed counters."""
    _shared_proxy.app.state.forwarded.clear()
    _shared_proxy.app.state.refused.clear()
    return _shared_proxy


def _raw_request(port: int, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send one HTTP/1.1 request byte-for-byte (no client-side URL normalization)."""
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/protobuf\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


# --------------------------------------------------------------------------- is_allowed


def test_allow_list_matches_flowers_fleet_router():
    from flwr.superlink.routers.fleet.router import router

    served = {(m, r.path) for r in router.routes for m in r.methods}
    assert served == {("POST", p) for p in FLEET_PATHS}
    assert len(FLEET_ENDPOINTS) == len(FLEET_PATHS) == 12


def test_allow_list_covers_every_path_the_supernode_calls():
    from flwr.supernode import fleet_http_client

    called = set(re.findall(r'"(/v1/[a-z0-9/-]+)"', inspect.getsource(fleet_http_client)))
    assert called and called <= FLEET_PATHS


@pytest.mark.parametrize("path", sorted(FLEET_PATHS))
def test_is_allowed_fleet_paths(path):
    assert is_allowed("POST", path)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/list-nodes"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/runtime/acquire-task"),
        ("POST", "/v1/runtime/push-messages"),
        ("POST", "/v1/runtime/pull-object"),
        ("GET", "/health"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/"),
        ("POST", ""),
        ("POST", "/v1/fleet"),
        ("POST", "/v1/fleet/"),
        ("POST", "/v1/fleet/../control/start-run"),
        ("POST", "/v1/fleet/pull-messages/../../control/list-runs"),
        ("POST", "/v1/fleet/./pull-messages"),
        ("POST", "//v1/fleet/pull-messages"),
        ("POST", "/v1//fleet/pull-messages"),
        ("POST", "/v1/fleet//pull-messages"),
        ("POST", "/v1/fleet/%2e%2e/control/start-run"),
        ("POST", "/v1/fleet/%2E%2E/control/start-run"),
        ("POST", "/v1/fleet/pull%2dmessages"),
        ("POST", "/v1%2ffleet%2fpull-messages"),
        ("POST", "/v1/fleet/pull-messages/"),
        ("POST", "/v1/fleet/pull-messages?x=1"),
        ("POST", "/v1/fleet/pull-messages;x"),
        ("POST", "/v1/fleet/pull-messages%00"),
        ("POST", "/v1/fleet/pull-messages/x"),
        ("POST", "/V1/FLEET/PULL-MESSAGES"),
        ("POST", "http://127.0.0.1/v1/fleet/pull-messages"),
        ("GET", "/v1/fleet/pull-messages"),
        ("PUT", "/v1/fleet/push-messages"),
        ("post", "/v1/fleet/push-messages"),
        ("OPTIONS", "/v1/fleet/push-messages"),
    ],
)
def test_is_allowed_refuses(method, path):
    assert not is_allowed(method, path)


# --------------------------------------------------------------------------- fake upstream


def test_fleet_call_passes_with_body_and_headers(upstream, proxy):
    fake, up_port = upstream
    sent_headers = {
        "content-type": "application/protobuf",
        "accept": "application/protobuf",
        "flwr-public-key": "AAAAC3NzaC1lZDI1NTE5AAAA+/=",
        "flwr-timestamp": "2026-01-01T00:00:00+00:00",
        "flwr-signature": "c2lnbmF0dXJl+/==",
        "flwr-component-name": "SuperNode",
        "x-forwarded-for": "6.6.6.6",  # spoofed: must be replaced by the real peer
    }
    body = b"\x0a\x03abc\x00\xff" * 7
    r = httpx.post(
        f"http://127.0.0.1:{proxy.port}/v1/fleet/pull-messages", content=body, headers=sent_headers
    )
    assert r.status_code == 200
    assert r.content == body
    assert r.headers["content-type"] == "application/protobuf"
    assert r.headers["x-echo-path"] == "/v1/fleet/pull-messages"
    assert r.headers.get_list("x-multi") == ["one", "two"]

    [call] = fake.calls
    assert call["method"] == "POST" and call["path"] == "/v1/fleet/pull-messages"
    assert call["body"] == body
    got = fake.headers_of(call)
    for name, value in sent_headers.items():
        if name != "x-forwarded-for":
            assert got[name] == [value], name
    assert got["host"] == [f"127.0.0.1:{up_port}"]
    assert got["content-length"] == [str(len(body))]
    assert got["x-forwarded-for"] == ["127.0.0.1"]
    assert proxy.app.state.forwarded[("/v1/fleet/pull-messages", 200)] == 1


def test_large_binary_body_passes_intact(upstream, proxy):
    fake, _ = upstream
    body = os.urandom(5 * 1024 * 1024)
    r = httpx.post(
        f"http://127.0.0.1:{proxy.port}/v1/fleet/push-object",
        content=body,
        headers={"content-type": "application/protobuf"},
        timeout=30,
    )
    assert r.status_code == 200
    assert hashlib.sha256(r.content).digest() == hashlib.sha256(body).digest()
    assert hashlib.sha256(fake.calls[0]["body"]).digest() == hashlib.sha256(body).digest()


def test_streamed_response_and_chunked_request(upstream, proxy):
    fake, _ = upstream
    body = os.urandom(300_000)

    def gen():  # no content-length: the client sends chunked
        for i in range(0, len(body), 50_000):
            yield body[i : i + 50_000]

    r = httpx.post(f"http://127.0.0.1:{proxy.port}/v1/fleet/pull-object", content=gen())
    assert r.status_code == 200
    assert r.content == body
    assert fake.calls[0]["body"] == body
    assert fake.headers_of(fake.calls[0]).get("transfer-encoding") is None


def test_upstream_error_status_and_body_pass_through(upstream, proxy):
    r = httpx.post(f"http://127.0.0.1:{proxy.port}/v1/fleet/get-fab", content=b"")
    assert r.status_code == 401
    assert r.json() == {"detail": "Invalid SuperNode authentication"}
    assert proxy.app.state.forwarded[("/v1/fleet/get-fab", 401)] == 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/runtime/acquire-task"),
        ("GET", "/health"),
        ("GET", "/docs"),
        ("GET", "/v1/fleet/pull-messages"),
        ("POST", "/v1/fleet/pull-messages/"),
        ("POST", "/v1/fleet/pull-messages?a=b"),
    ],
)
def test_everything_else_is_refused_and_logged(upstream, proxy, caplog, method, path):
    fake, _ = upstream
    with caplog.at_level(logging.WARNING, logger="pollen.deploy.fleet_proxy"):
        r = httpx.request(
            method,
            f"http://127.0.0.1:{proxy.port}{path}",
            headers={"content-type": "application/protobuf"},
            content=b"" if method == "POST" else None,
        )
    assert r.status_code == 403
    assert r.text == REFUSAL_TEXT
    assert fake.calls == []
    assert not proxy.app.state.forwarded
    [record] = [rec for rec in caplog.records if rec.name == "pollen.deploy.fleet_proxy"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert method in message and path.split("?")[0] in message and "127.0.0.1:" in message


@pytest.mark.parametrize(
    "target",
    [
        "/v1/fleet/../control/start-run",
        "/v1/fleet/pull-messages/../../control/list-runs",
        "/v1/fleet/%2e%2e/control/start-run",
        "/v1/fleet/%2E%2E/control/list-runs",
        "/v1/fleet/pull-messages/%2e%2e/%2e%2e/control/list-runs",
        "/v1%2ffleet%2fpull-messages",
        "/v1/fleet/pull%2dmessages",
        "//v1/fleet/pull-messages",
        "/v1//fleet/pull-messages",
        "/v1/fleet/./pull-messages",
        "/v1/fleet/pull-messages/",
        "/v1/fleet/pull-messages;x",
        "/v1/fleet/pull-messages?x=1",
        "http://127.0.0.1/v1/control/list-runs",
        "*",
    ],
)
def test_path_tricks_over_the_wire_never_reach_upstream(upstream, proxy, target):
    fake, _ = upstream
    status, body = _raw_request(proxy.port, "POST", target)
    assert status in (400, 403), (status, body)  # 400: uvicorn rejected it before the app
    assert fake.calls == []
    assert not proxy.app.state.forwarded


def test_path_tricks_with_the_h11_parser(upstream):
    # uvicorn picks httptools when installed; the pure-Python h11 parser fills raw_path
    # differently (fragments and absolute-form targets stay in it). Both must be safe.
    fake, up_port = upstream
    app = create_app(f"http://127.0.0.1:{up_port}")
    tricks = [
        "/v1/fleet/../control/start-run",
        "/v1/fleet/%2e%2e/control/start-run",
        "/v1/fleet/pull-messages/%2e%2e/%2e%2e/control/list-runs",
        "//v1/fleet/pull-messages",
        "/v1/fleet/pull-messages?x=1",
        "http://127.0.0.1/v1/control/list-runs",
    ]
    with _serve(app, http="h11", lifespan="on") as port:
        for target in tricks:
            status, _ = _raw_request(port, "POST", target)
            assert status in (400, 403), target
        assert fake.calls == []
        status, _ = _raw_request(port, "POST", "/v1/fleet/pull-messages", b"ok")
        assert status == 200
    assert [c["path"] for c in fake.calls] == ["/v1/fleet/pull-messages"]


@pytest.mark.parametrize(
    "target", ["/v1/fleet/pull-messages#../../control/list-runs", "http://evil/v1/fleet/get-run"]
)
def test_fragments_and_absolute_form_reach_only_the_canonical_path(upstream, proxy, target):
    # uvicorn drops the fragment and the scheme/host; what is left must be an exact Fleet path,
    # and upstream receives that fixed path on its own address.
    fake, _ = upstream
    status, _ = _raw_request(proxy.port, "POST", target)
    assert status == 200
    [call] = fake.calls
    assert call["path"] in FLEET_PATHS
    assert call["path"] == target.split("#")[0].removeprefix("http://evil")


def test_upstream_down_gives_502():
    with FleetProxy("127.0.0.1", 0, f"http://127.0.0.1:{_free_port()}") as p:
        r = httpx.post(f"http://127.0.0.1:{p.port}/v1/fleet/pull-messages", content=b"x")
    assert r.status_code == 502
    assert "not reachable" in r.text


def test_body_limit_gives_413(upstream):
    fake, up_port = upstream
    app = create_app(f"http://127.0.0.1:{up_port}", max_body_bytes=1024)
    with _serve(app, lifespan="on") as port:
        url = f"http://127.0.0.1:{port}/v1/fleet/push-object"
        assert httpx.post(url, content=b"x" * 1024).status_code == 200
        assert httpx.post(url, content=b"x" * 1025).status_code == 413  # by content-length
        r = httpx.post(url, content=iter([b"x" * 700, b"x" * 700]))  # chunked, no length
        assert r.status_code == 413
    assert len(fake.calls) == 1


# --------------------------------------------------------------------------- limits (issue 27)
# A stranger on the public port must not be able to make the relay buffer, hold or wait
# without bound. Each test below failed on the proxy before the limits existed.

_MIB = 1024 * 1024


def _client_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def _signed(key, *, age: float = 0.0) -> dict[str, str]:
    """The headers Flower's SuperNode signs every Fleet call with (NodeAuthHttpInterceptor)."""
    import base64

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    stamp = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=age)).isoformat()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signature = key.sign(stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    return {
        "flwr-public-key": base64.b64encode(pem).decode(),
        "flwr-timestamp": stamp,
        "flwr-signature": base64.b64encode(signature).decode(),
    }


@contextlib.contextmanager
def _limited_proxy(up_port: int, **kwargs) -> Iterator[FleetProxy]:
    with FleetProxy("127.0.0.1", 0, f"http://127.0.0.1:{up_port}", **kwargs) as p:
        yield p


def _head(
    port: int, path: str, length: int | None, extra: dict[str, str] | None = None
) -> socket.socket:
    """Open a connection and send a request's line and headers only: no body byte."""
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines.append("Content-Type: application/protobuf")
    if length is None:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    return s


def _trickled_body_status(proxy, length: int) -> int:
    """Send a push-object head of ``length`` bytes, then one body byte every 0.05 s.

    Returns the status the proxy answers within 4 s (at most 100 bytes are sent).
    """
    started = time.monotonic()
    with _head(proxy.port, "/v1/fleet/push-object", length) as s:
        for _ in range(100):  # one byte every 0.05 s: 5 s at most
            if select.select([s], [], [], 0.05)[0]:
                break
            s.sendall(b"x")
        status = _status(s, timeout=5)
    assert time.monotonic() - started < 4
    return status


def _status(s: socket.socket, timeout: float) -> int | None:
    """The status of the answer on ``s`` within ``timeout`` s (None: closed or reset)."""
    s.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return None
            data += chunk
    except ConnectionResetError:
        return None
    return int(data.split(b" ", 2)[1])


def _budget_used(proxy: FleetProxy, expected: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while proxy.app.state.budget.used != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return proxy.app.state.budget.used


def test_default_body_cap_is_far_below_512_mib():
    from pollen.deploy.fleet_limits import FleetLimits

    limits = FleetLimits.from_env({})
    assert limits.max_body_bytes == 64 * _MIB
    assert limits.max_body_bytes <= limits.max_inflight_bytes <= 256 * _MIB
    # Flower moves arrays as objects of at most this size: the cap leaves 12x margin.
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

    assert FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE * 12 <= limits.max_body_bytes


def test_limits_from_the_environment():
    from pollen.deploy.fleet_limits import FleetLimits

    env = {"POLLEN_FLEET_MAX_BODY_MIB": "16", "POLLEN_FLEET_MAX_INFLIGHT_MIB": "48"}
    limits = FleetLimits.from_env(env)
    assert (limits.max_body_bytes, limits.max_inflight_bytes) == (16 * _MIB, 48 * _MIB)
    assert FleetLimits.from_env({"POLLEN_FLEET_MAX_BODY_MIB": "512"}).max_inflight_bytes == (
        512 * _MIB
    )
    for bad in ({"POLLEN_FLEET_MAX_BODY_MIB": "lots"}, {"POLLEN_FLEET_MAX_INFLIGHT_MIB": "0"}):
        with pytest.raises(PollenError, match="positive whole number of MiB"):
            FleetLimits.from_env(bad)
    with pytest.raises(PollenError, match="at least as large"):
        FleetLimits.from_env(env | {"POLLEN_FLEET_MAX_INFLIGHT_MIB": "8"})


def test_signed_timestamp_window_is_flowers():
    from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE

    from pollen.deploy import fleet_keys

    assert fleet_keys._SIGNED_MAX_AGE == TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE
    assert fleet_keys._SIGNED_MAX_AHEAD == SYSTEM_TIME_TOLERANCE


@pytest.mark.timeout(60)
def test_oversized_content_length_is_refused_before_the_body(upstream, proxy):
    fake, _ = upstream
    with _head(proxy.port, "/v1/fleet/push-object", 100 * _MIB) as s:
        assert _status(s, timeout=5) == 413  # at once: not one body byte was sent
    assert fake.calls == []
    assert proxy.app.state.limited["too large"] >= 1
    assert proxy.app.state.budget.used == 0


@pytest.mark.timeout(60)
def test_oversized_chunked_body_is_cut_off(upstream, proxy):
    fake, _ = upstream
    chunk = b"x" * _MIB
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    refused_before = getattr(proxy.app.state, "limited", {}).get("too large", 0)
    with _head(proxy.port, "/v1/fleet/push-object", None) as s:
        try:
            while sent < 96 * _MIB:  # bounded: 1.5x the cap
                s.sendall(frame)
                sent += len(chunk)
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy answered 413 and closed
        status = _status(s, timeout=10)
    assert status in (413, None)  # None: the close's reset overtook the answer
    assert sent < 96 * _MIB, "the proxy read the whole oversized body"
    assert fake.calls == []
    assert proxy.app.state.limited["too large"] == refused_before + 1
    assert _budget_used(proxy, 0) == 0


def _asgi_post(
    app, headers: dict[str, str], length: int, path: str = "/v1/fleet/push-object"
) -> tuple[list[int], list[str]]:
    """Call the app in-process; record the answer's status and every receive() it made."""
    import asyncio

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        + [(b"content-length", str(length).encode())],
        "client": ("203.0.113.9", 40000),
        "server": ("127.0.0.1", 8080),
    }
    received: list[str] = []
    statuses: list[int] = []

    async def receive():
        received.append("body")  # the test's body source: any call means the body was read
        return {"type": "http.request", "body": b"x" * length, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def run():
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    asyncio.run(run())
    return statuses, received


@pytest.mark.timeout(60)
def test_unauthorized_key_is_refused_before_the_body_is_read(upstream, caplog):
    fake, up_port = upstream
    member, stranger = _client_key(), _client_key()
    app = create_app(f"http://127.0.0.1:{up_port}", authorized_keys=[member.public_key()])
    forged = _signed(stranger) | {"flwr-public-key": _signed(member)["flwr-public-key"]}
    refused = {
        "a stranger's key": _signed(stranger),
        "no key": {},
        "a member's key, signed by a stranger": forged,
        "a member's key, stale signature": _signed(member, age=3600),
        "a member's key, no signature": {
            k: v for k, v in _signed(member).items() if k != "flwr-signature"
        },
    }
    with caplog.at_level(logging.WARNING, logger="pollen.deploy.fleet_proxy"):
        for what, headers in refused.items():
            statuses, received = _asgi_post(app, headers, 10 * _MIB)
            assert statuses == [401], what
            assert received == [], f"{what}: the body was read before the key was checked"
        # A stranger joining gets Flower's own refusal ("Failed to activate SuperNode").
        for path, status in (("/v1/fleet/activate-node", 412), ("/v1/fleet/register-node", 412)):
            statuses, received = _asgi_post(app, _signed(stranger), 10 * _MIB, path)
            assert statuses == [status] and received == [], path
    assert fake.calls == []
    assert app.state.limited["unauthorized"] == len(refused) + 2
    assert app.state.budget.used == 0
    assert "not among the server's authorized clients" in caplog.text
    assert "203.0.113.9" in caplog.text
    # The member, signing as Flower does, passes.
    statuses, received = _asgi_post(app, _signed(member), 1000)
    assert statuses == [200] and received == ["body"]
    assert [c["path"] for c in fake.calls] == ["/v1/fleet/push-object"]


def test_refusals_are_flowers_own_answers():
    """What the proxy answers a refused key is byte for byte what Flower 1.42 answers."""
    import asyncio

    from flwr.supercore.error import ApiErrorCode, FlowerError, http_error_translator
    from flwr.supernode.fleet_http_connection import FlowerError as ClientSideError

    from pollen.deploy import fleet_keys

    answers = fleet_keys._flower_refusals()
    codes = {
        "/v1/fleet/activate-node": ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED,
        "/v1/fleet/register-node": ApiErrorCode.FLEET_SUPERNODE_REGISTRATION_DISABLED,
    }
    for path, code in codes.items():

        async def call_next(_request, code=code):
            raise FlowerError(code, "refused")

        scope = {"type": "http", "method": "POST", "path": path, "headers": []}
        scope |= {"query_string": b"", "scheme": "http", "server": ("127.0.0.1", 1)}
        response = asyncio.run(http_error_translator(Request(scope), call_next))
        assert (response.status_code, bytes(response.body)) == answers[path], path
    assert (
        "Failed to activate SuperNode"
        in ClientSideError.from_json(answers["/v1/fleet/activate-node"][1].decode()).message
    )
    assert json.loads(answers[""][1]) == {"detail": "Invalid SuperNode authentication"}


@pytest.mark.timeout(60)
def test_unauthorized_key_over_the_wire_gets_401_without_sending_a_body(upstream):
    fake, up_port = upstream
    member, stranger = _client_key(), _client_key()
    with _limited_proxy(up_port, authorized_keys=[member.public_key()]) as p:
        with _head(p.port, "/v1/fleet/push-object", 10 * _MIB, _signed(stranger)) as s:
            assert _status(s, timeout=5) == 401
    assert fake.calls == []


@pytest.mark.timeout(60)
def test_concurrent_bodies_beyond_the_inflight_limit_get_503(upstream):
    from pollen.deploy.fleet_limits import FleetLimits

    fake, up_port = upstream
    limits = FleetLimits(max_body_bytes=_MIB, max_inflight_bytes=2 * _MIB, queue_timeout=0.5)
    with _limited_proxy(up_port, limits=limits) as p:
        holders = [_head(p.port, "/v1/fleet/push-object", _MIB) for _ in range(2)]
        try:
            for s in holders:
                s.sendall(b"x" * (_MIB // 2))  # half a body each: both hold their room
            assert _budget_used(p, 2 * _MIB) == 2 * _MIB
            started = time.monotonic()
            with _head(p.port, "/v1/fleet/push-object", _MIB) as third:
                assert _status(third, timeout=5) == 503
            assert time.monotonic() - started < 3  # waited its bounded time, no longer
            assert p.app.state.limited["busy"] == 1
            for s in holders:  # the two honest senders finish and pass
                s.sendall(b"x" * (_MIB // 2))
                assert _status(s, timeout=10) == 200
        finally:
            for s in holders:
                s.close()
        assert _budget_used(p, 0) == 0
    assert len(fake.calls) == 2


@pytest.mark.timeout(60)
def test_a_request_waits_for_room_then_passes(upstream):
    from pollen.deploy.fleet_limits import FleetLimits

    fake, up_port = upstream
    limits = FleetLimits(max_body_bytes=_MIB, max_inflight_bytes=_MIB, queue_timeout=10)
    with _limited_proxy(up_port, limits=limits) as p:
        with _head(p.port, "/v1/fleet/push-object", _MIB) as first:
            first.sendall(b"x" * 1000)
            assert _budget_used(p, _MIB) == _MIB
            with _head(p.port, "/v1/fleet/push-object", 1000) as second:
                second.sendall(b"y" * 1000)
                time.sleep(0.3)
                first.sendall(b"x" * (_MIB - 1000))
                assert _status(first, timeout=10) == 200
                assert _status(second, timeout=10) == 200
        assert _budget_used(p, 0) == 0
    assert sorted(len(c["body"]) for c in fake.calls) == [1000, _MIB]


@pytest.mark.timeout(60)
def test_trickling_body_times_out(upstream):

    from pollen.deploy.fleet_limits import FleetLimits

    fake, up_port = upstream
    with _limited_proxy(up_port, limits=FleetLimits(body_timeout=1.0)) as p:
        assert _trickled_body_status(p, 1000) == 408
        assert p.app.state.limited["slow body"] == 1
        assert _budget_used(p, 0) == 0
    assert fake.calls == []


@pytest.mark.timeout(60)
def test_slow_or_idle_request_head_is_cut_off(upstream):
    from pollen.deploy.fleet_limits import FleetLimits

    fake, up_port = upstream
    with _limited_proxy(up_port, limits=FleetLimits(head_timeout=0.5)) as p:
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as idle:
            with socket.create_connection(("127.0.0.1", p.port), timeout=5) as slow:
                slow.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\n")
                assert slow.recv(100) == b""  # closed by the proxy, not the 5 s timeout
            assert idle.recv(100) == b""
    assert fake.calls == []


@pytest.mark.timeout(60)
def test_oversized_request_head_is_refused(upstream, proxy):
    fake, _ = upstream
    pad = {f"x-pad-{i}": "p" * 1000 for i in range(100)}  # 100 KB of headers
    with _head(proxy.port, "/v1/fleet/push-object", 2, pad) as s:
        s.sendall(b"ok")
        assert _status(s, timeout=5) in (400, None)
    assert fake.calls == []


@pytest.mark.timeout(60)
def test_honest_signed_client_pushes_and_pulls_large_bodies(upstream):
    fake, up_port = upstream
    member = _client_key()
    # A whole Flower chunk as one object, and MobileNetV2's packed weights sent whole.
    bodies = {"push-object": os.urandom(5 * _MIB + 4096), "pull-object": os.urandom(9 * _MIB)}
    with _limited_proxy(up_port, authorized_keys=[member.public_key()]) as p:
        url = f"http://127.0.0.1:{p.port}/v1/fleet"
        headers = {"content-type": "application/protobuf"}
        with httpx.Client(timeout=30) as client:
            for path, body in bodies.items():
                r = client.post(f"{url}/{path}", content=body, headers=headers | _signed(member))
                assert r.status_code == 200, path
                assert hashlib.sha256(r.content).digest() == hashlib.sha256(body).digest()
        assert not p.app.state.limited
        assert _budget_used(p, 0) == 0
    assert [len(c["body"]) for c in fake.calls] == [len(b) for b in bodies.values()]


# --------------------------------------------------------------------------- review of issue 27
# Each test below failed on the relay of commit 86b8b21.


def _send_until_cut(s: socket.socket, piece: bytes, total: int) -> int:
    """Send ``piece`` until ``total`` bytes went or the peer cut us off; the bytes sent."""
    sent = 0
    try:
        while sent < total:
            s.sendall(piece)
            sent += len(piece)
            if sent % (16 * 1024) == 0:
                time.sleep(0.002)  # let the proxy read what arrived
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


@pytest.mark.timeout(60)
def test_a_header_streamed_in_pieces_is_cut_at_the_head_cap(upstream, proxy):
    # httptools hands a header over only once its value is complete: counting parsed
    # headers let one connection stream a single header for the whole head timeout.
    fake, _ = upstream
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        sent = _send_until_cut(s, b"p" * 1024, 4 * _MIB)
        assert sent < _MIB, f"the proxy took {sent} bytes of one header (cap 64 KiB)"
        assert _status(s, timeout=5) in (431, None)
    assert fake.calls == []


@pytest.mark.timeout(60)
def test_a_long_request_line_in_pieces_is_cut_at_the_head_cap(upstream, proxy):
    fake, _ = upstream
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"POST /v1/fleet/pull-messages?")
        assert _send_until_cut(s, b"q" * 1024, 4 * _MIB) < _MIB
    assert fake.calls == []


@pytest.mark.timeout(60)
def test_keep_alive_requests_with_large_bodies_are_not_taken_for_heads(upstream, proxy):
    fake, _ = upstream
    body = os.urandom(3 * _MIB)
    with httpx.Client(timeout=30) as client:  # one connection: bodies end inside big reads
        for _ in range(3):
            r = client.post(f"http://127.0.0.1:{proxy.port}/v1/fleet/push-object", content=body)
            assert r.status_code == 200
    assert len(fake.calls) == 3


@pytest.mark.timeout(60)
def test_trickling_bodies_do_not_hold_room_they_have_not_sent(upstream):
    # Four callers declare 64 MiB each and trickle: they once booked the whole 256 MiB
    # budget up front, and an honest fifth caller got 503.
    from pollen.deploy.fleet_limits import FleetLimits

    fake, up_port = upstream
    limits = FleetLimits(queue_timeout=3.0, rate_grace=60.0)  # the pace rule stays out
    with _limited_proxy(up_port, limits=limits) as p:
        holders = [_head(p.port, "/v1/fleet/pull-object", 64 * _MIB) for _ in range(4)]
        try:
            for s in holders:
                s.sendall(b"x" * 1024)
            time.sleep(0.3)
            assert p.app.state.budget.used <= 4 * limits.max_object_bytes
            body = os.urandom(8 * _MIB)
            r = httpx.post(
                f"http://127.0.0.1:{p.port}/v1/fleet/pull-object", content=body, timeout=30
            )
            assert r.status_code == 200
            assert hashlib.sha256(r.content).digest() == hashlib.sha256(body).digest()
        finally:
            for s in holders:
                s.close()
        assert _budget_used(p, 0) == 0
        assert not p.app.state.limited["busy"]
    assert [len(c["body"]) for c in fake.calls] == [8 * _MIB]


@pytest.mark.timeout(60)
def test_a_body_below_the_minimum_pace_is_cut_before_the_body_timeout(upstream):

    from pollen.deploy.fleet_limits import FleetLimits

    fake, up_port = upstream
    limits = FleetLimits(rate_grace=0.5, min_rate=64 * 1024)  # body_timeout stays 120 s
    with _limited_proxy(up_port, limits=limits) as p:
        assert _trickled_body_status(p, 100_000) == 408
        assert p.app.state.limited["slow body"] == 1
        assert _budget_used(p, 0) == 0
    assert fake.calls == []


@pytest.mark.timeout(60)
def test_an_answer_the_client_never_reads_is_abandoned(upstream):
    from pollen.deploy.fleet_limits import FleetLimits

    fake, up_port = upstream
    size = 48 * _MIB  # far beyond what the loopback socket buffers hold
    limits = FleetLimits(rate_grace=0.5, min_rate=64 * 1024)
    with _limited_proxy(up_port, limits=limits) as p:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        with s:
            s.connect(("127.0.0.1", p.port))
            call = f"repeat:{size}".encode()
            s.sendall(
                b"POST /v1/fleet/pull-object HTTP/1.1\r\nHost: x\r\n"
                + f"Content-Length: {len(call)}\r\n\r\n".encode()
                + call
            )
            deadline = time.monotonic() + 10
            while not p.app.state.limited["slow reader"] and time.monotonic() < deadline:
                time.sleep(0.05)  # never read: the proxy must give up by itself
            assert p.app.state.limited["slow reader"] == 1
            received = 0
            s.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(1 << 20):  # what was buffered, then the close
                    received += len(chunk)
            assert received < size
    assert len(fake.calls) == 1


@pytest.mark.timeout(60)
def test_push_object_beyond_one_flower_chunk_gets_413(upstream, proxy):
    from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.proto.node_pb2 import Node

    fake, _ = upstream
    refused_before = proxy.app.state.limited["too large"]
    cap = proxy.app.state.limits.max_object_bytes
    assert cap == 6 * _MIB
    # The largest object Flower sends (a whole chunk, its header, the call's fields) fits.
    largest = PushObjectRequest(
        node=Node(node_id=2**63 - 1),
        run_id=2**63 - 1,
        object_id="f" * 64,
        object_content=b"x" * (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE + 1024),
        session_id="s" * 64,
    )
    assert largest.ByteSize() < cap
    with _head(proxy.port, "/v1/fleet/push-object", cap + 1) as s:
        assert _status(s, timeout=5) == 413  # at once, from the declared length
    r = httpx.post(  # chunked: cut when it passes the cap
        f"http://127.0.0.1:{proxy.port}/v1/fleet/push-object",
        content=iter([b"x" * _MIB] * 7),
        timeout=30,
    )
    assert r.status_code == 413
    # Other calls keep the general cap.
    with _head(proxy.port, "/v1/fleet/pull-object", cap + 1) as s:
        s.sendall(b"x" * (cap + 1))
        assert _status(s, timeout=10) == 200
    assert [c["path"] for c in fake.calls] == ["/v1/fleet/pull-object"]
    assert proxy.app.state.limited["too large"] == refused_before + 2


def _push_messages(children: int) -> bytes:
    """A push-messages body whose one message declares ``children`` + 1 objects."""
    from flwr.proto.fleet_pb2 import PushMessagesRequest
    from flwr.proto.message_pb2 import Message, Metadata, ObjectTree

    leaves = [ObjectTree(object_id=f"{i:064x}") for i in range(children)]
    tree = ObjectTree(object_id="e" * 64, children=leaves)
    message = Message(metadata=Metadata(message_id="e" * 64))
    request = PushMessagesRequest(messages_list=[message], message_object_trees=[tree])
    return request.SerializeToString()


@pytest.mark.timeout(60)
def test_push_messages_declaring_too_many_objects_is_refused(upstream, proxy, caplog):
    fake, _ = upstream
    refused_before = proxy.app.state.limited["too many objects"]
    url = f"http://127.0.0.1:{proxy.port}/v1/fleet/push-messages"
    bound = proxy.app.state.limits.max_objects
    assert bound == 512
    assert httpx.post(url, content=_push_messages(bound - 1)).status_code == 200
    with caplog.at_level(logging.WARNING, logger="pollen.deploy.fleet_proxy"):
        r = httpx.post(url, content=_push_messages(bound))  # one over
        assert r.status_code == 413
        assert "more objects" in r.text
        assert httpx.post(url, content=_push_messages(200_000)).status_code == 413
    assert "declares more than 512 objects" in caplog.text
    assert httpx.post(url, content=b"\xff\xff\xff").status_code == 400  # no such call
    assert len(fake.calls) == 1
    assert proxy.app.state.limited["too many objects"] == refused_before + 2


def test_count_declared_objects_is_bounded():
    from pollen.deploy.fleet_limits import count_declared_objects

    assert count_declared_objects(_push_messages(3), 10) == 4
    assert count_declared_objects(b"", 10) == 0  # no tree: Flower refuses it itself
    assert count_declared_objects(_push_messages(10**5), 10) == 11
    with pytest.raises(ValueError):
        count_declared_objects(b"\x0a\xff", 10)


def test_object_limits_from_the_environment():
    from pollen.deploy.fleet_limits import FleetLimits

    env = {
        "POLLEN_FLEET_MAX_OBJECT_MIB": "8",
        "POLLEN_FLEET_MAX_OBJECTS": "64",
        "POLLEN_FLEET_MIN_RATE_KIB": "16",
    }
    limits = FleetLimits.from_env(env)
    assert (limits.max_object_bytes, limits.max_objects, limits.min_rate) == (
        8 * _MIB,
        64,
        16 * 1024,
    )
    assert limits.body_cap("/v1/fleet/push-object") == 8 * _MIB
    assert limits.body_cap("/v1/fleet/pull-object") == 64 * _MIB
    for name in env:
        with pytest.raises(PollenError, match="positive whole number"):
            FleetLimits.from_env({name: "0"})


def test_server_front_passes_the_authorized_keys(tmp_path):
    from pollen.deploy.certs import create_certs
    from pollen.deploy.server import _front
    from pollen.deploy.tls import load_client_certs, load_server_certs

    bundle = create_certs(tmp_path / "certs", ["localhost"], clients=1)
    server = load_server_certs(bundle.out / "server")
    client = load_client_certs(bundle.out / "clients" / "client-0")
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(client.key.read_bytes(), password=None)
    proxy, _, _ = _front("127.0.0.1", 0, _free_port(), tmp_path / "home", server)
    statuses, _ = _asgi_post(proxy.app, _signed(_client_key()), 10)
    assert statuses == [401]
    statuses, _ = _asgi_post(proxy.app, _signed(key), 10)
    assert statuses == [502]  # past the gate; nothing listens upstream


def test_port_in_use_raises_pollen_error(proxy):
    other = FleetProxy("127.0.0.1", proxy.port, "http://127.0.0.1:1")
    with pytest.raises(PollenError, match=r"127\.0\.0\.1:\d+ is already in use"):
        other.start()
    other.stop()  # harmless when never started


def test_unbindable_address_raises_pollen_error():
    with pytest.raises(PollenError, match="cannot listen"):
        FleetProxy("192.0.2.1", 0, "http://127.0.0.1:1").start()  # TEST-NET: not ours


def test_stop_frees_the_port_and_start_reports_port(upstream):
    _, up_port = upstream
    p = FleetProxy("127.0.0.1", 0, f"http://127.0.0.1:{up_port}")
    assert p.port == 0
    p.start()
    port = p.port
    assert port != 0
    p.stop()
    p.stop()
    with FleetProxy("127.0.0.1", port, f"http://127.0.0.1:{up_port}") as again:
        assert again.port == port


def _self_signed(tmp_path: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pollen-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(certfile), str(keyfile)


def test_tls(upstream, tmp_path):
    fake, up_port = upstream
    certfile, keyfile = _self_signed(tmp_path)
    upstream_url = f"http://127.0.0.1:{up_port}"
    with FleetProxy("127.0.0.1", 0, upstream_url, certfile=certfile, keyfile=keyfile) as p:
        import ssl

        verify = ssl.create_default_context(cafile=certfile)
        r = httpx.post(f"https://127.0.0.1:{p.port}/v1/fleet/get-run", content=b"t", verify=verify)
        assert r.status_code == 200 and r.content == b"t"
        refused = httpx.post(f"https://127.0.0.1:{p.port}/v1/control/list-runs", verify=verify)
        assert refused.status_code == 403
    assert [c["path"] for c in fake.calls] == ["/v1/fleet/get-run"]


def test_bad_tls_files_raise_pollen_error(tmp_path):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(PollenError, match="TLS certificate"):
        FleetProxy("127.0.0.1", 0, "http://127.0.0.1:1", certfile=missing, keyfile=missing).start()


# --------------------------------------------------------------------------- real Flower

_FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def _flwr_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@contextlib.contextmanager
def _spawn(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Start a process in its own process group; kill the whole group afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    pytest.fail(f"{what} (exit code {proc.poll()}); log tail:\n{tail}")


def _protobuf_post(url: str) -> httpx.Response:
    return httpx.post(url, content=b"", headers={"content-type": "application/protobuf"})


@pytest.fixture
def superlink(tmp_path) -> Iterator[int]:
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, **_FLWR_ENV, "FLWR_HOME": str(home)}
    port = _free_port()
    args = [
        _flwr_bin("flower-superlink"),
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--isolation",
        "process",  # no SuperExec child: nothing runs apps in this test
        "--disable-runtime-dependency-installation",
    ]
    log = tmp_path / "superlink.log"
    with _spawn(args, env, log) as proc:

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(healthy, 30, "flower-superlink did not come up", proc, log)
        yield port


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_real_superlink_hole_is_closed_and_supernode_still_connects(superlink, tmp_path):
    from flwr.proto.control_pb2 import ListNodesResponse

    direct = f"http://127.0.0.1:{superlink}"
    # The hole: the SuperLink's own port runs the Control API for anyone who reaches it.
    assert _protobuf_post(f"{direct}/v1/control/list-runs").status_code == 200

    with FleetProxy("127.0.0.1", 0, direct) as proxy:
        public = f"http://127.0.0.1:{proxy.port}"
        # A stranger on the public port is refused.
        assert _protobuf_post(f"{public}/v1/control/list-runs").status_code == 403
        assert _protobuf_post(f"{public}/v1/control/start-run").status_code == 403
        assert httpx.get(f"{public}/health").status_code == 403

        # A real SuperNode, dialing the public port, registers and activates.
        home = tmp_path / "supernode-home"
        home.mkdir()
        env = {**os.environ, **_FLWR_ENV, "FLWR_HOME": str(home)}
        args = [
            _flwr_bin("flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{proxy.port}",
            "--node-config",
            "partition-id=0 num-partitions=1",
            "--isolation",
            "process",
            "--host",
            "127.0.0.1",
            "--port",
            str(_free_port()),  # the SuperNode's own Runtime API
        ]
        log = tmp_path / "supernode.log"
        forwarded = proxy.app.state.forwarded
        with _spawn(args, env, log) as node:
            _wait_for(
                lambda: (
                    forwarded[("/v1/fleet/activate-node", 200)] >= 1
                    and forwarded[("/v1/fleet/pull-messages", 200)] >= 1
                ),
                30,
                "the SuperNode did not activate through the proxy",
                node,
                log,
            )
            assert forwarded[("/v1/fleet/register-node", 200)] == 1
            # The SuperNode needed nothing but the Fleet API: only the stranger was refused.
            assert sum(proxy.app.state.refused.values()) == 3
            # The SuperLink (asked on its loopback port) knows the node.
            listed = _protobuf_post(f"{direct}/v1/control/list-nodes")
            assert listed.status_code == 200
            nodes = ListNodesResponse.FromString(listed.content).nodes_info
            assert len(nodes) == 1
        # On SIGTERM the SuperNode signs off through the proxy as well.
        assert forwarded[("/v1/fleet/deactivate-node", 200)] == 1
