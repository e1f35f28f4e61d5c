"""Files written whole or not at all, and an advisory lock between processes.

Every file Pollen writes that another process or a later run reads (history,
status, checkpoints, caches, generated app files) goes through
:func:`atomic_writer`: a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _ordinary_permissions(path: str) -> None:
    """Give a mkstemp file (mode 0600) the mode a plain ``open`` would give it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: Path, *, suffix: str = ".tmp", private: bool = False) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; on success it replaces ``path`` atomically.

    For writers that take a path, not a file (``keras.Model.save``).

    Args:
        path: The file to write; its folder is created if missing.
        suffix: The temporary file's suffix (Keras wants ``.keras``); default ``".tmp"``.
        private: Keep the temporary file's mode 0600 (keys, secrets); default
            False gives it the mode a plain ``open`` would (0666 less the umask).

    Yields:
        The temporary file's path (it exists, empty). On any exception it is
        removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        if not private:
            _ordinary_permissions(tmp)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_writer(path: Path, *, private: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically.

    Args:
        path: The file to write; its folder is created if missing.
        private: As :func:`atomic_path`; default False.

    Yields:
        The temporary file, opened for binary writing; flushed and fsynced
        before the replace.
    """
    with atomic_path(path, private=private) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``data`` (``str`` is UTF-8 encoded) to ``path`` via :func:`atomic_writer`."""
    with atomic_writer(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def file_lock(path: Path, waiting: str = "") -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (a no-op where ``fcntl`` is unavailable).

    Args:
        path: The lock file; created if missing, never removed.
        waiting: A line written to stderr when another process holds the lock
            and this one has to wait; default ``""`` waits silently.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no locking; concurrent first writers are unlikely there
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                sys.stderr.write(waiting + "\n")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
