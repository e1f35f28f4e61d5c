"""The status page's server: routes, the JSON it serves, its token and its bounds."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from pollen.cli.app import build_parser
from pollen.deploy import dashboard as dash
from pollen.deploy.dashboard import Dashboard
from pollen.deploy.processes import free_port
from pollen.errors import PollenError
from pollen.server.history import ClientRound, History, RoundRecord, write_history, write_status
from pollen.server.live import LiveStatus

CONFIG = {"num-rounds": 3, "model": "cnn", "strategy": "fedavg"}


def get(page: Dashboard, path: str, headers: dict | None = None, method: str = "GET"):
    conn = http.client.HTTPConnection("127.0.0.1", page.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        conn.close()


@pytest.fixture
def run_dir(tmp_path):
    """A run folder after round 1 of 3: status, history and live state."""
    run = tmp_path / "run"
    run.mkdir()
    write_status(run, "running")
    record = RoundRecord(
        round=1,
        seconds=2.5,
        train={"loss": 1.2, "accuracy": 0.4},
        evaluate={"loss": 1.0, "accuracy": 0.5},
        server={"loss": 0.9, "accuracy": 0.55},
        clients=[ClientRound(1, "alice"), ClientRound(2, "<b>bob</b>")],
    )
    write_history(run, History(config=CONFIG, rounds=[record], elapsed_seconds=3.0))
    live = LiveStatus(run, 3, {1: "alice", 2: "<b>bob</b>"})
    live.begin(History(config={}), 1)
    live.round_done(record)
    return run


@pytest.fixture
def page(run_dir):
    served = Dashboard(run_dir, CONFIG, f"127.0.0.1:{free_port()}")
    served.start()
    yield served
    served.stop(linger=0)


def test_status_json_is_the_run_folder(page, run_dir):
    code, headers, body = get(page, "/api/status")
    assert code == 200 and headers["Content-Type"] == "application/json"
    status = json.loads(body)
    assert status["status"] == "running"
    assert (status["round"], status["num_rounds"], status["rounds_done"]) == (2, 3, 1)
    assert status["config"] == CONFIG
    assert [c["name"] for c in status["clients"]] == ["<b>bob</b>", "alice"]
    assert [c["rounds"] for c in status["clients"]] == [1, 1]
    assert status["curves"] == [
        {
            "round": 1,
            "seconds": 2.5,
            "train_loss": 1.2,
            "train_accuracy": 0.4,
            "evaluate_loss": 1.0,
            "evaluate_accuracy": 0.5,
            "server_loss": 0.9,
            "server_accuracy": 0.55,
        }
    ]
    write_status(run_dir, "failed", "a client sent NaN")
    status = json.loads(get(page, "/api/status")[2])
    assert (status["status"], status["error"], status["phase"]) == (
        "failed",
        "a client sent NaN",
        "finished",
    )


def test_an_empty_run_folder_is_starting(tmp_path):
    view = dash.RunView(tmp_path, CONFIG)
    status = view.snapshot()
    assert (status["status"], status["round"], status["clients"], status["curves"]) == (
        "starting",
        0,
        [],
        [],
    )
    (tmp_path / "history.json").write_text('{"rounds": [')  # half-written: not an error
    assert view.snapshot()["curves"] == []


def test_page_and_files_are_served_with_a_strict_policy(page):
    code, headers, body = get(page, "/")
    assert code == 200 and b'<script src="dashboard.js"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
    for path, kind in (("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")):
        code, headers, body = get(page, path)
        assert code == 200 and headers["Content-Type"].startswith(kind) and body
    assert get(page, "/", method="HEAD")[2] == b""


@pytest.mark.parametrize(
    "path", ["/status.json", "/../status.json", "/%2e%2e/history.json", "/v1/control/list-runs"]
)
def test_only_its_routes_exist(page, path):
    assert get(page, path)[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_read_only(page, method):
    assert get(page, "/api/status", method=method)[0] == 405


def test_loopback_page_refuses_other_host_names(page):
    """A page elsewhere that rebinds its DNS name to 127.0.0.1 gets nothing."""
    assert get(page, "/api/status", {"Host": "attacker.example:80"})[0] == 421
    for host in (f"localhost:{page.port}", f"127.0.0.1:{page.port}"):
        assert get(page, "/api/status", {"Host": host})[0] == 200


def test_token_is_required_when_set(run_dir):
    token = "s3cret-token-of-enough-length"
    page = Dashboard(run_dir, CONFIG, f"127.0.0.1:{free_port()}", token=token)
    page.start()
    try:
        assert get(page, "/api/status")[0] == 401
        assert get(page, "/api/status?token=wrong-token-of-enough-length")[0] == 401
        assert get(page, "/api/status", {"Authorization": "Bearer nope"})[0] == 401
        assert get(page, f"/api/status?token={token}")[0] == 200
        assert get(page, "/api/status", {"Authorization": f"Bearer {token}"})[0] == 200
        assert get(page, "/")[0] == 200  # the page holds no data; its script sends the token
        assert page.url.endswith(f"/?token={token}")
    finally:
        page.stop(linger=0)


def test_beyond_loopback_a_token_is_generated(run_dir, monkeypatch):
    monkeypatch.delenv(dash.TOKEN_ENV, raising=False)
    page = Dashboard(run_dir, CONFIG, f"0.0.0.0:{free_port()}")  # nosec B104 - the case tested
    try:
        assert page.token and len(page.token) >= dash.MIN_TOKEN_CHARS
        assert f"?token={page.token}" in page.url
    finally:
        page.stop(linger=0)
    monkeypatch.setenv(dash.TOKEN_ENV, "short")
    with pytest.raises(PollenError, match="too weak"):
        Dashboard(run_dir, CONFIG, f"127.0.0.1:{free_port()}")


def test_a_taken_port_is_a_clear_error(run_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(PollenError, match="cannot listen on"):
            Dashboard(run_dir, CONFIG, f"127.0.0.1:{taken.getsockname()[1]}")


def test_connections_are_bounded(page):
    idle = [socket.create_connection(("127.0.0.1", page.port)) for _ in range(dash.MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", page.port), timeout=5)
        with extra:
            assert extra.recv(1) == b""  # closed at once, not queued behind the idle ones
    finally:
        for conn in idle:
            conn.close()
    time.sleep(0.3)
    assert get(page, "/api/status")[0] == 200


def test_stop_lets_a_watching_page_see_the_end(page, run_dir):
    get(page, "/api/status")  # a page is watching
    write_status(run_dir, "completed")
    start = time.monotonic()
    page.stop(linger=0.6)  # no page polls again: waits the linger out
    assert time.monotonic() - start >= 0.5

    fresh = Dashboard(run_dir, CONFIG, f"127.0.0.1:{free_port()}")
    fresh.start()
    assert json.loads(get(fresh, "/api/status")[2])["status"] == "completed"
    start = time.monotonic()
    fresh.stop(linger=5)  # the end was seen: no wait
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("command", ["server", "simulate"])
def test_dashboard_option(command):
    parser = build_parser()
    assert parser.parse_args([command]).dashboard is None
    assert parser.parse_args([command, "--dashboard"]).dashboard == dash.DEFAULT_ADDRESS
    assert parser.parse_args([command, "--dashboard", "[::1]:9000"]).dashboard == "[::1]:9000"


def _watching_run(port: int, seen: list):
    """A stand-in for the run: reads the page's JSON while it 'runs', as a browser would."""

    def run(cfg, *args, **kwargs):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/status")
        seen.append(json.loads(conn.getresponse().read()))
        conn.close()
        return {"status": "completed"}

    return run


