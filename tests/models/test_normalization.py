"""Input normalisation: parsing the user's text, per-channel expansion and the layer that applies it."""

import pytest
import torch

from engine.common.errors import ConfigError
from engine.models.normalization import Normalization, parse_normalization
from engine.models.normalize_layer import Normalize


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
