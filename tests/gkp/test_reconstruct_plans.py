"""Reconstruction of hand-built plans (SPEC §5) on small models, against hand-computed
expectations: kernel, weight and channel masks, removed filters, the deployment records and
summary, `auto`'s per-layer and whole-model choices under a deterministic timer (ties included),
device and dtype placement (the meta device stands in for a second device) and
`equivalence_error`'s value."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from engine.common.errors import ConfigError
from engine.gkp import reconstruct
from engine.gkp.masked import ZeroMaskedConv
from engine.gkp.plan import FilterLayer, LayerPlan, MaskLayer, PrunePlan
from engine.gkp.reconstruct import (
    AUTO_MARGIN,
    DeployChoice,
    GroupedKernelConv,
    _is_channels_last,
    apply_plan,
    deploy_summary,
    equivalence_error,
    install_plan_structure,
    masked_dense,
)
from engine.models.cifar_resnet import CifarResNet

META = torch.device("meta")


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    """`module` with every parameter redrawn from a seeded generator (biases included), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module.eval()


class Pair(nn.Module):
    """Two 3x3 convs with biases, 4 -> 8 -> 8 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x)))


def layer_a() -> LayerPlan:
    """`Pair.a` in two groups (even and odd filters) keeping channels {0, 3} and {1, 2}."""
    return LayerPlan("a", 8, 4, (3, 3), [[0, 2, 4, 6], [1, 3, 5, 7]], [[0, 3], [1, 2]], "hand", "hand")


def layer_b() -> LayerPlan:
    """`Pair.b` in two groups (first and last four filters) keeping 3 of 8 channels each."""
    return LayerPlan("b", 8, 8, (3, 3), [[0, 1, 2, 3], [4, 5, 6, 7]], [[1, 4, 6], [0, 2, 7]], "hand", "hand")


def kernel_keep_a() -> torch.Tensor:
    """A hand-written (8, 4) kernel keep mask for `Pair.a`: filter f keeps channel f % 4 and, for
    even f, channel (f + 1) % 4 too."""
    keep = torch.zeros(8, 4, dtype=torch.bool)
    for f in range(8):
        keep[f, f % 4] = True
        if f % 2 == 0:
            keep[f, (f + 1) % 4] = True
    return keep


def mask_plan() -> PrunePlan:
    """`Pair.a` kernel-masked (`kernel_keep_a`), `Pair.b` weight-masked (every other weight)."""
    weight_keep = (torch.arange(8 * 8 * 9).reshape(8, 8, 3, 3) % 2) == 0
    return PrunePlan("itp", {}, [], masks=[
        MaskLayer.from_keep("a", "kernel", (8, 4, 3, 3), kernel_keep_a()),
        MaskLayer.from_keep("b", "weight", (8, 8, 3, 3), weight_keep),
    ])


def hand_masked(model: Pair) -> Pair:
    """`model` with `mask_plan`'s zeros written by hand."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.a.weight.mul_(kernel_keep_a()[:, :, None, None].float())
        out.b.weight.view(-1)[1::2] = 0.0
    return out


def filter_plan() -> tuple[PrunePlan, list[int]]:
    """A CIFAR ResNet-20 filter plan keeping 13 of layer1.0.conv1's 16 filters."""
    kept = [0, 1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15]
    return PrunePlan("l1", {}, [], filters=[FilterLayer("layer1.0.conv1", 16, kept)]), kept


