"""Client-level differential privacy: Flower's DP strategy plus an accountant.

With ``dp = true`` the aggregation strategy is wrapped in Flower's
:class:`~flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`:
each sampled client's update (trained minus global weights, all arrays
together) is clipped to L2 norm ``dp-clip``, the clipped updates are averaged
with equal weights, and Gaussian noise of standard deviation
``dp-noise * dp-clip / sampled clients`` is added to every coordinate of the
average. Flower's :class:`~flwr.serverapp.RdpAccountant` composes one Gaussian
mechanism per round and reports the spent (epsilon, delta) after each.

What the guarantee covers (see also docs/privacy.md):

- client-level DP: neighbouring datasets differ by one client's whole data
  (add or remove one client), not by one example;
- the accountant uses ``SamplingMethod.NO_AMPLIFICATION`` (the only one Flower
  1.42 supports with fixed clipping), so sampling a fraction of the clients
  per round is not credited: the epsilon is an upper bound. That is also
  honest: Pollen's default sample is drawn from the run's seed
  (:mod:`pollen.server.sampling`), so it is predictable;
- ``--client-sampling poisson`` (unseeded Poisson sampling, amplification
  credited) and ``--secagg`` (distributed DP: the clients add the noise) use
  :class:`pollen.server.distributed_dp.ClientLevelDP` instead, with an accountant
  of Pollen's over ``dp-accounting`` (:func:`make_private` picks);
- the guarantee covers the global weights released after each round; the
  clients' plain-text metrics (loss, accuracy, example counts) are not
  covered, and per-client BatchNorm re-estimation is switched off under DP
  because its statistics would bypass the noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import WARNING
from typing import Any

from flwr.common.logger import log
from flwr.serverapp import (
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp import strategy as fl

from pollen.config import RunConfig
from pollen.errors import PollenError
from pollen.server.distributed_dp import (
    SEEDED,
    ClientLevelDP,
    LedgerAccountant,
    ledger_epsilon,
    ledger_problem,
)

#: Noise multipliers above this drown any model's update: refuse such a budget.
MAX_NOISE_MULTIPLIER = 100.0


class CopyableRdpAccountant(RdpAccountant):
    """Flower's RDP accountant, copyable with :func:`copy.deepcopy`.

    Flower's accountant holds module objects of ``dp-accounting`` (flwr's
    ``dp`` extra), which cannot be copied; the round loop deep-copies the
    strategy, accountant included, to record a round's state beside the next
    round (:mod:`pollen.server.rounds`). The copy goes through the accountant's
    own ``state_dict``/``load_state_dict``, its portable state, which is also
    what checkpoints keep (:func:`private_state`); nothing is unpickled.
    """

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "state": self.state_dict()}

    def __setstate__(self, data: dict[str, Any]) -> None:
        self.__init__(data["config"])
        self.load_state_dict(data["state"])


def _accountant(
    delta: float, max_epsilon: float | None = None, population: int = 1
) -> CopyableRdpAccountant:
    """A fresh RDP accountant for per-round Gaussian releases (no amplification).

    With ``NO_AMPLIFICATION`` the population size does not enter the bound;
    Flower only checks that each round's sample fits in it.
    """
    return CopyableRdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=max_epsilon,
        )
    )


def epsilon_after(
    noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0
) -> float:
    """Epsilon at ``delta`` after ``rounds`` Gaussian releases of ``noise_multiplier``.

    Args:
        noise_multiplier: z = noise standard deviation / clipping norm (> 0).
        rounds: Releases (rounds) composed, >= 1.
        delta: Target delta in (0, 1).
        sample_rate: q < 1: each round a Poisson sample of rate q (amplification
            credited, ``dp-accounting`` directly); 1: Flower's accountant, no
            amplification.
    """
    from flwr.serverapp import GaussianPrivacyEvent

    if sample_rate < 1:
        return ledger_epsilon([[sample_rate, noise_multiplier, rounds]], delta)

    accountant = _accountant(delta)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, 1, 1), rounds)
    return accountant.get_epsilon(delta)


def noise_for_budget(epsilon: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """The smallest noise multiplier that keeps ``rounds`` releases within ``epsilon``.

    Bisection on :func:`epsilon_after` (epsilon falls as z grows), to a
    relative precision of 1e-4, rounded up.

    Raises:
        PollenError: Even ``MAX_NOISE_MULTIPLIER`` spends more than ``epsilon``.
    """
    hi = MAX_NOISE_MULTIPLIER
    if epsilon_after(hi, rounds, delta, sample_rate) > epsilon:
        raise PollenError(
            f"A privacy budget of epsilon={epsilon:g} at delta={delta:g} over {rounds} rounds "
            f"needs a noise multiplier above {MAX_NOISE_MULTIPLIER:g}, which leaves nothing "
            "of the clients' updates. Allow a larger --dp-epsilon, a larger --dp-delta or "
            "fewer --rounds."
        )
    lo = 1e-3
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        if epsilon_after(mid, rounds, delta, sample_rate) > epsilon:
            lo = mid
        else:
            hi = mid
    return math.ceil(hi * 1e4) / 1e4


def resolve_noise(cfg: RunConfig) -> float:
    """The noise multiplier a DP run uses; checks the budget before anything starts.

    Under ``client-sampling = poisson`` the budget credits sampling at rate
    ``fraction-train`` (:func:`client_sample_rate`). ``dp-noise`` if given
    (then it must keep the run within ``dp-epsilon`` if that is set), else
    the smallest multiplier within ``dp-epsilon``.

    Raises:
        PollenError: Neither is given, or the budget cannot be kept.
    """
    q = client_sample_rate(cfg) or 1.0
    if cfg.dp_noise > 0:
        if cfg.dp_epsilon > 0:
            spent = epsilon_after(cfg.dp_noise, cfg.num_rounds, cfg.dp_delta, q)
            if spent > cfg.dp_epsilon:
                need = noise_for_budget(cfg.dp_epsilon, cfg.num_rounds, cfg.dp_delta, q)
                raise PollenError(
                    f"--dp-noise {cfg.dp_noise:g} spends epsilon={spent:.3g} (delta="
                    f"{cfg.dp_delta:g}) over {cfg.num_rounds} rounds, more than --dp-epsilon "
                    f"{cfg.dp_epsilon:g}. Use --dp-noise {need:g} or more, fewer rounds, or "
                    "leave --dp-noise out to let Pollen pick the noise."
                )
        return cfg.dp_noise
    if cfg.dp_epsilon > 0:
        return noise_for_budget(cfg.dp_epsilon, cfg.num_rounds, cfg.dp_delta, q)
    raise PollenError(
        "--dp needs a noise level: give --dp-epsilon E (the budget for the whole run; Pollen "
        "picks the noise) or --dp-noise Z (the noise multiplier)."
    )


def sample_size(cfg: RunConfig, connected: int) -> int:
    """Clients Flower's FedAvg samples per round out of ``connected`` (its own rule)."""
    return max(int(connected * cfg.fraction_train), cfg.min_clients)


