"""Transport security of ``pollen server`` and ``pollen client``: TLS, or plaintext.

With ``--certs`` they use TLS and client authentication; without it they refuse any
address other than loopback unless ``--insecure`` says plaintext is wanted (then they
print a warning).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pollen.deploy.runtime import split_address
from pollen.deploy.tls import is_loopback, load_client_certs, load_server_certs
from pollen.errors import PollenError


def _transport(args: argparse.Namespace, address: str, role: str) -> Any:
    """Checked certificates for ``--certs``, or None for plaintext (see module doc).

    ``args`` has ``certs`` (a folder or None) and ``insecure``; ``address`` is the
    HOST:PORT served (``role`` "server") or dialled (``role`` "client"). Prints a
    warning for ``--insecure`` and for a server certificate that does not name HOST.

    Raises:
        PollenError: Contradicting options, unusable certificates, or a non-loopback
            address without ``--certs`` or ``--insecure``.
    """
    host, _ = split_address(address)
    if args.certs is not None and args.insecure:
        raise PollenError(
            "--certs and --insecure contradict each other: --certs turns TLS and client "
            "authentication on, --insecure turns them off. Give only one of them."
        )
    if args.certs is not None and role == "client":
        return load_client_certs(args.certs)
    if args.certs is not None:
        certs = load_server_certs(args.certs)
        names = {n.lower() for n in certs.names}
        # Waived B104: a comparison, not a bind: the wildcard addresses name no certificate host.
        if host not in ("0.0.0.0", "::") and host.lower() not in names:  # nosec B104
            print(
                f"pollen: warning: the server certificate does not name {host} (it names "
                f"{', '.join(certs.names)}): clients must dial one of those names.",
                file=sys.stderr,
                flush=True,
            )
        return certs
    if args.insecure:
        who = "any client may join" if role == "server" else "the server is not verified"
        print(
            f"pollen: warning: --insecure: traffic to and from {address} is plaintext and "
            f"{who}; use it only on a trusted network or VPN.",
            file=sys.stderr,
            flush=True,
        )
        return None
    if is_loopback(host):
        return None
    if role == "server":
        raise PollenError(
            f"--address {address} is reachable from other machines, so the server needs TLS "
            "and client keys: run `pollen certs --out certs --server-name HOST` (HOST: the "
            "name or IP address clients dial), start the server with --certs certs/server "
            "and give client i the folder certs/clients/client-i. On a trusted network you "
            "may add --insecure instead (plaintext, any client may join)."
        )
    raise PollenError(
        f"--server {address} is another machine, so this client needs TLS: start it with "
        "--certs DIR, the folder the server's operator made for this client with `pollen "
        "certs` (DIR/clients/client-i: ca.crt, client.key). If the server was started with "
        "--insecure on a trusted network, add --insecure instead."
    )
