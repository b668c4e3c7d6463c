"""In-train pruning's parts without training: the straight-through gradient against finite
differences, the hardware loss's hinge, the channel-reader map, freezing (equal counts per group,
completion to the target) and the plan the masks become, reconstructed like GKP's."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from engine.gkp.plan import PrunePlan
from engine.gkp.prune_config import PruneConfig
from engine.gkp.reconstruct import (
    apply_plan,
    equivalence_error,
    install_plan_structure,
    masked_dense,
)
from engine.itp.complexity import Complexity, direct_readers, hw_loss, layer_costs
from engine.itp.freeze import freeze_masks
from engine.itp.itp_config import ItpConfig
from engine.itp.masks import (
    MaskedConv,
    binarize,
    install_masks,
    normalized,
    remove_masks,
)
from engine.itp.to_plan import masks_to_plan
from engine.itp.trainer import itp_setup
from engine.models.cifar_resnet import CifarResNet
from engine.models.metrics import count_cost

SHAPE = (1, 3, 32, 32)


def test_straight_through_gradient_matches_finite_differences() -> None:
    """dL/dM through the STE = dL/dW̃·W at the binary mask, times dM_norm/dM: checked entry by
    entry against central differences of both factors, for masks on and off."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    layer = MaskedConv(conv, "kernel")
    with torch.no_grad():
        layer.mask.copy_(torch.randn(4, 3, dtype=torch.float64) * 1.5)
        layer.refresh()
    layer.learning = True
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    target = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    ((layer(x) - target) ** 2).sum().backward()
    analytic = layer.mask.grad.clone()
    assert bool((layer.binary == 0).any()) and bool((layer.binary == 1).any())

    def loss_at(mask_values: torch.Tensor) -> float:
        weight = conv.weight.detach() * mask_values[:, :, None, None]
        return float(((nn.functional.conv2d(x, weight, conv.bias.detach(), padding=1) - target) ** 2).sum())

    h = 1e-6
    binary = layer.binary.detach().double()
    for o in range(4):
        for c in range(3):
            step = torch.zeros_like(binary)
            step[o, c] = h
            d_loss = (loss_at(binary + step) - loss_at(binary - step)) / (2 * h)
            m = layer.mask.detach()[o, c]
            d_norm = float((normalized(m + h) - normalized(m - h)) / (2 * h))
            assert float(analytic[o, c]) == pytest.approx(d_loss * d_norm, rel=1e-5, abs=1e-9)
    assert float(analytic.abs().min()) > 0  # every entry, on or off, gets a gradient
    # ITP Eq. 2: M_norm = 0.5·tanh(M) + 0.5 and M_b = round(M_norm); M = 1 starts on, M = 0 is off.
    assert float(normalized(torch.tensor(1.0))) == pytest.approx(0.5 * math.tanh(1.0) + 0.5)
    assert binarize(torch.tensor([1.0, 0.0, -0.1])).tolist() == [1.0, 0.0, 0.0]


def _two_layer_complexity(shares: tuple[float, float]) -> tuple[Complexity, dict[str, MaskedConv]]:
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
    layers = install_masks(model, ["0", "1"], "kernel")
    for (name, layer), share in zip(layers.items(), shares):
        off = round((1 - share) * layer.mask.numel())
        with torch.no_grad():
            layer.mask.view(-1)[:off] = -1.0
        layer.refresh()
        layer.learning = True
    costs = {name: c for name, c in layer_costs(model, ["0", "1"], (1, 4, 8, 8), "kernel").items()}
    return Complexity(layers, costs, "params"), layers


def test_hardware_loss_is_zero_exactly_when_the_target_is_met() -> None:
    complexity, layers = _two_layer_complexity((0.5, 0.5))
    masks = [layer.mask for layer in layers.values()]
    at_target = hw_loss(complexity.relative(differentiable=True), 0.5)
    assert float(at_target.detach()) == 0.0
    assert all(float(g.abs().sum()) == 0 for g in torch.autograd.grad(at_target, masks, allow_unused=False))
    below = hw_loss(complexity.relative(differentiable=True), 0.6)
    assert float(below.detach()) == 0.0
    above = hw_loss(complexity.relative(differentiable=True), 0.4)
    assert float(above.detach()) == pytest.approx(0.1)
    grads = torch.autograd.grad(above, masks)
    assert all(bool((g > 0).all()) for g in grads)  # descending it turns masks off
    # Per SPEC §8: cost_l / (Σψ^0 · ‖M_base‖) · dM_norm/dM per entry; equal layers, equal costs.
    expected = 0.5 / 16 * 0.5 * (1 - torch.tanh(layers["0"].mask.detach()) ** 2)
    torch.testing.assert_close(grads[0], expected)


def test_channel_masks_find_the_conv_reading_a_block_conv() -> None:
    model = CifarResNet(20)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][1:]
    readers = direct_readers(model, names)
    assert readers["layer1.0.conv1"] == "layer1.0.conv2"  # through bn1 and relu
    assert "layer1.0.conv2" not in readers  # its output joins the residual add
    assert len(readers) == 9


