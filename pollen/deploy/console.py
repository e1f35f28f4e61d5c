"""The console of ``pollen simulate``, ``server`` and ``client``: Pollen's lines only.

Flower's processes (the streamed server app, a client's SuperNode and app
runner) print Flower's INFO lines, uvicorn's start-up lines, Ray's and
TensorFlow's notices and Keras progress bars. :class:`ConsoleRouter` takes
their output line by line: every line goes to a log file, and only what
matters reaches the console:

- Pollen's own lines, tagged by :func:`pollen.server.console.tag_pollen_lines`
  (``Round 2/3 | ...``, a client that failed, waiting for clients), printed as
  ``pollen: ...`` (``pollen: warning: ...`` for warnings);
- Flower's ``ERROR`` lines (a failure, named);
- Keras's progress bar of a client's local training.

A round's ``Round N/M`` line also moves a progress bar over the rounds, with
the time left (``rich``), when the console is a terminal. With ``verbose``
every line goes to the console as it came, as well as to the log.

:func:`in_process_logs` does the same for this process's own loggers (the
fleet relay's uvicorn): to a log file, Pollen's warnings to the console.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pollen.server.console import parse_tagged

__all__ = ["ConsoleRouter", "in_process_logs", "pump"]

#: A round's progress line (pollen.server.rounds.progress_line).
_ROUND = re.compile(r"^Round (\d+)/(\d+) \|")
#: Flower's error lines: ``ERROR :  ...``, maybe coloured.
_FLOWER_ERROR = re.compile(r"^(\x1b\[[0-9;]*m)?ERROR\b")
#: Keras's progress bar (``3/4 ━━━━━━━━━━━━━━━━━━━━ 1s 20ms/step - loss: ...``).
_KERAS_BAR = "\u2501"
#: Where one state of the bar starts: its step counter. Written to a file (not a
#: terminal), Keras puts every state of an epoch's bar on one line.
_KERAS_STEP = re.compile(r"(?:\x1b\[[0-9;]*m)?\d+/\d+(?:\x1b\[[0-9;]*m)? ")


class ConsoleRouter:
    """Sorts the output of Flower's processes: all of it to a log, what matters to the console.

    Args:
        log: File that receives every line (appended); None where the process
            writes its own log (a client's SuperNode) and only the console is sorted.
        verbose: Show every line on the console, unchanged.
        out: The console (default: ``sys.stdout`` at construction).
        bar: Show a progress bar over the rounds; None: when ``out`` is a terminal.
    """

    def __init__(
        self,
        log: Path | None,
        *,
        verbose: bool = False,
        out: TextIO | None = None,
        bar: bool | None = None,
    ) -> None:
        self.log_path = log
        self.verbose = verbose
        self.out = out if out is not None else sys.stdout
        self._log: IO[str] | None = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
        self._partial = ""
        self._lock = threading.Lock()
        use_bar = self.out.isatty() if bar is None else bar
        self._progress: Progress | None = None
        self._task = None
        if use_bar and not verbose:
            self._progress = Progress(
                TextColumn("rounds"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=Console(file=self.out, force_terminal=bar or None),
                transient=True,
            )
        self.shown = 0  # lines that reached the console

    def write(self, text: str) -> None:
        """Take any part of the output: whole lines are sorted now, a partial one later."""
        with self._lock:
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
            for line in lines:
                self._line(line)

    def close(self) -> None:
        """Sort what is left of a partial line, stop the bar and close the log."""
        with self._lock:
            if self._partial:
                self._line(self._partial)
                self._partial = ""
            if self._progress is not None and self._task is not None:
                self._progress.stop()
            if self._log is not None:
                self._log.close()
                self._log = None

    def _line(self, line: str) -> None:
        line = line.rstrip("\r")
        if not line and not self.verbose:  # an empty line matters to no one
            if self._log is not None:
                self._log.write("\n")
            return
        if self._log is not None:
            self._log.write(line + "\n")
            self._log.flush()
        if self.verbose:
            self._show(line)
            return
        shown = console_line(line)
        if shown is None:
            return
        tagged = parse_tagged(line)
        match = _ROUND.match(tagged[1]) if tagged else None
        if match:
            self._advance(int(match.group(1)), int(match.group(2)))
        self._show(shown)

    def _advance(self, done: int, total: int) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._progress.start()
            # A resumed run starts with rounds done: the time left counts from here.
            self._task = self._progress.add_task("rounds", total=total, completed=done - 1)
        self._progress.update(self._task, completed=done, total=total)

    def _show(self, line: str) -> None:
        self.shown += 1
        if self._progress is not None and self._task is not None:
            self._progress.console.print(Text.from_ansi(line), soft_wrap=True)
            return
        self.out.write(line + "\n")
        self.out.flush()


def console_line(line: str) -> str | None:
    """What the console shows for one line of Flower's output, without ``--verbose``; None: nothing.

    Pollen's tagged lines become ``pollen: MESSAGE`` (``pollen: warning: MESSAGE``
    at warning level and above); Flower's error lines and Keras's progress bars
    show as they are (a bar: its last state); every other line only goes to the log.
    """
    tagged = parse_tagged(line)
    if tagged is not None:
        level, message = tagged
        if message.startswith("Traceback (most recent call last)"):
            return None  # the command's own error says what failed; the trace is in the log
        return f"pollen: {message}" if level in ("debug", "info") else f"pollen: {level}: {message}"
    if _FLOWER_ERROR.match(line):
        return line
    if _KERAS_BAR in line:
        line = line.replace("\b", "").rsplit("\r", 1)[-1]  # how Keras redraws
        states = [m.start() for m in _KERAS_STEP.finditer(line)]
        return line[states[-1] :].rstrip() if states else line
    return None


def pump(stream: IO[bytes], router: ConsoleRouter) -> threading.Thread:
    """A started daemon thread that feeds ``stream`` (a child's stdout) to ``router`` until EOF."""

    def run() -> None:
        for raw in iter(stream.readline, b""):
            router.write(raw.decode("utf-8", errors="replace"))
        stream.close()

    thread = threading.Thread(target=run, name="pollen-console", daemon=True)
    thread.start()
    return thread


class _PollenWarnings(logging.Filter):
    """Lets through Pollen's own records at warning level and above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] == "pollen" and record.levelno >= logging.WARNING


class _WarningFormat(logging.Formatter):
    """``pollen: warning: MESSAGE`` (a message's own ``pollen:`` prefix not repeated)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return "pollen: warning: " + message.removeprefix("pollen: ")


@contextlib.contextmanager
def in_process_logs(log: Path, *, verbose: bool = False) -> Iterator[None]:
    """Send this process's log records to ``log``; on the console only Pollen's warnings.

    The fleet relay's uvicorn logs malformed requests (a port probe: ``Invalid
    HTTP request received.``) through Python's root logger, whose last-resort
    handler would print them. For the block, the root logger writes every
    record it passes (warnings and above, unless its level was changed) to
    ``log``, and the console gets Pollen's warnings (a relay's refusal of a
    client) as ``pollen: warning: ...``; everything with ``verbose``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    to_file = logging.FileHandler(log, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = logging.StreamHandler(sys.stderr)
    if verbose:
        to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        to_console.setFormatter(_WarningFormat())
        to_console.addFilter(_PollenWarnings())
    root.addHandler(to_file)
    root.addHandler(to_console)
    try:
        yield
    finally:
        root.removeHandler(to_file)
        root.removeHandler(to_console)
        to_file.close()
