"""The live status page of a run: ``pollen server --dashboard [HOST:PORT]``.

A small read-only web server beside the run, in the ``pollen`` process: the
page (``/``, with its script and style, package files in ``static/``) polls
``/api/status``, a JSON view of the run folder: ``status.json``,
``history.json`` and ``live.json`` (:mod:`pollen.server.live`), plus the run
config the command started with. The tests read the same endpoint.

Why the standard library's ``http.server``: the page needs four GET routes and
no framework; a thread per connection is bounded here (:data:`MAX_CONNECTIONS`,
:data:`REQUEST_TIMEOUT`), and the process already holds everything it serves.

What it cannot do, by construction: it only reads the run folder's three
files (never a path from the request), answers GET and HEAD only, and has no
route to Flower's Control API or the SuperLink. Bound to loopback it needs no
token but answers only requests whose ``Host`` names loopback (a web page
elsewhere cannot reach it through DNS rebinding); bound beyond loopback every
``/api/status`` request must carry the token (``Authorization: Bearer`` or
``?token=``): ``POLLEN_DASHBOARD_TOKEN`` or one generated and printed in the
page's URL.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pollen.deploy.runtime import split_address
from pollen.deploy.tls import is_loopback
from pollen.errors import PollenError
from pollen.server.history import read_history, read_status
from pollen.server.live import LIVE_FILE

#: ``--dashboard`` without an address.
DEFAULT_ADDRESS = "127.0.0.1:8090"
#: The environment variable that sets the token (not an option: argv is visible to `ps`).
TOKEN_ENV = "POLLEN_DASHBOARD_TOKEN"
#: Shortest token accepted from :data:`TOKEN_ENV`.
MIN_TOKEN_CHARS = 16
#: Connections served at once; more are closed at once.
MAX_CONNECTIONS = 16
#: Seconds a connection may take to send its request.
REQUEST_TIMEOUT = 10.0
#: Run-folder files larger than this are not read (bytes).
MAX_FILE_BYTES = 32 * 2**20
#: Most rounds in the curves (a longer run shows its last ones).
MAX_CURVE_ROUNDS = 2000
#: Seconds between the page's polls.
POLL_SECONDS = 1.0
#: Statuses after which nothing changes.
FINAL = ("completed", "failed", "interrupted")

_STATIC = {
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
}
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def _static(name: str) -> bytes:
    return resources.files("pollen.deploy").joinpath("static", name).read_bytes()


def _read_json(path: Path) -> Any:
    """``path``'s JSON, or None if it is missing, unreadable, too large or half-written."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class RunView:
    """The JSON of ``/api/status``: the run folder as the page shows it.

    Args:
        run_dir: The run folder.
        config: The run config the command started the run with.
    """

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        self.run_dir = run_dir
        self.config = dict(config)
        self._history_key: tuple[int, int] | None = None
        self._curves: list[dict[str, Any]] = []
        self._elapsed: float | None = None
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        """The run as it stands: status, round, clients, curves and config."""
        status = read_status(self.run_dir) or {"status": "starting"}
        live = _read_json(self.run_dir / LIVE_FILE) or {}
        curves, elapsed = self._history()
        num_rounds = int(self.config.get("num-rounds", 0) or 0)
        done = curves[-1]["round"] if curves else 0
        state = str(status.get("status"))
        current = int(live.get("round") or 0) if live else 0
        return {
            "status": state,
            "error": status.get("error"),
            "phase": "finished" if state in FINAL else live.get("phase", "starting"),
            "round": max(current, done),
            "num_rounds": num_rounds,
            "rounds_done": done,
            "elapsed_seconds": elapsed,
            "clients": list(live.get("clients", []))[:1000],
            "curves": curves,
            "config": self.config,
            "run_dir": str(self.run_dir),
            "now": time.time(),
            "poll_seconds": POLL_SECONDS,
        }

    def _history(self) -> tuple[list[dict[str, Any]], float | None]:
        """Per-round aggregate metrics, re-read only when ``history.json`` changed."""
        path = self.run_dir / "history.json"
        try:
            st = path.stat()
        except OSError:
            return [], None
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if key != self._history_key and st.st_size <= MAX_FILE_BYTES:
                try:
                    history = read_history(self.run_dir)
                except (OSError, ValueError, TypeError):
                    return self._curves, self._elapsed  # being replaced: the last good one
                self._curves = [_curve_point(r) for r in history.rounds[-MAX_CURVE_ROUNDS:]]
                self._elapsed = history.elapsed_seconds
                self._history_key = key
            return self._curves, self._elapsed


