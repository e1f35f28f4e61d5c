"""The ClientApp's handlers and checks (pollen.client.app), on a small CNN and tiny data."""

from __future__ import annotations

import numpy as np
import pytest

from pollen.client.app import check_architecture
from pollen.errors import PollenError
from pollen.models.registry import build_model


@pytest.fixture(scope="module")
def cnn():
    return build_model("cnn", num_classes=10, seed=0)


def test_check_architecture(cnn) -> None:
    weights = cnn.get_weights()
    check_architecture(cnn, weights)  # matching weights pass
    check_architecture(cnn, [w + 1 for w in weights])  # values do not matter

    with pytest.raises(PollenError, match=f"{len(weights) - 1} arrays received, {len(weights)}"):
        check_architecture(cnn, weights[:-1])

    wrong = list(weights)
    wrong[5] = np.zeros((3, 3, 32, 65), np.float32)
    with pytest.raises(PollenError, match=r"\barray 5\b") as err:
        check_architecture(cnn, wrong)
    assert "same architecture" in str(err.value)

    other = build_model("cnn", num_classes=4, seed=0).get_weights()
    with pytest.raises(PollenError, match=rf"\barray {len(weights) - 2}\b"):
        check_architecture(cnn, other)


def test_a_prepare_query_loads_the_data_and_builds_the_model(tiny_data, flower_task) -> None:
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from pollen.client import app as client_app
    from pollen.config import RunConfig

    client_app.get_model.cache_clear()
    client_app.load_client_data.cache_clear()
    cfg = RunConfig(model="cnn", num_classes=3, data_dir=str(tiny_data))
    msg = Message(RecordDict({"config": ConfigRecord({"request": "prepare"})}),
                  dst_node_id=7, message_type=MessageType.QUERY)  # fmt: skip
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=cfg.to_mapping(),
                      node_config={"partition-id": 1, "num-partitions": 2})  # fmt: skip
    reply = client_app.query(msg, context)
    assert dict(reply.content["client"]) == {"name": "partition-1"}
    assert "arrays" not in reply.content  # nothing but the name goes back
    # Round 1's train message then finds both ready.
    assert client_app.get_model.cache_info().currsize == 1
    assert client_app.load_client_data.cache_info().currsize == 1
