"""Checkpoints: what a server needs to continue a run after it died.

After every completed round the server writes, into ``RUN_DIR/checkpoint/``:

- ``arrays-NNNN.npz``: the global model's arrays (keys and order of the
  ``ArrayRecord``);
- ``strategy-NNNN.json`` and ``strategy-NNNN.npz``: the state the strategy
  keeps between rounds, and nothing else (:data:`KEPT`): FedAdam, FedYogi and
  FedAdagrad their moments ``m_t`` and ``v_t``, FedAvgM its ``current_arrays``
  and ``momentum_vector``; under DP the wrapper's noise multiplier, clipping
  norm and sample size and the accountant's ledger (its ``state_dict``);
- ``history-NNNN.json``: the run's history up to round NNNN;
- ``manifest.json``, written last: the format, the round, the run config, the
  names and SHA-256 of the four files above.

Every file is written atomically (temporary file, then rename) and the
round's files have their own names, so until the new manifest has replaced
the old one the old manifest still names complete files of the previous
round: a crash at any moment leaves a loadable checkpoint. Files no manifest
names are removed after the manifest is written.

Nothing here is unpickled: arrays are read with ``allow_pickle=False``,
everything else is JSON. Every file is opened without following a symbolic
link and must be a regular file no larger than its part's cap
(:data:`MAX_BYTES`), so a link to ``/dev/zero``, a FIFO or a huge sparse
file is refused before anything is read; the ``checkpoint`` folder itself
must not be a link; every member of an ``.npz`` must be a ``.npy`` array whose
header claims no more than the member holds; JSON may nest no deeper than
:data:`MAX_JSON_DEPTH`. ``--resume`` rebuilds the strategy from the run
config as a fresh run does and gives it back only the allowed state, after
checking its names, shapes, dtypes and types against the global arrays; a
run folder from someone else may hold wrong numbers, but cannot run code.
The SHA-256 catch damage, not tampering: whoever writes the files can write
the manifest too. Format 1 (older Pollen) pickled the strategy; it is
refused, never unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import stat
import time
import zipfile
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.logger import log
from flwr.serverapp import strategy as fl

from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.files import atomic_write
from pollen.server.history import History
from pollen.server.privacy import private_state, restore_private
from pollen.server.strategies import check_config, make_strategy

CHECKPOINT_DIR = "checkpoint"
MANIFEST = "manifest.json"
#: 2: strategy state as JSON and npz, no pickle. 1: the strategy pickled (refused).
FORMAT = 2
#: Largest manifest read, in bytes (a run config and four file names).
MAX_MANIFEST_BYTES = 4 << 20
#: Largest file of each part read, in bytes: a cap against a hostile run folder
#: only. The arrays cap is far above any model Pollen builds (MobileNetV2, its
#: largest, is 2.27M parameters: about 9 MB of float32); the strategy keeps at
#: most two arrays per global array. A history grows by about 350 bytes per
#: client per round (256 MiB: 1,000 clients for 700 rounds); the strategy JSON
#: holds a few numbers per round.
MAX_BYTES: dict[str, int] = {
    "arrays": 4 << 30,
    "strategy": 64 << 20,
    "strategy-arrays": 8 << 30,
    "history": 256 << 20,
}
#: Deepest nesting of lists and objects read in a checkpoint's JSON (Pollen's own is
#: under 10 deep); deeper documents are refused before they reach code that recurses.
MAX_JSON_DEPTH = 64
#: How checkpoint files are opened: never through a symbolic link, and without
#: blocking on a FIFO (it is then refused as not a regular file).
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)

#: A round's files: manifest part -> (file name prefix, suffix).
PARTS: dict[str, tuple[str, str]] = {
    "arrays": ("arrays", ".npz"),
    "strategy": ("strategy", ".json"),
    "strategy-arrays": ("strategy", ".npz"),
    "history": ("history", ".json"),
}

# How a kept attribute lines up with the global arrays:
BY_KEY = "by-key"  # a dict of numpy arrays by global key
RECORD = "record"  # an ArrayRecord keyed like the global arrays
IN_ORDER = "in-order"  # a list of numpy arrays in the global arrays' order

_FEDOPT = {"m_t": BY_KEY, "v_t": BY_KEY}

#: What each strategy Pollen offers keeps between rounds in Flower 1.42
#: (attribute -> layout); everything else it holds is rebuilt from the run
#: config. FedOpt's ``current_arrays`` is not kept: its ``configure_train``
#: sets it from the global arrays every round. The DP wrapper's state is
#: :func:`pollen.server.privacy.private_state`'s.
KEPT: dict[type, dict[str, str]] = {
    fl.FedAvg: {},
    fl.FedProx: {},
    fl.FedMedian: {},
    fl.FedTrimmedAvg: {},
    fl.Krum: {},
    fl.MultiKrum: {},
    fl.Bulyan: {},
    fl.FedAdam: _FEDOPT,
    fl.FedYogi: _FEDOPT,
    fl.FedAdagrad: _FEDOPT,
    fl.FedAvgM: {"current_arrays": RECORD, "momentum_vector": IN_ORDER},
}


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


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


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
        strategy: The strategy object (only its :data:`KEPT` state is written).
        history: The history up to and including round ``rnd``.
        config: The run config (kebab-case mapping).
    """
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _check_folder(folder)  # never write (nor tidy up) through a link
    # Arrays are stored by position ("a0", "m_t.0"): any ArrayRecord key stays legal.
    keys = list(arrays)
    state, state_arrays = strategy_state(strategy, keys)
    contents = {
        "arrays": _npz({f"a{i}": np.asarray(arrays[k]) for i, k in enumerate(keys)}),
        "strategy": (json.dumps(state, indent=1) + "\n").encode(),
        "strategy-arrays": _npz(state_arrays),
        "history": (json.dumps(history.to_dict(), indent=1) + "\n").encode(),
    }
    payloads = {part: (_file_name(part, rnd), data) for part, data in contents.items()}
    for part, (name, data) in payloads.items():
        if len(data) > MAX_BYTES[part]:
            log(
                WARNING,
                "The checkpoint file %s is %d bytes, more than the %d --resume reads "
                "(pollen.server.checkpoint.MAX_BYTES): this run cannot be resumed.",
                name,
                len(data),
                MAX_BYTES[part],
            )
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