def short_round_risk(population: int, rate: float, least: int, rounds: int) -> float:
    """Probability that some of ``rounds`` Poisson rounds samples fewer than ``least`` clients.

    A round's size is Binomial(``population``, ``rate``).
    """
    below = sum(
        math.comb(population, k) * rate**k * (1 - rate) ** (population - k)
        for k in range(min(least, population + 1))
    )
    return 1.0 - (1.0 - min(below, 1.0)) ** rounds


def client_sample_rate(cfg: RunConfig) -> float | None:
    """The sample rate: ``fraction-train`` under Poisson sampling; None for the seeded sample."""
    return cfg.fraction_train if cfg.client_sampling == "poisson" else None


def make_private(strategy: fl.FedAvg, cfg: RunConfig, connected: int) -> fl.Strategy:
    """Wrap ``strategy`` in client-level DP with an accountant.

    Flower's server-side fixed clipping for the default (central noise, seeded
    sample); :class:`ClientLevelDP` under ``--secagg`` (distributed noise) or
    ``client-sampling = poisson`` (amplification credited).

    Args:
        strategy: A FedAvg (or FedProx) built with ``weighted_by_key =
            UNIT_WEIGHT_KEY``.
        cfg: The run config (``dp-clip``, ``dp-noise``/``dp-epsilon``, ``dp-delta``).
        connected: Clients connected when the run starts; every round samples
            :func:`sample_size` of them, and every sampled client must reply
            (noise is calibrated to that count).
    """
    noise = resolve_noise(cfg)
    q = client_sample_rate(cfg)
    if q is not None:
        risk = short_round_risk(max(connected, 1), q, cfg.min_clients, cfg.num_rounds)
        if risk > 0.01:
            log(
                WARNING,
                "Poisson sampling: with %d clients at rate %g, some round samples fewer than "
                "--min-clients %d with probability %.2g, and such a round stops the run "
                "(resumable). Lower --min-clients or raise --fraction-train.",
                connected, q, cfg.min_clients, risk,
            )  # fmt: skip
    if cfg.secagg or q is not None:
        return ClientLevelDP(
            strategy,
            noise,
            cfg.dp_clip,
            LedgerAccountant(cfg.dp_delta),
            population=max(connected, 1),
            sample_rate=client_sample_rate(cfg),
            distributed=cfg.secagg,
        )
    return fl.DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=noise,
        clipping_norm=cfg.dp_clip,
        num_sampled_clients=sample_size(cfg, connected),
        accountant=_accountant(cfg.dp_delta, cfg.dp_epsilon or None, max(connected, 1)),
    )


