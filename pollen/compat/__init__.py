"""Every use Pollen makes of Flower's and Keras's private internals, in one place.

Flower and Keras keep these names out of their public APIs, so any release may
move or change them. Each function in :mod:`pollen.compat.keras` and
:mod:`pollen.compat.flower` wraps one of them and says what it relies on and
which releases it was checked against (:data:`FLOWER`, :data:`KERAS`);
``tests/test_compat.py`` fails, naming the internal and the checked range,
when the installed version is outside that range or the internal has gone or
changed its signature. Before raising a pin in ``pyproject.toml``, run those
tests against the new release.

Two modules, not one, so that the Keras half keeps no import of Flower:
``pollen.models`` and ``pollen.training`` use it, and they never import Flower
(an import-linter contract). ``flwr`` and ``keras`` are imported inside the
functions: both are heavy, and this package sits below every other Pollen
module but :mod:`pollen.errors`.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass

__all__ = ["FLOWER", "KERAS", "Checked"]


@dataclass(frozen=True)
class Checked:
    """The releases of one package that the internals here were checked against.

    Attributes:
        package: Distribution name (``"flwr"``, ``"keras"``).
        spec: The range as a requirement specifier, for messages (``"==1.42.0"``).
        at_least: Lowest checked release, as numbers (``(1, 42, 0)``).
        below: First release past the range, as numbers (``(1, 42, 1)``).
    """

    package: str
    spec: str
    at_least: tuple[int, ...]
    below: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.package}{self.spec}"

    def installed(self) -> str:
        """The installed version string (from the package's metadata)."""
        return importlib.metadata.version(self.package)

    def covers(self, version: str | None = None) -> bool:
        """Whether ``version`` (default: the installed one) lies in the checked range.

        Only the leading ``X.Y[.Z]`` counts (``"3.15.1.dev0"`` is 3.15.1); a
        version without one is outside every range.
        """
        match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version or self.installed())
        if match is None:
            return False
        numbers = tuple(int(part or 0) for part in match.groups())
        return self.at_least <= numbers < self.below


#: Flower releases the Flower internals were checked against (pyproject pins 1.42.0).
FLOWER = Checked("flwr", "==1.42.0", (1, 42, 0), (1, 42, 1))
#: Keras releases the Keras internals were checked against (pyproject: >=3.15,<4).
KERAS = Checked("keras", ">=3.15,<4", (3, 15, 0), (4, 0, 0))
