"""Checkpoints: round trip, only the latest round, kills mid-write, run lock, strategy state.

No pickle: a hostile run folder (crafted pickle, object array, wrong shapes, names
or types, with a manifest whose hashes match) is refused and runs nothing; nor
does one with files that are links, FIFOs, huge or deeply nested read anything
(links to /dev/zero, FIFOs and huge sparse files are loaded in a child process
with a memory limit and a timeout, so the old reader fails there, not here); each
strategy's kept state comes back exactly, and its next aggregate equals that of a
strategy that was never checkpointed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import NodesGrid, train_reply
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg
from server_fakes import _history

from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.server.checkpoint import (
    KEPT,
    RunLock,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from pollen.server.privacy import make_private, privacy_record
from pollen.server.strategies import STRATEGIES, make_strategy

pytestmark = pytest.mark.usefixtures("flower_task")

CNN = {"model": "cnn"}

# --- checkpoints -------------------------------------------------------------------------------


def _fedadam_with_state() -> FedAdam:
    strategy = make_strategy(RunConfig(model="cnn", strategy="fedadam"))
    strategy.m_t = {"0": np.full((2, 3), 0.5, np.float32), "1": np.full(2, 0.1)}
    strategy.v_t = {"0": np.full((2, 3), 0.25, np.float32), "1": np.full(2, 0.2)}
    return strategy


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    arrays = {"0": np.arange(6, dtype=np.float32).reshape(2, 3), "1": np.ones(2, np.float64)}
    config = {"model": "cnn", "strategy": "fedadam"}
    save_checkpoint(tmp_path, 2, arrays, _fedadam_with_state(), _history(2), config)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 2 and ckpt.config == config
    assert list(ckpt.arrays) == ["0", "1"]
    for k, v in arrays.items():
        np.testing.assert_array_equal(ckpt.arrays[k], v)
        assert ckpt.arrays[k].dtype == v.dtype
    assert isinstance(ckpt.strategy, FedAdam)
    np.testing.assert_array_equal(ckpt.strategy.m_t["0"], np.full((2, 3), 0.5))
    np.testing.assert_array_equal(ckpt.strategy.v_t["1"], np.full(2, 0.2))
    assert ckpt.strategy.m_t["0"].dtype == np.float32
    assert ckpt.history.to_dict() == _history(2).to_dict()


def test_checkpoint_keeps_only_the_latest_round(tmp_path: Path) -> None:
    for rnd in (1, 2, 3):
        save_checkpoint(tmp_path, rnd, {"0": np.full(2, rnd)}, FedAvg(), _history(rnd), CNN)
    names = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert names == [
        "arrays-0003.npz",
        "history-0003.json",
        "manifest.json",
        "strategy-0003.json",
        "strategy-0003.npz",
    ]
    assert load_checkpoint(tmp_path).round == 3


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, 5])
def test_a_kill_mid_checkpoint_leaves_the_previous_one(
    tmp_path: Path, monkeypatch, fail_at
) -> None:
    """os.replace fails at the n-th file of round 2's checkpoint: round 1's still loads."""
    save_checkpoint(tmp_path, 1, {"0": np.full(2, 1.0)}, FedAvg(), _history(1), CNN)
    calls = {"n": 0}
    real_replace = os.replace

    def flaky_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError("killed mid-checkpoint")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, 2, {"0": np.full(2, 2.0)}, FedAvg(), _history(2), CNN)
    monkeypatch.setattr(os, "replace", real_replace)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.round == 1
    np.testing.assert_array_equal(ckpt.arrays["0"], np.full(2, 1.0))
    assert len(ckpt.history.rounds) == 1
    # ... and the next checkpoint works and tidies up.
    save_checkpoint(tmp_path, 2, {"0": np.full(2, 2.0)}, FedAvg(), _history(2), CNN)
    assert load_checkpoint(tmp_path).round == 2


def test_damaged_or_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PollenError, match="has no checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 1, {"0": np.zeros(2)}, FedAvg(), _history(1), CNN)
    manifest = read_manifest(tmp_path)
    (tmp_path / "checkpoint" / manifest["files"]["arrays"]["name"]).write_bytes(b"garbage")
    with pytest.raises(PollenError, match="damaged"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_says_what_it_keeps_and_round_trips(tmp_path: Path, name: str) -> None:
    cfg = RunConfig(model="cnn", strategy=name)
    strategy = make_strategy(cfg)
    assert type(strategy) in KEPT
    save_checkpoint(tmp_path, 1, {"0": np.zeros(2)}, strategy, _history(1), cfg.to_mapping())
    assert type(load_checkpoint(tmp_path).strategy) is type(strategy)


# --- a hostile run folder -----------------------------------------------------------------------


class _Payload:
    """Unpickling it creates ``path``: proof that code from the run folder ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _rewrite(run: Path, manifest: dict, files: dict[str, tuple[str, bytes]]) -> None:
    """Write ``files`` (part -> (name, content)) and a manifest whose hashes match them."""
    folder = run / "checkpoint"
    for part, (name, data) in files.items():
        (folder / name).write_bytes(data)
        manifest["files"][part] = {"name": name, "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _saved(run: Path, strategy: str = "fedadam") -> dict:
    cfg = RunConfig(model="cnn", strategy=strategy)
    arrays = {"0": np.zeros((2, 3), np.float32), "1": np.ones(2, np.float64)}
    save_checkpoint(run, 1, arrays, _fedadam_with_state(), _history(1), cfg.to_mapping())
    return json.loads((run / "checkpoint" / "manifest.json").read_text())


def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)  # allow_pickle defaults to True on save: object arrays are pickled
    return buf.getvalue()


