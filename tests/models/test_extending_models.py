"""docs/extending-models.md, done for real: its model file and import line, run as written."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import pollen.models
from pollen.cli.app import build_parser
from pollen.config import RunConfig
from pollen.models.registry import MODELS, ModelSpec, build_model, register
from pollen.training.compile import build_client_model
from pollen.training.evaluate import evaluate
from pollen.training.local import fit

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "extending-models.md"


def _python_blocks() -> list[str]:
    """The doc's ```python code blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```$", DOC.read_text(encoding="utf-8"), re.M | re.S)


def _doc_steps() -> tuple[str, str, str]:
    """``(module name, model file source, import line)`` of the doc's two steps."""
    model_file, import_line = _python_blocks()
    path = re.search(r"^## Step 1.*?`pollen/models/(\w+)\.py`", DOC.read_text(encoding="utf-8"),
                     re.M | re.S)  # fmt: skip
    assert path, "step 1 of the doc names no pollen/models/<name>.py file"
    return path.group(1), model_file, import_line.strip()


@pytest.fixture
def doc_model(tmp_path):
    """Perform the doc's step 1 (the file, imported as part of pollen.models); undo it after.

    Yields the registry name the file registered.
    """
    module, source, _ = _doc_steps()
    before = dict(MODELS)
    path = tmp_path / f"{module}.py"
    path.write_text(source, encoding="utf-8")
    name = f"pollen.models.{module}"
    spec = importlib.util.spec_from_file_location(name, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    try:
        spec.loader.exec_module(loaded)
        (added,) = set(MODELS) - set(before)
        yield added
    finally:
        sys.modules.pop(name, None)
        MODELS.clear()
        MODELS.update(before)


def test_the_import_line_has_the_shape_of_the_packages_own() -> None:
    """Step 2's line is written like every architecture's line in pollen/models/__init__.py."""
    module, _, import_line = _doc_steps()
    assert import_line == f"from pollen.models import {module} as {module}"
    init = Path(pollen.models.__file__).read_text(encoding="utf-8")
    lines = re.findall(r"^from pollen\.models import (\w+) as (\w+)$", init, re.M)
    assert [a for a, b in lines if a == b] == [a for a, _ in lines]
    assert {"mobilenetv2", "fastnet", "cnn"} <= {a for a, _ in lines}
    # Those lines are what fills the registry, in their order.
    order = [m for m, _ in lines]
    owners = [spec.build.__module__.rsplit(".", 1)[1] for spec in MODELS.values()]
    assert sorted(set(owners), key=owners.index) == order


def test_the_docs_model_registers_itself_last(doc_model: str) -> None:
    assert list(MODELS)[-1] == doc_model == "tinynet"
    spec = MODELS[doc_model]
    assert isinstance(spec, ModelSpec) and spec.description
    with pytest.raises(ValueError, match="already registered"):
        register(doc_model, spec)


def test_the_docs_model_is_built_trained_and_evaluated(doc_model: str) -> None:
    model = build_model(doc_model, num_classes=3, seed=0)
    assert model.name == f"pollen_{doc_model}"
    assert model.input_shape == (None, 32, 32, 3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    y = (np.arange(16) % 3).astype(np.int64)
    probs = np.asarray(model(x[:2].astype("float32"), training=False))
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    again = build_model(doc_model, num_classes=3, seed=0)
    for a, b in zip(model.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the seed fixes the initial weights

    client = build_client_model(doc_model, 3, 0)
    result = fit(client, x, y, epochs=1, batch_size=8, seed=0, verbose=0)
    assert np.isfinite(result.loss) and int(client.optimizer.iterations) == 2
    loss, accuracy = evaluate(client, x, y)
    assert np.isfinite(loss) and 0 <= accuracy <= 1


def test_the_run_config_and_the_cli_accept_the_docs_model(doc_model: str) -> None:
    RunConfig(model=doc_model).validate()
    args = build_parser().parse_args(["simulate", "--model", doc_model])
    assert args.model == doc_model


def test_without_the_docs_model_the_cli_refuses_it() -> None:
    module, _, _ = _doc_steps()
    assert module not in MODELS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--model", module])
