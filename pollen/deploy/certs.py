"""Certificates and keys for a real deployment: TLS and client authentication.

``pollen certs`` (:func:`create_certs`) writes everything a federation needs into
one folder, already sorted by who gets which file::

    certs/
      README.txt                   this layout, in short
      ca/                          the certificate authority: keep it off the server
        ca.key                     the CA's private key (0600). It signs server
                                   certificates; whoever holds it can impersonate the
                                   server. Never hand it out.
        ca.crt                     the CA's certificate (public)
      server/                      `pollen server --certs certs/server`; stays on the server
        ca.crt                     the CA certificate, to check server.crt against
        server.crt                 the server's TLS certificate, signed by the CA; its
                                   subject alternative names are every name and address
                                   clients may dial (DNS names and IP addresses as such)
        server.key                 its private key (0600)
        authorized-clients/        one OpenSSH public key per client allowed to join
          client-0.pub ...         (delete a file to lock that client out; add one made
                                   with `ssh-keygen -t ecdsa -b 384` to let a new one in)
      clients/client-i/            `pollen client --certs client-i` on participant i's
                                   machine: copy the whole folder there
        ca.crt                     the CA certificate: the client trusts a server only
                                   if its certificate was signed by this CA
        client.key                 the client's private key (0600): ECDSA P-384 in
                                   OpenSSH format, what ``flower-supernode
                                   --auth-supernode-private-key`` loads
                                   (``load_ssh_private_key``, an EC key)
        client.pub                 its public key, the same as
                                   server/authorized-clients/client-i.pub

``server.crt``, ``server.key`` and ``ca.crt`` serve TLS; ``client.key`` and
``authorized-clients/`` are Flower's SuperNode authentication (a client signs
every request with its key; not mutual TLS). :mod:`pollen.deploy.tls` checks
these folders before a server or client starts. :func:`loopback_tls` makes the
throwaway CA and certificate of the server's loopback hop.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pollen.errors import PollenError

#: Names every server certificate covers, besides those given.
ALWAYS_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

#: Validity of the CA and of server certificates, in days.
CA_DAYS = 3650
SERVER_DAYS = 825

#: File and folder names of the layout described in the module docstring.
CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
AUTHORIZED = "authorized-clients"
CLIENT_KEY = "client.key"
CLIENT_PUB = "client.pub"

_ENTRIES = ("README.txt", "ca", "server", "clients")
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_README = """\
Made by `pollen certs`. Who gets what:

  ca/                 keep off the server and never hand out: ca.key signs server
                      certificates (whoever holds it can impersonate the server)
  server/             on the server only:   pollen server --certs server/ ...
  clients/client-i/   copy to participant i: pollen client --certs client-i/ ...