def test_an_old_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    """A format-1 folder with a crafted strategy-0001.pkl and matching hashes runs nothing."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    manifest = _saved(tmp_path)
    files = dict(manifest["files"])
    manifest["format"] = 1
    manifest["files"] = {k: v for k, v in files.items() if k in ("arrays", "history")}
    _rewrite(tmp_path, manifest, {"strategy": ("strategy-0001.pkl", payload)})
    with pytest.raises(PollenError, match="older Pollen.*cannot be resumed safely") as err:
        load_checkpoint(tmp_path)
    assert not marker.exists()
    assert "strategy-NNNN.pkl" in str(err.value) and "\n" not in str(err.value)
    # Named as the new format's strategy file, the pickle is refused just the same.
    manifest.update(format=2, files=files)
    (tmp_path / "checkpoint" / "strategy-0001.pkl").unlink()
    _rewrite(tmp_path, manifest, {"strategy": ("strategy-0001.json", payload)})
    with pytest.raises(PollenError, match="strategy-0001.json cannot be used"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("part", ["arrays", "strategy-arrays"])
def test_an_object_array_in_a_checkpoint_is_refused_and_never_unpickled(
    tmp_path: Path, part: str
) -> None:
    marker = tmp_path / "pwned"
    manifest = _saved(tmp_path)
    evil = np.array([_Payload(marker)], dtype=object)
    name = manifest["files"][part]["name"]
    key = "a0" if part == "arrays" else "m_t.0"
    _rewrite(tmp_path, manifest, {part: (name, _npz_bytes(**{key: evil}))})
    with pytest.raises(PollenError, match=f"{name} cannot be used: it is not a numpy archive"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def _state_with(tmp_path: Path, state: dict | None = None, **arrays) -> None:
    manifest = _saved(tmp_path)
    folder = tmp_path / "checkpoint"
    doc = json.loads((folder / "strategy-0001.json").read_text())
    doc.update(state or {})
    stored = dict(np.load(folder / "strategy-0001.npz", allow_pickle=False))
    stored.update(arrays)
    _rewrite(
        tmp_path,
        manifest,
        {
            "strategy": ("strategy-0001.json", json.dumps(doc).encode()),
            "strategy-arrays": ("strategy-0001.npz", _npz_bytes(**stored)),
        },
    )


@pytest.mark.parametrize(
    ("state", "arrays", "message"),
    [
        ({}, {"m_t.0": np.zeros((3, 2), np.float32)}, "its m_t for '0' is float32 \\(3, 2\\)"),
        ({}, {"v_t.1": np.zeros(2, np.int8)}, "its v_t for '1' is int8"),
        ({}, {"m_t.2": np.zeros(2)}, "does not hold exactly"),
        ({}, {"m_t.0": np.array(["x", "y"])}, "holds <U1, not numbers"),
        ({"arrays": ["m_t", "v_t", "eta"]}, {"eta.0": np.zeros(1)}, "names more than FedAdam"),
        ({"strategy": "FedAvgM"}, {}, "holds the state of 'FedAvgM'"),
        ({"dp": {"noise-multiplier": 1.0}}, {}, "does not match the run config's --dp"),
        ({"arrays": "m_t"}, {}, "not a list of names"),
        ({"extra": 1}, {}, "exactly"),
    ],
)
def test_a_crafted_strategy_state_is_refused(tmp_path: Path, state, arrays, message) -> None:
    _state_with(tmp_path, state, **arrays)
    with pytest.raises(PollenError, match=message) as err:
        load_checkpoint(tmp_path)
    assert "strategy-0001." in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["files"]["history"].update(name="../../history.json"), "history file is not"),
        (lambda m: m.update(round="1"), "round is not a positive integer"),
        (lambda m: m.update(keys=["0", "0"]), "keys repeat"),
        (lambda m: m.update(format=3), "format is 3"),
        (lambda m: m["files"].pop("strategy-arrays"), "does not name exactly"),
        (lambda m: m.update(keys=["0"]), "arrays are not those the manifest's keys name"),
    ],
)
def test_a_crafted_manifest_is_refused(tmp_path: Path, change, message) -> None:
    manifest = _saved(tmp_path)
    change(manifest)
    (tmp_path / "checkpoint" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PollenError, match=message):
        load_checkpoint(tmp_path)


def test_a_crafted_dp_ledger_is_refused(tmp_path: Path) -> None:
    cfg = RunConfig(model="cnn-gn", dp=True, dp_noise=1.0, min_clients=2)
    strategy = make_private(make_strategy(cfg), cfg, 2)
    save_checkpoint(tmp_path, 1, {"0": np.zeros(2)}, strategy, _history(1), cfg.to_mapping())
    manifest = json.loads((tmp_path / "checkpoint" / "manifest.json").read_text())
    doc = json.loads((tmp_path / "checkpoint" / "strategy-0001.json").read_text())
    for bad, message in [
        ({"noise-multiplier": 0.01}, "the run config gives 1 and"),
        ({"num-sampled-clients": True}, "not a positive integer"),
        ({"accountant": {"config": {}, "orders": [2.0], "compositions": [{}, {}]}}, "more than 1"),
        ({"accountant": {"config": {}, "orders": [2.0], "compositions": [{}]}}, "population"),
    ]:
        evil = {**doc, "dp": {**doc["dp"], **bad}}
        files = {"strategy": ("strategy-0001.json", json.dumps(evil).encode())}
        _rewrite(tmp_path, manifest, files)
        with pytest.raises(PollenError, match=message):
            load_checkpoint(tmp_path)


# --- a hostile run folder: files that are no files, too large, too deep -------------------------

#: Loads a checkpoint in a child process whose address space may grow by only 512 MiB: a load
#: that reads /dev/zero or a huge sparse file dies there (MemoryError), not in pytest.
_GUARDED_LOAD = r"""
import json, resource, sys, time
from pathlib import Path
from pollen.errors import PollenError
from pollen.server.checkpoint import load_checkpoint
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), hard))
start, out = time.monotonic(), {"error": None}
try:
    load_checkpoint(Path(sys.argv[1]))
