"""``pollen simulate`` on a CSV manifest at an image size of its own, end to end."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
from conftest import make_image_folder, pollen_cmd

pytestmark = pytest.mark.e2e


def test_simulation_on_a_manifest_at_another_image_size(tmp_path, pollen_env):
    data = make_image_folder(tmp_path / "data")
    rows = [[p.relative_to(data).as_posix(), p.parent.name, p.parent.parent.name]
            for p in sorted(data.glob("*/*/*.png"))]  # fmt: skip
    manifest = data / "labels.csv"  # the paths stay inside the CSV's folder
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "split"], *rows])
    run = tmp_path / "run"
    proc = subprocess.run(
        pollen_cmd("simulate", "--clients", "2", "--rounds", "1", "--model", "cnn",
                   "--num-classes", "3", "--data-dir", str(manifest), "--image-size",
                   "40x48", "--out", str(run), "--bn-calibration-examples", "32"),
        env=pollen_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "pollen: image size 40x48 (--image-size)" in out
    assert "72 train / 24 test images of 40x48x3, 3 classes" in out
    history = json.loads((run / "history.json").read_text())
    assert history["rounds"][-1]["server"]["accuracy"] > 0
    import keras

    model = keras.saving.load_model(Path(run) / "model.keras", compile=False)
    assert model.input_shape == (None, 40, 48, 3)
