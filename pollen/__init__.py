"""Pollen: federated learning on Flower and Keras 3 that works on the first try.

The package follows a federation's data flow; each folder imports only the
folders below it (checked by ``lint-imports``, contracts in ``pyproject.toml``):

- ``cli/``       the ``pollen`` command: one module per subcommand, one option table.
- ``deploy/``    launchers: simulation, server and client processes, SuperNode, relay, TLS.
- ``server/``    the ServerApp: round loop, strategies, aggregation, privacy, history files.
- ``client/``    the ClientApp: a participant's data, local training and evaluation.
- ``training/``  local training on one client: compile, input batches, fit, evaluate.
- ``config.py``  the run config (Flower's ``[tool.flwr.app.config]``, validated).
- ``models/``    the model registry; one file per architecture.
- ``data/``      datasets (CIFAR-10, image folders) and per-client partitions.
- ``wire.py``, ``protocol.py``, ``files.py``, ``backend.py``, ``compat.py``, ``errors.py``:
  small shared modules (the wire format, keys both ends agree on, atomic files,
  the compute backend, Flower/Keras internals, the one error type).
"""

__version__ = "0.1.0"
