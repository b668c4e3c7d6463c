"""The pipeline's honesty after pruning: recalibration on or off, no data (skip and say so, never
guess), and data that cannot belong to the model refused in words."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine import pipeline
from engine.common.errors import ConfigError
from engine.config import RunConfig
from engine.formats.checkpoints import load_checkpoint, save_checkpoint
from engine.models.latency import RoundTimes, latency_verdict
from engine.report import REPORT_VERSION, build_report
from sample_models import SAMPLE_CHECKPOINT, use_sample_when_unset


@pytest.fixture(scope="module")
def unrecorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample's weights saved again without the data its checkpoint records."""
    sample = load_checkpoint(SAMPLE_CHECKPOINT)
    path = tmp_path_factory.mktemp("ckpt") / "digits_model.pt"
    save_checkpoint(path, sample.model, sample.arch, sample.normalization)
    return path


def sample_config(checkpoint: Path = SAMPLE_CHECKPOINT, **values: object) -> RunConfig:
    config = RunConfig()
    config.model.checkpoint = str(checkpoint)
    config.run.device = "cpu"
    config.run.stages = ["prune"]
    config.deploy.form = "grouped"
    config.prune.grouping, config.prune.selection = "random", "random"
    for key, value in values.items():
        config.set(key, value)
    return config


def test_sample_fills_in_its_own_data_and_nothing_else_does(tmp_path: Path) -> None:
    config = RunConfig()
    use_sample_when_unset(config)
    assert config.data.spec == "digits" and config.model.checkpoint == str(SAMPLE_CHECKPOINT)
    mine = RunConfig()
    mine.model.checkpoint = str(tmp_path / "model.pt")
    use_sample_when_unset(mine)
    assert mine.data.spec == "" and mine.model.snapshots == ""
    chosen = sample_config(**{"data.spec": "imagefolder:/x"})
    use_sample_when_unset(chosen)
    assert chosen.data.spec == "imagefolder:/x"


def test_a_model_trained_to_prune_is_measured_against_the_model_as_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    """Methods that train to prune hand `prune` other weights than the opened model's: the
    accuracy before pruning is still the opened model's, and the model handed in is left as it
    was. Removed filters make narrower convs, so their latency verdict is measured, not assumed."""
    config = sample_config(**{"prune.recalibrate_images": 64, "data.spec": "digits"})
    config.prune.method, config.prune.grouping, config.prune.selection = "l1-filter", None, None
    ws = pipeline.open_workspace(config)
    changed = copy.deepcopy(ws.model)
    with torch.no_grad():
        for module in changed.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(-1.0)  # a different, much worse model
    weights = {k: v.clone() for k, v in changed.state_dict().items()}
    slow = {"original": RoundTimes((1.0, 1.1, 0.9, 1.0), 0.9, 10), "pruned": RoundTimes((2.0, 2.2, 1.8, 2.0), 1.8, 10)}
    monkeypatch.setattr(pipeline, "interleaved_latency", lambda *args, **kwargs: slow)
    outcome = pipeline.prune(ws, model=changed)
    assert outcome.deploy["counts"] == {"grouped": 0, "dense": 9} and outcome.latency_verdict == "slower"
    assert outcome.accuracy is not None and outcome.accuracy.before > 0.95 > outcome.accuracy.raw + 0.3
    assert outcome.equivalence_max_abs_err < 1e-4 and outcome.accuracy.recalibrated is not None
    assert all(torch.equal(weights[k], v) for k, v in changed.state_dict().items())


def test_recalibration_off_measures_raw_accuracy_only() -> None:
    ws = pipeline.open_workspace(sample_config(**{"prune.recalibrate_images": 0, "data.spec": "digits"}))
    outcome = pipeline.prune(ws)
    assert outcome.recalibration is None and outcome.accuracy is not None
    assert outcome.accuracy.recalibrated is None and outcome.accuracy.before > 0.95
    assert "BatchNorm recalibration is off (prune.recalibrate_images = 0)" in outcome.warnings
    section = pipeline.prune_sections(outcome)["prune"]
    assert section["recalibration"] is None and section["accuracy"]["n"] == len(ws.data.val)


def test_a_workbench_checkpoint_brings_the_data_it_was_made_with() -> None:
    ws = pipeline.open_workspace(sample_config())
    assert ws.data is not None and ws.data.name == "digits" and ws.data_source == "recorded in the checkpoint"
    assert ws.config.data.spec == "digits"  # so the run's config.toml says it


def test_without_data_pruning_skips_accuracy_and_data_stages_refuse(unrecorded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = pipeline.open_workspace(sample_config(unrecorded, **{"deploy.form": "dense"}))
    assert ws.data is None and ws.normalization_source == "stored in the checkpoint"
    # A pruned model timed twice as slow in every round: with every pruned layer dense it runs the
    # original's convolutions, so the verdict is still "within noise".
    slow = {"original": RoundTimes((1.0, 1.1, 0.9, 1.0), 0.9, 10), "pruned": RoundTimes((2.0, 2.2, 1.8, 2.0), 1.8, 10)}
    monkeypatch.setattr(pipeline, "interleaved_latency", lambda *args, **kwargs: slow)
    outcome = pipeline.prune(ws)
    assert outcome.deploy["counts"] == {"grouped": 0, "dense": 18} and outcome.latency_verdict == "within noise"
    assert latency_verdict(slow["original"], slow["pruned"]) == "slower"
    assert outcome.accuracy is None and outcome.recalibration is None
    assert outcome.warnings == [pipeline.NO_DATA] and outcome.equivalence_input.startswith("random images")
    assert outcome.equivalence_max_abs_err < 1e-4
    report = build_report(ws, pipeline.prune_sections(outcome), ["prune"])
    assert report["version"] == REPORT_VERSION == 2 and report["data"] is None
    assert report["warnings"] == [pipeline.NO_DATA]
    with pytest.raises(ConfigError, match=r"fine-tuning needs data and none is set: set it \(--data, or the data field"):
        pipeline.finetune_model(ws, outcome.model, outcome.plan, None)
    with pytest.raises(ConfigError, match=r"the finetune and evaluate stages need data .* set it \(--data"):
        pipeline.open_workspace(sample_config(unrecorded, **{"run.stages": ["prune", "finetune", "evaluate"]}))


def test_data_with_other_classes_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fox"):
        folder = tmp_path / "pets" / name
        folder.mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(ConfigError, match=r"the model has 10 outputs but imagefolder:.* has 3 classes"):
        pipeline.open_workspace(sample_config(**{"data.spec": f"imagefolder:{tmp_path / 'pets'}"}))
