"""Adversarial robustness evaluation (SPEC §7): attacks named in text, the papers' default
suite, and clean and robust accuracy counted on the same examples.

Attacks come from torchattacks. In the default `eps_space="pixel"` the attacked model is
`Normalize → network` on [0, 1] images, so ε is in pixel units and torchattacks' [0, 1] clamp
is right. `eps_space="normalized"` reproduces the SR-GKP reference code, which attacks the bare
network on already-normalised tensors (ε in normalised units, ≈ ε·std in pixels) with FGSM on
the model's *predicted* labels. torchattacks would clamp those tensors to [0, 1], which is
wrong for normalised data, so that mode runs this module's own FGSM and PGD, which clamp to the
normalised image of the [0, 1] pixel box instead; other attacks are refused there.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from ..common.checks import MAX_SEED
from ..common.devices import resolve_device
from ..common.errors import ConfigError, DataError
from ..common.progress import ProgressCallback
from ..models.normalization import Normalization
from ..models.normalize_layer import Normalize, with_normalization
from .attack_spec import (
    DEFAULT_ATTACKS,
    EPS_KEYS,
    EPS_SPACES,
    AttackSpec,
    default_label,
    format_number,
)
from .batch_eval import (
    count_correct,
    derive_seed,
    evaluation_mode,
    first_image,
    output_classes,
    run_batches,
)

if TYPE_CHECKING:
    from torchattacks.attack import Attack

NORMALIZED_SPACE_ATTACKS = ("FGSM", "PGD")
# Wrappers take other attacks or a training loader, which text cannot express.
_WRAPPERS = {"MultiAttack", "LGV"}
# Query-based searches run their whole budget when nothing can be fooled, so an ε = 0 rerun
# would cost thousands of forward passes per image; they skip that sanity check.
_NO_ZERO_EPS_CHECK = {"AutoAttack", "Square"}
# The sanity checks use at most this many examples of the first batch, to stay cheap.
_CHECK_EXAMPLES = 32
# torchattacks gives these integer defaults, but they are real-valued (CW's c and kappa, ...).
_REAL_WITH_INT_DEFAULT = {"c", "kappa", "scale", "lam"}
# Whole-number settings (steps, restarts, queries, batch sizes) stay below this; seeds below MAX_SEED.
MAX_ATTACK_COUNT = 100_000

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Per-channel lower and upper bounds of valid inputs in normalised space.
Box = tuple[torch.Tensor, torch.Tensor]


@dataclass
class AttackResult:
    """Robust accuracy under one attack; `params` are every value the attack ran with."""

    label: str
    name: str
    params: dict
    accuracy: float
    correct: int
    n: int


@dataclass
class RobustnessReport:
    """Clean and per-attack accuracy (fractions in [0, 1]) on the same `n_examples` examples;
    `clean_predicted` counts the clean predictions per class (a collapsed model puts nearly all
    in one). `images_per_second` counts test images fully evaluated (clean plus every attack)."""

    n_examples: int
    clean_correct: int
    clean_acc: float
    attacks: list[AttackResult]
    eps_space: str
    device: str
    seconds: float
    images_per_second: float
    seed: int = 0
    warnings: list[str] = field(default_factory=list)
    clean_predicted: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RobustnessReport":
        values = dict(data)
        values["attacks"] = [AttackResult(**item) for item in data["attacks"]]
        values["warnings"] = list(data.get("warnings", []))
        values["clean_predicted"] = list(data.get("clean_predicted", []))
        return cls(**values)

    @classmethod
    def merge(cls, reports: Sequence["RobustnessReport"]) -> "RobustnessReport":
        """Combine reports of disjoint shards by summing counts; shards are taken to run in
        parallel, so `seconds` is the slowest shard's and throughput is total images over it."""
        if not reports:
            raise ConfigError("there are no robustness reports to merge")
        first = reports[0]
        signature = [(a.label, a.name, a.params) for a in first.attacks]
        for other in reports[1:]:
            if other.eps_space != first.eps_space:
                raise ConfigError("cannot merge robustness reports of different eps spaces")
            if [(a.label, a.name, a.params) for a in other.attacks] != signature:
                raise ConfigError("cannot merge robustness reports of different attack suites")
        n = sum(r.n_examples for r in reports)
        clean = sum(r.clean_correct for r in reports)
        attacks = []
        for index, (label, name, params) in enumerate(signature):
            correct = sum(r.attacks[index].correct for r in reports)
            attacks.append(AttackResult(label, name, params, correct / n, correct, n))
        seconds = max(r.seconds for r in reports)
        return cls(
            n_examples=n,
            clean_correct=clean,
            clean_acc=clean / n,
            attacks=attacks,
            eps_space=first.eps_space,
            device=",".join(dict.fromkeys(r.device for r in reports)),
            seconds=seconds,
            images_per_second=n / seconds if seconds > 0 else 0.0,
            seed=first.seed,
            warnings=list(dict.fromkeys(w for r in reports for w in r.warnings)),
            clean_predicted=[sum(counts) for counts in zip(*(r.clean_predicted for r in reports))],
        )


