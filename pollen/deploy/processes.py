"""Child processes, ports and signals for the processes Pollen starts.

:class:`ManagedProcess` runs a child in its own process group and stops it
with everything it spawned (:func:`descendants`, read from ``/proc``).
:func:`free_port` and :func:`port_open` probe TCP ports; :func:`sigterm_as_interrupt`
and :func:`wait_interruptibly` make SIGTERM and Ctrl-C stop a run cleanly;
:func:`without_native_notices` holds back what native libraries print while
they load.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

#: Lines TensorFlow's native libraries write to standard error while they load, before
#: its logging is set up, so ``TF_CPP_MIN_LOG_LEVEL`` cannot silence them (TensorFlow 2.21
#: on CPUs where it enables oneDNN; only ``TF_ENABLE_ONEDNN_OPTS=0`` would, at a cost in
#: speed).
TF_LOAD_NOTICES = (
    "WARNING: All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
)


@contextlib.contextmanager
def without_native_notices(notices: Sequence[str] = TF_LOAD_NOTICES) -> Iterator[None]:
    """Hold back lines containing ``notices`` that native code writes to standard error.

    File descriptor 2 goes to a temporary file for the block; afterwards every
    captured line that contains none of ``notices`` is written to standard error,
    in order, so warnings and errors still show. For a command whose output must
    be exactly its result or a one-paragraph error (``pollen predict``). A
    ``contextlib.redirect_stderr`` would not do: native libraries write to the
    descriptor, not to ``sys.stderr``.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = [line for line in lines if not any(n in line for n in notices)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port`` (``timeout`` in seconds)."""
    return probe_port(host, port, timeout) == "open"


def probe_port(host: str, port: int, timeout: float) -> str:
    """``"open"``, ``"closed"`` (refused: nothing listens) or ``"silent"`` (no answer in time).

    A busy server may answer late (``"silent"``); only a refusal says that no
    process listens there any more.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "open"
    except ConnectionRefusedError:
        return "closed"
    except OSError:
        return "silent"


def keep_priority(pid: int) -> int:
    """Give process ``pid``, the leader of a new session, this process's CPU niceness.

    On Linux with autogroups (``/proc/sys/kernel/sched_autogroup_enabled``, the
    default on desktops and many servers) each session is scheduled as one group,
    and a process's ``nice`` weighs only against the processes of its own
    session: a child started in a new session (as :class:`ManagedProcess` starts
    every child) would compete at full weight, however low a priority its parent
    was started at (``nice pollen client``). The group's own niceness
    (``/proc/PID/autogroup``) is what counts between groups: it is set to this
    process's niceness or its group's, whichever is lower in priority. Nothing
    happens elsewhere, or where nothing is niced.

    Returns:
        The niceness given (0: none).
    """
    try:
        ours = int(Path("/proc/self/autogroup").read_text().split()[-1])
        nice = max(ours, os.getpriority(os.PRIO_PROCESS, 0))
        if nice > 0:
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))
            return nice
    except (OSError, ValueError, IndexError, AttributeError):
        pass  # no autogroups here (another OS, or disabled): nice works as it is
    return 0


class ManagedProcess:
    """A child process in its own process group, stopped with everything it spawned.

    ``log``: file that receives the child's stdout and stderr (appended), or None
    to let it write to this process's.
    """

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path | None):
        self.name = name
        self.log_path = log
        self._log = open(log, "ab") if log else None  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=self._log or None,
            stderr=subprocess.STDOUT if self._log else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        keep_priority(self.proc.pid)

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def tail(self, lines: int = 15) -> str:
        """The last lines of the process's log, for error messages."""
        if not self.log_path or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 10.0, *, term: bool = True) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left.

        Processes below it that started their own sessions (the SuperLink's
        SuperExec and the simulation's server app and Ray workers under it)
        are outside the group: they get the same SIGTERM, then SIGKILL.

        Args:
            timeout: Seconds to wait after SIGTERM.
            term: ``False`` skips SIGTERM: for a process already stopping on
                another signal, where a SIGTERM on top only races with its
                handlers.
        """
        tree = descendants(self.proc.pid)[1:] if self.alive() else []
        if self.alive() and term:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            _signal_all(tree, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(is_running(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_all(tree, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self._log:
            self._log.close()
            self._log = None


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it, parents first (read from ``/proc``).

    Returns ``[pid]`` where ``/proc`` is not available.
    """
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@contextlib.contextmanager
def temporary_home(prefix: str) -> Iterator[Path]:
    """A throwaway folder (a ``FLWR_HOME``), removed with its content on exit."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def wait_interruptibly(proc: subprocess.Popen) -> int:
    """Wait for ``proc`` so that Ctrl-C and SIGTERM reach this process promptly.

    The kernel may hand a process-directed signal to any thread (the fleet
    relay runs in one); Python then runs the handler in the main thread only
    once that thread executes bytecode again, which a plain ``wait()``, blocked
    in ``waitpid``, never does until the child exits. Waiting in short slices
    lets the ``KeyboardInterrupt`` through; the child is then killed.

    Returns:
        The child's exit code.
    """
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while the block lasts, so both stop cleanly.

    Outside the main thread (where no handler can be set) it does nothing.
    """

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