#: Most RDP orders an accountant's checkpointed state may list (Flower's default has 40-odd).
MAX_ORDERS = 1000


def private_state(strategy: Any) -> dict[str, Any] | None:
    """What the DP wrapper keeps between rounds, as JSON; None for a strategy without DP.

    The noise multiplier and clipping norm (checked against the run config on
    resume), the sample size the noise is calibrated to and the accountant's
    ``state_dict`` (its configuration and the ledger of releases); for a
    :class:`ClientLevelDP`, its population and :class:`LedgerAccountant` ledger.
    """
    if isinstance(strategy, ClientLevelDP):
        return {
            "noise-multiplier": float(strategy.noise_multiplier),
            "clipping-norm": float(strategy.clipping_norm),
            "num-sampled-clients": int(strategy.num_sampled_clients),
            "accountant": {
                "population": strategy.population,
                "ledger": strategy.accountant.state(),
            },
        }
    if not isinstance(strategy, fl.DifferentialPrivacyServerSideFixedClipping):
        return None
    accountant = strategy.accountant
    return {
        "noise-multiplier": float(strategy.noise_multiplier),
        "clipping-norm": float(strategy.clipping_norm),
        "num-sampled-clients": int(strategy.num_sampled_clients),
        "accountant": None if accountant is None else accountant.state_dict(),
    }


def restore_private(
    strategy: fl.FedAvg, cfg: RunConfig, state: Any, max_releases: int
) -> fl.Strategy:
    """``strategy`` wrapped as :func:`make_private` did, with :func:`private_state`'s ``state``.

    The noise multiplier and clipping norm come from ``cfg`` (as on a fresh
    start) and must equal the saved ones; the sample size and the
    accountant's population are the saved ones (they were fixed by the
    clients connected when the run started).

    Args:
        strategy: The inner strategy, rebuilt from ``cfg``.
        cfg: The resumed run's config.
        state: Parsed JSON, unchecked.
        max_releases: The rounds completed: the ledger cannot hold more releases.

    Raises:
        ValueError: ``state`` is not what :func:`private_state` writes for ``cfg``.
    """
    names = {"noise-multiplier", "clipping-norm", "num-sampled-clients", "accountant"}
    if not isinstance(state, dict) or set(state) != names:
        raise ValueError(f"it is not an object with exactly {', '.join(sorted(names))}")
    noise = resolve_noise(cfg)
    if state["noise-multiplier"] != noise or state["clipping-norm"] != cfg.dp_clip:
        raise ValueError(
            f"noise multiplier {state['noise-multiplier']!r} and clipping norm "
            f"{state['clipping-norm']!r}, the run config gives {noise:g} and {cfg.dp_clip:g}"
        )
    sampled, ledger = state["num-sampled-clients"], state["accountant"]
    if isinstance(sampled, bool) or not isinstance(sampled, int) or sampled < 1:
        raise ValueError("num-sampled-clients is not a positive integer")
    if cfg.secagg or client_sample_rate(cfg) is not None:
        return _restore_client_level(strategy, cfg, noise, ledger, max_releases)
    if not isinstance(ledger, dict) or not isinstance(ledger.get("config"), dict):
        raise ValueError("the accountant's state is not an object with a config")
    orders, releases = ledger.get("orders"), ledger.get("compositions")
    if not isinstance(orders, list) or len(orders) > MAX_ORDERS:
        raise ValueError(f"the accountant's orders are not a list of at most {MAX_ORDERS}")
    if not isinstance(releases, list) or len(releases) > max_releases:
        raise ValueError(f"the accountant's ledger holds more than {max_releases} releases")
    population = ledger["config"].get("population_size")
    if isinstance(population, bool) or not isinstance(population, int) or population < sampled:
        raise ValueError("the accountant's population is not an integer >= num-sampled-clients")
    accountant = _accountant(cfg.dp_delta, cfg.dp_epsilon or None, population)
    accountant.load_state_dict(ledger)
    if accountant.num_releases > max_releases:
        raise ValueError(f"the accountant's ledger holds more than {max_releases} releases")
    return fl.DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=noise,
        clipping_norm=cfg.dp_clip,
        num_sampled_clients=sampled,
        accountant=accountant,
    )


