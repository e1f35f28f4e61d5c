"""A deployed client's SuperNode: Flower's ``flower-supernode`` with a shorter idle poll.

Flower 1.42's SuperNode asks the SuperLink for a new message and, when there
is none, sleeps a fixed 3 s before asking again
(``flwr.supernode.start_client_internal``); it then waits for the app's reply
in 0.5-s steps. Every train and every evaluate request of a round therefore
waits 1.5 s on average before the client sees it, plus 0.25 s on average
before its reply leaves (see docs/performance.md#supernode-poll). Flower has no
setting for these waits.

``pollen client`` runs ``python -m pollen.deploy.supernode`` (with
``flower-supernode``'s own arguments) instead: the same SuperNode, in this
process, whose module sees a ``time`` with a shorter ``sleep``
(:func:`capped_time`): an idle poll waits at most ``POLLEN_SUPERNODE_POLL``
seconds (default :data:`DEFAULT_POLL_SECONDS`), or a fifth of that
(:data:`BUSY_POLL_SHARE`) during the :data:`BUSY_WINDOW_SECONDS` after the
SuperNode last handled a message (a round's next message follows its last
reply within a second or two), and a wait for the node's own app at most
:data:`LOCAL_WAIT_SECONDS`. Each poll is one small HTTP request to the
server: a client polls 10 times a second in a busy window, twice a second just
after it, and less often the longer it stays idle, down to Flower's own once
every 3 s (:data:`IDLE_RAMP_SECONDS`, :data:`IDLE_POLL_MAX_SECONDS`). The SuperNode's downloads of a
message's content also retry sooner
(:func:`pollen.compat.flower.quick_pulls`). With ``POLLEN_PARENT_PID`` set (``pollen
client`` sets its own pid) the SuperNode stops, as on Ctrl-C, once that
process is gone: a ``pollen client`` killed with SIGKILL leaves no SuperNode
behind (its app runner follows its SuperNode the same way).
"""

from __future__ import annotations

import os
import sys
import time
from types import ModuleType

from pollen.compat.flower import (
    cap_supernode_sleeps,
    declare_heartbeat_interval,
    quick_supernode_pulls,
    start_parent_process_monitor,
)
from pollen.errors import PollenError

__all__ = [
    "BUSY_POLL_SHARE",
    "BUSY_WINDOW_SECONDS",
    "DEFAULT_POLL_SECONDS",
    "HEARTBEAT_DECLARED_SECONDS",
    "HEARTBEAT_ENV",
    "HEARTBEAT_MIN_SECONDS",
    "IDLE_POLL_MAX_SECONDS",
    "IDLE_RAMP_SECONDS",
    "LOCAL_WAIT_SECONDS",
    "PARENT_ENV",
    "POLL_ENV",
    "capped_time",
    "heartbeat_seconds",
    "main",
]

#: Longest wait, in seconds, between the SuperNode's polls (Flower's own: 3 s when idle).
DEFAULT_POLL_SECONDS = 0.5
#: Longest wait between polls soon after the SuperNode handled a message, as a share
#: of the idle one (0.1 s by default).
BUSY_POLL_SHARE = 0.2
#: Seconds after the SuperNode last waited for its app during which polls are quicker.
BUSY_WINDOW_SECONDS = 10.0
#: Longest wait, seconds, on the node's own state: its app's reply, an object's
#: content in its store (Flower's own: 0.5 s). Each check is in memory.
LOCAL_WAIT_SECONDS = 0.02
#: An idle node polls less and less often: its cap grows from the idle one by itself
#: every IDLE_RAMP_SECONDS of idleness after the busy window, up to Flower's own 3 s.
#: Fifty nodes polling every 0.5 s kept 2 cores busy (each poll is a signed HTTP
#: request through the relay to the SuperLink), so that they answered their own
#: clients' connection checks late (benchmarks/scale_deploy.py).
IDLE_RAMP_SECONDS, IDLE_POLL_MAX_SECONDS = 20.0, 3.0
#: Flower's sleeps at least this long are idle polls of the server (3 s in 1.42);
#: shorter ones wait on the node's own state (0.5 s).
_POLL_SLEEP_AT_LEAST = 1.0
#: The heartbeat interval the SuperNode declares (Flower's: 30 s); the SuperLink drops a
#: node after twice that without a heartbeat. Heartbeats still leave every ~20 s: the
#: longer allowance keeps a client whose heartbeats come late on a busy machine (50
#: clients training on 2 cores beside the server, benchmarks/scale_deploy.py: 14 of
#: 50 were dropped as "Node Unavailable" in round 1) two minutes instead of one.
HEARTBEAT_DECLARED_SECONDS = 60
#: Environment variable that overrides :data:`HEARTBEAT_DECLARED_SECONDS`, from
#: :data:`HEARTBEAT_MIN_SECONDS` to 1,800 s (Flower's upper bound): shorter notices a dead
#: client sooner, longer tolerates a busier machine.
HEARTBEAT_ENV = "POLLEN_SUPERNODE_HEARTBEAT"
#: The shortest interval it may declare: Flower's own. Flower accepts 10 s, but its
#: heartbeats leave every 17.5-22.5 s whatever is declared (``flwr.supercore.heartbeat``),
#: and the allowance is twice what is declared: a node declaring less than ~12 s would go
#: offline between two heartbeats, and one declaring 15 s after any late one.
HEARTBEAT_MIN_SECONDS = 30
#: Environment variable that overrides :data:`DEFAULT_POLL_SECONDS`.
POLL_ENV = "POLLEN_SUPERNODE_POLL"
#: Environment variable naming the process whose end stops the SuperNode.
PARENT_ENV = "POLLEN_PARENT_PID"


