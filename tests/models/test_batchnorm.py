"""BatchNorm recalibration: exact statistics, no weight change, seeded, state restored, every
deploy form, models without BatchNorm, cancel."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from engine.common.errors import Cancelled, ConfigError
from engine.gkp.plan import FilterLayer, MaskLayer, PrunePlan
from engine.gkp.planner import plan_pruning
from engine.gkp.prune_config import PruneConfig
from engine.gkp.reconstruct import apply_plan, equivalence_error, masked_dense
from engine.models.batchnorm import (
    NO_BATCHNORM,
    batchnorm_layers,
    copy_batchnorm_statistics,
    recalibrate_batchnorm,
)
from engine.models.cifar_resnet import CifarResNet
from engine.models.normalization import Normalization
from engine.models.surgery import filter_batchnorm_channels

NORM = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def images(n: int = 40, size: int = 8) -> TensorDataset:
    generator = torch.Generator().manual_seed(5)
    return TensorDataset(torch.rand(n, 3, size, size, generator=generator), torch.zeros(n, dtype=torch.long))


def conv_bn() -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(2))


def stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_one_batch_gives_the_exact_mean_and_unbiased_variance_without_touching_weights() -> None:
    model = conv_bn()
    data = images(40)
    model(torch.zeros(1, 3, 8, 8))  # materialise the lazy layer
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if k not in stats(model)}
    result = recalibrate_batchnorm(model, data, NORM, n_images=40, batch_size=64, seed=0)
    assert (result.layers, result.images, result.note) == (1, 40, "")
    x = (data.tensors[0] - torch.tensor(NORM.mean).view(1, 3, 1, 1)) / torch.tensor(NORM.std).view(1, 3, 1, 1)
    features = model[0](x)
    bn = model[1]
    assert torch.allclose(bn.running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, features.var(dim=(0, 2, 3), unbiased=True), atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    # The model's own flags and the layer's momentum are as they were.
    assert not model.training and not bn.training and bn.momentum == 0.1


def test_same_seed_same_statistics_other_seed_other_images() -> None:
    model = conv_bn()
    data = images(40)
    recalibrate_batchnorm(model, data, NORM, n_images=16, batch_size=5, seed=3)
    first = stats(model)
    model[1].running_mean.fill_(7.0)
    recalibrate_batchnorm(model, data, NORM, n_images=16, batch_size=5, seed=3)
    assert all(torch.equal(first[k], v) for k, v in stats(model).items())
    recalibrate_batchnorm(model, data, NORM, n_images=16, batch_size=5, seed=4)
    assert not torch.equal(first["1.running_mean"], model[1].running_mean)


def test_dropout_stays_off_and_training_flags_are_restored() -> None:
    model = conv_bn().train()
    model[3].p = 1.0  # would zero everything after it if it ran in train mode
    seen: list[bool] = []
    model[3].register_forward_hook(lambda module, args, out: seen.append(module.training))
    recalibrate_batchnorm(model, images(), NORM, n_images=8, batch_size=8)
    assert seen == [False]
    assert all(m.training for m in model.modules())


def test_models_without_batchnorm_are_left_alone_and_say_so() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = recalibrate_batchnorm(model, images(), NORM, n_images=8)
    assert (result.layers, result.images, result.note) == (0, 0, NO_BATCHNORM)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_grouped_dense_and_auto_forms_share_the_recalibrated_statistics() -> None:
    torch.manual_seed(0)
    model = CifarResNet(20, num_classes=10, in_channels=3).eval()
    plan = plan_pruning(model, PruneConfig(grouping="random", selection="random", groups=4))
    data = images(24, size=16)
    masked = masked_dense(model, plan)
    recalibrate_batchnorm(masked, data, NORM, n_images=24, batch_size=8, seed=1)
    x = torch.randn(4, 3, 16, 16)
    for form in ("grouped", "dense", "auto"):
        deployed = apply_plan(model, plan, form=form, example_input=x[:1])
        direct = apply_plan(model, plan, form=form, example_input=x[:1])
        assert copy_batchnorm_statistics(masked, deployed) == len(batchnorm_layers(model)) == 19
        assert equivalence_error(deployed, masked, x) < 1e-4
        # Recalibrating the form itself gives the same statistics as copying them over.
        recalibrate_batchnorm(direct, data, NORM, n_images=24, batch_size=8, seed=1)
        assert equivalence_error(direct, masked, x) < 1e-4
    assert equivalence_error(model, masked, x) > 1e-2  # the original kept its own statistics


def test_filter_pruned_and_masked_plans_share_the_recalibrated_statistics() -> None:
    """L1 filter plans narrow BatchNorm layers: the statistics of the kept channels are copied
    (and a mask plan's shared reference leaves the model untouched while it recalibrates)."""
    torch.manual_seed(0)
    model = CifarResNet(20, num_classes=10, in_channels=3).eval()
    weight = model.layer1[0].conv2.weight
    keep = torch.rand(weight.shape[:2], generator=torch.Generator().manual_seed(3)) > 0.5
    filters = [FilterLayer("layer1.1.conv1", 16, [0, 2, 5, 9]), FilterLayer("layer2.0.conv1", 32, [1, 4])]
    plan = PrunePlan("test", {}, [], masks=[MaskLayer.from_keep("layer1.0.conv2", "kernel", tuple(weight.shape), keep)],
                     filters=filters)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = copy.deepcopy(model)
    masked = masked_dense(original, plan, share_unplanned=True)
    recalibrate_batchnorm(masked, images(24, size=16), NORM, n_images=24, batch_size=8, seed=1)
    x = torch.randn(4, 3, 16, 16)
    kept = {f.name: f.kept for f in plan.filters}
    channels = filter_batchnorm_channels(model, kept)
    assert channels == {"layer1.1.bn1": [0, 2, 5, 9], "layer2.0.bn1": [1, 4]}
    for form in ("grouped", "dense"):
        deployed = apply_plan(original, plan, form=form)
        assert copy_batchnorm_statistics(masked, deployed, channels=channels) == 19
        assert equivalence_error(deployed, masked, x) < 1e-4
        assert torch.equal(deployed.layer2[0].bn1.running_mean, masked.layer2[0].bn1.running_mean[[1, 4]])
    # The mask and the silenced filters were written to the reference's own tensors only.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    weights = {k: v for k, v in before.items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(weights[k], original.state_dict()[k]) for k in weights)


def test_cancel_stops_between_batches_and_restores_momentum() -> None:
    model = conv_bn()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        recalibrate_batchnorm(model, images(), NORM, n_images=8, cancel=cancel)
    assert model[1].momentum == 0.1


@pytest.mark.parametrize("kwargs", [{"n_images": 0}, {"n_images": True}, {"batch_size": 0}])
def test_bad_settings_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        recalibrate_batchnorm(conv_bn(), images(), NORM, **kwargs)
