"""Keras's private internals that Pollen uses, each behind one named function.

Checked against :data:`pollen.compat.KERAS`; ``tests/test_compat.py`` checks
each one. Keras is imported inside the functions (heavy); this module never
imports Flower.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from unittest import mock

__all__ = ["flatten_layers", "seed_keras_without_tensorflow", "track_optimizer_variable"]


def flatten_layers(model: Any) -> Iterator[Any]:
    """Every layer inside ``model``, nested ones included, not ``model`` itself.

    Relies on ``keras.layers.Layer._flatten_layers(include_self=False)``
    (Keras's own walk, in its order: depth first, each layer once).
    Checked: keras>=3.15,<4.

    Args:
        model: A built or unbuilt ``keras.Model`` (or any ``keras.layers.Layer``).

    Returns:
        An iterator over the layers.
    """
    return model._flatten_layers(include_self=False)  # noqa: SLF001


def track_optimizer_variable(optimizer: Any, variable: Any) -> None:
    """Make ``variable`` part of ``optimizer``'s state (saved, restored, in ``.variables``).

    Relies on ``keras.optimizers.Optimizer._track_variable(variable)``, the
    hook Keras's own optimizers use for the slots they add. Checked: keras>=3.15,<4.

    Args:
        optimizer: A built ``keras.optimizers.Optimizer``.
        variable: A ``keras.Variable`` the optimizer updates itself.
    """
    optimizer._track_variable(variable)  # noqa: SLF001


def seed_keras_without_tensorflow(seed: int) -> None:
    """``keras.utils.set_random_seed(seed)``, but never seeding (or importing) TensorFlow.

    Seeds Python's ``random``, NumPy, torch (on the torch backend) and Keras's
    global seed generator, exactly as Keras does. Relies on
    ``keras.src.utils.rng_utils``: its ``set_random_seed(seed)`` checks the
    module global ``tf`` (a lazy module) with ``tf.available`` before it
    seeds TensorFlow; that global is replaced for the call by one that is not
    available. Checked: keras>=3.15,<4.

    Args:
        seed: The seed (an ``int``).
    """
    from keras.src.utils import rng_utils

    with mock.patch.object(rng_utils, "tf", SimpleNamespace(available=False)):
        rng_utils.set_random_seed(seed)