def _resnet_with_learned_masks(granularity: str, seed: int) -> tuple[nn.Module, dict[str, MaskedConv], object]:
    torch.manual_seed(seed)
    model = CifarResNet(20).eval()
    prune, itp = PruneConfig(rate=0.4375), ItpConfig(granularity=granularity)
    setup = itp_setup(model, prune, itp, SHAPE)
    work = copy.deepcopy(model)
    layers = install_masks(work, setup.names, granularity, setup.filter_groups or None)
    generator = torch.Generator().manual_seed(seed)
    for layer in layers.values():
        with torch.no_grad():
            layer.mask.copy_(torch.randn(layer.mask.shape, generator=generator) + 0.3)
        layer.refresh()
    return work, layers, setup


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_kernel_masks_freeze_to_equal_counts_and_reconstruct_exactly(seed: int) -> None:
    work, layers, setup = _resnet_with_learned_masks("grouped-kernel", seed)
    complexity = Complexity(layers, setup.costs, "macs")
    result = freeze_masks(layers, complexity, setup.target, setup.fixed_cost("macs"), 0.02)
    for layer in layers.values():
        counts = layer.binary.sum(dim=1)
        assert bool((counts == counts[0]).all()) and int(counts[0]) >= 1
    assert result.target_met and abs(result.relative_error) <= 0.02
    plan, done = masks_to_plan(layers, setup.filter_groups, setup.grouping, {"granularity": "grouped-kernel"},
                               setup.skipped, None)
    assert len(plan.layers) == len(done) == 18 and not plan.masks
    remove_masks(work)
    grouped = apply_plan(work, plan, form="grouped")
    x = torch.randn(4, *SHAPE[1:])
    assert equivalence_error(grouped, masked_dense(work, plan), x) <= 1e-5
    macs = count_cost(grouped, SHAPE).macs
    target = setup.whole_macs - sum(c.macs for c in setup.costs.values()) * (1 - setup.target)
    assert abs(macs - target) / target <= 0.02
    # The masked training model computes what the plan deploys.
    for layer in layers.values():
        layer.learning = False


@pytest.mark.parametrize("granularity", ["kernel", "weight", "channel"])
def test_other_granularities_become_plans_that_reopen(granularity: str) -> None:
    work, layers, setup = _resnet_with_learned_masks(granularity, 3)
    complexity = Complexity(layers, setup.costs, "macs")
    freeze_masks(layers, complexity, setup.target, setup.fixed_cost("macs"), 0.02)
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        masked_training_output = work.eval()(x)
    plan, _ = masks_to_plan(layers, setup.filter_groups, setup.grouping, {"granularity": granularity},
                            setup.skipped, None)
    remove_masks(work)
    again = PrunePlan.from_dict(plan.to_dict())
    assert again.to_json() == plan.to_json()
    assert (again.version == 2) == (granularity != "channel")
    deployed = apply_plan(work, again, form="grouped")
    assert equivalence_error(deployed, masked_dense(work, again), x) <= 1e-5
    with torch.no_grad():
        torch.testing.assert_close(deployed.eval()(x), masked_training_output, rtol=1e-4, atol=1e-5)
    skeleton = CifarResNet(20)
    install_plan_structure(skeleton, again)
    skeleton.load_state_dict(deployed.state_dict(), strict=True)
    assert equivalence_error(skeleton, deployed, x) == 0.0


def test_completion_turns_masks_on_when_learning_overshot() -> None:
    work, layers, setup = _resnet_with_learned_masks("kernel", 4)
    for layer in layers.values():
        with torch.no_grad():
            layer.mask.sub_(3.0)  # nearly everything off: far below the target
        layer.refresh()
    complexity = Complexity(layers, setup.costs, "macs")
    result = freeze_masks(layers, complexity, setup.target, setup.fixed_cost("macs"), 0.02)
    assert result.learned < 0.2 and result.completed_on > 0 and result.completed_off == 0
    assert result.target_met and result.achieved >= setup.target - 1e-9


def test_an_unreachable_target_is_reported_not_forced() -> None:
    """Grouped-kernel masks keep at least one kernel per group, so rate 0.99 (ψ* = 0.01) cannot be
    met: the freeze stops at the floor, says so, and the run warns instead of failing."""
    from engine import pipeline

    work, layers, setup = _resnet_with_learned_masks("grouped-kernel", 5)
    complexity = Complexity(layers, setup.costs, "macs")
    result = freeze_masks(layers, complexity, 0.01, setup.fixed_cost("macs"), 0.02)
    assert not result.target_met and result.relative_error > 0.02
    assert all(int(layer.binary[0].sum()) == 1 for layer in layers.values())  # S = 1 everywhere
    section = {"target_met": False, "achieved_complexity": result.achieved, "target_complexity": 0.01,
               "relative_error": result.relative_error}
    (warning,) = pipeline.itp_warnings(section)  # the report's prune.warnings; the batch summary prints it
    assert warning.startswith("in-train pruning reached complexity") and "the model is kept" in warning
    assert pipeline.itp_warnings({**section, "target_met": True}) == []
