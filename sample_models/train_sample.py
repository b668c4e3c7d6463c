"""Regenerate the bundled sample model: `python -m sample_models.train_sample`.

Trains a CIFAR-style ResNet-20 (1 input channel, "layer" naming, option-A shortcuts) from scratch
on scikit-learn's digits (32×32 upsampled, the engine's stratified split) with the engine's own
trainer on the CPU, and keeps the conv weights of every epoch of the TMI ticket window as a
compact int8-delta archive. Deterministic for a fixed torch build and thread count."""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from engine.common.fileio import write_json_atomic
from engine.common.progress import Progress
from engine.data.datasets import load_data
from engine.formats.checkpoints import save_checkpoint
from engine.formats.snapshots import save_snapshot_archive
from engine.models.architectures import ArchSpec
from engine.models.cifar_resnet import CifarResNet
from engine.robustness.attacks import evaluate_robustness
from engine.training.finetune import finetune
from engine.training.finetune_config import FinetuneConfig

from . import HERE, SAMPLE_CHECKPOINT, SAMPLE_SNAPSHOTS

EPOCHS = 72
TICKET_WINDOW = (35, 70)
THREADS = 1
SEED = 0


def _print_progress(event: Progress) -> None:
    if event.stage == "finetune" and event.metrics.get("epoch_done"):
        print(f"epoch {event.metrics.get('epoch')}: {event.message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    data = load_data("digits", seed=SEED)
    spec = ArchSpec("cifar_resnet", "resnet20", {
        "depth": 20, "naming": "layer", "shortcut": "A", "num_classes": data.num_classes,
        "in_channels": data.in_channels, "width": 16,
    })
    model = CifarResNet(20, num_classes=data.num_classes, in_channels=data.in_channels)
    config = FinetuneConfig(
        epochs=args.epochs, lr=0.1, schedule="cosine", batch_size=64, weight_decay=5e-4,
        device="cpu", seed=SEED,
    )
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    first, last = TICKET_WINDOW

    def keep_snapshot(epoch: int, net: nn.Module) -> None:
        if first <= epoch <= last:
            snapshots[epoch] = {k: v.detach().clone() for k, v in net.state_dict().items() if v.dim() == 4}

    started = time.perf_counter()
    result = finetune(model, data, data.normalization, config, None, on_epoch_end=keep_snapshot,
                      progress=_print_progress)
    seconds = time.perf_counter() - started
    test = evaluate_robustness(model, data.normalization, data.test, [], device="cpu")
    print(f"test accuracy {test.clean_acc:.4f} on {test.n_examples} digits ({seconds:.0f} s)")
    metadata = {
        "trained_by": "sample_models/train_sample.py",
        "data": "digits",
        "epochs": args.epochs,
        "test_acc": test.clean_acc,
        "n_test": test.n_examples,
        "val_acc": result.history[-1].val.get("benign"),
        "ticket_window": list(TICKET_WINDOW),
        "seconds": round(seconds, 1),
    }
    save_checkpoint(SAMPLE_CHECKPOINT, model, spec, data.normalization, metadata=metadata)
    final = {k: v for k, v in model.state_dict().items() if v.dim() == 4}
    save_snapshot_archive(SAMPLE_SNAPSHOTS, snapshots, final)
    sizes = {p.name: p.stat().st_size for p in (SAMPLE_CHECKPOINT, SAMPLE_SNAPSHOTS)}
    write_json_atomic(HERE / "sample.json", {**metadata, "file_bytes": sizes,
                                             "torch": torch.__version__, "threads": THREADS})
    print(json.dumps(sizes))


if __name__ == "__main__":
    main()
