"""Layer discovery and kept counts (SPEC §1)."""

import pytest
from torch import nn

from engine.common.errors import ConfigError
from engine.gkp.layers import discover_layers, kept_count


class OddNet(nn.Module):
    """Stem, a normal 3x3, a 1x1, a depthwise conv and a conv whose C_out does not divide by 8."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.body = nn.Conv2d(16, 16, 3)
        self.point = nn.Conv2d(16, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, groups=16)
        self.odd = nn.Conv2d(16, 10, 3)


def test_reasons_for_every_skip() -> None:
    layers = {layer.name: layer for layer in discover_layers(OddNet())}
    assert layers["body"].eligible and layers["body"].kept == 9
    assert "stem" in layers["stem"].reason
    assert "pointwise" in layers["point"].reason
    assert "depthwise" in layers["depthwise"].reason
    assert "not divisible" in layers["odd"].reason
    assert all(layer.kept is None for layer in layers.values() if not layer.eligible)


def test_options_change_eligibility() -> None:
    layers = {l.name: l for l in discover_layers(OddNet(), include_pointwise=True, skip_stem=False,
                                                 exclude=["body"], groups=2)}
    assert layers["point"].eligible and layers["stem"].eligible and layers["odd"].eligible
    assert layers["body"].reason == "excluded by config"
    assert layers["stem"].kept == 2  # round(0.5625 * 3) = 1.6875 -> 2


@pytest.mark.parametrize(("c_in", "paper", "reference"), [(16, 9, 9), (32, 18, 18), (64, 36, 36), (3, 2, 2), (10, 6, 6), (20, 11, 11), (12, 7, 7)])
def test_kept_count(c_in: int, paper: int, reference: int) -> None:
    assert kept_count(c_in, 0.4375) == paper
    assert kept_count(c_in, 0.4375, "reference") == reference


def test_kept_count_rounding_differs_under_compat() -> None:
    # Paper rounds (1-rate)*C_in half up; the reference code truncates (1-rate)*(C_in+1).
    assert (kept_count(4, 0.2), kept_count(4, 0.2, "reference")) == (3, 4)
    assert (kept_count(5, 0.7), kept_count(5, 0.7, "reference")) == (2, 1)
    assert (kept_count(7, 0.9), kept_count(7, 0.9, "reference")) == (1, 0)


def test_bad_rate_and_groups() -> None:
    with pytest.raises(ConfigError, match="rate"):
        discover_layers(OddNet(), rate=1.0)
    with pytest.raises(ConfigError, match="groups"):
        discover_layers(OddNet(), groups=0)
    with pytest.raises(ConfigError, match="compat"):
        kept_count(16, 0.5, "authors")  # type: ignore[arg-type]
