"""Robustness probes beyond attacks (SPEC §7): the SR-GKP frequency probe (accuracy on images
rebuilt from only low- or only high-frequency Fourier components) and the AdaSAP corruption
probe (accuracy under synthetic CIFAR-10-C-style corruptions, and its ratio to clean accuracy)."""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ..common.devices import resolve_device
from ..common.errors import ConfigError
from ..common.progress import ProgressCallback
from ..models.normalization import Normalization
from ..models.normalize_layer import with_normalization
from .batch_eval import (
    BatchTotals,
    count_correct,
    derive_seed,
    evaluation_mode,
    first_image,
    output_classes,
    run_batches,
)

DEFAULT_THRESHOLDS: tuple[float, ...] = (4.0, 8.0, 12.0, 16.0)
DEFAULT_SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


# ---------------------------------------------------------------- frequency probe


@dataclass
class FrequencyRow:
    """Accuracy on the low-pass (radius < θ) and high-pass (radius ≥ θ) reconstructions."""

    theta: float
    low_correct: int
    high_correct: int
    low_acc: float
    high_acc: float


@dataclass
class FrequencyReport:
    """Frequency probe result: clean accuracy and one row per threshold, on the same examples."""

    n_examples: int
    clean_correct: int
    clean_acc: float
    rows: list[FrequencyRow]
    image_size: tuple[int, int]
    device: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def merge(cls, reports: Sequence["FrequencyReport"]) -> "FrequencyReport":
        """Combine reports of disjoint shards (same thresholds) by summing counts; `seconds` is
        the slowest shard's, as shards run in parallel."""
        first = reports[0]
        if any([r.theta for r in other.rows] != [r.theta for r in first.rows] for other in reports):
            raise ConfigError("cannot merge frequency reports of different thresholds")
        n = sum(r.n_examples for r in reports)
        clean = sum(r.clean_correct for r in reports)
        rows = []
        for index, row in enumerate(first.rows):
            low = sum(r.rows[index].low_correct for r in reports)
            high = sum(r.rows[index].high_correct for r in reports)
            rows.append(FrequencyRow(row.theta, low, high, low / n, high / n))
        return cls(n, clean, clean / n, rows, first.image_size, _devices(reports), max(r.seconds for r in reports))


def _devices(reports: Sequence[FrequencyReport | CorruptionReport]) -> str:
    return ",".join(dict.fromkeys(r.device for r in reports))


def low_pass_mask(height: int, width: int, theta: float) -> torch.Tensor:
    """(H, W) boolean mask of the fftshift-ed spectrum: True within distance θ of the centre
    (the DC term sits at (H//2, W//2) after fftshift)."""
    rows = torch.arange(height, dtype=torch.float64) - height // 2
    cols = torch.arange(width, dtype=torch.float64) - width // 2
    return torch.hypot(rows[:, None], cols[None, :]) < theta