Server names in server.crt: {names}
Authorized clients (server/authorized-clients/*.pub, SHA-256 fingerprints):
{fingerprints}

To lock a client out, delete its .pub file from server/authorized-clients and
restart the server. To add one, make a key pair on its machine with
`ssh-keygen -t ecdsa -b 384 -N '' -f client.key`, put client.key and ca.crt in a
folder for `pollen client --certs`, and copy client.key.pub into
server/authorized-clients/ as NAME.pub.
"""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def openssh_public(key: ec.EllipticCurvePublicKey, comment: str = "") -> bytes:
    """A public key as one OpenSSH ``authorized_keys`` line."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + (b" " + comment.encode() if comment else b"") + b"\n"


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:...`` fingerprint of a public key, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(openssh_public(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def pem_key_fingerprint(pem: bytes) -> str | None:
    """Fingerprint of a PEM public key (as Flower sends it), or None if unreadable."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    return key_fingerprint(key)


def classify_server_names(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split server names into DNS names and IP addresses, validated and de-duplicated.

    Raises:
        PollenError: A name is neither a valid host name nor an IP address, or it
            is an address no client can dial (0.0.0.0, ::).
    """
    dns: list[str] = []
    ips: list[str] = []
    for raw in names:
        name = raw.strip().strip("[]")
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            ip = None
        if ip is not None:
            if ip.is_unspecified:
                raise PollenError(
                    f"--server-name {raw}: {name} is the 'listen on every interface' "
                    "address, not one a client can dial. Give the host name or IP address "
                    "clients will use to reach the server (repeat --server-name for several)."
                )
            if str(ip) not in ips:
                ips.append(str(ip))
            continue
        host = name.rstrip(".").lower()
        labels = host.split(".")
        if labels and labels[0] == "*":
            labels = labels[1:]
        if (
            not host
            or len(host) > 253
            or not labels
            or not all(_DNS_LABEL.match(label) for label in labels)
        ):
            raise PollenError(
                f"--server-name {raw!r} is neither a host name (letters, digits, hyphens "
                "and dots, like fl.example.org) nor an IP address. Give the name or address "
                "clients will dial to reach the server."
            )
        if host not in dns:
            dns.append(host)
    return dns, ips


# --------------------------------------------------------------------------- creation


def _new_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP384R1())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Digital signatures for every certificate; certificate and CRL signing for the CA only."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(common_name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(ca=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    dns: Sequence[str],
    ips: Sequence[str],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    common_name = (list(dns) + list(ips))[0][:64]
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(ca=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


@dataclass(frozen=True)
class CertsSummary:
    """What :func:`create_certs` wrote."""

    out: Path
    dns: list[str]
    ips: list[str]
    clients: dict[str, str]  # name -> public key fingerprint


def default_server_names() -> list[str]:
    """This host's name (``socket.gethostname()``), the default ``--server-name``.

    Empty if the host name is not a valid DNS name (then only the loopback
    names are in the certificate).
    """
    name = socket.gethostname().strip()
    try:
        classify_server_names([name])
    except PollenError:
        return []
    return [name]


def create_certs(
    out: Path,
    server_names: Sequence[str] | None = None,
    clients: int = 2,
    *,
    force: bool = False,
) -> CertsSummary:
    """Write a CA, a server certificate and ``clients`` client key pairs into ``out``.

    The layout is in the module docstring. Files are first written into a
    temporary sibling folder and then moved into place, so a failure leaves no
    half-made folder behind.

    Args:
        out: The folder to create.
        server_names: Names and IP addresses clients dial (default: this host's
            name); ``localhost``, ``127.0.0.1`` and ``::1`` are always added.
        clients: How many client key pairs to make.
        force: Replace the files of an existing ``out`` (other files in it stay).

    Returns:
        What was written: the folder, the certificate's names, the clients.

    Raises:
        PollenError: ``out`` exists and is not empty (without ``force``), or a
            server name is invalid.
    """
    out = Path(out).expanduser().resolve()
    if clients < 1:
        raise PollenError("--clients must be at least 1: a federation needs clients.")
    names = list(server_names) if server_names else default_server_names()
    dns, ips = classify_server_names([*names, *ALWAYS_NAMES])
    if out.exists() and not out.is_dir():
        raise PollenError(f"--out {out} is a file, not a folder: choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PollenError(
            f"{out} already exists and is not empty; pollen certs will not overwrite it "
            "(a new CA would lock out every client holding the old bundles). Choose another "
            "--out, or add --force to replace its certificates and keys."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        fingerprints = _write_layout(staging, dns, ips, clients)
        out.mkdir(exist_ok=True)
        for entry in _ENTRIES:
            target = out / entry
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(staging / entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return CertsSummary(out=out, dns=dns, ips=ips, clients=fingerprints)


def _write_layout(root: Path, dns: list[str], ips: list[str], clients: int) -> dict[str, str]:
    ca_key, ca_cert = _make_ca("Pollen federation CA", CA_DAYS)
    server_key, server_cert = _make_server_cert(ca_key, ca_cert, dns, ips, SERVER_DAYS)

    (root / "ca").mkdir(mode=0o700)
    _write_private(root / "ca" / CA_KEY, _pem_key(ca_key))
    _write_public(root / "ca" / CA_CERT, _pem_cert(ca_cert))

    server = root / "server"
    (server / AUTHORIZED).mkdir(parents=True)
    _write_public(server / CA_CERT, _pem_cert(ca_cert))
    _write_public(server / SERVER_CERT, _pem_cert(server_cert))
    _write_private(server / SERVER_KEY, _pem_key(server_key))

    fingerprints: dict[str, str] = {}
    for i in range(clients):
        name = f"client-{i}"
        key = _new_key(ec.SECP384R1())
        public = openssh_public(key.public_key(), name)
        folder = root / "clients" / name
        folder.mkdir(parents=True, mode=0o700)
        _write_public(folder / CA_CERT, _pem_cert(ca_cert))
        _write_private(
            folder / CLIENT_KEY,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
        _write_public(folder / CLIENT_PUB, public)
        _write_public(server / AUTHORIZED / f"{name}.pub", public)
        fingerprints[name] = key_fingerprint(key.public_key())

    (root / "README.txt").write_text(
        _README.format(
            names=", ".join([*dns, *ips]),
            fingerprints="\n".join(f"  {n}: {fp}" for n, fp in fingerprints.items()),
        )
    )
    return fingerprints


# --------------------------------------------------------------------------- loopback


@dataclass(frozen=True)
class LoopbackTLS:
    """A throwaway CA and a certificate for 127.0.0.1, for the server's loopback hop."""

    ca: Path
    cert: Path
    key: Path


def loopback_tls(folder: Path) -> LoopbackTLS:
    """Make a throwaway CA and a 127.0.0.1/localhost certificate in ``folder``.

    The server runs Flower's SuperLink with TLS on a private loopback port
    (Flower enables SuperNode authentication only with TLS). These files live
    in the server's temporary Flower home and disappear with it.
    """
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key, ca_cert = _make_ca("Pollen loopback CA", CA_DAYS)
    key, cert = _make_server_cert(ca_key, ca_cert, ["localhost"], ["127.0.0.1"], CA_DAYS)
    paths = LoopbackTLS(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    _write_public(paths.ca, _pem_cert(ca_cert))
    _write_public(paths.cert, _pem_cert(cert))
    _write_private(paths.key, _pem_key(key))
    return paths
