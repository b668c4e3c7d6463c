"""Listing a checkpoint's tensors and a snapshot folder's epochs without torch: the same names and
shapes the full loader finds, in every storage form, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.common.errors import CheckpointError, SnapshotError
from engine.formats.checkpoints import load_checkpoint, read_state_dict, save_checkpoint
from engine.formats.listing import index_checkpoint, snapshot_epochs
from engine.gkp.planner import plan_pruning
from engine.gkp.prune_config import PruneConfig
from engine.gkp.reconstruct import apply_plan
from engine.models.architectures import ArchSpec
from engine.models.cifar_resnet import CifarResNet
from engine.models.normalization import Normalization
from sample_models import SAMPLE_CHECKPOINT, SAMPLE_SNAPSHOTS
from workbench.model_view import listed_rows

REPO = Path(__file__).resolve().parents[2]


class PickledNet(nn.Module):
    """A model class the listing never imports (it reads the pickle with stand-ins)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1, bias=False))
        self.head = nn.Linear(4, 2)


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("form", ["state_dict", "wrapped_dataparallel", "legacy", "whole_model"])
def test_lists_what_the_loader_finds(tmp_path: Path, form: str) -> None:
    model = PickledNet()
    state = model.state_dict()
    path = tmp_path / f"{form}.pt"
    if form == "state_dict":
        torch.save(state, path)
    elif form == "wrapped_dataparallel":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif form == "legacy":
        torch.save({"model": state}, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(model, path)
    index = index_checkpoint(path)
    assert index.shapes == shapes(read_state_dict(path).state_dict)
    convs = {c.name: c for c in index.convs()}
    assert list(convs) == ["features.0", "features.2"]
    assert convs["features.0"].shape == (8, 3, 3, 3) and convs["features.0"].params == 8 * 27 + 8
    assert convs["features.2"].params == 4 * 8  # no bias


def test_lists_a_pruned_workbench_checkpoint_with_its_plan(tmp_path: Path) -> None:
    spec = ArchSpec("cifar_resnet", "resnet20", {
        "depth": 20, "naming": "layer", "shortcut": "A", "num_classes": 10, "in_channels": 3, "width": 16,
    })
    model = CifarResNet(20)
    plan = plan_pruning(model, PruneConfig(groups=4))
    path = tmp_path / "wb.pt"
    save_checkpoint(path, apply_plan(model, plan), spec, Normalization((0.5,) * 3, (0.2,) * 3), plan=plan)
    index = index_checkpoint(path)
    assert index.arch == spec.to_dict() and index.plan == plan.to_dict()
    assert index.shapes == shapes(load_checkpoint(path).state_dict)
    rows = {row.name: row for row in listed_rows(index)}
    layer = plan.layers[-1]
    assert len(rows) == 19 and rows[layer.name].in_channels == layer.in_channels  # dense C_in, not kept
    assert rows[layer.name].params == layer.out_channels * layer.kept * 9


def test_listing_needs_no_torch() -> None:
    code = (
        "import sys\n"
        "from engine.formats.listing import index_checkpoint, snapshot_epochs\n"
        f"print(len(index_checkpoint({str(SAMPLE_CHECKPOINT)!r}).convs()))\n"
        f"print(len(snapshot_epochs({str(SAMPLE_SNAPSHOTS)!r}, None, 1)))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    if not SAMPLE_CHECKPOINT.is_file():
        pytest.skip("the bundled sample model is not built yet")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["19", "36"]


def test_bad_files_are_named_in_words(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model", encoding="utf-8")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    cases = {tmp_path / "missing.pt": "does not exist", tmp_path: "is a directory",
             tmp_path / "notes.txt": "text file", tmp_path / "empty.pt": "empty",
             tmp_path / "tensor.pt": "no model weights"}
    for path, words in cases.items():
        with pytest.raises(CheckpointError, match=words):
            index_checkpoint(path)


def test_snapshot_epochs_of_a_folder(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="does not exist"):
        snapshot_epochs(tmp_path / "nope", None, 1)
    with pytest.raises(SnapshotError, match="no snapshot files"):
        snapshot_epochs(tmp_path, None, 1)
    for epoch in (3, 4, 6):
        (tmp_path / f"epoch_{epoch}.pt").write_bytes(b"x")
    assert snapshot_epochs(tmp_path, (3, 4), 1) == [3, 4]
    with pytest.raises(SnapshotError, match=r"missing epochs 5 in ticket window 3..6 \(found 3..4, 6\)"):
        snapshot_epochs(tmp_path, (3, 6), 1)
