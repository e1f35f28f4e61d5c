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
``data-dir`` (else CIFAR-10 from the local cache; only in simulation the run
config's ``data-dir`` first, see :func:`pollen.client.local_data.is_simulated`)
and, if ``num-partitions`` is present, ``partition-id`` of ``num-partitions``.
A deployed client never takes its data path from the server.

Fault injection (for tests and robustness experiments only): a client whose
node config has ``fault=KIND`` (``pollen client --fault KIND``), or whose
partition is named in the run config's ``fault`` (``"KIND@0,2"``, for
simulations), misbehaves on purpose; see :data:`FAULTS`.
"""

from __future__ import annotations

import functools
import math
import socket
import time
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pollen.backend import configure_threads
from pollen.client.faults import corrupt, fault_of
from pollen.client.local_data import client_data_spec, load_client_data
from pollen.client.secagg_mod import (
    is_legacy_train,
    legacy_train_input,
    legacy_train_reply,
    secagg_client_mod,
)
from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.models.registry import MODELS, select_backend
from pollen.models.whitening import whiten_first_conv
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


@functools.lru_cache(maxsize=2)
def get_model(
    name: str,
    num_classes: int,
    seed: int,
    threads: int,
    sharing: int,
    whitened: bool = False,
    image_size: tuple[int, int] = (32, 32),
):
    """Build (once per process) the compiled registry model.

    The model object is reused across rounds: each round overwrites its
    weights with the global ones and gives it a fresh optimizer. Keras loads
    here for the first time in a client process, on the model's preferred
    backend (see :func:`pollen.models.registry.select_backend`). ``whitened``: the run
    started the first convolution whitened, so a model with
    ``ModelSpec.freeze_whitened`` trains with that layer frozen. ``image_size``:
    the run config's ``image-size`` as ``(height, width)``, the model's input.
    """
    select_backend(name)
    # Keras is imported here for the first time in a client process, after
    # select_backend chose its backend (KERAS_BACKEND is read once, at import).
    from pollen.training.compile import build_client_model

    configure_threads(threads, sharing)
    return build_client_model(name, num_classes, seed, whitened=whitened, image_size=image_size)


def whitens(cfg: RunConfig) -> bool:
    """Whether the run starts the model's first convolution from whitened patches.

    Never under DP or SecAgg+: the server must not see statistics of one client's data.
    """
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
    model = get_model(
        cfg.model, num_classes, cfg.seed, threads, sharing, whitens(cfg), cfg.image_hw
    )
    data = load_client_data(client_data_spec(cfg, node_config))
    if data.y_train.size and int(data.y_train.max()) >= cfg.num_classes:
        raise PollenError(
            f"This client's data has {len(data.class_names)} classes but the federation's "
            f"model predicts {cfg.num_classes}: use data with the federation's classes."
        )
    if "arrays" in content:
        weights = content["arrays"].to_numpy_ndarrays()
        check_architecture(model, weights)
        model.set_weights(weights)
    if cfg.weights:  # fine-tuning: the layers this round trains (pollen.training.finetune)
        from pollen.training.finetune import apply_round

        config = content.config_records.get("config") or {}
        apply_round(model, cfg, int(config.get("server-round", 1)))
    return cfg, model, data


def client_name(node_config: dict[str, Any]) -> str:
    """A readable name for this client in the server's history."""
    if node_config.get("name"):
        return str(node_config["name"])
    if "partition-id" in node_config and "num-partitions" in node_config:
        return f"partition-{node_config['partition-id']}"
    return socket.gethostname()


