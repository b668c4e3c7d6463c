"""Colour scales shared by the widgets: a perceptual ramp for smoothness values (with a dimmed
twin for pruned kernels) and distinct colours for filter groups."""

from __future__ import annotations

import numpy as np
from rich.color import Color

RAMP_LEVELS = 64
# Viridis anchor points: dark purple (smooth, low) to yellow (rough, high).
_ANCHORS: tuple[tuple[int, int, int], ...] = (
    (68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37),
)
_GROUP_RGB: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (67, 99, 216), (245, 130, 49),
    (145, 30, 180), (66, 212, 244), (240, 50, 230), (191, 239, 69), (250, 190, 212),
    (70, 153, 144), (220, 190, 255), (154, 99, 36), (255, 250, 200), (128, 0, 0), (170, 255, 195),
)
PRUNED_DIM = 0.22  # brightness kept by a pruned cell, so kept kernels stand out


def _interpolate(t: float) -> tuple[int, int, int]:
    position = t * (len(_ANCHORS) - 1)
    low = min(int(position), len(_ANCHORS) - 2)
    frac = position - low
    a, b = _ANCHORS[low], _ANCHORS[low + 1]
    return tuple(round(a[i] + (b[i] - a[i]) * frac) for i in range(3))  # type: ignore[return-value]


def _dim(rgb: tuple[int, int, int], factor: float = PRUNED_DIM) -> tuple[int, int, int]:
    grey = sum(rgb) / 3
    return tuple(round((0.5 * c + 0.5 * grey) * factor) for c in rgb)  # type: ignore[return-value]


RAMP_RGB: tuple[tuple[int, int, int], ...] = tuple(
    _interpolate(i / (RAMP_LEVELS - 1)) for i in range(RAMP_LEVELS)
)
RAMP: tuple[Color, ...] = tuple(Color.from_rgb(*rgb) for rgb in RAMP_RGB)
RAMP_DIM: tuple[Color, ...] = tuple(Color.from_rgb(*_dim(rgb)) for rgb in RAMP_RGB)


def group_rgb(group: int) -> tuple[int, int, int]:
    """A colour per filter group, distinct for the first 16 groups and cycling after."""
    return _GROUP_RGB[group % len(_GROUP_RGB)]


def group_color(group: int) -> Color:
    return Color.from_rgb(*group_rgb(group))


def group_hex(group: int) -> str:
    r, g, b = group_rgb(group)
    return f"#{r:02x}{g:02x}{b:02x}"


def ramp_hex(level: int) -> str:
    r, g, b = RAMP_RGB[level]
    return f"#{r:02x}{g:02x}{b:02x}"


def scale_bounds(values: np.ndarray, log: bool = False) -> tuple[float, float]:
    """The value range the ramp spans: min..max of the finite values (positive ones on a log
    scale), widened when every value is equal so the ramp never divides by zero."""
    finite = values[np.isfinite(values)]
    if log:
        finite = finite[finite > 0]
    if finite.size == 0:
        return (0.0, 1.0) if not log else (1e-12, 1.0)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + (abs(lo) * 1e-6 or 1.0)
    return lo, hi


def quantize(values: np.ndarray, lo: float, hi: float, log: bool = False) -> np.ndarray:
    """Ramp level (0..RAMP_LEVELS-1, uint8) of every value; non-finite values map to 0."""
    data = np.asarray(values, dtype=np.float64)
    if log:
        floor = max(lo, 1e-300)
        data = np.log(np.clip(data, floor, None))
        lo, hi = np.log(floor), np.log(max(hi, floor * (1 + 1e-9)))
    scaled = (data - lo) / (hi - lo)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(np.rint(scaled * (RAMP_LEVELS - 1)), 0, RAMP_LEVELS - 1).astype(np.uint8)
