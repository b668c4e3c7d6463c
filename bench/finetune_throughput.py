"""Fine-tune throughput: training images per second of `engine.training.finetune` in `standard`,
`fastat` and `asam` modes next to a plain PyTorch loop on the same model, data, batch size and
optimiser, measured in interleaved rounds of one run, on the CPU and on CUDA when present.

    python -m bench.finetune_throughput [--images 384] [--gpu-images 4096] [--rounds 2] [--threads 1]
                                        [--devices cpu,cuda] [--data PATH|random]

The model is a CIFAR ResNet-20 pruned by SR-GKP at the defaults, in its grouped form (the one
fine-tuning trains). The data are the shared CIFAR-10 subset when it is there (../shared), else
random 32-px images (the work per image does not depend on them). The plain loop is what one
writes by hand: a `DataLoader` (shuffle, torchvision random crop with 4-px padding and flip per
item, the workers fine-tuning would give an image folder, pinned memory on CUDA), SGD with the
same settings, cross-entropy, and on CUDA autocast to the dtype fine-tuning picks, a loss scaler
for fp16 and channels-last. Each run trains two epochs and times the second, so start-up and
cuDNN's autotuning stay out of the figure; `fastat` and `asam` do two forward-backward passes per
step, so half the plain loop's rate is their parity. Results also go to
bench/results/finetune_throughput.json."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from engine.common.devices import cudnn_benchmark, device_autocast_dtype, resolve_device
from engine.common.fileio import write_json_atomic
from engine.data.batches import loader_workers
from engine.data.datasets import DataBundle, ImageTensorDataset, load_data
from engine.gkp.planner import plan_pruning
from engine.gkp.prune_config import PruneConfig
from engine.gkp.reconstruct import apply_plan
from engine.models.cifar_resnet import CifarResNet
from engine.models.normalization import PRESETS
from engine.models.normalize_layer import with_normalization
from engine.training.finetune import finetune
from engine.training.finetune_config import FinetuneConfig

from .study import machine

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_throughput.json"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"
BATCH = 64
MODES = ("standard", "fastat", "asam")
LOOPS = ("plain", *MODES)
GPU_TARGET = 0.9  # standard fine-tuning with AMP on vs the plain loop, on a GPU


def _bundle(source: str, images: int) -> DataBundle:
    """`images` training images (and 64 validation ones) from the CIFAR folder `source`, or
    random ones for `random`."""
    if source != "random":
        data = load_data(f"cifar10:{source}")
        if len(data.train) < images:  # type: ignore[arg-type]
            raise SystemExit(f"{source} has {len(data.train)} training images, fewer than --images {images}")  # type: ignore[arg-type]
        return dataclasses.replace(data, train=Subset(data.train, range(images)), val=Subset(data.val, range(64)))
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (images + 64, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (images + 64,), generator=generator).tolist()
    full = ImageTensorDataset(pixels, labels, 3, 32)
    return DataBundle("random", Subset(full, range(images)), Subset(full, range(images, images + 64)),
                      Subset(full, range(images, images + 64)), 10, 3, 32, [str(c) for c in range(10)],
                      PRESETS["cifar10"], True)


def pruned_resnet20() -> nn.Module:
    """CIFAR ResNet-20 (seeded weights) pruned by SR-GKP at the defaults, grouped form."""
    torch.manual_seed(0)
    model = CifarResNet(20)
    return apply_plan(model, plan_pruning(model, PruneConfig()), form="grouped")


class _CropFlip(Dataset):
    """The plain loop's per-item augmentation, as torchvision tutorials write it."""

    def __init__(self, base: Dataset, flip: bool) -> None:
        self.base = base
        steps: list[nn.Module] = [transforms.RandomCrop(32, padding=4)]
        if flip:
            steps.append(transforms.RandomHorizontalFlip())
        self.augment = transforms.Compose(steps)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return self.augment(image), label