def _curve_point(record: Any) -> dict[str, Any]:
    point: dict[str, Any] = {"round": record.round, "seconds": _number(record.seconds)}
    for scope in ("train", "evaluate", "server"):
        values = getattr(record, scope)
        for metric in ("loss", "accuracy"):
            point[f"{scope}_{metric}"] = _number(values.get(metric))
    return point


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that serves at most :data:`MAX_CONNECTIONS` at once."""

    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = MAX_CONNECTIONS

    def __init__(self, address: tuple[str, int], dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:  # noqa: ANN001 - socketserver's
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: close, do not queue
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # noqa: ANN001
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    """GET and HEAD of the page, its two files and ``/api/status``; nothing else."""

    server: _Server
    timeout = REQUEST_TIMEOUT
    server_version = "pollen-dashboard"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        """Quiet: the page polls every second."""

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def _refuse_method(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only\n", "text/plain", {"Allow": "GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # noqa: N815

    def _answer(self, *, body: bool) -> None:
        dashboard = self.server.dashboard
        url = urlsplit(self.path)
        if not dashboard.host_allowed(self.headers.get("Host", "")):
            self._send(HTTPStatus.MISDIRECTED_REQUEST, b"wrong host\n", "text/plain", body=body)
        elif url.path in _STATIC:
            name, kind = _STATIC[url.path]
            self._send(HTTPStatus.OK, _static(name), kind, body=body)
        elif url.path == "/api/status":
            if not dashboard.authorized(self.headers.get("Authorization", ""), url.query):
                self._send(
                    HTTPStatus.UNAUTHORIZED,
                    b'{"error": "token required"}\n',
                    "application/json",
                    {"WWW-Authenticate": "Bearer"},
                    body=body,
                )
                return
            snapshot = dashboard.view.snapshot()
            data = json.dumps(snapshot).encode()
            self._send(HTTPStatus.OK, data, "application/json", body=body)
            if snapshot["status"] in FINAL:
                dashboard.final_served.set()
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", body=body)

    def _send(
        self,
        code: HTTPStatus,
        data: bytes,
        kind: str,
        extra: Mapping[str, str] | None = None,
        *,
        body: bool = True,
    ) -> None:
        self.send_response(code)
        for name, value in {**_HEADERS, **(extra or {}), "Content-Type": kind}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


class Dashboard:
    """The status page of the run in ``run_dir``, served on ``address`` while it runs.

    Args:
        run_dir: The run folder.
        config: The run config (shown on the page).
        address: ``HOST:PORT`` to serve on.
        token: Required on ``/api/status``; None: :data:`TOKEN_ENV`, else generated
            when ``address`` is not loopback, else none.

    Raises:
        PollenError: The address is malformed or taken, or the token too short.
    """

    def __init__(
        self,
        run_dir: Path,
        config: Mapping[str, Any],
        address: str = DEFAULT_ADDRESS,
        token: str | None = None,
    ) -> None:
        self.host, port = split_address(address)
        self.loopback = is_loopback(self.host)
        self.token = _token(
            token if token is not None else os.environ.get(TOKEN_ENV), self.loopback
        )
        self.view = RunView(run_dir, config)
        #: Set once a page (or any reader) got the run's final status.
        self.final_served = threading.Event()
        self.polled = False
        try:
            self.httpd = _Server((self.host, port), self)
        except OSError as err:
            raise PollenError(
                f"The dashboard cannot listen on {address}: {err.strerror or err}. Choose "
                "another port: --dashboard HOST:PORT."
            ) from err
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The page's address (with the token, when there is one)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if _unspecified(self.host):  # every interface: name one a browser can open
            host = socket.gethostname()
        query = f"?token={self.token}" if self.token else ""
        return f"http://{host}:{self.port}/{query}"

    def host_allowed(self, host_header: str) -> bool:
        """Whether a request's ``Host`` may be served (loopback without a token: loopback only)."""
        if self.token:
            return True
        name = host_header.rpartition(":")[0] if host_header.count(":") == 1 else host_header
        if host_header.startswith("["):
            name = host_header.partition("]")[0] + "]"
        return name.lower() in _LOOPBACK_HOSTS

    def authorized(self, authorization: str, query: str) -> bool:
        """Whether a request carries the token (always, when there is none)."""
        self.polled = True
        if not self.token:
            return True
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given:
            given = (parse_qs(query).get("token") or [""])[0]
        return hmac.compare_digest(given.strip().encode(), self.token.encode())

    def start(self) -> None:
        """Serve in a background thread; print where."""
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.1,), name="pollen-dashboard", daemon=True
        )
        self._thread.start()
        print(f"pollen: dashboard on {self.url}", flush=True)

    def stop(self, linger: float = 5.0) -> None:
        """Stop serving; a page that has polled first gets up to ``linger`` s to see the end."""
        if self.polled and not self.final_served.is_set():
            status = read_status(self.view.run_dir) or {}
            if status.get("status") in FINAL:
                self.final_served.wait(linger)
        if self._thread is not None:  # shutdown() waits for a serve_forever() that ran
            self.httpd.shutdown()
            self._thread.join(5)
        self.httpd.server_close()


def _unspecified(host: str) -> bool:
    """Whether ``host`` is the any-address (every interface: 0.0.0.0, ::)."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _token(token: str | None, loopback: bool) -> str | None:
    """The token to require: ``token``, or a generated one beyond loopback, or None."""
    if token:
        if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
            raise PollenError(
                f"{TOKEN_ENV} is too weak: use at least {MIN_TOKEN_CHARS} printable characters "
                "without spaces, e.g. the output of `python -c 'import secrets; "
                "print(secrets.token_urlsafe())'`."
            )
        return token
    return None if loopback else secrets.token_urlsafe(24)


@contextlib.contextmanager
def dashboard(
    address: str | None, run_dir: Path, config: Mapping[str, Any]
) -> Iterator[Dashboard | None]:
    """Serve the status page of ``run_dir`` on ``address`` for the ``with`` block (None: no page).

    Raises:
        PollenError: As :class:`Dashboard`.
    """
    if address is None:
        yield None
        return
    page = Dashboard(run_dir, config, address)
    page.start()
    try:
        yield page
    finally:
        try:
            page.stop()
        except Exception as err:  # noqa: BLE001 - never hide the run's own outcome
            print(f"pollen: warning: the dashboard did not stop cleanly: {err}", file=sys.stderr)
