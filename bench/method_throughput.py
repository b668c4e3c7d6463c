"""Training throughput of the methods' steps on the bundled sample (issue 15's speed targets):
images/s of one training epoch in `standard`, `fastat`, `asam`, AdaSAP's warmup (adaptive
per-filter ρ) and in-train pruning (FastAT with masks learning, a hardware-loss step every
iteration), measured interleaved — every round runs each in turn on a fresh copy of the model —
so load on a shared machine hits all alike — and counted in CPU time of the process (steps 2 to
the last of the epoch, from its progress reports), which other work on the machine does not
inflate. Targets: an ITP epoch costs at most 1.3× a `fastat` epoch, an AdaSAP warmup epoch at
most 1.3× an `asam` epoch; reported as per-round ratios.

    python -m bench.method_throughput [--rounds 5] [--images 512] [--threads 1] [--device cpu]"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from engine import pipeline
from engine.adasap.phases import run_warmup
from engine.common.fileio import write_json_atomic
from engine.common.progress import Progress
from engine.config import RunConfig
from engine.itp.itp_config import ItpConfig
from engine.itp.trainer import run_itp
from engine.training.finetune import finetune
from sample_models import use_sample_when_unset

from .study import machine

RESULTS = Path(__file__).resolve().parent / "results" / "method_throughput.json"
MODES = ("standard", "fastat", "asam", "adasap-warmup", "itp")
TARGETS = {"itp/fastat": 1.3, "adasap-warmup/asam": 1.3}


class _StepClock:
    """Process CPU time at each training step's progress report."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, event: Progress) -> None:
        if "step" in event.metrics:
            self.times.append(time.process_time())

    def images_per_second(self, batch_size: int) -> float:
        """Images per CPU second over steps 2 to the last (the first step's cost is not timed)."""
        return (len(self.times) - 1) * batch_size / (self.times[-1] - self.times[0])


def _runner(mode: str, ws: pipeline.Workspace, data: Any) -> Callable[[], float]:
    """One training epoch of `mode` on a fresh copy of the sample; returns its images per CPU second."""
    config = dataclasses.replace(ws.config.finetune, epochs=1, milestones=[], eval_max_examples=1)

    def run() -> float:
        model, clock = copy.deepcopy(ws.model), _StepClock()
        if mode == "itp":
            itp = ItpConfig(epochs=1, prune_start=1, prune_end=1)
            run_itp(model, data, ws.normalization, ws.config.prune, itp, config, ws.input_shape, None, progress=clock)
        elif mode == "adasap-warmup":
            warm = dataclasses.replace(ws.config.warmup, epochs=1)
            run_warmup(model, data, ws.normalization, warm, config, None, progress=clock)
        else:
            finetune(model, data, ws.normalization, dataclasses.replace(config, mode=mode), None, progress=clock)
        return clock.images_per_second(config.batch_size)

    return run


def measure(rounds: int, images: int, device: str) -> dict[str, Any]:
    """Images/s of every mode per round (a first, untimed round warms up), and per-round ratios."""
    config = RunConfig()
    use_sample_when_unset(config)
    config.data.spec = "digits"
    config.run.device = config.finetune.device = device
    ws = pipeline.open_workspace(config)
    data = dataclasses.replace(ws.data, train=Subset(ws.data.train, range(min(images, len(ws.data.train)))),
                               val=Subset(ws.data.val, range(1)))
    runners = {mode: _runner(mode, ws, data) for mode in MODES}
    for run in runners.values():
        run()
    per_round: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        for mode, run in runners.items():
            per_round[mode].append(run())
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{m} {per_round[m][-1]:.1f}" for m in MODES), flush=True)
    ratios = {
        "itp/fastat": [f / i for f, i in zip(per_round["fastat"], per_round["itp"])],
        "adasap-warmup/asam": [a / w for a, w in zip(per_round["asam"], per_round["adasap-warmup"])],
        "fastat/standard": [s / f for s, f in zip(per_round["standard"], per_round["fastat"])],
        "asam/standard": [s / a for s, a in zip(per_round["standard"], per_round["asam"])],
    }
    return {
        "images": len(data.train), "rounds": rounds, "device": device, "threads": torch.get_num_threads(),
        "clock": "process CPU time, steps 2 to the last of each epoch",
        "batch_size": config.finetune.batch_size,
        "images_per_second": {m: {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}
                              for m, v in per_round.items()},
        "epoch_cost_ratios": {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}
                              for k, v in ratios.items()},
        "targets": TARGETS,
    }


def render(data: dict[str, Any]) -> str:
    """Markdown tables: images/s per mode, then epoch-cost ratios (slower / faster, per round)."""
    lines = ["| mode | images per CPU second, median | min | max |", "|---|---:|---:|---:|"]
    for mode, v in data["images_per_second"].items():
        lines.append(f"| {mode} | {v['median']:.1f} | {v['min']:.1f} | {v['max']:.1f} |")
    lines += ["", "| epoch cost ratio | median | min | max | target |", "|---|---:|---:|---:|---:|"]
    for name, v in data["epoch_cost_ratios"].items():
        target = data["targets"].get(name)
        lines.append(f"| {name} | {v['median']:.2f} | {v['min']:.2f} | {v['max']:.2f} | "
                     f"{'' if target is None else f'≤ {target:g}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.method_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--images", type=int, default=512, help="training images per epoch (default 512)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.images < 1 or args.threads < 1:
        parser.error("--rounds, --images and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = measure(args.rounds, args.images, args.device)
    data.update({"machine": machine(), "seconds": time.perf_counter() - started,
                 "command": "python -m bench.method_throughput " + " ".join(argv if argv is not None else sys.argv[1:])})
    print(render(data))
    write_json_atomic(RESULTS, data)
    return data


if __name__ == "__main__":
    main()
