"""Client-level DP beyond Flower's wrapper: distributed noise (SecAgg+), Poisson sampling.

Flower 1.42's :class:`~flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`
(:mod:`pollen.server.privacy`, the default ``--dp client``) adds the noise on the
server, needs a fixed sample size and accounts only ``NO_AMPLIFICATION``. Two
variants need more, and both use :class:`ClientLevelDP` and its
:class:`LedgerAccountant` (Google's ``dp-accounting`` RDP accountant, the library
Flower's own wraps, over a JSON ledger of releases):

- **Distributed DP** (``--secagg --dp client``): every sampled client clips its
  update to L2 norm C and adds Gaussian noise of std ``z * C / sqrt(m)``
  (:mod:`pollen.client.dp_mod`) before SecAgg+ masks it; the server only ever
  sees the masked sum, which carries noise of std ``z * C`` once at least ``m``
  clients' vectors are in it. ``m`` is the round's SecAgg+ reconstruction
  threshold: a round that completes has at least that many survivors
  (:mod:`pollen.server.secagg`), so dropouts never leave the sum with less noise
  than accounted; with no dropout the sum has ``sqrt(n / m)`` times more. One
  Gaussian release of multiplier z per round, accounted as central DP.
  Flower's client-side mods do not fit here: ``fixedclipping_mod`` clips
  *weights* against the global ones (Pollen's SecAgg+ reply already holds the
  update) and adds no noise, and its server wrappers add the noise on the server,
  after an ``aggregate_train`` the SecAgg+ workflow never calls.
- **Poisson sampling** (``--client-sampling poisson``, central DP): each
  connected client joins a round independently with probability q =
  ``fraction-train``, drawn from the OS's randomness (:func:`poisson_sample`), so
  no one can predict a round's clients from the run's seed. The server sums the
  clipped updates, adds noise of std ``z * C`` to the sum and divides by the
  *expected* count ``q * N`` (N: clients connected at the start), whatever the
  round's size; each round is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``.
  A round in which nobody was sampled is still a release (the noise alone).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid, PrivacySpent
from flwr.serverapp import strategy as fl

from pollen.errors import PollenError
from pollen.training.accountant import quiet_orders

if TYPE_CHECKING:
    import dp_accounting

#: Train-config keys of the noise every client adds under distributed DP
#: (the same strings as :mod:`pollen.client.dp_mod`'s; a test checks it).
DP_CLIP_KEY = "dp-clip"
DP_NOISE_KEY = "dp-noise"
DP_SHARES_KEY = "dp-noise-shares"

#: What the history says of each sampling, beside the epsilon.
SEEDED = "fixed-size, seeded: no amplification credited"
POISSON = "poisson, unseeded (OS randomness): amplification credited"
#: Standard deviations of noise the SecAgg+ clipping range must hold beyond C (see
#: :func:`clipping_range_for`): a Gaussian exceeds 6 sigma with probability 2e-9.
RANGE_SIGMAS = 6.0


# --- sampling ---------------------------------------------------------------------


def poisson_sample(nodes: Iterable[int], rate: float) -> list[int]:
    """Each of ``nodes`` independently with probability ``rate``, from the OS's randomness.

    :class:`random.SystemRandom` reads ``os.urandom``: neither the run's seed
    nor the global ``random`` state (which :func:`pollen.server.sampling.seeded_sampling`
    seeds) decides who is sampled, so the sample cannot be predicted.
    """
    draw = random.SystemRandom()
    return [n for n in sorted(set(nodes)) if draw.random() < rate]


class _Only:
    """A grid view that lists only ``nodes`` (the Poisson sample); the rest goes to ``grid``."""

    def __init__(self, grid: Grid, nodes: Sequence[int]) -> None:
        self.grid = grid
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


# --- accounting ---------------------------------------------------------------------


class LedgerAccountant:
    """RDP accounting of per-round Gaussian releases, kept as a JSON ledger.

    Each entry is ``[sample_rate, noise_multiplier, releases]``; a sample rate
    of 1 is a plain ``GaussianDpEvent(z)``, below 1 a
    ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``. Neighbouring datasets
    differ by one whole client (``ADD_OR_REMOVE_ONE``). The epsilon is
    ``dp_accounting.rdp.RdpAccountant``'s for the composed events: no arithmetic
    of Pollen's own. The ledger is the checkpointed state (nothing pickled).
    """

    def __init__(self, delta: float, ledger: Sequence[Sequence[float]] = ()) -> None:
        self.delta = delta
        self.ledger: list[list[float]] = [list(e) for e in ledger]

    @property
    def num_releases(self) -> int:
        """Releases composed so far."""
        return int(sum(e[2] for e in self.ledger))

    def compose(self, sample_rate: float, noise_multiplier: float, count: int = 1) -> None:
        """Add ``count`` releases of the given rate and multiplier."""
        last = self.ledger[-1] if self.ledger else None
        if last is not None and last[0] == sample_rate and last[1] == noise_multiplier:
            last[2] += count
        else:
            self.ledger.append([float(sample_rate), float(noise_multiplier), count])

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon at ``delta`` (default: the accountant's) of everything composed."""
        return ledger_epsilon(self.ledger, self.delta if delta is None else delta)

    def state(self) -> list[list[float]]:
        """The ledger, as JSON."""
        return [list(e) for e in self.ledger]


