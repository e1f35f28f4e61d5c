"""A deployed client's SuperNode: Flower's ``flower-supernode`` with a shorter idle poll.

Flower 1.42's SuperNode asks the SuperLink for a new message and, when there
is none, sleeps a fixed 3 s before asking again
(``flwr.supernode.start_client_internal``); it then waits for the app's reply
in 0.5-s steps. Every train and every evaluate request of a round therefore
waits 1.5 s on average before the client sees it, plus up to 0.5 s before its
reply leaves: on a loopback deployment of the reference configuration about
3-4 s of each round's overhead. Flower has no setting for these waits.

``pollen client`` runs ``python -m pollen.supernode`` (with
``flower-supernode``'s own arguments) instead: the same SuperNode, in this
process, whose module sees a ``time`` whose ``sleep`` never waits longer than
``POLLEN_SUPERNODE_POLL`` seconds (default :data:`DEFAULT_POLL_SECONDS`).
Each idle poll is one small HTTP request to the server, so the default keeps
an idle client at 2 requests a second; raise it for very large fleets. The
SuperNode's downloads of a message's content also retry sooner
(:func:`pollen.wire.quick_pulls`). With ``POLLEN_PARENT_PID`` set (``pollen
client`` sets its own pid) the SuperNode stops, as on Ctrl-C, once that
process is gone: a ``pollen client`` killed with SIGKILL leaves no SuperNode
behind (its app runner follows its SuperNode the same way).
"""

from __future__ import annotations

import os
import sys
import time
from types import ModuleType

__all__ = ["DEFAULT_POLL_SECONDS", "PARENT_ENV", "POLL_ENV", "capped_time", "main"]

#: Longest wait, in seconds, between the SuperNode's polls (Flower's own: 3 s when idle).
DEFAULT_POLL_SECONDS = 0.5
#: Environment variable that overrides :data:`DEFAULT_POLL_SECONDS`.
POLL_ENV = "POLLEN_SUPERNODE_POLL"
#: Environment variable naming the process whose end stops the SuperNode.
PARENT_ENV = "POLLEN_PARENT_PID"


def capped_time(longest: float) -> ModuleType:
    """A stand-in for the ``time`` module whose ``sleep`` waits at most ``longest`` seconds.

    Args:
        longest: Cap on a single ``sleep``, in seconds (> 0).

    Returns:
        A module object that forwards every other attribute to ``time``.
    """
    if not longest > 0:
        raise ValueError(f"the poll cap must be positive seconds, got {longest!r}")
    capped = ModuleType("time")
    capped.__dict__.update(vars(time))
    capped.sleep = lambda seconds: time.sleep(min(seconds, longest))
    return capped


def poll_seconds() -> float:
    """The cap from ``POLLEN_SUPERNODE_POLL`` (seconds), or :data:`DEFAULT_POLL_SECONDS`.

    Raises:
        PollenError: The variable is set to something other than a positive number.
    """
    from pollen.errors import PollenError

    raw = os.environ.get(POLL_ENV, "").strip()
    if not raw:
        return DEFAULT_POLL_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise PollenError(
            f"{POLL_ENV}={raw!r} is not a positive number of seconds. Set it to how often an "
            f"idle client asks the server for work (for example 0.5, the default), or unset it."
        )
    return value


def main() -> None:
    """``python -m pollen.supernode ARGS``: ``flower-supernode ARGS`` with capped polls."""
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    from pollen.wire import quick_pulls

    if os.environ.get(PARENT_ENV, "").isdigit():  # SIGINT once it is gone: Flower exits cleanly
        start_parent_process_monitor(int(os.environ[PARENT_ENV]))
    start_client_internal.time = capped_time(poll_seconds())
    quick_pulls(start_client_internal, "pull_objects")  # a message's content from the server
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
