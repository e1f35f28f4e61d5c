"""Dockerfile and compose.yaml: what can be checked without a Docker daemon.

- compose.yaml: every service's command is a valid ``pollen`` invocation (the
  CLI's own parser), the clients dial the server service with the keys the
  ``certs`` service makes, the partitions cover the data, the status page is
  published on loopback only.
- Dockerfile: its install step is .ci/run's (venv, pip, the project), and it
  builds and installs from exactly the files it copies: the same ``pip install``
  runs here, offline, on a build context of those files, and the installed
  package (with its status page's files) works from there.

``docker build`` itself needs a daemon, which the test machine lacks.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pollen.cli.app import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"

_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def compose() -> dict:
    """compose.yaml with ``${VAR:-default}`` as its default (what `docker compose` does)."""
    return yaml.safe_load(_DEFAULT.sub(lambda m: m.group(2), COMPOSE.read_text()))


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def entrypoint() -> list[str]:
    [value] = [json.loads(rest) for kw, rest in instructions() if kw == "ENTRYPOINT"]
    return value


def flags(argv: list[str]):
    """The parsed ``pollen`` arguments of a container's command (the image's ENTRYPOINT first)."""
    assert argv[0] in ("server", "client", "certs"), argv
    return build_parser().parse_args(argv)


def test_compose_runs_a_server_and_two_clients_with_valid_commands():
    services = compose()["services"]
    assert entrypoint() == ["pollen"]
    assert set(services) == {"certs", "server", "client-0", "client-1"}
    assert all(s.get("build") == "." for s in services.values())

    # The certs service makes the server's certificate for its service name, a key per client.
    script = services["certs"]["command"][0]
    certs = flags(shlex.split(script.partition("||")[2])[1:])
    assert certs.server_name == ["server"] and certs.clients == 2
    assert services["certs"]["volumes"] == ["certs:/certs"]

    server = flags(services["server"]["command"])
    assert server.address == "0.0.0.0:8080" and server.min_clients == 2
    assert server.certs == certs.out / "server" and not server.insecure
    assert server.dashboard == "0.0.0.0:8090"
    assert services["server"]["ports"] == ["127.0.0.1:8090:8090"]  # the page: loopback only
    assert "POLLEN_DASHBOARD_TOKEN" in services["server"]["environment"]
    assert str(server.out).startswith("/runs/") and "./runs:/runs" in services["server"]["volumes"]
    assert str(server.test_data).startswith("/data/")
    assert services["server"]["depends_on"]["certs"] == {
        "condition": "service_completed_successfully"
    }

    clients = [flags(services[f"client-{i}"]["command"]) for i in range(2)]
    assert {c.server for c in clients} == {"server:8080"}
    assert [c.certs for c in clients] == [certs.out / "clients" / f"client-{i}" for i in range(2)]
    assert sorted(c.partition_id for c in clients) == [0, 1]
    assert {c.num_partitions for c in clients} == {2}
    assert len({c.name for c in clients}) == 2
    for i, c in enumerate(clients):
        assert c.data_dir == server.test_data and not c.insecure
        assert "./data:/data:ro" in services[f"client-{i}"]["volumes"]
        assert "certs:/certs:ro" in services[f"client-{i}"]["volumes"]


def _install_commands(text: str) -> list[list[str]]:
    """The ``python3 -m venv`` and ``pip install`` (of pip or the project) commands of a shell text.

    Other installs (.ci/run's optional CPU torch) are left out.
    """
    commands = []
    for part in re.split(r"&&|\|\||\n", re.sub(r"\\\n", " ", text)):
        argv = shlex.split(part, comments=True)
        project = argv[1:3] == ["install", "-q"] and argv[-1] in ("pip", ".", ".[dev]")
        if argv[:3] == ["python3", "-m", "venv"] or project:
            commands.append([Path(argv[0]).name, *argv[1:]])
    return commands


def test_the_image_installs_as_ci_does():
    [base] = [rest for kw, rest in instructions() if kw == "FROM"]
    assert base == "python:3.11-slim"
    image = _install_commands(" && ".join(rest for kw, rest in instructions() if kw == "RUN"))
    ci = _install_commands((ROOT / ".ci" / "run").read_text())
    # .ci/run installs the project editable with its dev extras; the image installs it plainly.
    ci = [[a for a in argv if a != "-e"] for argv in ci]
    ci = [[a.replace(".[dev]", ".") for a in argv] for argv in ci]
    assert [argv[:3] for argv in image] == [argv[:3] for argv in ci]
    assert image[1:] == ci[1:], (image, ci)


def _dockerignored(rel: Path, patterns: list[str]) -> bool:
    """Whether Docker leaves ``rel`` (relative to the context) out of the build context.

    As Docker reads .dockerignore: a pattern matches a path from the context's root
    (``**/`` at any depth), and a folder that matches takes its content with it.
    """
    parts = rel.parts
    for k in range(1, len(parts) + 1):
        prefix = "/".join(parts[:k])
        for pattern in patterns:
            if pattern.startswith("**/"):
                if fnmatch.fnmatch(parts[k - 1], pattern[3:]):
                    return True
            elif fnmatch.fnmatch(prefix, pattern):
                return True
    return False


def _copied_context(tmp_path: Path) -> Path:
    """A build context holding what the Dockerfile copies, less what .dockerignore drops."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    context = tmp_path / "context"
    for kw, rest in instructions():
        if kw != "COPY":
            continue
        *sources, _ = rest.split()
        for source in sources:
            src = ROOT / source
            files = [f for f in src.rglob("*") if f.is_file()] if src.is_dir() else [src]
            for file in files:
                rel = file.relative_to(ROOT)
                if not _dockerignored(rel, patterns):
                    (context / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(file, context / rel)
    assert (context / "pyproject.toml").exists()
    return context


@pytest.mark.timeout(300)
def test_the_image_install_step_builds_from_the_copied_files(tmp_path):
    context = _copied_context(tmp_path)
    target = tmp_path / "site"
    # The Dockerfile's `pip install .`, offline: the build backend and the dependencies
    # come from this environment (the dependencies are the ones pyproject.toml names).
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "--target", str(target), str(context)],
        check=True,
        timeout=240,
    )
    probe = (
        "import pollen, importlib.resources as r; "
        "print(pollen.__file__); "
        "print(sorted(p.name for p in r.files('pollen.deploy').joinpath('static').iterdir()))"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    shown = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    where, files = shown.stdout.splitlines()
    assert where.startswith(str(target))  # the installed copy, not this checkout
    assert files == str(["dashboard.css", "dashboard.html", "dashboard.js"])
    helped = subprocess.run(
        [sys.executable, "-m", "pollen.cli", "server", "--help"],
        env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0, helped.stderr
    assert "--dashboard" in helped.stdout


def test_dockerignore_reading():
    patterns = ["data", "**/__pycache__", "*.egg-info"]
    assert _dockerignored(Path("data/cifar10-jpg/x.jpg"), patterns)
    assert not _dockerignored(Path("pollen/data/load.py"), patterns)  # only the top-level one
    assert _dockerignored(Path("pollen/data/__pycache__/load.cpython-311.pyc"), patterns)
    assert _dockerignored(Path("pollen_fl.egg-info/PKG-INFO"), patterns)
