"""Checkpoints: what a server needs to continue a run after it died.

After every completed round the server writes, into ``RUN_DIR/checkpoint/``:

- ``arrays-NNNN.npz``: the global model's arrays (keys and order of the
  ``ArrayRecord``);
- ``strategy-NNNN.pkl``: the strategy object, pickled, with whatever state it
  keeps between rounds (FedAdam/FedYogi/FedAdagrad: ``current_arrays``,
  ``m_t``, ``v_t``; FedAvgM: its momentum);
- ``history-NNNN.json``: the run's history up to round NNNN;
- ``manifest.json``, written last: the round, the run config, the names and
  SHA-256 of the three files above.

Every file is written atomically (temporary file, then rename) and the
round's files have their own names, so until the new manifest has replaced
the old one the old manifest still names complete files of the previous
round: a crash at any moment leaves a loadable checkpoint. Files no manifest
names are removed after the manifest is written.

Only trusted files belong here: the strategy is restored with ``pickle``.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pollen.errors import PollenError
from pollen.files import atomic_write
from pollen.server.history import History

CHECKPOINT_DIR = "checkpoint"
MANIFEST = "manifest.json"
FORMAT = 1


@dataclass
class Checkpoint:
    """A run's state after its last completed round."""

    round: int
    arrays: dict[str, np.ndarray]
    strategy: Any
    history: History
    config: dict[str, Any]


def checkpoint_dir(run_dir: Path) -> Path:
    """``RUN_DIR/checkpoint``."""
    return Path(run_dir) / CHECKPOINT_DIR


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    run_dir: Path,
    rnd: int,
    arrays: dict[str, np.ndarray],
    strategy: Any,
    history: History,
    config: dict[str, Any],
) -> Path:
    """Write the checkpoint of round ``rnd``; return the manifest's path.

    Args:
        run_dir: The run folder.
        rnd: The round just completed.
        arrays: The global arrays after that round, by ArrayRecord key.
        strategy: The strategy object (pickled).
        history: The history up to and including round ``rnd``.
        config: The run config (kebab-case mapping).
    """
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    # A list of (key, array) through a structured name scheme keeps any key legal.
    keys = list(arrays)
    np.savez(buf, **{f"a{i}": np.asarray(arrays[k]) for i, k in enumerate(keys)})
    payloads = {
        "arrays": (f"arrays-{rnd:04d}.npz", buf.getvalue()),
        "strategy": (f"strategy-{rnd:04d}.pkl", pickle.dumps(strategy)),
        "history": (
            f"history-{rnd:04d}.json",
            (json.dumps(history.to_dict(), indent=1) + "\n").encode(),
        ),
    }
    for name, data in payloads.values():
        atomic_write(folder / name, data)
    manifest = {
        "format": FORMAT,
        "round": rnd,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "keys": keys,
        "config": config,
        "files": {
            part: {"name": name, "sha256": _sha256(data)} for part, (name, data) in payloads.items()
        },
    }
    atomic_write(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    keep = {MANIFEST, *(name for name, _ in payloads.values())}
    for path in folder.iterdir():
        if path.name not in keep and not path.name.startswith("."):
            path.unlink(missing_ok=True)
    return folder / MANIFEST


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint manifest of ``run_dir``, or ``None`` if it has none."""
    try:
        return json.loads((checkpoint_dir(run_dir) / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise PollenError(
            f"The checkpoint manifest in {checkpoint_dir(run_dir)} cannot be read ({err}). "
            "The run cannot be resumed from it; start a new run."
        ) from None


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read and verify the checkpoint in ``run_dir``.

    Raises:
        PollenError: There is no checkpoint, or its files are missing or damaged.
    """
    manifest = read_manifest(run_dir)
    folder = checkpoint_dir(run_dir)
    if manifest is None:
        raise PollenError(
            f"{run_dir} has no checkpoint ({folder / MANIFEST} is missing): no round of this "
            "run was completed, or it is not a pollen run folder. Start a new run instead."
        )
    data: dict[str, bytes] = {}
    for part, entry in manifest["files"].items():
        path = folder / entry["name"]
        try:
            content = path.read_bytes()
        except OSError as err:
            raise PollenError(
                f"The checkpoint in {folder} is incomplete: {path.name} cannot be read ({err}). "
                "The run cannot be resumed; start a new run."
            ) from None
        if _sha256(content) != entry["sha256"]:
            raise PollenError(
                f"The checkpoint file {path} is damaged (its SHA-256 does not match the "
                "manifest). The run cannot be resumed; start a new run."
            )
        data[part] = content
    with np.load(io.BytesIO(data["arrays"]), allow_pickle=False) as npz:
        arrays = {k: npz[f"a{i}"] for i, k in enumerate(manifest["keys"])}
    return Checkpoint(
        round=int(manifest["round"]),
        arrays=arrays,
        strategy=pickle.loads(data["strategy"]),
        history=History.from_dict(json.loads(data["history"])),
        config=dict(manifest.get("config", {})),
    )


LOCK_FILE = ".pollen.lock"


class RunLock:
    """An exclusive lock on a run folder, held by the server app that writes it.

    Uses ``flock``, which the kernel drops when the holder dies, so a killed
    server never leaves a stale lock; a server app that is still alive (an
    orphan of a killed ``pollen server``) keeps a resumed run from writing
    the same folder at the same time.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, timeout: float = 0.0) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds; return whether it was taken."""
        import fcntl
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.2)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return True

    def holder(self) -> str:
        """The process id recorded by the current holder ("" if unknown)."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def release(self) -> None:
        """Drop the lock."""
        import os

        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
