"""Fine-tuning on a digits subset with a tiny CNN: learning, the four modes, bit-for-bit resume
after a cancellation, best-per-metric bookkeeping, cancellation latency and config checks."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import engine.training.finetune as training
from engine.common.distributed import DistContext
from engine.common.errors import CheckpointError, ConfigError
from engine.common.progress import Progress
from engine.data.datasets import load_data
from engine.models.normalize_layer import with_normalization
from engine.robustness.attacks import AttackResult, RobustnessReport, parse_attack
from engine.training.finetune import (
    fgsm_random_start,
    finetune,
    sharpness_perturbation,
)
from engine.training.finetune_config import FinetuneConfig, metric_filename

PGD = parse_attack("pgd:eps=8/255,alpha=2/255,steps=3")


def tiny_cnn(seed: int = 1) -> nn.Module:
    """Conv-BN-ReLU, conv-ReLU, dropout, linear: BatchNorm and dropout make resume exercise
    buffers and the global RNG."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Dropout(0.2), nn.Linear(16 * 8 * 8, 10),
    )


@pytest.fixture(scope="module")
def data():
    bundle = load_data("digits")
    return dataclasses.replace(bundle, train=Subset(bundle.train, range(192)), val=Subset(bundle.val, range(48)))


def config(**changes) -> FinetuneConfig:
    base = FinetuneConfig(epochs=3, lr=0.05, batch_size=32, device="cpu", eval_max_examples=32)
    return dataclasses.replace(base, **changes)


def same_weights(a: nn.Module | dict, b: nn.Module | dict) -> bool:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_timing(history) -> list[dict]:
    return [{k: v for k, v in dataclasses.asdict(r).items() if k not in ("seconds", "images_per_second")} for r in history]


def test_loss_decreases_and_accuracy_beats_chance(data) -> None:
    model = tiny_cnn()
    result = finetune(model, data, data.normalization, config(epochs=4, milestones=[3]), None)
    losses = [r.train_loss for r in result.history]
    assert result.completed and len(losses) == 4
    assert losses[-1] < losses[0] * 0.8
    assert result.history[-1].val["benign"] > 0.3
    assert [r.lr for r in result.history] == pytest.approx([0.05, 0.05, 0.05, 0.005])
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("mode", ["fastat", "sam", "asam"])
def test_each_mode_trains_and_differs_from_standard(data, mode: str) -> None:
    # Equal epochs, so "differs" is the mode's doing; what each mode does is in test_modes.py.
    standard = tiny_cnn()
    finetune(standard, data, data.normalization, config(), None)
    model = tiny_cnn()
    result = finetune(model, data, data.normalization, config(mode=mode), None)
    losses = [r.train_loss for r in result.history]
    assert losses[-1] < losses[0]
    assert not same_weights(model, standard)


def test_standard_mode_lowers_loss_on_a_fixed_batch(data) -> None:
    model = tiny_cnn()
    images = torch.stack([data.train[i][0] for i in range(64)])
    labels = torch.tensor([data.train[i][1] for i in range(64)])
    wrapped = with_normalization(model, data.normalization)

    def loss() -> float:
        wrapped.eval()
        with torch.no_grad():
            return float(nn.functional.cross_entropy(wrapped(images), labels))

    before = loss()
    finetune(model, data, data.normalization, config(epochs=2, augment=False), None)
    assert loss() < before


def test_fgsm_random_start_stays_in_the_ball_and_raises_loss() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 3)
    x = torch.rand(16, 12)
    y = torch.randint(0, 3, (16,))
    loss_of = lambda adv: nn.functional.cross_entropy(layer(adv), y)  # noqa: E731
    adv = fgsm_random_start(loss_of, x, 0.1, 0.125, torch.Generator().manual_seed(1))
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        assert float(loss_of(adv)) > float(loss_of(x))
    again = fgsm_random_start(loss_of, x, 0.1, 0.125, torch.Generator().manual_seed(1))
    assert torch.equal(adv, again)


