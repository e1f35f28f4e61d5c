"""Around a run of ``pollen simulate`` / ``pollen server``: before it and after it.

Before: :func:`resume_config` (``--resume``), :func:`_refuse_unfinished_run` (a
new run must not overwrite a resumable one), :func:`_prepare_data` (load the
dataset once). After: :func:`_print_summary`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pollen.cli.options import DECLARED, resume_fields, resume_may_change
from pollen.config import RunConfig
from pollen.data.dataset import Dataset
from pollen.data.load import describe, is_cifar10, load_dataset, native_image_size
from pollen.errors import PollenError
from pollen.models.registry import MODELS
from pollen.server.checkpoint import load_checkpoint, read_manifest
from pollen.server.history import read_status

#: File in a simulation's run folder that records its number of clients (for --resume).
SIMULATION_FILE = "simulation.json"


def resume_config(args: argparse.Namespace, command: str) -> RunConfig:
    """The run config of the run in ``args.resume``, ready to continue it.

    Training options given on the command line must equal the run's (or be
    left at their defaults); ``--min-clients`` and ``--round-timeout`` may
    change (the options table in :mod:`pollen.cli.options` says which).

    Raises:
        PollenError: No resumable run there, it has completed, or an option
            contradicts the run's.
    """
    run_dir = args.resume.expanduser().resolve()
    manifest = read_manifest(run_dir)
    if manifest is None:
        raise PollenError(
            f"--resume {run_dir}: there is no checkpoint there (no checkpoint/manifest.json). "
            "Give the run folder of a run that completed at least one round, or start a new "
            "run without --resume."
        )
    status = read_status(run_dir) or {}
    if status.get("status") == "completed":
        raise PollenError(
            f"--resume {run_dir}: that run has already completed ({manifest['round']} "
            "rounds); there is nothing to continue. Start a new run with another --out."
        )
    saved = RunConfig.from_mapping(manifest["config"])
    changes, conflicts = _compare_options(args, command, saved)
    conflicts += _path_conflicts(args, command, saved, run_dir)
    if conflicts:
        raise PollenError(
            f"--resume continues the run in {run_dir} with the options it started with, but "
            f"these differ: {'; '.join(conflicts)}. Drop them to resume, or start a new run "
            "with another --out to change them."
        )
    resumed = saved.replace(out=str(run_dir), resume=True, **changes)
    load_checkpoint(run_dir, resumed)  # a hostile or broken checkpoint is refused before any start
    print(
        f"pollen: resuming {run_dir} after round {manifest['round']} of {saved.num_rounds}",
        flush=True,
    )
    return resumed


def _compare_options(
    args: argparse.Namespace, command: str, saved: RunConfig
) -> tuple[dict[str, Any], list[str]]:
    """The fields a resumed run changes, and the options that contradict the run's."""
    may_change = resume_may_change(command)
    changes: dict[str, Any] = {}
    conflicts = []
    for option, field in resume_fields(command).items():
        value = getattr(args, option, None)
        if value is None or not hasattr(saved, field) or value == DECLARED[field]:
            continue  # not given (or given as the default, which is indistinguishable)
        if field in may_change:
            changes[field] = value
        elif value != getattr(saved, field):
            conflicts.append(
                f"--{option.replace('_', '-')} {value} (the run has {getattr(saved, field)})"
            )
    return changes, conflicts


def _path_conflicts(
    args: argparse.Namespace, command: str, saved: RunConfig, run_dir: Path
) -> list[str]:
    """``--data-dir``, ``--test-data`` and ``--out`` that name another path than the run's."""
    conflicts = []
    data_dir = getattr(args, "data_dir", None) if command == "simulate" else None
    if data_dir is not None and str(data_dir.expanduser().resolve()) != saved.data_dir:
        conflicts.append(f"--data-dir {data_dir} (the run has {saved.data_dir or 'CIFAR-10'})")
    test_data = getattr(args, "test_data", None)
    if test_data is not None and str(test_data.expanduser().resolve()) != saved.server_data_dir:
        conflicts.append(f"--test-data {test_data} (the run has {saved.server_data_dir or 'none'})")
    if args.out is not None and args.out.expanduser().resolve() != run_dir:
        conflicts.append(f"--out {args.out} (the run's folder is {run_dir})")
    return conflicts


def _refuse_unfinished_run(run_dir: Path) -> None:
    """A new run must not overwrite the checkpoint of one that can still be resumed.

    Raises:
        PollenError: ``run_dir`` holds a checkpoint of a run that did not complete.
    """
    manifest = read_manifest(run_dir)
    status = (read_status(run_dir) or {}).get("status")
    if manifest is not None and status != "completed":
        raise PollenError(
            f"{run_dir} holds an unfinished run (last completed round {manifest['round']}, "
            f"status {status or 'unknown'}). Continue it with --resume {run_dir}, or give "
            "another --out for a new run."
        )


