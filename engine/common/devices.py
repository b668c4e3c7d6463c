"""Device selection and per-device numerics: `auto` picks CUDA when present, else the CPU; which
reduced precision a CUDA card computes natively; full-fp32 convolutions for exactness checks;
cuDNN's autotuner for training and timing. Torch is imported on first use, so configs naming
`auto` or `cpu` are checked without loading it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

_CUDA_NAME = re.compile(r"cuda(?::(\d+))?")
DEVICE_HELP = "auto, cpu, cuda or cuda:N (N a device number from 0)"
# Compute capability from which cuDNN and cuBLAS run bfloat16 natively (Ampere).
BF16_CAPABILITY = (8, 0)


def resolve_device(name: str = "auto", setting: str = "device") -> torch.device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:i` into a usable `torch.device`, with a clear error
    naming `setting` when the name is malformed or CUDA is asked for but absent."""
    if not isinstance(name, str):
        raise ConfigError(f"{setting} must be {DEVICE_HELP}, got {name!r}")
    key = (name or "auto").strip().lower()
    cuda = _CUDA_NAME.fullmatch(key)
    if key not in ("auto", "cpu") and cuda is None:
        raise ConfigError(f"{setting} must be {DEVICE_HELP}, got {name!r}")
    import torch

    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{setting} {name!r} asks for CUDA, but no CUDA device is available")
    assert cuda is not None
    if cuda.group(1) is None:
        return torch.device("cuda")
    index = int(cuda.group(1))
    if index >= torch.cuda.device_count():
        raise ConfigError(f"{setting} {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def check_device(name: str, setting: str = "device") -> None:
    """Refuse a device `resolve_device` would refuse; only names asking for CUDA load torch."""
    if not isinstance(name, str) or (name or "auto").strip().lower() not in ("auto", "cpu"):
        resolve_device(name, setting)


def autocast_dtype(capability: tuple[int, int] | None) -> torch.dtype | None:
    """The autocast dtype for a CUDA card of compute `capability` (None: not CUDA, no
    autocast): bfloat16 where the card computes it natively (Ampere, 8.0, and newer), float16
    (with a loss scaler) before that, where bfloat16 would only be emulated."""
    import torch

    if capability is None:
        return None
    return torch.bfloat16 if tuple(capability) >= BF16_CAPABILITY else torch.float16


def device_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """`autocast_dtype` of the card behind `device` (None on the CPU)."""
    import torch

    if device.type != "cuda":
        return None
    return autocast_dtype(torch.cuda.get_device_capability(device))


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Float32 convolutions and matrix products in full precision for the duration: cuDNN and
    cuBLAS use TF32 by default on Ampere and newer (10 mantissa bits), and two forms of the same
    function can then differ by more than an exactness check allows. Restored afterwards."""
    import torch

    backends = (torch.backends.cudnn.conv, torch.backends.cuda.matmul,
                torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul)
    saved = [backend.fp32_precision for backend in backends]
    try:
        for backend in backends:
            backend.fp32_precision = "ieee"
        yield
    finally:
        for backend, value in zip(backends, saved):
            backend.fp32_precision = value


@contextmanager
def cudnn_benchmark() -> Iterator[None]:
    """cuDNN times its algorithms on each new input shape and keeps the fastest, for the
    duration (training and latency see few shapes, each many times); restored afterwards."""
    import torch

    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved
