"""Attacks as plain data: a torchattacks class name, its parameters and the report label, and the
papers' default suite as text. Free of torch, so the run configuration loads without the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EPS_SPACES: tuple[str, ...] = ("pixel", "normalized")
DEFAULT_ATTACKS: tuple[str, ...] = ("fgsm:eps=0.01", "fgsm:eps=0.1", "pgd:eps=8/255,alpha=2/255,steps=3")


@dataclass(frozen=True)
class AttackSpec:
    """One attack: torchattacks class name, the parameters given for it, and its report label."""

    name: str
    params: dict
    label: str

    def to_text(self) -> str:
        """The `name:key=value,...` text that `parse_attack` reads back into this spec."""
        from .attacks import parse_attack  # checks the name against torchattacks, so load it only here

        items = [f"{key}={_value_text(value)}" for key, value in self.params.items()]
        if parse_attack(f"{self.name}:" + ",".join(items)).label != self.label:
            items.append(f"label={self.label}")
        return f"{self.name.lower()}:" + ",".join(items) if items else self.name.lower()


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)
