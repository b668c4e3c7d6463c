"""Attack-evaluation throughput: test images per second that `engine.robustness.attacks.evaluate_robustness`
gets through for clean accuracy alone, FGSM, PGD-3 and the default suite (FGSM 0.01, FGSM 0.1,
PGD-3 8/255), on a CIFAR ResNet-20 at 32 px, on the CPU and on the GPU when there is one.

    python -m bench.attack_throughput [--images 256] [--gpu-images 4096] [--threads 1] [--devices cpu,cuda]

The network has random weights and the images are random: the work per image does not depend
on either. Each timed run follows an untimed warm-up on one batch. Throughput counts images fully
evaluated (the clean pass plus every attack of the row), first-batch sanity checks included, as
`make run` pays for them. Results also go to bench/results/attack_throughput.json."""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import torch

from engine.common.devices import resolve_device
from engine.common.fileio import write_json_atomic
from engine.data.datasets import ImageTensorDataset
from engine.models.cifar_resnet import CifarResNet
from engine.models.normalization import PRESETS
from engine.robustness.attacks import (
    AttackSpec,
    default_suite,
    evaluate_robustness,
    parse_attack,
)

RESULTS = Path(__file__).resolve().parent / "results" / "attack_throughput.json"
SUITES: dict[str, list[AttackSpec]] = {
    "clean": [],
    "fgsm": [parse_attack("fgsm:eps=8/255")],
    "pgd-3": [parse_attack("pgd:eps=8/255,alpha=2/255,steps=3")],
    "default suite": default_suite(),
}
BATCH = 128


def _dataset(images: int, seed: int = 0) -> ImageTensorDataset:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (images,), generator=generator)
    return ImageTensorDataset(pixels, labels.tolist(), channels=3, image_size=32)


def measure(device: str, images: int) -> list[dict[str, Any]]:
    """One row per suite: images, seconds and images/s on `device`."""
    torch.manual_seed(0)
    model = CifarResNet(20).eval()
    data = _dataset(images)
    norm = PRESETS["cifar10"]
    rows = []
    for name, attacks in SUITES.items():
        evaluate_robustness(model, norm, data, attacks, device=device, batch_size=BATCH, max_examples=BATCH)
        started = time.perf_counter()
        report = evaluate_robustness(model, norm, data, attacks, device=device, batch_size=BATCH)
        seconds = time.perf_counter() - started
        rows.append({
            "suite": name,
            "attacks": [spec.to_text() for spec in attacks],
            "device": report.device,
            "images": report.n_examples,
            "seconds": round(seconds, 3),
            "images_per_second": round(report.n_examples / seconds, 1),
        })
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="test images per CPU run (default 256)")
    parser.add_argument("--gpu-images", type=int, default=4096, help="test images per GPU run (default 4096)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--devices", default="cpu,cuda", help="devices to try; cuda is skipped when absent")
    args = parser.parse_args(argv)
    if args.images < 1 or args.gpu_images < 1 or args.threads < 1:
        parser.error("--images, --gpu-images and --threads must be at least 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    print(f"{'suite':<14} {'device':<8} {'images':>6} {'seconds':>8} {'images/s':>9}")
    try:
        for device in (d.strip() for d in args.devices.split(",") if d.strip()):
            if device.startswith("cuda") and not torch.cuda.is_available():
                print(f"{device}: no GPU here, skipped")
                continue
            images = args.gpu_images if resolve_device(device).type == "cuda" else args.images
            for row in measure(device, images):
                print(f"{row['suite']:<14} {row['device']:<8} {row['images']:>6} {row['seconds']:>8.2f} "
                      f"{row['images_per_second']:>9.1f}", flush=True)
                rows.append(row)
    finally:
        torch.set_num_threads(previous)
    result = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "model": "CIFAR ResNet-20 (random weights), 3x32x32, batch 128",
        "results": rows,
    }
    write_json_atomic(RESULTS, result)
    return result


if __name__ == "__main__":
    main()
