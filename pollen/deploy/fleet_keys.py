"""Which Fleet calls are signed by an authorized client key, decided from headers alone.

Contract:
    With client authentication (``pollen server --certs``) the relay knows the
    authorized public keys (:class:`NodeKeys`). A Fleet call whose
    ``flwr-public-key`` is not one of them, or whose ``flwr-signature`` over
    ``flwr-timestamp`` does not verify or is outside Flower's window of now, is
    refused from its headers, before its body is read, with the answer Flower
    would give after buffering it (:attr:`NodeKeys.answers`: 401, or 412 "Failed
    to activate SuperNode" for an unknown key joining). :func:`flower_refusal`
    says in words why Flower itself refused a client.
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "KEY_HEADER_MAX",
    "PUBLIC_KEY_HEADER",
    "UNKNOWN_KEY",
    "NodeKeys",
    "flower_refusal",
]

UNKNOWN_KEY = "its public key is not among the server's authorized clients"

# Flower's window for a signed timestamp (flwr.common.constant: TIMESTAMP_TOLERANCE
# 300 s, SYSTEM_TIME_TOLERANCE 5 s), as in flwr.superlink.routers.fleet.node_auth.
_SIGNED_MAX_AGE = 300 + 5
_SIGNED_MAX_AHEAD = 5
KEY_HEADER_MAX = 4096  # a base64 PEM EC public key is well under 1 KiB

PUBLIC_KEY_HEADER = b"flwr-public-key"
_TIMESTAMP_HEADER = b"flwr-timestamp"
_SIGNATURE_HEADER = b"flwr-signature"


def _flower_refusals() -> dict[str, tuple[int, bytes]]:
    """The answers Flower 1.42 gives a refused SuperNode, by Fleet path ("": any other).

    Byte for byte what its ``http_error_translator`` (error codes 2004 and 2001
    of ``flwr.supercore.error.catalog``) and ``NodeAuthMiddleware`` answer, so the
    SuperNode reports a refused key exactly as if Flower had refused it ("Failed
    to activate SuperNode"). Written out rather than built with Flower's
    catalog, whose import pulls in FastAPI (40 MiB); a test compares them.
    """
    return {
        "/v1/fleet/activate-node": (412, b'{"code":2004,"detail":"Failed to activate SuperNode."}'),
        "/v1/fleet/register-node": (
            412,
            b'{"code":2001,"detail":"SuperNode authentication is enabled. '
            b'All SuperNodes must be registered via the CLI."}',
        ),
        "": (401, b'{"detail":"Invalid SuperNode authentication"}'),
    }


class NodeKeys:
    """The authorized client keys, checked from a request's headers alone."""

    def __init__(self, keys: Iterable[ec.EllipticCurvePublicKey]) -> None:
        self.answers = _flower_refusals()
        self._by_der: dict[bytes, ec.EllipticCurvePublicKey] = {}
        self._by_header: dict[bytes, ec.EllipticCurvePublicKey] = {}
        for key in keys:
            # Flower sends base64(PEM SubjectPublicKeyInfo): match that first, byte for byte.
            pem = key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            self._by_header[base64.b64encode(pem)] = key
            self._by_der[_spki_der(key)] = key

    def _key(self, header: bytes) -> ec.EllipticCurvePublicKey | None:
        key = self._by_header.get(header)
        if key is not None or len(header) > KEY_HEADER_MAX:
            return key
        try:
            sent = serialization.load_pem_public_key(base64.b64decode(header, validate=True))
        except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm):
            return None
        if not isinstance(sent, ec.EllipticCurvePublicKey):
            return None
        return self._by_der.get(_spki_der(sent))

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """Why a request with these headers is refused (None: signed by an authorized key)."""
        found: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            name = name.lower()
            if name in (PUBLIC_KEY_HEADER, _TIMESTAMP_HEADER, _SIGNATURE_HEADER):
                found.setdefault(name, []).append(value)
        key_values = found.get(PUBLIC_KEY_HEADER, [])
        if len(key_values) != 1:
            return "it sent no client key (or several)"
        key = self._key(key_values[0])
        if key is None:
            return UNKNOWN_KEY
        stamps, signatures = found.get(_TIMESTAMP_HEADER, []), found.get(_SIGNATURE_HEADER, [])
        if len(stamps) != 1 or len(signatures) != 1 or not _fresh(stamps[0]):
            return "its request carries no current signed timestamp (check its clock)"
        try:
            key.verify(
                base64.b64decode(signatures[0], validate=True),
                stamps[0],
                ec.ECDSA(hashes.SHA256()),
            )
        except (ValueError, binascii.Error, InvalidSignature):
            return "its request signature did not verify"
        return None


def _spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _fresh(stamp: bytes) -> bool:
    """Whether a ``flwr-timestamp`` is an aware ISO time within Flower's window of now."""
    try:
        signed_at = datetime.datetime.fromisoformat(stamp.decode("ascii"))
        age = (datetime.datetime.now(datetime.UTC) - signed_at).total_seconds()
    except (UnicodeDecodeError, ValueError, TypeError):  # TypeError: a naive time
        return False
    return -_SIGNED_MAX_AHEAD < age < _SIGNED_MAX_AGE


def flower_refusal(path: str, status: int) -> str:
    """Why Flower refused a client, from the call and its answer."""
    if status == 401:
        # Flower's NodeAuthMiddleware: a bad signature or timestamp, or a key whose node
        # the SuperLink no longer has under that id (dropped for late heartbeats, or
        # joined again). The relay checks signatures itself when it knows the keys.
        return (
            "Flower did not accept its signed request: the server no longer knows its node "
            "(late heartbeats, or it joined again), or a wrong key or clock"
        )
    if path.endswith("/activate-node"):
        return "its public key is not among the server's authorized clients"
    return "it tried to register itself, but only authorized client keys may join"
