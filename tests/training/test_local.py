"""Tests for pollen.training.local: fit, schedules, FedProx, optimizer resets."""

from __future__ import annotations

import numpy as np
import pytest

from pollen.models.registry import build_model
from pollen.training.compile import compile_model
from pollen.training.local import (
    FitResult,
    ProximalTerm,
    RunSchedule,
    StepLearningRate,
    fit,
    reset_optimizer,
    schedule_value,
)

RNG_IMAGES = np.random.default_rng(1234).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)


def test_fit_and_reset_optimizer() -> None:
    model = compile_model(build_model("cnn", num_classes=2, seed=0), 1e-3)
    x = RNG_IMAGES[:32]
    x = np.concatenate([x, x[::-1]])  # 64 images
    y = np.random.default_rng(2).integers(0, 2, 64).astype(np.int64)

    result = fit(model, x, y, epochs=1, batch_size=16, seed=0, verbose=0)
    assert isinstance(result, FitResult)
    assert result.num_examples == 64
    assert np.isfinite(result.loss) and result.loss > 0
    assert 0 <= result.accuracy <= 1 and result.seconds > 0

    opt = model.optimizer
    schedule_state = {id(v) for v in opt._learning_rate.state}
    moments = [v for v in opt.variables if id(v) not in schedule_state]
    assert any(np.any(np.asarray(v) != 0) for v in moments), "fit left no optimizer state"

    reset_optimizer(model, 0.0125)
    for v in moments:
        assert not np.any(np.asarray(v)), f"{v.path} not reset"
    assert float(opt.learning_rate) == pytest.approx(0.0125)

    # The model still trains after the reset (the traced train step is reused).
    again = fit(model, x, y, epochs=1, batch_size=16, seed=1, verbose=0)
    assert np.isfinite(again.loss)
    assert int(opt.iterations) == 4


@pytest.mark.parametrize("kind", ["constant", "cosine", "onecycle"])
def test_step_learning_rate_computes_the_run_schedule_in_the_train_step(kind) -> None:
    step_lr = StepLearningRate(0.5)
    assert float(step_lr(123)) == pytest.approx(0.5)  # constant until a schedule is set
    step_lr.set(RunSchedule(0.2, 30, 100, kind), iteration=7)
    for step in range(7, 90, 3):  # optimizer steps 7.. are run steps 30..
        expected = schedule_value(0.2, 30 + step - 7, 100, kind)
        assert float(step_lr(step)) == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="unknown schedule"):
        step_lr.set(RunSchedule(0.2, 0, 10, "linear"), iteration=0)


def test_fit_follows_the_rounds_schedule_without_a_callback() -> None:
    model = compile_model(build_model("cnn", num_classes=2, seed=0), 1e-3)
    x = np.concatenate([RNG_IMAGES[:32], RNG_IMAGES[:32][::-1]])  # 64 images, 4 steps of 16
    y = np.random.default_rng(2).integers(0, 2, 64).astype(np.int64)
    schedule = RunSchedule(0.1, 40, 100, "onecycle")
    fit(model, x, y, epochs=1, batch_size=16, seed=0, verbose=0, schedule=schedule)
    opt = model.optimizer
    assert int(opt.iterations) == 4
    # The next step would be run step 44: the rate in force follows the schedule.
    assert float(opt.learning_rate) == pytest.approx(
        schedule_value(0.1, 44, 100, "onecycle"), abs=1e-6
    )
    fit(model, x, y, epochs=1, batch_size=16, seed=1, verbose=0,
                 schedule=RunSchedule(0.1, 44, 100, "onecycle"))  # fmt: skip
    assert float(opt.learning_rate) == pytest.approx(
        schedule_value(0.1, 48, 100, "onecycle"), abs=1e-6
    )


def test_onecycle_schedule_warms_up_then_decays_to_zero() -> None:
    values = [schedule_value(0.2, s, 100, "onecycle") for s in range(101)]
    assert values[0] == 0.0
    assert values[15] == pytest.approx(0.2)
    assert max(values) == pytest.approx(0.2)
    assert values[100] == pytest.approx(0.0)
    assert all(a <= b for a, b in zip(values[:15], values[1:16], strict=True))  # rising
    assert all(a >= b for a, b in zip(values[15:-1], values[16:], strict=True))  # falling


def test_proximal_term_keeps_local_training_near_the_global_weights() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 64)
    model = compile_model(build_model("cnn-gn", num_classes=3, seed=0), 1e-2)
    start = [w.copy() for w in model.get_weights()]

    def drift() -> float:
        return float(
            np.sqrt(
                sum(((a - b) ** 2).sum() for a, b in zip(model.get_weights(), start, strict=True))
            )
        )

    fit(model, x, y, epochs=3, batch_size=16, seed=0, verbose=0)
    plain = drift()
    model.set_weights(start)
    reset_optimizer(model, 1e-2)
    ProximalTerm.of(model).anchor(100.0)
    fit(model, x, y, epochs=3, batch_size=16, seed=0, verbose=0)
    assert drift() < 0.5 * plain
    assert ProximalTerm.of(model) is ProximalTerm.of(model)  # installed once
    model.set_weights(start)
    reset_optimizer(model, 1e-2)
    ProximalTerm.of(model).anchor(0.0)  # mu 0 = plain training again
    fit(model, x, y, epochs=3, batch_size=16, seed=0, verbose=0)
    assert drift() == pytest.approx(plain, rel=0.05)
