"""Sampling among thousands of simulated clients without a message to each (docs/scale.md).

These run on Flower's own simulation pieces: its node registration
(``vce_api._register_nodes``), its in-memory link state and ``InMemoryGrid``.
"""

from __future__ import annotations

from dataclasses import replace

from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from pollen.client.app import client_name
from pollen.compat.flower import quick_simulation_dispatch, simulation_partitions
from pollen.server.exchange import announce_run_over, learn_names
from pollen.server.sampling import seeded_sample, simulated_name, simulated_names


def _simulation(num_nodes: int) -> tuple[InMemoryGrid, dict[int, int]]:
    """A grid over ``num_nodes`` nodes registered as Flower's simulation engine does."""
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    mapping = _register_nodes(num_nodes, factory)
    run = replace(Run.create_empty(1), federation_id=NOOP_FEDERATION_ID, primary_task_id=8)
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)  # as flwr.simulation.run_simulation does
    state.task_store[8] = Task(task_id=8, run_id=run.run_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid, mapping


def test_the_server_knows_each_simulated_clients_partition_without_asking() -> None:
    grid, mapping = _simulation(500)
    assert simulation_partitions(grid) == mapping  # Flower's own node -> partition map
    assert simulation_partitions(object()) == {}
    names = simulated_names(grid)
    assert len(names) == 500
    for node, pid in list(mapping.items())[:20]:
        node_config = {"partition-id": pid, "num-partitions": 500}
        assert names[node] == simulated_name(pid) == client_name(node_config)


def test_naming_and_ending_a_simulation_sends_no_message() -> None:
    grid, mapping = _simulation(2000)
    names: dict[int, str] = {}
    learn_names(grid, list(grid.get_node_ids()), names, timeout=1.0)
    announce_run_over(grid, timeout=1.0)
    assert len(names) == 2000
    assert grid.state.message_ins_store == {}  # not one of 2,000 queries


def test_a_simulations_sample_is_the_same_partitions_whatever_the_node_ids() -> None:
    samples = []
    for _ in range(2):  # two runs: the engine draws new node ids for each
        grid, mapping = _simulation(3000)
        names = simulated_names(grid)
        samples.append(sorted(mapping[n] for n in seeded_sample(grid, names, 42, 3, 30)))
    assert samples[0] == samples[1] and len(set(samples[0])) == 30


def test_the_engine_finds_waiting_messages_without_scanning_every_node(
    monkeypatch, flower_task
) -> None:
    import threading
    from queue import Queue

    from flwr.app import ConfigRecord, MessageType, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.fleet.vce.vce_api import add_messages_to_queue
    from flwr.server.superlink.linkstate import InMemoryLinkState
    from flwr.supercore.task_identity import TaskIdentity

    scans: list[int] = []
    flower_get = InMemoryLinkState.get_message_ins

    def counted(self, node_id, limit, *, run_id=None):
        scans.append(node_id)
        return flower_get(self, node_id, limit, run_id=run_id)

    monkeypatch.setattr(InMemoryLinkState, "get_message_ins", counted)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)  # the ServerApp's messages
    grid, mapping = _simulation(3000)
    assert quick_simulation_dispatch(grid) and quick_simulation_dispatch(grid)
    sampled = list(mapping)[100:3000:600]
    content = RecordDict({"config": ConfigRecord({"request": "hello"})})
    messages = [grid.create_message(content, MessageType.QUERY, n, "") for n in sampled]
    assert len(list(grid.push_messages(messages))) == len(sampled)
    queue: Queue = Queue()
    stop = threading.Event()
    sweeper = threading.Thread(  # Flower's own dispatch thread, as the engine runs it
        target=add_messages_to_queue, args=(grid.state, queue, mapping, stop), daemon=True
    )
    sweeper.start()
    got = [queue.get(timeout=30) for _ in sampled]
    stop.set()
    sweeper.join(timeout=10)
    assert sorted(m.metadata.dst_node_id for m in got) == sorted(sampled)
    assert queue.empty()
    assert len(scans) < 10 * len(sampled)  # Flower scanned the store for those nodes only