def attack_classes() -> dict[str, type[Attack]]:
    """Every torchattacks attack that text can configure, keyed by lower-case class name."""
    import torchattacks  # half a second to import (it loads scipy.stats): only when attacking
    from torchattacks.attack import Attack

    classes = {}
    for name in torchattacks.__all__:
        cls = getattr(torchattacks, name)
        if isinstance(cls, type) and issubclass(cls, Attack) and name not in _WRAPPERS:
            classes[name.lower()] = cls
    return classes


def attack_parameters(cls: type[Attack]) -> dict[str, inspect.Parameter]:
    """The constructor parameters of an attack class, less `self` and `model`."""
    params = inspect.signature(cls.__init__).parameters
    return {key: p for key, p in params.items() if key not in ("self", "model")}


def _attack_class(name: str) -> type[Attack]:
    classes = attack_classes()
    cls = classes.get(name.strip().lower())
    if cls is None:
        valid = ", ".join(sorted(c.__name__ for c in classes.values()))
        raise ConfigError(f"unknown attack {name.strip()!r}; valid attacks: {valid}")
    return cls


def _number(text: str) -> float | None:
    """A finite float from `text`, which may be a fraction such as `8/255`; None if not one."""
    try:
        if "/" in text:
            top, bottom = text.split("/", 1)
            value = float(top) / float(bottom)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def _number_text(text: str) -> str:
    """Canonical spelling of a number as the user wrote it: `8/255` stays a fraction."""
    if "/" in text:
        top, bottom = text.split("/", 1)
        return f"{float(top):g}/{float(bottom):g}"
    return format_number(float(text))


def _parse_value(attack: str, key: str, text: str, default: Any) -> Any:
    """Read one parameter value as the type of its default (untyped defaults take integers,
    numbers, `none` or text)."""
    raw = text.strip()
    where = f"attack {attack} parameter {key}"
    if isinstance(default, bool):
        if raw.lower() in ("true", "yes", "on", "1"):
            return True
        if raw.lower() in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{where} must be true or false, got {raw!r}")
    number = _number(raw)
    integer = isinstance(default, int) and key not in _REAL_WITH_INT_DEFAULT
    if integer or default is None and raw.lstrip("+-").isdigit():
        high = MAX_SEED if key == "seed" else MAX_ATTACK_COUNT
        if number is None or number != int(number) or not 0 <= number <= high:
            raise ConfigError(f"{where} must be a whole number from 0 to {high}, got {raw!r}")
        return int(number)
    if isinstance(default, (int, float)) or default is None and number is not None:
        if number is None:
            raise ConfigError(
                f"{where} must be a number (fractions such as 8/255 are fine), got {raw!r}"
            )
        return float(number)
    if isinstance(default, str) or default is None:
        return None if raw.lower() == "none" else raw
    raise ConfigError(f"{where} cannot be set from text")