def _simulated_clients(run_dir: Path, given: int) -> int:
    """The number of clients the simulation in ``run_dir`` ran with.

    Raises:
        PollenError: ``run_dir`` is not a simulation's, or ``given`` (other than the
            default 2) differs from the run's.
    """
    try:
        saved = int(json.loads((run_dir / SIMULATION_FILE).read_text())["clients"])
    except (OSError, ValueError, KeyError, TypeError):
        raise PollenError(
            f"--resume {run_dir}: it has no {SIMULATION_FILE}, so it is not a run of "
            "`pollen simulate`; resume a server's run with `pollen server --resume`."
        ) from None
    if given not in (saved, 2):  # 2: the default, indistinguishable from not given
        raise PollenError(
            f"--resume {run_dir}: the run simulated {saved} clients, not {given}; drop "
            "--clients to resume it, or start a new run with another --out."
        )
    return saved


def _prepare_data(data_dir: str, image_size: tuple[int, int] = (32, 32)) -> Dataset:
    """Load (and download, if needed) the dataset once, before any client starts.

    Otherwise every simulated client would race to download CIFAR-10, and a
    missing dataset would surface as a failed round instead of a clear error.
    ``data_dir`` "" means CIFAR-10. The images are decoded at ``image_size`` and
    cached (the clients then read the cache). Returns the dataset (for checks
    before the run starts; drop it then, the clients load their own).
    """
    ds = load_dataset(data_dir or None, image_size=image_size)
    print(f"pollen: data: {describe(ds)}", flush=True)
    return ds


def image_size_line(cfg: RunConfig, given: str, *, server: bool = False) -> str:
    """The line ``pollen simulate`` / ``pollen server`` print about the run's image size.

    ``given``: the ``--image-size`` text (``"auto"`` when left out); the line says
    which rule chose a size left to auto. ``server``: for ``pollen server``, whose
    clients bring their own data.
    """
    height, width = cfg.image_hw
    head = f"pollen: image size {height}x{width}"
    change = "--image-size N or HxW to change"
    if cfg.resume:
        return f"{head} (the run's): images are resized to it, the model is built for it"
    if given.strip().lower() not in ("", "auto"):
        return f"{head} (--image-size): images are resized to it, the model is built for it"
    data = cfg.data_dir or cfg.server_data_dir
    if server and not data:
        return (
            f"{head} (auto: CIFAR-10's size, as no --test-data says otherwise; clients with "
            f"images of their own are resized to it: {change})"
        )
    if is_cifar10(data):
        return f"{head} (auto: CIFAR-10's own size; {change})"
    native = native_image_size(data)
    if native is not None and min(native) < MODELS[cfg.model].image_size:
        return (
            f"{head} (auto: your images are {native[0]}x{native[1]}, smaller than "
            f"{cfg.model}'s {MODELS[cfg.model].image_size}, and are not upsampled; {change})"
        )
    return f"{head} (auto: {cfg.model}'s size for images of your own, resized to it; {change})"


def _print_summary(run_dir: Path, status: dict[str, Any]) -> None:
    """Print the two closing lines of a run from its ``status.json`` mapping."""
    acc = status.get("final_server_accuracy")
    acc_text = f", final server test accuracy {acc:.4f}" if isinstance(acc, float) else ""
    target = status.get("target_accuracy")
    if target:
        if target.get("reached_round"):
            acc_text += (
                f"; target accuracy {target['target']:g} reached after round "
                f"{target['reached_round']}, {target['seconds']:.1f} s into the run"
            )
        else:
            acc_text += f"; target accuracy {target['target']:g} not reached"
    privacy = status.get("privacy")
    if privacy and privacy.get("level") == "example":  # --dp example: per-client accountants
        acc_text += (
            f"; example-level differential privacy: every client's examples within epsilon "
            f"{privacy['epsilon']:.3g} at delta {privacy['delta']:g} (DP-SGD, "
            f"{privacy['sampling']} sampling, per-example clipping norm "
            f"{privacy['clipping_norm']:g})"
        )
    elif privacy:
        acc_text += (
            f"; differential privacy spent: epsilon {privacy['epsilon']:.3g} at delta "
            f"{privacy['delta']:g} (noise multiplier {privacy['noise_multiplier']:g}, "
            f"clipping norm {privacy['clipping_norm']:g})"
        )
    print(
        f"pollen: run completed: {status.get('rounds')} rounds in "
        f"{status.get('elapsed_seconds', 0):.1f} s{acc_text}.\n"
        f"pollen: results in {run_dir} (model.keras, history.json, history.csv, metrics.png)",
        flush=True,
    )
