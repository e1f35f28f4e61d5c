"""Checking certificates and keys before anything starts, and TLS from the client side.

The folders are those :func:`pollen.deploy.certs.create_certs` writes (layout in
:mod:`pollen.deploy.certs`). Two separate mechanisms use these files:

- **TLS** (``ca.crt``, ``server.crt``, ``server.key``): the server proves it is the
  server, and all traffic between clients and the server is encrypted. Clients
  check the server's certificate against ``ca.crt`` and the address they dial.
- **Client authentication** (Flower's SuperNode authentication: ``client.key``,
  ``authorized-clients/``): a client signs every request with its private key; the
  server registers each public key in ``authorized-clients`` with Flower before the
  run, and Flower refuses any other key ("Failed to activate SuperNode"). This is
  not mutual TLS: clients have key pairs, not certificates.

The server's loopback hop (proxy to Flower's SuperLink, and the ``flwr`` CLI) also
runs TLS, because Flower enables SuperNode authentication only with TLS; it uses a
throwaway CA and certificate made at start-up
(:func:`pollen.deploy.certs.loopback_tls`), so the operator's ``server.crt`` needs no
loopback names.

:func:`load_server_certs` and :func:`load_client_certs` check a folder before
anything starts (files present, PEM/OpenSSH parseable, keys matching, certificate
signed by the CA and within its validity period) and raise a
:class:`~pollen.errors.PollenError` naming the file and what to do;
:func:`probe_tls` checks the server's certificate from a client before Flower's
SuperNode starts, so a wrong CA or name is reported precisely instead of as a
generic connection failure.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pollen.deploy.certs import (
    AUTHORIZED,
    CA_CERT,
    CLIENT_KEY,
    SERVER_CERT,
    SERVER_KEY,
    key_fingerprint,
)
from pollen.errors import PollenError

_REGENERATE = (
    "run `pollen certs --out DIR --server-name HOST` (HOST: the name or address clients "
    "dial) on a trusted machine"
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost).

    ``0.0.0.0`` and ``::`` are not loopback: they listen on every interface.
    """
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ServerCerts:
    """A validated ``server/`` folder: what ``pollen server --certs`` uses."""

    folder: Path
    ca: Path
    cert: Path
    key: Path
    authorized: tuple[Path, ...]
    names: tuple[str, ...]


@dataclass(frozen=True)
class ClientCerts:
    """A validated ``clients/client-i/`` folder: what ``pollen client --certs`` uses."""

    folder: Path
    ca: Path
    key: Path
    fingerprint: str


def _certs_folder(folder: Path, role: str) -> Path:
    folder = Path(folder).expanduser().resolve()
    what = "DIR/server" if role == "server" else "DIR/clients/client-i"
    if not folder.is_dir():
        raise PollenError(
            f"--certs {folder} {'is not a folder' if folder.exists() else 'does not exist'}: "
            f"give the {what} folder that `pollen certs --out DIR` made (to make one, "
            f"{_REGENERATE})."
        )
    return folder


def _need_file(folder: Path, name: str, role: str, hint: str = "") -> Path:
    path = folder / name
    if not path.is_file():
        what = "DIR/server" if role == "server" else "DIR/clients/client-i"
        raise PollenError(
            f"{path} is missing: --certs for `pollen {role}` must be the {what} folder "
            f"made by `pollen certs`{hint}. Point --certs at that folder, or {_REGENERATE}."
        )
    return path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PollenError(
            f"Cannot read {path}: {exc.strerror or exc}. Check the file's permissions "
            "(the user running pollen must be able to read it)."
        ) from exc


