"""L1-norm filter pruning baseline: shapes, which filters survive, exactness against the
original with the pruned filters silenced, MAC matching, and bad input."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from engine.baselines.filter_pruning import (
    largest_l1_filters,
    match_macs,
    prune_filters,
)
from engine.common.errors import ConfigError
from engine.gkp.layers import kept_count
from engine.gkp.planner import plan_pruning
from engine.gkp.prune_config import PruneConfig
from engine.gkp.reconstruct import apply_plan
from engine.models.cifar_resnet import BasicBlock, CifarResNet
from engine.models.cifar_vgg import CifarVGG16
from engine.models.metrics import count_cost

RESNET_VARIANTS = [("layer", "A"), ("layer", "B"), ("stage", "A"), ("stage", "B")]
BLOCK_NAMES = {"layer": ("conv1", "bn1", "conv2"), "stage": ("conv_a", "bn_a", "conv_b")}


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine terms, so silencing a channel needs more than zero weights."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)


def _silence(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, kept: list[int]) -> None:
    """In place: make the filters not in `kept` output exact zeros after their BN."""
    dropped = [o for o in range(conv.out_channels) if o not in set(kept)]
    with torch.no_grad():
        conv.weight[dropped] = 0.0
        if conv.bias is not None:
            conv.bias[dropped] = 0.0
        if bn is not None:
            bn.weight[dropped] = 0.0
            bn.bias[dropped] = 0.0


@pytest.mark.parametrize("naming,shortcut", RESNET_VARIANTS)
def test_resnet_shapes_shrink_block_internal_width_only(naming: str, shortcut: str) -> None:
    model = CifarResNet(20, naming=naming, shortcut=shortcut)
    result = prune_filters(model, 0.5)
    conv_a, bn_a, conv_b = BLOCK_NAMES[naming]
    blocks = [(n, m) for n, m in result.model.named_modules() if isinstance(m, BasicBlock)]
    originals = dict(model.named_modules())
    assert len(blocks) == 9 and len(result.layers) == 9
    for name, block in blocks:
        width = originals[name].get_submodule(conv_a).out_channels
        kept = kept_count(width, 0.5)
        assert type(getattr(block, conv_a)) is nn.Conv2d and getattr(block, conv_a).out_channels == kept
        assert getattr(block, bn_a).num_features == kept
        assert getattr(block, conv_b).in_channels == kept
        assert getattr(block, conv_b).out_channels == width  # the residual width stays
    assert result.layers[0].name == f"{'layer1' if naming == 'layer' else 'stage_1'}.0.{conv_a}"
    assert result.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert count_cost(result.model, (1, 3, 32, 32)).macs < count_cost(model, (1, 3, 32, 32)).macs


def test_original_model_is_left_unchanged() -> None:
    model = CifarResNet(20)
    before = copy.deepcopy(model.state_dict())
    prune_filters(model, 0.4)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_kept_filters_are_the_largest_l1_ones() -> None:
    weight = torch.randn(8, 4, 3, 3).sign()  # every filter has L1 norm 36 ...
    scale = torch.tensor([3.0, 0.5, 7.0, 1.0, 2.0, 0.25, 5.0, 4.0])  # ... times its scale
    weight = weight * scale[:, None, None, None]
    assert largest_l1_filters(weight, 3) == [2, 6, 7]
    assert largest_l1_filters(weight, 8) == list(range(8))
    # Ties keep the lower index; the sign of a weight does not matter.
    assert largest_l1_filters(torch.tensor([[1.0], [-2.0], [2.0], [1.0]]).view(4, 1, 1, 1), 2) == [1, 2]

    model = CifarResNet(20)
    result = prune_filters(model, 0.25)
    first = result.layers[0]
    norms = model.layer1[0].conv1.weight.abs().sum(dim=(1, 2, 3))
    assert sorted(first.kept) == sorted(torch.topk(norms, 12).indices.tolist())
    assert list(first.kept) == sorted(first.kept) and first.out_channels == 16
    assert result.kept_indices()["layer1.0.conv1"] == list(first.kept)


@pytest.mark.parametrize("naming,shortcut", RESNET_VARIANTS)
def test_resnet_equals_original_with_pruned_filters_silenced(naming: str, shortcut: str) -> None:
    model = CifarResNet(20, naming=naming, shortcut=shortcut)
    _randomize_bn(model)
    model.eval()
    result = prune_filters(model, 0.4375)
    masked = copy.deepcopy(model)
    for layer in result.layers:
        block = masked.get_submodule(layer.name.rsplit(".", 1)[0])
        conv_a, bn_a, _ = BLOCK_NAMES[naming]
        _silence(getattr(block, conv_a), getattr(block, bn_a), list(layer.kept))
    x = torch.randn(4, 3, 32, 32)
    pruned_out, masked_out = result.model.eval()(x), masked(x)
    torch.testing.assert_close(pruned_out, masked_out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pruned_out, model(x), atol=1e-3)  # pruning did change the function


@pytest.mark.parametrize("batch_norm,head", [(True, "linear"), (False, "mlp")])
def test_vgg_equals_original_with_pruned_filters_silenced(batch_norm: bool, head: str) -> None:
    model = CifarVGG16(batch_norm=batch_norm, head=head)
    _randomize_bn(model)
    model.eval()
    result = prune_filters(model, 0.5)
    assert len(result.layers) == 13
    convs = [m for m in result.model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [kept_count(layer.out_channels, 0.5) for layer in result.layers]
    assert [c.in_channels for c in convs[1:]] == [c.out_channels for c in convs[:-1]]
    linear = result.model.classifier if head == "linear" else result.model.classifier[1]
    assert linear.in_features == convs[-1].out_channels == 256
    masked = copy.deepcopy(model)
    for layer in result.layers:
        index = int(layer.name.split(".")[1])
        bn = masked.features[index + 1] if batch_norm else None
        _silence(masked.features[index], bn, list(layer.kept))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(result.model.eval()(x), masked(x), rtol=1e-4, atol=1e-5)


def test_match_macs_lands_on_a_gkp_models_macs() -> None:
    model = CifarResNet(20).eval()
    shape = (1, 3, 32, 32)
    plan = plan_pruning(model, PruneConfig(grouping="random", selection="random"))
    target = count_cost(apply_plan(model, plan, form="grouped"), shape).macs
    match = match_macs(model, target, shape)
    assert match.original_macs == count_cost(model, shape).macs
    assert match.achieved_macs == count_cost(match.result.model, shape).macs
    assert match.achieved_macs == target and match.relative_error == 0  # docs/STUDY.md: "exactly the same MACs"


def test_match_macs_finds_the_closest_attainable_model() -> None:
    model = CifarResNet(8).eval()
    shape = (1, 3, 32, 32)
    # Every attainable model: a layer of C filters changes its kept count where (1-r)*C + 0.5
    # crosses a whole number, so one ratio between each pair of neighbouring breakpoints covers all.
    breaks = sorted({1 - (j - 0.5) / c for c in (16, 32, 64) for j in range(1, c + 1)} | {0.0, 1.0})
    attainable = {count_cost(prune_filters(model, (a + b) / 2).model, shape).macs for a, b in itertools.pairwise(breaks)}
    for target in (9_000_000, 6_543_210, 4_000_000):
        best = min(abs(m - target) for m in attainable)
        assert abs(match_macs(model, target, shape).achieved_macs - target) == best


def test_match_macs_at_the_ends_of_the_range() -> None:
    model = CifarResNet(8).eval()
    shape = (1, 3, 32, 32)
    original = count_cost(model, shape).macs
    above = match_macs(model, original + 1000, shape)
    assert above.result.ratio == 0.0 and above.achieved_macs == original
    below = match_macs(model, 1, shape)
    assert all(len(layer.kept) == 1 for layer in below.result.layers)
    assert below.achieved_macs < original // 2


def test_bad_input_is_one_clear_config_error() -> None:
    with pytest.raises(ConfigError, match="supports CIFAR ResNets .* not Sequential"):
        prune_filters(nn.Sequential(nn.Conv2d(3, 8, 3)), 0.5)
    with pytest.raises(ConfigError, match="supports CIFAR ResNets"):
        match_macs(nn.Linear(3, 3), 100, (1, 3))
    for ratio in (1.0, -0.1, "0.5", True):
        with pytest.raises(ConfigError, match=r"ratio must be in \[0, 1\)"):
            prune_filters(CifarResNet(8), ratio)  # type: ignore[arg-type]
    for target in (0, -5, 1.5):
        with pytest.raises(ConfigError, match="target MACs must be a positive whole number"):
            match_macs(CifarResNet(8), target, (1, 3, 32, 32))  # type: ignore[arg-type]