def resnet() -> nn.Module:
    """A seeded CIFAR ResNet-20 with distinct BatchNorm statistics, in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = CifarResNet(20).eval()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model


class FakeTimer:
    """Deterministic `LayerTimer`: a grouped layer takes `grouped[C_in]` ms, a dense one `dense[C_in]`,
    a whole model `model_ms[0]` (original, timed first in each guard round) or `model_ms[1]`
    (deployed); checks inputs sit on the module's device and records them."""

    def __init__(self, grouped: dict[int, float], dense: dict[int, float],
                 model_ms: tuple[float, float] = (10.0, 10.0)) -> None:
        self.grouped, self.dense, self.model_ms = grouped, dense, model_ms
        self.layer_inputs: list[torch.Tensor] = []
        self.models: list[tuple[nn.Module, torch.Tensor]] = []

    def __call__(self, module: nn.Module, x: torch.Tensor) -> float:
        param = next(module.parameters())
        assert x.device == param.device, (x.device, param.device)
        if isinstance(module, GroupedKernelConv):
            self.layer_inputs.append(x)
            return self.grouped[module.dense_in_channels]
        if isinstance(module, nn.Conv2d):
            self.layer_inputs.append(x)
            return self.dense[module.in_channels]
        self.models.append((module, x))
        return self.model_ms[(len(self.models) - 1) % 2]


def test_is_channels_last_needs_four_dims_and_an_unambiguous_channels_last_layout() -> None:
    """A plain 4-d tensor and one whose layout is both contiguous and channels-last (1x1
    planes) are not channels-last; a converted 4-d one is."""
    assert not _is_channels_last(torch.zeros(2, 3, 4, 5))
    assert not _is_channels_last(torch.zeros(2, 3, 1, 1))
    assert _is_channels_last(torch.zeros(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))


def test_grouped_kernel_conv_defaults() -> None:
    """Built by hand, a `GroupedKernelConv` has a bias, zero padding mode, zero weights, zero
    input indices and the identity output order, on the CPU in float32."""
    conv = GroupedKernelConv(8, 4, (3, 3), groups=2, kept=3)
    assert conv.in_channels == 6 and conv.groups == 2 and conv.dense_in_channels == 8 and conv.kept == 3
    assert conv.bias is not None and conv.padding_mode == "zeros"
    assert conv.weight.dtype == torch.float32 and conv.weight.shape == (4, 3, 3, 3)
    assert torch.count_nonzero(conv.weight) == 0 and torch.count_nonzero(conv.bias) == 0
    assert torch.equal(conv.input_index, torch.zeros(2, 3, dtype=torch.long))
    assert torch.equal(conv.output_order, torch.arange(4))
    assert repr(conv) == ("GroupedKernelConv(dense_in_channels=8, kept=3, 6, 4, kernel_size=(3, 3), stride=(1, 1), "
                          "groups=2)")  # what printing a deployed model shows


def test_structure_is_built_on_the_convs_device_and_dtype() -> None:
    """Every tensor of a hand-built, planned (`empty`) and densified layer sits on the device and
    in the dtype asked for or of the source conv (meta and float64 here)."""
    direct = GroupedKernelConv(8, 4, (3, 3), groups=2, kept=3, device=META, dtype=torch.float64)
    conv = nn.Conv2d(4, 8, 3, padding=1, device=META, dtype=torch.float64)
    planned = GroupedKernelConv.empty(layer_a(), conv)
    for module in (direct, planned, planned.to_dense_conv()):
        tensors = [*module.parameters(), *module.buffers()]
        assert {t.device for t in tensors} == {META}, module
        assert {p.dtype for p in module.parameters()} == {torch.float64}
    assert planned.filter_order().device == META


def test_grouped_layer_keeps_the_plans_indices_and_densifies_in_its_dtype() -> None:
    """`from_conv` records each group's kept channels and the filter order; `to_dense_conv` of
    a float64 layer is a float64 conv equal to the hand-masked weight."""
    conv = seeded(nn.Conv2d(4, 8, 3, padding=1)).double()
    grouped = GroupedKernelConv.from_conv(conv, layer_a())
    assert torch.equal(grouped.input_index, torch.tensor([[0, 3], [1, 2]]))
    assert torch.equal(grouped.filter_order(), torch.tensor([0, 2, 4, 6, 1, 3, 5, 7]))
    assert torch.equal(grouped.output_order, torch.tensor([0, 4, 1, 5, 2, 6, 3, 7]))
    keep = torch.zeros(8, 4, dtype=torch.float64)
    keep[0::2, [0, 3]] = 1
    keep[1::2, [1, 2]] = 1
    dense = grouped.to_dense_conv()
    assert dense.weight.dtype == torch.float64 and dense.bias.dtype == torch.float64
    assert torch.equal(dense.weight, conv.weight * keep[:, :, None, None])
    assert torch.equal(dense.bias, conv.bias)


