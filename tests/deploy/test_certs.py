"""Tests for pollen.deploy.certs, pollen.deploy.tls and the TLS/authentication options of the CLI.

Unit tests: ``pollen certs`` output (files, modes, SANs, signatures, key formats
Flower accepts), the checks of ``--certs`` folders, the transport rules of
``pollen server``/``client``, the client-side TLS probe and the proxy's refusal log.

End-to-end (``e2e``): a TLS + client-authentication run on loopback with two
authorized clients completes, while a client with another CA's bundle and a client
whose key is not authorized are both refused with a clear error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import pollen_cmd
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pollen.deploy.certs import CertsSummary, create_certs, key_fingerprint, loopback_tls
from pollen.deploy.tls import is_loopback, load_client_certs, load_server_certs, probe_tls
from pollen.errors import PollenError

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> CertsSummary:
    """One `pollen certs` output: server names fl.example.org and 10.1.2.3, 2 clients."""
    out = tmp_path_factory.mktemp("certs") / "certs"
    return create_certs(out, ["fl.example.org", "10.1.2.3"], clients=2)


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    """A private copy of the bundle that a test may break."""
    target = tmp_path / "certs"
    shutil.copytree(bundle.out, target)
    return target


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- pollen certs


def test_layout_and_modes(bundle):
    out = bundle.out
    expected = [
        "README.txt",
        "ca/ca.key",
        "ca/ca.crt",
        "server/ca.crt",
        "server/server.crt",
        "server/server.key",
        "server/authorized-clients/client-0.pub",
        "server/authorized-clients/client-1.pub",
        "clients/client-0/ca.crt",
        "clients/client-0/client.key",
        "clients/client-0/client.pub",
        "clients/client-1/ca.crt",
        "clients/client-1/client.key",
        "clients/client-1/client.pub",
    ]
    for rel in expected:
        assert (out / rel).is_file(), rel
    assert not (out / "clients" / "client-2").exists()
    for secret in ("ca/ca.key", "server/server.key", "clients/client-0/client.key"):
        assert _mode(out / secret) == 0o600, secret
    for public in ("server/server.crt", "server/ca.crt", "clients/client-1/client.pub"):
        assert _mode(out / public) & 0o044 == 0o044, public  # readable by others
    # The CA key is never in what is handed out.
    handed_out = [*(out / "server").rglob("*"), *(out / "clients").rglob("*")]
    assert all(p.name != "ca.key" for p in handed_out)
    ca = (out / "ca" / "ca.crt").read_bytes()
    assert (out / "server" / "ca.crt").read_bytes() == ca
    assert (out / "clients" / "client-0" / "ca.crt").read_bytes() == ca
    for i in range(2):
        pub = (out / "clients" / f"client-{i}" / "client.pub").read_bytes()
        assert (out / "server" / "authorized-clients" / f"client-{i}.pub").read_bytes() == pub
    readme = (out / "README.txt").read_text()
    assert bundle.clients["client-0"] in readme and "fl.example.org" in readme


def test_server_cert_is_signed_by_the_ca_and_names_the_server(bundle):
    server = bundle.out / "server"
    ca = x509.load_pem_x509_certificate((server / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((server / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    ips = set(san.get_values_for_type(x509.IPAddress))
    assert ips == {ipaddress.ip_address(a) for a in ("10.1.2.3", "127.0.0.1", "::1")}
    key = serialization.load_pem_private_key((server / "server.key").read_bytes(), None)
    assert key.public_key() == cert.public_key()
    # Python's own TLS stack accepts the pair and the CA.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server / "server.crt", server / "server.key")
    ssl.create_default_context(cafile=str(server / "ca.crt"))


def test_default_server_name_is_this_host(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "pollen-box")
    summary = create_certs(tmp_path / "c", clients=1)
    assert summary.dns == ["pollen-box", "localhost"]
    assert summary.ips == ["127.0.0.1", "::1"]
    # A host name that is not a DNS name is left out rather than failing.
    monkeypatch.setattr(socket, "gethostname", lambda: "odd_name!")
    assert create_certs(tmp_path / "d", clients=1).dns == ["localhost"]


def test_client_keys_load_with_flowers_own_loaders(bundle):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    for i in range(2):
        folder = bundle.out / "clients" / f"client-{i}"
        args = argparse.Namespace(
            auth_supernode_private_key=str(folder / "client.key"),
            auth_supernode_public_key=None,
        )
        private, public = _try_setup_client_authentication(args)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        # What the server registers is exactly the key the client signs with.
        registered = bundle.out / "server" / "authorized-clients" / f"client-{i}.pub"
        assert try_load_public_key(registered) == public_key_to_bytes(public)
        assert key_fingerprint(public) == bundle.clients[f"client-{i}"]


def test_checked_folders_load(bundle):
    server = load_server_certs(bundle.out / "server")
    assert [p.name for p in server.authorized] == ["client-0.pub", "client-1.pub"]
    assert "fl.example.org" in server.names and "127.0.0.1" in server.names
    client = load_client_certs(bundle.out / "clients" / "client-1")
    assert client.fingerprint == bundle.clients["client-1"]


def test_refuses_to_overwrite_unless_forced(bundle, copy):
    with pytest.raises(PollenError, match="already exists.*--force"):
        create_certs(copy, ["x.example"], clients=1)
    assert (copy / "clients" / "client-1").is_dir()  # untouched
    (copy / "notes.txt").write_text("mine")
    old_ca = (copy / "ca" / "ca.crt").read_bytes()
    create_certs(copy, ["x.example"], clients=1, force=True)
    assert (copy / "ca" / "ca.crt").read_bytes() != old_ca
    assert not (copy / "clients" / "client-1").exists()
    assert (copy / "notes.txt").read_text() == "mine"
    assert _mode(copy / "server" / "server.key") == 0o600
    # An empty folder is not "existing certificates".
    (copy.parent / "empty").mkdir()
    create_certs(copy.parent / "empty", ["x.example"], clients=1)


@pytest.mark.parametrize(
    ("name", "phrase"),
    [("0.0.0.0", "not one a client can dial"), ("bad name!", "neither a host name")],
)
def test_bad_server_names(tmp_path, name, phrase):
    with pytest.raises(PollenError, match=phrase):
        create_certs(tmp_path / "c", [name], clients=1)
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- --certs checks


def _expired_cert(ca_dir: Path, key: ec.EllipticCurvePrivateKey) -> bytes:
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_server_folder_errors(copy, tmp_path):
    server = copy / "server"
    with pytest.raises(PollenError, match="does not exist.*pollen certs"):
        load_server_certs(tmp_path / "nowhere")
    with pytest.raises(PollenError, match=r"did you mean --certs .*server"):
        load_server_certs(copy)
    with pytest.raises(PollenError, match="looks like a client's bundle"):
        load_server_certs(copy / "clients" / "client-0")

    broken = tmp_path / "broken"
    shutil.copytree(server, broken)
    (broken / "server.key").unlink()
    with pytest.raises(PollenError, match=r"server\.key is missing"):
        load_server_certs(broken)

    shutil.rmtree(broken)
    shutil.copytree(server, broken)
    (broken / "ca.crt").write_text("hello\n")
    with pytest.raises(PollenError, match=r"ca\.crt is not a PEM certificate"):
        load_server_certs(broken)

    # A server certificate from another CA.
    other = create_certs(tmp_path / "other", ["x.example"], clients=1).out
    shutil.copy(other / "server" / "ca.crt", broken / "ca.crt")
    with pytest.raises(PollenError, match="not signed by the CA"):
        load_server_certs(broken)

    shutil.copy(server / "ca.crt", broken / "ca.crt")
    shutil.copy(other / "server" / "server.key", broken / "server.key")
    with pytest.raises(PollenError, match="does not belong to the certificate"):
        load_server_certs(broken)

    (broken / "server.key").write_text("-----BEGIN PRIVATE KEY-----\nnope\n")
    with pytest.raises(PollenError, match=r"server\.key is not a PEM private key"):
        load_server_certs(broken)

    key = serialization.load_pem_private_key((server / "server.key").read_bytes(), None)
    shutil.copy(server / "server.key", broken / "server.key")
    (broken / "server.crt").write_bytes(_expired_cert(copy / "ca", key))
    with pytest.raises(PollenError, match=r"server\.crt expired on"):
        load_server_certs(broken)

    shutil.copy(server / "server.crt", broken / "server.crt")
    load_server_certs(broken)  # repaired
    (broken / "authorized-clients" / "client-0.pub").write_text("ssh-rsa AAAA nope\n")
    with pytest.raises(PollenError, match=r"client-0\.pub is not a client public key"):
        load_server_certs(broken)
    shutil.copy(
        broken / "authorized-clients" / "client-1.pub",
        broken / "authorized-clients" / "client-0.pub",
    )
    with pytest.raises(PollenError, match="hold the same public key"):
        load_server_certs(broken)
    for pub in (broken / "authorized-clients").iterdir():
        pub.unlink()
    with pytest.raises(PollenError, match="holds no client public keys"):
        load_server_certs(broken)


def test_client_folder_errors(copy, tmp_path):
    client = copy / "clients" / "client-0"
    with pytest.raises(PollenError, match="does not exist"):
        load_client_certs(tmp_path / "nowhere")
    with pytest.raises(PollenError, match="did you mean one of"):
        load_client_certs(copy)
    with pytest.raises(PollenError, match="this is the server's folder"):
        load_client_certs(copy / "server")

    (client / "client.key").rename(tmp_path / "client.key")
    with pytest.raises(PollenError, match=r"client\.key is missing"):
        load_client_certs(client)
    # A PEM (not OpenSSH) key: Flower's loader would refuse it.
    shutil.copy(copy / "server" / "server.key", client / "client.key")
    with pytest.raises(PollenError, match="not a client private key"):
        load_client_certs(client)
    if shutil.which("ssh-keygen"):  # cryptography writes encrypted OpenSSH keys only with bcrypt
        (client / "client.key").unlink()
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ecdsa",
                "-b",
                "384",
                "-N",
                "secret",
                "-f",
                client / "client.key",
            ],
            check=True,
        )
        with pytest.raises(PollenError, match="passphrase"):
            load_client_certs(client)
    shutil.copy(tmp_path / "client.key", client / "client.key")
    (client / "ca.crt").write_bytes(b"\x00\x01garbage")
    with pytest.raises(PollenError, match=r"ca\.crt is not a PEM certificate"):
        load_client_certs(client)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.org", False),
        ("localhost.example.org", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


# --------------------------------------------------------------------------- TLS probe


@contextlib.contextmanager
def _tls_server(cert: Path | None, key: Path | None, host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP server on 127.0.0.1 that completes TLS handshakes (or, without cert, answers
    plaintext like an HTTP server does)."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(16)
    sock.settimeout(0.2)
    ctx = None
    if cert is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    if ctx is None:
                        conn.recv(4096)
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    else:
                        with ctx.wrap_socket(conn, server_side=True) as tls:
                            tls.recv(1)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def test_probe_tls(bundle, tmp_path):
    server = bundle.out / "server"
    ca = server / "ca.crt"
    other = create_certs(tmp_path / "other", ["x.example"], clients=1).out
    with _tls_server(server / "server.crt", server / "server.key") as port:
        probe_tls("127.0.0.1", port, ca)
        probe_tls("localhost", port, ca)
        with pytest.raises(PollenError, match="did not sign.*another `pollen certs` run"):
            probe_tls("127.0.0.1", port, other / "clients" / "client-0" / "ca.crt")
        with pytest.raises(PollenError, match="without --certs"):
            probe_tls("127.0.0.1", port, None)
    # 127.0.0.2 is this machine too, but not a name in the certificate.
    with _tls_server(server / "server.crt", server / "server.key", "127.0.0.2") as port:
        with pytest.raises(PollenError, match=r"not valid for 127\.0\.0\.2.*fl\.example\.org"):
            probe_tls("127.0.0.2", port, ca)
    with _tls_server(None, None) as port:
        probe_tls("127.0.0.1", port, None)
        with pytest.raises(PollenError, match="does not speak TLS"):
            probe_tls("127.0.0.1", port, ca)


def test_loopback_tls_is_throwaway_and_valid(tmp_path):
    loop = loopback_tls(tmp_path / "lt")
    assert _mode(loop.key) == 0o600
    with _tls_server(loop.cert, loop.key) as port:
        probe_tls("127.0.0.1", port, loop.ca)


# --------------------------------------------------------------------------- CLI rules


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    from pollen.cli.app import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_paragraph_error(rc: int, err: str, phrase: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pollen: error: "), err
    assert phrase in err, err


def test_cli_certs_command(capsys, tmp_path):
    out = tmp_path / "c"
    rc, stdout, _ = _main(
        capsys, "certs", "--out", str(out), "--server-name", "fl.example.org", "--clients", "3"
    )
    assert rc == 0
    assert f"{out}/clients/client-2" in stdout and "ca.key private" in stdout
    assert len(list((out / "server" / "authorized-clients").glob("*.pub"))) == 3
    rc, _, err = _main(capsys, "certs", "--out", str(out))
    _one_paragraph_error(rc, err, "already exists")
    rc, _, err = _main(capsys, "certs", "--out", str(tmp_path / "d"), "--server-name", "0.0.0.0")
    _one_paragraph_error(rc, err, "not one a client can dial")


def test_cli_transport_errors(capsys, tmp_path, bundle):
    data = tmp_path / "data"
    data.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(bundle.out / "clients" / "client-0", broken)
    (broken / "ca.crt").write_text("not a certificate")
    cases = [
        (["server", "--address", "0.0.0.0:8080"], "pollen certs --out certs --server-name"),
        (["server", "--address", "192.0.2.7:8080"], "add --insecure instead"),
        (["server", "--certs", str(tmp_path / "missing")], "does not exist"),
        (["server", "--certs", str(bundle.out / "clients" / "client-0")], "server.crt is missing"),
        (
            ["server", "--certs", str(bundle.out / "server"), "--insecure"],
            "contradict each other",
        ),
        (["client", "--server", "192.0.2.7:8080", "--data-dir", str(data)], "needs TLS"),
        (
            ["client", "--server", "fl.example.org:8080", "--data-dir", str(data)],
            "--certs DIR",
        ),
        (
            ["client", "--server", "127.0.0.1:1", "--data-dir", str(data), "--certs", str(broken)],
            "ca.crt is not a PEM certificate",
        ),
        (
            [
                "client",
                "--server",
                "127.0.0.1:1",
                "--data-dir",
                str(data),
                "--certs",
                str(bundle.out / "server"),
            ],
            "client.key is missing",
        ),
    ]
    for argv, phrase in cases:
        rc, _, err = _main(capsys, *argv)
        _one_paragraph_error(rc, err, phrase)


def test_insecure_prints_one_warning_and_loopback_needs_nothing(capsys):
    from pollen.cli.transport import _transport

    args = argparse.Namespace(certs=None, insecure=True)
    assert _transport(args, "0.0.0.0:8080", "server") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and "plaintext" in err
    args = argparse.Namespace(certs=None, insecure=False)
    for address in ("127.0.0.1:8080", "localhost:9000", "[::1]:8080"):
        assert _transport(args, address, "server") is None
        assert _transport(args, address, "client") is None
    assert capsys.readouterr().err == ""


def test_server_warns_when_its_address_is_not_in_the_certificate(capsys, bundle):
    from pollen.cli.transport import _transport

    args = argparse.Namespace(certs=bundle.out / "server", insecure=False)
    assert _transport(args, "10.1.2.3:8080", "server").cert.name == "server.crt"
    assert _transport(args, "0.0.0.0:8080", "server") is not None
    assert capsys.readouterr().err == ""
    _transport(args, "192.0.2.9:8080", "server")
    err = capsys.readouterr().err
    assert "does not name 192.0.2.9" in err and "fl.example.org" in err


# --------------------------------------------------------------------------- proxy log


def test_proxy_logs_refused_clients(bundle, caplog):
    """Flower's refusal (412 on activate-node, 401) is logged with peer and key."""
    import base64

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from pollen.deploy.fleet_proxy import FleetProxy, create_app

    async def handle(request):
        if request.url.path.endswith("activate-node"):
            return JSONResponse({"code": 2004}, status_code=412)
        if request.url.path.endswith("pull-messages"):
            return JSONResponse({"detail": "Invalid SuperNode authentication"}, status_code=401)
        return Response(b"", media_type="application/protobuf")

    upstream = Starlette(routes=[Route("/{rest:path}", handle, methods=["POST"])])
    key = serialization.load_ssh_public_key(
        (bundle.out / "clients" / "client-1" / "client.pub").read_bytes()
    )
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    headers = {"flwr-public-key": base64.b64encode(pem).decode()}
    with _serve_asgi(upstream) as port:
        with FleetProxy("127.0.0.1", 0, f"http://127.0.0.1:{port}") as proxy:
            with caplog.at_level(logging.WARNING, logger="pollen.deploy.fleet_proxy"):
                base = f"http://127.0.0.1:{proxy.port}/v1/fleet"
                assert httpx.post(f"{base}/activate-node", headers=headers).status_code == 412
                assert httpx.post(f"{base}/pull-messages", headers=headers).status_code == 401
                assert httpx.post(f"{base}/get-run", headers=headers).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "pollen.deploy.fleet_proxy"]
    assert len(lines) == 2, lines
    fingerprint = bundle.clients["client-1"]
    assert "refused client 127.0.0.1:" in lines[0] and fingerprint in lines[0]
    assert "not among the server's authorized clients" in lines[0]
    assert "no longer knows its node" in lines[1] and "wrong key or clock" in lines[1]
    assert proxy.app.state.refused_clients[fingerprint] == 2
    assert create_app  # the app factory stays importable for the tests of the proxy


