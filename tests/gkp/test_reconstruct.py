"""Reconstruction into dense grouped convolutions (SPEC §5): exactness against the zero-masked
dense model on every supported architecture, deployment forms, and pruned-model save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from engine.common.errors import ConfigError, PlanError
from engine.gkp.layers import discover_layers
from engine.gkp.plan import LayerPlan, PrunePlan, SkippedLayer
from engine.gkp.reconstruct import (
    AUTO_MARGIN,
    GUARD_ROUNDS,
    GroupedKernelConv,
    apply_plan,
    dense_equivalent,
    deploy_summary,
    equivalence_error,
    install_plan_structure,
    masked_dense,
)
from engine.models.cifar_resnet import CifarResNet
from engine.models.cifar_vgg import CifarVGG16
from engine.models.metrics import count_cost
from engine.models.normalization import PRESETS
from engine.models.normalize_layer import with_normalization


def random_plan(model: nn.Module, *, groups: int = 8, rate: float = 0.4375, seed: int = 0,
                include_pointwise: bool = False) -> PrunePlan:
    """A valid plan with seeded random equal-size filter groups and random kept channels."""
    rng = np.random.default_rng(seed)
    layers, skipped = [], []
    for conv in discover_layers(model, groups=groups, rate=rate, include_pointwise=include_pointwise):
        if not conv.eligible:
            skipped.append(SkippedLayer(conv.name, conv.reason or ""))
            continue
        filters = rng.permutation(conv.out_channels).reshape(groups, -1)
        layers.append(LayerPlan(
            name=conv.name, out_channels=conv.out_channels, in_channels=conv.in_channels,
            kernel_size=conv.kernel_size,
            filter_groups=[sorted(int(i) for i in group) for group in filters],
            kept_channels=[sorted(int(i) for i in rng.choice(conv.in_channels, conv.kept, replace=False))
                           for _ in range(groups)],
            grouping="random", selection="random",
        ))
    return PrunePlan("random", {"seed": seed}, layers, skipped)


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm distinct per-channel statistics, so a channel mix-up shows."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            with torch.no_grad():
                module.weight.copy_(0.5 + torch.rand(c, generator=gen))
                module.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return model.eval()


class OddNet(nn.Module):
    """A small custom CNN: stem, a strided 3x3 with bias, a dilated and a reflect-padded 3x3 in
    a nested Sequential, a 1x1, a depthwise conv and a C_out=10 conv that must be skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(32)
        self.block = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=2, dilation=2, bias=False),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"),
        )
        self.point = nn.Conv2d(32, 16, 1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.odd = nn.Conv2d(16, 10, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.down(torch.relu(self.stem(x)))))
        x = self.block(x) + x
        x = self.odd(self.depthwise(self.point(x)))
        return x.mean(dim=(2, 3))


def _resnet50() -> nn.Module:
    return torchvision.models.resnet50(num_classes=10)


MODELS = {
    "resnet20-layer": (lambda: CifarResNet(20, naming="layer"), (2, 3, 32, 32)),
    "resnet20-stage": (lambda: CifarResNet(20, naming="stage"), (2, 3, 32, 32)),
    "resnet20-optionB": (lambda: CifarResNet(20, shortcut="B"), (2, 3, 32, 32)),
    "vgg16-cifar": (lambda: CifarVGG16(), (2, 3, 32, 32)),
    "resnet50-tv": (_resnet50, (1, 3, 64, 64)),
    "oddnet": (OddNet, (2, 3, 16, 16)),
}


def _close(a: nn.Module, b: nn.Module, x: torch.Tensor, tol: float = 1e-5) -> float:
    """Max abs error, asserted within `tol` of the output scale (at least 1)."""
    error = equivalence_error(a, b, x)
    with torch.inference_mode():
        scale = max(1.0, float(b.eval()(x).abs().max()))
    assert error <= tol * scale, (error, scale)
    return error


@pytest.mark.parametrize("key", list(MODELS))
def test_grouped_matches_masked_dense(key: str) -> None:
    factory, shape = MODELS[key]
    model = randomize_bn(factory())
    plan = random_plan(model)
    x = torch.randn(shape)
    grouped = apply_plan(model, plan, form="grouped")
    reference = masked_dense(model, plan)
    _close(grouped, reference, x)
    swapped = [n for n, m in grouped.named_modules() if isinstance(m, GroupedKernelConv)]
    assert swapped == [layer.name for layer in plan.layers] and swapped
    # The masked reference really differs from the unpruned model: pruning removed something.
    assert equivalence_error(model, reference, x) > 1e-3


