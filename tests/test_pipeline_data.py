"""Opening a model before (or without) its data, and data that does not fit the model refused in
words rather than adapted silently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.common.errors import ConfigError
from engine.config import RunConfig
from engine.formats.checkpoints import save_checkpoint
from engine.models.architectures import ArchSpec
from engine.models.cifar_resnet import CifarResNet
from engine.models.normalization import Normalization
from engine.pipeline import (
    check_spec_fit,
    data_notes,
    load_fitting_data,
    open_workspace,
    with_data,
)


def resnet_checkpoint(folder: Path, *, channels: int, classes: int, normalization: bool) -> Path:
    spec = ArchSpec("cifar_resnet", "resnet20", {
        "depth": 20, "naming": "layer", "shortcut": "A", "num_classes": classes, "in_channels": channels, "width": 16,
    })
    path = folder / f"r20_{channels}_{classes}.pt"
    model = CifarResNet(20, num_classes=classes, in_channels=channels)
    if normalization:
        save_checkpoint(path, model, spec, Normalization((0.5,) * channels, (0.25,) * channels))
    else:
        torch.save(model.state_dict(), path)
    return path


def opened(path: Path, spec: str = "", **extra: object) -> object:
    config = RunConfig()
    config.model.checkpoint, config.data.spec, config.run.stages = str(path), spec, ["prune"]
    for key, value in extra.items():
        config.set(key, value)
    return open_workspace(config)


def test_a_model_opens_without_data(tmp_path: Path) -> None:
    ws = opened(resnet_checkpoint(tmp_path, channels=3, classes=10, normalization=False))
    assert ws.data is None and ws.input_shape == (1, 3, 32, 32)
    assert ws.normalization_source.startswith("unknown")
    with pytest.raises(ConfigError, match="evaluation needs data and none is set"):
        ws.require_data("evaluation")
    batch = ws.example_batch(4)
    assert batch.shape == (4, 3, 32, 32) and torch.equal(batch, ws.example_batch(4))  # seeded


def test_data_that_does_not_fit_is_refused_before_loading(tmp_path: Path) -> None:
    rgb = opened(resnet_checkpoint(tmp_path, channels=3, classes=10, normalization=True))
    with pytest.raises(ConfigError, match="digits images have 1 channel but the model takes 3"):
        load_fitting_data(rgb, "digits")
    empty = tmp_path / "not_loaded"
    empty.mkdir()
    gray = opened(resnet_checkpoint(tmp_path, channels=1, classes=10, normalization=True))
    # An empty folder would fail to load: refused on the spec alone, nothing was read.
    with pytest.raises(ConfigError, match="cifar10:.* images have 3 channels but the model takes 1"):
        check_spec_fit(gray.checkpoint, f"cifar10:{empty}")
    five = opened(resnet_checkpoint(tmp_path, channels=1, classes=5, normalization=True))
    with pytest.raises(ConfigError, match="the model has 5 outputs but digits has 10 classes"):
        load_fitting_data(five, "digits")


def test_fitting_data_loads_and_says_what_it_did(tmp_path: Path) -> None:
    ws = opened(resnet_checkpoint(tmp_path, channels=1, classes=10, normalization=False), **{"data.image_size": 16})
    data = load_fitting_data(ws, "digits")
    assert data.in_channels == 1 and data.image_size == 16
    assert data_notes("digits", data) == ["8×8 images scaled to 16×16"]
    cost = ws.cost
    with_digits = with_data(ws, data)
    assert with_digits.data is data and ws.data is None
    assert with_digits.__dict__["cost"] is cost  # not counted again (that switches the model's mode)
    assert with_digits.normalization == data.normalization  # unknown before: the data's own statistics
    assert with_digits.normalization_source == "unknown: the dataset's own statistics are used"


def test_opening_without_loading_keeps_the_data_a_checkpoint_records(tmp_path: Path) -> None:
    """A front end shows the model first: the recorded data spec is chosen, nothing is loaded."""
    path = tmp_path / "made_on_digits.pt"
    spec = ArchSpec("cifar_resnet", "resnet20", {
        "depth": 20, "naming": "layer", "shortcut": "A", "num_classes": 10, "in_channels": 1, "width": 16,
    })
    save_checkpoint(path, CifarResNet(20, in_channels=1), spec, Normalization((0.5,), (0.25,)),
                    metadata={"data": "digits"})
    config = RunConfig()
    config.model.checkpoint, config.run.stages = str(path), ["prune"]
    ws = open_workspace(config, load=False)
    assert ws.data is None and ws.config.data.spec == "digits" and ws.data_source == "recorded in the checkpoint"
    loaded = with_data(ws, load_fitting_data(ws, "digits"))
    assert loaded.data is not None and loaded.data_source == "recorded in the checkpoint"
    assert with_data(ws, loaded.data, "chosen in the app").data_source == "chosen in the app"