def frequency_split(images: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FFT, fftshift, keep components within radius θ (low) or outside it (high),
    inverse FFT, real part. The two parts sum to the input; neither is clamped."""
    height, width = images.shape[-2:]
    spectrum = torch.fft.fftshift(torch.fft.fft2(images), dim=(-2, -1))
    mask = low_pass_mask(height, width, theta).to(images.device)

    def rebuild(keep: torch.Tensor) -> torch.Tensor:
        kept = spectrum * keep
        return torch.fft.ifft2(torch.fft.ifftshift(kept, dim=(-2, -1))).real.to(images.dtype)

    return rebuild(mask), rebuild(~mask)


def _check_thresholds(thresholds: Sequence[float], height: int, width: int) -> list[float]:
    limit = min(height, width) / 2
    values = list(thresholds)
    if not values:
        raise ConfigError("the frequency probe needs at least one threshold")
    for theta in values:
        if not isinstance(theta, (int, float)) or not 0 < theta <= limit:
            raise ConfigError(
                f"frequency threshold {theta!r} must be a radius in (0, {limit:g}] pixels for "
                f"{height}x{width} images"
            )
    return [float(t) for t in values]


ProbeScore = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], dict[str, int]]


def _probe_totals(
    model: nn.Module, normalization: Normalization, dataset: object, dev: torch.device, score: ProbeScore,
    stage: str, *, batch_size: int, max_examples: int | None, progress: ProgressCallback | None,
    cancel: threading.Event | None,
) -> BatchTotals:
    """Correct counts of `score(net, images, labels, batch_index)` over `dataset`, where `net` is
    the model behind its normalisation, in eval mode on `dev` (the model's mode is restored)."""
    image = first_image(dataset)
    with evaluation_mode(model, dev):
        net = with_normalization(model, normalization.for_channels(image.shape[0])).to(dev).eval()
        output_classes(net, image[None].to(dev))
        return run_batches(
            dataset, partial(score, net), batch_size=batch_size, device=dev, max_examples=max_examples,
            stage=stage, progress=progress, cancel=cancel,
        )


def frequency_probe(
    model: nn.Module,
    normalization: Normalization,
    dataset: object,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    *,
    batch_size: int = 128,
    device: str = "auto",
    max_examples: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> FrequencyReport:
    """Accuracy on test images rebuilt from only their low- or only their high-frequency
    components at each radius threshold θ (SR-GKP Table 1, after Wang et al. 2020).

    θ is a radius in frequency-index units (pixels of the shifted spectrum), as in Wang et al.'s
    r ∈ {4, 8, 12, 16} for 32-px CIFAR images (a component is kept by the low pass when its
    distance from the centre is < θ). SR-GKP prints θ as a fraction in (0, 1) without defining
    its scale; reading it as a fraction of half the image size, pass θ·size/2. Reconstructions
    are made in [0, 1] pixel space and normalised like any input, without clamping: a high-pass
    image has no DC term, so about half its values are negative, and clamping would discard them."""
    dev = resolve_device(device)
    image = first_image(dataset)
    height, width = image.shape[-2:]
    thetas = _check_thresholds(thresholds, height, width)
    started = time.perf_counter()

    def score(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, _: int) -> dict[str, int]:
        counts = {"clean": count_correct(net, images, labels)}
        for theta in thetas:
            low, high = frequency_split(images, theta)
            counts[f"low@{theta:g}"] = count_correct(net, low, labels)
            counts[f"high@{theta:g}"] = count_correct(net, high, labels)
        return counts

    totals = _probe_totals(model, normalization, dataset, dev, score, "frequency-probe",
                           batch_size=batch_size, max_examples=max_examples, progress=progress, cancel=cancel)
    n = totals.n
    rows = []
    for theta in thetas:
        low, high = totals.correct[f"low@{theta:g}"], totals.correct[f"high@{theta:g}"]
        rows.append(FrequencyRow(theta, low, high, low / n, high / n))
    clean = totals.correct["clean"]
    return FrequencyReport(
        n, clean, clean / n, rows, (int(height), int(width)), str(dev),
        time.perf_counter() - started,
    )


# ---------------------------------------------------------------- corruptions

Corruption = Callable[[torch.Tensor, Any, torch.Generator], torch.Tensor]

# Severity 1..5 parameters, copied from the CIFAR-10-C generator (Hendrycks & Dietterich 2019,
# make_cifar_c.py): noise std, Poisson photon count, salt-and-pepper fraction, speckle std,
# Gaussian blur sigma, defocus (disk radius, anti-alias sigma), motion blur (radius, sigma),
# contrast factor, HSV value shift, pixelate scale, JPEG quality.
SEVERITY_PARAMS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),
    "motion_blur": ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5)),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
}


