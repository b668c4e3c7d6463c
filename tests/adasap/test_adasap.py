"""AdaSAP: the adaptive radii and per-filter perturbation, the sharpness estimate, the warmup's
resume, and progressive pruning on the exponential schedule ending in the method's plan."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.adasap.adaptive import adaptive_rho, filter_importance
from engine.adasap.adasap_config import WarmupConfig
from engine.adasap.phases import keep_masks, run_progressive, run_warmup, scheduled_rate
from engine.adasap.sharpness import sharpness
from engine.common.errors import Cancelled
from engine.common.progress import Progress
from engine.gkp.planner import plan_pruning
from engine.gkp.prune_config import PruneConfig
from engine.gkp.traces import ProgressivePrune, RhoEpoch
from engine.models.normalization import Normalization
from engine.training.finetune_config import FinetuneConfig
from engine.training.perturbation import neuron_perturbation


def training(**changes) -> FinetuneConfig:
    return dataclasses.replace(FinetuneConfig(batch_size=32, device="cpu", eval_max_examples=32), **changes)


@pytest.mark.parametrize("kind", ["l2", "taylor"])
def test_adaptive_rho_spans_the_bounds_least_important_at_rho_max(kind: str) -> None:
    torch.manual_seed(0)
    weight, grad = torch.randn(12, 4, 3, 3), torch.randn(12, 4, 3, 3)
    importance = filter_importance(weight, grad, kind)
    rho = adaptive_rho(importance, 0.01, 2.0)
    assert float(rho.min()) >= 0.01 - 1e-7 and float(rho.max()) <= 2.0 + 1e-7
    assert float(rho[int(torch.argmin(importance))]) == pytest.approx(2.0)
    assert float(rho[int(torch.argmax(importance))]) == pytest.approx(0.01)
    order = torch.argsort(importance)
    assert bool((rho[order][1:] <= rho[order][:-1]).all())  # more important, smaller radius
    if kind == "l2":
        torch.testing.assert_close(importance, weight.flatten(1).norm(dim=1))
    assert torch.equal(adaptive_rho(torch.ones(5), 0.01, 2.0), torch.full((5,), 2.0))


def test_neuron_perturbation_has_radius_rho_per_filter() -> None:
    torch.manual_seed(1)
    weight, grad = torch.randn(6, 3, 3, 3), torch.randn(6, 3, 3, 3)
    grad[2] = 0.0
    rho = torch.linspace(0.1, 0.6, 6)
    step = neuron_perturbation(weight, grad, rho)
    t = weight.abs() + 0.01
    radii = (step / t).flatten(1).norm(dim=1)  # ‖T⁻¹ε̂_i‖ = ρ_i (ASAM's ball)
    expected = rho.clone()
    expected[2] = 0.0
    torch.testing.assert_close(radii, expected)
    plain = neuron_perturbation(weight, grad, rho, adaptive=False)
    torch.testing.assert_close(plain.flatten(1).norm(dim=1), expected)


def test_sharpness_is_non_negative_and_larger_for_a_sharper_model(small_digits: Any, tiny_cnn: Any) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10))
    sharper = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10))
    sharper.load_state_dict(base.state_dict())
    norm = Normalization((0.0,), (1.0,))
    # The same function of the weights, but inputs four times larger: the loss curves four
    # times faster in every weight direction.
    scaled = dataclasses.replace(small_digits, train=[(4 * x, y) for x, y in (small_digits.train[i] for i in range(64))])
    flat = sharpness(base, norm, small_digits.train, rho=0.05, steps=3, images=64)
    sharp = sharpness(sharper, norm, scaled.train, rho=0.05, steps=3, images=64)
    assert 0.0 <= flat.value < sharp.value and flat.images == 64
    again = sharpness(base, norm, small_digits.train, rho=0.05, steps=3, images=64)
    assert again == flat  # deterministic, and the weights are restored
    for a, b in zip(base.parameters(), sharper.parameters()):
        assert torch.equal(a, b)


def test_warmup_resumes_bit_for_bit_and_traces_the_radii(small_digits: Any, tiny_cnn: Any, tmp_path: Path) -> None:
    warmup = WarmupConfig(epochs=3)
    args = (small_digits, small_digits.normalization, warmup, training())
    straight = run_warmup(tiny_cnn(), *args, tmp_path / "a")
    cancel = threading.Event()

    def stop_in_epoch_two(p: Progress) -> None:
        if (p.metrics.get("epoch"), p.metrics.get("step")) == (2, 2):
            cancel.set()

    with pytest.raises(Cancelled):
        run_warmup(tiny_cnn(), *args, tmp_path / "b", progress=stop_in_epoch_two, cancel=cancel)
    resumed = run_warmup(tiny_cnn(seed=5), *args, tmp_path / "b", resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [e.to_dict() for e in resumed.events] == [e.to_dict() for e in straight.events]
    events = [e for e in straight.events if isinstance(e, RhoEpoch)]
    assert len(events) == 3 * 4  # every conv and the linear layer, every epoch
    assert all(e.steps == 3 and e.rho_low == pytest.approx(0.01) and e.rho_high == pytest.approx(2.0) for e in events)
    assert all(e.rho_last[e.least_important] == pytest.approx(2.0) for e in events)
    plain = run_warmup(tiny_cnn(), small_digits, small_digits.normalization, dataclasses.replace(warmup, epochs=1), training(), None)
    standard = tiny_cnn()
    from engine.training.finetune import finetune
    finetune(standard, small_digits, small_digits.normalization, training(epochs=1, milestones=[]), None)
    assert not all(torch.equal(x, y) for x, y in zip(plain.model.state_dict().values(), standard.state_dict().values()))


def test_schedule_is_exponential_and_ends_at_the_rate() -> None:
    rates = [scheduled_rate(0.75, r, 4) for r in range(1, 5)]
    assert rates[-1] == pytest.approx(0.75)
    kept = [1 - rate for rate in rates]
    assert all(k2 / k1 == pytest.approx(kept[0]) for k1, k2 in zip(kept, kept[1:]))  # equal ratios: exponential


def test_progressive_pruning_zeroes_what_the_final_plan_drops(small_digits: Any, tiny_cnn: Any, tmp_path: Path) -> None:
    prune = PruneConfig(rate=0.5, groups=4, skip_stem=True)
    warmup = WarmupConfig(pruning_epochs=2, prune_frequency=2)
    rates: list[float] = []

    def replan(model: nn.Module, rate: float, final: bool):
        rates.append(rate)
        events: list = []
        plan = plan_pruning(model, dataclasses.replace(prune, rate=rate), on_event=events.append if final else None)
        return plan, events

    outcome = run_progressive(tiny_cnn(), small_digits, small_digits.normalization, warmup, training(), 0.5, "sr-gkp", replan,
                              tmp_path / "p")
    assert len(rates) == 3 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)  # 6 iterations / 2
    steps = [e for e in outcome.events if isinstance(e, ProgressivePrune)]
    assert [e.step for e in steps] == [1, 2, 3] and [e.iteration for e in steps] == [2, 4, 6]
    assert outcome.plan is not None and outcome.plan.params["rate"] == pytest.approx(0.5)
    params = dict(outcome.model.named_parameters())
    keeps = keep_masks(outcome.model, outcome.plan)
    assert keeps and all(bool((params[name][keep == 0] == 0).all()) for name, keep in keeps.items())
    assert any(e.kind == "final_choice" for e in outcome.events)  # the final plan's decisions are traced


def test_per_filter_asam_is_algorithm_2_taken_literally(small_digits: Any, tiny_cnn: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`sam_partition = "filter"`: every conv and linear weight is perturbed per filter at the one
    radius (AdaSAP's train_iter with ρ_min = ρ_max); `global` normalises over all parameters."""
    import engine.training.finetune as loop
    from engine.training.finetune import finetune

    calls: list[float] = []
    real = loop.neuron_perturbation

    def recording(weight, grad, rho, **kwargs):
        calls.append(float(rho))
        return real(weight, grad, rho, **kwargs)

    monkeypatch.setattr(loop, "neuron_perturbation", recording)
    per_filter, whole = tiny_cnn(), tiny_cnn()
    finetune(per_filter, small_digits, small_digits.normalization,
             training(epochs=1, mode="asam", sam_rho=2.0, sam_partition="filter"), None)
    assert len(calls) == 3 * 4 and set(calls) == {2.0}  # 3 steps x (3 convs + the linear layer)
    finetune(whole, small_digits, small_digits.normalization, training(epochs=1, mode="asam", sam_rho=2.0), None)
    assert len(calls) == 12
    assert not all(torch.equal(a, b) for a, b in zip(per_filter.state_dict().values(), whole.state_dict().values()))