@contextlib.contextmanager
def _serve_asgi(app) -> Iterator[int]:
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, ws="none")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# --------------------------------------------------------------------------- end to end


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    from pollen.deploy.processes import port_open

    deadline = time.monotonic() + timeout
    while not port_open("127.0.0.1", port):
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "server port did not open"
        time.sleep(0.5)


@pytest.mark.e2e
def test_tls_run_admits_authorized_clients_only(tmp_path, tiny_data, pollen_env):
    """TLS + client keys: 2 authorized clients finish a run; a client with another CA's
    bundle and a client whose key is not authorized are refused with clear errors."""
    from pollen.deploy.processes import free_port

    certs = create_certs(tmp_path / "certs", ["localhost"], clients=3)
    unknown_fp = certs.clients["client-2"]
    (certs.out / "server" / "authorized-clients" / "client-2.pub").unlink()  # not authorized
    foreign = create_certs(tmp_path / "foreign", ["localhost"], clients=1).out  # another CA

    port = free_port()
    run = tmp_path / "run"
    names = ("server", "good0", "good1", "unknown", "foreign")
    logs = {name: tmp_path / f"{name}.log" for name in names}
    files = {name: open(logs[name], "w") for name in names}  # noqa: SIM115
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["server"] = subprocess.Popen(
            pollen_cmd(
                "server",
                "--address",
                f"127.0.0.1:{port}",
                "--certs",
                str(certs.out / "server"),
                "--min-clients",
                "2",
                "--rounds",
                "1",
                "--model",
                "cnn",
                "--num-classes",
                "3",
                "--test-data",
                str(tiny_data),
                "--out",
                str(run),
                "--lr",
                "0.003",
                "--bn-calibration-examples",
                "32",
            ),
            env=pollen_env,
            stdout=files["server"],
            stderr=subprocess.STDOUT,
        )
        _wait_port(port, procs["server"], logs["server"], 120)

        # A stranger: plaintext is not spoken, and over TLS the Control API stays shut.
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"http://127.0.0.1:{port}/v1/fleet/get-run", timeout=10)
        ca = ssl.create_default_context(cafile=str(certs.out / "server" / "ca.crt"))
        refused = httpx.post(f"https://127.0.0.1:{port}/v1/control/list-runs", verify=ca)
        assert refused.status_code == 403

        bundles = {
            "good0": (certs.out / "clients" / "client-0", "127.0.0.1", 0),
            "good1": (certs.out / "clients" / "client-1", "localhost", 1),  # the DNS SAN
            "unknown": (certs.out / "clients" / "client-2", "127.0.0.1", 0),
            "foreign": (foreign / "clients" / "client-0", "127.0.0.1", 1),
        }
        for name, (folder, host, partition) in bundles.items():
            procs[name] = subprocess.Popen(
                pollen_cmd(
                    "client",
                    "--server",
                    f"{host}:{port}",
                    "--certs",
                    str(folder),
                    "--data-dir",
                    str(tiny_data),
                    "--partition-id",
                    str(partition),
                    "--num-partitions",
                    "2",
                    "--connect-timeout",
                    "60",
                    "--log-dir",
                    str(tmp_path / f"{name}-logs"),
                ),
                env=pollen_env,
                stdout=files[name],
                stderr=subprocess.STDOUT,
            )

        def output(name: str) -> str:
            files[name].flush()
            return logs[name].read_text(errors="replace")

        # Refused clients end on their own, non-zero, with one clear error line, no hang.
        assert procs["foreign"].wait(timeout=120) == 2, output("foreign")[-3000:]
        foreign_err = output("foreign")
        assert "did not sign" in foreign_err and "Traceback" not in foreign_err, foreign_err
        assert procs["unknown"].wait(timeout=120) == 2, output("unknown")[-3000:]
        unknown_err = output("unknown")
        assert "refused this client" in unknown_err and unknown_fp in unknown_err, unknown_err
        assert "Traceback" not in unknown_err

        assert procs["server"].wait(timeout=300) == 0, output("server")[-4000:]
        for name in ("good0", "good1"):
            assert procs[name].wait(timeout=60) == 0, output(name)[-4000:]
        server_log = output("server")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in files.values():
            f.close()

    assert "TLS on; 2 authorized client key(s)" in server_log
    refusals = [line for line in server_log.splitlines() if "refused client" in line]
    assert refusals and all(unknown_fp in line for line in refusals), refusals
    assert "not among the server's authorized clients" in refusals[0]

    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed", status
    history = json.loads((run / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1]
    assert len(history["rounds"][0]["clients"]) == 2
    assert history["rounds"][0]["train"]["examples"] == 72
    for name in ("model.keras", "history.csv", "metrics.png", "classes.json"):
        assert (run / name).is_file(), name
    assert os.path.getsize(run / "logs" / "superlink.log") > 0
