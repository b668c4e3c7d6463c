"""Latency measurement: timed call counts, statistics, eval/inference mode, pinned threads."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from engine.common.errors import ConfigError
from engine.models.latency import LatencyResult, measure_latency


class Recorder(nn.Module):
    """A tiny model that records the conditions of every call it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.calls: list[tuple[bool, bool, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_inference_mode_enabled(), torch.get_num_threads()))
        return self.linear(x)


def test_counts_calls_and_orders_statistics() -> None:
    model = Recorder()
    result = measure_latency(model, torch.randn(2, 4), warmup=3, repeats=7)
    assert isinstance(result, LatencyResult)
    assert result.repeats == 7 and len(model.calls) == 3 + 7
    assert 0 < result.p10_ms <= result.median_ms <= result.p90_ms
    assert result.device == "cpu"
    assert set(result.to_dict()) == {"median_ms", "p10_ms", "p90_ms", "repeats", "device", "threads"}


def test_min_seconds_extends_the_run_up_to_max_repeats() -> None:
    model = Recorder()
    start = time.perf_counter()
    result = measure_latency(model, torch.randn(1, 4), warmup=0, repeats=3, min_seconds=0.05, max_repeats=100_000)
    assert time.perf_counter() - start >= 0.05
    assert result.repeats > 3 and len(model.calls) == result.repeats
    capped = measure_latency(Recorder(), torch.randn(1, 4), warmup=0, repeats=3, min_seconds=60.0, max_repeats=20)
    assert capped.repeats == 20


def test_runs_in_eval_inference_mode_with_pinned_threads_and_restores_state() -> None:
    model = Recorder().train()
    threads_before = torch.get_num_threads()
    result = measure_latency(model, torch.randn(1, 4), warmup=1, repeats=2, threads=1)
    assert model.calls == [(False, True, 1)] * 3
    assert result.threads == 1
    assert model.training and torch.get_num_threads() == threads_before
    measure_latency(model, torch.randn(1, 4), warmup=0, repeats=1)
    assert model.calls[-1][2] == threads_before  # unpinned: the current count, held fixed


@pytest.mark.parametrize(
    "kwargs",
    [{"repeats": 0}, {"warmup": -1}, {"min_seconds": -1.0}, {"repeats": 5, "max_repeats": 4}, {"threads": 0}],
)
def test_bad_settings_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        measure_latency(Recorder(), torch.randn(1, 4), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_missing_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        measure_latency(Recorder(), torch.randn(1, 4), device="cuda")


@pytest.mark.cuda
def test_cuda_timing_moves_model_and_input() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    result = measure_latency(model, torch.randn(1, 3, 32, 32), device="cuda", warmup=1, repeats=3)
    assert result.device.startswith("cuda") and result.median_ms > 0
    assert next(model.parameters()).is_cuda


def test_compare_latency_interleaves_and_keeps_the_fastest_round() -> None:
    from engine.models.latency import compare_latency

    calls: list[str] = []

    class Tagged(nn.Module):
        def __init__(self, tag: str) -> None:
            super().__init__()
            self.tag = tag

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(self.tag)
            return x

    timing = compare_latency({"a": Tagged("a"), "b": Tagged("b")}, torch.zeros(1), rounds=3, repeats=2)
    assert set(timing) == {"a", "b"} and all(v >= 0 for v in timing.values())
    # Each round times a fully (warm-up + repeats), then b: the order alternates round by round.
    per_round = len(calls) // 3
    assert calls[:per_round] == ["a"] * (per_round // 2) + ["b"] * (per_round // 2)
    with pytest.raises(ConfigError):
        compare_latency({"a": Tagged("a")}, torch.zeros(1), rounds=0)
