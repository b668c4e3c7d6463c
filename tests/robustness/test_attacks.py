"""Attack parsing, ε conversions and robustness evaluation on a small model trained in-test on
scikit-learn's digits (8x8 grey images, 10 classes)."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

from engine.common.errors import Cancelled, ConfigError, DataError
from engine.models.normalization import PRESETS, Normalization
from engine.models.normalize_layer import with_normalization
from engine.robustness.attacks import (
    AttackResult,
    AttackSpec,
    RobustnessReport,
    adversarial_examples,
    default_suite,
    evaluate_robustness,
    normalized_eps_to_pixel,
    parse_attack,
    pixel_eps_to_normalized,
)

NORM = Normalization((0.3,), (0.4,))


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, TensorDataset]:
    """A logistic-regression digit classifier on normalised pixels (L-BFGS, ~0.2 s), and 300
    held-out digits."""
    data = load_digits()
    images = torch.tensor(data.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    labels = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    train_x, train_y = (images[:1400] - 0.3) / 0.4, labels[:1400]
    opt = torch.optim.LBFGS(model.parameters(), max_iter=60, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(train_x), train_y) + 1e-3 * model[1].weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    model.eval()
    return model, TensorDataset(images[1400:1700], labels[1400:1700])


def relabelled(model: nn.Module, dataset: TensorDataset) -> TensorDataset:
    """The dataset with the model's own predictions as labels (so predicted = true labels)."""
    images = dataset.tensors[0]
    with torch.no_grad():
        predicted = model((images - 0.3) / 0.4).argmax(dim=1)
    return TensorDataset(images, predicted)


# ---------------------------------------------------------------- parsing


def test_parse_attack_reads_names_fractions_and_default_labels() -> None:
    pgd = parse_attack("pgd:eps=8/255,alpha=2/255,steps=3")
    assert pgd.name == "PGD" and pgd.label == "pgd-8/255"
    assert pgd.params == {"eps": 8 / 255, "alpha": 2 / 255, "steps": 3}
    assert isinstance(pgd.params["steps"], int)
    fgsm = parse_attack(" FGSM : eps = 0.01 ")
    assert (fgsm.name, fgsm.params, fgsm.label) == ("FGSM", {"eps": 0.01}, "fgsm-0.01")
    assert parse_attack("autoattack").label == "autoattack-8/255"
    assert parse_attack("CW:c=0.5,steps=20").params == {"c": 0.5, "steps": 20}
    assert parse_attack("cw").label == "cw"
    seeded = parse_attack("autoattack:seed=3,version=rand")
    assert seeded.params == {"seed": 3, "version": "rand"} and isinstance(seeded.params["seed"], int)
    assert parse_attack("pgd:random_start=false").params == {"random_start": False}
    assert parse_attack("fgsm:eps=0.1,label=big").label == "big"
    assert parse_attack("pgd:eps=0.03137254901960784").label == "pgd-8/255"


def test_default_suite_is_the_papers() -> None:
    assert [(s.name, s.params, s.label) for s in default_suite()] == [
        ("FGSM", {"eps": 0.01}, "fgsm-0.01"),
        ("FGSM", {"eps": 0.1}, "fgsm-0.1"),
        ("PGD", {"eps": 8 / 255, "alpha": 2 / 255, "steps": 3}, "pgd-8/255"),
    ]


