"""Fine-tuning from pretrained weights: which layers train in which round, at which rate.

A run with ``weights`` (ImageNet or a file, see ``pollen.models.pretrained``)
trains in up to two phases (docs/images.md has the measurements behind the defaults):

1. rounds ``1..freeze-rounds`` (default 0: none): only the classifier
   (``ModelSpec.head``) trains, at ``learning-rate``. The backbone is frozen,
   its BatchNorm layers included: a frozen Keras BatchNorm runs in inference
   mode, so its moving statistics stay the pretrained ones (and the clients'
   re-estimation before evaluation leaves them as they are: FedAvg averages
   identical values).
2. the other rounds: every layer trains, at ``fine-tune-lr`` (default
   ``learning-rate`` / 10; the run's schedule continues), except the
   BatchNorm layers, which stay frozen in inference mode
   (:data:`TRAIN_BATCHNORM`): their statistics and scales stay the
   pretrained ones, so small local batches and averaged per-client
   statistics cannot disturb the features the backbone learned (the usual
   Keras fine-tuning practice; not compared with trainable BatchNorm here).

Changing which layers train changes the train step, so the model is
recompiled (a fresh optimizer, which every round gets anyway) whenever the
phase changes: at most twice per run on each client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pollen.compat.keras import flatten_layers
from pollen.config import RunConfig
from pollen.models.registry import MODELS

if TYPE_CHECKING:  # keras is imported where a model is trained
    import keras

#: Whether BatchNorm layers train once the backbone trains (phase 2). False keeps them
#: in inference mode with their pretrained statistics (see the module docstring).
TRAIN_BATCHNORM = False

#: The attribute of a model that holds its current phase: ``(backbone, batchnorm)`` trainable.
_PHASE_ATTR = "_pollen_finetune_phase"


def backbone_frozen(cfg: RunConfig, server_round: int) -> bool:
    """Whether round ``server_round`` of ``cfg``'s run trains the classifier only."""
    return bool(cfg.weights) and server_round <= cfg.freeze_rounds


def round_learning_rate(cfg: RunConfig, server_round: int, learning_rate: float) -> float:
    """The peak learning rate of round ``server_round``.

    ``learning_rate`` (the run's) while the backbone is frozen or without
    pretrained weights; ``fine-tune-lr`` once a pretrained backbone trains.
    """
    if not cfg.weights or backbone_frozen(cfg, server_round):
        return learning_rate
    return cfg.fine_tune_lr


def set_trainable(
    model: keras.Model, head: str, *, backbone: bool, batchnorm: bool = TRAIN_BATCHNORM
) -> bool:
    """Make the classifier ``head`` trainable, the rest as ``backbone``/``batchnorm`` say.

    Args:
        model: A registry model (possibly compiled).
        head: Name of its classifier layer (``ModelSpec.head``).
        backbone: Whether the layers other than the classifier train.
        batchnorm: Whether BatchNorm layers train while the backbone does
            (a frozen BatchNorm runs in inference mode).

    Returns:
        Whether anything changed (a compiled model must then be recompiled).
    """
    import keras

    phase = (backbone, backbone and batchnorm)
    if getattr(model, _PHASE_ATTR, None) == phase:
        return False
    for layer in flatten_layers(model):
        if isinstance(layer, keras.Model) or not layer.weights:
            continue
        if layer.name == head:
            layer.trainable = True
        elif isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = phase[1]
        else:
            layer.trainable = backbone
    setattr(model, _PHASE_ATTR, phase)
    return True


def apply_round(model: keras.Model, cfg: RunConfig, server_round: int) -> None:
    """Put a client's compiled model in the phase of round ``server_round``.

    Without ``weights`` nothing changes. On a change the model is
    recompiled with its recipe (``pollen.training.compile.compile_model``),
    after removing a FedProx term, whose anchors cover the trainable
    weights (the next round installs it anew).
    """
    if not cfg.weights:
        return
    spec = MODELS[cfg.model]
    if not set_trainable(model, spec.head, backbone=not backbone_frozen(cfg, server_round)):
        return
    from pollen.training.compile import compile_model
    from pollen.training.local import ProximalTerm

    ProximalTerm.remove(model)
    compile_model(model, spec.recipe.learning_rate, spec.recipe)
    model.train_function = None  # retrace: the trainable weights changed
