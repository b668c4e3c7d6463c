"""Value checks shared by every config dataclass: each raises `ConfigError` naming the key
(`prune.beam_width`, `finetune.lr`) in one sentence of one style, "KEY must be ..., got VALUE"."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError

MAX_SEED = 2**32 - 1  # what every seeded generator the engine uses accepts


def _fail(key: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{key} must be {what}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_whole(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def one_of(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
        raise _fail(key, "one of " + ", ".join(str(a) for a in allowed), value)


def whole(key: str, value: Any, low: int, high: int | None = None) -> None:
    """A whole number in [low, high] (no upper bound when `high` is None)."""
    if not is_whole(value) or value < low or (high is not None and value > high):
        what = f"a whole number of at least {low}" if high is None else f"a whole number from {low} to {high}"
        raise _fail(key, what, value)


def real(key: str, value: Any) -> float:
    """The value as a float when it is a finite number (booleans are not)."""
    if not _is_number(value):
        raise _fail(key, "a finite number", value)
    return float(value)


def within(key: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False, what: str = "") -> None:
    """A finite number in [low, high], either end open on request; `what` rewords the bounds."""
    ok = _is_number(value) and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        if not what:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            what = f"a number in {left}{low:g}, {high:g}{right}" if math.isfinite(high) else (
                f"a number {'>' if low_open else '>='} {low:g}")
        raise _fail(key, what, value)


def flag(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value)


def utf8(key: str, value: Any) -> None:
    """Text (or a list of texts) that encodes as UTF-8: a command-line argument or file name in
    another encoding cannot be written to the run's config, log or report."""
    for text in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _fail(key, "UTF-8 text", text) from None


def texts(key: str, value: Any, *, non_empty: bool = False, distinct: bool = False) -> None:
    """A list of strings, optionally non-empty and without repeats."""
    ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    ok = ok and (not non_empty or len(value) > 0) and (not distinct or len(set(value)) == len(value))
    if not ok:
        what = "a list of " + ("distinct " if distinct else "") + "names" + (", not empty" if non_empty else "")
        raise _fail(key, what, value)


def wholes(key: str, value: Any, low: int, high: int | None = None, *, increasing: bool = False,
           non_empty: bool = False) -> None:
    """A list of whole numbers in [low, high], optionally strictly increasing and non-empty."""
    ok = isinstance(value, (list, tuple)) and all(is_whole(v) for v in value)
    ok = ok and all(v >= low and (high is None or v <= high) for v in value)
    ok = ok and (not increasing or all(a < b for a, b in zip(value, value[1:])))
    ok = ok and (not non_empty or len(value) > 0)
    if not ok:
        span = f"at least {low}" if high is None else f"from {low} to {high}"
        what = ("a non-empty " if non_empty else "a ") + ("strictly increasing " if increasing else "") + f"list of whole numbers {span}"
        raise _fail(key, what, value)