def test_spec_text_round_trips() -> None:
    for spec in [*default_suite(), parse_attack("cw:c=0.5,label=soft cw"), parse_attack("apgd:loss=dlr")]:
        assert parse_attack(spec.to_text()) == spec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pgdd:eps=0.1", "unknown attack 'pgdd'; valid attacks: APGD, APGDT, AutoAttack"),
        ("pgd:epsilon=0.1", "attack PGD has no parameter 'epsilon'; valid parameters: eps, alpha, steps, random_start, label"),
        ("pgd:steps=3.5", "attack PGD parameter steps must be a whole number from 0 to 100000, got '3.5'"),
        ("pgd:steps=1e8", "attack PGD parameter steps must be a whole number from 0 to 100000, got '1e8'"),
        ("square:n_queries=-1", "attack Square parameter n_queries must be a whole number from 0 to 100000, got '-1'"),
        ("fgsm:eps=big", "attack FGSM parameter eps must be a number (fractions such as 8/255 are fine), got 'big'"),
        ("fgsm:eps=1/0", "attack FGSM parameter eps must be a number"),
        ("pgd:random_start=maybe", "attack PGD parameter random_start must be true or false, got 'maybe'"),
        ("fgsm:eps=-0.1", "attack fgsm--0.1: eps must not be negative"),
        ("fgsm:eps", "attack setting 'eps' must look like name=value"),
        ("fgsm:eps=0.1,eps=0.2", "attack FGSM parameter eps is given twice"),
    ],
)
def test_bad_attack_text_gives_its_message(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_attack(text)
    assert str(caught.value).startswith(expected)


def test_hand_built_spec_is_checked_and_text_values_are_read(digits) -> None:
    model, data = digits
    with pytest.raises(ConfigError, match="has no parameter 'epsilon'"):
        evaluate_robustness(model, NORM, data, [AttackSpec("FGSM", {"epsilon": 0.1}, "x")])
    report = evaluate_robustness(model, NORM, data, [AttackSpec("fgsm", {"eps": "8/255"}, "x")], max_examples=20)
    assert report.attacks[0].name == "FGSM" and report.attacks[0].params == {"eps": 8 / 255}


def test_eps_conversion_between_pixel_and_normalized_units() -> None:
    cifar = PRESETS["cifar10"]
    normalized = pixel_eps_to_normalized(8 / 255, cifar)
    assert normalized == pytest.approx([8 / 255 / s for s in cifar.std])
    assert normalized_eps_to_pixel(0.1, NORM) == pytest.approx((0.04,))
    assert [normalized_eps_to_pixel(e, cifar)[i] for i, e in enumerate(normalized)] == pytest.approx([8 / 255] * 3)


# ---------------------------------------------------------------- evaluation


def test_attacks_lower_accuracy_and_zero_eps_does_not(digits) -> None:
    model, data = digits
    report = evaluate_robustness(
        model, NORM, data, ["fgsm:eps=0.1", "pgd:eps=0.1,alpha=0.025,steps=5", "fgsm:eps=0"],
        device="cpu", batch_size=64,
    )
    assert report.n_examples == 300 and report.clean_acc > 0.9
    assert report.clean_correct == round(report.clean_acc * 300)
    fgsm, pgd, zero = report.attacks
    assert fgsm.accuracy < report.clean_acc - 0.2
    assert pgd.accuracy < report.clean_acc - 0.2
    assert zero.correct == report.clean_correct
    assert all(a.n == 300 for a in report.attacks)
    assert report.warnings == []
    assert report.eps_space == "pixel" and report.device == "cpu" and report.images_per_second > 0


def test_default_suite_runs_and_reports_full_params(digits) -> None:
    model, data = digits
    report = evaluate_robustness(model, NORM, data, device="cpu", max_examples=100)
    assert [a.label for a in report.attacks] == ["fgsm-0.01", "fgsm-0.1", "pgd-8/255"]
    assert report.attacks[2].params == {"eps": 8 / 255, "alpha": 2 / 255, "steps": 3, "random_start": True}
    assert report.n_examples == 100
    assert report.attacks[0].accuracy >= report.attacks[1].accuracy


def test_normalized_eps_space_matches_pixel_fgsm_for_one_channel(digits) -> None:
    model, data = digits
    data = relabelled(model, data)
    eps = 0.06
    pixel = evaluate_robustness(model, NORM, data, [f"fgsm:eps={eps}"], device="cpu")
    same = evaluate_robustness(model, NORM, data, [f"fgsm:eps={eps / 0.4}"], eps_space="normalized", device="cpu")
    unconverted = evaluate_robustness(model, NORM, data, [f"fgsm:eps={eps}"], eps_space="normalized", device="cpu")
    assert pixel.clean_correct == same.clean_correct == 300
    assert pixel.attacks[0].correct < 300
    assert same.attacks[0].correct == pixel.attacks[0].correct
    assert unconverted.attacks[0].correct != pixel.attacks[0].correct
    assert same.eps_space == "normalized" and same.warnings == []


def test_normalized_eps_space_pgd_matches_pixel_pgd(digits) -> None:
    model, data = digits
    pixel = evaluate_robustness(model, NORM, data, ["pgd:eps=0.05,alpha=0.02,steps=4,random_start=false"], device="cpu")
    same = evaluate_robustness(
        model, NORM, data, ["pgd:eps=0.125,alpha=0.05,steps=4,random_start=false"],
        eps_space="normalized", device="cpu",
    )
    assert pixel.attacks[0].correct < pixel.clean_correct
    assert same.attacks[0].correct == pixel.attacks[0].correct


def test_normalized_eps_space_refuses_attacks_it_cannot_clamp(digits) -> None:
    model, data = digits
    with pytest.raises(ConfigError, match="eps_space 'normalized' supports only FGSM and PGD .*not CW"):
        evaluate_robustness(model, NORM, data, ["cw"], eps_space="normalized", device="cpu")


def test_same_seed_same_result_and_caller_rng_untouched(digits) -> None:
    model, data = digits
    attacks = ["pgd:eps=0.1,alpha=0.02,steps=2"]
    torch.manual_seed(123)
    first = evaluate_robustness(model, NORM, data, attacks, device="cpu", seed=5, batch_size=50)
    after = torch.rand(3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    second = evaluate_robustness(model, NORM, data, attacks, device="cpu", seed=5, batch_size=50)
    assert torch.equal(after, expected)
    assert first.attacks[0].correct == second.attacks[0].correct


def test_eval_mode_during_attacks_and_modes_restored_after(digits) -> None:
    model, data = digits
    seen: list[bool] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.training)
            return x

    spied = nn.Sequential(Spy(), model)
    spied.train()
    spied[1].eval()
    evaluate_robustness(spied, NORM, data, ["fgsm:eps=0.1", "pgd:steps=2"], device="cpu", max_examples=40)
    assert seen and not any(seen)
    assert spied.training and spied[0].training and not spied[1].training


class Quantised(nn.Module):
    """Rounds its input before a linear layer, so input gradients are exactly zero."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.round(x))


class Noisy(nn.Module):
    """Adds fresh noise to its input even in eval mode: not deterministic."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + 2 * torch.randn_like(x))


def test_sanity_checks_warn_on_zero_gradients_and_nondeterminism(digits) -> None:
    model, data = digits
    flat = Quantised(model)
    report = evaluate_robustness(flat, NORM, data, ["fgsm:eps=0.1"], device="cpu", max_examples=64)
    assert any("input gradients are zero" in w for w in report.warnings)
    assert report.attacks[0].correct == report.clean_correct
    noisy = evaluate_robustness(Noisy(model), NORM, data, ["fgsm:eps=0.01"], device="cpu", max_examples=64)
    assert any("fgsm-0.01 at eps=0 changed the correct count" in w for w in noisy.warnings)


def test_sharded_reports_merge_to_the_full_count(digits) -> None:
    model, data = digits
    attacks = ["fgsm:eps=0.05", "fgsm:eps=0.1"]
    full = evaluate_robustness(model, NORM, data, attacks, device="cpu")
    images, labels = data.tensors
    shards = [TensorDataset(images[:120], labels[:120]), TensorDataset(images[120:], labels[120:])]
    merged = RobustnessReport.merge([evaluate_robustness(model, NORM, s, attacks, device="cpu") for s in shards])
    assert merged.n_examples == full.n_examples == 300
    assert merged.clean_correct == full.clean_correct
    assert [a.correct for a in merged.attacks] == [a.correct for a in full.attacks]
    assert merged.attacks[1].accuracy == pytest.approx(full.attacks[1].accuracy)


def test_merge_sums_counts_and_rejects_other_suites() -> None:
    def report(n: int, clean: int, correct: int, seconds: float, label: str = "fgsm-0.1") -> RobustnessReport:
        result = AttackResult(label, "FGSM", {"eps": 0.1}, correct / n, correct, n)
        return RobustnessReport(
            n, clean, clean / n, [result], "pixel", "cpu", seconds, n / seconds, warnings=[f"w{n}"]
        )

    merged = RobustnessReport.merge([report(10, 9, 4, 2.0), report(7, 5, 1, 1.0)])
    assert (merged.n_examples, merged.clean_correct, merged.attacks[0].correct) == (17, 14, 5)
    assert merged.clean_acc == pytest.approx(14 / 17) and merged.attacks[0].accuracy == pytest.approx(5 / 17)
    assert merged.seconds == 2.0 and merged.images_per_second == pytest.approx(8.5)
    assert merged.warnings == ["w10", "w7"]
    assert RobustnessReport.from_dict(merged.to_dict()) == merged
    with pytest.raises(ConfigError, match="different attack suites"):
        RobustnessReport.merge([report(10, 9, 4, 2.0), report(7, 5, 1, 1.0, label="other")])
    with pytest.raises(ConfigError, match="no robustness reports"):
        RobustnessReport.merge([])


def test_progress_and_cancellation(digits) -> None:
    model, data = digits
    seen, reports = [], []
    final = evaluate_robustness(model, NORM, data, ["fgsm:eps=0.1"], device="cpu", batch_size=100,
                                progress=seen.append, on_report=reports.append)
    assert {p.stage for p in seen} == {"evaluate"}
    # The clean pass, then the attack's: progress counts passes × examples and never goes back.
    assert [p.done for p in seen] == [0, 100, 200, 300, 300, 400, 500, 600] and seen[-1].total == 600
    assert "fgsm-0.1" in seen[-1].metrics and seen[-1].message.startswith("fgsm-0.1")
    # A report after the clean pass (no attack yet) and after the attack: the final one.
    assert [len(r.attacks) for r in reports] == [0, 1] and reports[-1] == dataclasses.replace(final, seconds=reports[-1].seconds, images_per_second=reports[-1].images_per_second)
    assert reports[0].clean_correct == final.clean_correct

    cancel = threading.Event()

    def stop_after_first(progress) -> None:
        if progress.done:
            cancel.set()

    model.train()
    with pytest.raises(Cancelled):
        evaluate_robustness(model, NORM, data, ["fgsm:eps=0.1"], device="cpu", batch_size=100,
                            progress=stop_after_first, cancel=cancel)
    assert model.training
    model.eval()


def test_cancel_acts_inside_an_attacks_steps(digits) -> None:
    """torchattacks runs its steps internally: a cancel set during PGD stops it at the next forward
    pass, not after the batch, and the attacks finished before it have been reported."""
    model, data = digits
    cancel = threading.Event()
    calls = {"n": 0, "after_cancel": 0}

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            if cancel.is_set():
                calls["after_cancel"] += 1
            return self.inner(x)

    reports = []

    def cancel_mid_pgd(report) -> None:
        reports.append(report)
        if report.attacks:  # FGSM is done; PGD comes next: cancel after a few of its steps
            start = calls["n"]
            threading.Thread(target=lambda: (time_to(lambda: calls["n"] >= start + 3), cancel.set())).start()

    with pytest.raises(Cancelled):
        evaluate_robustness(Counting(), NORM, data, ["fgsm:eps=0.1", "pgd:eps=0.1,alpha=0.01,steps=200"],
                            device="cpu", batch_size=400, max_examples=400, cancel=cancel, on_report=cancel_mid_pgd)
    assert calls["after_cancel"] == 0  # the next forward after the cancel raised instead of running
    assert [a.label for a in reports[-1].attacks] == ["fgsm-0.1"]


def time_to(condition, limit: float = 30.0) -> None:
    """Wait until `condition()` holds (or `limit` seconds pass)."""
    import time

    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)