def check_architecture(model, weights: list) -> None:
    """Raise a PollenError if ``weights`` do not fit ``model``."""
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
    cfg, model, data = _setup(content, context)
    # Keras loads with the model (see get_model): pollen.training only after _setup.
    from pollen.training.finetune import round_learning_rate
    from pollen.training.local import ProximalTerm, RunSchedule, fit, reset_optimizer

    server_round = int(content["config"].get("server-round", 1))
    lr = float(content["config"].get("learning-rate", cfg.learning_rate))
    lr = round_learning_rate(cfg, server_round, lr)  # fine-tune-lr once a backbone trains
    if cfg.dp == "example":  # DP-SGD replaces Keras's fit (pollen.training.dp_sgd)
        result = train_example_dp(cfg, model, data, server_round, lr)
        return _reply(content, context, cfg, model, result)
    reset_optimizer(model, lr)
    mu = float(content["config"].get("proximal-mu", 0.0))
    if mu > 0:  # FedProx: penalise drifting from the global weights just loaded
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
    return _reply(content, context, cfg, model, result)


def train_example_dp(cfg: RunConfig, model, data, server_round: int, lr: float):
    """One round of DP-SGD (``--dp example``) on local data; the noise is fixed for the run.

    Each client calibrates its own noise multiplier from its number of
    examples, the expected batch size and the run's steps
    (:func:`pollen.training.accountant.example_noise`), so its examples get
    ``(dp-epsilon, dp-delta)`` over the whole run.
    """
    from pollen.training.accountant import example_noise, steps_per_round
    from pollen.training.dp_sgd import DPSettings, train_private

    n = len(data.y_train)
    steps = steps_per_round(n, cfg.batch_size, cfg.local_epochs)
    noise = example_noise(
        cfg.dp_epsilon, cfg.dp_noise, cfg.dp_delta, n, cfg.batch_size, cfg.num_rounds * steps
    )
    settings = DPSettings(
        clip=cfg.dp_clip,
        noise_multiplier=noise,
        batch_size=cfg.batch_size,
        steps=steps,
        learning_rate=lr,
        mirror=MODELS[cfg.model].flip_tta,  # augmentation multiplicity where mirrors keep the class
        # no seed: batches and noise from the OS's entropy (the run's seed is known to the server)
    )
    before = (server_round - 1) * steps
    return train_private(
        model, data.x_train, data.y_train, settings, steps_before=before, delta=cfg.dp_delta
    )


def _reply(content: RecordDict, context: Context, cfg: RunConfig, model, result) -> RecordDict:
    """The train reply: weights (faults injected where asked), metrics, the client's name."""
    server_round = int(content["config"].get("server-round", 1))
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
            **_privacy_metrics(result),
        }
    )
    return RecordDict(
        {
            "arrays": ArrayRecord(weights),
            "metrics": metrics,
            "client": ConfigRecord({"name": client_name(dict(context.node_config))}),
        }
    )


def _privacy_metrics(result) -> dict[str, float]:
    """Example-level DP spent so far (``dp-epsilon``, ...) of a DP-SGD round; {} otherwise."""
    if not hasattr(result, "epsilon"):
        return {}
    return {
        "dp_epsilon": result.epsilon,
        "dp_delta": result.delta,
        "dp_noise": result.noise_multiplier,
        "dp_sample_rate": result.sample_rate,
        "dp_steps": result.steps,
    }


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on local held-out data.

    Before evaluating, BatchNorm statistics are re-estimated on local training
    images (see :func:`pollen.training.evaluate.calibrate_batchnorm`) and sent back
    so the server can combine them into the global model.
    """
    cfg, model, data = _setup(msg, context)
    # Keras loads with the model (see get_model): pollen.training only after _setup.
    from pollen.training.evaluate import calibrate_batchnorm
    from pollen.training.evaluate import evaluate as evaluate_model

    start = time.perf_counter()
    # Under DP or SecAgg+ the server must not see per-client statistics of the data.
    n_calibrate = 0 if cfg.dp or cfg.secagg else cfg.bn_calibration_examples
    indices, stats, n_cal = calibrate_batchnorm(
        model, data.x_train, max_examples=n_calibrate, seed=cfg.seed
    )
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
    return ArrayRecord(array_dict={str(i): Array(a) for i, a in zip(indices, arrays, strict=True)})
