"""The run's image size: ``image-size`` in the run config, ``--image-size``, the auto rule."""

from __future__ import annotations

import argparse

import pytest
from PIL import Image

from pollen.cli.options import image_size_text
from pollen.config import RunConfig, auto_image_size, parse_image_size
from pollen.errors import PollenError


def _folder(root, side: int = 200):
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        Image.new("RGB", (side, side)).save(root / split / "cat" / "x.png")
    return root


@pytest.mark.parametrize(
    ("text", "size"),
    [("auto", None), ("", None), ("96", (96, 96)), ("96x128", (96, 128)), (" 64X32 ", (64, 32))],
)
def test_parse_image_size(text: str, size) -> None:
    assert parse_image_size(text) == size
    # The option gives the run config's own form, so --resume compares like with like.
    assert image_size_text(text) == ("auto" if size is None else f"{size[0]}x{size[1]}")


@pytest.mark.parametrize(
    ("text", "phrase"),
    [("big", "write N"), ("96x", "write N"), ("-5", "write N"), ("16", "between 32 and 1024"),
     ("32x2048", "between 32 and 1024")],
)  # fmt: skip
def test_bad_image_sizes_are_refused_by_config_and_option(text: str, phrase: str) -> None:
    with pytest.raises(PollenError, match=phrase):
        RunConfig(image_size=text)
    with pytest.raises(PollenError, match=phrase):
        RunConfig.from_mapping({"image-size": text})
    with pytest.raises(argparse.ArgumentTypeError, match=phrase):
        image_size_text(text)


def test_auto_is_32_on_cifar10_and_the_models_size_on_images_of_your_own(tmp_path) -> None:
    folder = str(_folder(tmp_path / "images"))
    assert RunConfig().image_size == "32x32" and RunConfig().image_hw == (32, 32)
    assert RunConfig(data_dir=folder).image_hw == (96, 96)  # mobilenetv2's own size
    assert RunConfig(model="fastnet", data_dir=folder).image_hw == (32, 32)
    assert RunConfig(server_data_dir=folder).image_hw == (96, 96)  # pollen server --test-data
    assert auto_image_size("cnn", folder) == (32, 32)
    assert auto_image_size("mobilenetv2", "") == (32, 32)
    # Given sizes win; a TOML integer works; the mapping carries the resolved value.
    assert RunConfig(data_dir=folder, image_size="48x64").image_hw == (48, 64)
    cfg = RunConfig.from_mapping({"image-size": 128, "data-dir": folder})
    assert cfg.image_hw == (128, 128) and cfg.to_mapping()["image-size"] == "128x128"
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
    assert RunConfig.declared_defaults()["image-size"] == "auto"
    # Thumbnails are not upsampled to the model's size: 4x4 images stay at the minimum, 32.
    small = str(_folder(tmp_path / "small", side=4))
    assert RunConfig(data_dir=small).image_hw == (32, 32)


def test_image_size_reaches_the_run_config_from_the_command_line(tmp_path) -> None:
    from pollen.cli.app import build_parser
    from pollen.cli.options import run_config_from_args
    from pollen.cli.runs import image_size_line

    folder = str(_folder(tmp_path / "images"))
    parser = build_parser()
    out = ["--out", str(tmp_path / "run")]
    args = parser.parse_args(["server", "--image-size", "64x48", *out])
    cfg = run_config_from_args(args)
    assert cfg.image_hw == (64, 48)
    assert image_size_line(cfg, args.image_size, server=True) == (
        "pollen: image size 64x48 (--image-size): images are resized to it, the model is "
        "built for it"
    )
    args = parser.parse_args(["server", *out])
    line = image_size_line(run_config_from_args(args), args.image_size, server=True)
    assert "32x32 (auto: CIFAR-10's size" in line and "images of their own" in line
    args = parser.parse_args(["simulate", "--data-dir", folder, *out])
    cfg = run_config_from_args(args, data_dir=folder)
    assert cfg.image_hw == (96, 96)
    assert "96x96 (auto: mobilenetv2's size for images of your own" in image_size_line(
        cfg, args.image_size
    )
    small = str(_folder(tmp_path / "small", side=48))
    args = parser.parse_args(["simulate", "--data-dir", small, *out])
    cfg = run_config_from_args(args, data_dir=small)
    assert cfg.image_hw == (48, 48)
    assert "48x48 (auto: your images are 48x48, smaller than mobilenetv2's 96" in (
        image_size_line(cfg, args.image_size)
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "--image-size", "12"])
