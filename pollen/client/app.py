"""The ClientApp: a participant's private data, local training and evaluation.

Flower calls these handlers with a :class:`flwr.app.Message` from the server:

- ``query``: reply with freshly initialised model weights (the server holds
  no model, so round 1 starts from a client-built initialisation).
- ``train``: load the global weights, train ``local-epochs`` on local data,
  reply with the new weights and ``num-examples``.
- ``evaluate``: load the global weights, re-estimate BatchNorm statistics on
  local training images, evaluate on local held-out data, reply with loss,
  accuracy and the re-estimated statistics.

Only weights and metrics leave the client; the data never does.

Which data a client holds comes from its node config (``flower-supernode
--node-config``, set by ``pollen client``; or Flower's simulation engine):
``data-dir`` (else the run config's ``data-dir``; else CIFAR-10) and, if
``num-partitions`` is present, ``partition-id`` of ``num-partitions``.

Fault injection (for tests and robustness experiments only): a client whose
node config has ``fault=KIND`` (``pollen client --fault KIND``), or whose
partition is named in the run config's ``fault`` (``"KIND@0,2"``, for
simulations), misbehaves on purpose; see :data:`FAULTS`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pollen.client.secagg_mod import (
    is_legacy_train,
    legacy_train_input,
    legacy_train_reply,
    secagg_client_mod,
)
from pollen.config import RunConfig
from pollen.protocol import (
    DONE_FILE_KEY,
    NUM_EXAMPLES_KEY,
    PREPARE_REQUEST,
    RUN_OVER_REQUEST,
    TRAIN_EXAMPLES_REQUEST,
    UNIT_WEIGHT_KEY,
)
from pollen.wire import wire_mod

# wire_mod: records travel packed (pollen.wire), a few objects instead of one per array.
app = ClientApp(mods=[wire_mod])

#: Deliberate misbehaviour, for tests and robustness experiments only.
FAULTS = {
    "nan": "send NaN weights",
    "scale": "send the update (trained minus global weights) scaled by 1000",
    "signflip": "send the update with its sign flipped",
    "noise": "send Gaussian noise (standard deviation 1) added to the trained weights",
    "arch": "build the model with one class more than the federation's (the federation's "
    "weights then do not fit)",
}


def fault_of(node_config: dict[str, Any], run_fault: str) -> str:
    """The fault this client injects: its node config's ``fault``, else the run config's.

    ``run_fault`` is ``"KIND@IDS"``, several separated by spaces: clients whose
    ``partition-id`` is in the comma-separated ``IDS`` inject ``KIND``
    (``"nan@1"``, ``"scale@0,2 arch@3"``). Returns ``""`` for an honest client.
    """
    own = str(node_config.get("fault") or "")
    if own:
        return own
    if not run_fault or "partition-id" not in node_config:
        return ""
    for spec in run_fault.split():
        kind, _, ids = spec.partition("@")
        if int(node_config["partition-id"]) in {int(i) for i in ids.split(",") if i.strip()}:
            return kind
    return ""


def corrupt(kind: str, global_weights: list, weights: list, seed: int = 0) -> list:
    """Apply fault ``kind`` (see :data:`FAULTS`) to trained ``weights``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for g, w in zip(global_weights, weights, strict=True):
        if not np.issubdtype(w.dtype, np.floating):
            out.append(w)
            continue
        if kind == "nan":
            w = np.full_like(w, np.nan)
        elif kind == "scale":
            w = g + 1000.0 * (w - g)
        elif kind == "signflip":
            w = g - (w - g)
        elif kind == "noise":
            w = w + rng.normal(0.0, 1.0, w.shape)
        out.append(np.asarray(w, dtype=g.dtype))
    return out


@dataclass(frozen=True)
class ClientData:
    """Which slice of which dataset this client trains on."""

    data_dir: str
    partition_id: int | None
    num_partitions: int | None
    method: str
    alpha: float
    seed: int


