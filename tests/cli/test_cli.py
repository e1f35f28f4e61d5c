"""The ``pollen`` command as users run it: exit codes and messages for bad input.

Every case runs ``python -m pollen.cli ARGS`` in a process of its own and checks what a
user sees: exit status 2, a message on stderr with a key phrase, and no traceback.

The cases that load data or a model import Flower, Keras and TensorFlow, so ~25 fresh
interpreters would take minutes on two cores (see docs/performance.md#cli-tests). Instead
one driver process pays for those imports once and then forks a child per case; each
child executes ``pollen.cli`` as ``__main__`` exactly as ``python -m`` does (``runpy``),
with its own argv, working folder, stdout, stderr and exit status, and a timeout. Two
tests still start real interpreters (``python -m pollen.cli`` and the installed
``pollen`` script) and check that they behave like the forked children. Set
``POLLEN_TEST_CLI_SPAWN=1`` to run every case in a fresh interpreter instead.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

CASE_TIMEOUT_S = 60
SPAWN_EVERY_CASE = os.environ.get("POLLEN_TEST_CLI_SPAWN") == "1"

# id, argv ({placeholders} filled from the workspace), phrase expected on stderr
CASES: list[tuple[str, list[str], str]] = [
    ("no-command", [], "the following arguments are required: COMMAND"),
    ("unknown-command", ["train"], "invalid choice: 'train'"),
    ("sim-rounds-0", ["simulate", "--rounds", "0"], "argument --rounds: '0' must be at least 1"),
    ("sim-clients-abc", ["simulate", "--clients", "abc"], "'abc' is not a whole number"),
    ("sim-model", ["simulate", "--model", "nope"], "argument --model: invalid choice: 'nope'"),
    ("sim-partition", ["simulate", "--partition", "weird"], "invalid choice: 'weird'"),
    ("sim-alpha", ["simulate", "--alpha", "-1"], "argument --alpha: '-1' must be positive"),
    ("sim-lr-0", ["simulate", "--lr", "0"], "argument --lr: '0' must be positive"),
    ("sim-target", ["simulate", "--target-accuracy", "2"], "must be between 0 and 1"),
    ("sim-strategy", ["simulate", "--strategy", "fedmagic"], "invalid choice: 'fedmagic'"),
    (
        "sim-data-missing",
        ["simulate", "--data-dir", "{tmp}/nonexistent"],
        "--data-dir {tmp}/nonexistent does not exist",
    ),
    ("sim-data-empty", ["simulate", "--data-dir", "{empty}"], "does not have a layout"),
    (
        # Inconsistent options must be reported before any data is loaded (or downloaded:
        # without --data-dir that is CIFAR-10; the proxy in the test environment is dead).
        "sim-min-clients",
        ["simulate", "--clients", "2", "--min-clients", "3"],
        "--min-clients 3 is more than --clients 2",
    ),
    ("sim-dp-no-noise", ["simulate", "--dp"], "--dp needs a noise level"),
    (
        "sim-dp-budget-impossible",
        ["simulate", "--dp", "--dp-epsilon", "0.0001", "--rounds", "50"],
        "needs a noise multiplier above 100",
    ),
    (
        "sim-dp-noise-over-budget",
        ["simulate", "--dp", "--dp-noise", "0.5", "--dp-epsilon", "2"],
        "--dp-noise 0.5 spends epsilon=",
    ),
    (
        "sim-dp-robust",
        ["simulate", "--dp", "--dp-noise", "1", "--strategy", "krum"],
        "Differential privacy works with fedavg or fedprox",
    ),
    (
        "sim-secagg-robust",
        ["simulate", "--secagg", "--strategy", "fedmedian"],
        "fedavg strategy only",
    ),
    (  # --secagg --dp alone is distributed DP now; Poisson sampling cannot join it
        "sim-secagg-poisson",
        ["simulate", "--secagg", "--dp", "--dp-noise", "1", "--client-sampling", "poisson"],
        "cannot be combined with --secagg",
    ),
    ("sim-attack", ["simulate", "--attack", "poison"], "invalid choice: 'poison'"),
    (
        "sim-malicious-too-many",
        ["simulate", "--clients", "2", "--malicious", "3"],
        "--malicious 3 is more than --clients 2",
    ),
    (
        "sim-bulyan-too-few",
        ["simulate", "--clients", "5", "--strategy", "bulyan", "--num-malicious-nodes", "1"],
        "needs at least 7 clients per round",
    ),
    ("sim-trim-beta", ["simulate", "--trim-beta", "0.7"], "trim-beta must be in [0, 0.5)"),
    ("client-no-server", ["client"], "the following arguments are required: --server"),
    ("client-no-data", ["client", "--server", "127.0.0.1:1"], "give --data-dir"),
    (
        "client-partition-alone",
        ["client", "--server", "x", "--partition-id", "0"],
        "--partition-id and --num-partitions go together",
    ),
    (
        "client-partition-range",
        ["client", "--server", "x", "--partition-id", "3", "--num-partitions", "2"],
        "--partition-id 3 is out of range",
    ),
    (
        "client-data-missing",
        ["client", "--server", "x", "--data-dir", "{tmp}/nonexistent"],
        "does not exist",
    ),
    (
        "client-unreachable",
        [
            "client",
            "--server",
            "127.0.0.1:{dead_port}",
            "--data-dir",
            "{images}",
            "--connect-timeout",
            "1",
        ],
        "Cannot reach a pollen server at 127.0.0.1:{dead_port}",
    ),
    (
        "client-bad-address",
        ["client", "--server", "nonsense:abc", "--data-dir", "{images}"],
        "Invalid address 'nonsense:abc'",
    ),
    ("server-address", ["server", "--address", "nonsense:abc"], "Invalid address 'nonsense:abc'"),
    ("server-port-range", ["server", "--address", "0.0.0.0:70000"], "Invalid address"),
    (
        "server-test-data",
        ["server", "--test-data", "{tmp}/nonexistent"],
        "--test-data {tmp}/nonexistent does not exist",
    ),
    ("server-min-clients", ["server", "--min-clients", "0"], "'0' must be at least 1"),
    (
        "server-port-in-use",
        ["server", "--address", "127.0.0.1:{busy_port}", "--rounds", "1"],
        "is already in use",
    ),
    ("sim-data-corrupt", ["simulate", "--data-dir", "{corrupt}"], "bad.png cannot be read"),
    (
        "client-data-corrupt",
        ["client", "--server", "127.0.0.1:{dead_port}", "--data-dir", "{corrupt}"],
        "bad.png cannot be read",
    ),
    (
        "predict-missing-model",
        ["predict", "--model", "{tmp}/nonexistent.keras", "x.png"],
        "No model at {tmp}/nonexistent.keras",
    ),
    (
        "predict-text-model",
        ["predict", "--model", "{text_model}", "{png}"],
        "Cannot load {text_model} as a Keras model",
    ),
    (
        "predict-missing-image",
        ["predict", "--model", "{model}", "{tmp}/no-such-image.png"],
        "no-such-image.png does not exist",
    ),
    ("predict-no-images", ["predict", "--model", "{model}"], "required: images"),
    ("predict-top-0", ["predict", "--model", "{model}", "--top", "0", "{png}"], "at least 1"),
]

# A Python file the driver process runs: import once, fork per case.
DRIVER = r"""
import json, os, runpy, signal, sys, traceback

