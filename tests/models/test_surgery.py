"""Filter surgery keeps what the model was: removing filters from a float64 CIFAR ResNet leaves
every new layer in float64, its BatchNorm included, so the model still runs in its own dtype."""

from __future__ import annotations

import torch

from engine.models.cifar_resnet import CifarResNet
from engine.models.surgery import remove_filters


def test_removing_filters_keeps_the_models_dtype() -> None:
    torch.manual_seed(0)
    model = CifarResNet(20).double().eval()
    remove_filters(model, {"layer1.0.conv1": [0, 2, 5, 7]})
    assert model.layer1[0].conv1.out_channels == 4 and model.layer1[0].bn1.num_features == 4
    floats = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    assert {t.dtype for t in floats} == {torch.float64}
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == (2, 10)
