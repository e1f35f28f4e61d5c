"""Tests for pollen.deploy.console and pollen.server.console: Pollen's lines on the console,
everything in the logs."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import pollen
from pollen.deploy.console import ConsoleRouter, console_line, in_process_logs, pump
from pollen.server.console import parse_tagged, tag_pollen_lines

PACKAGE = Path(pollen.__file__).resolve().parent

# What `flwr run --stream` printed for a deployed run before (abridged, colours kept).
STREAM = (
    "Using SuperLink: pollen (127.0.0.1:45413)\n"
    "Successfully started run 2233401622682800302\n"
    "\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process\n"
    "Successfully installed pollen-fl to /tmp/pollen-server-r2/apps/pollen.pollen-fl.0.1.0.\n"
    "\x1b[92mINFO \x1b[0m:      [pollen:info] Pollen run folder: /tmp/run\n"
    "\x1b[92mINFO \x1b[0m:      configure_train: Sampled 2 nodes (out of 2)\n"
    "\x1b[92mINFO \x1b[0m:      aggregate_train: Received 2 results and 0 failures\n"
    "\x1b[93mWARNING \x1b[0m:   [pollen:warning] Round 1: client c1 sent no train reply in 60 s\n"
    "\x1b[92mINFO \x1b[0m:      [pollen:info] Round 1/3 | train loss 0.7096 | 4.9 s\n"
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "\x1b[91mERROR \x1b[0m:     [pollen:error] Traceback (most recent call last):\n"
    '  File "/work/main/pollen/server/app.py", line 166, in _run_and_report\n'
    "\x1b[91mERROR \x1b[0m:     ServerApp raised an exception\n"
    "Traceback (most recent call last):\n"
    "\x1b[92mINFO \x1b[0m:      [pollen:info] Round 2/3 | train loss 0.0280 | 1.8 s\n"
)


def test_the_console_shows_pollens_lines_and_failures_only() -> None:
    shown = [console_line(line) for line in STREAM.splitlines()]
    assert [s for s in shown if s is not None] == [
        "pollen: Pollen run folder: /tmp/run",
        "pollen: warning: Round 1: client c1 sent no train reply in 60 s",
        "pollen: Round 1/3 | train loss 0.7096 | 4.9 s",
        "\x1b[91mERROR \x1b[0m:     ServerApp raised an exception",
        "pollen: Round 2/3 | train loss 0.0280 | 1.8 s",
    ]


def test_a_keras_bar_shows_its_last_state() -> None:
    """Written to a file, Keras redraws its bar with backspaces on one line."""
    bar = (
        "\x1b[1m1/2\x1b[0m \x1b[32m━━━━━━━━━━\x1b[0m\x1b[37m━━━━━━━━━━\x1b[0m \x1b[1m2s\x1b[0m "
        "2s/step - accuracy: 0.7812 - loss: 0.6826" + "\b" * 30 + "\x1b[1m2/2\x1b[0m "
        "\x1b[32m━━━━━━━━━━━━━━━━━━━━\x1b[0m\x1b[37m\x1b[0m \x1b[1m2s\x1b[0m 30ms/step - "
        "accuracy: 0.8056 - loss: 0.6334"
    )
    shown = console_line(bar)
    assert shown is not None and shown.startswith("\x1b[1m2/2")
    assert shown.endswith("loss: 0.6334") and "1/2" not in shown and "\b" not in shown


def test_every_line_goes_to_the_log_and_pollens_to_the_console(tmp_path: Path) -> None:
    out = io.StringIO()
    router = ConsoleRouter(tmp_path / "logs" / "app.log", out=out)
    for i in range(0, len(STREAM), 37):  # in pieces that cut lines, as a pipe delivers them
        router.write(STREAM[i : i + 37])
    router.write("\x1b[92mINFO \x1b[0m:      [pollen:info] no newline at the end")
    router.close()
    log = (tmp_path / "logs" / "app.log").read_text()
    last = "\x1b[92mINFO \x1b[0m:      [pollen:info] no newline at the end"
    assert log.splitlines() == [*STREAM.splitlines(), last]
    console = out.getvalue().splitlines()
    assert len(console) == 6 and router.shown == 6
    assert console[-1] == "pollen: no newline at the end"
    assert not any("configure_train" in line or "Successfully" in line for line in console)


def test_verbose_shows_every_line(tmp_path: Path) -> None:
    out = io.StringIO()
    router = ConsoleRouter(tmp_path / "app.log", out=out, verbose=True)
    router.write(STREAM)
    router.close()
    assert out.getvalue() == STREAM
    assert (tmp_path / "app.log").read_text() == STREAM


def test_a_terminal_gets_a_bar_over_the_rounds(tmp_path: Path) -> None:
    out = io.StringIO()
    router = ConsoleRouter(None, out=out, bar=True)
    router.write(STREAM)
    assert router._progress is not None
    task = router._progress.tasks[0]
    assert (task.completed, task.total) == (2, 3)
    router.close()
    text = out.getvalue()
    assert "pollen: Round 2/3" in text and "configure_train" not in text


def test_pump_feeds_a_childs_output_to_the_router(tmp_path: Path) -> None:
    code = "import sys; [print(f'[pollen:info] line {i}', flush=True) for i in range(3)]"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    out = io.StringIO()
    router = ConsoleRouter(tmp_path / "child.log", out=out)
    pump(proc.stdout, router).join(timeout=30)  # type: ignore[arg-type]
    proc.wait(timeout=30)
    router.close()
    assert out.getvalue().splitlines() == ["pollen: line 0", "pollen: line 1", "pollen: line 2"]


def _log_from(path: Path, logger: logging.Logger, level: int, message: str) -> None:
    """Log ``message`` as code in ``path`` would (a record's pathname is its caller's file)."""
    code = compile("logger.log(level, message)", str(path), "exec")
    exec(code, {"logger": logger, "level": level, "message": message})  # noqa: S102 - test


def test_records_from_pollen_modules_are_tagged_with_their_level() -> None:
    logger = logging.getLogger("pollen-test-tagging")
    logger.propagate = False
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s : %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    tag_pollen_lines(logger)
    tag_pollen_lines(logger)  # twice: one tag
    _log_from(PACKAGE / "server" / "rounds.py", logger, logging.INFO, "Round 1/2 | ok")
    _log_from(PACKAGE / "deploy" / "warm_clientapp.py", logger, logging.INFO, "[pollen] task 1")
    _log_from(PACKAGE / "deploy" / "warm_clientapp.py", logger, logging.ERROR, "task failed")
    _log_from(Path("/elsewhere/flwr/server.py"), logger, logging.INFO, "configure_train")
    lines = stream.getvalue().splitlines()
    assert lines == [
        "INFO : [pollen:info] Round 1/2 | ok",
        "INFO : [pollen] task 1",  # the launcher's plumbing: not news
        "ERROR : [pollen:error] task failed",
        "INFO : configure_train",
    ]
    assert [parse_tagged(line) for line in lines] == [
        ("info", "Round 1/2 | ok"),
        None,
        ("error", "task failed"),
        None,
    ]


def test_in_process_records_go_to_a_log_and_pollens_warnings_to_the_console(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "logs" / "relay.log"
    with in_process_logs(log):
        logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
        logging.getLogger("pollen.deploy.fleet_proxy").warning("pollen: refused a client")
    logging.getLogger("uvicorn.error").warning("after the block")
    err = capsys.readouterr().err
    assert "pollen: warning: refused a client" in err
    assert "Invalid HTTP request" not in err
    text = log.read_text()
    assert "Invalid HTTP request received." in text and "refused a client" in text
    assert "after the block" not in text
    with in_process_logs(log, verbose=True):
        logging.getLogger("uvicorn.error").warning("shown when verbose")
    assert "shown when verbose" in capsys.readouterr().err
