"""Latency measurement: timed call counts, statistics, eval/inference mode, pinned threads."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from engine.common.errors import ConfigError
from engine.models.latency import LatencyResult, RoundTimes, measure_latency


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


def test_interleaved_latency_rotates_the_order_and_summarises_each_round() -> None:
    from engine.models.latency import interleaved_latency

    calls: list[str] = []

    class Tagged(nn.Module):
        def __init__(self, tag: str) -> None:
            super().__init__()
            self.tag = tag

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(self.tag)
            return x

    timing = interleaved_latency({"a": Tagged("a"), "b": Tagged("b")}, torch.zeros(1), rounds=3, repeats=2, warmup=1)
    assert set(timing) == {"a", "b"}
    # Each round times one model fully (1 warm-up + 2 repeats), then the other; who goes first alternates.
    assert calls == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3 + ["a"] * 3 + ["b"] * 3
    a = timing["a"]
    assert a.rounds == 3 and a.repeats == 2 and len(a.to_dict()["round_ms"]) == 3
    assert a.to_dict()["min_ms"] <= a.q1_ms <= a.median_ms <= a.q3_ms <= a.to_dict()["max_ms"]
    assert a.best_ms <= a.to_dict()["min_ms"]
    with pytest.raises(ConfigError):
        interleaved_latency({"a": Tagged("a")}, torch.zeros(1), rounds=0)


def _times(*round_ms: float) -> RoundTimes:
    return RoundTimes(tuple(round_ms), min(round_ms), 10)


def test_verdict_reads_the_round_by_round_ratio() -> None:
    from engine.models.latency import latency_verdict

    original = _times(10.0, 30.0, 11.0, 50.0, 10.5)  # a busy machine: rounds differ threefold
    assert latency_verdict(original, _times(5.0, 16.0, 6.0, 24.0, 5.0)) == "faster"  # half, every round
    assert latency_verdict(original, _times(20.0, 61.0, 22.0, 99.0, 21.0)) == "slower"
    # Same medians as "faster"/"slower" would suggest from unpaired numbers, but the ratio straddles 1.
    assert latency_verdict(original, _times(9.0, 33.0, 10.0, 55.0, 10.0)) == "within noise"
    assert latency_verdict(_times(10.0, 10.0, 10.0, 10.0), _times(9.0, 11.0, 9.5, 10.5)) == "within noise"
    with pytest.raises(ConfigError):
        latency_verdict(_times(1.0, 2.0), _times(1.0))
