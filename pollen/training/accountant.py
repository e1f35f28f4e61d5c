"""Example-level privacy accounting for DP-SGD on one client (``--dp example``).

Each local DP-SGD step releases one noisy gradient of a batch drawn by
Poisson sampling: every local example joins the step's batch independently
with probability ``q`` (:func:`pollen.training.dp_sgd.poisson_batches`). A step
is therefore the Sampled Gaussian Mechanism, ``PoissonSampledDpEvent(q,
GaussianDpEvent(z))``, and a run of ``T`` steps is that event composed ``T``
times. The Renyi-DP accountant of Google's ``dp-accounting`` (the library
Flower's own ``RdpAccountant`` wraps) turns it into ``(epsilon, delta)``;
neighbouring datasets differ by adding or removing one example of this
client (``ADD_OR_REMOVE_ONE``). Nothing here is Pollen's own arithmetic: the
figures are the library's for the same parameters (``tests/training``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pollen.errors import PollenError

if TYPE_CHECKING:
    import dp_accounting
    from dp_accounting import rdp

#: Noise multipliers above this drown any gradient: refuse a budget that needs more.
MAX_NOISE_MULTIPLIER = 100.0

#: The least noise multiplier calibration returns (a budget that allows less gets this).
MIN_NOISE_MULTIPLIER = 0.01

#: How each step's batch is drawn: what the accountant assumes (stated in the history).
SAMPLING = "poisson"


@contextlib.contextmanager
def quiet_orders() -> Iterator[None]:
    """Silence dp-accounting's warning for each fractional RDP order it skips.

    For large sample rates its series for orders such as 1.25 or 1.5 does not
    converge; the library then leaves that order out of the minimum (the epsilon
    stays a valid bound) and logs one absl WARNING per order and call, dozens
    per calibration, which only buries Pollen's own console lines.
    """
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        log.setLevel(level)


def _event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    # dp-accounting (and the scipy it loads, ~60 MB) is imported where it is used: every
    # client app imports this module, and only DP runs need it.
    import dp_accounting

    step = dp_accounting.PoissonSampledDpEvent(
        sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _accountant() -> rdp.RdpAccountant:
    import dp_accounting
    from dp_accounting import rdp

    return rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``steps`` Poisson-sampled Gaussian steps.

    Args:
        noise_multiplier: z = noise standard deviation / clipping norm (> 0).
        sample_rate: q, the probability of each example joining a step's batch.
        steps: Steps composed (0 = nothing spent).
        delta: Target delta in (0, 1).
    """
    if steps <= 0:
        return 0.0
    accountant = _accountant()
    accountant.compose(_event(noise_multiplier, sample_rate, steps))
    with quiet_orders():
        return float(accountant.get_epsilon(delta))


def noise_for_budget(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier that keeps ``steps`` steps within ``(epsilon, delta)``.

    Calibrated with ``dp_accounting.calibrate_dp_mechanism`` (Brent's method on
    the RDP accountant), rounded up to 4 decimals.

    Raises:
        PollenError: Even :data:`MAX_NOISE_MULTIPLIER` spends more than ``epsilon``.
    """
    if epsilon_spent(MAX_NOISE_MULTIPLIER, sample_rate, steps, delta) > epsilon:
        raise PollenError(
            f"Example-level DP cannot keep epsilon={epsilon:g} at delta={delta:g} over "
            f"{steps} DP-SGD steps of sample rate {sample_rate:.3g} on this client: it would "
            f"need a noise multiplier above {MAX_NOISE_MULTIPLIER:g}, which leaves nothing of "
            "the gradients. Allow a larger --dp-epsilon or --dp-delta, or train fewer steps "
            "(fewer --rounds or --epochs, a smaller --batch-size)."
        )
    if epsilon_spent(MIN_NOISE_MULTIPLIER, sample_rate, steps, delta) <= epsilon:
        return MIN_NOISE_MULTIPLIER  # the budget allows (almost) no noise
    import dp_accounting

    with quiet_orders():
        z = dp_accounting.calibrate_dp_mechanism(
            _accountant,
            lambda noise: _event(noise, sample_rate, steps),
            epsilon,
            delta,
            dp_accounting.ExplicitBracketInterval(MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER),
            tol=1e-5,
        )
    return math.ceil(float(z) * 1e4) / 1e4


def steps_per_round(examples: int, batch_size: int, epochs: int) -> int:
    """Local DP-SGD steps per round: ``epochs`` times the expected steps to see every example."""
    return epochs * max(1, math.ceil(examples / batch_size))


def sample_rate(examples: int, batch_size: int) -> float:
    """Poisson sample rate q: each example's chance to join a step's batch (expected batch size)."""
    return min(1.0, batch_size / max(examples, 1))


def example_noise(  # parameters: the run's budget and this client's schedule
    epsilon: float,
    noise: float,
    delta: float,
    examples: int,
    batch_size: int,
    steps: int,
) -> float:
    """The noise multiplier one client's DP-SGD uses for the whole run.

    ``noise`` if given (> 0); it must then keep the run within ``epsilon``
    if that is set (> 0). Otherwise the smallest multiplier within ``epsilon``
    (:func:`noise_for_budget`) for this client's sample rate and steps.

    Args:
        epsilon: ``dp-epsilon`` (0 = no budget).
        noise: ``dp-noise`` (0 = pick from the budget).
        delta: ``dp-delta``.
        examples: The client's training examples N.
        batch_size: Expected batch size (q = batch_size / N).
        steps: DP-SGD steps of the whole run.

    Raises:
        PollenError: Neither is given, or the budget cannot be kept.
    """
    q = sample_rate(examples, batch_size)
    if noise > 0:
        spent = epsilon_spent(noise, q, steps, delta)
        if epsilon > 0 and spent > epsilon:
            need = noise_for_budget(epsilon, delta, q, steps)
            raise PollenError(
                f"--dp-noise {noise:g} spends epsilon={spent:.3g} (delta={delta:g}) over "
                f"{steps} DP-SGD steps on a client with {examples} examples, more than "
                f"--dp-epsilon {epsilon:g}. Use --dp-noise {need:g} or more, or leave "
                "--dp-noise out to let Pollen pick the noise."
            )
        return noise
    if epsilon > 0:
        return noise_for_budget(epsilon, delta, q, steps)
    raise PollenError(
        "--dp example needs a noise level: give --dp-epsilon E (the budget for the whole "
        "run; each client picks its noise) or --dp-noise Z (the noise multiplier)."
    )
