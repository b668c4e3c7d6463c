"""Packaging, layering and the small shared core: normalisation, atomic writes, plans, metrics."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.errors import ConfigError, PlanError
from engine.fileio import write_json_atomic, write_text_atomic
from engine.metrics import count_cost
from engine.normalization import Normalization, parse_normalization
from engine.normalize_layer import Normalize
from engine.plan import LayerPlan, PrunePlan, SkippedLayer

ENGINE = Path(__file__).resolve().parents[1] / "engine"


def test_engine_never_imports_textual_or_rich() -> None:
    modules = sorted(f"engine.{p.stem}" for p in ENGINE.glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich'))\n"
        "print(len(sys.modules)); assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(modules) >= 8



def test_workbench_starts_without_torch() -> None:
    """Importing torch takes seconds; the app, its screens and the default config must not need
    it, so the first screen draws before the open worker loads the engine."""
    code = (
        "import sys\n"
        "import workbench.app, workbench.cli, workbench.screens.jobs, workbench.screens.prune\n"
        "workbench.app.build_config(None, {'prune.method': 'tmi-gkp', 'finetune.mode': 'sam'}).to_toml()\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'torchattacks', 'scipy', 'sklearn'})\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_torchvision_ops_load() -> None:
    import torchvision.ops

    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.5, 0.5, 2.0, 2.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), iou_threshold=0.5)
    assert keep.tolist() == [0]


def test_normalization_parsing() -> None:
    assert parse_normalization("imagenet").mean == (0.485, 0.456, 0.406)
    assert parse_normalization("0.5,0.25") == Normalization((0.5,), (0.25,))
    assert parse_normalization("0.1,0.2,0.3/1,2,3").std == (1.0, 2.0, 3.0)
    assert parse_normalization("0.1,0.2,0.3,1,2,3").mean == (0.1, 0.2, 0.3)
    for bad in ("pink", "0.5", "0.5,0"):
        with pytest.raises(ConfigError):
            parse_normalization(bad)
    norm = Normalization((0.5,), (0.25,))
    assert norm.for_channels(3).mean == (0.5, 0.5, 0.5)
    assert Normalization.from_dict(norm.to_dict()) == norm
    with pytest.raises(ConfigError, match="3 channels"):
        parse_normalization("cifar10").for_channels(1)
    out = Normalize(norm)(torch.full((1, 1, 2, 2), 1.0))
    assert torch.allclose(out, torch.full_like(out, 2.0))


def test_atomic_writes_leave_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    with pytest.raises(TypeError):
        write_json_atomic(target, {"x": object()})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    write_text_atomic(target, "x")
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def _plan() -> PrunePlan:
    layer = LayerPlan("conv", 4, 3, (3, 3), [[0, 2], [1, 3]], [[0, 1], [1, 2]], "snake", "beam", 1.5)
    return PrunePlan("sr-gkp", {"rate": 0.4, "groups": 2}, [layer], [SkippedLayer("stem", "stem")])


def test_plan_round_trip(tmp_path: Path) -> None:
    plan = _plan()
    plan.save(tmp_path / "plan.json")
    again = PrunePlan.load(tmp_path / "plan.json")
    assert again.to_json() == plan.to_json()
    assert again.layer("conv").kept == 2 and again.layer("conv").achieved_ratio == pytest.approx(1 / 3)


def test_plan_rejects_bad_plans(tmp_path: Path) -> None:
    data = _plan().to_dict()
    data["layers"][0]["filter_groups"] = [[0, 1], [1, 3]]
    with pytest.raises(PlanError, match="partition"):
        PrunePlan.from_dict(data)
    data = _plan().to_dict()
    data["layers"][0]["kept_channels"] = [[0, 1], [2, 7]]
    with pytest.raises(PlanError, match="outside"):
        PrunePlan.from_dict(data)
    with pytest.raises(PlanError, match="not a pruning plan"):
        PrunePlan.from_dict([1, 2])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PlanError, match="not valid JSON"):
        PrunePlan.load(tmp_path / "bad.json")
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 5, 3))
    with pytest.raises(PlanError, match="expects weight"):
        _plan().check_fits(model)
    with pytest.raises(PlanError, match="does not exist"):
        _plan().check_fits(nn.Sequential())


def test_mac_counter_counts_grouped_convs() -> None:
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1, groups=8))
    cost = count_cost(model, (1, 16, 8, 8))
    dense, grouped = 32 * 16 * 9 * 64, 32 * 4 * 9 * 64
    assert cost.layer_macs == {"0": dense, "1": grouped}
    assert cost.macs == dense + grouped
    assert cost.params == 32 * 16 * 9 + 32 + 32 * 4 * 9 + 32