def parse_attack(text: str) -> AttackSpec:
    """Read `name[:key=value,...]`, e.g. `pgd:eps=8/255,alpha=2/255,steps=3` or `FGSM:eps=0.01`.
    Names are any torchattacks class, case-insensitive; numbers may be fractions; `label=...`
    overrides the default label (`pgd-8/255`, `fgsm-0.01`, or the bare name without an ε)."""
    name, _, rest = text.strip().partition(":")
    cls = _attack_class(name)
    known = attack_parameters(cls)
    by_lower = {key.lower(): key for key in known}
    params: dict[str, Any] = {}
    label = None
    eps_text = None
    for item in (part.strip() for part in rest.split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise ConfigError(f"attack setting {item!r} must look like name=value")
        if key.lower() == "label":
            label = value
            continue
        if key.lower() not in by_lower:
            valid = ", ".join([*known, "label"])
            raise ConfigError(
                f"attack {cls.__name__} has no parameter {key!r}; valid parameters: {valid}"
            )
        key = by_lower[key.lower()]
        if key in params:
            raise ConfigError(f"attack {cls.__name__} parameter {key} is given twice")
        params[key] = _parse_value(cls.__name__, key, value, known[key].default)
        if key in EPS_KEYS:
            eps_text = _number_text(value)
    if eps_text is None:
        default_eps = next((known[k].default for k in EPS_KEYS if k in known), None)
        eps_text = format_number(default_eps) if isinstance(default_eps, float) else None
    spec = AttackSpec(cls.__name__, params, label or default_label(cls.__name__, eps_text))
    _resolve(spec)
    return spec


def _resolve(spec: AttackSpec) -> tuple[type[Attack], dict[str, Any]]:
    """Check a spec against its class and return the class and every parameter value (text
    values in a hand-built spec are read as `parse_attack` would)."""
    cls = _attack_class(spec.name)
    known = attack_parameters(cls)
    unknown = sorted(set(spec.params) - set(known))
    if unknown:
        raise ConfigError(
            f"attack {cls.__name__} has no parameter {unknown[0]!r}; "
            f"valid parameters: {', '.join(known)}"
        )
    missing = [k for k, p in known.items() if p.default is p.empty and k not in spec.params]
    if missing:
        raise ConfigError(f"attack {cls.__name__} needs a value for {', '.join(missing)}")
    values = {k: p.default for k, p in known.items() if p.default is not p.empty}
    for key, value in spec.params.items():
        default = known[key].default
        text_default = isinstance(default, str) or default is None
        if isinstance(value, str) and not text_default:
            value = _parse_value(cls.__name__, key, value, default)
        values[key] = value
    for key in EPS_KEYS:
        if key in spec.params and not values[key] >= 0:
            raise ConfigError(f"attack {spec.label}: {key} must not be negative")
    return cls, values


def default_suite() -> list[AttackSpec]:
    """The papers' suite: FGSM ε 0.01 and 0.1, PGD ε 8/255 with step 2/255 × 3."""
    return [parse_attack(text) for text in DEFAULT_ATTACKS]


def pixel_eps_to_normalized(eps: float, norm: Normalization) -> tuple[float, ...]:
    """Per-channel ε in normalised units for a pixel-space ε (ε / std)."""
    return tuple(eps / s for s in norm.std)


def normalized_eps_to_pixel(eps: float, norm: Normalization) -> tuple[float, ...]:
    """Per-channel ε in pixel units for a normalised-space ε (ε · std)."""
    return tuple(eps * s for s in norm.std)


def _box_fgsm(
    net: nn.Module, x: torch.Tensor, labels: torch.Tensor, eps: float, box: Box
) -> torch.Tensor:
    """FGSM in normalised space, clamped to the normalised image of the [0, 1] pixel box."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(net(x), labels), x)
    return torch.clamp(x.detach() + eps * grad.sign(), min=box[0], max=box[1])


def _box_pgd(
    net: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    box: Box,
    *,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool,
) -> torch.Tensor:
    """L∞ PGD in normalised space (torchattacks' PGD with the normalised box as the clamp)."""
    adv = x.clone()
    if random_start:
        adv = torch.clamp(adv + torch.empty_like(adv).uniform_(-eps, eps), min=box[0], max=box[1])
    for _ in range(steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(net(adv), labels), adv)
        delta = torch.clamp(adv.detach() + alpha * grad.sign() - x, min=-eps, max=eps)
        adv = torch.clamp(x + delta, min=box[0], max=box[1])
    return adv.detach()


def _build_attack(
    cls: type[Attack],
    params: dict[str, Any],
    net: nn.Module,
    box: Box | None,
) -> AttackFn:
    """An (inputs, labels) → adversarial inputs function; `box` set means normalised space."""
    if box is None:
        return cls(net, **params)
    if cls.__name__ == "FGSM":

        def fgsm(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                predicted = net(x).argmax(dim=1)
            return _box_fgsm(net, x, predicted, params["eps"], box)

        return fgsm
    return lambda x, labels: _box_pgd(
        net, x, labels, box, eps=params["eps"], alpha=params["alpha"],
        steps=params["steps"], random_start=params["random_start"],
    )


def _attack_space(
    model: nn.Module, norm: Normalization, eps_space: str, shape: torch.Size, dev: torch.device
) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], Box | None]:
    """The network attacks see, the map from [0, 1] pixels to its inputs, and (normalised
    space only) the per-channel box that [0, 1] pixels occupy there."""
    if eps_space == "pixel":
        return with_normalization(model, norm).to(dev).eval(), (lambda x: x), None
    normalize = Normalize(norm).to(dev)
    zeros = torch.zeros(1, *shape, device=dev)
    box = (normalize(zeros), normalize(zeros + 1))
    return model, normalize, box


def _first_batch_warnings(
    net: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    runs: list[tuple[AttackSpec, type[Attack], dict[str, Any], AttackFn]],
    box: Box | None,
    seed: int,
) -> list[str]:
    """Sanity checks on the start of the first batch: input gradients are not all zero, and
    each ε attack at ε = 0 leaves the correct count unchanged."""
    x, labels = x[:_CHECK_EXAMPLES], labels[:_CHECK_EXAMPLES]
    clean = count_correct(net, x, labels)
    warnings = []
    x_grad = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(net(x_grad), labels), x_grad)
    if not bool(torch.any(grad != 0)):
        warnings.append(
            "input gradients are zero on the first batch: gradient attacks cannot move the "
            "inputs, so robust accuracy here is not meaningful"
        )
    for spec, cls, params, _ in runs:
        eps_key = next((k for k in EPS_KEYS if k in params), None)
        if eps_key is None or cls.__name__ in _NO_ZERO_EPS_CHECK:
            continue
        torch.manual_seed(seed)
        unmoved = _build_attack(cls, {**params, eps_key: 0.0}, net, box)(x, labels)
        still = count_correct(net, unmoved, labels)
        if still != clean:
            warnings.append(
                f"{spec.label} at {eps_key}=0 changed the correct count on the first batch "
                f"({clean} -> {still} of {len(labels)}): the model or the attack is not "
                "deterministic"
            )
    return warnings


