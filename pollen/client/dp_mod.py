"""The client's share of distributed DP (``--secagg --dp client``), added before SecAgg+ masks.

The server half is :mod:`pollen.server.distributed_dp`. In the SecAgg+
collect stage, Flower's ``secaggplus_mod`` calls the train handler and
quantizes and masks the update it returns; :func:`with_noise_share` sits
between the two (:func:`pollen.client.secagg_mod.secagg_client_mod`): when the
train config carries the DP keys it clips the update (all arrays together) to
L2 norm ``dp-clip``, adds Gaussian noise of std ``dp-noise * dp-clip /
sqrt(dp-noise-shares)`` drawn from the OS's randomness to every coordinate, and
gives the update the weight 1 (client-level DP weighs every client the same).
The server only ever sees the masked sum. Before noising, the client checks
the noise asked for against its own run config and SecAgg+ setup
(:func:`check_requested_noise`).

Flower's ``fixedclipping_mod`` does not fit here: it clips the returned
*weights* against the global ones, while under SecAgg+ Pollen's reply already
holds the update, and it adds no noise (its server wrappers add it centrally).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from pollen.config import RunConfig

#: Train-config keys the server sends (as :mod:`pollen.server.distributed_dp`'s).
DP_CLIP_KEY = "dp-clip"
DP_NOISE_KEY = "dp-noise"
DP_SHARES_KEY = "dp-noise-shares"


def noise_settings(config: dict[str, Any]) -> tuple[float, float, int] | None:
    """``(clip, noise multiplier, shares)`` the server asks for; None when it asks for no noise.

    Each client's noise std is ``z * clip / sqrt(shares)`` (:func:`share_std`).

    Raises:
        ValueError: The values are not a positive clipping norm, a positive
            multiplier and a positive whole share count.
    """
    if DP_CLIP_KEY not in config:
        return None
    clip, z, shares = config[DP_CLIP_KEY], config.get(DP_NOISE_KEY), config.get(DP_SHARES_KEY)
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (clip, z, shares))
    if not numbers or not (clip > 0 and z > 0 and shares >= 1 and float(shares).is_integer()):
        raise ValueError(
            f"distributed DP settings {clip!r}, {z!r}, {shares!r} are not a positive clipping "
            "norm, noise multiplier and share count"
        )
    return float(clip), float(z), int(shares)


def share_std(clip: float, z: float, shares: int) -> float:
    """One client's noise std: ``z * clip / sqrt(shares)``."""
    return z * clip / math.sqrt(shares)


def check_requested_noise(clip: float, z: float, shares: int, context: Context) -> None:
    """Refuse a noise share too small for the client's own run config or SecAgg+ setup.

    The server chooses the noise; the client checks what it can: ``shares`` is
    at most the SecAgg+ reconstruction threshold it was set up with (a round
    that completes sums at least that many clients, so sized for more, the sum
    could hold less noise than accounted); the SecAgg+ clipping range holds
    the noisy values (clip + 4 std: clipping them would cut the noise); and
    ``z`` keeps the run within its run config's ``dp-noise``/``dp-epsilon``.

    Raises:
        ValueError: One of these fails (the client then sends no update).
    """
    state = context.state.config_records.get(RECORD_KEY_STATE)
    threshold = state.get("threshold") if state is not None else None
    if isinstance(threshold, int) and shares > threshold:
        raise ValueError(
            f"the server sized the DP noise for {shares} clients, more than the SecAgg+ "
            f"threshold {threshold}: the sum could hold less noise than accounted"
        )
    limit = state.get("clipping_range") if state is not None else None
    std = share_std(clip, z, shares)
    if isinstance(limit, float) and limit < clip + 4 * std:
        raise ValueError(
            f"the SecAgg+ clipping range {limit:g} would clip the noisy update (clipping "
            f"norm {clip:g}, noise std {std:.4g}) and cut its noise"
        )
    cfg = RunConfig.from_mapping(dict(context.run_config))
    if cfg.dp_noise > 0 and z < cfg.dp_noise:
        raise ValueError(
            f"the server asked for noise multiplier {z:g}, below dp-noise {cfg.dp_noise:g}"
        )
    if cfg.dp_epsilon > 0 and gaussian_epsilon(z, cfg.num_rounds, cfg.dp_delta) > cfg.dp_epsilon * (
        1 + 1e-9
    ):
        raise ValueError(
            f"the server asked for noise multiplier {z:g}, which spends more than dp-epsilon "
            f"{cfg.dp_epsilon:g} over {cfg.num_rounds} rounds"
        )


def gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``rounds`` Gaussian releases of multiplier ``z`` (RDP)."""
    import dp_accounting  # here: ~60 MB with scipy, which only a DP run needs
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), rounds))
    return float(accountant.get_epsilon(delta))


def noisy_update(
    update: list[np.ndarray], clip: float, std: float, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """``update`` clipped to L2 norm ``clip`` plus Gaussian noise of std ``std``, same dtypes.

    Only floating-point arrays count and are noised; integer arrays (such as a
    random layer's seed state) are sent as zeros: they are no part of what is
    learnt and would otherwise pass un-noised into the sum.
    """
    rng = rng if rng is not None else np.random.default_rng()  # OS entropy, never the run's seed
    floats = [np.issubdtype(u.dtype, np.floating) for u in update]
    norm = math.sqrt(
        sum(
            float(np.sum(np.square(u, dtype=np.float64)))
            for u, f in zip(update, floats, strict=True)
            if f
        )
    )
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    out = []
    for u, f in zip(update, floats, strict=True):
        if not f:
            out.append(np.zeros_like(u))
            continue
        noised = np.asarray(u, np.float64) * scale + rng.normal(0.0, std, u.shape)
        out.append(noised.astype(u.dtype))
    return out


def with_noise_share(call_next: Any, msg: Message, context: Context) -> Message:
    """``call_next`` (the train handler on a legacy FitIns), its update clipped and noised.

    Without the DP keys in the FitIns config, the reply passes unchanged.
    """
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    settings = noise_settings(
        dict(compat.recorddict_to_fitins(msg.content, keep_input=True).config)
    )
    if settings is None:
        return reply
    clip, z, shares = settings
    check_requested_noise(clip, z, shares, context)
    std = share_std(clip, z, shares)
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    update = noisy_update(parameters_to_ndarrays(fitres.parameters), clip, std)
    fitres.parameters = ndarrays_to_parameters(update)
    fitres.num_examples = 1  # every client weighs the same; its count stays in the metrics
    content = compat.fitres_to_recorddict(fitres, keep_input=False)
    if "client" in reply.content:
        content["client"] = reply.content["client"]
    return Message(content, reply_to=msg)
