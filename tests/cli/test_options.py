"""The option table of the ``pollen`` command: docs, validators, run-config mapping."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pollen.cli.app import build_parser
from pollen.cli.options import (
    DOCS_FILE,
    FEDERATION,
    OPTIONS,
    fraction,
    main,
    non_negative_float,
    non_negative_int,
    options_markdown,
    options_of,
    positive_float,
    positive_int,
    resume_fields,
    resume_may_change,
    run_config_from_args,
)
from pollen.config import RunConfig

REPO = Path(__file__).resolve().parents[2]


def test_docs_options_md_is_generated_from_the_table() -> None:
    """docs/options.md must be what `python -m pollen.cli.options` writes: it cannot drift.

    A fresh interpreter: models other tests register must not appear in --model's choices.
    """
    check = subprocess.run(
        [sys.executable, "-m", "pollen.cli.options", "--check", str(REPO / DOCS_FILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stderr


def test_check_mode_reports_a_stale_file(tmp_path, capsys) -> None:
    stale = tmp_path / "options.md"
    stale.write_text("old\n")
    assert main(["--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main([str(stale)]) == 0
    assert main(["--check", str(stale)]) == 0


@pytest.mark.parametrize(
    ("parse", "text", "error"),
    [
        (positive_int, "abc", "'abc' is not a whole number"),
        (positive_int, "0", "'0' must be at least 1"),
        (non_negative_int, "-1", "'-1' must not be negative"),
        (positive_float, "x", "'x' is not a number"),
        (positive_float, "0", "'0' must be positive"),
        (positive_float, "nan", "'nan' must be positive"),
        (non_negative_float, "-0.5", "'-0.5' must not be negative"),
        (fraction, "1.5", "'1.5' must be between 0 and 1"),
    ],
)
def test_validators_refuse_with_the_message(parse, text, error) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=error):
        parse(text)


def test_validators_accept_their_range() -> None:
    assert positive_int("1") == 1 and non_negative_int("0") == 0
    assert positive_float("0.5") == 0.5 and non_negative_float("0") == 0.0
    assert fraction("0") == 0.0 and fraction("1") == 1.0


def test_every_field_is_a_run_config_field() -> None:
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    for opt in OPTIONS:
        assert opt.field is None or opt.field in fields, opt.flag


def test_one_flag_is_one_option_per_command() -> None:
    for command in ("simulate", "server", "client", "certs", "predict"):
        flags = [opt.flag for opt in options_of(command)]
        assert len(flags) == len(set(flags)), command


def test_resume_compares_the_training_options() -> None:
    expected = {
        "rounds": "num_rounds",
        "model": "model",
        "num_classes": "num_classes",
        "image_size": "image_size",
        "freeze_rounds": "freeze_rounds",
        "fine_tune_lr": "fine_tune_lr",
        "epochs": "local_epochs",
        "batch_size": "batch_size",
        "lr": "learning_rate",
        "lr_schedule": "lr_schedule",
        "strategy": "strategy",
        "bn_calibration_examples": "bn_calibration_examples",
        "target_accuracy": "target_accuracy",
        "round_timeout": "round_timeout",
        "max_update_norm": "max_update_norm",
        "seed": "seed",
        "mlflow": "mlflow_uri",
        "partition": "partition",
        "alpha": "alpha",
        "min_clients": "min_clients",
        "server_lr": "server_lr",
        "server_momentum": "server_momentum",
        "fraction_train": "fraction_train",
        "proximal_mu": "proximal_mu",
        "trim_beta": "trim_beta",
        "num_malicious_nodes": "num_malicious_nodes",
        "num_nodes_to_select": "num_nodes_to_select",
        "secagg": "secagg",
        "secagg_num_shares": "secagg_num_shares",
        "secagg_reconstruction_threshold": "secagg_reconstruction_threshold",
        "secagg_clipping_range": "secagg_clipping_range",
        "dp": "dp",
        "dp_noise": "dp_noise",
        "dp_clip": "dp_clip",
        "dp_delta": "dp_delta",
        "dp_epsilon": "dp_epsilon",
        "client_sampling": "client_sampling",
        "compress": "compress",
        "compress_down": "compress_down",
    }
    for command in FEDERATION:
        assert resume_fields(command) == expected
        assert set(resume_may_change(command)) == {
            "min_clients",
            "round_timeout",
            "compress",
            "compress_down",
            "mlflow_uri",
        }


def test_options_reach_the_run_config(tmp_path) -> None:
    argv = ["server", "--rounds", "5", "--epochs", "2", "--lr", "0.05", "--no-whiten"]
    argv += ["--fraction-train", "0.5", "--min-clients", "3", "--out", str(tmp_path / "r")]
    args = build_parser().parse_args(argv)
    cfg = run_config_from_args(args, keras_verbose=1)
    assert (cfg.num_rounds, cfg.local_epochs, cfg.learning_rate) == (5, 2, 0.05)
    assert (cfg.whiten, cfg.tta, cfg.fraction_train, cfg.min_clients) == (False, True, 0.5, 3)
    assert cfg.out == str((tmp_path / "r").resolve()) and cfg.keras_verbose == 1


def test_the_docs_name_every_option_of_every_command() -> None:
    text = options_markdown()
    for opt in OPTIONS:
        for command in opt.commands:
            section = text.split(f"## pollen {command}\n")[1].split("\n## ")[0]
            assert f"| `{opt.flag}`" in section, (command, opt.flag)


def test_simulate_options_reach_the_run_config(tmp_path) -> None:
    argv = ["simulate", "--no-server-eval", "--client-threads", "3", "--fault", "nan@1"]
    argv += ["--malicious", "1", "--attack", "noise", "--no-tta", "--out", str(tmp_path / "r")]
    args = build_parser().parse_args(argv)
    cfg = run_config_from_args(args, data_dir="", server_data_dir="", min_clients=2)
    assert (cfg.server_eval, cfg.client_threads, cfg.fault) == (False, 3, "nan@1")
    assert (cfg.malicious, cfg.attack, cfg.tta, cfg.whiten) == (1, "noise", False, True)
    assert cfg.min_clients == 2 and cfg.data_dir == ""
