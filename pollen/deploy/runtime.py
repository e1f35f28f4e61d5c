"""Flower's runtime: the SuperLink, the ``flwr`` CLI's connection and run submission.

``pollen simulate`` and ``pollen server`` both start a ``flower-superlink``,
point a private ``flwr`` CLI configuration at it and submit this app with
``flwr run``; this module holds what they share. Every Flower process gets
the environment of :func:`flower_env` (offline, quiet, its own ``FLWR_HOME``).
The processes themselves are :class:`pollen.deploy.processes.ManagedProcess`.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pollen.config import RunConfig
from pollen.deploy.console import ConsoleRouter, pump
from pollen.deploy.processes import ManagedProcess, port_open, wait_interruptibly
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


#: Pollen's Flower App identity: ``[tool.flwr.app] publisher`` and ``[project] name``. A
#: deployed client runs a task only if its app is this one, at this client's version
#: (:mod:`pollen.deploy.warm_clientapp`).
APP_PUBLISHER = "pollen"
APP_NAME = "pollen-fl"
#: Pollen's Flower App components (``[tool.flwr.app.components]``), imported from the
#: installed package, never from an app bundle.
APP_COMPONENTS = {"serverapp": "pollen.server.app:app", "clientapp": "pollen.client.app:app"}


def app_version() -> str:
    """The version of the Pollen package this process runs (its app's ``[project] version``)."""
    import pollen

    return pollen.__version__


def private_dir(path: Path) -> Path:
    """``path`` as a folder only this user can enter: created 0700, or checked if it exists.

    Raises:
        PollenError: ``path`` exists but is a link, not a folder, owned by another user,
            or open to other users.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PollenError(
            f"The folder {path} is not private to this user (a link, another user's, or open "
            f"to others: mode {stat.S_IMODE(info.st_mode):o}), so Pollen will not use it. "
            "Remove it, or point TMPDIR at a folder of your own."
        )
    return path


def app_dir(home: Path | None = None) -> Path:
    """The Flower App folder (the one holding ``pyproject.toml``) for ``flwr run``.

    A folder holding only a ``pyproject.toml``: the checkout's own when Pollen
    runs from a source checkout (``pip install -e .``), so the run is the one
    ``flwr run .`` would do; from an installed wheel, one generated with the
    same identity, components and run config. The components are imported from
    the environment Pollen runs in, so the app bundle needs no code.

    Not the checkout itself: Flower 1.42 walks every file under the folder
    (a virtual environment included) before it applies ``.gitignore``
    (see docs/performance.md#app-folder).

    Args:
        home: A private folder (a run's ``FLWR_HOME``): the app folder is its ``app``
            subfolder, created 0700, or reused only if this user owns it and no one
            else may enter it. None: a fresh private folder (``tempfile.mkdtemp``),
            which the caller removes.

    Raises:
        PollenError: ``home/app`` exists and is not private to this user.
    """
    folder = private_dir(home / "app") if home else Path(tempfile.mkdtemp(prefix="pollen-app-"))
    target = folder / "pyproject.toml"
    text = _app_pyproject()
    if not (target.is_file() and target.read_text(encoding="utf-8") == text):
        # Written atomically: a concurrent `flwr run` never sees a partial file.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".pyproject-", suffix=".toml")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    return folder


def _app_pyproject() -> str:
    """The checkout's ``pyproject.toml``, or an equivalent one for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "pollen" / "server" / "app.py").is_file():
        return (root / "pyproject.toml").read_text(encoding="utf-8")
    config_lines = [f"{k} = {toml_value(v)}" for k, v in RunConfig.declared_defaults().items()]
    components = [f"{k} = {toml_value(v)}" for k, v in APP_COMPONENTS.items()]
    lines = [
        "[project]",
        f"name = {toml_value(APP_NAME)}",
        f"version = {toml_value(app_version())}",
        "[tool.flwr.app]",
        f"publisher = {toml_value(APP_PUBLISHER)}",
        "[tool.flwr.app.components]",
        *components,
        "[tool.flwr.app.config]",
        *config_lines,
    ]
    return "\n".join(lines) + "\n"


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
    router: ConsoleRouter | None = None,
) -> int:
    """``flwr run`` this app against the connection in ``flwr_home``.

    Output (the ServerApp's log, and in simulation the clients' too) goes to
    ``router`` line by line while the run lasts (its log, and Pollen's lines to
    the console: :class:`pollen.deploy.console.ConsoleRouter`); without one,
    to this process's stdout.

    Returns:
        ``flwr run``'s exit code (0 even when the run itself failed: read the
        run folder's ``status.json`` for that).
    """
    run_config = write_run_config(flwr_home / "run-config.toml", overrides)
    app = app_dir(flwr_home)
    argv = [flower_bin("flwr"), "run", str(app), CONNECTION, "--run-config", str(run_config)]
    if federation_config:
        argv += ["--federation-config", federation_config]
    if stream:
        argv.append("--stream")
    if router is None:
        return wait_interruptibly(
            subprocess.Popen(argv, env=flower_env(flwr_home), stdin=subprocess.DEVNULL)
        )
    proc = subprocess.Popen(
        argv,
        env=flower_env(flwr_home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # A thread reads the output, so Ctrl-C still reaches the wait (wait_interruptibly).
    reader = pump(proc.stdout, router)  # type: ignore[arg-type]
    try:
        return wait_interruptibly(proc)
    finally:
        reader.join(timeout=10)
