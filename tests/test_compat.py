"""Each private Flower/Keras internal in pollen.compat: still there, same shape, same behaviour.

A failure names the internal and the release range it was checked against: check the
internal in the installed release and update pollen/compat/ (and its range) together.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from pollen import compat
from pollen.compat import flower as compat_flower
from pollen.compat import keras as compat_keras


def _require(checked: compat.Checked, internal: str) -> None:
    """Fail loudly when the installed release is outside the range ``internal`` was checked on."""
    installed = checked.installed()
    assert checked.covers(installed), (
        f"{internal} was checked against {checked}, but {checked.package} {installed} is "
        f"installed: check it in {installed}, then update pollen/compat/ and its range."
    )


def _params(obj, internal: str, checked: compat.Checked) -> list[str]:
    try:
        return list(inspect.signature(obj).parameters)
    except (TypeError, ValueError) as ex:
        pytest.fail(f"{internal} ({checked}) has no readable signature any more: {ex}")


def _has_params(obj, names, internal: str, checked: compat.Checked) -> None:
    params = _params(obj, internal, checked)
    missing = [name for name in names if name not in params]
    assert not missing, (
        f"{internal} no longer takes {missing} (checked against {checked}); it takes {params}. "
        "Update pollen/compat/."
    )


def _attr(module_name: str, dotted: str, checked: compat.Checked):
    internal = f"{module_name}.{dotted}"
    try:
        obj = importlib.import_module(module_name)
    except ImportError as ex:
        pytest.fail(f"{module_name} is gone (checked against {checked}): {ex}")
    for part in dotted.split("."):
        assert hasattr(obj, part), f"{internal} is gone (checked against {checked})."
        obj = getattr(obj, part)
    return obj


def test_checked_ranges_match_the_pins() -> None:
    assert compat.FLOWER.covers("1.42.0") and not compat.FLOWER.covers("1.42.1")
    assert not compat.FLOWER.covers("1.41.9")
    assert compat.KERAS.covers("3.15.1") and compat.KERAS.covers("3.99")
    assert not compat.KERAS.covers("3.14.0") and not compat.KERAS.covers("4.0.0")
    assert not compat.KERAS.covers("nightly")
    assert str(compat.FLOWER) == "flwr==1.42.0" and str(compat.KERAS) == "keras>=3.15,<4"


def test_installed_flower_is_the_checked_one() -> None:
    _require(compat.FLOWER, "Every Flower internal in pollen.compat")


def test_installed_keras_is_the_checked_one() -> None:
    _require(compat.KERAS, "Every Keras internal in pollen.compat")


# --- Keras ---------------------------------------------------------------------------------


def test_flatten_layers() -> None:
    import keras

    internal = "keras.layers.Layer._flatten_layers"
    _require(compat.KERAS, internal)
    walk = _attr("keras.layers", "Layer._flatten_layers", compat.KERAS)
    _has_params(walk, ["include_self", "recursive"], internal, compat.KERAS)

    inner = keras.Sequential([keras.layers.Dense(3, name="d1")], name="inner")
    model = keras.Sequential([keras.Input((2,)), inner, keras.layers.Dense(1, name="d2")])
    names = [layer.name for layer in compat_keras.flatten_layers(model)]
    assert [name for name in names if not name.startswith("input")] == ["inner", "d1", "d2"]
    assert model.name not in names  # nested layers, not the model itself


def test_track_optimizer_variable() -> None:
    import keras

    internal = "keras.optimizers.Optimizer._track_variable"
    _require(compat.KERAS, internal)
    hook = _attr("keras.optimizers", "Optimizer._track_variable", compat.KERAS)
    _has_params(hook, ["variable"], internal, compat.KERAS)

    optimizer = keras.optimizers.SGD()
    optimizer.build([keras.Variable(np.zeros(2, "float32"))])
    extra = keras.Variable(np.ones(3, "float32"), name="pollen_extra")
    compat_keras.track_optimizer_variable(optimizer, extra)
    assert any(v is extra for v in optimizer.variables), f"{internal}: the variable is not tracked"


def test_seed_keras_without_tensorflow() -> None:
    internal = "keras.src.utils.rng_utils (set_random_seed and its global tf.available)"
    _require(compat.KERAS, internal)
    rng_utils = _attr("keras.src.utils", "rng_utils", compat.KERAS)
    _has_params(rng_utils.set_random_seed, ["seed"], internal, compat.KERAS)
    assert hasattr(rng_utils, "tf") and hasattr(rng_utils.tf, "available"), (
        f"{internal}: the module global `tf` with `.available` is gone "
        f"(checked against {compat.KERAS}); pollen.compat.keras.seed_keras_without_tensorflow "
        "no longer keeps TensorFlow out."
    )
    source = inspect.getsource(rng_utils.set_random_seed)
    assert "tf.available" in source, f"{internal}: set_random_seed no longer checks tf.available"

    compat_keras.seed_keras_without_tensorflow(7)
    first = np.random.rand()
    np.random.seed(7)
    assert np.random.rand() == first
    assert not isinstance(rng_utils.tf, types.SimpleNamespace)  # Keras's own global is back


def test_seed_keras_without_tensorflow_leaves_tensorflow_unseeded() -> None:
    """TensorFlow's seed is untouched, whether or not it is imported (cheap, in process)."""
    rng_utils = _attr("keras.src.utils", "rng_utils", compat.KERAS)
    seeded: list[int] = []
    fake_tf = types.SimpleNamespace(
        available=True, random=types.SimpleNamespace(set_seed=seeded.append)
    )
    original = rng_utils.tf
    rng_utils.tf = fake_tf
    try:
        compat_keras.seed_keras_without_tensorflow(3)
        assert seeded == []
        rng_utils.set_random_seed(3)  # Keras itself does seed it: the patch is what stops it
        assert seeded == [3]
    finally:
        rng_utils.tf = original


