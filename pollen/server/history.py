"""History and model files: what a run leaves in its run folder.

A run folder holds:

- ``history.json``: the config, and per round the aggregated and per-client
  train/eval loss and accuracy, examples, failures, round duration and the
  payload bytes sent to and received from clients;
- ``history.csv``: the same, one row per round and scope (``aggregate``,
  ``server`` or a client's name);
- ``metrics.png``: accuracy and loss per round;
- ``model.keras``: the global model, loadable with ``keras.saving.load_model``;
- ``status.json``: ``running``, ``completed`` or ``failed`` (with the error).

Every file is written atomically (temporary file, then rename), so a reader,
or a crash, never sees half a file.

Text a client chose (its name, an error reason it sent) reaches these files
only through :func:`printable` (see :func:`pollen.server.exchange.client_name`),
and every text cell of ``history.csv`` through :func:`csv_cell`, which keeps a
spreadsheet from reading it as a formula.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pollen.files import atomic_path, atomic_write

#: Longest client name kept (characters); a longer one is cut.
MAX_NAME_CHARS = 64

#: Longest error reason kept (characters) in the history; a longer one is cut.
MAX_REASON_CHARS = 500

#: First characters a spreadsheet reads as the start of a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def printable(text: object, limit: int = MAX_NAME_CHARS) -> str:
    """``text`` as one printable line of at most ``limit`` characters.

    Line breaks and tabs become spaces, every other character that is not
    printable (control characters, the escape sequences that would move a
    terminal's cursor) ``?``; a text longer than ``limit`` is cut and ends in
    ``...``.
    """
    line = "".join(
        ch if ch.isprintable() else " " if ch.isspace() else "?" for ch in str(text)[: limit + 1]
    )
    return line if len(line) <= limit else line[: max(limit - 3, 0)] + "..."


def csv_cell(value: Any) -> Any:
    """A ``history.csv`` cell: text that would start a formula gets a leading apostrophe.

    Spreadsheets run a cell that starts with ``=``, ``+``, ``-``, ``@``, a
    tab or a carriage return as a formula (``=cmd|' /C calc'!A0``); the
    apostrophe makes them show it as text. Numbers are left alone.
    """
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


CSV_COLUMNS = (
    "round",
    "scope",
    "train_loss",
    "train_accuracy",
    "train_examples",
    "eval_loss",
    "eval_accuracy",
    "eval_examples",
    "seconds",
    "bytes_sent",
    "bytes_received",
    "error",
    "dp_epsilon",
)


@dataclass
class ClientRound:
    """One client's part in one round (``None`` where it did not report).

    ``fit_seconds`` and ``eval_seconds`` are the client's own wall time of its
    local training and of its evaluation (BatchNorm re-estimation included).
    ``bytes_sent`` and ``bytes_received``: bytes of the arrays sent to it and
    received from it this round, as they travelled (packed, compressed).
    ``dp_epsilon``: under ``--dp example``, the epsilon its examples have spent
    so far (at the run's ``dp-delta``, Poisson sampling; its own accountant).
    """

    node_id: int
    name: str
    train_loss: float | None = None
    train_accuracy: float | None = None
    train_examples: int | None = None
    fit_seconds: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    eval_examples: int | None = None
    eval_seconds: float | None = None
    error: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    dp_epsilon: float | None = None


@dataclass
class RoundRecord:
    """Everything measured in one round.

    Attributes:
        round: Round number, from 1.
        seconds: Wall time of the round until the federation could go on:
            train and the clients' evaluation, plus the server's central
            evaluation only where the next round waited for it (a run with a
            target accuracy).
        train: Aggregated train metrics (``loss``, ``accuracy``, ``examples``).
        evaluate: Aggregated client evaluation (``loss``, ``accuracy``, ``examples``).
        server: Central evaluation of the global model (``loss``, ``accuracy``).
        clients: Per-client metrics.
        bytes_sent: Bytes of the arrays sent to clients, as they travelled
            (packed, compressed: :func:`pollen.wire.content_bytes`).
        bytes_received: Bytes of the arrays clients sent back, as they travelled.
        privacy: Differential privacy spent after this round (``epsilon``,
            ``delta``, ``noise_multiplier``, ``clipping_norm``, ``releases``);
            empty without DP. Under ``--dp example``: the largest epsilon of
            any client's examples, ``delta``, ``level`` ``"example"``,
            ``sampling`` ``"poisson"``, ``clipping_norm`` and the clients' largest
            ``noise_multiplier`` and ``steps`` (each client's own in ``clients``).
        phase_seconds: Wall time of the round's phases: ``train`` (send the
            global weights, local training, aggregation), ``evaluate``
            (clients' evaluation and BatchNorm statistics), and the central
            evaluation as ``server`` (the next round waited for it; in
            ``seconds``) or ``server-beside`` (it ran beside the next round or
            after the last one; not in ``seconds``).
    """

    round: int
    seconds: float = 0.0
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    server: dict[str, float] = field(default_factory=dict)
    clients: list[ClientRound] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    privacy: dict[str, float] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class History:
    """A run's configuration and its rounds, in order."""

    config: dict[str, Any]
    rounds: list[RoundRecord] = field(default_factory=list)
    elapsed_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form (the content of ``history.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """Inverse of :meth:`to_dict`."""
        rounds = [
            RoundRecord(**{**r, "clients": [ClientRound(**c) for c in r.get("clients", [])]})
            for r in data.get("rounds", [])
        ]
        return cls(
            config=data.get("config", {}),
            rounds=rounds,
            elapsed_seconds=data.get("elapsed_seconds", 0.0),
        )

    def csv_rows(self) -> list[dict[str, Any]]:
        """Rows of ``history.csv``: per round an aggregate, server and client rows."""
        rows: list[dict[str, Any]] = []
        for r in self.rounds:
            common = {"round": r.round}
            rows.append(
                {
                    **common,
                    "scope": "aggregate",
                    "train_loss": r.train.get("loss"),
                    "train_accuracy": r.train.get("accuracy"),
                    "train_examples": r.train.get("examples"),
                    "eval_loss": r.evaluate.get("loss"),
                    "eval_accuracy": r.evaluate.get("accuracy"),
                    "eval_examples": r.evaluate.get("examples"),
                    "seconds": r.seconds,
                    "bytes_sent": r.bytes_sent,
                    "bytes_received": r.bytes_received,
                }
            )
            if r.server:
                rows.append(
                    {
                        **common,
                        "scope": "server",
                        "eval_loss": r.server.get("loss"),
                        "eval_accuracy": r.server.get("accuracy"),
                        "eval_examples": r.server.get("examples"),
                    }
                )
            for c in r.clients:
                rows.append(
                    {
                        **common,
                        "scope": c.name,
                        "train_loss": c.train_loss,
                        "train_accuracy": c.train_accuracy,
                        "train_examples": c.train_examples,
                        "eval_loss": c.eval_loss,
                        "eval_accuracy": c.eval_accuracy,
                        "eval_examples": c.eval_examples,
                        "seconds": c.fit_seconds,
                        "bytes_sent": c.bytes_sent,
                        "bytes_received": c.bytes_received,
                        "error": c.error,
                        "dp_epsilon": c.dp_epsilon,
                    }
                )
        return rows


def write_history(run_dir: Path, history: History) -> None:
    """Write ``history.json`` and ``history.csv`` into ``run_dir``."""
    atomic_write(run_dir / "history.json", json.dumps(history.to_dict(), indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history.csv_rows():
        writer.writerow({k: ("" if v is None else csv_cell(v)) for k, v in row.items()})
    atomic_write(run_dir / "history.csv", buf.getvalue())


def read_history(run_dir: Path) -> History:
    """Read ``history.json`` from ``run_dir``."""
    return History.from_dict(json.loads((run_dir / "history.json").read_text()))


def write_status(run_dir: Path, status: str, error: str | None = None, **extra: Any) -> None:
    """Write ``status.json`` (``running``, ``completed`` or ``failed``)."""
    body = {"status": status, "error": error, **extra}
    atomic_write(run_dir / "status.json", json.dumps(body, indent=2) + "\n")


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """Read ``status.json``, or ``None`` if the run never wrote one."""
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None


def plot_history(run_dir: Path, history: History) -> None:
    """Draw accuracy and loss per round into ``metrics.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [r.round for r in history.rounds]
    series = [
        ("train (clients)", "train"),
        ("eval (clients)", "evaluate"),
        ("server test set", "server"),
    ]
    for label, key in series:
        for ax, metric in ((ax_acc, "accuracy"), (ax_loss, "loss")):
            values = [getattr(r, key).get(metric) for r in history.rounds]
            if any(v is not None for v in values):
                ys = [float("nan") if v is None else v for v in values]
                ax.plot(rounds, ys, "o-", label=label)
    for ax, name in ((ax_acc, "accuracy"), (ax_loss, "loss")):
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if rounds:
            ax.set_xticks(rounds)
        if ax.lines:
            ax.legend()
    ax_acc.set_ylim(0, 1)
    fig.suptitle(f"pollen: {history.config.get('model', '')}, {len(rounds)} rounds")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(run_dir / "metrics.png", buf.getvalue())


def save_model(run_dir: Path, model) -> Path:
    """Save a Keras model atomically as ``run_dir/model.keras``; return that path."""
    target = run_dir / "model.keras"
    with atomic_path(target, suffix=".keras") as tmp:
        model.save(tmp)
    return target
