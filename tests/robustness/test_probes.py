"""Frequency and corruption probes on constructed cases whose answers are known."""

from __future__ import annotations

import colorsys
import threading

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from engine.common.errors import Cancelled, ConfigError
from engine.models.normalization import Normalization
from engine.robustness.probes import (
    CORRUPTIONS,
    SEVERITY_PARAMS,
    corrupt,
    corruption_probe,
    frequency_probe,
    frequency_split,
    low_pass_mask,
)

NONE = Normalization((0.0,), (1.0,))
NORM = Normalization((0.5,), (0.25,))


def linear_model(weights: torch.Tensor) -> nn.Module:
    """Two-class linear model whose class-1 margin is `2 * <weights, x>` (x = model input)."""
    linear = nn.Linear(weights.numel(), 2)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([-weights.flatten(), weights.flatten()]))
        linear.bias.zero_()
    return nn.Sequential(nn.Flatten(), linear).eval()


def brightness_model(shape: tuple[int, ...]) -> nn.Module:
    """Class 1 when the mean of the normalised input is positive: with NORM, pixel mean > 0.5."""
    size = torch.Size(shape).numel()
    return linear_model(torch.full(shape, 1.0 / size))


def brightness_data(n: int = 40, size: int = 8) -> TensorDataset:
    """Images of mean 0.3 (class 0) or 0.7 (class 1) plus a zero-mean random texture."""
    generator = torch.Generator().manual_seed(1)
    texture = torch.rand(n, 1, size, size, generator=generator) * 0.4 - 0.2
    texture -= texture.mean(dim=(-2, -1), keepdim=True)
    labels = torch.arange(n) % 2
    return TensorDataset(texture + (0.3 + 0.4 * labels.float()).view(-1, 1, 1, 1), labels)


# ---------------------------------------------------------------- frequency probe


def test_low_pass_mask_is_a_disc_around_the_shifted_centre() -> None:
    mask = low_pass_mask(8, 8, 2.0)
    assert mask.sum() == 9 and mask[4, 4] and mask[3, 3] and not mask[2, 4]
    assert low_pass_mask(32, 32, 16.0).sum() < 32 * 32


def test_frequency_split_parts_sum_to_the_image_and_low_pass_keeps_the_mean() -> None:
    images = torch.rand(3, 3, 16, 16)
    low, high = frequency_split(images, 4.0)
    assert torch.allclose(low + high, images, atol=1e-6)
    assert torch.allclose(low.mean(dim=(-2, -1)), images.mean(dim=(-2, -1)), atol=1e-6)
    assert high.mean(dim=(-2, -1)).abs().max() < 1e-6
    dc_only, _ = frequency_split(images, 0.5)
    assert torch.allclose(dc_only, images.mean(dim=(-2, -1), keepdim=True).expand_as(images), atol=1e-6)


def test_frequency_probe_on_a_brightness_classifier() -> None:
    data = brightness_data()
    report = frequency_probe(brightness_model((1, 8, 8)), NORM, data, thresholds=(1, 2, 4), device="cpu")
    assert report.clean_acc == 1.0 and report.n_examples == 40 and report.image_size == (8, 8)
    assert [row.theta for row in report.rows] == [1.0, 2.0, 4.0]
    # Low-pass keeps the DC term, so brightness survives; high-pass removes it (mean 0 → class 0).
    assert all(row.low_acc == 1.0 for row in report.rows)
    assert all(row.high_acc == 0.5 and row.high_correct == 20 for row in report.rows)
    assert report.to_dict()["rows"][0]["theta"] == 1.0


def test_frequency_probe_on_a_checkerboard_classifier() -> None:
    """The checkerboard is the highest frequency: high-pass keeps it, low-pass removes it."""
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0
    signs = torch.tensor([1.0, -1.0] * 10)
    images = 0.5 + 0.1 * signs.view(-1, 1, 1, 1) * checker
    data = TensorDataset(images, (signs > 0).long())
    report = frequency_probe(linear_model(checker[None]), NONE, data, thresholds=(2, 4), device="cpu")
    assert report.clean_acc == 1.0
    assert [row.high_acc for row in report.rows] == [1.0, 1.0]
    assert [row.low_acc for row in report.rows] == [0.5, 0.5]


@pytest.mark.parametrize("thresholds", [(), (0,), (-1,), (4, 4.5), ("8",)])
def test_frequency_thresholds_are_checked_against_image_size(thresholds) -> None:
    with pytest.raises(ConfigError, match=r"frequency threshold|at least one threshold"):
        frequency_probe(brightness_model((1, 8, 8)), NORM, brightness_data(), thresholds=thresholds, device="cpu")


def test_frequency_probe_message_names_the_limit() -> None:
    with pytest.raises(ConfigError, match=r"must be a radius in \(0, 4\] pixels for 8x8 images"):
        frequency_probe(brightness_model((1, 8, 8)), NORM, brightness_data(), thresholds=(5,), device="cpu")


# ---------------------------------------------------------------- corruptions


@pytest.mark.parametrize("channels", [1, 3])
def test_every_corruption_keeps_shape_and_range_and_is_seeded(channels: int) -> None:
    images = torch.rand(4, channels, 16, 16, generator=torch.Generator().manual_seed(0))
    for name in CORRUPTIONS:
        once = corrupt(images, name, 5, torch.Generator().manual_seed(3))
        again = corrupt(images, name, 5, torch.Generator().manual_seed(3))
        assert once.shape == images.shape, name
        assert once.min() >= 0 and once.max() <= 1, name
        assert torch.equal(once, again), name
        assert not torch.allclose(once, images, atol=1e-3), name