def _event(sample_rate: float, noise_multiplier: float, count: int) -> dp_accounting.DpEvent:
    # dp-accounting (and the scipy it loads) is imported where it is used: the checkpoint
    # and CLI modules import this one, and `pollen client` should not pay ~60 MB for it.
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    one = (
        gaussian if sample_rate >= 1 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)
    )
    return dp_accounting.SelfComposedDpEvent(one, int(count))


def ledger_epsilon(ledger: Iterable[Sequence[float]], delta: float) -> float:
    """Epsilon at ``delta`` of the releases in ``ledger`` (0 for none)."""
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    entries = [e for e in ledger if e[2] > 0]
    if not entries:
        return 0.0
    with quiet_orders():  # dp-accounting's warnings for the orders it leaves out
        for q, z, count in entries:
            accountant.compose(_event(q, z, int(count)))
        return float(accountant.get_epsilon(delta))


def ledger_problem(ledger: Any, max_releases: int) -> str | None:
    """What is wrong with a checkpointed ledger, or None."""
    if not isinstance(ledger, list) or len(ledger) > max(max_releases, 0):
        return f"the accountant's ledger is not a list of at most {max_releases} entries"
    for e in ledger:
        if not (isinstance(e, list) and len(e) == 3):
            return "a ledger entry is not [sample rate, noise multiplier, releases]"
        q, z, count = e
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in e)
        if not numbers or not 0 < q <= 1 or not 0 < z < math.inf or count != int(count):
            return "a ledger entry is not [rate in (0, 1], positive multiplier, count]"
    if sum(e[2] for e in ledger) > max_releases or any(e[2] < 1 for e in ledger):
        return f"the accountant's ledger holds more than {max_releases} releases"
    return None


# --- the strategy wrapper -------------------------------------------------------------


def clipping_range_for(clip: float, noise_std: float, configured: float) -> float:
    """SecAgg+'s clipping range under distributed DP: holds a clipped, noised value.

    A coordinate of a clipped update is at most ``clip`` in absolute value;
    the client's noise adds a Gaussian of std ``noise_std``. The range is
    ``configured`` (``--secagg-clipping-range``) or, where that is smaller,
    ``clip + RANGE_SIGMAS * noise_std``: SecAgg+ clips every value to the range
    before quantizing, and clipping noisy values would bias the sum. A larger
    range only coarsens the quantization step (``2 * range / 2**22`` per value,
    far below the noise).
    """
    return max(configured, clip + RANGE_SIGMAS * noise_std)


