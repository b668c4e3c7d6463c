"""Device selection: `auto` picks CUDA when present, else the CPU. Torch is imported on first
use, so configs naming `auto` or `cpu` are checked without loading it."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str = "auto") -> torch.device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:i` into a usable `torch.device`, with a clear error
    when CUDA is asked for but absent."""
    import torch

    key = (name or "auto").strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key == "cuda" or key.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but no CUDA device is available")
        device = torch.device(key)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")


def check_device(name: str, key: str = "device") -> None:
    """Refuse a device `resolve_device` would refuse; only names asking for CUDA load torch."""
    text = name.strip().lower() if isinstance(name, str) else None
    if text is None or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if text.startswith("cuda"):
        resolve_device(text)