def test_autoattack_runs_offline_on_a_tiny_case(digits) -> None:
    model, data = digits
    report = evaluate_robustness(model, NORM, data, ["autoattack:eps=0.3"], device="cpu", max_examples=8)
    result = report.attacks[0]
    assert result.params["n_classes"] == 10 and result.params["seed"] == 0
    assert result.correct < report.clean_correct


def test_bad_inputs_give_clear_errors(digits) -> None:
    model, data = digits
    images, labels = data.tensors
    with pytest.raises(ConfigError, match="eps_space must be one of pixel, normalized"):
        evaluate_robustness(model, NORM, data, eps_space="pixels", device="cpu")
    with pytest.raises(ConfigError, match="two attacks share the label 'fgsm-0.1'"):
        evaluate_robustness(model, NORM, data, ["fgsm:eps=0.1", "FGSM:eps=0.10"], device="cpu")
    with pytest.raises(DataError, match=r"must be \[0, 1\] pixels"):
        evaluate_robustness(model, NORM, TensorDataset(images * 16, labels), device="cpu")
    with pytest.raises(DataError, match="the dataset is empty"):
        evaluate_robustness(model, NORM, TensorDataset(images[:0], labels[:0]), device="cpu")
    with pytest.raises(DataError, match=r"cannot take the dataset's \(1, 4, 4\) images"):
        evaluate_robustness(model, NORM, TensorDataset(images[:, :, :4, :4], labels), device="cpu")
    with pytest.raises(ConfigError, match="normalisation has 3 channels but the model takes 1"):
        evaluate_robustness(model, PRESETS["cifar10"], data, device="cpu")
    with pytest.raises(DataError, match="max_examples must be at least 1"):
        evaluate_robustness(model, NORM, data, device="cpu", max_examples=0)


