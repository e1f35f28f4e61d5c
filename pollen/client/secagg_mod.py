"""The client half of secure aggregation (SecAgg+); the server half is :mod:`pollen.server.secagg`.

Client side (:func:`secagg_client_mod`, :func:`legacy_train_input`,
:func:`legacy_train_reply`): the ClientApp's train handler runs behind a mod
that applies Flower's ``secaggplus_mod`` to SecAgg+ messages only. In the
collect-masked-vectors stage that mod calls the train handler with a legacy
``FitIns`` and expects a legacy ``FitRes``; the handler converts them with
the two helpers here and runs its normal training in between. Under SecAgg a
client sends its update, not its weights: weights such as BatchNorm moving
variances exceed the ``+-clipping_range`` every value is clipped to.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from pollen.client.dp_mod import with_noise_share
from pollen.protocol import FITINS_PARAMETERS


def is_secagg_message(msg: Message) -> bool:
    """Whether ``msg`` is a step of the SecAgg+ protocol (a TRAIN with its config record)."""
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    )


def secagg_client_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """ClientApp mod: Flower's ``secaggplus_mod`` for SecAgg+ messages, else a no-op.

    ``secaggplus_mod`` handles every TRAIN message and fails on one without
    its config record; a plain Pollen run sends such messages, so they pass
    straight to the handler here. Under distributed DP (the train config
    carries ``dp-clip``), :func:`pollen.client.dp_mod.with_noise_share` clips
    and noises the update between the handler and the masking.
    """
    if is_secagg_message(msg):
        # Distributed DP: the handler's update is clipped and noised before it is masked.
        return secaggplus_mod(msg, context, functools.partial(with_noise_share, call_next))
    return call_next(msg, context)


def is_legacy_train(content: RecordDict) -> bool:
    """Whether a train message carries a legacy ``FitIns`` (the SecAgg+ collect stage)."""
    return FITINS_PARAMETERS in content.array_records and "arrays" not in content


def legacy_train_input(content: RecordDict) -> RecordDict:
    """Pollen's train input (``arrays`` keyed ``"0"``, ``"1"``, ..., ``config``) from a FitIns."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)
    return RecordDict(
        {
            "arrays": ArrayRecord(array_dict={str(i): Array(a) for i, a in enumerate(arrays)}),
            "config": ConfigRecord(dict(fitins.config)),
        }
    )


def legacy_train_reply(reply: RecordDict, global_arrays: ArrayRecord) -> RecordDict:
    """Pollen's train reply as a legacy ``FitRes`` holding the update, not the weights.

    Args:
        reply: What Pollen's train handler returns: ``arrays`` (trained
            weights), ``metrics`` (with ``num-examples``) and ``client``.
        global_arrays: The global weights the client trained from.

    Returns:
        ``fitres.*`` records with parameters ``trained - global`` (same
        dtypes and shapes), ``num_examples`` and the metrics, plus the
        ``client`` record (name for the server's history).
    """
    trained = reply["arrays"].to_numpy_ndarrays()
    start = global_arrays.to_numpy_ndarrays()
    update = [
        np.asarray(w, dtype=np.float64) - np.asarray(g, dtype=np.float64)
        for w, g in zip(trained, start, strict=True)
    ]
    update = [u.astype(g.dtype) for u, g in zip(update, start, strict=True)]
    metrics = dict(reply["metrics"])
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(update),
        num_examples=int(metrics["num-examples"]),
        metrics=metrics,
    )
    content = compat.fitres_to_recorddict(fitres, keep_input=False)
    if "client" in reply:
        content["client"] = reply["client"]
    return content