class ClientLevelDP(fl.Strategy):
    """Client-level DP around a FedAvg/FedProx: distributed (SecAgg+) or Poisson-sampled.

    Has the attributes Pollen reads of Flower's DP wrapper (``strategy``,
    ``noise_multiplier``, ``clipping_norm``, ``num_sampled_clients``,
    ``accountant``, :meth:`privacy_spent`).

    Args:
        strategy: The inner strategy (samples, configures; under Poisson it
            configures only the Poisson sample).
        noise_multiplier: z.
        clipping_norm: C.
        accountant: The run's ledger.
        population: Clients connected when the run started (N).
        sample_rate: q under Poisson sampling; None: the inner strategy's
            fixed-size seeded sample (no amplification).
        distributed: The clients add the noise (SecAgg+); the server never
            aggregates single updates (:meth:`aggregate_train` refuses).
    """

    def __init__(  # the settings of one mechanism: kept together
        self,
        strategy: fl.Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        accountant: LedgerAccountant,
        population: int,
        sample_rate: float | None = None,
        distributed: bool = False,
    ) -> None:
        self.strategy = strategy
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.accountant = accountant
        self.population = population
        self.sample_rate = sample_rate
        self.distributed = distributed
        rate = 1.0 if sample_rate is None else sample_rate
        #: Clients per round (expected under Poisson): what the app logs.
        self.num_sampled_clients = max(1, round(rate * population))
        self._global: ArrayRecord | None = None

    @property
    def sampling(self) -> str:
        """How clients are sampled, as the history states it."""
        return SEEDED if self.sample_rate is None else POISSON

    @property
    def mode(self) -> str:
        """``"distributed"`` (clients add the noise) or ``"central"``."""
        return "distributed" if self.distributed else "central"

    def privacy_spent(self) -> PrivacySpent:
        """Epsilon at the accountant's delta after the releases so far."""
        return PrivacySpent(
            epsilon=self.accountant.get_epsilon(),
            delta=self.accountant.delta,
            num_releases=self.accountant.num_releases,
            accounting_method="rdp",
        )

    # --- distributed: the clients' noise --------------------------------------------

    def noise_config(self, shares: int) -> dict[str, float | int]:
        """Train-config entries telling each client its clipping norm and noise share.

        Args:
            shares: m, the fewest clients whose vectors a completed round sums.
        """
        return {
            DP_CLIP_KEY: float(self.clipping_norm),
            DP_NOISE_KEY: float(self.noise_multiplier),
            DP_SHARES_KEY: int(shares),
        }

    def client_noise_std(self, shares: int) -> float:
        """The std of the noise each client adds: ``z * C / sqrt(shares)``."""
        return self.noise_multiplier * self.clipping_norm / math.sqrt(shares)

    def account_secure_round(self, rnd: int, survivors: int, shares: int) -> None:
        """Compose the round's release: ``survivors`` noisy updates of ``shares`` noise shares each.

        Raises:
            PollenError: Fewer survivors than noise shares (SecAgg+ should have
                halted first): the sum holds less noise than accounted, so the
                round is not released.
        """
        if survivors < shares:
            raise PollenError(
                f"Round {rnd}: only {survivors} clients' noisy updates are in the secure sum, "
                f"fewer than the {shares} the noise was sized for, so it carries less noise "
                "than the privacy accounting needs; the round is not used. Continue with "
                "--resume RUN_DIR once enough clients are back."
            )
        self.accountant.compose(1.0, self.noise_multiplier)

    # --- the Strategy interface -----------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's train messages; under Poisson, to the Poisson sample only."""
        self._global = arrays
        if self.sample_rate is None:
            return self.strategy.configure_train(server_round, arrays, config, grid)
        nodes = poisson_sample(grid.get_node_ids(), self.sample_rate)
        inner = copy.copy(self.strategy)  # every listed node, no waiting for a quorum
        inner.fraction_train, inner.min_train_nodes, inner.min_available_nodes = 1.0, 0, 0
        return inner.configure_train(server_round, arrays, config, _Only(grid, nodes))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Central DP over the Poisson sample: clip, sum, noise ``z*C``, divide by ``q*N``."""
        if self.distributed or self._global is None:
            raise RuntimeError("distributed DP is aggregated by SecAgg+, not by the strategy")
        replies = [r for r in replies if not r.has_error()]
        start = self._global.to_numpy_ndarrays()
        total = [np.zeros(a.shape, np.float64) for a in start]
        for reply in replies:
            update = [
                np.asarray(w, np.float64) - g
                for w, g in zip(reply.content["arrays"].to_numpy_ndarrays(), start, strict=True)
            ]
            for t, u in zip(total, clipped(update, self.clipping_norm), strict=True):
                t += u
        rng = np.random.default_rng()  # OS entropy
        std = self.noise_multiplier * self.clipping_norm
        expected = (self.sample_rate or 1.0) * self.population
        new = [
            _like(g, g + (t + rng.normal(0.0, std, t.shape)) / expected)
            for g, t in zip(start, total, strict=True)
        ]
        self.accountant.compose(self.sample_rate or 1.0, self.noise_multiplier)
        keys = list(self._global.keys())
        record = ArrayRecord(array_dict={k: Array(a) for k, a in zip(keys, new, strict=True)})
        return record, _mean_metrics(replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The inner strategy's."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """The inner strategy's summary."""
        self.strategy.summary()


def clipped(update: Sequence[np.ndarray], clip: float) -> list[np.ndarray]:
    """``update`` scaled to L2 norm at most ``clip`` (all arrays together)."""
    norm = math.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return [np.asarray(u, np.float64) * scale for u in update]


def _like(g: np.ndarray, value: np.ndarray) -> np.ndarray:
    """``value`` in ``g``'s dtype (integer arrays rounded)."""
    if np.issubdtype(g.dtype, np.floating):
        return value.astype(g.dtype)
    return np.rint(value).astype(g.dtype)


def _mean_metrics(replies: Sequence[Message]) -> MetricRecord | None:
    """Unweighted means of the replies' train loss and accuracy (clients weigh the same)."""
    out: dict[str, float] = {}
    for key in ("train_loss", "train_accuracy"):
        values = [
            float(m[key])
            for r in replies
            for m in r.content.metric_records.values()
            if key in m and isinstance(m[key], int | float)
        ]
        if values:
            out[key] = sum(values) / len(values)
    return MetricRecord(out) if out else None