def test_dense_weight_follows_the_weights_memory_layout() -> None:
    """The dense weight is channels-last exactly when the grouped weight is."""
    conv = seeded(nn.Conv2d(4, 8, 3, padding=1))
    plain = GroupedKernelConv.from_conv(conv, layer_a())
    assert plain.dense_weight().is_contiguous()
    last = GroupedKernelConv.from_conv(conv.to(memory_format=torch.channels_last), layer_a())
    weight = last.dense_weight()
    assert not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(weight, plain.dense_weight())


def test_reflect_padded_dilated_layer_keeps_its_dilation_with_autograd() -> None:
    """With autograd on, a reflect-padded dilated pruned layer gives the inference path's and
    the hand-masked conv's outputs."""
    conv = seeded(nn.Conv2d(4, 8, 3, padding=2, dilation=2, padding_mode="reflect"))
    grouped = GroupedKernelConv.from_conv(conv, layer_a())
    reference = copy.deepcopy(conv)
    with torch.no_grad():
        reference.weight.copy_(grouped.dense_weight())
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        inferred, want = grouped(x), reference(x)
    trained = grouped(x)
    assert trained.grad_fn is not None and trained.shape == (2, 8, 9, 9)
    assert torch.allclose(trained, want, atol=1e-6) and torch.allclose(inferred, want, atol=1e-6)


def test_masked_dense_zeroes_exactly_the_masked_weights() -> None:
    """Kernel and weight masks zero just the weights the hand-written masks drop; biases and the
    input model stay as they were."""
    model = seeded(Pair())
    before = copy.deepcopy(model.state_dict())
    masked = masked_dense(model, mask_plan())
    want = hand_masked(model)
    for name in ("a", "b"):
        assert torch.equal(masked.get_submodule(name).weight, want.get_submodule(name).weight)
        assert torch.equal(masked.get_submodule(name).bias, model.get_submodule(name).bias)
    assert torch.count_nonzero(masked.a.weight.abs().sum((2, 3))) == int(kernel_keep_a().sum()) == 12
    assert torch.count_nonzero(masked.b.weight) == 8 * 8 * 9 // 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_masked_dense_of_a_grouped_plan_keeps_each_groups_channels() -> None:
    """A grouped plan keeps, in each filter, exactly its group's channels."""
    model = seeded(Pair())
    masked = masked_dense(model, PrunePlan("gkp", {}, [layer_a(), layer_b()]))
    nonzero = masked.b.weight.abs().sum((2, 3)) != 0
    want = torch.zeros(8, 8, dtype=torch.bool)
    want[:4, [1, 4, 6]] = True
    want[4:, [0, 2, 7]] = True
    assert torch.equal(nonzero, want)
    assert torch.equal(masked.b.weight[want], model.b.weight[want])


def test_masked_dense_copies_everything_unless_asked_to_share() -> None:
    """By default no tensor is shared with the input; with `share_unplanned` the masked weights are
    copies (the input keeps its values) and every other tensor is the input's own."""
    model = seeded(Pair())
    default = masked_dense(model, mask_plan())
    own = {id(t) for t in (*model.parameters(), *model.buffers())}
    assert not own & {id(t) for t in (*default.parameters(), *default.buffers())}
    weights = (model.a.weight.clone(), model.b.weight.clone())
    shared = masked_dense(model, mask_plan(), share_unplanned=True)
    assert shared.a.bias is model.a.bias and shared.b.bias is model.b.bias
    assert shared.a.weight is not model.a.weight and shared.b.weight is not model.b.weight
    assert torch.equal(model.a.weight, weights[0]) and torch.equal(model.b.weight, weights[1])
    assert torch.equal(shared.b.weight, hand_masked(model).b.weight)


