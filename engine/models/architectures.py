"""Architecture specs: what network a state dict belongs to, inferred from its keys and shapes or
named by the user, and how to build it fresh.

Accepted names for an explicit override (case-insensitive):
- `resnet20`, `resnet32`, `resnet44`, `resnet56`, `resnet110` (any depth 6n+2), optionally
  prefixed `cifar_`: a CIFAR ResNet; naming, shortcut option, width, classes and input
  channels still come from the weights.
- `vgg16`, `vgg16_bn`, optionally prefixed `cifar_`: CIFAR VGG-16 without / with BatchNorm.
- `torchvision:resnet18`, `torchvision:resnet34`, `torchvision:resnet50`,
  `torchvision:resnet101`, `torchvision:vgg16`, `torchvision:vgg16_bn`: torchvision models
  (a bare `resnet50` means the CIFAR ResNet-50, since 50 = 6·8+2).
- `package.module:factory`: the user's own model; the factory is called with `num_classes` and
  `in_channels` (taken from the weights) when it accepts them, otherwise with no arguments.
  Only the user names code to run: a stored spec (`ArchSpec.from_dict`) of the `custom` family
  is refused unless the caller allows that factory, and every other stored spec must be one of
  the built-in families with parameters in range.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..common.checks import flag, one_of, whole
from ..common.errors import ArchitectureError, ConfigError
from .cifar_resnet import MAX_DEPTH, NAMINGS, SHORTCUTS, CifarResNet, blocks_per_stage
from .cifar_vgg import HEADS, MLP_HEAD_INDICES, CifarVGG16

FAMILIES: tuple[str, ...] = ("cifar_resnet", "cifar_vgg", "torchvision", "custom")
CIFAR_RESNET_DEPTHS: tuple[int, ...] = (20, 32, 44, 56, 110)
TORCHVISION_RESNETS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
TORCHVISION_VGGS: tuple[str, ...] = ("vgg16", "vgg16_bn")
FACTORY_FORM = "package.module:factory"
_FACTORY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
_SHOWN = 3  # near misses listed per kind in an error message
# Ranges of stored architecture parameters: wide enough for any model the families describe,
# small enough that checking a spec (built on the meta device) costs nothing.
MAX_WIDTH = 1024
MAX_CLASSES = 100_000
MAX_IN_CHANNELS = 1024
MAX_HIDDEN = 65_536

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class ArchSpec:
    """A buildable architecture: `family` (one of FAMILIES), `name` (e.g. "resnet20",
    "vgg16_bn", "resnet50", "pkg.mod:factory") and JSON-plain constructor `params`."""

    family: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "name": self.name, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: Any, *, allow_factory: Callable[[str], bool] = lambda name: False) -> "ArchSpec":
        """A stored spec, checked against the closed list of families and parameter ranges
        (`ConfigError` naming the field). A `custom` factory is code, so it is accepted only when
        `allow_factory(name)` says the user chose it (`ArchitectureError` otherwise)."""
        if not isinstance(data, dict) or not isinstance(data.get("params", {}), dict):
            raise ConfigError(f"arch must be a record with family, name and params, got {_short(data)}")
        family, name, params = data.get("family"), data.get("name"), dict(data.get("params", {}))
        one_of("arch.family", family, FAMILIES)
        if not isinstance(name, str):
            raise ConfigError(f"arch.name must be text, got {_short(name)}")
        _check_params(family, name, params)
        if family == "custom" and not allow_factory(name):
            raise ArchitectureError(f"the architecture names the model factory {name}, which is code; it runs only when you name it")
        return cls(family, name, params)

    def describe(self) -> str:
        """One-line human label, e.g. "CIFAR ResNet-20 (conv1/layer naming, option A: zero-pad
        both sides), 10 classes, 3 input channels"."""
        p = self.params
        io_part = ""
        if "num_classes" in p and "in_channels" in p:
            io_part = f", {_plural(p['num_classes'], 'class', 'classes')}, " + _plural(
                p["in_channels"], "input channel", "input channels"
            )
        if self.family == "cifar_resnet":
            naming = "conv1/layer naming" if p.get("naming") == "layer" else "conv_1_3x3/stage naming"
            if p.get("shortcut") == "B":
                option = "option B: 1x1 conv shortcut"
            elif p.get("naming") == "layer":
                option = "option A: zero-pad both sides"
            else:
                option = "option A: avg-pool, zeros appended"
            width = "" if p.get("width", 16) == 16 else f", base width {p['width']}"
            return f"CIFAR ResNet-{p.get('depth')} ({naming}, {option}){width}{io_part}"
        if self.family == "cifar_vgg":
            bn = " with BN" if p.get("batch_norm") else " without BN"
            head = "linear head" if p.get("head", "linear") == "linear" else f"3-layer head, {p.get('hidden')} hidden"
            return f"CIFAR VGG-16{bn} ({head}){io_part}"
        if self.family == "torchvision":
            return f"torchvision {_pretty_torchvision(self.name)}{io_part}"
        args = ", ".join(f"{k}={v}" for k, v in sorted(p.items()))
        return f"custom model {self.name}({args})"


