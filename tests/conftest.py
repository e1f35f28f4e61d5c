"""Shared fixtures: a tiny generated image dataset and a quiet environment."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

CLASSES = ("apple", "banana", "cherry")


def make_image_folder(root: Path, per_class_train: int = 24, per_class_test: int = 8) -> Path:
    """Write ``train/<class>/*.png`` and ``test/<class>/*.png`` with learnable colour cues.

    Every image is random noise plus a strong tint in its class's colour channel,
    so a small CNN learns it in a round or two; the noise makes every image's
    bytes unique (tests search for them in network traffic).
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                pixels[..., c] += 140
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 3-class image folder: 72 train / 24 test images of 32x32x3."""
    return make_image_folder(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def pollen_env(tmp_path_factory) -> dict[str, str]:
    """Environment for pollen subprocesses: private cache, quiet TensorFlow."""
    env = dict(os.environ)
    env["POLLEN_CACHE_DIR"] = str(tmp_path_factory.mktemp("pollen-cache"))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pollen_cmd(*args: str) -> list[str]:
    """argv that runs the pollen CLI with this interpreter."""
    return [sys.executable, "-m", "pollen.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def flower_task(monkeypatch):
    """Let Flower build Messages outside a run: its constructor reads the task's identity."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class NodesGrid:
    """Just enough of a Grid for a strategy's ``configure_train``: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def train_reply(node: int, arrays: list, n: int = 100):
    """A client's train reply as the Grid hands it to a strategy (weights + metrics)."""
    import time

    from flwr.app import (
        DEFAULT_TTL,
        ArrayRecord,
        Message,
        MessageType,
        Metadata,
        MetricRecord,
        RecordDict,
    )

    meta = Metadata(
        run_id=1,
        message_id=f"reply-{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"instruction-{node}",
        group_id="1",
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=MessageType.TRAIN,
    )
    metrics = MetricRecord({"num-examples": n, "unit-weight": 1, "train_loss": 0.1})
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics})
    return Message(metadata=meta, content=content)


def pytest_collection_modifyitems(config, items) -> None:
    """Fast unit tests first, then the end-to-end tests (marked ``e2e``)."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


def bn_layers(model) -> list:
    """All BatchNormalization layers of a Keras model, including those inside nested models."""
    import keras

    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += bn_layers(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
    return found