def test_masked_dense_can_share_what_it_does_not_mask() -> None:
    factory, shape = MODELS["resnet20-layer"]
    model = randomize_bn(factory())
    plan = random_plan(model)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    shared = masked_dense(model, plan, share_unplanned=True)
    x = torch.randn(shape)
    assert equivalence_error(shared, masked_dense(model, plan), x) == 0.0
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())  # the model is untouched
    planned = {f"{layer.name}.weight" for layer in plan.layers}
    ours, theirs = dict(model.named_parameters()), dict(shared.named_parameters())
    assert {name for name in ours if ours[name] is theirs[name]} == set(ours) - planned


def test_odd_layers_are_skipped_with_reasons_and_pointwise_can_be_included() -> None:
    model = randomize_bn(OddNet())
    plan = random_plan(model)
    assert [layer.name for layer in plan.layers] == ["down", "block.0", "block.2"]
    reasons = {s.name: s.reason for s in plan.skipped}
    assert set(reasons) == {"stem", "point", "depthwise", "odd"}
    with_point = random_plan(model, include_pointwise=True)
    assert "point" in [layer.name for layer in with_point.layers]
    x = torch.randn(2, 3, 16, 16)
    _close(apply_plan(model, with_point), masked_dense(model, with_point), x)
    assert isinstance(apply_plan(model, with_point).point, GroupedKernelConv)


def test_outputs_return_in_original_channel_order() -> None:
    conv = nn.Conv2d(32, 64, 3, padding=1, bias=True)
    plan = random_plan(nn.Sequential(nn.Conv2d(3, 32, 1), conv))
    layer = plan.layers[0]
    grouped = GroupedKernelConv.from_conv(conv, layer)
    assert not torch.equal(grouped.output_order, torch.arange(64))  # a real permutation
    reference = masked_dense(nn.Sequential(nn.Conv2d(3, 32, 1), conv), plan)[1]
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        got, want = grouped(x), reference(x)
    assert got.shape == want.shape == (2, 64, 8, 8)
    assert torch.allclose(got, want, atol=1e-5)
    # Each output channel o is driven by exactly the kept inputs of o's group.
    group_of = {o: g for g, filters in enumerate(layer.filter_groups) for o in filters}
    probe = torch.zeros(1, 32, 8, 8)
    dropped = sorted(set(range(32)) - set(layer.kept_channels[group_of[5]]))[0]
    probe[:, dropped] = 1.0
    with torch.no_grad():
        assert torch.equal(grouped(probe)[0, 5], conv.bias[5].expand(8, 8))


def test_everything_but_planned_convs_is_untouched() -> None:
    model = randomize_bn(CifarResNet(20))
    plan = random_plan(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grouped = apply_plan(model, plan)
    planned = {layer.name for layer in plan.layers}
    after = grouped.state_dict()
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)  # input model unchanged
        if key.rsplit(".", 1)[0] not in planned:
            assert torch.equal(after[key], value), key
    assert all(isinstance(model.get_submodule(n), nn.Conv2d) and model.get_submodule(n).groups == 1 for n in planned)


def test_dense_form_equals_masked_exactly() -> None:
    model = randomize_bn(OddNet())
    plan = random_plan(model, seed=3, include_pointwise=True)
    dense, masked = apply_plan(model, plan, form="dense"), masked_dense(model, plan)
    assert not any(isinstance(m, GroupedKernelConv) for m in dense.modules())
    for key, value in masked.state_dict().items():
        assert torch.equal(dense.state_dict()[key], value), key
    summary = deploy_summary(dense)
    assert summary["form"] == "dense" and summary["counts"] == {"grouped": 0, "dense": len(plan.layers)}
    assert list(summary["layers"]) == [layer.name for layer in plan.layers]
    assert {record["form"] for record in summary["layers"].values()} == {"dense"}
    assert deploy_summary(apply_plan(model, plan))["form"] == "grouped"


