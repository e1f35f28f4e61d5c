"""Marks Pollen's own log lines in the processes Flower starts, so the console can pick them.

Pollen's server app and client runner log through Flower's logger (``flwr``),
so their lines reach ``pollen server``, ``pollen simulate`` and ``pollen
client`` mixed with Flower's own, in the same format. :func:`tag_pollen_lines`
adds a filter to that logger that puts :data:`TAG` and the level in front of
every message logged from a module of the ``pollen`` package
(``[pollen:info] Round 1/3 | ...``); :func:`parse_tagged` finds them again on
the other end (:mod:`pollen.deploy.console`). Info lines of the launch
machinery (``pollen/deploy/``: the warm client runner's per-task lines) stay
untagged: they are plumbing, not news; its warnings and errors are tagged.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

#: Flower's logger (``flwr.common.logger.FLOWER_LOGGER``), by name: no need to import Flower.
FLOWER_LOGGER = logging.getLogger("flwr")

__all__ = ["TAG", "parse_tagged", "tag_pollen_lines"]

#: What a tagged message starts with, before its level: ``[pollen:warning] ...``.
TAG = "[pollen:"
_TAGGED = re.compile(r"\[pollen:(debug|info|warning|error|critical)\] (.*)$")
_PACKAGE = str(Path(__file__).resolve().parents[1]) + "/"
_PLUMBING = _PACKAGE + "deploy/"


class _PollenTag(logging.Filter):
    """Prefix records logged from the ``pollen`` package with :data:`TAG` and their level."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = str(record.pathname)
        if getattr(record, "pollen_tagged", False) or not path.startswith(_PACKAGE):
            return True
        record.pollen_tagged = True
        if record.levelno >= logging.WARNING or not path.startswith(_PLUMBING):
            record.msg = f"{TAG}{record.levelname.lower()}] {record.msg}"
        return True


def tag_pollen_lines(logger: logging.Logger = FLOWER_LOGGER) -> None:
    """Tag Pollen's messages on ``logger`` (Flower's by default); calling it again adds nothing."""
    if not any(isinstance(f, _PollenTag) for f in logger.filters):
        logger.addFilter(_PollenTag())


def parse_tagged(line: str) -> tuple[str, str] | None:
    """``(level, message)`` of a tagged line (level in lower case), or None for another line."""
    match = _TAGGED.search(line.rstrip("\r\n"))
    return (match.group(1), match.group(2)) if match else None