except PollenError as err:
    out["error"] = str(err)
except BaseException as err:
    out["crash"] = repr(err)[:300]
out["seconds"] = time.monotonic() - start
print(json.dumps(out))
"""


def _guarded_load(run: Path, timeout: float = 30.0) -> dict:
    """``load_checkpoint(run)`` in a child: its error, any crash and how long it took."""
    import subprocess
    import sys

    import pollen

    env = {**os.environ, "PYTHONPATH": str(Path(pollen.__file__).parents[1])}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _GUARDED_LOAD, str(run)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading the checkpoint hung for {timeout:g} s")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _replace_with(path: Path, kind: str | int) -> None:
    path.unlink()
    if kind == "link-to-dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:  # a sparse file of ``kind`` bytes: nothing on disk, but too large to read
        with path.open("wb") as f:
            f.truncate(kind)


@pytest.mark.skipif(
    not (hasattr(os, "mkfifo") and Path("/proc/self/statm").exists()),
    reason="needs Linux (FIFOs, /dev/zero, /proc)",
)
@pytest.mark.parametrize(
    ("part", "kind", "message"),
    [
        ("arrays", "link-to-dev-zero", "arrays-0001.npz cannot be used: it is a symbolic link"),
        ("manifest", "link-to-dev-zero", "manifest.json cannot be used: it is a symbolic link"),
        ("arrays", "fifo", "arrays-0001.npz cannot be used: it is not a regular file"),
        ("manifest", "fifo", "manifest.json cannot be used: it is not a regular file"),
        # Sparse files one byte over their part's cap (MAX_BYTES):
        ("arrays", (4 << 30) + 1, "arrays-0001.npz cannot be used: it is 4294967297 bytes, more"),
        ("history", (256 << 20) + 1, "history-0001.json cannot be used: it is 268435457 bytes"),
        ("strategy", (64 << 20) + 1, "strategy-0001.json cannot be used: it is 67108865 bytes"),
    ],
)
def test_a_checkpoint_file_that_is_no_plain_file_or_too_large_is_refused_unread(
    tmp_path: Path, part: str, kind: str | int, message: str
) -> None:
    """A link to /dev/zero, a FIFO or a huge sparse file: refused at once, nothing read."""
    manifest = _saved(tmp_path)
    name = "manifest.json" if part == "manifest" else manifest["files"][part]["name"]
    _replace_with(tmp_path / "checkpoint" / name, kind)
    got = _guarded_load(tmp_path)
    assert "crash" not in got, got
    assert got["error"] is not None and message in got["error"], got
    assert "\n" not in got["error"]
    assert got["seconds"] < 2.0, got


def test_the_sparse_files_above_are_one_byte_over_the_caps() -> None:
    from pollen.server.checkpoint import MAX_BYTES

    assert MAX_BYTES == {
        "arrays": 4 << 30,
        "strategy": 64 << 20,
        "strategy-arrays": 8 << 30,
        "history": 256 << 20,
    }


def test_a_linked_checkpoint_folder_is_neither_read_nor_written(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    run = tmp_path / "run"
    _saved(run)
    (run / "checkpoint").rename(elsewhere)
    (elsewhere / "precious.txt").write_text("keep me")
    (run / "checkpoint").symlink_to(elsewhere)
    for attempt in (
        lambda: read_manifest(run),
        lambda: load_checkpoint(run),
        lambda: save_checkpoint(run, 2, {"0": np.zeros(2)}, FedAvg(), _history(2), CNN),
    ):
        with pytest.raises(PollenError, match="checkpoint folder .* is a symbolic link"):
            attempt()
    assert (elsewhere / "precious.txt").read_text() == "keep me"
    assert not (elsewhere / "arrays-0002.npz").exists()


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _lying_npy() -> bytes:
    """A .npy whose header claims 2**28 float32 (1 GiB) and holds one."""
    data = _npy_bytes(np.zeros(1, np.float32))
    lie = data.replace(b"(1,), }" + b" " * 8, b"(268435456,), }", 1)  # same header length
    assert lie != data and len(lie) == len(data)
    return lie


@pytest.mark.parametrize(
    ("part", "members", "message"),
    [
        ("arrays", {"a0.npy": None, "a1": b"raw bytes"}, "its member 'a1' is not a numpy array"),
        ("strategy-arrays", {"m_t.0": b"\x93NUMPY"}, "its member 'm_t.0' is not a numpy array"),
        ("arrays", {"a0.npy": None, "a1.npy": "lying"}, "its array 'a1.npy' claims more data"),
    ],
)
def test_an_npz_member_that_is_no_plain_npy_array_is_refused(
    tmp_path: Path, part: str, members: dict, message: str
) -> None:
    manifest = _saved(tmp_path)
    built = {
        k: _npy_bytes(np.zeros((2, 3), np.float32))
        if v is None
        else (_lying_npy() if v == "lying" else v)
        for k, v in members.items()
    }
    name = manifest["files"][part]["name"]
    _rewrite(tmp_path, manifest, {part: (name, _zip_bytes(built))})
    with pytest.raises(PollenError, match=f"{name} cannot be used: {message}"):
        load_checkpoint(tmp_path)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    ("part", "text"),
    [
        ("strategy", _nested(100_000)),
        ("history", _nested(100_000)),
        ("manifest", _nested(100_000)),
        ("history", '{"config": ' + _nested(500) + ', "rounds": []}'),
    ],
)
def test_deeply_nested_checkpoint_json_is_refused(tmp_path: Path, part: str, text: str) -> None:
    """100,000 nested lists exceed the parser's recursion limit; 500 exceed Pollen's."""
    manifest = _saved(tmp_path)
    if part == "manifest":
        (tmp_path / "checkpoint" / "manifest.json").write_text(text)
        name = "manifest.json"
    else:
        name = manifest["files"][part]["name"]
        _rewrite(tmp_path, manifest, {part: (name, text.encode())})
    with pytest.raises(PollenError, match=f"{name} cannot be used: its JSON nests deeper than"):
        load_checkpoint(tmp_path)


# --- each strategy with state: saved after a round, the next aggregate is unchanged ------------


def _round(strategy, rnd: int, arrays: list[np.ndarray], updates: list[list[np.ndarray]]):
    """One round of ``strategy`` on ``arrays`` (seeded noise); its aggregate as numpy arrays."""
    grid = NodesGrid(list(range(1, len(updates) + 1)))
    list(strategy.configure_train(rnd, ArrayRecord(arrays), ConfigRecord({}), grid))
    replies = [train_reply(i + 1, u, n=10 * (i + 1)) for i, u in enumerate(updates)]
    np.random.seed(rnd)  # Flower's DP noise comes from numpy's global generator
    new, _ = strategy.aggregate_train(rnd, replies)
    return new.to_numpy_ndarrays()


def _updates(rnd: int, base: list[np.ndarray]) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(rnd)
    return [
        [a + rng.normal(size=a.shape).astype(a.dtype) if a.dtype.kind == "f" else a for a in base]
        for _ in range(3)
    ]


@pytest.mark.parametrize(
    "options",
    [
        {"strategy": "fedadam"},
        {"strategy": "fedyogi"},
        {"strategy": "fedadagrad"},
        {"strategy": "fedavgm", "server_momentum": 0.9, "server_lr": 0.5},
        {"strategy": "fedavg", "dp": True, "dp_noise": 1.0, "dp_clip": 5.0, "min_clients": 3},
    ],
)
def test_a_restored_strategy_aggregates_like_one_never_checkpointed(
    tmp_path: Path, options: dict
) -> None:
    cfg = RunConfig(model="cnn-gn", **options)
    keep, saved = make_strategy(cfg), make_strategy(cfg)
    if cfg.dp:
        keep, saved = make_private(keep, cfg, 3), make_private(saved, cfg, 3)
    arrays = [np.zeros((3, 2), np.float32), np.ones(4, np.float32), np.arange(3, dtype=np.int64)]
    for strategy in (keep, saved):
        after_one = _round(strategy, 1, arrays, _updates(1, arrays))
    # The round loop may change the global arrays after aggregation (BatchNorm statistics):
    # FedAvgM's own current_arrays must come back, not be taken from the global arrays.
    after_one[1] = after_one[1] + 0.5
    global_arrays = {str(i): a for i, a in enumerate(after_one)}
    save_checkpoint(tmp_path, 1, global_arrays, saved, _history(1), cfg.to_mapping())
    ckpt = load_checkpoint(tmp_path)
    restored = ckpt.strategy
    assert type(restored) is type(keep)
    inner_keep = keep.strategy if cfg.dp else keep
    inner_restored = restored.strategy if cfg.dp else restored
    for attr in KEPT[type(inner_keep)]:
        _assert_same_state(getattr(inner_restored, attr), getattr(inner_keep, attr))
    assert privacy_record(restored) == privacy_record(keep)
    if cfg.dp:
        assert isinstance(restored, DifferentialPrivacyServerSideFixedClipping)
        assert restored.accountant.state_dict() == keep.accountant.state_dict()
    loaded = [ckpt.arrays[str(i)] for i in range(len(after_one))]
    expected = _round(keep, 2, after_one, _updates(2, after_one))
    got = _round(restored, 2, loaded, _updates(2, loaded))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert privacy_record(restored) == privacy_record(keep)


def _assert_same_state(got, expected) -> None:
    if isinstance(expected, ArrayRecord):
        assert list(got.keys()) == list(expected.keys())
        got, expected = got.to_numpy_ndarrays(), expected.to_numpy_ndarrays()
    if isinstance(expected, dict):
        assert list(got) == list(expected)
        got, expected = list(got.values()), list(expected.values())
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


# --- the run lock -----------------------------------------------------------------------------


def test_run_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    assert first.acquire()
    assert first.holder() == str(os.getpid())
    assert not second.acquire(timeout=0.3)
    first.release()
    assert second.acquire()
    second.release()