def plain_loop(model: nn.Module, data: DataBundle, device: torch.device, epochs: int = 2) -> float:
    """Images per second of the last of `epochs` epochs of a hand-written training loop."""
    cuda = device.type == "cuda"
    net = with_normalization(model, data.normalization).to(device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    dtype = device_autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    workers = loader_workers()
    loader = DataLoader(_CropFlip(data.train, data.flip_ok), batch_size=BATCH, shuffle=True, num_workers=workers,
                        pin_memory=cuda, persistent_workers=workers > 0)
    net.train()
    seconds = 0.0
    with cudnn_benchmark() if cuda else nullcontext():
        for _ in range(epochs):
            started = time.perf_counter()
            for x, y in loader:
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext():
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
    return len(data.train) / seconds  # type: ignore[arg-type]


def workbench_loop(model: nn.Module, data: DataBundle, device: torch.device, mode: str) -> float:
    """Images per second of the second epoch of `finetune` (validation excluded)."""
    config = FinetuneConfig(epochs=2, batch_size=BATCH, mode=mode, device=str(device), eval_every=2,
                            eval_max_examples=64)
    result = finetune(model, data, data.normalization, config, None)
    return result.history[-1].images_per_second


def measure(device: torch.device, data: DataBundle, rounds: int) -> list[dict[str, Any]]:
    """One row per round and loop, the loops interleaved within each round."""
    model = pruned_resnet20()
    rows = []
    for number in range(1, rounds + 1):
        for loop in LOOPS:
            fresh = copy.deepcopy(model)
            rate = plain_loop(fresh, data, device) if loop == "plain" else workbench_loop(fresh, data, device, loop)
            rows.append({"device": device.type, "loop": loop, "round": number, "images_per_second": round(rate, 1)})
            print(f"  round {number} {device.type:<4} {loop:<8} {rate:8.1f} images/s", flush=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per device and loop: median, min and max images/s over rounds, and the median over rounds
    of the rate relative to the plain loop of the same round."""
    out = []
    for device in dict.fromkeys(r["device"] for r in rows):
        plain = {r["round"]: r["images_per_second"] for r in rows if r["device"] == device and r["loop"] == "plain"}
        for loop in LOOPS:
            mine = [r for r in rows if r["device"] == device and r["loop"] == loop]
            rates = [r["images_per_second"] for r in mine]
            ratios = [r["images_per_second"] / plain[r["round"]] for r in mine]
            out.append({"device": device, "loop": loop, "n": len(rates), "median": statistics.median(rates),
                        "min": min(rates), "max": max(rates), "vs_plain": round(statistics.median(ratios), 3)})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384, help="training images per CPU epoch (default 384)")
    parser.add_argument("--gpu-images", type=int, default=4096, help="training images per GPU epoch (default 4096)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: two threads on two shared cores spin and stall; 0: torch's choice)")
    parser.add_argument("--devices", default="cpu,cuda", help="devices to try; cuda is skipped when absent")
    parser.add_argument("--data", default=str(SHARED_DATA) if SHARED_DATA.is_dir() else "random",
                        help="a CIFAR-10 python folder, or random (default: the shared subset when present)")
    args = parser.parse_args(argv)
    if min(args.images, args.gpu_images) < BATCH or args.rounds < 1 or args.threads < 0:
        parser.error(f"--images and --gpu-images must be at least {BATCH}, --rounds at least 1, --threads >= 0")
    previous = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    try:
        for name in (d.strip() for d in args.devices.split(",") if d.strip()):
            if name.startswith("cuda") and not torch.cuda.is_available():
                notes.append(f"{name}: no CUDA device on this machine, so no GPU figures")
                print(notes[-1])
                continue
            device = resolve_device(name)
            images = args.gpu_images if device.type == "cuda" else args.images
            rows += measure(device, _bundle(args.data, images), args.rounds)
    finally:
        torch.set_num_threads(previous)
    summary = summarise(rows)
    print(f"\n{'device':<6} {'loop':<9} {'median':>8} {'min':>8} {'max':>8} {'x plain':>8}")
    for s in summary:
        print(f"{s['device']:<6} {s['loop']:<9} {s['median']:8.1f} {s['min']:8.1f} {s['max']:8.1f} {s['vs_plain']:8.2f}")
    for s in summary:
        if s["device"] == "cuda" and s["loop"] == "standard":
            verdict = "met" if s["vs_plain"] >= GPU_TARGET else "NOT met"
            notes.append(f"GPU target: standard >= {GPU_TARGET}x the plain loop with AMP on: {verdict} ({s['vs_plain']:.2f}x)")
            print(notes[-1])
    result = {
        "machine": {**machine(), "threads": threads},
        "model": "CIFAR ResNet-20 pruned by SR-GKP (defaults), grouped form, 3x32x32, batch 64, SGD lr 0.01",
        "data": ("random 32-px images" if args.data == "random"
                 else "the shared CIFAR-10 subset" if Path(args.data) == SHARED_DATA
                 else f"CIFAR-10 python batches in {args.data}"),
        "images": {"cpu": args.images, "cuda": args.gpu_images},
        "rounds": args.rounds,
        "results": rows,
        "summary": summary,
        "notes": notes,
    }
    write_json_atomic(RESULTS, result)
    return result


if __name__ == "__main__":
    main()
