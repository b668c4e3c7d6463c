"""Model zoo, architecture inference and explicit overrides (SPEC §6)."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from engine.common.errors import ArchitectureError, ConfigError
from engine.models.architectures import (
    ArchSpec,
    build_model,
    infer_architecture,
    list_supported,
    resolve_architecture,
)
from engine.models.cifar_resnet import (
    AvgPoolAppendShortcut,
    CifarResNet,
    SubsamplePadShortcut,
)
from engine.models.cifar_vgg import CifarVGG16


def resnet(depth: int = 20, naming: str = "layer", shortcut: str = "A", classes: int = 10,
           channels: int = 3, width: int = 16) -> ArchSpec:
    return ArchSpec("cifar_resnet", f"resnet{depth}", {
        "depth": depth, "naming": naming, "shortcut": shortcut, "width": width,
        "num_classes": classes, "in_channels": channels,
    })


def vgg(batch_norm: bool = True, classes: int = 10, channels: int = 3, head: str = "linear") -> ArchSpec:
    params = {"batch_norm": batch_norm, "head": head, "num_classes": classes, "in_channels": channels}
    if head == "mlp":
        params["hidden"] = 512
    return ArchSpec("cifar_vgg", "vgg16_bn" if batch_norm else "vgg16", params)


def torchvision_spec(name: str, classes: int = 1000, channels: int = 3) -> ArchSpec:
    return ArchSpec("torchvision", name, {"num_classes": classes, "in_channels": channels})


def meta_state(spec: ArchSpec) -> dict[str, torch.Tensor]:
    """A state dict with the right keys and shapes but no memory (inference only reads shapes)."""
    with torch.device("meta"):
        return build_model(spec).state_dict()


# --- option A shortcuts, against hand-written tensors -------------------------------------------


def test_layer_option_a_subsamples_and_pads_both_sides() -> None:
    x = torch.arange(1, 65, dtype=torch.float32).view(1, 4, 4, 4)
    out = SubsamplePadShortcut(pad=2)(x)  # planes 8, planes // 4 = 2 zero channels each side
    zero = [[0.0, 0.0], [0.0, 0.0]]
    expected = torch.tensor([[
        zero, zero,
        [[1.0, 3.0], [9.0, 11.0]],
        [[17.0, 19.0], [25.0, 27.0]],
        [[33.0, 35.0], [41.0, 43.0]],
        [[49.0, 51.0], [57.0, 59.0]],
        zero, zero,
    ]])
    assert torch.equal(out, expected)


def test_stage_option_a_avgpools_and_appends_zeros() -> None:
    x = torch.arange(1, 65, dtype=torch.float32).view(1, 4, 4, 4)
    out = AvgPoolAppendShortcut(extra=4)(x)
    zero = [[0.0, 0.0], [0.0, 0.0]]
    expected = torch.tensor([[
        [[1.0, 3.0], [9.0, 11.0]],
        [[17.0, 19.0], [25.0, 27.0]],
        [[33.0, 35.0], [41.0, 43.0]],
        [[49.0, 51.0], [57.0, 59.0]],
        zero, zero, zero, zero,
    ]])
    assert torch.equal(out, expected)


def test_option_a_shortcuts_have_no_state_and_option_b_does() -> None:
    for naming in ("layer", "stage"):
        keys = set(CifarResNet(20, naming=naming, shortcut="A").state_dict())
        assert not any("shortcut" in k or "downsample" in k for k in keys)
    b_layer = CifarResNet(20, naming="layer", shortcut="B").state_dict()
    b_stage = CifarResNet(20, naming="stage", shortcut="B").state_dict()
    assert b_layer["layer2.0.shortcut.0.weight"].shape == (32, 16, 1, 1)
    assert "layer2.0.shortcut.1.running_mean" in b_layer and "layer1.0.shortcut.0.weight" not in b_layer
    assert b_stage["stage_3.0.downsample.0.weight"].shape == (64, 32, 1, 1)


def test_key_names_follow_both_conventions() -> None:
    layer = CifarResNet(20, naming="layer").state_dict()
    stage = CifarResNet(20, naming="stage").state_dict()
    assert {"conv1.weight", "bn1.running_var", "layer3.2.conv2.weight", "layer1.0.bn2.bias", "linear.weight"} <= set(layer)
    assert {"conv_1_3x3.weight", "bn_1.running_var", "stage_3.2.conv_b.weight", "stage_1.0.bn_a.bias",
            "classifier.weight"} <= set(stage)
    assert layer.keys().isdisjoint({"conv_1_3x3.weight", "classifier.weight"})


@pytest.mark.parametrize("naming", ["layer", "stage"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet_forward(naming: str, shortcut: str) -> None:
    torch.manual_seed(4)
    model = CifarResNet(20, num_classes=7, in_channels=1, naming=naming, shortcut=shortcut).eval()
    x = torch.rand(2, 1, 32, 32)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    # Silence every residual branch (its last BN to zero): each block is then relu(shortcut(x)),
    # and the network a stem, two shortcuts, a pool and the head, written out here by hand.
    state = model.state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.copy_(torch.rand_like(value) - 0.5)
        elif key.endswith("running_var"):
            value.copy_(torch.rand_like(value) + 0.5)
        elif key.rsplit(".", 1)[0].endswith(("bn2", "bn_b")):
            value.zero_()
    model.load_state_dict(state)
    names = {"layer": ("conv1", "bn1", "layer{}.0", "shortcut", "linear"),
             "stage": ("conv_1_3x3", "bn_1", "stage_{}.0", "downsample", "classifier")}[naming]
    stem, stem_bn, first_block, downsample, head = names

    def bn(t: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.batch_norm(t, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.0, 1e-5)

    h = F.relu(bn(F.conv2d(x, state[f"{stem}.weight"], padding=1), stem_bn))
    for stage in (2, 3):
        block = first_block.format(stage)
        if shortcut == "B":
            h = bn(F.conv2d(h, state[f"{block}.{downsample}.0.weight"], stride=2), f"{block}.{downsample}.1")
        else:
            zeros = torch.zeros_like(h[:, :, ::2, ::2])
            split = h.shape[1] // 2 if naming == "layer" else 0  # padded on both sides, or appended
            h = torch.cat([zeros[:, :split], h[:, :, ::2, ::2], zeros[:, split:]], dim=1)
        h = F.relu(h)
    expected = F.linear(h.mean(dim=(2, 3)), state[f"{head}.weight"], state[f"{head}.bias"])
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_cifar_vgg_forward_and_layout(head: str) -> None:
    model = CifarVGG16(num_classes=5, batch_norm=True, head=head).eval()
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 5)


def test_bad_depth_and_options_are_architecture_errors() -> None:
    with pytest.raises(ArchitectureError, match="depth 6n\\+2"):
        CifarResNet(21)
    with pytest.raises(ArchitectureError, match="naming"):
        CifarResNet(20, naming="blocks")  # type: ignore[arg-type]
    with pytest.raises(ArchitectureError, match="head"):
        CifarVGG16(head="wide")  # type: ignore[arg-type]


# --- inference -----------------------------------------------------------------------------------

INFERRED = [
    *(resnet(d, n, s) for d in (20, 32, 44, 56, 110) for n in ("layer", "stage") for s in ("A", "B")),
    resnet(56, "stage", "B", classes=100, channels=1),
    resnet(20, "layer", "A", width=32),
    vgg(True), vgg(False), vgg(False, classes=100, channels=1), vgg(True, head="mlp"),
    *(torchvision_spec(n) for n in ("resnet18", "resnet34", "resnet50", "resnet101", "vgg16", "vgg16_bn")),
    torchvision_spec("resnet50", classes=100, channels=1),
]


@pytest.mark.parametrize("spec", INFERRED, ids=lambda s: f"{s.name}-{'-'.join(str(v) for v in s.params.values())}")
def test_infer_recovers_the_spec(spec: ArchSpec) -> None:
    assert infer_architecture(meta_state(spec)) == spec


def test_infer_real_weights_of_a_built_model() -> None:
    spec = resnet(32, "stage", "A", classes=100)
    assert infer_architecture(build_model(spec).state_dict()) == spec


def test_describe_and_dict_round_trip() -> None:
    spec = resnet(20)
    assert spec.describe() == (
        "CIFAR ResNet-20 (conv1/layer naming, option A: zero-pad both sides), 10 classes, 3 input channels"
    )
    assert "zeros appended" in resnet(56, "stage").describe()
    assert "1 input channel" in vgg(False, channels=1).describe() and "without BN" in vgg(False).describe()
    assert torchvision_spec("vgg16_bn").describe() == "torchvision VGG-16-BN, 1000 classes, 3 input channels"
    assert ArchSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ConfigError, match="arch.family must be one of cifar_resnet, cifar_vgg, torchvision, custom, got 'lenet'"):
        ArchSpec.from_dict({"family": "lenet", "name": "x"})


def test_infer_names_nearest_candidate_and_missing_keys() -> None:
    state = meta_state(resnet(20))
    del state["layer3.2.conv1.weight"]
    state["linear.weight"] = torch.empty(10, 65, device="meta")
    with pytest.raises(ArchitectureError) as info:
        infer_architecture(state)
    message = str(info.value)
    assert "nearest: CIFAR ResNet-20" in message
    assert "missing layer3.2.conv1.weight" in message
    assert "shape mismatch linear.weight expects (10, 64) but has (10, 65)" in message


def test_infer_caps_long_lists_of_near_misses() -> None:
    state = meta_state(resnet(20))
    for key in [k for k in state if k.startswith("layer3.2.")]:
        del state[key]
    with pytest.raises(ArchitectureError, match=r"\(\+7 more\)"):
        infer_architecture(state)


def test_infer_unrelated_and_empty_weights() -> None:
    with pytest.raises(ArchitectureError, match="share no parameter names"):
        infer_architecture({"encoder.fc1.weight": torch.zeros(3, 4)})
    with pytest.raises(ArchitectureError, match="no tensors"):
        infer_architecture({})
    partial = {k: v for k, v in meta_state(resnet(20)).items() if k.startswith("layer1.") or k.startswith("bn1")}
    with pytest.raises(ArchitectureError, match="nearest: CIFAR ResNet-20 .*shares"):
        infer_architecture(partial)


# --- explicit overrides --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet56", "cifar_resnet56", "ResNet56"])
def test_override_by_name_keeps_inferred_details(name: str) -> None:
    spec = resnet(56, "stage", "B", classes=100)
    assert resolve_architecture(name, meta_state(spec)) == spec


def test_override_vgg_and_torchvision_names() -> None:
    assert resolve_architecture("vgg16_bn", meta_state(vgg(True, classes=100))) == vgg(True, classes=100)
    assert resolve_architecture("cifar_vgg16", meta_state(vgg(False))) == vgg(False)
    tv = torchvision_spec("resnet50", classes=10)
    assert resolve_architecture("torchvision:resnet50", meta_state(tv)) == tv
    assert resolve_architecture(None, meta_state(tv)) == tv


def test_override_errors() -> None:
    weights = meta_state(resnet(20))
    with pytest.raises(ArchitectureError, match="do not fit CIFAR ResNet-32.*they look like CIFAR ResNet-20"):
        resolve_architecture("resnet32", weights)
    with pytest.raises(ArchitectureError, match="did you mean torchvision:resnet18"):
        resolve_architecture("resnet18", weights)
    with pytest.raises(ArchitectureError, match="unknown architecture 'alexnet'"):
        resolve_architecture("alexnet", weights)
    with pytest.raises(ArchitectureError, match="unknown torchvision architecture"):
        resolve_architecture("torchvision:resnet152", weights)
    with pytest.raises(ArchitectureError, match="do not fit CIFAR VGG-16 with BN"):
        resolve_architecture("vgg16_bn", weights)


def test_every_listed_name_is_accepted() -> None:
    names = list_supported()
    assert {"resnet20", "resnet110", "vgg16_bn", "torchvision:resnet101"} <= set(names)
    for name in names:
        spec = resolve_architecture(name, meta_state(_default(name)))
        assert spec.name == name.split(":")[-1]


def _default(name: str) -> ArchSpec:
    if name.startswith("torchvision:"):
        return torchvision_spec(name.split(":")[1])
    if name.startswith("vgg"):
        return vgg(name.endswith("_bn"))
    return resnet(int(name[len("resnet"):]))


FACTORY_SOURCE = '''
from torch import nn

class Small(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.body = nn.Conv2d(in_channels, 4, 3)
        self.head = nn.Linear(4, num_classes)

def make(num_classes=10, in_channels=3):
    return Small(num_classes, in_channels)

def make_fixed():
    return Small()

def broken():
    raise ValueError("no GPU here")

def not_a_model():
    return 42
'''


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tiny user module on sys.path; returns its (test-unique) name."""
    name = "user_factory_" + "".join(c for c in tmp_path.name if c.isalnum())
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_factory_override_passes_classes_and_channels(factory_module: str) -> None:
    module = importlib.import_module(factory_module)
    weights = module.make(num_classes=5, in_channels=1).state_dict()
    spec = resolve_architecture(f"{factory_module}:make", weights)
    assert spec == ArchSpec("custom", f"{factory_module}:make", {"num_classes": 5, "in_channels": 1})
    rebuilt = build_model(spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in weights.items()}
    assert resolve_architecture(f"{factory_module}:make_fixed", module.make().state_dict()).params == {}


def test_factory_errors(factory_module: str) -> None:
    module = importlib.import_module(factory_module)
    weights = module.make(num_classes=5).state_dict()
    with pytest.raises(ArchitectureError, match="do not fit custom model .*make_fixed.*head.weight expects \\(10, 4\\)"):
        resolve_architecture(f"{factory_module}:make_fixed", weights)
    with pytest.raises(ArchitectureError, match="cannot import module 'no_such_pkg_xyz.models'.*No module named"):
        resolve_architecture("no_such_pkg_xyz.models:make", weights)
    with pytest.raises(ArchitectureError, match="has no callable 'missing'"):
        resolve_architecture(f"{factory_module}:missing", weights)
    with pytest.raises(ArchitectureError, match="failed: ValueError: no GPU here"):
        resolve_architecture(f"{factory_module}:broken", weights)
    with pytest.raises(ArchitectureError, match="returned int, not a torch nn.Module"):
        resolve_architecture(f"{factory_module}:not_a_model", weights)
    with pytest.raises(ArchitectureError, match="package.module:factory"):
        resolve_architecture(":make", weights)