def client_data_spec(cfg: RunConfig, node_config: dict[str, Any]) -> ClientData:
    """Resolve the client's data from its node config and the run config."""
    num_partitions = node_config.get("num-partitions")
    partition_id = node_config.get("partition-id")
    return ClientData(
        data_dir=str(node_config.get("data-dir") or cfg.data_dir or ""),
        partition_id=None if num_partitions is None else int(partition_id or 0),
        num_partitions=None if num_partitions is None else int(num_partitions),
        method=cfg.partition,
        alpha=cfg.alpha,
        seed=cfg.seed,
    )


@functools.lru_cache(maxsize=1)
def _load_whole_dataset(data_dir: str):
    """The whole dataset at ``data_dir``, loaded once per process.

    A simulation worker plays many clients in turn (100 clients on 2 workers):
    each of them slices its partition out of this one copy.
    """
    from pollen.data.load import load_dataset

    return load_dataset(data_dir or None)


@functools.lru_cache(maxsize=2)
def load_client_data(spec: ClientData):
    """Load (once per process) the client's own train/test arrays."""
    from pollen.data.partition import partition_dataset

    ds = _load_whole_dataset(spec.data_dir)
    if spec.num_partitions is not None:
        ds = partition_dataset(
            ds,
            spec.num_partitions,
            spec.partition_id or 0,
            method=spec.method,
            alpha=spec.alpha,
            seed=spec.seed,
        )
    return ds


@functools.lru_cache(maxsize=2)
def get_model(
    name: str, num_classes: int, seed: int, threads: int, sharing: int, whitened: bool = False
):
    """Build (once per process) the compiled registry model.

    The model object is reused across rounds: each round overwrites its
    weights with the global ones and gives it a fresh optimizer. Keras loads
    here for the first time in a client process, on the model's preferred
    backend (see :func:`pollen.models.registry.select_backend`). ``whitened``: the run
    started the first convolution whitened, so a model with
    ``ModelSpec.freeze_whitened`` trains with that layer frozen.
    """
    from pollen.models.registry import select_backend
    from pollen.training.compile import build_client_model

    select_backend(name)
    from pollen.backend import configure_threads

    configure_threads(threads, sharing)
    return build_client_model(name, num_classes, seed, whitened=whitened)


def whitens(cfg: RunConfig) -> bool:
    """Whether the run starts the model's first convolution from whitened patches.

    Never under DP or SecAgg+: the server must not see statistics of one client's data.
    """
    from pollen.models.registry import MODELS

    return bool(cfg.whiten and MODELS[cfg.model].whiten and not (cfg.dp or cfg.secagg))


def thread_plan(cfg: RunConfig, node_config: dict[str, Any]) -> tuple[int, int]:
    """``(threads, clients sharing this machine)`` for :func:`configure_threads`.

    ``pollen client`` always sets the node config ``threads`` (0 = all cores):
    a deployed client has its machine to itself. Without it the client runs in
    the simulation engine, where ``num-partitions`` clients share the machine
    and the run config's ``client-threads`` applies.
    """
    if "threads" in node_config:
        return int(node_config["threads"]), 1
    return cfg.client_threads, int(node_config.get("num-partitions", 1))


def _setup(msg: Message | RecordDict, context: Context):
    content = msg.content if isinstance(msg, Message) else msg
    cfg = RunConfig.from_mapping(context.run_config)
    node_config = dict(context.node_config)
    threads, sharing = thread_plan(cfg, node_config)
    num_classes = cfg.num_classes
    if "arrays" in content and fault_of(node_config, cfg.fault_spec()) == "arch":
        num_classes += 1  # fault injection: a client whose model differs
    model = get_model(cfg.model, num_classes, cfg.seed, threads, sharing, whitens(cfg))
    data = load_client_data(client_data_spec(cfg, node_config))
    if data.y_train.size and int(data.y_train.max()) >= cfg.num_classes:
        from pollen.errors import PollenError

        raise PollenError(
            f"This client's data has {len(data.class_names)} classes but the federation's "
            f"model predicts {cfg.num_classes}: use data with the federation's classes."
        )
    if "arrays" in content:
        weights = content["arrays"].to_numpy_ndarrays()
        check_architecture(model, weights)
        model.set_weights(weights)
    return cfg, model, data