def test_masked_dense_of_a_filter_plan_silences_the_removed_filters() -> None:
    """Removed filters' conv rows and BatchNorm scale and shift are zero in the reference, kept
    ones unchanged; shared, the input's own tensors stay untouched."""
    model = resnet()
    plan, kept = filter_plan()
    dropped = [3, 8, 13]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for share in (False, True):
        masked = masked_dense(model, plan, share_unplanned=share)
        conv, bn = masked.get_submodule("layer1.0.conv1"), masked.get_submodule("layer1.0.bn1")
        assert torch.count_nonzero(conv.weight[dropped]) == 0
        assert torch.count_nonzero(bn.weight[dropped]) == 0 and torch.count_nonzero(bn.bias[dropped]) == 0
        assert torch.equal(conv.weight[kept], model.get_submodule("layer1.0.conv1").weight[kept])
        assert torch.equal(bn.weight[kept], model.get_submodule("layer1.0.bn1").weight[kept])
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert masked.get_submodule("layer1.0.conv2").weight is model.get_submodule("layer1.0.conv2").weight


@pytest.mark.parametrize("form", ["grouped", "dense", "auto"])
def test_mask_plan_deploys_as_masked_convs_or_plain_convs_holding_the_zeros(form: str) -> None:
    """`grouped` makes masked convs, `dense` and `auto` plain convs holding the zeros; each
    records how, and the model computes the hand-masked function."""
    model = seeded(Pair())
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    timer = FakeTimer({}, {})
    deployed = apply_plan(model, mask_plan(), form=form, example_input=x, timer=timer)
    note = "zeroed weights: the dense form is the only one" if form == "auto" else ""
    want = DeployChoice(form, "masked" if form == "grouped" else "dense", note=note)
    for name in ("a", "b"):
        module = deployed.get_submodule(name)
        assert type(module) is (ZeroMaskedConv if form == "grouped" else nn.Conv2d)
        assert module.gkp_deploy == want
        assert not module.training
    assert torch.equal(deployed.b.weight, hand_masked(model).b.weight)
    assert equivalence_error(deployed, hand_masked(model), x) < 1e-6
    assert type(model.a) is nn.Conv2d and not hasattr(model.a, "gkp_deploy")
    assert timer.models == []  # no grouped layer: the whole-model guard has nothing to time
    summary = deploy_summary(deployed)
    assert summary["form"] == form
    assert summary["counts"] == ({"grouped": 0, "dense": 0, "masked": 2} if form == "grouped"
                                 else {"grouped": 0, "dense": 2})
    assert summary["layers"]["a"] == {"form": want.form, "grouped_ms": None, "dense_ms": None,
                                      "input_shape": None, "note": note}


@pytest.mark.parametrize("form", ["grouped", "dense", "auto"])
def test_filter_plan_removes_the_filters_in_every_form(form: str) -> None:
    """Every form takes the filters out (conv, BatchNorm and reader shrink), records it and
    computes the silenced reference's function."""
    model = resnet()
    plan, kept = filter_plan()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    deployed = apply_plan(model, plan, form=form, example_input=x, timer=FakeTimer({}, {}))
    conv = deployed.get_submodule("layer1.0.conv1")
    assert conv.out_channels == 13 and deployed.get_submodule("layer1.0.bn1").num_features == 13
    assert deployed.get_submodule("layer1.0.conv2").in_channels == 13
    assert torch.equal(conv.weight, model.get_submodule("layer1.0.conv1").weight[kept])
    assert conv.gkp_deploy == DeployChoice(form, "dense", note="13 filters kept")
    assert model.get_submodule("layer1.0.conv1").out_channels == 16
    assert equivalence_error(deployed, masked_dense(model, plan), x) < 1e-6
    assert deploy_summary(deployed) == {
        "form": form, "counts": {"grouped": 0, "dense": 1},
        "layers": {"layer1.0.conv1": {"form": "dense", "grouped_ms": None, "dense_ms": None,
                                      "input_shape": None, "note": "13 filters kept"}},
    }


