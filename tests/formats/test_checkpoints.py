"""Checkpoint loading (state-dict wrappers, whole-model pickles, bad files) and the workbench's own
format (SPEC §6)."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from engine.common.errors import ArchitectureError, CheckpointError, ConfigError
from engine.formats.checkpoints import load_checkpoint, read_state_dict, save_checkpoint
from engine.models.architectures import ArchSpec, build_model
from engine.models.normalization import PRESETS, Normalization

RESNET20 = ArchSpec("cifar_resnet", "resnet20", {
    "depth": 20, "naming": "layer", "shortcut": "A", "width": 16, "num_classes": 10, "in_channels": 3,
})


@pytest.fixture(scope="module")
def resnet20_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return build_model(RESNET20).state_dict()


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- the real public checkpoint -------------------------------------------------------------------


@pytest.mark.shared
def test_shared_checkpoint_loads(shared_checkpoint: Path) -> None:
    loaded = load_checkpoint(shared_checkpoint)
    assert loaded.arch.family == "cifar_resnet"
    assert loaded.arch.params == {
        "depth": 20, "naming": "layer", "shortcut": "A", "width": 16, "num_classes": 10, "in_channels": 3,
    }
    assert loaded.source_format == "state_dict['state_dict']"
    assert loaded.metadata["best_prec1"] == pytest.approx(91.78, abs=1e-3)
    assert loaded.normalization is None and loaded.plan is None
    assert not loaded.model.training
    assert all(not k.startswith("module.") for k in loaded.state_dict)
    with torch.no_grad():
        logits = loaded.model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


# --- state-dict wrappers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wrap", "source"),
    [
        (lambda sd: sd, "state_dict"),
        (lambda sd: {"state_dict": sd, "epoch": 3, "best_acc": torch.tensor(0.5)}, "state_dict['state_dict']"),
        (lambda sd: {"model_state_dict": sd, "epoch": 3}, "state_dict['model_state_dict']"),
        (lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, "state_dict['model']"),
        (lambda sd: {"net": {f"module.module.{k}": v for k, v in sd.items()}, "epoch": 3}, "state_dict['net']"),
    ],
)
def test_state_dict_wrappers(tmp_path: Path, resnet20_state: dict[str, torch.Tensor], wrap, source: str) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(resnet20_state), path)
    loaded = load_checkpoint(path)
    assert loaded.source_format == source
    assert loaded.arch == RESNET20
    assert_same_state(loaded.state_dict, resnet20_state)
    if source != "state_dict":
        assert loaded.metadata["epoch"] == 3
    if "best_acc" in loaded.metadata:
        assert loaded.metadata["best_acc"] == 0.5


def test_legacy_serialization_and_arch_override(tmp_path: Path, resnet20_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "old.pth"
    torch.save({"state_dict": resnet20_state}, path, _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(path, arch="resnet20", normalization=PRESETS["cifar10"])
    assert loaded.arch == RESNET20 and loaded.normalization == PRESETS["cifar10"]
    with pytest.raises(ArchitectureError, match="do not fit CIFAR ResNet-56"):
        load_checkpoint(path, arch="resnet56")


# --- bad input -------------------------------------------------------------------------------------


def _write_bad_files(tmp_path: Path, state: dict[str, torch.Tensor]) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    torch.save(state, good)
    data = good.read_bytes()
    files = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "text": b"epoch 1: loss 2.30\n",
        "json": json.dumps({"state_dict": {"conv1.weight": [1, 2]}}).encode(),
        "binary": bytes(range(1, 200)),
    }
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.pt"
        paths[name].write_bytes(content)
    paths["tensor"] = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3, 4), paths["tensor"])
    paths["no_tensors"] = tmp_path / "no_tensors.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, paths["no_tensors"])
    paths["unknown_arch"] = tmp_path / "mlp.pt"
    torch.save({"fc1.weight": torch.zeros(4, 8), "fc1.bias": torch.zeros(4)}, paths["unknown_arch"])
    return paths


@pytest.mark.parametrize(
    ("case", "error", "phrase"),
    [
        ("missing", CheckpointError, "does not exist"),
        ("directory", CheckpointError, "is a directory, not a file"),
        ("empty", CheckpointError, "is empty (0 bytes)"),
        ("truncated", CheckpointError, "is corrupt, truncated or not written by torch.save"),
        ("text", CheckpointError, "is not a PyTorch checkpoint (it is a text file)"),
        ("json", CheckpointError, "is not a PyTorch checkpoint (it is a text file)"),
        ("binary", CheckpointError, "is not a PyTorch checkpoint (it is an unrecognised binary file)"),
        ("tensor", CheckpointError, "holds a single tensor of shape (3, 4), not a model's weights"),
        ("no_tensors", CheckpointError, "holds no model weights (a dict with keys 'epoch', 'optimizer')"),
        ("unknown_arch", ArchitectureError, "share no parameter names with any supported architecture"),
    ],
)
def test_bad_files_give_one_clear_error(
    tmp_path: Path, resnet20_state: dict[str, torch.Tensor], case: str, error: type, phrase: str
) -> None:
    paths = _write_bad_files(tmp_path, resnet20_state)
    paths["missing"] = tmp_path / "nope.pt"
    paths["directory"] = tmp_path
    with pytest.raises(error) as info:
        load_checkpoint(paths[case])
    assert phrase in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), str(path))
    with pytest.raises(CheckpointError, match="is a TorchScript archive"):
        load_checkpoint(path)


# --- whole-model pickles ---------------------------------------------------------------------------

PICKLED_MODULE = '''
from pathlib import Path
import torch
from torch import nn
from engine.models.cifar_resnet import CifarResNet

Path({marker!r}).write_text("imported")


class Settings(dict):
    """Unpickled through item assignment on the stand-in."""


class History(list):
    """Unpickled through extend/append on the stand-in."""


class TicketResNet(CifarResNet):
    """A model class only this module defines, as whole-model pickles of research code have."""

    def __init__(self):
        super().__init__(20)
        self.register_buffer("scratch", torch.ones(3), persistent=False)
        self.settings = Settings(lr=0.1, groups=8)
        self.history = History([0.5, 0.7])


class Rebuilt:
    """An object pickled through its own factory: its weights only exist after running code."""

    def __reduce__(self):
        return (make_rebuilt, (16,))


def make_rebuilt(width):
    return Rebuilt()
'''


@pytest.fixture
def pickled_model_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Whole-model pickles of a class from a temporary module that stays importable (so a loader
    that imported it would write the marker) but is not imported when the test starts; yields
    (model path, factory-pickle path, marker path, original state dict, module dir, name). The
    name is unique per call, so no earlier import in this process can stand in for this one."""
    name = "ticket_model_" + uuid.uuid4().hex
    src = tmp_path / "src"
    src.mkdir()
    marker = tmp_path / "imported.marker"
    (src / f"{name}.py").write_text(textwrap.dedent(PICKLED_MODULE.format(marker=str(marker))))
    monkeypatch.syspath_prepend(str(src))
    module = importlib.import_module(name)
    assert marker.exists()  # importing the module is what writes the marker
    torch.manual_seed(2)
    model = torch.nn.DataParallel(module.TicketResNet())
    state = {k.removeprefix("module."): v.clone() for k, v in model.state_dict().items()}
    model_path, factory_path = tmp_path / "whole.pt", tmp_path / "factory.pt"
    torch.save(model, model_path)
    torch.save(module.Rebuilt(), factory_path)
    del sys.modules[name]
    marker.unlink()
    yield model_path, factory_path, marker, state, src, name
    sys.modules.pop(name, None)