def test_to_dense_conv_round_trips() -> None:
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=True)
    layer = random_plan(nn.Sequential(nn.Conv2d(3, 16, 1), conv), seed=5).layers[0]
    grouped = GroupedKernelConv.from_conv(conv, layer)
    dense = grouped.to_dense_conv()
    assert dense.stride == (2, 2) and dense.padding == (1, 1) and dense.weight.shape == conv.weight.shape
    again = GroupedKernelConv.from_conv(dense, layer)
    assert torch.equal(again.weight, grouped.weight) and torch.equal(again.bias, grouped.bias)
    assert int((dense.weight.abs().sum(dim=(2, 3)) != 0).sum()) == 32 * layer.kept


def test_state_dict_round_trip_through_install_plan_structure(tmp_path) -> None:
    model = randomize_bn(CifarResNet(20, naming="stage"))
    plan = random_plan(model, seed=7)
    grouped = apply_plan(model, plan)
    path = tmp_path / "pruned.pt"
    torch.save(grouped.state_dict(), path)
    fresh = CifarResNet(20, naming="stage")
    rng_state = torch.random.get_rng_state()
    install_plan_structure(fresh, PrunePlan.from_dict(plan.to_dict()))
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # building structure draws no randomness
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert equivalence_error(fresh, grouped, x) == 0.0
    summary = deploy_summary(fresh)
    assert summary["form"] == "grouped" and summary["counts"]["grouped"] == len(plan.layers)
    assert set(summary["layers"]) == {layer.name for layer in plan.layers}
    assert deploy_summary(CifarResNet(20)) == {"form": None, "counts": {"grouped": 0, "dense": 0}, "layers": {}}


def test_plan_that_does_not_fit_raises_plan_error() -> None:
    plan = random_plan(CifarResNet(20, naming="layer"))
    with pytest.raises(PlanError, match="does not exist"):
        apply_plan(CifarResNet(20, naming="stage"), plan)
    with pytest.raises(PlanError, match="expects weight"):
        apply_plan(CifarResNet(20, width=32), plan)
    with pytest.raises(PlanError, match="does not exist"):
        install_plan_structure(CifarResNet(20, naming="stage"), plan)
    already = apply_plan(CifarResNet(20), plan)
    with pytest.raises(PlanError, match="not a dense Conv2d"):
        masked_dense(already, plan)
    layer = plan.layers[0]
    with pytest.raises(PlanError, match="expects weight"):
        GroupedKernelConv.from_conv(nn.Conv2d(16, 16, 5), layer)
    broken = LayerPlan(**{**layer.to_dict(), "kernel_size": layer.kernel_size,
                          "filter_groups": [g[:-1] for g in layer.filter_groups]})
    with pytest.raises(PlanError, match="partition"):
        GroupedKernelConv.from_conv(CifarResNet(20).get_submodule(layer.name), broken)


def test_bad_form_or_missing_example_is_a_config_error() -> None:
    model = CifarResNet(20)
    plan = random_plan(model)
    with pytest.raises(ConfigError, match="deploy form"):
        apply_plan(model, plan, form="sparse")
    with pytest.raises(ConfigError, match="example input"):
        apply_plan(model, plan, form="auto")


def test_params_and_macs_drop_as_predicted() -> None:
    model = CifarResNet(56)
    plan = random_plan(model)
    grouped = apply_plan(model, plan)
    removed = 0
    for layer in plan.layers:
        k = layer.kernel_size[0] * layer.kernel_size[1]
        assert grouped.get_submodule(layer.name).weight.numel() == layer.out_channels * layer.kept * k
        assert model.get_submodule(layer.name).weight.numel() == layer.out_channels * layer.in_channels * k
        removed += layer.out_channels * (layer.in_channels - layer.kept) * k
    before, after = count_cost(model, (1, 3, 32, 32)), count_cost(grouped, (1, 3, 32, 32))
    assert after.params == before.params - removed
    names = [layer.name for layer in plan.layers]
    pruned_share = sum(after.layer_macs[n] for n in names) / sum(before.layer_macs[n] for n in names)
    assert pruned_share == pytest.approx(1 - 0.4375, abs=1e-9)  # S = 9/16 of C_in in every layer
    # SPEC §8: ResNet-56 at 43.75%: MACs 126.56 M -> 71.86 M, params 0.853 M -> 0.482 M. Its
    # counter also counts BN/ReLU (~1 M more in total); the conv MACs removed agree.
    assert (before.macs - after.macs) / 1e6 == pytest.approx(126.56 - 71.86, abs=0.05)
    assert 1 - after.macs / before.macs == pytest.approx(0.436, abs=0.002)
    assert (before.params / 1e6, after.params / 1e6) == pytest.approx((0.853, 0.482), abs=0.001)


