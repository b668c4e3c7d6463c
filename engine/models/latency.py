"""Inference latency of a model on one device: eval mode, `torch.inference_mode`, a pinned CPU
thread count, and on CUDA the cuDNN autotuner and synchronisation, so original and pruned
models are timed alike."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..common.devices import cudnn_benchmark, resolve_device
from ..common.errors import ConfigError


@dataclass(frozen=True)
class LatencyResult:
    """Per-forward wall time in milliseconds over `repeats` timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    device: str
    threads: int

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _as_device(device: str | torch.device | None, model: nn.Module, example: torch.Tensor) -> torch.device:
    if device is None:
        param = next(model.parameters(), None)
        return param.device if param is not None else example.device
    return device if isinstance(device, torch.device) else resolve_device(device)


def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    warmup: int = 2,
    repeats: int = 10,
    min_seconds: float = 0.0,
    max_repeats: int = 1000,
    threads: int | None = None,
) -> LatencyResult:
    """Time `model(example_input)` after `warmup` untimed calls, for at least `repeats` calls and
    at least `min_seconds` (capped at `max_repeats`). The model is moved to `device` (default:
    where its parameters are) and its train/eval mode is restored afterwards."""
    if warmup < 0 or repeats < 1 or max_repeats < repeats or min_seconds < 0:
        raise ConfigError(
            f"latency needs warmup >= 0, 1 <= repeats <= max_repeats and min_seconds >= 0 "
            f"(got {warmup}, {repeats}, {max_repeats}, {min_seconds})"
        )
    if threads is not None and threads < 1:
        raise ConfigError(f"latency thread count must be at least 1, got {threads}")
    target = _as_device(device, model, example_input)
    model.to(target)
    x = example_input.to(target)
    cuda = target.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(target)) if cuda else (lambda: None)
    previous_threads = torch.get_num_threads()
    pinned = threads or previous_threads
    was_training = model.training
    times: list[float] = []
    try:
        torch.set_num_threads(pinned)
        model.eval()
        with torch.inference_mode(), cudnn_benchmark() if cuda else nullcontext():
            for _ in range(warmup):
                model(x)
            sync()
            budget_start = time.perf_counter()
            while len(times) < repeats or (
                time.perf_counter() - budget_start < min_seconds and len(times) < max_repeats
            ):
                start = time.perf_counter()
                model(x)
                sync()
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
        torch.set_num_threads(previous_threads)
    ms = np.asarray(times) * 1e3
    return LatencyResult(
        median_ms=float(np.median(ms)),
        p10_ms=float(np.percentile(ms, 10)),
        p90_ms=float(np.percentile(ms, 90)),
        repeats=len(times),
        device=str(target),
        threads=pinned,
    )


def compare_latency(
    models: dict[str, nn.Module],
    example_input: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    rounds: int = 5,
    repeats: int = 10,
) -> dict[str, float]:
    """Median milliseconds per model, timed in `rounds` interleaved rounds and keeping each
    model's fastest round, so a load spike on a shared machine does not favour one model."""
    if rounds < 1:
        raise ConfigError(f"latency comparison needs at least one round, got {rounds}")
    best: dict[str, float] = {name: float("inf") for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            result = measure_latency(model, example_input, device=device, repeats=repeats)
            best[name] = min(best[name], result.median_ms)
    return best
