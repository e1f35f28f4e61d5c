"""The process's compute backend: thread pools, seeds, and where input batches are made.

Keras, TensorFlow, torch and JAX are imported inside the functions that use
them: they are heavy, and which of them a process loads depends on the
backend it chose (``KERAS_BACKEND``) before Keras was first imported.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

from pollen.compat.keras import seed_keras_without_tensorflow


def configure_threads(threads: int, sharing_clients: int = 1) -> int:
    """Set the thread pools of a client: torch's under that backend, else TensorFlow's.

    Two Keras clients on two cores, each with TensorFlow's default pools of
    ``cores`` threads, oversubscribe the CPU and slow each other down. Each
    client gets ``cores // sharing_clients`` intra-op threads (at least one)
    and one inter-op thread unless ``threads`` says otherwise.

    Must run before TensorFlow executes its first op in this process; later
    calls are ignored (TensorFlow refuses to resize running pools).

    Args:
        threads: Intra-op threads; 0 = derive from the core count.
        sharing_clients: Clients running on this machine at the same time.

    Returns:
        The intra-op thread count in force.
    """
    cores = os.cpu_count() or 1
    if threads <= 0:
        threads = max(1, cores // max(1, min(sharing_clients, cores)))
    import keras

    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(threads)
    if feeds_on_device():  # no tf.data in this process: TensorFlow has nothing to run
        return threads
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1 if sharing_clients > 1 else 2)
    except RuntimeError:  # pools already initialised in this process
        return tf.config.threading.get_intra_op_parallelism_threads() or cores
    return threads


@functools.cache
def _has_tensorflow() -> bool:
    if sys.modules.get("tensorflow") is not None:
        return True
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):  # an import hook refuses it
        return False


def feeds_on_device() -> bool:
    """Whether input batches are made on the backend's device, not by ``tf.data``.

    Always under torch: on a GPU the arrays then sit in its memory and no
    batch crosses from the host; on a CPU the gather costs no more than
    ``tf.data`` (``fastnet``, two clients on two cores: 265-270 images/s each
    against 235-261) and the process never imports TensorFlow (a ``fastnet``
    client's imports, model build and first step: 4.9-5.0 s instead of
    8.1-8.5 s). Under JAX when it computes on an accelerator or TensorFlow
    is not installed. Otherwise (the TensorFlow backend; JAX on a CPU beside
    TensorFlow) ``tf.data`` feeds the model.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        return True
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu" or not _has_tensorflow()
    return False


def set_random_seed(seed: int) -> None:
    """``keras.utils.set_random_seed(seed)``, without importing TensorFlow where nothing runs it.

    Keras also seeds TensorFlow whenever it is installed (for ``tf.data``
    pipelines), and importing it costs seconds of every client's start. A
    process whose batches do not come from ``tf.data``
    (``pollen.backend.feeds_on_device``: every torch process) never runs
    TensorFlow, so there Keras is shown none; Python's, NumPy's, torch's and
    Keras's own seeds are set as usual, and the initial weights are the same.

    Args:
        seed: Seed for Python, NumPy, the backend and Keras's initialisers.
    """
    import keras

    if not feeds_on_device() or "tensorflow" in sys.modules:
        keras.utils.set_random_seed(seed)
        return
    seed_keras_without_tensorflow(seed)