def _gaussian_noise(x: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _shot_noise(x: torch.Tensor, photons: float, g: torch.Generator) -> torch.Tensor:
    return (torch.poisson(x * photons, generator=g) / photons).clamp(0, 1)


def _impulse_noise(x: torch.Tensor, amount: float, g: torch.Generator) -> torch.Tensor:
    """Salt and pepper on each value independently, half salt and half pepper (as skimage)."""
    flipped = torch.rand(x.shape, generator=g) < amount
    salt = torch.rand(x.shape, generator=g) < 0.5
    return torch.where(flipped, salt.to(x.dtype), x)


def _speckle_noise(x: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    return (x + x * std * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _filter(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply a (k, k) kernel to every channel with `mode` padding (same-size output)."""
    channels = x.shape[1]
    pad = kernel.shape[-1] // 2
    if mode == "reflect" and pad >= min(x.shape[-2:]):
        mode = "replicate"  # reflection needs the image to be wider than the padding
    weight = kernel.to(x.dtype).expand(channels, 1, *kernel.shape)
    return F.conv2d(F.pad(x, (pad,) * 4, mode=mode), weight, groups=channels)


def _gauss_1d(sigma: float, radius: int) -> torch.Tensor:
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    return weights / weights.sum()


def _gaussian_blur(x: torch.Tensor, sigma: float, _: torch.Generator) -> torch.Tensor:
    """skimage's `gaussian`: kernel truncated at 4σ, edges extended ('nearest')."""
    line = _gauss_1d(sigma, int(4 * sigma + 0.5))
    return _filter(x, torch.outer(line, line), "replicate").clamp(0, 1)


def _defocus_blur(x: torch.Tensor, params: tuple[float, float], _: torch.Generator) -> torch.Tensor:
    """An aliased disk of the given radius smoothed by a small Gaussian (3x3, or 5x5 past
    radius 8, as the CIFAR-10-C `disk`), applied with reflected edges."""
    radius, alias_sigma = params
    smooth = 1 if radius <= 8 else 2
    span = math.ceil(radius) + smooth
    grid = torch.arange(-span, span + 1, dtype=torch.float64)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).to(torch.float64)
    line = _gauss_1d(alias_sigma, smooth)
    kernel = F.conv2d(disk[None, None], torch.outer(line, line)[None, None], padding=smooth)[0, 0]
    return _filter(x, kernel / kernel.sum(), "reflect").clamp(0, 1)


def _motion_blur(x: torch.Tensor, params: tuple[int, float], g: torch.Generator) -> torch.Tensor:
    """After ImageMagick's MotionBlurImage: a one-sided line of 2·radius+1 taps with Gaussian
    weights exp(-i²/2σ²), integer-rounded offsets, edge pixels repeated, and a random angle in
    [-45°, 45°] per image."""
    radius, sigma = params
    taps = torch.arange(2 * radius + 1, dtype=torch.float64)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    angles = torch.deg2rad(torch.rand(x.shape[0], generator=g, dtype=torch.float64) * 90 - 45)
    height, width = x.shape[-2:]
    batch = torch.arange(x.shape[0])[:, None, None]
    rows = torch.arange(height)[None, :, None]
    cols = torch.arange(width)[None, None, :]
    channels_last = x.permute(0, 2, 3, 1)
    out = torch.zeros_like(channels_last)
    for tap, weight in zip(taps, weights):
        dy = torch.round(tap * torch.sin(angles)).long()[:, None, None]
        dx = torch.round(tap * torch.cos(angles)).long()[:, None, None]
        r = (rows + dy).clamp(0, height - 1)
        c = (cols + dx).clamp(0, width - 1)
        out += float(weight) * channels_last[batch, r, c]
    out = out.permute(0, 3, 1, 2)
    return out.clamp(0, 1)


def _contrast(x: torch.Tensor, factor: float, _: torch.Generator) -> torch.Tensor:
    means = x.mean(dim=(-2, -1), keepdim=True)
    return ((x - means) * factor + means).clamp(0, 1)


def _brightness(x: torch.Tensor, shift: float, _: torch.Generator) -> torch.Tensor:
    """Add to the HSV value (max over channels), keeping hue and saturation: every channel is
    scaled by V'/V (black pixels become grey V')."""
    value = x.amax(dim=1, keepdim=True)
    brighter = (value + shift).clamp(max=1)
    scaled = x * (brighter / value.clamp(min=1e-12))
    return torch.where(value > 0, scaled, brighter.expand_as(x)).clamp(0, 1)


def _pixelate(x: torch.Tensor, scale: float, _: torch.Generator) -> torch.Tensor:
    """Box down-sampling to scale·size ('area') then nearest up-sampling, close to PIL's BOX."""
    height, width = x.shape[-2:]
    size = (max(1, int(height * scale)), max(1, int(width * scale)))
    small = F.interpolate(x, size=size, mode="area")
    return F.interpolate(small, size=(height, width), mode="nearest")


def _jpeg(x: torch.Tensor, quality: int, _: torch.Generator) -> torch.Tensor:
    """Encode and decode each 8-bit image with Pillow at `quality`, as CIFAR-10-C did (and
    without torchvision.io's image codecs, deprecated since torchvision 0.29)."""
    if x.shape[1] not in (1, 3):
        raise ConfigError(
            f"jpeg_compression needs 1- or 3-channel images, not {x.shape[1]}-channel ones"
        )
    pixels = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    decoded = []
    for array in pixels:
        buffer = io.BytesIO()
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        image.save(buffer, "JPEG", quality=quality)
        decoded.append(torch.from_numpy(np.array(Image.open(buffer))).reshape(array.shape))
    return torch.stack(decoded).permute(0, 3, 1, 2).to(x.dtype) / 255


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg,
}


def corrupt(
    images: torch.Tensor, corruption: str, severity: int, generator: torch.Generator
) -> torch.Tensor:
    """Apply a named corruption at severity 1..5 to a CPU batch of [0, 1] images."""
    if corruption not in CORRUPTIONS:
        raise ConfigError(
            f"unknown corruption {corruption!r}; valid corruptions: {', '.join(CORRUPTIONS)}"
        )
    if severity not in DEFAULT_SEVERITIES:
        raise ConfigError(f"corruption severity must be 1 to 5, got {severity!r}")
    return CORRUPTIONS[corruption](images, SEVERITY_PARAMS[corruption][severity - 1], generator)


@dataclass
class CorruptionResult:
    """Accuracy under one corruption at one severity."""

    corruption: str
    severity: int
    correct: int
    accuracy: float


@dataclass
class CorruptionReport:
    """Accuracy per corruption × severity, their mean, and AdaSAP's robustness ratio
    R_C = mean corrupted accuracy / clean accuracy (None when clean accuracy is 0)."""

    n_examples: int
    clean_correct: int
    clean_acc: float
    results: list[CorruptionResult]
    mean_acc: float
    robustness_ratio: float | None
    device: str
    seconds: float
    seed: int

    def accuracy(self, corruption: str, severity: int) -> float:
        for item in self.results:
            if item.corruption == corruption and item.severity == severity:
                return item.accuracy
        raise ConfigError(f"the report has no {corruption} at severity {severity}")

    def per_corruption(self) -> dict[str, float]:
        """Mean accuracy of each corruption over its severities."""
        groups: dict[str, list[float]] = {}
        for item in self.results:
            groups.setdefault(item.corruption, []).append(item.accuracy)
        return {name: sum(accs) / len(accs) for name, accs in groups.items()}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_corruption"] = self.per_corruption()
        return data

    @classmethod
    def merge(cls, reports: Sequence["CorruptionReport"]) -> "CorruptionReport":
        """Combine reports of disjoint shards (same corruptions and severities) by summing
        counts; `seconds` is the slowest shard's, as shards run in parallel."""
        first = reports[0]
        cells = [(r.corruption, r.severity) for r in first.results]
        if any([(r.corruption, r.severity) for r in other.results] != cells for other in reports):
            raise ConfigError("cannot merge corruption reports of different corruptions or severities")
        n = sum(r.n_examples for r in reports)
        clean = sum(r.clean_correct for r in reports)
        results = []
        for index, (name, severity) in enumerate(cells):
            correct = sum(r.results[index].correct for r in reports)
            results.append(CorruptionResult(name, severity, correct, correct / n))
        return _corruption_report(n, clean, results, _devices(reports), max(r.seconds for r in reports), first.seed)


def _corruption_report(n: int, clean: int, results: list[CorruptionResult], device: str, seconds: float,
                       seed: int) -> CorruptionReport:
    """The report of these counts, with the mean accuracy and the robustness ratio."""
    mean_acc = sum(r.accuracy for r in results) / len(results)
    return CorruptionReport(
        n_examples=n,
        clean_correct=clean,
        clean_acc=clean / n,
        results=results,
        mean_acc=mean_acc,
        robustness_ratio=mean_acc / (clean / n) if clean else None,
        device=device,
        seconds=seconds,
        seed=seed,
    )


def corruption_probe(
    model: nn.Module,
    normalization: Normalization,
    dataset: object,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = DEFAULT_SEVERITIES,
    *,
    batch_size: int = 128,
    device: str = "auto",
    max_examples: int | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> CorruptionReport:
    """Accuracy under synthetic corruptions (all of `CORRUPTIONS` by default) made on the fly,
    on the CPU, from [0, 1] images, with no downloads, plus the clean accuracy on the same
    examples.

    Random draws come from a CPU generator seeded by (seed, corruption, batch) and are shared by
    the severities of a corruption, so a severity curve is not blurred by fresh noise at each
    level; the same seed and batch size give the same report. The CIFAR-10-C parameters are
    used at any image size, and images are not re-quantised to 8 bits except by JPEG."""
    names = list(CORRUPTIONS) if corruptions is None else list(dict.fromkeys(corruptions))
    unknown = [name for name in names if name not in CORRUPTIONS]
    if unknown or not names:
        problem = f"unknown corruption {unknown[0]!r}" if unknown else "no corruptions chosen"
        raise ConfigError(f"{problem}; valid corruptions: {', '.join(CORRUPTIONS)}")
    levels = list(dict.fromkeys(severities))
    if not levels or any(s not in DEFAULT_SEVERITIES for s in levels):
        raise ConfigError(f"corruption severities must be chosen from 1 to 5, got {levels!r}")
    dev = resolve_device(device)
    started = time.perf_counter()
    order = list(CORRUPTIONS)

    def score(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, index: int) -> dict[str, int]:
        counts = {"clean": count_correct(net, images, labels)}
        cpu = images.cpu()
        for name in names:
            for severity in levels:
                stream = derive_seed(seed, order.index(name), index)
                generator = torch.Generator().manual_seed(stream)
                corrupted = corrupt(cpu, name, severity, generator).to(dev)
                counts[f"{name}@{severity}"] = count_correct(net, corrupted, labels)
        return counts

    totals = _probe_totals(model, normalization, dataset, dev, score, "corruption-probe",
                           batch_size=batch_size, max_examples=max_examples, progress=progress, cancel=cancel)
    n = totals.n
    results = [
        CorruptionResult(name, severity, correct, correct / n)
        for name in names
        for severity in levels
        for correct in [totals.correct[f"{name}@{severity}"]]
    ]
    return _corruption_report(n, totals.correct["clean"], results, str(dev), time.perf_counter() - started, seed)
