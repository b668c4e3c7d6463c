"""Collapse warnings in words, and the per-class prediction counts they are read from."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from engine.data.datasets import CIFAR10_CLASSES
from engine.models.normalization import Normalization
from engine.robustness.attacks import RobustnessReport, evaluate_robustness
from engine.robustness.collapse import ADVICE, collapse_warnings


def test_one_class_for_nearly_every_image_is_named() -> None:
    predicted = [0] * 10
    predicted[8], predicted[1] = 97, 3
    (warning,) = collapse_warnings("pruned model", 0.13, predicted, CIFAR10_CLASSES)
    assert warning == (
        f"pruned model: predicts 'ship' for 97% of 100 images; accuracy 13.0% is within 5 points of chance "
        f"(10.0% for 10 classes) — {ADVICE}"
    )
    # Without names the index stands in; 89% in one class at good accuracy is not a collapse.
    assert collapse_warnings("m", 0.5, [3, 0, 97])[0].startswith("m: predicts '2' for 97% of 100 images")
    assert collapse_warnings("m", 0.9, [89, 11]) == []


def test_guessing_accuracy_is_flagged_even_with_spread_predictions() -> None:
    (warning,) = collapse_warnings("model", 0.149, [10] * 10, CIFAR10_CLASSES)
    assert "accuracy 14.9% is within 5 points of chance (10.0% for 10 classes)" in warning
    assert collapse_warnings("model", 0.151, [10] * 10, CIFAR10_CLASSES) == []


def test_classes_never_predicted_count_once_there_are_enough_images() -> None:
    predicted = [40, 0, 30, 60, 20, 0, 30, 70, 50, 0]  # 300 images, 3 classes never predicted
    (warning,) = collapse_warnings("raw", 0.6, predicted, CIFAR10_CLASSES)
    assert "never predicts 'automobile', 'dog', 'truck' in 300 images" in warning
    few = [4, 0, 3, 6, 2, 0, 3, 7, 5, 0]  # 30 images: a healthy model may well skip a class
    assert collapse_warnings("raw", 0.6, few, CIFAR10_CLASSES) == []


def test_losing_more_than_half_of_the_reference_accuracy_is_flagged() -> None:
    spread = [30] * 10
    (warning,) = collapse_warnings("raw", 0.2, spread, reference=("unpruned model", 0.95))
    assert "accuracy 20.0% is under half of the unpruned model's 95.0%" in warning
    assert collapse_warnings("recalibrated", 0.6, spread, reference=("unpruned model", 0.95)) == []


def test_evaluation_counts_clean_predictions_per_class_and_merges_them() -> None:
    class Always(nn.Module):
        def __init__(self, label: int) -> None:
            super().__init__()
            self.label = label
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(len(x), 4)
            logits[:, self.label] = 1.0
            return logits + 0 * self.scale * x.mean()

    labels = torch.tensor([0, 1, 2, 3, 1, 1, 2])
    data = TensorDataset(torch.rand(7, 1, 4, 4), labels)
    norm = Normalization((0.5,), (0.5,))
    report = evaluate_robustness(Always(1), norm, data, [], batch_size=3, device="cpu")
    assert report.clean_predicted == [0, 7, 0, 0] and report.clean_correct == 3
    again = RobustnessReport.from_dict(report.to_dict())
    merged = RobustnessReport.merge([again, evaluate_robustness(Always(2), norm, data, [], device="cpu")])
    assert merged.clean_predicted == [0, 7, 7, 0] and merged.n_examples == 14