import pollen.data.load, pollen.deploy.server, pollen.deploy.client  # noqa
import pollen.models.registry, pollen.cli.app, pollen.server.strategies  # noqa

def run(argv, cwd, out_path, err_path, timeout):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    code = 1
    try:
        signal.alarm(timeout)
        os.chdir(cwd)
        for fd, path in ((1, out_path), (2, err_path)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = ["pollen", *argv]
        try:
            runpy.run_module("pollen.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:  # what the interpreter does with it
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

cases = json.loads(open(sys.argv[1]).read())
codes = {c["id"]: run(c["argv"], c["cwd"], c["out"], c["err"], c["timeout"]) for c in cases}
with open(sys.argv[2], "w") as f:
    json.dump(codes, f)
"""


_HELD: list[socket.socket] = []  # sockets kept open while the module's cases run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_png(path: Path, seed: int, size: tuple[int, int] = (32, 32)) -> Path:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _pollen_script() -> list[str]:
    script = Path(sys.executable).parent / "pollen"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pollen.cli"]


class Result:
    def __init__(self, rc: int | None, stdout: str, stderr: str) -> None:
        self.rc, self.stdout, self.stderr = rc, stdout, stderr

    def __repr__(self) -> str:
        return f"rc={self.rc}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


class Quiet(dict):
    """A dict that does not flood pytest's failure report with its contents."""

    def __repr__(self) -> str:
        return f"<{len(self)} entries>"


def _wait(proc: subprocess.Popen, timeout: float) -> Result:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return Result(None, out, err + f"\n[test] killed after {timeout} s")
    return Result(proc.returncode, out, err)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, str]:
    """Files the cases refer to, and the environment every pollen process gets."""
    tmp = tmp_path_factory.mktemp("cli")
    images = tmp / "images"
    for split in ("train", "test"):
        for c, name in enumerate(("a", "b")):
            for i in range(3):
                _write_png(images / split / name / f"{i}.png", seed=100 * c + 10 * i + len(split))
    (tmp / "empty").mkdir()
    corrupt = tmp / "corrupt"
    for split in ("train", "test"):
        _write_png(corrupt / split / "a" / "0.png", seed=7)
    (corrupt / "train" / "a" / "bad.png").write_bytes(b"not an image at all")
    busy = socket.socket()  # a port that is in use for the whole module
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    _HELD.append(busy)
    (tmp / "notes.txt").write_text("this is not a Keras model\n")
    png = _write_png(tmp / "cat.png", seed=1)
    wide = _write_png(tmp / "wide image.png", seed=2, size=(48, 40))

    from pollen.models.registry import build_model
    from pollen.server.history import save_model

    model = build_model("cnn", num_classes=3, seed=0)
    run = tmp / "run"
    model_path = save_model(run, model)
    (run / "classes.json").write_text(json.dumps(["a", "b", "c"]))

    dead = _free_port()
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(
        TF_CPP_MIN_LOG_LEVEL="2",
        POLLEN_CACHE_DIR=str(tmp / "cache"),
        KERAS_HOME=str(tmp / "keras-home"),
        PYTHONUNBUFFERED="1",
        # Nothing may be downloaded: every proxy points at a closed local port.
        http_proxy=f"http://127.0.0.1:{dead}",
        https_proxy=f"http://127.0.0.1:{dead}",
        HTTP_PROXY=f"http://127.0.0.1:{dead}",
        HTTPS_PROXY=f"http://127.0.0.1:{dead}",
    )
    return Quiet(
        {
            "tmp": str(tmp),
            "images": str(images),
            "empty": str(tmp / "empty"),
            "text_model": str(tmp / "notes.txt"),
            "png": str(png),
            "wide_png": str(wide),
            "model": str(model_path),
            "dead_port": str(dead),
            "busy_port": str(busy.getsockname()[1]),
            "corrupt": str(corrupt),
            "cwd": str(tmp / "cwd"),
            "env": json.dumps(env),
        }
    )


def _fill(text: str, ws: dict[str, str]) -> str:
    return text.format(**ws)


@pytest.fixture(scope="module")
def results(workspace) -> dict[str, Result]:
    """Run every case (and the real-interpreter checks, concurrently); key by case id."""
    ws = workspace
    env = json.loads(ws["env"])
    tmp, cwd = Path(ws["tmp"]), Path(ws["cwd"])
    cwd.mkdir(exist_ok=True)

    # Real interpreters, started first so they overlap with the driver.
    background = {
        "real:predict-missing-model": subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pollen.cli",
                *[_fill(a, ws) for a in dict((c[0], c[1]) for c in CASES)["predict-missing-model"]],
            ],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        "real:predict": subprocess.Popen(
            [
                *_pollen_script(),
                "predict",
                "--model",
                ws["model"],
                ws["png"],
                ws["wide_png"],
                "--top",
                "2",
            ],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    }

    out: dict[str, Result] = Quiet()
    if SPAWN_EVERY_CASE:
        for case_id, argv, _ in CASES:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pollen.cli", *[_fill(a, ws) for a in argv]],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            out[case_id] = _wait(proc, CASE_TIMEOUT_S)
    else:
        logs = tmp / "logs"
        logs.mkdir(exist_ok=True)
        cases = [
            {
                "id": case_id,
                "argv": [_fill(a, ws) for a in argv],
                "cwd": str(cwd),
                "out": str(logs / f"{case_id}.out"),
                "err": str(logs / f"{case_id}.err"),
                "timeout": CASE_TIMEOUT_S,
            }
            for case_id, argv, _ in CASES
        ]
        (tmp / "cases.json").write_text(json.dumps(cases))
        (tmp / "driver.py").write_text(DRIVER)
        driver = subprocess.Popen(
            [
                sys.executable,
                str(tmp / "driver.py"),
                str(tmp / "cases.json"),
                str(tmp / "codes.json"),
            ],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        status = _wait(driver, 60 + 2 * CASE_TIMEOUT_S)
        codes = json.loads((tmp / "codes.json").read_text()) if status.rc == 0 else {}
        for case in cases:
            out[case["id"]] = Result(
                codes.get(case["id"]),
                Path(case["out"]).read_text(errors="replace") if Path(case["out"]).exists() else "",
                (
                    Path(case["err"]).read_text(errors="replace")
                    if Path(case["err"]).exists()
                    else ""
                )
                + ("" if status.rc == 0 else f"\n[driver failed] {status!r}"),
            )
    for key, proc in background.items():
        out[key] = _wait(proc, 180)
    yield out
    for proc in background.values():
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(("case_id", "argv", "phrase"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_a_message(results, workspace, case_id, argv, phrase) -> None:
    res = results[case_id]
    assert res.rc == 2, res
    assert "Traceback" not in res.stderr + res.stdout, res
    assert _fill(phrase, workspace) in res.stderr, res
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("pollen") and "error:" in last, res


def test_pollen_errors_are_one_paragraph(results) -> None:
    """PollenError messages are one paragraph: a single 'pollen: error:' line."""
    for case_id in ("sim-data-empty", "client-no-data", "server-address", "predict-text-model"):
        lines = results[case_id].stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pollen: error: "), results[case_id]


def test_no_run_folder_left_behind(results, workspace) -> None:
    # Failed commands must not litter the working folder with runs/<timestamp>.
    assert results["server-address"].rc == 2
    assert not (Path(workspace["cwd"]) / "runs").exists()


def test_real_interpreter_behaves_like_the_driver(results) -> None:
    real, forked = results["real:predict-missing-model"], results["predict-missing-model"]
    assert real.rc == forked.rc == 2, real
    assert real.stderr.strip() == forked.stderr.strip(), real
    assert "Traceback" not in real.stderr


def test_predict_happy_path(results, workspace) -> None:
    res = results["real:predict"]
    assert res.rc == 0, res
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert len(lines) == 2, res
    import keras

    from pollen.data.decode import load_images

    model = keras.saving.load_model(workspace["model"])
    paths = [workspace["png"], workspace["wide_png"]]
    probs = model.predict(load_images(paths).astype("float32"), verbose=0)
    for line, path, p in zip(lines, paths, probs, strict=True):
        assert line.startswith(f"{path}: "), line
        shown = re.findall(r"\b([abc]) \((\d\.\d{3})\)", line[len(path) :])
        assert len(shown) == 2, line
        names = [name for name, _ in shown]
        values = [float(v) for _, v in shown]
        assert len(set(names)) == 2
        assert values == sorted(values, reverse=True)
        assert names[0] == "abc"[int(np.argmax(p))]
        assert values[0] == pytest.approx(float(p.max()), abs=1e-3)


class _Captured(Exception):
    """Raised by the fake simulation with the run config it was given."""


def test_simulate_samples_a_fraction_of_the_clients(monkeypatch, tmp_path) -> None:
    """--fraction-train 0.3 of 10 clients samples 3 per round: the default --min-clients
    follows it (it used to stay at all 10, which overrode the fraction)."""
    import pollen.cli.app as cli
    import pollen.cli.simulate
    import pollen.deploy.simulation

    def fake(cfg, clients, **_):
        raise _Captured(cfg, clients)

    monkeypatch.setattr(pollen.deploy.simulation, "simulate", fake)
    monkeypatch.setattr(pollen.cli.simulate, "_prepare_data", lambda data_dir, *_: None)
    monkeypatch.setattr(pollen.cli.simulate, "_check_clients_have_data", lambda *_: None)
    argv = ["simulate", "--clients", "10", "--model", "cnn", "--out", str(tmp_path / "run")]
    for extra, expected in (([], 10), (["--fraction-train", "0.3"], 3),
                            (["--fraction-train", "0.3", "--min-clients", "5"], 5)):  # fmt: skip
        with pytest.raises(_Captured) as caught:
            cli.main(argv + extra)
        cfg, clients = caught.value.args
        assert (cfg.min_clients, clients) == (expected, 10)


def test_native_load_notices_are_held_back_and_everything_else_kept(capfd) -> None:
    import os

    from pollen.deploy.processes import without_native_notices
    from pollen.errors import PollenError

    with without_native_notices():
        # what TensorFlow's native libraries write while loading, straight to descriptor 2
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are x\n")
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on. You may see\n")
        os.write(2, b"E0000 something real went wrong\n")
        os.write(2, b"and its second line\n")
    err = capfd.readouterr().err
    assert err == "E0000 something real went wrong\nand its second line\n"
    with pytest.raises(PollenError), without_native_notices():
        os.write(2, b"kept before the error\n")
        raise PollenError("bad input")
    assert capfd.readouterr().err == "kept before the error\n"