def test_install_plan_structure_takes_a_masked_models_state_dict() -> None:
    """The structure holds a masked conv per mask with the plan's keep mask; the deployed model's
    state dict loads strictly and the result computes the same; loaded layers count as masked."""
    model = seeded(Pair())
    deployed = apply_plan(model, mask_plan())
    fresh = Pair()
    install_plan_structure(fresh, mask_plan())
    assert type(fresh.a) is ZeroMaskedConv and type(fresh.b) is ZeroMaskedConv
    assert torch.equal(fresh.a.keep, kernel_keep_a()[:, :, None, None].expand(8, 4, 3, 3).float())
    fresh.load_state_dict(deployed.state_dict(), strict=True)
    x = torch.randn(1, 4, 5, 5)
    assert equivalence_error(fresh, hand_masked(model), x) < 1e-6
    summary = deploy_summary(fresh)
    assert summary["form"] == "grouped" and summary["counts"] == {"grouped": 0, "dense": 0, "masked": 2}
    assert summary["layers"]["b"] == {"form": "masked", "grouped_ms": None, "dense_ms": None,
                                      "input_shape": None, "note": ""}


def test_install_plan_structure_removes_a_filter_plans_filters() -> None:
    """The structure of a filter-pruned model is the shrunk one, and the pruned state dict loads
    into it strictly."""
    model = resnet()
    plan, _ = filter_plan()
    deployed = apply_plan(model, plan)
    fresh = CifarResNet(20)
    install_plan_structure(fresh, plan)
    assert fresh.get_submodule("layer1.0.conv1").out_channels == 13
    assert fresh.get_submodule("layer1.0.conv2").in_channels == 13
    fresh.load_state_dict(deployed.state_dict(), strict=True)
    assert equivalence_error(fresh, deployed, torch.randn(1, 3, 32, 32)) == 0.0


def test_deploy_summary_joins_the_requested_forms_and_lists_input_shapes() -> None:
    """A model mixing an `auto` record and a loaded grouped layer reports `auto+grouped`, only
    the grouped and dense counts, and the input shape as a list."""
    model = seeded(Pair())
    fresh = Pair()
    install_plan_structure(fresh, PrunePlan("gkp", {}, [layer_b()]))
    fresh.a.gkp_deploy = DeployChoice("auto", "dense", 1.0, 2.0, (1, 4, 5, 5), note="n")
    summary = deploy_summary(fresh)
    assert summary == {
        "form": "auto+grouped",
        "counts": {"grouped": 1, "dense": 1},
        "layers": {
            "a": {"form": "dense", "grouped_ms": 1.0, "dense_ms": 2.0, "input_shape": [1, 4, 5, 5], "note": "n"},
            "b": {"form": "grouped", "grouped_ms": None, "dense_ms": None, "input_shape": None, "note": ""},
        },
    }
    assert deploy_summary(model) == {"form": None, "counts": {"grouped": 0, "dense": 0}, "layers": {}}


def test_auto_breaks_a_per_layer_tie_towards_dense() -> None:
    """A layer grouped is kept grouped only when strictly faster than the margin: exactly at it,
    dense; each choice records its timings and input shape."""
    model = seeded(Pair())
    timer = FakeTimer({4: 1.0 * (1.0 - AUTO_MARGIN), 8: 0.5}, {4: 1.0, 8: 1.0})
    x = torch.randn(1, 4, 5, 5)
    auto = apply_plan(model, PrunePlan("gkp", {}, [layer_a(), layer_b()]), form="auto", example_input=x,
                      timer=timer)
    assert type(auto.a) is nn.Conv2d and type(auto.b) is GroupedKernelConv
    assert auto.a.gkp_deploy == DeployChoice("auto", "dense", 1.0 * (1.0 - AUTO_MARGIN), 1.0, (1, 4, 5, 5))
    assert auto.b.gkp_deploy == DeployChoice("auto", "grouped", 0.5, 1.0, (1, 8, 5, 5))