def test_restricted_unpickler_recovers_tensors_without_importing(pickled_model_files) -> None:
    model_path, _, marker, state, _, name = pickled_model_files
    loaded = load_checkpoint(model_path)
    assert not marker.exists() and name not in sys.modules  # importable, yet never imported
    assert loaded.source_format == "pickled model (restricted)"
    assert loaded.arch == RESNET20
    assert "scratch" not in loaded.state_dict  # non-persistent buffers are not weights
    assert_same_state(loaded.state_dict, state)


def test_pickle_that_needs_code_asks_for_trust(pickled_model_files) -> None:
    _, factory_path, marker, _, _, name = pickled_model_files
    with pytest.raises(CheckpointError, match=f"cannot be recovered without running the code of {name}.make_rebuilt; if you trust its source, allow code from files with --trust-pickle"):
        load_checkpoint(factory_path)
    assert not marker.exists() and name not in sys.modules  # importable, yet never imported


def test_trusted_unpickle_runs_the_code(pickled_model_files, monkeypatch: pytest.MonkeyPatch) -> None:
    model_path, _, marker, state, src, name = pickled_model_files
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(src)])
    with pytest.raises(CheckpointError, match=f"could not be unpickled even with trust: No module named '{name}'"):
        load_checkpoint(model_path, trust_pickle=True)
    monkeypatch.syspath_prepend(str(src))
    loaded = load_checkpoint(model_path, trust_pickle=True)
    assert marker.exists()  # the full unpickle imported the module
    assert loaded.source_format == "pickled model (trusted)"
    assert_same_state(loaded.state_dict, state)


