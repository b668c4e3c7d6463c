"""Attacks as plain data: a torchattacks class name, its parameters and the report label, and the
papers' default suite as text. Free of torch, so the run configuration loads without the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EPS_SPACES: tuple[str, ...] = ("pixel", "normalized")
DEFAULT_ATTACKS: tuple[str, ...] = ("fgsm:eps=0.01", "fgsm:eps=0.1", "pgd:eps=8/255,alpha=2/255,steps=3")
# The parameters that name an attack's budget ε, and so its default label.
EPS_KEYS: tuple[str, ...] = ("eps", "max_epsilon")


@dataclass(frozen=True)
class AttackSpec:
    """One attack: torchattacks class name, the parameters given for it, and its report label."""

    name: str
    params: dict
    label: str

    def to_text(self) -> str:
        """The `name:key=value,...` text that `parse_attack` reads back into this spec; the label
        is written out unless the ε given implies it."""
        items = [f"{key}={_value_text(value)}" for key, value in self.params.items()]
        eps = next((self.params[key] for key in EPS_KEYS if key in self.params), None)
        if eps is None or self.label != default_label(self.name, format_number(float(eps))):
            items.append(f"label={self.label}")
        return f"{self.name.lower()}:" + ",".join(items) if items else self.name.lower()


def default_label(name: str, eps_text: str | None) -> str:
    """`pgd-8/255`, `fgsm-0.01`, or the bare name when the attack has no ε."""
    return name.lower() if eps_text is None else f"{name.lower()}-{eps_text}"


def format_number(value: float) -> str:
    """Short spelling of a value: long decimals that are multiples of 1/255 below 1 (such as
    0.0313725...) as `k/255`."""
    steps = value * 255
    if 0 < value < 1 and abs(steps - round(steps)) < 1e-9 and f"{value:g}" != f"{value:.4g}":
        return f"{round(steps)}/255"
    return f"{value:g}"


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)
