"""Inference latency of a model on one device: eval mode, `torch.inference_mode`, a pinned CPU
thread count, and on CUDA the cuDNN autotuner and synchronisation, so original and pruned
models are timed alike; several models compared in interleaved rounds, with their spread and a
verdict that says when a difference is within noise."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

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


@dataclass(frozen=True)
class RoundTimes:
    """One model's per-forward times over interleaved rounds: the median of each round
    (`round_ms`, in round order), their median, interquartile range and extremes, and `best_ms`,
    the lowest per-round 10th percentile (what a load spike cannot inflate)."""

    round_ms: tuple[float, ...]
    best_ms: float
    repeats: int

    @property
    def rounds(self) -> int:
        return len(self.round_ms)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.round_ms))

    @property
    def q1_ms(self) -> float:
        return float(np.percentile(self.round_ms, 25))

    @property
    def q3_ms(self) -> float:
        return float(np.percentile(self.round_ms, 75))

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "q1_ms": self.q1_ms, "q3_ms": self.q3_ms,
                "min_ms": min(self.round_ms), "max_ms": max(self.round_ms), "best_ms": self.best_ms,
                "rounds": self.rounds, "repeats": self.repeats, "round_ms": list(self.round_ms)}


def interleaved_latency(
    models: dict[str, nn.Module],
    example_input: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    rounds: int = 8,
    repeats: int = 10,
    warmup: int = 1,
    threads: int | None = None,
) -> dict[str, RoundTimes]:
    """Time every model in `rounds` interleaved rounds, each round timing each model once
    (`repeats` calls after `warmup`) in an order rotated from round to round, so load on a
    shared machine falls on all models alike rather than on whichever ran during a spike."""
    if rounds < 1:
        raise ConfigError(f"latency comparison needs at least one round, got {rounds}")
    medians: dict[str, list[float]] = {name: [] for name in models}
    fastest: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            result = measure_latency(models[name], example_input, device=device, warmup=warmup,
                                     repeats=repeats, threads=threads)
            medians[name].append(result.median_ms)
            fastest[name].append(result.p10_ms)
    return {name: RoundTimes(tuple(medians[name]), min(fastest[name]), repeats) for name in names}


def latency_verdict(before: RoundTimes, after: RoundTimes) -> str:
    """"faster" or "slower" when the pruned model's time relative to the original's, taken round
    by round (both timed back to back, so load drift between rounds cancels), has its whole
    interquartile range on one side of 1; "within noise" when the range holds 1."""
    if before.rounds != after.rounds:
        raise ConfigError(f"latency verdict needs the same rounds for both models, got {before.rounds} and {after.rounds}")
    ratios = np.asarray(after.round_ms) / np.asarray(before.round_ms)
    low, high = np.percentile(ratios, 25), np.percentile(ratios, 75)
    if high < 1.0:
        return "faster"
    if low > 1.0:
        return "slower"
    return "within noise"