def _file_name(part: str, rnd: int) -> str:
    prefix, suffix = PARTS[part]
    return f"{prefix}-{rnd:04d}{suffix}"


def strategy_state(strategy: Any, keys: list[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The state ``strategy`` keeps between rounds: a JSON document and named arrays.

    Args:
        strategy: A strategy of :data:`KEPT`, or Flower's server-side
            fixed-clipping DP wrapper around one.
        keys: The global arrays' keys, in order; kept arrays are named
            ``"<attribute>.<position of the key>"``.

    Raises:
        TypeError: The strategy has no :data:`KEPT` entry (a new strategy must
            say what it keeps between rounds).
    """
    dp = private_state(strategy)
    inner = strategy.strategy if dp is not None else strategy
    kept = KEPT.get(type(inner))
    if kept is None:
        raise TypeError(
            f"{type(inner).__name__} has no entry in pollen.server.checkpoint.KEPT: "
            "say what it keeps between rounds before it can be checkpointed."
        )
    present, arrays = [], {}
    for attr, layout in kept.items():
        value = getattr(inner, attr, None)
        if value is None or len(value) == 0:
            continue
        present.append(attr)
        for i, a in enumerate(_aligned(value, layout, keys, attr)):
            arrays[f"{attr}.{i}"] = a
    return {"strategy": type(inner).__name__, "arrays": present, "dp": dp}, arrays


def _aligned(value: Any, layout: str, keys: list[str], attr: str) -> list[np.ndarray]:
    """``value`` (laid out as ``layout``) as a list of arrays in the order of ``keys``."""
    if layout == IN_ORDER:
        out = [np.asarray(a) for a in value]
    else:
        by_key = {k: a.numpy() for k, a in value.items()} if layout == RECORD else dict(value)
        if set(by_key) != set(keys):
            raise ValueError(f"the strategy's {attr} is not keyed like the global arrays")
        out = [np.asarray(by_key[k]) for k in keys]
    if len(out) != len(keys):
        raise ValueError(f"the strategy's {attr} does not line up with the global arrays")
    return out


def _laid_out(arrays: list[np.ndarray], layout: str, keys: list[str]) -> Any:
    """Inverse of :func:`_aligned`."""
    if layout == IN_ORDER:
        return arrays
    if layout == RECORD:
        return ArrayRecord({k: Array(a) for k, a in zip(keys, arrays, strict=True)})
    return dict(zip(keys, arrays, strict=True))


def _refuse(path: Path, problem: str) -> PollenError:
    return PollenError(
        f"The checkpoint file {path} cannot be used: {problem}. Pollen checks everything "
        "a checkpoint holds before resuming and does not guess; the run cannot be resumed "
        "from it. Start a new run (another --out); if this run folder came from someone "
        "else, do not trust its other files either."
    )


def _old_format(folder: Path, fmt: object) -> PollenError:
    return PollenError(
        f"The checkpoint in {folder} was written by an older Pollen (checkpoint format "
        f"{fmt}), which saved the strategy as a Python pickle (strategy-NNNN.pkl). Loading "
        "a pickle runs whatever code it holds, so this Pollen does not read it, and the run "
        "cannot be resumed safely. Start a new run (another --out); only for a run folder "
        "you wrote yourself, finish it with the Pollen version that started it."
    )


def _check_folder(folder: Path) -> bool:
    """Whether the checkpoint folder exists (``False``: it does not).

    Raises:
        PollenError: It is a symbolic link or not a folder.
    """
    try:
        mode = os.lstat(folder).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a folder"
        raise PollenError(
            f"The checkpoint folder {folder} is {what}. Pollen reads and writes a run's "
            "checkpoint only in a real folder inside the run folder, never through a link, "
            "so this run cannot be resumed from it (nor write its checkpoints there). "
            "Start a new run (another --out); if this run folder came from someone else, "
            "do not trust its other files either."
        )
    return True


def _read_file(path: Path, cap: int) -> bytes:
    """All of ``path``: a regular file of at most ``cap`` bytes, not reached through a link.

    Opened with ``O_NOFOLLOW`` and ``O_NONBLOCK``, and checked with ``fstat``
    before a byte is read: a link (to ``/dev/zero``, say), a FIFO, a device
    or a file larger than ``cap`` is refused at once.

    Raises:
        FileNotFoundError: It does not exist.
        OSError: It cannot be opened or read.
        PollenError: It is a link, not a regular file, or too large.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise _refuse(path, "it is a symbolic link, not a file Pollen wrote") from None
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(path, "it is not a regular file (a FIFO, device or folder)")
        if info.st_size > cap:
            raise _refuse(path, f"it is {info.st_size} bytes, more than the {cap} allowed")
        data = f.read(info.st_size + 1)
    if len(data) != info.st_size:
        raise _refuse(path, "it changed while it was read")
    return data


def _json(data: bytes, path: Path) -> Any:
    """``data`` parsed as JSON no deeper than :data:`MAX_JSON_DEPTH`.

    Raises:
        PollenError: It is not JSON (any error of the parser, its recursion
            limit included), or nests too deeply.
    """
    too_deep = f"its JSON nests deeper than {MAX_JSON_DEPTH} levels"
    try:
        doc = json.loads(data)
    except RecursionError:
        raise _refuse(path, too_deep) from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise _refuse(path, f"it is not JSON ({err})") from None
    if _too_deep(doc):
        raise _refuse(path, too_deep)
    return doc


def _too_deep(doc: Any) -> bool:
    """Whether lists and objects nest in ``doc`` deeper than :data:`MAX_JSON_DEPTH`."""
    todo = [(doc, 1)] if isinstance(doc, (list, dict)) else []
    while todo:
        value, depth = todo.pop()
        children = value.values() if isinstance(value, dict) else value
        if depth > MAX_JSON_DEPTH:
            return True
        todo.extend((v, depth + 1) for v in children if isinstance(v, (list, dict)))
    return False


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint manifest of ``run_dir``, checked, or ``None`` if it has none.

    Raises:
        PollenError: It cannot be read, is not a manifest of this format (an
            older Pollen's pickled checkpoint is refused here), or names
            files a checkpoint does not have.
    """
    folder = checkpoint_dir(run_dir)
    path = folder / MANIFEST
    if not _check_folder(folder):
        return None
    try:
        raw = _read_file(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise PollenError(
            f"The checkpoint manifest in {folder} cannot be read ({err}). "
            "The run cannot be resumed from it; start a new run."
        ) from None
    manifest = _json(raw, path)
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt == 1 or any(p.suffix == ".pkl" for p in folder.iterdir()):
        raise _old_format(folder, fmt)
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise _refuse(path, problem)
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    """What is wrong with ``manifest`` (parsed JSON), or None."""
    if not isinstance(manifest, dict):
        return "it is not a JSON object"
    if manifest.get("format") != FORMAT:
        return f"its format is {manifest.get('format')!r}, this Pollen reads format {FORMAT}"
    rnd, keys = manifest.get("round"), manifest.get("keys")
    if not _is_int(rnd) or rnd < 1:
        return "its round is not a positive integer"
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return "its keys are not a list of strings"
    if len(set(keys)) != len(keys):
        return "its keys repeat"
    if not isinstance(manifest.get("config"), dict):
        return "its config is not a JSON object"
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(PARTS):
        return f"it does not name exactly the files {', '.join(PARTS)}"
    for part, entry in files.items():
        if not isinstance(entry, dict) or entry.get("name") != _file_name(part, rnd):
            return f"its {part} file is not {_file_name(part, rnd)}"
        if not isinstance(entry.get("sha256"), str) or not re.fullmatch(
            "[0-9a-f]{64}", entry["sha256"]
        ):
            return f"its {part} file has no SHA-256"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_checkpoint(run_dir: Path, cfg: RunConfig | None = None) -> Checkpoint:
    """Read and check the checkpoint in ``run_dir``; rebuild its strategy.

    Args:
        run_dir: The run folder.
        cfg: The run config the strategy is rebuilt from (a resumed run's,
            which may change what ``--resume`` allows to); default: the
            manifest's.

    Raises:
        PollenError: There is no checkpoint, or its files are missing,
            damaged, of an older format or not what Pollen writes.
    """
    manifest = read_manifest(run_dir)
    folder = checkpoint_dir(run_dir)
    if manifest is None:
        raise PollenError(
            f"{run_dir} has no checkpoint ({folder / MANIFEST} is missing): no round of this "
            "run was completed, or it is not a pollen run folder. Start a new run instead."
        )
    data = _read_files(folder, manifest)
    paths = {part: folder / entry["name"] for part, entry in manifest["files"].items()}
    keys = manifest["keys"]
    stored = _read_npz(data["arrays"], paths["arrays"])
    if set(stored) != {f"a{i}" for i in range(len(keys))}:
        raise _refuse(paths["arrays"], "its arrays are not those the manifest's keys name")
    arrays = {k: stored[f"a{i}"] for i, k in enumerate(keys)}
    history_doc = _json(data["history"], paths["history"])
    try:
        history = History.from_dict(history_doc)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise _refuse(paths["history"], f"it is not a run history ({err})") from None
    if cfg is None:
        cfg = RunConfig.from_mapping(manifest["config"])
    check_config(cfg)
    strategy = _rebuild_strategy(cfg, data, paths, arrays, manifest["round"])
    return Checkpoint(
        round=manifest["round"],
        arrays=arrays,
        strategy=strategy,
        history=history,
        config=dict(manifest["config"]),
    )


def _read_files(folder: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """The contents of the files ``manifest`` names, checked against their SHA-256."""
    data: dict[str, bytes] = {}
    for part, entry in manifest["files"].items():
        path = folder / entry["name"]
        try:
            content = _read_file(path, MAX_BYTES[part])
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
    return data


def _read_npz(data: bytes, path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file Pollen wrote: plain numbers, never objects.

    Every member must be a ``.npy`` array (``np.load`` would hand any other
    member back as raw bytes) whose header claims no more bytes than the
    member holds, and is read with ``allow_pickle=False``.

    Raises:
        PollenError: It is not an uncompressed numpy archive of numeric arrays.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = zf.infolist()
            if sum(info.file_size for info in members) > len(data):
                raise _refuse(path, "it unpacks to more than it holds (Pollen never compresses)")
            names = [info.filename for info in members]
            if len(set(names)) != len(names):
                raise _refuse(path, "it holds a member twice")
            arrays = {info.filename[: -len(".npy")]: _npy(zf, info, path) for info in members}
    except (ValueError, OSError, EOFError, KeyError, MemoryError, zipfile.BadZipFile) as err:
        raise _refuse(path, f"it is not a numpy archive of plain arrays ({err})") from None
    for name, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise _refuse(path, f"its array {name!r} holds {a.dtype}, not numbers")
    return arrays


def _npy(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> np.ndarray:
    """The ``.npy`` member ``info`` of ``zf``, its header checked before its data is read."""
    if not info.filename.endswith(".npy"):
        raise _refuse(path, f"its member {info.filename!r} is not a numpy array (.npy)")
    fmt = np.lib.format
    with zf.open(info) as f:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"numpy array format {version} is not one Pollen writes")
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read_header(f)
    if any(d < 0 for d in shape) or int(np.prod(shape, dtype=object)) * dtype.itemsize > (
        info.file_size
    ):
        raise _refuse(path, f"its array {info.filename!r} claims more data than it holds")
    with zf.open(info) as f:
        return fmt.read_array(f, allow_pickle=False)


def _rebuild_strategy(
    cfg: RunConfig,
    data: dict[str, bytes],
    paths: dict[str, Path],
    arrays: dict[str, np.ndarray],
    rnd: int,
) -> Any:
    """The strategy ``cfg`` builds, given back the checked state of the checkpoint."""
    path = paths["strategy"]
    state = _json(data["strategy"], path)
    inner = make_strategy(cfg)
    kept = KEPT[type(inner)]
    problem = _state_problem(state, type(inner).__name__, kept, cfg.dp == "client")
    if problem is not None:
        raise _refuse(path, problem)
    stored = _read_npz(data["strategy-arrays"], paths["strategy-arrays"])
    keys = list(arrays)
    names = {f"{attr}.{i}" for attr in state["arrays"] for i in range(len(keys))}
    if set(stored) != names:
        raise _refuse(paths["strategy-arrays"], f"it does not hold exactly {sorted(names)}")
    for attr in state["arrays"]:
        values = [stored[f"{attr}.{i}"] for i in range(len(keys))]
        for k, a in zip(keys, values, strict=True):
            g = arrays[k]
            if a.shape != g.shape or (a.dtype != g.dtype and a.dtype.kind != "f"):
                raise _refuse(
                    paths["strategy-arrays"],
                    f"its {attr} for {k!r} is {a.dtype} {a.shape}, the global array "
                    f"{g.dtype} {g.shape}",
                )
        setattr(inner, attr, _laid_out(values, kept[attr], keys))
    if cfg.dp != "client":
        return inner
    try:
        return restore_private(inner, cfg, state["dp"], max_releases=rnd)
    except (ValueError, TypeError) as err:
        raise _refuse(path, f"its differential-privacy state does not fit ({err})") from None


def _state_problem(state: Any, name: str, kept: dict[str, str], dp: bool) -> str | None:
    """What is wrong with the strategy document ``state``, or None."""
    if not isinstance(state, dict) or set(state) != {"strategy", "arrays", "dp"}:
        return 'it is not an object with exactly "strategy", "arrays" and "dp"'
    if state["strategy"] != name:
        return f"it holds the state of {state['strategy']!r}, the run config builds {name}"
    present = state["arrays"]
    if not isinstance(present, list) or not all(isinstance(a, str) for a in present):
        return '"arrays" is not a list of names'
    if len(set(present)) != len(present) or not set(present) <= set(kept):
        return f'"arrays" names more than {name} keeps ({", ".join(kept) or "nothing"})'
    if dp != (state["dp"] is not None):
        return "its differential-privacy state does not match the run config's --dp"
    if state["dp"] is not None and not isinstance(state["dp"], dict):
        return '"dp" is not an object'
    return None


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
