"""The server's own model: built only for central evaluation and ``model.keras``.

The server aggregates ``ArrayRecord`` s without knowing the architecture;
this is the one place on the server that builds the registry model and
loads the test split, lazily, on first use.
"""

from __future__ import annotations

import functools
from pathlib import Path

from flwr.app import ArrayRecord

from pollen.config import RunConfig
from pollen.data.load import load_dataset
from pollen.models.registry import MODELS, build_model
from pollen.server.history import save_model

# pollen.training (and with it Keras) is imported on first use, not at the top: the
# server app then starts (and asks a client for the initial weights) without waiting
# for the Keras import, which overlaps the clients' start-up instead.


class ModelFiles:
    """Builds the model lazily, only for central evaluation and model files.

    Args:
        cfg: The run config (``model``, ``num-classes``, ``server-data-dir``, ``tta``).
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    @functools.cached_property
    def eval_model(self):
        """The compiled registry model for central evaluation, in the fastest layout.

        (see docs/performance.md#central-evaluation-layout)
        """
        from pollen.training.compile import compile_model

        fast = build_model(
            self.cfg.model, self.cfg.num_classes, fastest_layout=True, image_size=self.cfg.image_hw
        )
        return compile_model(fast, 1e-3, schedulable=False)

    @functools.cached_property
    def model(self):
        """The compiled model for ``model.keras``, laid out so any Keras backend loads it.

        :attr:`eval_model` itself unless that one runs channels-first; then a
        channels-last instance (same weight shapes).
        """
        from pollen.training.compile import compile_model

        if all(getattr(layer, "data_format", None) != "channels_first" for layer in
               self.eval_model.layers):  # fmt: skip
            return self.eval_model
        return compile_model(
            build_model(self.cfg.model, self.cfg.num_classes, image_size=self.cfg.image_hw),
            1e-3,
            schedulable=False,
        )

    @functools.cached_property
    def test_set(self):
        """The central test split ``(x, y)`` (loaded on first use)."""
        ds = load_dataset(
            self.cfg.server_data_dir or self.cfg.data_dir or None, image_size=self.cfg.image_hw
        )
        return ds.x_test, ds.y_test

    def prepare(self) -> None:
        """Build the evaluation model and load the test split (otherwise done on first use)."""
        _ = self.eval_model, self.test_set

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        """Central evaluation of the global arrays on the test split.

        Returns:
            ``{"loss", "accuracy", "examples"}`` over the whole test split
            (with flip test-time augmentation where ``tta`` and the model allow it).
        """
        from pollen.training.evaluate import evaluate

        self.eval_model.set_weights(arrays.to_numpy_ndarrays())
        x, y = self.test_set
        flip_tta = self.cfg.tta and MODELS[self.cfg.model].flip_tta
        loss, accuracy = evaluate(self.eval_model, x, y, flip_tta=flip_tta)
        return {"loss": loss, "accuracy": accuracy, "examples": len(y)}

    def save(self, run_dir: Path, arrays: ArrayRecord) -> Path:
        """Write ``run_dir/model.keras`` holding ``arrays``; return its path."""
        self.model.set_weights(arrays.to_numpy_ndarrays())
        return save_model(run_dir, self.model)
