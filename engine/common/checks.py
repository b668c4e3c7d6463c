"""Value checks shared by the config dataclasses: each raises `ConfigError` naming the key
(`prune.beam_width`, `finetune.lr`) in one sentence."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError


def one_of(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def whole(key: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{key} must be a whole number of at least {low}, got {value!r}")


def real(key: str, value: Any) -> float:
    """The value as a float when it is a finite number (booleans are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def within(key: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
           what: str = "") -> None:
    """A finite number in [low, high] (or (low, high] with `low_open`); `what` rewords the bounds."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bounds = what or (f"a number in {'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high)
                          else f"a number >= {low:g}")
        raise ConfigError(f"{key} must be {bounds}, got {value!r}")


def flag(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
