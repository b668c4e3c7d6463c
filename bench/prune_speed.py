"""Pruning speed against the targets of the GKP task: SR-GKP on CIFAR ResNet-56 (<= 5 s), TMI-GKP
on ResNet-20 with a 36-epoch ticket window (<= 60 s), SR-GKP on torchvision ResNet-50 3x3 convs
(<= 60 s, <= 2 GB peak), within a grid of both methods on CIFAR ResNet-20/32/56/110 and
torchvision ResNet-50 (cases `METHOD:MODEL`), plus decision-trace JSONL sizes. Each case runs in
its own process so peak memory is its own. Random weights: timing does not depend on them.

Run: `.venv/bin/python -m bench.prune_speed [case ...]`; results also go to
bench/results/prune_speed.json."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.common.fileio import write_json_atomic
from engine.gkp.planner import plan_pruning
from engine.gkp.prune_config import PruneConfig
from engine.gkp.traces import TraceEvent, event_line
from engine.models.cifar_resnet import CifarResNet

RESULTS = Path(__file__).resolve().parent / "results" / "prune_speed.json"
TARGETS = {"sr-gkp:resnet56": 5.0, "tmi-gkp:resnet20": 60.0, "sr-gkp:resnet50": 60.0}
GRID_MODELS = ("resnet20", "resnet32", "resnet56", "resnet110", "resnet50")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timed(model: torch.nn.Module, config: PruneConfig, **kwargs: Any) -> dict[str, Any]:
    before = _peak_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    plan = plan_pruning(model, config, **kwargs)
    return {
        "wall_s": round(time.perf_counter() - wall, 3),
        "cpu_s": round(time.process_time() - cpu, 3),
        "layers": len(plan.layers),
        "peak_rss_mb_before": round(before, 1),
        "peak_rss_mb": round(_peak_mb(), 1),
    }


def _snapshots(model: torch.nn.Module, epochs: range) -> dict[int, dict[str, torch.Tensor]]:
    """Synthetic training snapshots: the final weights plus noise shrinking towards the end."""
    generator = torch.Generator().manual_seed(0)
    final = model.state_dict()
    return {
        epoch: {k: v + 0.01 * (epochs.stop - epoch) * torch.randn(v.shape, generator=generator)
                if v.is_floating_point() else v for k, v in final.items()}
        for epoch in epochs
    }


def _trace_bytes(depth: int, level: str) -> dict[str, Any]:
    size = count = 0

    def sink(event: TraceEvent) -> None:
        nonlocal size, count
        size += len(event_line(event)) + 1
        count += 1

    torch.manual_seed(0)
    result = _timed(CifarResNet(depth), PruneConfig(trace_level=level), on_event=sink)
    return {**result, "events": count, "jsonl_bytes": size}


def case_grid(method: str, model_name: str) -> dict[str, Any]:
    """One method on one model: CIFAR ResNet-N, or torchvision ResNet-50 (3x3 convs); TMI-GKP
    gets 36 synthetic ticket snapshots."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50() if model_name == "resnet50" else CifarResNet(int(model_name.removeprefix("resnet")))
    if method == "sr-gkp":
        return _timed(model, PruneConfig())
    snapshots = _snapshots(model, range(35, 71))
    return {**_timed(model, PruneConfig(method=method), snapshots=snapshots), "tickets": len(snapshots)}


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    **{f"{method}:{name}": (lambda method=method, name=name: case_grid(method, name))
       for method in ("sr-gkp", "tmi-gkp") for name in GRID_MODELS},
    **{f"trace-resnet{d}-{level}": (lambda d=d, level=level: _trace_bytes(d, level))
       for d in (20, 56) for level in ("decisions", "full")},
}


def _run_isolated(name: str) -> dict[str, Any]:
    """Run one case in a fresh interpreter and return its result."""
    done = subprocess.run([sys.executable, "-m", "bench.prune_speed", "--child", name],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"cases to run (default: all): {', '.join(CASES)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    if args.child:
        print(json.dumps(CASES[args.child]()))
        return
    results: dict[str, Any] = {}
    if RESULTS.is_file():  # a partial run updates the cases it ran and keeps the others
        results = json.loads(RESULTS.read_text(encoding="utf-8")).get("results", {})
    for name in args.cases or list(CASES):
        result = _run_isolated(name)
        target = TARGETS.get(name)
        if target is not None:
            result["target_s"] = target
        results[name] = result
        verdict = "" if target is None else f"  (target <= {target:g} s)"
        extra = f"  {result['jsonl_bytes'] / 1e6:.2f} MB JSONL, {result['events']} events" if "jsonl_bytes" in result else ""
        print(f"{name:28} wall {result['wall_s']:8.2f} s  cpu {result['cpu_s']:8.2f} s  "
              f"peak {result['peak_rss_mb']:7.0f} MB{verdict}{extra}", flush=True)
    write_json_atomic(RESULTS, {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "results": results,
    })


if __name__ == "__main__":
    main()
