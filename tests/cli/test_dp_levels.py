"""``--dp [client|example]``: the bare flag keeps meaning client-level DP."""

from __future__ import annotations

import pytest

from pollen.cli.app import build_parser
from pollen.cli.options import run_config_from_args
from pollen.errors import PollenError


def _cfg(*argv: str):
    args = build_parser().parse_args(["simulate", *argv])
    return run_config_from_args(args)


def test_dp_levels_from_the_command_line() -> None:
    assert _cfg().dp == ""
    assert _cfg("--dp", "--dp-epsilon", "3").dp == "client"
    assert _cfg("--dp", "client", "--dp-epsilon", "3").dp == "client"
    cfg = _cfg("--dp", "example", "--dp-epsilon", "3", "--model", "scatternet")
    assert (cfg.dp, cfg.dp_epsilon, cfg.model) == ("example", 3.0, "scatternet")
    default = _cfg("--dp", "example", "--dp-epsilon", "3")  # the DP-SGD model by default
    assert (default.model, default.batch_size) == ("scatternet", 1024)
    assert _cfg("--dp", "example", "--dp-noise", "1", "--model", "cnn-gn").model == "cnn-gn"


def test_example_dp_without_a_noise_level_is_refused() -> None:
    with pytest.raises(PollenError, match="--dp example needs a noise level"):
        _cfg("--dp", "example")
    with pytest.raises(SystemExit):
        _cfg("--dp", "examples")