def test_blurs_and_pixelation_leave_flat_images_alone() -> None:
    flat = torch.full((2, 3, 16, 16), 0.37)
    for name in ("gaussian_blur", "defocus_blur", "motion_blur", "pixelate"):
        for severity in (1, 5):
            assert torch.allclose(corrupt(flat, name, severity, torch.Generator()), flat, atol=1e-6), name


def test_brightness_matches_an_hsv_round_trip() -> None:
    pixels = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    pixels[0, :, 0, 0] = 0
    out = corrupt(pixels, "brightness", 5, torch.Generator())
    shift = SEVERITY_PARAMS["brightness"][4]
    for i in range(4):
        for j in range(4):
            h, s, v = colorsys.rgb_to_hsv(*pixels[0, :, i, j].tolist())
            expected = colorsys.hsv_to_rgb(h, s, min(v + shift, 1.0))
            assert out[0, :, i, j].tolist() == pytest.approx(expected, abs=1e-6)


def test_jpeg_error_grows_with_severity() -> None:
    ramp = torch.linspace(0, 1, 32)
    planes = [ramp[None, :], ramp[:, None], (ramp[None, :] > 0.5).float()]
    images = torch.stack([plane.expand(32, 32) for plane in planes])[None]
    errors = [
        float((corrupt(images, "jpeg_compression", s, torch.Generator()) - images).abs().mean())
        for s in (1, 5)
    ]
    assert 0 < errors[0] < errors[1]


def test_corrupt_rejects_unknown_names_and_severities() -> None:
    images = torch.rand(1, 1, 8, 8)
    with pytest.raises(ConfigError, match="unknown corruption 'fog'; valid corruptions: gaussian_noise"):
        corrupt(images, "fog", 1, torch.Generator())
    with pytest.raises(ConfigError, match="severity must be 1 to 5, got 6"):
        corrupt(images, "contrast", 6, torch.Generator())


def test_a_model_invariant_to_contrast_has_ratio_one() -> None:
    data = brightness_data()
    report = corruption_probe(brightness_model((1, 8, 8)), NORM, data, ["contrast", "gaussian_noise"], device="cpu")
    assert report.clean_acc == 1.0
    assert [report.accuracy("contrast", s) for s in range(1, 6)] == [1.0] * 5
    assert report.per_corruption()["contrast"] == 1.0
    only_contrast = corruption_probe(brightness_model((1, 8, 8)), NORM, data, ["contrast"], device="cpu")
    assert only_contrast.robustness_ratio == 1.0 and only_contrast.mean_acc == 1.0
    assert report.robustness_ratio == pytest.approx(report.mean_acc / report.clean_acc)


def test_noise_accuracy_falls_monotonically_with_severity() -> None:
    """The model reads one pixel; values sit just either side of its threshold, so noise flips
    more of them as it grows (the draws are shared across severities)."""
    generator = torch.Generator().manual_seed(4)
    n = 200
    labels = torch.arange(n) % 2
    margin = torch.rand(n, generator=generator) * 0.12
    images = torch.full((n, 1, 4, 4), 0.5)
    images[:, 0, 0, 0] = 0.5 + torch.where(labels == 1, margin + 1e-3, -margin - 1e-3)
    weights = torch.zeros(1, 4, 4)
    weights[0, 0, 0] = 1.0
    data = TensorDataset(images, labels)
    report = corruption_probe(linear_model(weights), NORM, data, ["gaussian_noise", "impulse_noise"], device="cpu")
    assert report.clean_acc == 1.0
    for name in ("gaussian_noise", "impulse_noise"):
        accs = [report.accuracy(name, s) for s in range(1, 6)]
        assert accs == sorted(accs, reverse=True), name
        assert accs[-1] < accs[0] < 1.0, name


def test_corruption_probe_is_deterministic_for_a_seed_and_reports_everything() -> None:
    data = brightness_data()
    model = brightness_model((1, 8, 8))
    first = corruption_probe(model, NORM, data, severities=(1, 5), device="cpu", seed=3, batch_size=16)
    second = corruption_probe(model, NORM, data, severities=(1, 5), device="cpu", seed=3, batch_size=16)
    assert [r.correct for r in first.results] == [r.correct for r in second.results]
    assert [(r.corruption, r.severity) for r in first.results] == [(c, s) for c in CORRUPTIONS for s in (1, 5)]
    data_dict = first.to_dict()
    assert set(data_dict["per_corruption"]) == set(CORRUPTIONS) and data_dict["seed"] == 3


def test_corruption_probe_rejects_bad_choices() -> None:
    model, data = brightness_model((1, 8, 8)), brightness_data()
    with pytest.raises(ConfigError, match="unknown corruption 'snow'"):
        corruption_probe(model, NORM, data, ["snow"], device="cpu")
    with pytest.raises(ConfigError, match="no corruptions chosen"):
        corruption_probe(model, NORM, data, [], device="cpu")
    with pytest.raises(ConfigError, match=r"severities must be chosen from 1 to 5, got \[0\]"):
        corruption_probe(model, NORM, data, severities=(0,), device="cpu")


def test_probes_cancel_between_batches_and_restore_the_mode() -> None:
    model, data = brightness_model((1, 8, 8)), brightness_data()
    model.train()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        frequency_probe(model, NORM, data, thresholds=(2,), device="cpu", cancel=cancel)
    with pytest.raises(Cancelled):
        corruption_probe(model, NORM, data, ["contrast"], device="cpu", cancel=cancel)
    assert model.training
    seen = []
    frequency_probe(model, NORM, data, thresholds=(2,), device="cpu", batch_size=16, progress=seen.append)
    assert [p.done for p in seen] == [0, 16, 32, 40] and seen[-1].stage == "frequency-probe"