def _check_eps_space(eps_space: str, classes: Sequence[type[Attack]]) -> None:
    if eps_space not in EPS_SPACES:
        raise ConfigError(f"eps_space must be one of {', '.join(EPS_SPACES)}, got {eps_space!r}")
    if eps_space == "normalized":
        refused = [cls.__name__ for cls in classes if cls.__name__ not in NORMALIZED_SPACE_ATTACKS]
        if refused:
            raise ConfigError(
                f"eps_space 'normalized' supports only {' and '.join(NORMALIZED_SPACE_ATTACKS)} "
                f"(the reference code's attacks), not {', '.join(refused)}"
            )


def _complete(
    spec: AttackSpec, params: dict[str, Any], seed: int, n_classes: int
) -> dict[str, Any]:
    """Fill what the run knows and the user did not say: the seed of seeded attacks (AutoAttack's
    default is the clock) and the model's class count."""
    if "seed" in params and "seed" not in spec.params:
        params["seed"] = seed
    if "n_classes" in params and "n_classes" not in spec.params:
        params["n_classes"] = n_classes
    return params


def _rng_scope() -> Any:
    """A forked torch RNG (CPU and every CUDA device, all of which `torch.manual_seed` seeds),
    so seeding attacks leaves the caller's random state as it was."""
    return torch.random.fork_rng(devices=list(range(torch.cuda.device_count())))