def capped_time(
    longest: float,
    *,
    busy: float | None = None,
    window: float = BUSY_WINDOW_SECONDS,
    local: float = LOCAL_WAIT_SECONDS,
) -> ModuleType:
    """A stand-in for the ``time`` module whose ``sleep`` waits less than Flower asks.

    A requested sleep of 1 s or more is an idle poll of the server: it waits
    at most ``busy`` seconds while less than ``window`` seconds have passed
    since the last shorter sleep; after that at most ``longest`` seconds, growing
    by ``longest`` every :data:`IDLE_RAMP_SECONDS` of further idleness up to
    :data:`IDLE_POLL_MAX_SECONDS` (or ``longest`` if that is more). The node's
    start opens a busy window too. A shorter sleep waits on
    the node's own state (its app's reply): at most ``local`` seconds, and it
    starts the busy window.

    Args:
        longest: Cap on an idle poll, in seconds (> 0).
        busy: Cap on a poll in the busy window, in seconds (> 0); default:
            ``longest`` times :data:`BUSY_POLL_SHARE`.
        window: Length of the busy window, in seconds (>= 0; 0: none).
        local: Cap on a wait on the node's own state, in seconds (> 0).

    Returns:
        A module object that forwards every other attribute to ``time``.
    """
    busy = longest * BUSY_POLL_SHARE if busy is None else busy
    if not (longest > 0 and busy > 0 and local > 0 and window >= 0):
        raise ValueError(
            f"the poll caps must be positive seconds, got {longest!r}, {busy!r}, {local!r} "
            f"(window {window!r})"
        )
    # Monotonic time of the last wait on the node's own state; a node that starts is
    # about to get work (a federation waits for it), so its start counts as one.
    last_local = [time.monotonic()]

    def sleep(seconds: float) -> None:
        if seconds < _POLL_SLEEP_AT_LEAST:
            last_local[0] = time.monotonic()
            time.sleep(min(seconds, local))
        elif (idle := time.monotonic() - last_local[0] - window) < 0:
            time.sleep(min(seconds, busy, longest))
        else:
            ramp = longest * (1 + idle / IDLE_RAMP_SECONDS)
            time.sleep(min(seconds, max(longest, min(ramp, IDLE_POLL_MAX_SECONDS))))

    capped = ModuleType("time")
    capped.__dict__.update(vars(time))
    capped.sleep = sleep
    return capped


def poll_seconds() -> float:
    """The cap from ``POLLEN_SUPERNODE_POLL`` (seconds), or :data:`DEFAULT_POLL_SECONDS`.

    Raises:
        PollenError: The variable is set to something other than a positive number.
    """
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


def heartbeat_seconds() -> int:
    """Seconds from ``POLLEN_SUPERNODE_HEARTBEAT``, or :data:`HEARTBEAT_DECLARED_SECONDS`.

    Raises:
        PollenError: The variable is set to something other than whole seconds from
            :data:`HEARTBEAT_MIN_SECONDS` to 1,800.
    """
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return HEARTBEAT_DECLARED_SECONDS
    if not raw.isdigit() or not HEARTBEAT_MIN_SECONDS <= int(raw) <= 1800:
        raise PollenError(
            f"{HEARTBEAT_ENV}={raw!r} is not a whole number of seconds from "
            f"{HEARTBEAT_MIN_SECONDS} to 1800. Set "
            f"it to the heartbeat interval a client declares (the server drops a client "
            f"after twice that without one; default {HEARTBEAT_DECLARED_SECONDS}), or unset it."
        )
    return int(raw)


def main() -> None:
    """``python -m pollen.deploy.supernode ARGS``: ``flower-supernode ARGS`` with capped polls."""
    from flwr.supernode.cli import flower_supernode

    if os.environ.get(PARENT_ENV, "").isdigit():  # SIGINT once it is gone: Flower exits cleanly
        start_parent_process_monitor(int(os.environ[PARENT_ENV]))
    cap_supernode_sleeps(capped_time(poll_seconds()))
    quick_supernode_pulls()  # a message's content from the server
    declare_heartbeat_interval(heartbeat_seconds())
    if "--isolation" in sys.argv and sys.argv[sys.argv.index("--isolation") + 1] == "process":
        # Its tasks run in this process, on Pollen's warm app runner's thread.
        from pollen.deploy.warm_clientapp import serve_beside_supernode

        serve_beside_supernode(sys.argv[1:])
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
