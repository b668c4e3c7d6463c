"""The pruning plan: stable JSON round trip and one clear error for every malformed plan."""

from pathlib import Path

import pytest
from torch import nn

from engine.common.errors import PlanError
from engine.gkp.plan import LayerPlan, PrunePlan, SkippedLayer


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