def test_seed_keras_without_tensorflow_never_imports_it() -> None:
    """On the torch backend, seeding leaves TensorFlow unimported (what it is for)."""
    pytest.importorskip("torch")
    code = (
        "import sys\n"
        "from pollen.compat.keras import seed_keras_without_tensorflow\n"
        "seed_keras_without_tensorflow(5)\n"
        "print('tensorflow' in sys.modules)\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.stdout.strip().splitlines()[-1:] == ["False"], done.stderr[-2000:]


# --- Flower --------------------------------------------------------------------------------

_PULL_KEYWORDS = ["initial_backoff", "backoff_cap", "max_tries_per_object"]


@pytest.mark.parametrize(
    ("module_name", "name"),
    [
        ("flwr.superlink.grid.http_grid", "pull_objects"),
        ("flwr.supernode.start_client_internal", "pull_objects"),
        ("flwr.supernode.runtime.run_clientapp", "pull_and_inflate_object_from_tree"),
    ],
)
def test_the_pulls_quick_pulls_replaces(module_name: str, name: str) -> None:
    internal = f"{module_name}.{name}"
    _require(compat.FLOWER, internal)
    pull = _attr(module_name, name, compat.FLOWER)
    if isinstance(pull, functools.partial):  # already sped up by another test in this process
        pull = pull.func
    _has_params(pull, _PULL_KEYWORDS, internal, compat.FLOWER)
    max_time = _attr("flwr.supercore.constant", "PULL_MAX_TIME", compat.FLOWER)
    assert max_time > 0


def test_quick_pulls_retry_sooner_and_once() -> None:
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

    module = types.ModuleType("receiver")
    module.pull_objects = pull_objects
    compat_flower.quick_pulls(module, "pull_objects")
    first = module.pull_objects
    compat_flower.quick_pulls(module, "pull_objects")  # idempotent
    assert module.pull_objects is first and first.func is pull_objects

    tries: list[float] = []

    def pull_object(object_id: str) -> bytes:
        tries.append(time.monotonic())
        if len(tries) == 1:
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert module.pull_objects(["abc"], pull_object) == {"abc": b"content"}
    assert tries[1] - tries[0] < 0.5  # Flower's own first retry: 0.8-1.2 s


def test_named_quick_pulls_patch_flowers_modules(monkeypatch) -> None:
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal
    from flwr.supernode.runtime import run_clientapp

    for module, name, patch in [
        (http_grid, "pull_objects", compat_flower.quick_serverapp_pulls),
        (start_client_internal, "pull_objects", compat_flower.quick_supernode_pulls),
        (run_clientapp, "pull_and_inflate_object_from_tree", compat_flower.quick_clientapp_pulls),
    ]:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
        patch()
        replaced = getattr(module, name)
        assert isinstance(replaced, functools.partial)
        assert replaced.keywords["initial_backoff"] == compat_flower.PULL_FIRST_RETRY


def test_supernode_sleeps_through_its_module_global_time(monkeypatch) -> None:
    internal = "flwr.supernode.start_client_internal.time"
    _require(compat.FLOWER, internal)
    module = importlib.import_module("flwr.supernode.start_client_internal")
    assert isinstance(getattr(module, "time", None), types.ModuleType), (
        f"{internal} is gone (checked against {compat.FLOWER}): the SuperNode's polls are "
        "no longer capped."
    )
    assert "time.sleep(3)" in inspect.getsource(module), (
        f"{internal}: the SuperNode's 3-s idle poll moved (checked against {compat.FLOWER})"
    )
    monkeypatch.setattr(module, "time", module.time)  # restored after the test
    fake = types.ModuleType("time")
    compat_flower.cap_supernode_sleeps(fake)
    assert module.time is fake


def test_start_parent_process_monitor() -> None:
    internal = "flwr.supercore.app_utils.start_parent_process_monitor"
    _require(compat.FLOWER, internal)
    monitor = _attr("flwr.supercore.app_utils", "start_parent_process_monitor", compat.FLOWER)
    _has_params(monitor, ["parent_pid"], internal, compat.FLOWER)
    # Behaviour: a child whose parent ends is interrupted (as by Ctrl-C), then exits.
    code = (
        "import os, signal, subprocess, sys, time\n"
        # SIGINT as a fresh process has it: a blocked mask or an ignored disposition is
        # inherited from whatever started this one (in the whole suite, the test runner).
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from pollen.compat import flower as compat_flower\n"
        "parent = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(0.5)'])\n"
        "compat_flower.start_parent_process_monitor(parent.pid)\n"
        "parent.wait()\n"
        "try:\n"
        "    for _ in range(300):\n"  # short sleeps: the signal is raised in another thread
        "        time.sleep(0.1)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "interrupted" in done.stdout, done.stderr[-2000:]


def test_run_superexec_with() -> None:
    internal = "flwr.supercore.superexec.run_superexec (run_superexec and get_executor)"
    _require(compat.FLOWER, internal)
    module = "flwr.supercore.superexec.run_superexec"
    run = _attr(module, "run_superexec", compat.FLOWER)
    _has_params(
        run,
        [
            "runtime_api_address",
            "insecure",
            "root_certificates_path",
            "superexec_auth_secret",
            "parent_pid",
        ],
        internal,
        compat.FLOWER,
    )
    _attr(module, "get_executor", compat.FLOWER)
    _attr(module, "register_signal_handlers", compat.FLOWER)
    assert "register_signal_handlers(" in inspect.getsource(run), (
        f"{internal}: run_superexec no longer registers signal handlers through its module "
        f"global (checked against {compat.FLOWER}); on the SuperNode's thread it would fail."
    )
    assert "get_executor(" in inspect.getsource(run), (
        f"{internal}: run_superexec no longer picks its executor with get_executor "
        f"(checked against {compat.FLOWER}); the warm app runner would not be used."
    )


def test_run_superexec_with_hands_over_the_executor(monkeypatch) -> None:
    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")
    seen: dict = {}

    def fake_run(**kwargs):
        seen["executor"] = superexec.get_executor("subprocess")
        seen["kwargs"] = kwargs

    monkeypatch.setattr(superexec, "get_executor", superexec.get_executor)  # restored after
    monkeypatch.setattr(superexec, "run_superexec", fake_run)
    mine = object()
    compat_flower.run_superexec_with(lambda: mine, runtime_api_address="127.0.0.1:1", insecure=True)
    assert seen == {"executor": mine, "kwargs": {"runtime_api_address": "127.0.0.1:1",
                                                "insecure": True}}  # fmt: skip


def test_run_superexec_with_on_a_thread_leaves_signals_alone(monkeypatch) -> None:
    """``signals=False``: Flower's loop registers no handler (a thread cannot)."""
    import threading

    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")
    for name in ("get_executor", "register_signal_handlers"):
        monkeypatch.setattr(superexec, name, getattr(superexec, name))  # restored after
    seen: dict = {}

    def fake_run(**_kwargs):
        superexec.register_signal_handlers(event_type=None, exit_message="", grpc_servers=[])
        seen["ran"] = True

    monkeypatch.setattr(superexec, "run_superexec", fake_run)
    thread = threading.Thread(
        target=compat_flower.run_superexec_with, args=(object,), kwargs={"signals": False}
    )
    thread.start()
    thread.join(30)
    assert seen == {"ran": True}


def test_declare_heartbeat_interval(monkeypatch) -> None:
    internal = "flwr.supernode.fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL"
    _require(compat.FLOWER, internal)
    module = importlib.import_module("flwr.supernode.fleet_http_connection")
    default = _attr("flwr.supernode.fleet_http_connection", "HEARTBEAT_DEFAULT_INTERVAL",
                    compat.FLOWER)  # fmt: skip
    assert inspect.getsource(module).count("heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL") >= 2, (
        f"{internal}: the SuperNode no longer declares its heartbeat interval with it "
        f"(checked against {compat.FLOWER})"
    )
    monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", default)  # restored after
    compat_flower.declare_heartbeat_interval(60)
    assert module.HEARTBEAT_DEFAULT_INTERVAL == 60


def test_is_simulation_grid() -> None:
    internal = "flwr.superlink.grid.inmemory_grid.InMemoryGrid"
    _require(compat.FLOWER, internal)
    grid = _attr("flwr.superlink.grid.inmemory_grid", "InMemoryGrid", compat.FLOWER)
    from flwr.serverapp import Grid

    assert issubclass(grid, Grid), f"{internal} is no longer a Grid ({compat.FLOWER})"
    assert not compat_flower.is_simulation_grid(object())
    assert compat_flower.is_simulation_grid(grid.__new__(grid))


@pytest.mark.parametrize(
    ("module_name", "name", "params"),
    [
        (module_name, name, params)
        for module_name, names in compat_flower.WARM_CLIENTAPP_NAMES.items()
        for name, params in names.items()
    ],
)
def test_warm_clientapp_names(module_name: str, name: str, params: tuple[str, ...]) -> None:
    internal = f"{module_name}.{name} (pollen.deploy.warm_clientapp)"
    _require(compat.FLOWER, internal)
    obj = _attr(module_name, name, compat.FLOWER)
    if params:
        _has_params(obj, params, internal, compat.FLOWER)


def test_warm_clientapp_imports_only_listed_flower_names() -> None:
    """Every Flower name warm_clientapp imports is in WARM_CLIENTAPP_NAMES (so it is checked)."""
    import ast

    from pollen.deploy import warm_clientapp

    listed = {
        (module, name.split(".")[0]) for module, names in compat_flower.WARM_CLIENTAPP_NAMES.items()
        for name in names
    }  # fmt: skip
    tree = ast.parse(inspect.getsource(warm_clientapp))
    imported = {
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flwr.")
        for alias in node.names
    }
    public = {("flwr.app", "Message"), ("flwr.app.error", "Error")}
    assert imported - public <= listed, (
        f"pollen.deploy.warm_clientapp imports Flower names that pollen.compat does not "
        f"list (so no test checks them): {sorted(imported - public - listed)}"
    )


@pytest.mark.parametrize(
    ("module", "checked"), [(compat_keras, compat.KERAS), (compat_flower, compat.FLOWER)]
)
def test_every_wrapper_names_the_range_it_was_checked_against(module, checked) -> None:
    for name in module.__all__:
        obj = getattr(module, name)
        if callable(obj):
            assert f"Checked: {checked}" in (obj.__doc__ or ""), (
                f"{module.__name__}.{name}'s docstring must say `Checked: {checked}`"
            )
