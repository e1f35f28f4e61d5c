"""End-to-end: real pollen processes, real Flower runtime, over loopback.

1. ``pollen simulate``: 2 clients x 2 rounds of the small CNN on a generated
   dataset; checks the whole run folder.
2. ``pollen server`` + two ``pollen client`` processes: the run completes and
   writes the same artefacts; a stranger who reaches the server's port cannot
   submit runs; and everything a client sends is weights and metrics only
   (captured by a recording relay between the clients and the server).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import pollen_cmd

pytestmark = pytest.mark.e2e

ROUNDS = 2


def check_run_folder(run: Path, clients: int, train_total: int, server_eval: bool) -> dict:
    """Assert the artefacts every completed run writes; return history.json."""
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed", status
    history = json.loads((run / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == list(range(1, ROUNDS + 1))
    assert history["config"]["model"] == "cnn"
    for rnd in history["rounds"]:
        assert len(rnd["clients"]) == clients
        names = {c["name"] for c in rnd["clients"]}
        assert len(names) == clients
        for c in rnd["clients"]:
            assert c["error"] is None
            assert np.isfinite(c["train_loss"]) and 0 <= c["train_accuracy"] <= 1
            assert 0 <= c["eval_accuracy"] <= 1 and c["eval_examples"] > 0
        # Partitions are disjoint and complete: together the clients hold all the data.
        assert sum(c["train_examples"] for c in rnd["clients"]) == train_total
        assert rnd["train"]["examples"] == train_total
        assert rnd["seconds"] > 0 and rnd["bytes_sent"] > 0 and rnd["bytes_received"] > 0
        assert ("accuracy" in rnd["server"]) == server_eval
    rows = (run / "history.csv").read_text().splitlines()
    assert rows[0].startswith("round,scope,train_loss")
    assert len(rows) == 1 + ROUNDS * (1 + clients + (1 if server_eval else 0))
    assert (run / "metrics.png").read_bytes().startswith(b"\x89PNG")
    model = keras.saving.load_model(run / "model.keras")
    assert model.output_shape == (None, 3)
    assert json.loads((run / "classes.json").read_text()) == ["apple", "banana", "cherry"]
    return history


def test_simulation_end_to_end(tmp_path, tiny_data, pollen_env):
    run = tmp_path / "run"
    proc = subprocess.run(
        pollen_cmd(
            "simulate",
            "--clients",
            "2",
            "--rounds",
            str(ROUNDS),
            "--model",
            "cnn",
            "--num-classes",
            "3",
            "--data-dir",
            str(tiny_data),
            "--out",
            str(run),
            "--lr",
            "0.003",
            "--bn-calibration-examples",
            "64",
        ),
        env=pollen_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pollen: Round 2/2" in proc.stdout
    # The console says what matters; Flower's and Ray's lines are in the run's logs.
    console = proc.stdout + proc.stderr
    assert "configure_train" not in console and "Successfully started run" not in console
    assert len(console.splitlines()) < 20, console
    app_log = (run / "logs" / "simulation.log").read_text()
    assert "configure_train" in app_log and "Round 2/2" in app_log
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    history = check_run_folder(run, clients=2, train_total=72, server_eval=True)
    # The colour cue is easy: the federation must have learned it.
    assert history["rounds"][-1]["server"]["accuracy"] > 0.6


class Recorder:
    """ASGI wrapper that keeps the path and body of every request it relays."""

    def __init__(self, app):
        self.app = app
        self.requests: list[tuple[str, bytes]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        self.requests.append((scope["path"], body))
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_deployment_end_to_end(tmp_path, tiny_data, pollen_env):
    from flwr.app import Array
    from flwr.proto.message_pb2 import PushObjectRequest
    from flwr.supercore.inflatable.inflatable_object import (
        get_object_body,
        get_object_type_from_object_content,
    )

    from pollen.deploy.fleet_proxy import FleetProxy
    from pollen.deploy.processes import free_port, port_open
    from pollen.models.registry import batchnorm_stat_indices, build_model

    server_port = free_port()
    run = tmp_path / "run"
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("server", "c0", "c1")}
    server = subprocess.Popen(
        pollen_cmd(
            "server",
            "--address",
            f"127.0.0.1:{server_port}",
            "--rounds",
            str(ROUNDS),
            "--model",
            "cnn",
            "--num-classes",
            "3",
            "--test-data",
            str(tiny_data),
            "--out",
            str(run),
            "--lr",
            "0.003",
            "--bn-calibration-examples",
            "64",
            "--compress",  # the clients' updates travel as int8 changes (issue 21)
            "int8",
        ),  # fmt: skip
        env=pollen_env,
        stdout=logs["server"],
        stderr=subprocess.STDOUT,
    )
    # The clients talk to the server through a recording relay (itself a fleet-only proxy).
    relay = FleetProxy("127.0.0.1", 0, f"http://127.0.0.1:{server_port}")
    recorder = Recorder(relay.app)
    relay.app = recorder
    relay.start()
    clients = []
    try:
        wait_for(lambda: port_open("127.0.0.1", server_port), 60, "the server's port")

        # A stranger on the clients' port cannot reach the Control API (run submission).
        request = urllib.request.Request(
            f"http://127.0.0.1:{server_port}/v1/control/list-runs",
            data=b"",
            headers={"content-type": "application/protobuf"},
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403

        for i in range(2):
            clients.append(
                subprocess.Popen(
                    pollen_cmd(
                        "client",
                        "--server",
                        f"127.0.0.1:{relay.port}",
                        "--data-dir",
                        str(tiny_data),
                        "--partition-id",
                        str(i),
                        "--num-partitions",
                        "2",
                        "--log-dir",
                        str(tmp_path / f"c{i}-logs"),
                    ),
                    env=pollen_env,
                    stdout=logs[f"c{i}"],
                    stderr=subprocess.STDOUT,
                )
            )
        assert server.wait(timeout=600) == 0, (tmp_path / "server.log").read_text()[-4000:]
        for i, c in enumerate(clients):
            assert c.wait(timeout=120) == 0, (tmp_path / f"c{i}.log").read_text()[-4000:]
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
                p.wait()
        relay.stop()
        for f in logs.values():
            f.close()

    check_run_folder(run, clients=2, train_total=72, server_eval=True)

    # From round 2 on, each train message carried only the merged BatchNorm statistics:
    # the clients' warm apps kept the weights of the evaluate message (pollen.wire).
    sent = [r["bytes_sent"] for r in json.loads((run / "history.json").read_text())["rounds"]]
    assert all(s < 0.75 * sent[0] for s in sent[1:]), sent
    assert "sending the whole weights" not in (run / "logs" / "server-app.log").read_text()

    # --compress int8: each client sent its update as an int8 change, deflated (under a
    # quarter of its float32 weights), and the evaluation's BatchNorm statistics as fp16;
    # the server rebuilt float32 weights, and the model learned.
    history = json.loads((run / "history.json").read_text())
    assert history["config"]["compress"] == "int8"
    model = build_model("cnn", 3)
    weights = model.get_weights()
    whole = sum(w.nbytes for w in weights)
    stats = sum(weights[k].nbytes for k in batchnorm_stat_indices(model))
    for rnd in history["rounds"]:
        for c in rnd["clients"]:
            assert whole / 32 < c["bytes_received"] < 0.25 * whole + stats / 2 + 8192, (c, whole)
        assert rnd["bytes_received"] == sum(c["bytes_received"] for c in rnd["clients"])
    assert history["rounds"][-1]["server"]["accuracy"] > 0.6

    # The consoles say what matters (issue 22); every other line is in a log.
    server_console = (tmp_path / "server.log").read_text()
    assert "pollen: Round 2/2" in server_console, server_console
    assert "configure_train" not in server_console
    assert "configure_train" in (run / "logs" / "server-app.log").read_text()
    assert len(server_console.splitlines()) < 20, server_console

    # Each client ran every message in its one warm app process (pollen.deploy.warm_clientapp):
    # the initial-weights query (client 0 only), ROUNDS train and evaluate messages and the
    # end-of-run announcement; no per-message flwr-clientapp process was started.
    for i in range(2):
        console = (tmp_path / f"c{i}.log").read_text()
        assert "Received successfully" not in console and "Uvicorn" not in console, console
        assert len(console.splitlines()) < 20, console
        log = "".join(p.read_text() for p in (tmp_path / f"c{i}-logs").glob("supernode-*.log"))
        assert "Received successfully" in log
        assert "Start `flwr-clientapp` process" not in log
        assert log.count("[pollen] task") >= 2 * ROUNDS + 1, log[-3000:]
        assert "[pollen] task" in log and ": failed" not in log

    # --- What crossed the wire from the clients: weights and metrics only.
    paths = Counter(path for path, _ in recorder.requests)
    assert paths["/v1/fleet/push-messages"] > 0 and paths["/v1/fleet/push-object"] > 0
    assert all(path.startswith("/v1/fleet/") for path in paths)
    object_types = Counter()
    array_shapes = set()
    for path, body in recorder.requests:
        if path != "/v1/fleet/push-object":
            continue
        req = PushObjectRequest.FromString(body)
        kind = get_object_type_from_object_content(req.object_content)
        object_types[kind] += 1
        if kind == "Array":  # the body is JSON metadata; the bytes are in ArrayChunk children
            meta = json.loads(get_object_body(req.object_content, Array))
            array_shapes.add((meta["dtype"], tuple(meta["shape"])))
    assert set(object_types) <= {
        "Message",
        "RecordDict",
        "ArrayRecord",
        "Array",
        "ArrayChunk",
        "MetricRecord",
        "ConfigRecord",
    }, object_types
    # Records travel packed (pollen.wire): the weights, or the BatchNorm statistics, as
    # one float32 vector, beside their shapes and keys; an int8 update's float32 part is its
    # one scale per array (pollen.compress).
    weights = _cnn_weights()
    stats = batchnorm_stat_indices(build_model("cnn", 3))
    allowed_values = {
        sum(w.size for w in weights),
        sum(weights[i].size for i in stats),
        len(weights),
    }
    values = {shape for dtype, shape in array_shapes if "float32" in dtype}
    assert values and {n for (n,) in values} <= allowed_values, (values, allowed_values)
    assert all(len(shape) == 1 for _, shape in array_shapes), array_shapes
    # No image ever leaves a client: no 96-byte run of any training image's pixels.
    from pollen.data.load import load_dataset

    x = load_dataset(tiny_data, cache_dir=tmp_path / "cache").x_train
    wire = b"".join(body for _, body in recorder.requests)
    for image in x:
        assert image.tobytes()[:96] not in wire


def _cnn_weights():
    from pollen.models.registry import build_model

    return build_model("cnn", 3).get_weights()