def test_accuracies_are_fractions_of_the_same_examples(digits) -> None:
    model, data = digits
    report = evaluate_robustness(model, NORM, data, ["fgsm:eps=0.05"], device="cpu", max_examples=77, batch_size=32)
    images, labels = data.tensors
    with torch.no_grad():
        expected = int((model((images[:77] - 0.3) / 0.4).argmax(1) == labels[:77]).sum())
    adversarial = adversarial_examples(model, NORM, images[:77], labels[:77], "fgsm:eps=0.05", device="cpu")
    with torch.no_grad():
        robust = int((model((adversarial - 0.3) / 0.4).argmax(1) == labels[:77]).sum())
    assert report.clean_correct == expected and report.n_examples == 77
    assert report.attacks[0].correct == robust < expected  # the attack ran on those 77 examples
    assert report.attacks[0].accuracy == pytest.approx(robust / 77)


def test_normalized_fgsm_is_pixel_fgsm_on_predicted_labels_image_by_image(digits) -> None:
    model, data = digits
    images, labels = data.tensors[0][:64], data.tensors[1][:64]
    with torch.no_grad():
        predicted = model((images - 0.3) / 0.4).argmax(dim=1)
    pixel = adversarial_examples(model, NORM, images, predicted, "fgsm:eps=0.08", device="cpu")
    shuffled = labels[torch.randperm(64)]
    normalized = adversarial_examples(
        model, NORM, images, shuffled, "fgsm:eps=0.2", eps_space="normalized", device="cpu"
    )
    assert torch.allclose(normalized, pixel, atol=1e-5)
    assert normalized.min() >= -1e-6 and normalized.max() <= 1 + 1e-6
    assert (pixel - images).abs().max() == pytest.approx(0.08, abs=1e-6)
    on_true = adversarial_examples(model, NORM, images, shuffled, "fgsm:eps=0.08", device="cpu")
    assert not torch.allclose(on_true, pixel)


@pytest.mark.shared
def test_real_resnet20_checkpoint_passes_the_sanity_checks(shared_checkpoint) -> None:
    from engine.formats.checkpoints import load_checkpoint

    imagenet = PRESETS["imagenet"]
    model = load_checkpoint(shared_checkpoint, normalization=imagenet).model
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        predicted = with_normalization(model, imagenet)(images).argmax(1)
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    data = TensorDataset(images, predicted)
    report = evaluate_robustness(model, imagenet, data, ["fgsm:eps=2/255", "pgd:steps=2"], device="cpu")
    assert report.clean_correct == 16 and report.warnings == []
    assert all(a.correct < 16 for a in report.attacks)
    assert model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in running.items())