def test_server_command_serves_the_page_while_the_run_runs(tmp_path, monkeypatch):
    from pollen.cli import server as server_cli

    port, seen = free_port(), []
    monkeypatch.setattr(server_cli, "serve", _watching_run(port, seen))
    monkeypatch.setattr(server_cli, "_print_summary", lambda *a: None)
    args = build_parser().parse_args(
        ["server", "--insecure", "--address", f"127.0.0.1:{free_port()}"]
        + ["--dashboard", f"127.0.0.1:{port}", "--out", str(tmp_path / "run"), "--rounds", "4"]
    )
    assert args.run(args) == 0
    assert [(s["status"], s["num_rounds"]) for s in seen] == [("starting", 4)]
    with pytest.raises(OSError):  # and stops with it
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_simulate_command_serves_the_page_while_the_run_runs(tmp_path, tiny_data, monkeypatch):
    from pollen.cli import simulate as simulate_cli

    port, seen = free_port(), []
    monkeypatch.setattr(simulate_cli.simulation, "simulate", _watching_run(port, seen))
    monkeypatch.setattr(simulate_cli, "_print_summary", lambda *a: None)
    args = build_parser().parse_args(
        ["simulate", "--data-dir", str(tiny_data), "--model", "cnn", "--num-classes", "3"]
        + ["--dashboard", f"127.0.0.1:{port}", "--out", str(tmp_path / "run"), "--rounds", "2"]
    )
    assert args.run(args) == 0
    assert [(s["status"], s["num_rounds"]) for s in seen] == [("starting", 2)]
