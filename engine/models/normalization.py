"""Input normalisation: a property the user sets (it is not in a state dict) and that the
workbench stores in every checkpoint it writes. Plain data here; the layer that applies it is in
`normalize_layer`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..common.errors import ConfigError


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std applied to [0, 1] pixels before the network."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ConfigError("normalisation needs as many std values as mean values")
        if not all(math.isfinite(m) for m in self.mean):
            raise ConfigError(f"normalisation mean values must be finite numbers, got {list(self.mean)}")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ConfigError(f"normalisation std values must be positive finite numbers, got {list(self.std)}")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def for_channels(self, channels: int) -> "Normalization":
        """Broadcast a one-channel normalisation to `channels` channels (or check it fits)."""
        if self.channels == channels:
            return self
        if self.channels == 1:
            return Normalization(self.mean * channels, self.std * channels)
        raise ConfigError(
            f"normalisation has {self.channels} channels but the model takes {channels}"
        )

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Normalization":
        try:
            return cls(tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad normalisation record {data!r}") from exc

    def describe(self) -> str:
        fmt = lambda vals: ", ".join(f"{v:.4g}" for v in vals)  # noqa: E731
        return f"mean ({fmt(self.mean)}) std ({fmt(self.std)})"


PRESETS: dict[str, Normalization] = {
    "cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": Normalization((0.0,), (1.0,)),
}


def parse_normalization(text: str) -> Normalization:
    """Parse a preset name (`cifar10`, `imagenet`, `none`) or `MEAN,STD` / `m1,m2,m3,s1,s2,s3`
    / `m1,m2,m3/s1,s2,s3`."""
    key = text.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    try:
        if "/" in key:
            left, right = key.split("/", 1)
            mean = tuple(float(v) for v in left.split(","))
            std = tuple(float(v) for v in right.split(","))
        else:
            values = [float(v) for v in key.split(",")]
            if len(values) % 2:
                raise ValueError
            half = len(values) // 2
            mean, std = tuple(values[:half]), tuple(values[half:])
    except ValueError:
        raise ConfigError(
            f"cannot read normalisation {text!r}: use cifar10, imagenet, none, MEAN,STD, "
            "or m1,m2,m3/s1,s2,s3"
        ) from None
    return Normalization(mean, std)
