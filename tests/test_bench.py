"""The benchmark suite's arithmetic (benchmarks/bench.py), on a made-up history."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench import describe_verdict, print_table, reference_verdict, run_figures  # noqa: E402


def _client(fit: float, evaluate: float, examples: int = 1000) -> dict:
    return {"fit_seconds": fit, "eval_seconds": evaluate, "train_examples": examples}


HISTORY = {
    "rounds": [
        {"round": 1, "seconds": 110.0, "server": {"accuracy": 0.55},
         "clients": [_client(90, 10), _client(95, 5)], "bytes_sent": 4, "bytes_received": 2,
         "phase_seconds": {"train": 97.0, "evaluate": 6.0, "server": 7.0}},
        {"round": 2, "seconds": 100.0, "server": {"accuracy": 0.72},
         "clients": [_client(80, 10), _client(100, 0)], "bytes_sent": 4, "bytes_received": 2},
        {"round": 3, "seconds": 105.0, "server": {"accuracy": 0.81},
         "clients": [_client(100, 5), _client(100, 5)], "bytes_sent": 4, "bytes_received": 2},
    ]
}  # fmt: skip


def test_run_figures_overhead_throughput_and_time_to_threshold(capsys) -> None:
    figures = run_figures(HISTORY, wall=345.0)
    assert figures["startup_seconds"] == pytest.approx(30.0)  # 345 - 315 of rounds
    r1, r2, r3 = figures["rounds"]
    assert r1["overhead"] == pytest.approx(110 / 100)  # slowest client: 95 + 5 = 100 s busy
    assert r2["overhead"] == pytest.approx(1.0)
    assert r3["elapsed_seconds"] == pytest.approx(345.0)
    assert r2["images_per_second"] == pytest.approx(10.0)  # the slower client: 1000 / 100 s
    assert r1["bytes"] == 6
    assert figures["time_to"]["50%"] == {"round": 1, "seconds": pytest.approx(140.0)}
    assert figures["time_to"]["70%"]["round"] == 2
    assert figures["time_to"]["80%"] == {"round": 3, "seconds": pytest.approx(345.0)}
    assert "90%" not in figures["time_to"]
    print_table("made up", figures)
    out = capsys.readouterr().out
    assert "80% after round 3 (345 s)" in out and "1.100" in out
    assert r1["phase_seconds"]["server"] == 7.0 and "97/6/7/-" in out
    assert r1["overhead_without_server_eval"] == pytest.approx(103 / 100) and "1.030" in out
    assert r2["overhead_without_server_eval"] == pytest.approx(1.0)  # no phases: whole round
    assert r2["phase_seconds"] == {} and "-/-/-/-" in out  # histories from before phases


def test_run_figures_without_server_evaluation() -> None:
    history = {"rounds": [{**HISTORY["rounds"][0], "server": {}}]}
    figures = run_figures(history, wall=100.0)  # shorter than the round: no start-up
    assert figures["startup_seconds"] == 0.0
    assert figures["rounds"][0]["test_accuracy"] is None
    assert figures["time_to"] == {}


# --- benchmarks/gpu.py: the in-process federation --------------------------------------------


def _gpu_run(tiny_data, rounds: int, targets: list[float]) -> dict:
    import argparse

    import gpu

    args = argparse.Namespace(
        precision="float32", model="cnn", rounds=rounds, clients=2, targets=targets,
        data_dir=str(tiny_data), train_limit=0, max_seconds=600.0,
    )  # fmt: skip
    records: list[dict] = []
    result = gpu.run(args, records.append)
    assert [r["round"] for r in records] == [r["round"] for r in result["rounds"]]
    return result


def test_gpu_benchmark_federation_stops_once_every_target_is_reached(tiny_data) -> None:
    result = _gpu_run(tiny_data, rounds=3, targets=[0.0])
    assert len(result["rounds"]) == 1  # 0% is reached after round 1
    first = result["rounds"][0]
    assert result["seconds_to_target"]["0.00"] == pytest.approx(first["elapsed"])
    assert 0 <= first["test_accuracy"] <= 1 and len(first["client_accuracy"]) == 2
    assert set(first["phase_seconds"]) == {"train", "evaluate", "server"}


def test_gpu_benchmark_federation_runs_every_round_for_an_unreachable_target(tiny_data) -> None:
    result = _gpu_run(tiny_data, rounds=2, targets=[1.01])
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert result["seconds_to_target"] == {"1.01": None}
    assert all(r["elapsed"] <= result["wall_seconds"] for r in result["rounds"])


def test_run_figures_with_the_server_evaluation_beside_the_next_round(capsys) -> None:
    """An evaluation beside the next round tells the accuracy later and is not overhead."""
    beside = {"train": 95.0, "evaluate": 5.0, "server-beside": 8.0}
    history = {
        "rounds": [
            {**HISTORY["rounds"][0], "seconds": 100.0, "phase_seconds": beside},
            {**HISTORY["rounds"][2], "round": 2, "seconds": 105.0, "phase_seconds": beside},
        ]
    }
    figures = run_figures(history, wall=243.0)
    # 243 s = 30 s start-up + 100 + 105 s of rounds + 8 s of evaluation after the last one
    assert figures["startup_seconds"] == pytest.approx(30.0)
    assert figures["final_seconds"] == pytest.approx(8.0)
    r1, r2 = figures["rounds"]
    assert r1["overhead"] == pytest.approx(1.0) and r1["overhead_without_server_eval"] == 1.0
    assert r1["elapsed_seconds"] == pytest.approx(138.0)  # 130 s, then 8 s of evaluation
    assert figures["time_to"]["80%"] == {"round": 2, "seconds": pytest.approx(243.0)}
    print_table("beside", figures)
    out = capsys.readouterr().out
    assert "95/5/-/8" in out and "after the last round 8 s" in out


def _central(*accuracies: float) -> dict:
    return {"epochs": [{"epoch": i + 1, "test_accuracy": a} for i, a in enumerate(accuracies)]}


def test_reference_verdict_measures_the_gap_to_central_training() -> None:
    federated = run_figures(HISTORY, wall=345.0)  # 0.81 after the last round
    short = reference_verdict(federated, _central(0.7, 0.85, 0.845), _central(0.8, 0.83, 0.84))
    assert short["gap_points"] == pytest.approx(3.5)
    assert short["at_least_50"] and not short["within_2_points"]
    assert short["combined"] == 0.84
    line = describe_verdict(short)
    assert "3.5 points under it: within 2 points NOT met" in line and "84.00%" in line

    close = reference_verdict(federated, _central(0.82), {"failed": True})
    assert close["within_2_points"] and close["combined"] is None
    assert "1.0 points under it: within 2 points met" in describe_verdict(close)
    over = reference_verdict(federated, _central(0.49))
    assert over["within_2_points"] and "32.0 points over it" in describe_verdict(over)

    low = {"rounds": [{"test_accuracy": 0.45}]}
    assert not reference_verdict(low, _central(0.46))["at_least_50"]