@dataclass
class StateMismatch:
    """How a state dict differs from what a model expects: keys missing from the state dict,
    keys the model does not have, and `(key, expected, found)` shape conflicts."""

    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    @property
    def total(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.wrong_shape)

    @property
    def first_key(self) -> str | None:
        """The first differing key (shape conflicts, then missing, then unexpected)."""
        for items in ([k for k, _, _ in self.wrong_shape], self.missing, self.unexpected):
            if items:
                return items[0]
        return None

    def summary(self) -> str:
        """Readable, capped list of the differences."""

        def capped(items: list[str]) -> str:
            more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
            return ", ".join(items[:_SHOWN]) + more

        parts = []
        if self.missing:
            parts.append(f"missing {capped(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {capped(self.unexpected)}")
        if self.wrong_shape:
            shapes = [f"{k} expects {tuple(e)} but has {tuple(f)}" for k, e, f in self.wrong_shape]
            parts.append(f"shape mismatch {capped(shapes)}")
        return "; ".join(parts) if parts else "no differences"


def tensor_shapes(state_dict: Mapping[str, Any]) -> Shapes:
    """Key → shape for every tensor of a state dict."""
    return {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def compare_shapes(expected: Shapes, found: Shapes) -> StateMismatch:
    """Differences between the keys/shapes a model expects and those a state dict has; a missing
    BatchNorm `num_batches_tracked` counter is tolerated (older checkpoints lack it)."""
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    wrong = [(k, expected[k], found[k]) for k in expected if k in found and expected[k] != found[k]]
    return StateMismatch(missing, unexpected, wrong)


_PARAMS: dict[str, tuple[str, ...]] = {
    "cifar_resnet": ("depth", "naming", "shortcut", "width", "num_classes", "in_channels"),
    "cifar_vgg": ("batch_norm", "head", "hidden", "num_classes", "in_channels"),
    "torchvision": ("num_classes", "in_channels"),
    "custom": ("num_classes", "in_channels"),
}


def _check_params(family: str, name: str, params: dict[str, Any]) -> None:
    """`ConfigError` naming the first stored parameter outside its family's keys or range."""
    unknown = sorted(str(k) for k in params if k not in _PARAMS[family])
    if unknown:
        one_of(f"each of arch.params ({family})", unknown[0], _PARAMS[family])
    for key, high in (("num_classes", MAX_CLASSES), ("in_channels", MAX_IN_CHANNELS), ("width", MAX_WIDTH),
                      ("hidden", MAX_HIDDEN)):
        if key in params:
            whole(f"arch.params.{key}", params[key], 1, high)
    if family == "cifar_resnet":
        depth = params.get("depth")
        try:
            blocks_per_stage(depth)  # type: ignore[arg-type]
        except ArchitectureError as exc:
            raise ConfigError(f"arch.params.depth: {exc}") from None
        one_of("arch.name", name, (f"resnet{depth}",))
        one_of("arch.params.naming", params.get("naming", "layer"), NAMINGS)
        one_of("arch.params.shortcut", params.get("shortcut", "A"), SHORTCUTS)
    elif family == "cifar_vgg":
        one_of("arch.name", name, ("vgg16", "vgg16_bn"))
        flag("arch.params.batch_norm", params.get("batch_norm", True))
        if params.get("batch_norm", True) != (name == "vgg16_bn"):
            raise ConfigError(f"arch.params.batch_norm must be {name == 'vgg16_bn'} for {name}, got {params.get('batch_norm', True)}")
        one_of("arch.params.head", params.get("head", "linear"), HEADS)
    elif family == "torchvision":
        one_of("arch.name", name, (*TORCHVISION_RESNETS, *TORCHVISION_VGGS))
    elif not _FACTORY_NAME.fullmatch(name):
        raise ConfigError(f"arch.name must be a {FACTORY_FORM} name, got {_short(name)}")


def _short(value: Any) -> str:
    """repr of a value read from a file, cut short for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_factory(arch: str) -> bool:
    """Whether an architecture name is a user's `package.module:factory` (code to import)."""
    text = arch.strip()
    return ":" in text and not text.lower().startswith("torchvision:")


def build_model(spec: ArchSpec) -> nn.Module:
    """A fresh, randomly initialised model for `spec`."""
    params = dict(spec.params)
    try:
        if spec.family == "cifar_resnet":
            return CifarResNet(**params)
        if spec.family == "cifar_vgg":
            return CifarVGG16(**params)
        if spec.family == "torchvision":
            return _build_torchvision(spec.name, **params)
        if spec.family == "custom":
            return _call_factory(spec.name, _import_factory(spec.name), params)
    except TypeError as exc:
        raise ArchitectureError(f"cannot build {spec.name} with parameters {params}: {exc}") from None
    raise ArchitectureError(f"unknown architecture family {spec.family!r} (expects one of {FAMILIES})")


def list_supported() -> list[str]:
    """Architecture names accepted by `resolve_architecture`, for help text (besides
    `package.module:factory`)."""
    return (
        [f"resnet{d}" for d in CIFAR_RESNET_DEPTHS]
        + ["vgg16", "vgg16_bn"]
        + [f"torchvision:{name}" for name in (*TORCHVISION_RESNETS, *TORCHVISION_VGGS)]
    )


def infer_architecture(state_dict: Mapping[str, Any]) -> ArchSpec:
    """The supported architecture whose keys and shapes match `state_dict` exactly (classes and
    input channels from the weights); `ArchitectureError` naming the nearest candidates if none."""
    return _infer(tensor_shapes(state_dict))


def _infer(shapes: Shapes) -> ArchSpec:
    """`infer_architecture` on keys and shapes."""
    if not shapes:
        raise ArchitectureError("the state dict holds no tensors, so there is no architecture to infer")
    candidates = _guesses(shapes)
    scored = sorted(((compare_shapes(_expected_shapes(spec), shapes), spec) for spec in candidates),
                    key=lambda pair: pair[0].total)
    if scored and scored[0][0].total == 0:
        return scored[0][1]
    if scored:
        near = "; or ".join(f"{spec.describe()} ({mm.summary()})" for mm, spec in scored[:2])
        raise ArchitectureError(
            f"the weights do not match any supported architecture; nearest: {near}; "
            f"name the architecture or give a {FACTORY_FORM}"
        )
    raise ArchitectureError(_no_family_message(shapes))


def resolve_architecture(arch: str | None, state_dict: Mapping[str, Any]) -> ArchSpec:
    """`arch` (a name from the module docstring or `package.module:factory`) checked against the
    weights, or the inferred architecture when `arch` is None."""
    if arch is None:
        return infer_architecture(state_dict)
    shapes = tensor_shapes(state_dict)
    text = arch.strip()
    lowered = text.lower()
    if is_factory(text):
        spec = _factory_spec(text, shapes)
        mismatch = compare_shapes(tensor_shapes(build_model(spec).state_dict()), shapes)
    else:
        spec = _named_spec(lowered, shapes)
        mismatch = compare_shapes(_expected_shapes(spec), shapes)
    if mismatch.total:
        raise ArchitectureError(f"the weights do not fit {spec.describe()}: {mismatch.summary()}{_hint(shapes)}")
    return spec


# --- guesses from keys and shapes -------------------------------------------------------------


def _guesses(shapes: Shapes) -> list[ArchSpec]:
    """Every family's best guess for these keys (each still to be verified)."""
    guesses = [_guess_cifar_resnet(shapes, naming) for naming in NAMINGS]
    guesses += [_guess_cifar_vgg(shapes), _guess_torchvision_resnet(shapes), _guess_torchvision_vgg(shapes)]
    return [g for g in guesses if g is not None]


def _io_params(shapes: Shapes) -> dict[str, int]:
    """num_classes from the last 2-D weight, in_channels from the first 4-D weight."""
    params: dict[str, int] = {}
    convs = [s for s in shapes.values() if len(s) == 4]
    linears = [s for s in shapes.values() if len(s) == 2]
    if convs:
        params["in_channels"] = convs[0][1]
    if linears:
        params["num_classes"] = linears[-1][0]
    return params


def _block_count(shapes: Shapes, prefix: str) -> int:
    """Number of blocks `prefix.<i>.` in a Sequential stage (highest index + 1)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = [int(m.group(1)) for k in shapes if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _guess_cifar_resnet(shapes: Shapes, naming: str) -> ArchSpec | None:
    """CIFAR ResNet in `naming`: depth from the first stage's block count, option B if any
    shortcut has a conv, width/classes/channels from the stem and head."""
    layer = naming == "layer"
    stem, stage, head = ("conv1", "layer", "linear") if layer else ("conv_1_3x3", "stage_", "classifier")
    stem_shape, head_shape = shapes.get(f"{stem}.weight"), shapes.get(f"{head}.weight")
    n = _block_count(shapes, f"{stage}1")
    if stem_shape is None or head_shape is None or len(stem_shape) != 4 or len(head_shape) != 2 or n == 0:
        return None
    shortcut = "shortcut" if layer else "downsample"
    option = "B" if any(k.endswith(f".{shortcut}.0.weight") for k in shapes) else "A"
    return ArchSpec("cifar_resnet", f"resnet{6 * n + 2}", {
        "depth": 6 * n + 2, "naming": naming, "shortcut": option, "width": stem_shape[0],
        "num_classes": head_shape[0], "in_channels": stem_shape[1],
    })


def _guess_cifar_vgg(shapes: Shapes) -> ArchSpec | None:
    """CIFAR VGG-16: BN from `features.1`, head from the classifier keys."""
    first = shapes.get("features.0.weight")
    if first is None or len(first) != 4:
        return None
    params: dict[str, Any] = {"batch_norm": "features.1.running_mean" in shapes, "in_channels": first[1]}
    if "classifier.weight" in shapes:
        params.update(head="linear", num_classes=shapes["classifier.weight"][0])
    else:
        hidden_key, _, last_key = (f"classifier.{i}.weight" for i in MLP_HEAD_INDICES)
        if hidden_key not in shapes or last_key not in shapes or shapes[hidden_key][1] != 512:
            return None
        params.update(head="mlp", hidden=shapes[hidden_key][0], num_classes=shapes[last_key][0])
    return ArchSpec("cifar_vgg", "vgg16_bn" if params["batch_norm"] else "vgg16", params)


def _guess_torchvision_resnet(shapes: Shapes) -> ArchSpec | None:
    """torchvision ResNet with the block type of the weights and the closest block counts."""
    if "fc.weight" not in shapes or "conv1.weight" not in shapes or len(shapes["fc.weight"]) != 2:
        return None
    kind = "bottleneck" if "layer1.0.conv3.weight" in shapes else "basic"
    counts = tuple(_block_count(shapes, f"layer{i}") for i in range(1, 5))
    name = min(
        (name for name, (k, _) in TORCHVISION_RESNETS.items() if k == kind),
        key=lambda name: sum(abs(a - b) for a, b in zip(TORCHVISION_RESNETS[name][1], counts)),
    )
    return ArchSpec("torchvision", name, {
        "num_classes": shapes["fc.weight"][0], "in_channels": shapes["conv1.weight"][1],
    })


def _guess_torchvision_vgg(shapes: Shapes) -> ArchSpec | None:
    """torchvision VGG-16 (BN from `features.1`), recognised by its three-layer classifier."""
    first, last = shapes.get("features.0.weight"), shapes.get("classifier.6.weight")
    if first is None or last is None or "classifier.0.weight" not in shapes:
        return None
    name = "vgg16_bn" if "features.1.running_mean" in shapes else "vgg16"
    return ArchSpec("torchvision", name, {"num_classes": last[0], "in_channels": first[1]})


def _expected_shapes(spec: ArchSpec) -> Shapes:
    """Keys and shapes of a built-in spec's state dict, built on the meta device (no memory)."""
    with torch.device("meta"):
        return tensor_shapes(build_model(spec).state_dict())


def _no_family_message(shapes: Shapes) -> str:
    """Error text when no family recognises the keys: the canonical architectures sharing the
    most parameter names, or a plain statement that none shares any."""
    keys = set(shapes)
    io = {"num_classes": 10, "in_channels": 3, **_io_params(shapes)}
    overlaps = []
    for name in list_supported():
        spec = _named_spec(name, {}, io)
        expected = set(_expected_shapes(spec))
        overlaps.append((len(keys & expected), spec, expected))
    overlaps.sort(key=lambda item: -item[0])
    first = ", ".join(list(shapes)[:_SHOWN])
    if overlaps[0][0] == 0:
        return (
            f"the weights (keys {first}, ...) share no parameter names with any supported "
            f"architecture; name the architecture or give a {FACTORY_FORM}"
        )
    near = "; or ".join(
        f"{spec.describe()} (shares {count} of its {len(expected)} keys)" for count, spec, expected in overlaps[:2]
    )
    return f"the weights (keys {first}, ...) do not match any supported architecture; nearest: {near}"


def _hint(shapes: Shapes) -> str:
    """", they look like <inferred>" when inference finds a match, for override errors."""
    try:
        return f" (they look like {_infer(shapes).describe()})"
    except ArchitectureError:
        return ""


# --- explicit names ---------------------------------------------------------------------------


def _named_spec(name: str, shapes: Shapes, io: dict[str, int] | None = None) -> ArchSpec:
    """The spec for a built-in `name`, taking every parameter the name does not fix from the
    family's guess on `shapes` (or from `io` and defaults when the keys are of another family)."""
    io = io if io is not None else {"num_classes": 10, "in_channels": 3, **_io_params(shapes)}
    if name.startswith("torchvision:"):
        tv = name.split(":", 1)[1]
        if tv not in TORCHVISION_RESNETS and tv not in TORCHVISION_VGGS:
            raise ArchitectureError(f"unknown torchvision architecture {tv!r}; supported: {', '.join(list_supported())}")
        guess = _guess_torchvision_resnet(shapes) if tv.startswith("resnet") else _guess_torchvision_vgg(shapes)
        params = dict(guess.params) if guess is not None else dict(io)
        return ArchSpec("torchvision", tv, params)
    bare = name.removeprefix("cifar_").removeprefix("cifar-")
    if bare.replace("-", "_") in ("vgg16_bn", "vgg16bn", "vgg16"):
        batch_norm = bare != "vgg16"
        guess = _guess_cifar_vgg(shapes)
        params = dict(guess.params) if guess is not None else {"head": "linear", **io}
        params["batch_norm"] = batch_norm
        return ArchSpec("cifar_vgg", "vgg16_bn" if batch_norm else "vgg16", params)
    match = re.fullmatch(r"resnet-?(\d+)", bare)
    if match:
        depth = int(match.group(1))
        try:
            blocks_per_stage(depth)
        except ArchitectureError:
            alt = f"; did you mean torchvision:resnet{depth}?" if f"resnet{depth}" in TORCHVISION_RESNETS else ""
            raise ArchitectureError(f"a CIFAR ResNet has depth 6n+2 up to {MAX_DEPTH} (20, 32, 44, 56, 110, ...), not {depth}{alt}") from None
        guess = next((g for g in (_guess_cifar_resnet(shapes, n) for n in NAMINGS) if g is not None), None)
        params = dict(guess.params) if guess is not None else {"naming": "layer", "shortcut": "A", "width": 16, **io}
        params["depth"] = depth
        return ArchSpec("cifar_resnet", f"resnet{depth}", params)
    raise ArchitectureError(
        f"unknown architecture {name!r}; use one of {', '.join(list_supported())} or {FACTORY_FORM}"
    )


# --- user factories ---------------------------------------------------------------------------


def _import_factory(target: str) -> Callable[..., Any]:
    """The callable named by `package.module:factory`, imported."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ArchitectureError(f"a model factory is written {FACTORY_FORM}, not {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchitectureError(f"cannot import module {module_name!r} for model factory {target}: {exc}") from None
    except Exception as exc:  # the user's module may raise anything while importing
        raise ArchitectureError(f"importing {module_name!r} for {target} failed: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ArchitectureError(f"module {module_name!r} has no callable {attr!r} for model factory {target}")
    return factory


def _accepted(factory: Callable[..., Any], candidates: dict[str, Any]) -> dict[str, Any]:
    """The subset of `candidates` the factory's signature accepts by keyword."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(candidates)
    return {k: v for k, v in candidates.items() if k in parameters}


def _call_factory(target: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> nn.Module:
    """Call a user factory, turning its failures and non-module results into ArchitectureError."""
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's factory may raise anything
        raise ArchitectureError(f"model factory {target} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"model factory {target} returned {type(model).__name__}, not a torch nn.Module")
    return model


def _factory_spec(target: str, shapes: Shapes) -> ArchSpec:
    """Spec of a user factory, passing num_classes/in_channels from the weights if it takes them."""
    factory = _import_factory(target)
    return ArchSpec("custom", target, _accepted(factory, _io_params(shapes)))


# --- torchvision ------------------------------------------------------------------------------


def _build_torchvision(name: str, num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    """A torchvision ResNet/VGG with `num_classes` outputs; the first conv is replaced when the
    input has other than 3 channels."""
    import torchvision  # deferred: slow to import and only needed for these models

    if name not in TORCHVISION_RESNETS and name not in TORCHVISION_VGGS:
        raise ArchitectureError(f"unknown torchvision architecture {name!r}")
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        if name in TORCHVISION_RESNETS:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    return model


def _pretty_torchvision(name: str) -> str:
    if name.startswith("resnet"):
        return f"ResNet-{name[len('resnet'):]}"
    return "VGG-16-BN" if name == "vgg16_bn" else "VGG-16"


def _plural(count: Any, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"
