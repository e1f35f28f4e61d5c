"""End-to-end: a deployment whose clients send int8-compressed updates (``--compress int8``).

``pollen server --compress int8`` and two ``pollen client`` processes over
loopback, the small CNN on generated data for 2 rounds: the run completes,
the model learns, and what each client sent per round is about a quarter of
its float32 weights (the int8 update) plus its float32 BatchNorm statistics.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import pollen_cmd

pytestmark = pytest.mark.e2e

ROUNDS = 2


def test_deployment_with_int8_updates(tmp_path, tiny_data, pollen_env):
    from pollen.deploy.processes import free_port, port_open
    from pollen.models.registry import batchnorm_stat_indices, build_model

    port = free_port()
    run = tmp_path / "run"
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("server", "c0", "c1")}
    server = subprocess.Popen(
        pollen_cmd(
            "server",
            "--address",
            f"127.0.0.1:{port}",
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
            "--compress",
            "int8",
        ),  # fmt: skip
        env=pollen_env,
        stdout=logs["server"],
        stderr=subprocess.STDOUT,
    )
    clients = []
    try:
        import time

        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", port):
            assert time.monotonic() < deadline, "the server's port never opened"
            time.sleep(0.5)
        for i in range(2):
            clients.append(
                subprocess.Popen(
                    pollen_cmd(
                        "client",
                        "--server",
                        f"127.0.0.1:{port}",
                        "--data-dir",
                        str(tiny_data),
                        "--partition-id",
                        str(i),
                        "--num-partitions",
                        "2",
                    ),  # fmt: skip
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
        for f in logs.values():
            f.close()

    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    history = json.loads((run / "history.json").read_text())
    assert history["config"]["compress"] == "int8"
    model = build_model("cnn", 3)
    weights = model.get_weights()
    whole = sum(w.nbytes for w in weights)
    stats = sum(weights[i].nbytes for i in batchnorm_stat_indices(model))
    for rnd in history["rounds"]:
        assert len(rnd["clients"]) == 2
        for c in rnd["clients"]:
            assert c["error"] is None, c
            # The int8 update (a quarter, plus a scale per array and .npy headers) and the
            # evaluation's float32 BatchNorm statistics.
            assert 0.25 * whole < c["bytes_received"] < 0.27 * whole + stats + 8192, (c, whole)
        assert rnd["bytes_received"] == sum(c["bytes_received"] for c in rnd["clients"])
    # The colour cue is easy: the federation learned it from int8 updates.
    assert history["rounds"][-1]["server"]["accuracy"] > 0.6
