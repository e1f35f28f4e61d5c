"""Deliberate client misbehaviour, for tests and robustness experiments only.

A client whose node config has ``fault=KIND`` (``pollen client --fault KIND``),
or whose partition is named in the run config's ``fault`` (``"KIND@0,2"``, for
simulations), misbehaves on purpose; :data:`FAULTS` lists the kinds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Deliberate misbehaviour, for tests and robustness experiments only.
FAULTS = {
    "nan": "send NaN weights",
    "scale": "send the update (trained minus global weights) scaled by 1000",
    "signflip": "send the update with its sign flipped",
    "noise": "send Gaussian noise (standard deviation 1) added to the trained weights",
    "arch": "build the model with one class more than the federation's (the federation's "
    "weights then do not fit)",
}


def fault_of(node_config: dict[str, Any], run_fault: str) -> str:
    """The fault this client injects: its node config's ``fault``, else the run config's.

    ``run_fault`` is ``"KIND@IDS"``, several separated by spaces: clients whose
    ``partition-id`` is in the comma-separated ``IDS`` inject ``KIND``
    (``"nan@1"``, ``"scale@0,2 arch@3"``). Returns ``""`` for an honest client.
    """
    own = str(node_config.get("fault") or "")
    if own:
        return own
    if not run_fault or "partition-id" not in node_config:
        return ""
    for spec in run_fault.split():
        kind, _, ids = spec.partition("@")
        if int(node_config["partition-id"]) in {int(i) for i in ids.split(",") if i.strip()}:
            return kind
    return ""


def corrupt(kind: str, global_weights: list, weights: list, seed: int = 0) -> list:
    """Apply fault ``kind`` (see :data:`FAULTS`) to trained ``weights``."""
    rng = np.random.default_rng(seed)
    out = []
    for g, w in zip(global_weights, weights, strict=True):
        if not np.issubdtype(w.dtype, np.floating):
            out.append(w)
            continue
        if kind == "nan":
            w = np.full_like(w, np.nan)
        elif kind == "scale":
            w = g + 1000.0 * (w - g)
        elif kind == "signflip":
            w = g - (w - g)
        elif kind == "noise":
            w = w + rng.normal(0.0, 1.0, w.shape)
        out.append(np.asarray(w, dtype=g.dtype))
    return out