def test_sharpness_perturbation_has_radius_rho() -> None:
    w = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5, 4.0]])]
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0, 1.0]])]
    plain = sharpness_perturbation(list(zip(w, g)), 0.05, adaptive=False)
    assert float(torch.cat([e.flatten() for e in plain]).norm()) == pytest.approx(0.05)
    assert torch.allclose(plain[0], 0.05 * g[0] / torch.cat([t.flatten() for t in g]).norm())
    adaptive = sharpness_perturbation(list(zip(w, g)), 0.5, adaptive=True)
    assert float(torch.cat([(e / wi.abs()).flatten() for e, wi in zip(adaptive, w)]).norm()) == pytest.approx(0.5)
    scaled = sharpness_perturbation([(wi, 1024 * gi) for wi, gi in zip(w, g)], 0.5, adaptive=True)
    assert all(torch.allclose(a, b) for a, b in zip(adaptive, scaled))
    for degenerate in (torch.zeros(2), torch.tensor([float("inf"), 1.0]), torch.tensor([float("nan"), 1.0])):
        (step,) = sharpness_perturbation([(w[0], degenerate)], 0.05, adaptive=False)
        assert torch.equal(step, torch.zeros(2))  # a plain step, and never a NaN weight


def test_resume_after_cancel_equals_an_uninterrupted_run(data, tmp_path: Path) -> None:
    cfg = config(track_attacks=["fgsm:eps=0.01"])
    straight = tiny_cnn()
    full = finetune(straight, data, data.normalization, cfg, tmp_path / "a")

    cancel = threading.Event()
    steps: list[tuple[int, int]] = []

    def stop_in_epoch_two(p: Progress) -> None:
        if "step" in p.metrics:
            steps.append((p.metrics["epoch"], p.metrics["step"]))
            if (p.metrics["epoch"], p.metrics["step"]) == (2, 3):
                cancel.set()

    interrupted = tiny_cnn()
    first = finetune(interrupted, data, data.normalization, cfg, tmp_path / "b", progress=stop_in_epoch_two, cancel=cancel)
    assert not first.completed and steps[-1] == (2, 3)
    assert [r.epoch for r in first.history] == [1] and first.last_path == tmp_path / "b" / "last.pt"
    state = torch.load(first.last_path, weights_only=True)
    assert state["epoch"] == 1

    resumed_model = tiny_cnn(seed=99)
    second = finetune(resumed_model, data, data.normalization, cfg, tmp_path / "b", resume=True)
    assert second.completed
    assert same_weights(resumed_model, straight)
    assert without_timing(second.history) == without_timing(full.history)
    assert {m: (b.epoch, b.value) for m, b in second.best.items()} == {m: (b.epoch, b.value) for m, b in full.best.items()}
    for name in ("best_benign.pt", "best_fgsm-0.01.pt", "last.pt"):
        a = torch.load(tmp_path / "a" / name, weights_only=True)
        b = torch.load(tmp_path / "b" / name, weights_only=True)
        key = "model" if name == "last.pt" else "state_dict"
        assert same_weights(a[key], b[key])


def test_same_seed_same_result_other_seed_differs(data) -> None:
    one, two, other = tiny_cnn(), tiny_cnn(), tiny_cnn()
    finetune(one, data, data.normalization, config(epochs=1), None)
    finetune(two, data, data.normalization, config(epochs=1), None)
    finetune(other, data, data.normalization, config(epochs=1, seed=5), None)
    assert same_weights(one, two) and not same_weights(one, other)


class ScriptedEvaluation:
    """Stands in for the sharded evaluation with chosen accuracies per call."""

    def __init__(self, script: list[tuple[float, float]]) -> None:
        self.script = list(script)
        self.calls = 0

    def __call__(self, model, normalization, dataset, attacks, **kwargs) -> RobustnessReport:
        benign, robust = self.script[self.calls]
        self.calls += 1
        n = 100
        result = AttackResult(PGD.label, PGD.name, PGD.params, robust, round(robust * n), n)
        return RobustnessReport(n, round(benign * n), benign, [result], "pixel", "cpu", 1.0, 100.0)


