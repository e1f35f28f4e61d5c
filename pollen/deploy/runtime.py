"""Plumbing for Flower's runtime: processes, ports, connections, run submission.

``pollen simulate`` and ``pollen server`` both start a ``flower-superlink``,
point a private ``flwr`` CLI configuration at it and submit this app with
``flwr run``; this module holds what they share. Every Flower process gets
the environment of :func:`flower_env` (offline, quiet, its own ``FLWR_HOME``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pollen.errors import PollenError

#: Variables that keep Flower and Ray offline and quiet.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "PYTHONUNBUFFERED": "1",
}

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


#: Name of the connection in the private ``config.toml``.
CONNECTION = "pollen"


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower process with its own ``FLWR_HOME``."""
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def flower_bin(name: str) -> str:
    """Path of a Flower console script installed beside this Python."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def split_address(address: str, default_port: int = 8080) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too) into host and port.

    Raises:
        PollenError: The address is not of that form.
    """
    if address.count(":") > 1 and not address.startswith("["):
        raise PollenError(
            f"Invalid address {address!r}: write an IPv6 address in brackets with a port, "
            "for example [::1]:8080."
        )
    host, sep, port = address.rpartition(":")
    if not sep:
        host, port = address, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PollenError(
            f"Invalid address {address!r}: write it as HOST:PORT, for example "
            "0.0.0.0:8080 or 192.0.2.10:8080."
        )
    return host, int(port)


def write_connection(
    flwr_home: Path, address: str, *, insecure: bool = True, root_cert: str | None = None
) -> None:
    """Write the ``flwr`` CLI's ``config.toml`` with one connection, the default."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{address}"',
        f"insecure = {'true' if insecure else 'false'}",
    ]
    if root_cert:
        lines.append(f'root-certificates = "{root_cert}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def app_dir() -> Path:
    """The Flower App folder (the one holding ``pyproject.toml``) for ``flwr run``.

    A folder holding only a ``pyproject.toml``: the checkout's own when Pollen
    runs from a source checkout (``pip install -e .``), so the run is the one
    ``flwr run .`` would do; from an installed wheel, one generated with the
    same components and run config. The components are imported from the
    environment Pollen runs in, so the app bundle needs no code.

    Why not hand over the checkout itself: Flower 1.42 builds the bundle by
    walking every file under the folder before it applies ``.gitignore``;
    with a virtual environment inside the checkout (60,000 files) that walk
    alone took 9.6 s of every run's start-up here, against 2.0 s for this folder.
    """
    import hashlib

    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "pollen" / "server" / "app.py").is_file():
        text = (root / "pyproject.toml").read_text(encoding="utf-8")
    else:
        from pollen.config import RunConfig

        config_lines = [f"{k} = {toml_value(v)}" for k, v in RunConfig.declared_defaults().items()]
        text = (
            "\n".join(
                [
                    "[project]",
                    'name = "pollen"',
                    'version = "0.1.0"',
                    "[tool.flwr.app]",
                    'publisher = "pollen"',
                    "[tool.flwr.app.components]",
                    'serverapp = "pollen.server.app:app"',
                    'clientapp = "pollen.client.app:app"',
                    "[tool.flwr.app.config]",
                    *config_lines,
                ]
            )
            + "\n"
        )
    # One folder per content, written atomically: concurrent runs never see a partial file.
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    gen = Path(tempfile.gettempdir()) / f"pollen-app-{digest}"
    target = gen / "pyproject.toml"
    if not (target.is_file() and target.read_text(encoding="utf-8") == text):
        gen.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=gen.parent, prefix=f"{gen.name}-", suffix=".toml")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    return gen


def toml_value(value: Any) -> str:
    """Render a scalar as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # JSON string escapes are valid TOML basic-string escapes (DEL excepted).
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def write_run_config(path: Path, values: Mapping[str, Any]) -> Path:
    """Write run-config overrides as a TOML file for ``flwr run --run-config``."""
    path.write_text(
        "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()), encoding="utf-8"
    )
    return path


class ManagedProcess:
    """A child process in its own process group, stopped with everything it spawned."""

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


def start_superlink(
    flwr_home: Path,
    host: str,
    port: int,
    *,
    simulation: bool = False,
    extra_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    log: Path | None = None,
    timeout: float = 60.0,
) -> ManagedProcess:
    """Start ``flower-superlink`` on ``host:port`` and wait until it listens.

    ``extra_env`` is added to its environment, which the processes it starts
    (a simulation's server app and client workers) inherit.

    Raises:
        PollenError: It exited or did not listen within ``timeout`` seconds.
    """
    argv = [
        flower_bin("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
        *(["--simulation"] if simulation else []),
        *extra_args,
    ]
    if "--ssl-certfile" not in extra_args:
        argv.append("--insecure")
    proc = ManagedProcess("superlink", argv, flower_env(flwr_home, extra_env), log)
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if not proc.alive() or time.monotonic() > deadline:
            tail = proc.tail()
            proc.stop()
            raise PollenError(
                f"Flower's SuperLink did not start on {host}:{port}. Its last output:\n{tail}"
            )
        time.sleep(0.2)
    return proc


@contextlib.contextmanager
def temporary_home(prefix: str) -> Iterator[Path]:
    """A throwaway ``FLWR_HOME`` folder."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def register_supernodes(
    flwr_home: Path, public_keys: Sequence[Path], timeout: float = 60.0
) -> None:
    """Register client public keys with the SuperLink of the connection in ``flwr_home``.

    With ``--enable-supernode-auth`` the SuperLink admits only SuperNodes whose
    public key was registered this way (``flwr supernode register KEY CONN``).

    Raises:
        PollenError: Flower refused a key or the command failed.
    """
    env = flower_env(flwr_home)
    # One `flwr` process per key (each takes seconds to start): run them side by side.
    procs = [
        (
            key,
            subprocess.Popen(
                [flower_bin("flwr"), "supernode", "register", str(key), CONNECTION],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        )
        for key in public_keys
    ]
    deadline = time.monotonic() + timeout
    failure: str | None = None
    for key, proc in procs:
        try:
            output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            failure = failure or (
                f"Registering the client key {key} with Flower's SuperLink took more than "
                f"{timeout:.0f} s. The machine may be overloaded; start the server again."
            )
            continue
        if proc.returncode != 0:
            output = " ".join(output.split())[-600:]
            failure = failure or (
                f"Flower refused to register the client key {key} ({output}). Check that "
                "the file is a client public key from `pollen certs` and that no two files "
                "in authorized-clients hold the same key, then start the server again."
            )
    if failure:
        raise PollenError(failure)


def submit_run(
    flwr_home: Path,
    overrides: Mapping[str, Any],
    *,
    federation_config: str | None = None,
    stream: bool = True,
) -> int:
    """``flwr run`` this app against the connection in ``flwr_home``.

    Output (the ServerApp's log, and in simulation the clients' too) goes to
    this process's stdout while the run lasts.

    Returns:
        ``flwr run``'s exit code (0 even when the run itself failed: read the
        run folder's ``status.json`` for that).
    """
    run_config = write_run_config(flwr_home / "run-config.toml", overrides)
    argv = [flower_bin("flwr"), "run", str(app_dir()), CONNECTION, "--run-config", str(run_config)]
    if federation_config:
        argv += ["--federation-config", federation_config]
    if stream:
        argv.append("--stream")
    return wait_interruptibly(
        subprocess.Popen(argv, env=flower_env(flwr_home), stdin=subprocess.DEVNULL)
    )


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
    """Treat SIGTERM like Ctrl-C while the run lasts, so both stop cleanly."""

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
