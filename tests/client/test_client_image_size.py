"""A client trains at the run config's image size: its data resized, its model built for it."""

from __future__ import annotations


def test_a_client_loads_its_data_and_builds_its_model_at_the_runs_image_size(
    tiny_data, flower_task
) -> None:
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from pollen.client import app as client_app
    from pollen.config import RunConfig

    client_app.get_model.cache_clear()
    client_app.load_client_data.cache_clear()
    cfg = RunConfig(model="cnn", num_classes=3, data_dir=str(tiny_data), image_size="40x48")
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=cfg.to_mapping(),
                      node_config={"partition-id": 0, "num-partitions": 2})  # fmt: skip
    _, model, data = client_app._setup(RecordDict(), context)
    assert model.input_shape == (None, 40, 48, 3)
    assert data.x_train.shape[1:] == (40, 48, 3) and data.x_test.shape[1:] == (40, 48, 3)

    msg = Message(RecordDict({"config": ConfigRecord({"request": "initial-arrays"})}),
                  dst_node_id=7, message_type=MessageType.QUERY)  # fmt: skip
    arrays = client_app.query(msg, context).content["arrays"].to_numpy_ndarrays()
    assert [a.shape for a in arrays] == [w.shape for w in model.get_weights()]
    client_app.get_model.cache_clear()
    client_app.load_client_data.cache_clear()