def client_name(node_config: dict[str, Any]) -> str:
    """A readable name for this client in the server's history."""
    import socket

    if node_config.get("name"):
        return str(node_config["name"])
    if "partition-id" in node_config and "num-partitions" in node_config:
        return f"partition-{node_config['partition-id']}"
    return socket.gethostname()


def check_architecture(model, weights: list) -> None:
    """Raise a PollenError if ``weights`` do not fit ``model``."""
    from pollen.errors import PollenError

    own = [tuple(w.shape) for w in model.get_weights()]
    got = [tuple(w.shape) for w in weights]
    if own == got:
        return
    if len(own) != len(got):
        detail = f"{len(got)} arrays received, {len(own)} expected"
    else:
        i = next(i for i, (a, b) in enumerate(zip(own, got, strict=True)) if a != b)
        detail = f"array {i} has shape {got[i]}, expected {own[i]}"
    raise PollenError(
        f"The federation's model does not match this client's model ({model.name}): {detail}. "
        "Every client must build the same architecture: check the run config's model and "
        "num-classes."
    )


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's questions that are not training or evaluation.

    ``request="initial-arrays"``: reply with freshly initialised weights and
    the class names of the local data. For a model with a ``whiten`` layer
    (:class:`pollen.models.registry.ModelSpec`) the first convolution starts from the
    whitened principal components of local image patches, except under DP
    or SecAgg+. ``request="prepare"``: load the local data and build the
    model now (both are kept for the run's messages), reply with the name.
    ``request="train-examples"`` (asked
    under SecAgg+): reply with the number of local training examples, which
    every train reply reveals too. ``request="run-over"``: the run is
    finished; touch the node's done file so ``pollen client`` can exit.
    """
    from pathlib import Path

    request = msg.content["config"].get("request", "")
    if request == "hello":  # cheap: no model, no data
        info = ConfigRecord({"name": client_name(dict(context.node_config))})
        return Message(RecordDict({"client": info}), reply_to=msg)
    if request == TRAIN_EXAMPLES_REQUEST:  # SecAgg+ needs it before round 1 (max weight)
        spec = client_data_spec(
            RunConfig.from_mapping(context.run_config), dict(context.node_config)
        )
        info = ConfigRecord(
            {
                "name": client_name(dict(context.node_config)),
                TRAIN_EXAMPLES_REQUEST: len(load_client_data(spec).y_train),
            }
        )
        return Message(RecordDict({"client": info}), reply_to=msg)
    if request == PREPARE_REQUEST:  # load the data and build the model before round 1
        _setup(msg, context)
        info = ConfigRecord({"name": client_name(dict(context.node_config))})
        return Message(RecordDict({"client": info}), reply_to=msg)
    if request == RUN_OVER_REQUEST:
        done = context.node_config.get(DONE_FILE_KEY)
        if done:
            Path(str(done)).touch()
        return Message(RecordDict({"config": ConfigRecord({"ok": True})}), reply_to=msg)
    cfg, model, data = _setup(msg, context)
    info = ConfigRecord(
        {"name": client_name(dict(context.node_config)), "classes": list(data.class_names)}
    )
    from pollen.models.registry import MODELS, whiten_first_conv

    if whitens(cfg):
        info["whitened-images"] = whiten_first_conv(
            model, MODELS[cfg.model].whiten, data.x_train, seed=cfg.seed
        )
    return Message(
        RecordDict({"arrays": ArrayRecord(model.get_weights()), "client": info}), reply_to=msg
    )


@app.train(mods=[secagg_client_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on local data; reply with the update.

    Under SecAgg+ (:mod:`pollen.server.secagg`) the mod in front of this handler
    passes a legacy ``FitIns`` and masks the legacy ``FitRes`` returned: the
    same training runs, and the reply holds the update (trained minus
    global weights) instead of the weights.
    """
    if is_legacy_train(msg.content):
        content = legacy_train_input(msg.content)
        return Message(
            legacy_train_reply(_train(content, context), content["arrays"]), reply_to=msg
        )
    return Message(_train(msg.content, context), reply_to=msg)


def _train(content: RecordDict, context: Context) -> RecordDict:
    """Train ``content["arrays"]`` on local data; return weights, metrics, name."""
    import math

    from pollen.models.registry import MODELS
    from pollen.training.local import RunSchedule, fit, reset_optimizer

    cfg, model, data = _setup(content, context)
    server_round = int(content["config"].get("server-round", 1))
    lr = float(content["config"].get("learning-rate", cfg.learning_rate))
    reset_optimizer(model, lr)
    mu = float(content["config"].get("proximal-mu", 0.0))
    if mu > 0:  # FedProx: penalise drifting from the global weights just loaded
        from pollen.training.local import ProximalTerm

        ProximalTerm.of(model).anchor(mu)
    steps_per_round = cfg.local_epochs * math.ceil(len(data.y_train) / cfg.batch_size)
    schedule = RunSchedule(
        lr, (server_round - 1) * steps_per_round, cfg.num_rounds * steps_per_round, cfg.lr_schedule
    )

    result = fit(
        model,
        data.x_train,
        data.y_train,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed * 1000 + server_round,
        augment=MODELS[cfg.model].augment,
        verbose=cfg.keras_verbose,
        schedule=schedule,
    )
    weights = model.get_weights()
    kind = fault_of(dict(context.node_config), cfg.fault_spec())
    if kind and kind != "arch":
        weights = corrupt(kind, content["arrays"].to_numpy_ndarrays(), weights, server_round)
    metrics = MetricRecord(
        {
            "train_loss": result.loss,
            "train_accuracy": result.accuracy,
            "fit_seconds": result.seconds,
            NUM_EXAMPLES_KEY: result.num_examples,
            UNIT_WEIGHT_KEY: 1,  # the aggregation weight under DP (equal per client)
        }
    )
    return RecordDict(
        {
            "arrays": ArrayRecord(weights),
            "metrics": metrics,
            "client": ConfigRecord({"name": client_name(dict(context.node_config))}),
        }
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on local held-out data.

    Before evaluating, BatchNorm statistics are re-estimated on local training
    images (see :func:`pollen.training.local.calibrate_batchnorm`) and sent back
    so the server can combine them into the global model.
    """
    import time

    from pollen.training.local import calibrate_batchnorm
    from pollen.training.local import evaluate as evaluate_model

    cfg, model, data = _setup(msg, context)
    start = time.perf_counter()
    # Under DP or SecAgg+ the server must not see per-client statistics of the data.
    n_calibrate = 0 if cfg.dp or cfg.secagg else cfg.bn_calibration_examples
    indices, stats, n_cal = calibrate_batchnorm(
        model, data.x_train, max_examples=n_calibrate, seed=cfg.seed
    )
    from pollen.models.registry import MODELS

    flip_tta = cfg.tta and MODELS[cfg.model].flip_tta
    loss, accuracy = evaluate_model(model, data.x_test, data.y_test, flip_tta=flip_tta)
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "eval_loss": loss,
                    "eval_accuracy": accuracy,
                    "eval_seconds": time.perf_counter() - start,
                    "calibration-examples": n_cal,
                    NUM_EXAMPLES_KEY: len(data.y_test),
                    UNIT_WEIGHT_KEY: 1,
                }
            ),
            "client": ConfigRecord({"name": client_name(dict(context.node_config))}),
        }
    )
    if stats:
        content["bn-stats"] = _indexed_record(indices, stats)
    return Message(content, reply_to=msg)


def _indexed_record(indices: list[int], arrays: list) -> ArrayRecord:
    """ArrayRecord keyed like the global model's record (``"0"``, ``"1"``, ...)."""
    from flwr.app import Array

    return ArrayRecord(array_dict={str(i): Array(a) for i, a in zip(indices, arrays, strict=True)})