def _restore_client_level(
    strategy: fl.FedAvg, cfg: RunConfig, noise: float, ledger: Any, max_releases: int
) -> ClientLevelDP:
    """:func:`restore_private` for a :class:`ClientLevelDP` state."""
    if not isinstance(ledger, dict) or set(ledger) != {"population", "ledger"}:
        raise ValueError('the accountant\'s state is not an object with "population", "ledger"')
    population = ledger["population"]
    if isinstance(population, bool) or not isinstance(population, int) or population < 1:
        raise ValueError("the accountant's population is not a positive integer")
    problem = ledger_problem(ledger["ledger"], max_releases)
    if problem is not None:
        raise ValueError(problem)
    return ClientLevelDP(
        strategy,
        noise,
        cfg.dp_clip,
        LedgerAccountant(cfg.dp_delta, ledger["ledger"]),
        population=population,
        sample_rate=client_sample_rate(cfg),
        distributed=cfg.secagg,
    )


def privacy_record(strategy: Any) -> dict[str, Any]:
    """The DP spent so far, with how it was spent; {} for a strategy without DP.

    Keys: ``epsilon``, ``delta``, ``noise_multiplier``, ``clipping_norm``,
    ``releases``, ``mode`` and ``sampling``.
    ``mode``: ``"central"`` (the server adds the noise) or ``"distributed"``
    (each client adds its share before SecAgg+ masks its update);
    ``sampling``: whether sampling was credited (:data:`SEEDED`, :data:`POISSON`).
    """
    spent: PrivacySpent | None = getattr(strategy, "privacy_spent", lambda: None)()
    if spent is None:
        return {}
    private = isinstance(strategy, ClientLevelDP)
    return {
        "epsilon": spent.epsilon,
        "delta": spent.delta,
        "noise_multiplier": strategy.noise_multiplier,
        "clipping_norm": strategy.clipping_norm,
        "releases": spent.num_releases,
        "mode": strategy.mode if private else "central",
        "sampling": strategy.sampling if private else SEEDED,
    }


def example_privacy(clients: Iterable[Any], settings: dict[str, Any] | None) -> dict[str, Any]:
    """The round's example-level DP record (``--dp example``); {} without it.

    Every client runs its own accountant over its own examples and reports
    the epsilon spent so far (``dp_epsilon`` of its train reply); the round's
    ``epsilon`` is the largest of them: the guarantee every participating
    client's examples have. ``settings`` (from the run config) adds ``delta``,
    ``clipping_norm``, ``level`` and ``sampling``.
    """
    spent = [c.dp_epsilon for c in clients if getattr(c, "dp_epsilon", None) is not None]
    if settings is None or not spent:
        return {}
    return {"epsilon": max(spent), **settings}