def test_best_checkpoint_per_metric(data, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(training, "evaluate_sharded", ScriptedEvaluation([(0.5, 0.2), (0.7, 0.1), (0.7, 0.3)]))
    states: dict[int, dict] = {}
    model = tiny_cnn()

    def keep_states(p: Progress) -> None:
        if "record" in p.metrics:
            states[p.metrics["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}

    result = finetune(model, data, data.normalization, config(track_attacks=[PGD]), tmp_path, progress=keep_states)
    assert {m: (b.epoch, b.value) for m, b in result.best.items()} == {"benign": (2, 0.7), "pgd-8/255": (3, 0.3)}
    benign = torch.load(tmp_path / "best_benign.pt", weights_only=True)
    robust = torch.load(tmp_path / "best_pgd-8-255.pt", weights_only=True)
    assert benign["metadata"]["epoch"] == 2 and robust["metadata"]["epoch"] == 3
    assert benign["metadata"]["normalization"] == data.normalization.to_dict()
    assert same_weights(benign["state_dict"], states[2]) and same_weights(robust["state_dict"], states[3])
    assert not same_weights(states[2], states[3])
    assert result.best["benign"].path == tmp_path / "best_benign.pt"


def test_best_checkpoints_go_through_save_model(data, tmp_path: Path, monkeypatch) -> None:
    evaluation = ScriptedEvaluation([(0.4, 0.3), (0.6, 0.2)])
    monkeypatch.setattr(training, "evaluate_sharded", evaluation)
    saved: list[tuple[str, int, str]] = []

    def save_model(path: Path, model: nn.Module, metadata: dict) -> None:
        assert isinstance(model, nn.Sequential) and len(model) == 8
        saved.append((path.name, metadata["epoch"], metadata["metric"]))

    hooked: list[int] = []
    result = finetune(tiny_cnn(), data, data.normalization, config(epochs=3, eval_every=2, track_attacks=[PGD]),
                      tmp_path, save_model=save_model, on_epoch_end=lambda epoch, model: hooked.append(epoch))
    assert evaluation.calls == 2 and hooked == [1, 2, 3]
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["best"]["benign"] == {"epoch": 3, "value": 0.6, "path": str(tmp_path / "best_benign.pt")}
    assert summary["completed"] and len(summary["history"]) == 3
    assert [r.val for r in result.history] == [{}, {"benign": 0.4, "pgd-8/255": 0.3}, {"benign": 0.6, "pgd-8/255": 0.2}]
    assert saved == [("best_benign.pt", 2, "benign"), ("best_pgd-8-255.pt", 2, "pgd-8/255"), ("best_benign.pt", 3, "benign")]


def test_cancel_stops_within_one_step(data, tmp_path: Path) -> None:
    cancel = threading.Event()
    steps = []

    def count(p: Progress) -> None:
        if "step" in p.metrics:
            steps.append(p.done)
            assert p.stage == "finetune" and p.total == 18 and p.metrics["eta_seconds"] >= 0
            if len(steps) == 3:
                cancel.set()

    result = finetune(tiny_cnn(), data, data.normalization, config(), tmp_path, progress=count, cancel=cancel)
    assert steps == [1, 2, 3] and not result.completed
    assert result.history == [] and result.last_path is None and not (tmp_path / "last.pt").exists()
    steps.clear()
    again = finetune(tiny_cnn(), data, data.normalization, config(), None, progress=count, cancel=cancel)
    assert steps == [] and not again.completed


def test_resume_problems(data, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothing to resume"):
        finetune(tiny_cnn(), data, data.normalization, config(), tmp_path, resume=True)
    with pytest.raises(ConfigError, match="resume needs the output folder"):
        finetune(tiny_cnn(), data, data.normalization, config(), None, resume=True)
    finetune(tiny_cnn(), data, data.normalization, config(epochs=1), tmp_path)
    with pytest.raises(ConfigError, match="differs in lr"):
        finetune(tiny_cnn(), data, data.normalization, config(epochs=1, lr=0.1), tmp_path, resume=True)
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable fine-tuning state"):
        finetune(tiny_cnn(), data, data.normalization, config(epochs=1), tmp_path, resume=True)


def test_metric_filenames() -> None:
    assert metric_filename("benign") == "benign"
    assert metric_filename("fgsm-0.01") == "fgsm-0.01"
    assert metric_filename("PGD-8/255") == "pgd-8-255"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"epochs": 0}, "finetune.epochs must be a whole number from 1 to 100000, got 0"),
        ({"epochs": 2.5}, "finetune.epochs must be a whole number"),
        ({"lr": 0.0}, "finetune.lr must be a number > 0, got 0.0"),
        ({"lr": float("nan")}, "finetune.lr must be a number > 0, got nan"),
        ({"momentum": 1.0}, r"finetune.momentum must be a number in \[0, 1\), got 1.0"),
        ({"weight_decay": -1e-4}, "finetune.weight_decay must be a number >= 0, got -0.0001"),
        ({"schedule": "linear"}, "finetune.schedule must be one of step, cosine, got 'linear'"),
        ({"milestones": [3, 2]}, r"finetune.milestones must be a strictly increasing list of whole numbers from 1 to 9, got \[3, 2\]"),
        ({"milestones": [10]}, r"finetune.milestones must be a strictly increasing list of whole numbers from 1 to 9, got \[10\]"),
        ({"gamma": 0.0}, r"finetune.gamma must be a number in \(0, 1\], got 0.0"),
        ({"batch_size": 0}, "finetune.batch_size must be a whole number from 1 to 65536, got 0"),
        ({"mode": "trades"}, "finetune.mode must be one of standard, fastat, sam, asam"),
        ({"fastat_eps": 2.0}, r"finetune.fastat_eps must be a number in \(0, 1\] \(pixel units\), got 2.0"),
        ({"fastat_alpha": 0.0}, "finetune.fastat_alpha must be a number > 0, got 0.0"),
        ({"sam_rho": -0.1}, "finetune.sam_rho must be a number > 0, got -0.1"),
        ({"augment": "yes"}, "finetune.augment must be true or false"),
        ({"amp": 1}, "finetune.amp must be true or false"),
        ({"channels_last": None}, "finetune.channels_last must be true or false"),
        ({"compile": "no"}, "finetune.compile must be true or false"),
        ({"device": "tpu"}, "finetune.device must be auto, cpu, cuda or cuda:N"),
        ({"eval_every": 0}, "finetune.eval_every must be a whole number of at least 1"),
        ({"eval_max_examples": 0}, "finetune.eval_max_examples must be a whole number of at least 1"),
        ({"seed": -3}, "finetune.seed must be a whole number from 0 to 4294967295, got -3"),
        ({"track_attacks": ["fgsm:eps=0.01", "fgsm:eps=0.01"]}, "labels must be distinct"),
        ({"track_attacks": ["fgsm:eps=0.01,label=benign"]}, "labels must be distinct, not 'benign'"),
        ({"track_attacks": ["nosuchattack"]}, "unknown attack"),
        ({"track_attacks": [42]}, "entries must be attack specs or text"),
    ],
)
def test_bad_config_values(changes: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        dataclasses.replace(FinetuneConfig(), **changes).validate()


def test_default_schedule_details() -> None:
    assert FinetuneConfig().resolved_milestones() == [5, 7]
    assert FinetuneConfig(epochs=1).resolved_milestones() == []
    assert FinetuneConfig(mode="sam").resolved_rho() == 0.05
    assert FinetuneConfig(mode="asam").resolved_rho() == 0.5
    assert FinetuneConfig(mode="asam", sam_rho=0.2).resolved_rho() == 0.2
    FinetuneConfig(track_attacks=[PGD, "fgsm:eps=0.1"]).validate()


def test_cosine_schedule(data) -> None:
    result = finetune(tiny_cnn(), data, data.normalization, config(schedule="cosine", eval_every=3), None)
    expected = [0.05 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]
    assert [r.lr for r in result.history] == pytest.approx(expected)


def test_only_the_main_process_writes_and_reports(data, tmp_path: Path) -> None:
    calls: list[Progress] = []
    result = finetune(tiny_cnn(), data, data.normalization, config(epochs=1), tmp_path,
                      progress=calls.append, ctx=DistContext(rank=1, world_size=1))
    assert result.completed and calls == [] and list(tmp_path.iterdir()) == []
    assert result.best["benign"].path == tmp_path / "best_benign.pt"