def _fake_timer(grouped_factor: dict[int, float], whole_model_ratio: float = 0.9):
    """Timer injected into `auto`: a layer's dense form takes C_in microseconds, its grouped form
    `grouped_factor[C_in]` times that; a whole model takes 10 ms, times `whole_model_ratio` when it
    holds a grouped layer."""
    calls: list[str] = []

    def timer(module: nn.Module, x: torch.Tensor) -> float:
        if isinstance(module, GroupedKernelConv):
            calls.append("grouped")
            return module.dense_in_channels * 1e-3 * grouped_factor[module.dense_in_channels]
        if isinstance(module, nn.Conv2d):
            calls.append("dense")
            assert tuple(x.shape[1:2]) == (module.in_channels,)
            return module.in_channels * 1e-3
        calls.append("model")
        has_grouped = any(isinstance(m, GroupedKernelConv) for m in module.modules())
        return 10.0 * (whole_model_ratio if has_grouped else 1.0)

    return timer, calls


def test_auto_picks_the_faster_form_per_layer_beyond_noise() -> None:
    model = randomize_bn(CifarResNet(20))
    plan = random_plan(model)
    # 16-channel layers: grouped 3x slower; 32: within the noise margin; 64: clearly faster.
    timer, calls = _fake_timer({16: 3.0, 32: 1.0 - AUTO_MARGIN / 2, 64: 0.5})
    x = torch.randn(2, 3, 32, 32)
    auto = apply_plan(model, plan, form="auto", example_input=x, timer=timer)
    summary = deploy_summary(auto)
    assert summary["form"] == "auto"
    assert summary["counts"]["grouped"] == sum(layer.in_channels == 64 for layer in plan.layers) > 0
    for layer in plan.layers:
        record = summary["layers"][layer.name]
        expected = "grouped" if layer.in_channels == 64 else "dense"
        assert record["form"] == expected, (layer.name, record)
        assert record["dense_ms"] == pytest.approx(layer.in_channels * 1e-3)
        assert record["input_shape"][1] == layer.in_channels and record["input_shape"][0] == 2
        assert isinstance(auto.get_submodule(layer.name), GroupedKernelConv) == (expected == "grouped")
    assert calls.count("model") == 2 * GUARD_ROUNDS  # the guard timed original and auto alternately
    _close(auto, masked_dense(model, plan), x)


def test_auto_falls_back_to_dense_when_the_whole_model_is_slower() -> None:
    model = randomize_bn(CifarResNet(20))
    plan = random_plan(model)
    timer, _ = _fake_timer({16: 0.5, 32: 0.5, 64: 0.5}, whole_model_ratio=1.0 + 2 * AUTO_MARGIN)
    auto = apply_plan(model, plan, form="auto", example_input=torch.randn(1, 3, 32, 32), timer=timer)
    assert not any(isinstance(m, GroupedKernelConv) for m in auto.modules())
    records = deploy_summary(auto)["layers"].values()
    assert {r["form"] for r in records} == {"dense"}
    assert all("whole model" in r["note"] and r["grouped_ms"] is not None for r in records)


