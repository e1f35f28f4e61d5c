"""Local training on one client: learning-rate schedules, ``fit``, FedProx, optimizer resets.

Works on a compiled Keras model from :mod:`pollen.training.compile` and on
in-memory ``uint8`` images of shape ``(N, 32, 32, 3)`` with ``int64`` labels
of shape ``(N,)``; batches come from :func:`pollen.training.pipeline.make_dataset`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import keras
import numpy as np

from pollen.training.pipeline import make_dataset

#: Share of a run's local steps spent warming up under the ``"onecycle"`` schedule.
WARMUP_FRACTION = 0.15


def schedule_value(base_lr: float, step: int, total_steps: int, schedule: str = "cosine") -> float:
    """Learning rate at global local step ``step`` of ``total_steps``.

    ``"cosine"`` decays from ``base_lr`` to 0 over the whole run (all rounds),
    so late rounds take small steps: clients then drift apart less before
    their weights are averaged. ``"onecycle"`` rises linearly from 0 to
    ``base_lr`` over the first :data:`WARMUP_FRACTION` of the run's steps,
    then falls linearly to 0 at the last step (the schedule fast CIFAR-10
    recipes use with SGD). ``"constant"`` keeps ``base_lr``.
    """
    if schedule == "constant" or total_steps <= 0:
        return base_lr
    progress = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "onecycle":
        if progress < WARMUP_FRACTION:
            return base_lr * progress / WARMUP_FRACTION
        return base_lr * (1.0 - progress) / (1.0 - WARMUP_FRACTION)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


#: Codes of the schedules :class:`StepLearningRate` computes in the train step.
SCHEDULES = ("constant", "cosine", "onecycle")


@dataclass(frozen=True)
class RunSchedule:
    """This round's place in a run-wide learning-rate schedule (see :func:`schedule_value`).

    Attributes:
        base_lr: Peak learning rate.
        first_step: Local steps taken in earlier rounds (this round's offset).
        total_steps: Local steps of the whole run.
        schedule: ``"cosine"``, ``"onecycle"`` or ``"constant"``.
    """

    base_lr: float
    first_step: int
    total_steps: int
    schedule: str = "cosine"


class StepLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """:func:`schedule_value` computed inside the train step from the optimizer's step count.

    :func:`compile_model <pollen.training.compile.compile_model>` gives every optimizer
    one; :func:`fit` points it at a round's :class:`RunSchedule` by assigning
    its variables, so the traced train step is reused (no per-batch callback:
    see docs/performance.md#step-learning-rate).

    Args:
        learning_rate: Initial (constant) rate.
    """

    def __init__(self, learning_rate: float) -> None:
        def variable(value, dtype, name):
            return keras.Variable(value, trainable=False, dtype=dtype, name=name)

        self.base_lr = variable(learning_rate, "float32", "schedule_base_lr")
        self.first_step = variable(0.0, "float32", "schedule_first_step")
        self.total_steps = variable(0.0, "float32", "schedule_total_steps")
        self.start_iteration = variable(0.0, "float32", "schedule_start_iteration")
        self.kind = variable(0, "int32", "schedule_kind")

    @property
    def state(self) -> list[keras.Variable]:
        """The variables that :meth:`set` assigns.

        :func:`compile_model <pollen.training.compile.compile_model>` has the optimizer
        track them, so every backend hands them to the compiled train step as
        state: JAX's ``jit`` would otherwise bake their first values in, and
        every later round would repeat round 1's schedule.
        """
        return [self.base_lr, self.first_step, self.total_steps, self.start_iteration, self.kind]

    def set(self, schedule: RunSchedule, iteration: int) -> None:
        """Follow ``schedule`` from the optimizer's current ``iteration`` on."""
        if schedule.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule.schedule!r}: use one of {SCHEDULES}")
        self.base_lr.assign(schedule.base_lr)
        self.first_step.assign(float(schedule.first_step))
        self.total_steps.assign(float(schedule.total_steps))
        self.start_iteration.assign(float(iteration))
        self.kind.assign(SCHEDULES.index(schedule.schedule))

    def set_constant(self, learning_rate: float) -> None:
        """Use ``learning_rate`` at every step."""
        self.base_lr.assign(learning_rate)
        self.kind.assign(0)

    def __call__(self, step):
        """The learning rate at optimizer step ``step`` (a scalar tensor)."""
        from keras import ops

        base = ops.convert_to_tensor(self.base_lr)
        total = ops.maximum(ops.convert_to_tensor(self.total_steps), 1.0)
        at = ops.cast(step, "float32") - self.start_iteration + self.first_step
        progress = ops.clip(at / total, 0.0, 1.0)
        cosine = base * 0.5 * (1.0 + ops.cos(math.pi * progress))
        onecycle = ops.where(
            progress < WARMUP_FRACTION,
            base * progress / WARMUP_FRACTION,
            base * (1.0 - progress) / (1.0 - WARMUP_FRACTION),
        )
        kind = ops.convert_to_tensor(self.kind)
        scheduled = ops.where(ops.equal(kind, 1), cosine, onecycle)
        constant = ops.logical_or(ops.equal(kind, 0), ops.less_equal(self.total_steps, 0.0))
        return ops.where(constant, base, scheduled)

    def get_config(self) -> dict:  # noqa: D102
        return {"learning_rate": float(np.asarray(self.base_lr))}


def _step_learning_rate(model: keras.Model) -> StepLearningRate | None:
    schedule = getattr(model.optimizer, "_learning_rate", None)
    return schedule if isinstance(schedule, StepLearningRate) else None


@dataclass(frozen=True)
class FitResult:
    """What one local training pass produced.

    Attributes:
        loss: Mean training loss of the last epoch.
        accuracy: Training accuracy of the last epoch, in [0, 1].
        num_examples: Training examples seen per epoch.
        seconds: Wall time of ``fit``.
    """

    loss: float
    accuracy: float
    num_examples: int
    seconds: float


def fit(  # parameters: keras.Model.fit's own settings, passed through as keywords
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    augment: bool = False,
    verbose: int = 2,
    schedule: RunSchedule | None = None,
) -> FitResult:
    """Train a compiled model on local data for ``epochs`` epochs.

    Args:
        model: Compiled model; trained in place.
        x: ``uint8`` images, ``(N, H, W, C)``.
        y: ``int64`` labels, ``(N,)``.
        epochs: Passes over the data.
        batch_size: Examples per step.
        seed: Shuffle (and augmentation) seed.
        augment: Per-image random flips and shifts (see :func:`make_dataset`).
        verbose: Keras progress output (0 silent, 1 bar, 2 one line per epoch).
        schedule: The learning rate for every step of this call (the
            model must come from ``pollen.training.compile.compile_model``); None keeps
            the current rate.

    Returns:
        The last epoch's loss and accuracy, the examples per epoch and the wall time.

    Raises:
        TypeError: ``schedule`` is given but the model's optimizer has no
            :class:`StepLearningRate`.
    """
    if schedule is not None:
        step_lr = _step_learning_rate(model)
        if step_lr is None:
            raise TypeError(
                "fit(schedule=...) needs a model from pollen.training.compile.compile_model"
            )
        step_lr.set(schedule, int(np.asarray(model.optimizer.iterations)))
    ds = make_dataset(x, y, batch_size, shuffle=True, seed=seed, augment=augment)
    start = time.perf_counter()
    history = model.fit(ds, epochs=epochs, verbose=verbose, shuffle=False)
    seconds = time.perf_counter() - start
    return FitResult(
        loss=float(history.history["loss"][-1]),
        accuracy=float(history.history["accuracy"][-1]),
        num_examples=len(x),
        seconds=seconds,
    )


class ProximalTerm:
    """FedProx's proximal term, added to a compiled model's training loss.

    The training loss becomes ``loss + mu / 2 * ||w - w_anchor||^2`` over the
    model's trainable variables, where ``w_anchor`` are the global weights the
    client received this round (Li et al., 2020). Evaluation losses and the
    reported training loss stay the plain loss.

    Keras has no hook for a loss that depends on other weights, so this wraps
    the model instance's ``compute_loss``; the anchors and ``mu`` are Keras
    variables, so a new round only assigns them and the traced train step is
    reused.

    Args:
        model: Compiled model; its ``compute_loss`` is wrapped in place.
    """

    def __init__(self, model: keras.Model) -> None:
        from keras import ops

        self.model = model
        self.mu = keras.Variable(0.0, trainable=False, dtype="float32", name="proximal_mu")
        self.anchors = [
            keras.Variable(np.asarray(v.numpy()), trainable=False, dtype=v.dtype)
            for v in model.trainable_variables
        ]
        original = model.compute_loss
        self.original = original

        def compute_loss(x=None, y=None, y_pred=None, sample_weight=None, training=True):
            loss = original(x, y, y_pred, sample_weight, training=training)
            if not training:
                return loss
            distance = ops.sum(
                ops.stack(
                    [
                        ops.sum(ops.square(w - ops.convert_to_tensor(a)))
                        for w, a in zip(model.trainable_variables, self.anchors, strict=True)
                    ]
                )
            )
            return loss + 0.5 * ops.cast(self.mu, loss.dtype) * ops.cast(distance, loss.dtype)

        model.compute_loss = compute_loss
        model.train_function = None  # retrace with the proximal term

    def anchor(self, mu: float) -> None:
        """Use the model's current weights as ``w_anchor`` and set ``mu``."""
        self.mu.assign(float(mu))
        for a, v in zip(self.anchors, self.model.trainable_variables, strict=True):
            a.assign(v.value)

    @classmethod
    def of(cls, model: keras.Model) -> ProximalTerm:
        """The model's proximal term, installed on first use."""
        term = getattr(model, "_pollen_proximal", None)
        if term is None:
            term = cls(model)
            model._pollen_proximal = term
        return term

    @staticmethod
    def remove(model: keras.Model) -> None:
        """Take the model's proximal term off, if it has one (its plain loss comes back).

        For a change of the trainable weights (``pollen.training.finetune``):
        the anchors cover the trainable weights of the time it was installed.
        """
        term = getattr(model, "_pollen_proximal", None)
        if term is not None:
            model.compute_loss = term.original
            del model._pollen_proximal
            model.train_function = None


def reset_optimizer(model: keras.Model, learning_rate: float) -> None:
    """Give a compiled model a fresh optimizer state and a new learning rate.

    Each round starts from new global weights, so the optimizer's moments of
    the previous round describe another point; zeroing them in place (rather
    than compiling a new optimizer) keeps the traced train step, which saves
    seconds per round.
    """
    optimizer = model.optimizer
    step_lr = _step_learning_rate(model)
    keep = {id(getattr(optimizer, "_learning_rate", None))}
    keep |= {id(v) for v in step_lr.state} if step_lr is not None else set()
    for variable in optimizer.variables:
        if id(variable) not in keep:
            variable.assign(np.zeros(variable.shape, variable.dtype))
    if step_lr is not None:
        step_lr.set_constant(learning_rate)
    else:
        optimizer.learning_rate = learning_rate