def test_auto_times_layers_on_seeded_inputs_in_the_models_dtype_and_layout() -> None:
    """Each layer is timed on a fresh draw from a generator seeded 0 (the global RNG untouched),
    of the layer's input shape, in the model's dtype and channels-last when the model is."""
    model = seeded(Pair()).double().to(memory_format=torch.channels_last)
    timer = FakeTimer({4: 1.0, 8: 1.0}, {4: 1.0, 8: 1.0})
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    state = torch.get_rng_state()
    apply_plan(model, PrunePlan("gkp", {}, [layer_a(), layer_b()]), form="auto", example_input=x, timer=timer)
    assert torch.equal(torch.get_rng_state(), state)
    gen = torch.Generator().manual_seed(0)
    draws = [torch.randn(1, shape, 5, 5, generator=gen, dtype=torch.float64) for shape in (4, 8)]
    assert len(timer.layer_inputs) == 4  # grouped, then dense, per layer
    for seen, want in zip(timer.layer_inputs, [draws[0], draws[0], draws[1], draws[1]]):
        assert seen.dtype == torch.float64 and _is_channels_last(seen)
        assert torch.equal(seen, want)


def test_auto_goes_on_after_an_unreached_layer() -> None:
    """A layer the example input does not reach is deployed dense with a note, and the layers
    planned after it are still timed and chosen."""
    class OnlyA(Pair):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    model = seeded(OnlyA())
    unused = LayerPlan("b", 8, 8, (3, 3), [[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1], [2, 3]], "hand", "hand")
    auto = apply_plan(model, PrunePlan("gkp", {}, [unused, layer_a()]), form="auto",
                      example_input=torch.randn(1, 4, 5, 5), timer=FakeTimer({4: 0.1}, {4: 1.0}))
    assert auto.b.gkp_deploy == DeployChoice("auto", "dense", note="not reached by the example input")
    assert type(auto.a) is GroupedKernelConv and auto.a.gkp_deploy.form == "grouped"
    assert deploy_summary(auto)["form"] == "auto"


@pytest.mark.parametrize(("auto_ms", "grouped"), [(10.0, True), (10.0 * (1.0 + AUTO_MARGIN), True), (10.6, False)])
def test_whole_model_guard_keeps_grouped_layers_up_to_the_margin(auto_ms: float, grouped: bool) -> None:
    """The guard times the caller's model and the deployed one on the example input and keeps
    the grouped layers unless the deployed one is slower by more than the margin (a tie keeps)."""
    model = seeded(Pair())
    timer = FakeTimer({4: 0.1, 8: 0.1}, {4: 1.0, 8: 1.0}, model_ms=(10.0, auto_ms))
    x = torch.randn(1, 4, 5, 5)
    auto = apply_plan(model, PrunePlan("gkp", {}, [layer_a(), layer_b()]), form="auto", example_input=x, timer=timer)
    assert [m is model for m, _ in timer.models] == [True, False] * 3
    assert all(seen is x for _, seen in timer.models)
    assert (type(auto.a) is GroupedKernelConv) == grouped and (type(auto.b) is GroupedKernelConv) == grouped
    if not grouped:
        note = f"whole model with grouped layers measured {auto_ms:.3f} ms vs 10.000 ms unpruned"
        assert auto.a.gkp_deploy == DeployChoice("auto", "dense", 0.1, 1.0, (1, 4, 5, 5), note)