def _load_certs(path: Path) -> list[x509.Certificate]:
    data = _read(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise PollenError(
            f"{path} is not a PEM certificate (a text file starting with '-----BEGIN "
            f"CERTIFICATE-----'). Copy the right file from the folder `pollen certs` made, "
            f"or {_REGENERATE}."
        )
    now = _now()
    for cert in certs:
        if cert.not_valid_after_utc < now:
            raise PollenError(
                f"The certificate in {path} expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC. Make new certificates: "
                f"{_REGENERATE}, then hand the new client bundles out."
            )
        if cert.not_valid_before_utc > now + datetime.timedelta(minutes=5):
            raise PollenError(
                f"The certificate in {path} is valid only from "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: this machine's clock is "
                "wrong, or the certificate was made on a machine whose clock is ahead. Fix "
                "the clock (or wait), then start again."
            )
    return certs


def _chain_to(chain: list[x509.Certificate], ca: x509.Certificate) -> bool:
    """Whether ``chain`` (leaf first) leads to ``ca`` by valid signatures."""
    for child, parent in zip(chain, [*chain[1:], ca], strict=False):
        if child == parent:  # the file holds the CA itself at its end
            return True
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            return False
    return True


def _public_bytes(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cert_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses in a certificate's subject alternative names."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName)] + [
        str(a) for a in san.get_values_for_type(x509.IPAddress)
    ]


def load_authorized_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load one authorized client public key as ``flwr supernode register`` does.

    Raises:
        PollenError: The file is not an OpenSSH EC public key on a NIST curve.
    """
    try:
        key = serialization.load_ssh_public_key(_read(path).strip())
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        raise PollenError(
            f"{path} is not a client public key: each file in {AUTHORIZED}/ must hold one "
            "ECDSA public key in OpenSSH format (a line starting with 'ecdsa-sha2-nistp384', "
            "as in client.pub from `pollen certs` or the .pub file of `ssh-keygen -t ecdsa "
            "-b 384`). Replace or remove the file."
        )
    return key


def load_server_certs(folder: Path) -> ServerCerts:
    """Check a ``server/`` folder made by ``pollen certs`` and return its files.

    Raises:
        PollenError: The folder or a file is missing, a file is not a PEM
            certificate/key or an OpenSSH public key, the key does not belong to the
            certificate, the certificate is not signed by ``ca.crt`` or has expired,
            or no client is authorized.
    """
    folder = _certs_folder(folder, "server")
    hint = ""
    if (folder / "server" / SERVER_CERT).is_file():
        hint = f" (did you mean --certs {folder / 'server'}?)"
    elif (folder / CLIENT_KEY).is_file():
        hint = " (this looks like a client's bundle: clients use it, the server does not)"
    ca_path = _need_file(folder, CA_CERT, "server", hint)
    cert_path = _need_file(folder, SERVER_CERT, "server", hint)
    key_path = _need_file(folder, SERVER_KEY, "server", hint)
    leaf = _check_server_pair(ca_path, cert_path, key_path)
    return ServerCerts(
        folder=folder,
        ca=ca_path,
        cert=cert_path,
        key=key_path,
        authorized=_authorized_keys(folder / AUTHORIZED),
        names=tuple(cert_names(leaf)),
    )


def _check_server_pair(ca_path: Path, cert_path: Path, key_path: Path) -> x509.Certificate:
    """Check that ``cert_path`` chains to ``ca_path`` and ``key_path`` is its key; return the leaf.

    Raises:
        PollenError: A file is unreadable or not PEM, the chain does not lead to
            the CA, or the key is encrypted or belongs to another certificate.
    """
    ca = _load_certs(ca_path)[0]
    chain = _load_certs(cert_path)
    if not _chain_to(chain, ca):
        raise PollenError(
            f"{cert_path} is not signed by the CA in {ca_path}: the two files come from "
            "different `pollen certs` runs. Copy server.crt, server.key and ca.crt from the "
            "same DIR/server folder (the clients' ca.crt must be that same CA)."
        )
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except TypeError as exc:
        raise PollenError(
            f"{key_path} is protected by a passphrase; the server needs an unencrypted key "
            "(kept with mode 0600). Use the server.key that `pollen certs` made."
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PollenError(
            f"{key_path} is not a PEM private key (a text file starting with '-----BEGIN "
            f"PRIVATE KEY-----'). Copy the server.key made together with server.crt, or "
            f"{_REGENERATE}."
        ) from exc
    if _public_bytes(key.public_key()) != _public_bytes(chain[0].public_key()):
        raise PollenError(
            f"{key_path} does not belong to the certificate {cert_path}: copy server.crt and "
            "server.key from the same `pollen certs` folder."
        )
    return chain[0]


def _authorized_keys(authorized_dir: Path) -> tuple[Path, ...]:
    """The ``*.pub`` files in ``authorized_dir``, sorted, each checked and all distinct.

    Raises:
        PollenError: The folder is missing or empty, a file is not a client public
            key, or two files hold the same key.
    """
    if not authorized_dir.is_dir():
        raise PollenError(
            f"{authorized_dir} is missing: it holds the public keys of the clients allowed "
            "to join (client-i.pub from `pollen certs`). Create it and put one .pub file per "
            "client in it."
        )
    authorized = tuple(sorted(p for p in authorized_dir.iterdir() if p.suffix == ".pub"))
    if not authorized:
        raise PollenError(
            f"{authorized_dir} holds no client public keys (*.pub), so no client could "
            "join. Copy the clients' client.pub files there (one NAME.pub per client)."
        )
    fingerprints: dict[str, Path] = {}
    for path in authorized:
        fp = key_fingerprint(load_authorized_key(path))
        if fp in fingerprints:
            raise PollenError(
                f"{path} and {fingerprints[fp]} hold the same public key: each client needs "
                "its own key pair. Remove one of the two files."
            )
        fingerprints[fp] = path
    return authorized


def load_client_certs(folder: Path) -> ClientCerts:
    """Check a ``clients/client-i/`` folder made by ``pollen certs`` and return its files.

    Raises:
        PollenError: The folder or a file is missing, ``ca.crt`` is not a valid PEM
            certificate, or ``client.key`` is not an unencrypted OpenSSH EC key.
    """
    folder = _certs_folder(folder, "client")
    hint = ""
    if (folder / "clients").is_dir():
        hint = f" (did you mean one of {folder / 'clients'}/client-i?)"
    elif (folder / SERVER_KEY).is_file():
        hint = " (this is the server's folder; clients get DIR/clients/client-i)"
    ca_path = _need_file(folder, CA_CERT, "client", hint)
    key_path = _need_file(folder, CLIENT_KEY, "client", hint)
    _load_certs(ca_path)
    try:
        key = serialization.load_ssh_private_key(_read(key_path), None)
    except TypeError as exc:
        raise PollenError(
            f"{key_path} is protected by a passphrase; Flower needs an unencrypted key. "
            "Use the client.key that `pollen certs` made, or remove the passphrase with "
            f"`ssh-keygen -p -N '' -f {key_path}`."
        ) from exc
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PollenError(
            f"{key_path} is not a client private key: Flower needs an ECDSA key in OpenSSH "
            "format (a file starting with '-----BEGIN OPENSSH PRIVATE KEY-----', as made by "
            "`pollen certs` or `ssh-keygen -t ecdsa -b 384`). Use the client.key from your "
            "bundle."
        )
    return ClientCerts(
        folder=folder, ca=ca_path, key=key_path, fingerprint=key_fingerprint(key.public_key())
    )


# --------------------------------------------------------------------------- client side


def _peer_names(host: str, port: int, timeout: float) -> list[str]:
    """The names in the certificate the server presents (no verification)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with contextlib.suppress(OSError, ValueError):
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
        if der:
            return cert_names(x509.load_der_x509_certificate(der))
    return []


def probe_tls(host: str, port: int, ca: Path | None, timeout: float = 10.0) -> None:
    """Check from a client that the server's transport matches this client's.

    With ``ca``: the server must speak TLS with a certificate signed by ``ca`` and
    valid for ``host``. Without: the server must not speak TLS (a plaintext client
    would otherwise retry forever). Network errors are ignored here: the
    client's watchdog reports an unreachable server.

    Raises:
        PollenError: The server's certificate fails the check, or the server's
            transport (TLS or plaintext) differs from this client's.
    """
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if ca is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host):
                pass
    except ssl.SSLCertVerificationError as exc:
        reason = (exc.verify_message or str(exc)).lower()
        if "mismatch" in reason:
            names = ", ".join(_peer_names(host, port, timeout)) or "other names"
            raise PollenError(
                f"The server's TLS certificate is not valid for {host}: it covers {names}. "
                f"Dial the server by one of those names with --server, or make the "
                f"certificates again with `pollen certs --server-name {host}` (and hand out "
                "the new bundles)."
            ) from exc
        if "expired" in reason:
            raise PollenError(
                f"The server at {address} presents an expired TLS certificate. Ask its "
                "operator to make new certificates with `pollen certs` and restart the server."
            ) from exc
        raise PollenError(
            f"The server at {address} presents a TLS certificate that the CA in {ca} did not "
            f"sign ({exc.verify_message or exc}): this client's bundle comes from another "
            "`pollen certs` run than the server's certificate, or another server answers "
            "there. Get this client's bundle (DIR/clients/client-i) from the same folder as "
            "the server's, and check --server."
        ) from exc
    except ssl.SSLError as exc:
        if ca is not None:
            raise PollenError(
                f"The server at {address} does not speak TLS ({exc.reason or exc}): it runs "
                "in plaintext (started with --insecure, or on a loopback address without "
                "--certs). Ask its operator to start it with --certs DIR/server, or drop "
                "--certs here and add --insecure on a trusted network only."
            ) from exc
        return  # plaintext client, plaintext server: the handshake fails as it should
    except OSError:
        return
    if ca is None:
        raise PollenError(
            f"The server at {address} uses TLS, but this client was started without "
            "--certs. Start it with --certs DIR/clients/client-i, the bundle the server's "
            "operator made for this client with `pollen certs`."
        )