def adversarial_examples(
    model: nn.Module,
    normalization: Normalization,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack: AttackSpec | str,
    *,
    eps_space: str = "pixel",
    device: str = "auto",
    seed: int = 0,
) -> torch.Tensor:
    """One attack's adversarial versions of a batch of [0, 1] images, returned as [0, 1] CPU
    pixels (to show them, or to check an attack); seeded as `evaluate_robustness` seeds its
    first attack on its first batch."""
    spec = parse_attack(attack) if isinstance(attack, str) else attack
    cls, params = _resolve(spec)
    _check_eps_space(eps_space, [cls])
    if images.dim() != 4 or len(images) != len(labels):
        raise DataError("adversarial_examples takes an (N, C, H, W) image batch and N labels")
    dev = resolve_device(device)
    norm = normalization.for_channels(images.shape[1])
    with evaluation_mode(model, dev), _rng_scope():
        net, to_space, box = _attack_space(model, norm, eps_space, images.shape[1:], dev)
        x = to_space(images.to(dev))
        params = _complete(spec, params, seed, output_classes(net, x[:1]))
        torch.manual_seed(derive_seed(seed, 0, 0))
        adv = _build_attack(cls, params, net, box)(x, labels.to(dev)).detach()
    if box is not None:
        std, mean = (torch.tensor(v, device=dev).view(1, -1, 1, 1) for v in (norm.std, norm.mean))
        adv = adv * std + mean
    return adv.cpu()


def evaluate_robustness(
    model: nn.Module,
    normalization: Normalization,
    dataset: object,
    attacks: Sequence[AttackSpec | str] | None = None,
    *,
    eps_space: str = "pixel",
    batch_size: int = 128,
    device: str = "auto",
    max_examples: int | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> RobustnessReport:
    """Clean and robust accuracy of `model` (which expects normalised input) on the first
    `max_examples` ([0, 1] image, label) items of `dataset`, in eval mode (restored after).

    Each attack on each batch starts from torch seeded by (seed, attack, batch), inside a forked
    RNG so the caller's random state is untouched. On up to 32 examples of the first batch it
    checks that input gradients are non-zero and that every ε attack at ε = 0 reproduces the
    clean count (except AutoAttack and Square, whose ε = 0 run is a full query budget); failures
    are recorded in `warnings`. `attacks=None` runs the default suite."""
    specs = [parse_attack(a) if isinstance(a, str) else a for a in (DEFAULT_ATTACKS if attacks is None else attacks)]
    labels = [s.label for s in specs]
    duplicate = next((lab for lab in labels if labels.count(lab) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"two attacks share the label {duplicate!r}; give one a label=...")
    resolved = [_resolve(spec) for spec in specs]
    _check_eps_space(eps_space, [cls for cls, _ in resolved])
    dev = resolve_device(device)
    image = first_image(dataset)
    norm = normalization.for_channels(image.shape[0])
    started = time.perf_counter()
    warnings: list[str] = []
    with evaluation_mode(model, dev), _rng_scope():
        net, to_space, box = _attack_space(model, norm, eps_space, image.shape, dev)
        n_classes = output_classes(net, to_space(image[None].to(dev)))
        runs = []
        for spec, (cls, params) in zip(specs, resolved):
            params = _complete(spec, params, seed, n_classes)
            runs.append((spec, cls, params, _build_attack(cls, params, net, box)))

        predicted = torch.zeros(n_classes, dtype=torch.long)

        def score(images: torch.Tensor, targets: torch.Tensor, index: int) -> dict[str, int]:
            x = to_space(images)
            with torch.no_grad():
                guess = net(x).argmax(dim=1)
            predicted.add_(torch.bincount(guess.cpu(), minlength=n_classes))
            counts = {"clean": int((guess == targets).sum())}
            if index == 0:
                warnings.extend(_first_batch_warnings(net, x, targets, runs, box, seed))
            for number, (spec, _, _, attack) in enumerate(runs):
                torch.manual_seed(derive_seed(seed, number, index))
                counts[spec.label] = count_correct(net, attack(x, targets), targets)
            return counts

        totals = run_batches(
            dataset, score, batch_size=batch_size, device=dev, max_examples=max_examples,
            stage="evaluate", progress=progress, cancel=cancel,
        )
    seconds = time.perf_counter() - started
    n = totals.n
    results = [
        AttackResult(spec.label, cls.__name__, params, correct / n, correct, n)
        for spec, cls, params, _ in runs
        for correct in [totals.correct[spec.label]]
    ]
    clean = totals.correct["clean"]
    return RobustnessReport(
        n_examples=n,
        clean_correct=clean,
        clean_acc=clean / n,
        attacks=results,
        eps_space=eps_space,
        device=str(dev),
        seconds=seconds,
        images_per_second=n / seconds if seconds > 0 else 0.0,
        seed=seed,
        warnings=warnings,
        clean_predicted=predicted.tolist(),
    )