def test_auto_keeps_unreached_layers_dense() -> None:
    class Detour(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.used = nn.Conv2d(16, 16, 3, padding=1)
            self.unused = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(self.stem(x))

    model = Detour()
    plan = random_plan(model)
    timer, _ = _fake_timer({16: 0.1})
    auto = apply_plan(model, plan, form="auto", example_input=torch.randn(1, 3, 8, 8), timer=timer)
    summary = deploy_summary(auto)["layers"]
    assert summary["used"]["form"] == "grouped"
    assert summary["unused"]["form"] == "dense" and "not reached" in summary["unused"]["note"]


def test_auto_with_the_real_timer_is_exact_and_records_timings() -> None:
    model = randomize_bn(CifarResNet(20))
    plan = random_plan(model)
    x = torch.randn(1, 3, 32, 32)
    auto = apply_plan(model, plan, form="auto", example_input=x)
    records = deploy_summary(auto)["layers"]
    assert set(records) == {layer.name for layer in plan.layers}
    assert all(r["grouped_ms"] > 0 and r["dense_ms"] > 0 for r in records.values())
    assert all(r["form"] == "dense" or r["grouped_ms"] < r["dense_ms"] for r in records.values())
    _close(auto, masked_dense(model, plan), x)


def test_channels_last_stays_channels_last_and_exact() -> None:
    model = randomize_bn(CifarResNet(20)).to(memory_format=torch.channels_last)
    plan = random_plan(model)
    grouped, reference = apply_plan(model, plan), masked_dense(model, plan)
    layer = plan.layers[0].name
    assert grouped.get_submodule(layer).weight.is_contiguous(memory_format=torch.channels_last)
    dense = apply_plan(model, plan, form="dense").get_submodule(layer)
    assert not dense.weight.is_contiguous() and dense.weight.is_contiguous(memory_format=torch.channels_last)
    seen: list[bool] = []
    grouped.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: seen.append(out.is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    _close(grouped, reference, x)
    assert seen and all(seen)


def test_autocast_bfloat16_on_cpu() -> None:
    model = randomize_bn(CifarResNet(20))
    plan = random_plan(model)
    grouped, reference = apply_plan(model, plan), masked_dense(model, plan)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        out = grouped.get_submodule(plan.layers[0].name)(torch.randn(1, 16, 8, 8))
        got, want = grouped(x).float(), reference(x).float()
    assert out.dtype == torch.bfloat16
    assert torch.allclose(got, want, rtol=5e-2, atol=5e-2 * float(want.abs().max()))


def test_grouped_model_trains_without_regrowing_pruned_kernels() -> None:
    model = CifarResNet(20)
    plan = random_plan(model)
    grouped = apply_plan(model, plan).train()
    optimizer = torch.optim.SGD(grouped.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(grouped(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    layer = plan.layers[0]
    trained = grouped.get_submodule(layer.name)
    assert not torch.equal(trained.weight, GroupedKernelConv.from_conv(model.get_submodule(layer.name), layer).weight)
    dense = trained.to_dense_conv().weight.detach()
    kept = torch.zeros(layer.out_channels, layer.in_channels, dtype=torch.bool)
    for filters, channels in zip(layer.filter_groups, layer.kept_channels):
        kept[np.ix_(filters, channels)] = True
    assert torch.count_nonzero(dense[~kept]) == 0



def test_with_autograd_on_pruned_layers_give_the_masked_models_gradients() -> None:
    """With autograd on, a pruned layer computes through its dense weight: the outputs equal the
    grouped path's (inference) and the kept kernels and biases get the masked dense model's
    gradients, through strides, dilation, reflect padding and biases (OddNet)."""
    model = randomize_bn(OddNet())
    plan = random_plan(model)
    grouped, reference = apply_plan(model, plan, form="grouped").eval(), masked_dense(model, plan).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        inferred = grouped(x)
    out = grouped(x)
    out.square().sum().backward()
    reference(x).square().sum().backward()
    assert out.grad_fn is not None and torch.allclose(out, inferred, atol=1e-5)
    for layer in plan.layers:
        pruned, dense = grouped.get_submodule(layer.name), reference.get_submodule(layer.name)
        rows, cols = pruned._kernel_index()
        assert torch.allclose(pruned.weight.grad, dense.weight.grad[rows, cols].reshape(pruned.weight.shape), atol=1e-5)
        if pruned.bias is not None:
            assert torch.allclose(pruned.bias.grad, dense.bias.grad[pruned.filter_order()], atol=1e-5)



def test_dense_equivalent_is_a_dense_copy_of_a_pruned_model_only() -> None:
    model = randomize_bn(OddNet())
    assert dense_equivalent(model) is model
    grouped = apply_plan(model, random_plan(model))
    dense = dense_equivalent(grouped)
    assert not any(isinstance(m, GroupedKernelConv) for m in dense.modules())
    assert sum(isinstance(m, GroupedKernelConv) for m in grouped.modules()) == 3  # the original is untouched
    _close(dense, grouped, torch.randn(2, 3, 16, 16))


def test_works_inside_a_normalisation_wrapper() -> None:
    model = randomize_bn(CifarResNet(20))
    plan = random_plan(model)
    wrapped = with_normalization(apply_plan(model, plan), PRESETS["cifar10"])
    summary = deploy_summary(wrapped)["layers"]
    assert set(summary) == {"1." + layer.name for layer in plan.layers}
    _close(wrapped, with_normalization(masked_dense(model, plan), PRESETS["cifar10"]), torch.rand(2, 3, 32, 32))


def test_equivalence_error_sees_a_difference_and_restores_modes() -> None:
    model = randomize_bn(CifarResNet(20)).train()
    other = masked_dense(model, random_plan(model)).train()
    x = [torch.randn(1, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    assert equivalence_error(model, other, x) > 1e-3
    assert model.training and other.training
    assert equivalence_error(model, model, x) == 0.0


class PrecisionProbe(nn.Module):
    """Identity that records the fp32 precision cuDNN convolutions and cuBLAS products would use."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
        return x


def test_equivalence_error_compares_in_full_fp32_whatever_the_tf32_setting() -> None:
    saved = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        a, b = PrecisionProbe(), PrecisionProbe()
        assert equivalence_error(a, b, [torch.zeros(1, 2), torch.ones(1, 2)]) == 0.0
        assert a.seen == b.seen == [("ieee", "ieee")] * 2
        assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


@pytest.mark.cuda
def test_equivalence_holds_on_the_gpu_with_tf32_enabled() -> None:
    """On Ampere and newer cuDNN convolves fp32 in TF32 by default, and the grouped and dense forms
    take different algorithms; the check must still see them agree within 1e-4."""
    factory, shape = MODELS["vgg16-cifar"]
    model = randomize_bn(factory())
    plan = random_plan(model)
    grouped = apply_plan(model, plan, device="cuda")
    reference = masked_dense(model, plan).cuda()
    saved = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        assert equivalence_error(grouped, reference, torch.randn(8, *shape[1:], device="cuda")) < 1e-4
    finally:
        torch.backends.cudnn.conv.fp32_precision = saved


@pytest.mark.cuda
def test_grouped_on_cuda_matches_masked() -> None:
    model = randomize_bn(CifarResNet(20))
    plan = random_plan(model)
    grouped = apply_plan(model, plan, device="cuda")
    reference = masked_dense(model, plan).cuda()
    assert grouped.get_submodule(plan.layers[0].name).input_index.is_cuda
    _close(grouped, reference, torch.randn(4, 3, 32, 32, device="cuda"), tol=1e-4)
    auto = apply_plan(model, plan, form="auto", example_input=torch.randn(4, 3, 32, 32), device="cuda")
    _close(auto, reference, torch.randn(4, 3, 32, 32, device="cuda"), tol=1e-4)


@pytest.mark.shared
def test_real_checkpoint_reconstructs_exactly(shared_checkpoint) -> None:
    from engine.formats.checkpoints import load_checkpoint

    model = load_checkpoint(shared_checkpoint).model
    plan = random_plan(model, seed=11)
    grouped = apply_plan(model, plan)
    x = with_normalization(nn.Identity(), PRESETS["imagenet"])(torch.rand(8, 3, 32, 32))
    error = _close(grouped, masked_dense(model, plan), x)
    assert error < 1e-4


def test_workbench_checkpoint_of_a_grouped_model_reloads(tmp_path) -> None:
    from engine.formats.checkpoints import load_checkpoint, save_checkpoint
    from engine.models.architectures import infer_architecture

    model = randomize_bn(CifarResNet(20))
    plan = random_plan(model, seed=2)
    grouped = apply_plan(model, plan)
    path = tmp_path / "pruned.pt"
    save_checkpoint(path, grouped, infer_architecture(model.state_dict()), PRESETS["cifar10"], plan=plan)
    loaded = load_checkpoint(path).model
    assert equivalence_error(loaded, grouped, torch.randn(2, 3, 32, 32)) == 0.0
    assert deploy_summary(loaded)["counts"]["grouped"] == len(plan.layers)