def test_auto_on_another_device_times_everything_there() -> None:
    """Deployed to another device (meta), `auto` times layers and both whole models there, the
    original being a copy without grouped layers."""
    model = seeded(Pair())
    timer = FakeTimer({4: 0.1, 8: 0.1}, {4: 1.0, 8: 1.0})
    auto = apply_plan(model, PrunePlan("gkp", {}, [layer_a(), layer_b()]), form="auto",
                      example_input=torch.randn(1, 4, 5, 5), device=META, timer=timer)
    assert type(auto.a) is GroupedKernelConv and auto.a.weight.device == META
    original = timer.models[0][0]
    assert original is not model and next(original.parameters()).device == META
    assert not any(isinstance(m, GroupedKernelConv) for m in original.modules())
    assert {x.device for _, x in timer.models} == {META} and model.a.weight.device.type == "cpu"


def test_apply_plan_resolves_device_names_and_takes_devices() -> None:
    """A device name is resolved (`auto` is a usable device here) and a `torch.device` used as is."""
    model = seeded(Pair())
    plan = PrunePlan("gkp", {}, [layer_a()])
    assert apply_plan(model, plan, device="auto").a.weight.device == reconstruct.resolve_device("auto")
    assert apply_plan(model, plan, device=META).b.weight.device == META


def test_apply_plan_errors_say_what_is_wrong() -> None:
    """An unknown form lists the forms; `auto` without an example input says it needs one."""
    model = seeded(Pair())
    plan = PrunePlan("gkp", {}, [layer_a()])
    with pytest.raises(ConfigError) as bad:
        apply_plan(model, plan, form="fast")
    assert str(bad.value) == "deploy form must be one of grouped, dense, auto, got 'fast'"
    with pytest.raises(ConfigError) as missing:
        apply_plan(model, plan, form="auto")
    assert str(missing.value) == "deploy form 'auto' needs an example input to time the layers on"


class Scale(nn.Module):
    """`factor * x`."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class DeviceProbe(nn.Module):
    """A parameter on `device`; records the device of each input and returns CPU zeros."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1, device=device))
        self.seen: list[torch.device] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.device)
        return torch.zeros(2)


def test_equivalence_error_is_the_largest_difference_over_all_batches() -> None:
    """`x` against `2x` over two batches differs by the largest |x| of either; the modes of both
    models come back as they were."""
    a, b = Scale(1.0).train(), Scale(2.0).eval()
    assert equivalence_error(a, b, [torch.tensor([1.0, -3.0]), torch.tensor([2.5])]) == 3.0
    assert equivalence_error(a, b, torch.tensor([0.5, -0.25])) == 0.5
    assert a.training and not b.training


def test_equivalence_error_runs_each_model_on_its_own_device() -> None:
    """Each model gets the inputs on the device of its parameters."""
    cpu, meta = DeviceProbe(torch.device("cpu")), DeviceProbe(META)
    assert equivalence_error(cpu, meta, torch.tensor([1.0, -1.0])) == 0.0
    assert equivalence_error(meta, cpu, torch.tensor([1.0, -1.0])) == 0.0
    assert cpu.seen == [torch.device("cpu")] * 2 and meta.seen == [META] * 2


def test_default_timer_takes_the_fast_tail_of_a_timed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default timer times on the input's device after 2 warm-ups, at least 15 calls and
    20 ms, and returns the 10th-percentile time."""
    calls: list[dict] = []

    def fake(module: nn.Module, x: torch.Tensor, **kwargs) -> SimpleNamespace:
        calls.append(kwargs)
        return SimpleNamespace(p10_ms=1.25, median_ms=9.0)

    monkeypatch.setattr(reconstruct, "measure_latency", fake)
    x = torch.zeros(1, 4, 5, 5)
    assert reconstruct._default_timer(nn.Conv2d(4, 4, 3), x) == 1.25
    assert calls == [{"device": x.device, "warmup": 2, "repeats": 15, "min_seconds": 0.02}]