def test_read_state_dict_reports_wrapper_and_metadata(tmp_path: Path, resnet20_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "w.pt"
    torch.save({"model_state_dict": resnet20_state, "epoch": 7, "note": "x", "history": [1, 2]}, path)
    found = read_state_dict(path)
    assert found.source_format == "state_dict['model_state_dict']"
    assert found.metadata == {"epoch": 7, "note": "x"}


# --- the workbench format --------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    spec = ArchSpec("cifar_resnet", "resnet20", {
        "depth": 20, "naming": "stage", "shortcut": "B", "width": 16, "num_classes": 100, "in_channels": 1,
    })
    torch.manual_seed(3)
    model = build_model(spec)
    with torch.no_grad():  # non-trivial BN statistics, so a lost buffer would show in the outputs
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    model.eval()
    norm = Normalization((0.5,), (0.25,))
    path = tmp_path / "out" / "model.pt"
    save_checkpoint(path, model, spec, norm, metadata={"epoch": 12, "acc": {"clean": 0.9}, "tags": ["a"]})
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temporary left behind
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "gkp-workbench" and raw["version"] == 1 and raw["plan"] is None
    loaded = load_checkpoint(path)
    assert loaded.source_format == "gkp-workbench v1"
    assert loaded.arch == spec and loaded.normalization == norm
    assert loaded.metadata == {"epoch": 12, "acc": {"clean": 0.9}, "tags": ["a"]}
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    override = PRESETS["imagenet"]
    assert load_checkpoint(path, normalization=override).normalization == override


def test_save_rejects_unreadable_metadata_and_missing_normalization(tmp_path: Path) -> None:
    model = build_model(RESNET20)
    with pytest.raises(ConfigError, match="metadata\\['when'\\] is of type object"):
        save_checkpoint(tmp_path / "a.pt", model, RESNET20, PRESETS["cifar10"], metadata={"when": object()})
    with pytest.raises(ConfigError, match="must record the model's input normalisation"):
        save_checkpoint(tmp_path / "b.pt", model, RESNET20, None)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_workbench_checkpoint_version_and_damage(tmp_path: Path, resnet20_state: dict[str, torch.Tensor]) -> None:
    base = {"format": "gkp-workbench", "arch": RESNET20.to_dict(), "normalization": PRESETS["cifar10"].to_dict(),
            "state_dict": resnet20_state, "plan": None, "metadata": {}}
    newer = tmp_path / "newer.pt"
    torch.save({**base, "version": 2}, newer)
    with pytest.raises(CheckpointError, match="format version 2; this version reads 1"):
        load_checkpoint(newer)
    damaged = tmp_path / "damaged.pt"
    torch.save({**base, "version": 1, "arch": {"family": "lenet"}}, damaged)
    with pytest.raises(CheckpointError, match="damaged gkp-workbench checkpoint: arch.family must be one of"):
        load_checkpoint(damaged)
