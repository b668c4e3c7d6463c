"""Deployment latency of GKP-pruned models (SPEC §5): original vs `grouped` vs `dense` vs `auto`
for CIFAR ResNet-20/56 and torchvision ResNet-50, in NCHW and channels-last, at rate 0.4375 and
8 groups. Prints a table and writes the numbers as JSON.

    python -m bench.deploy_latency [OUT.json] [--threads 1] [--rounds 5] [--full] [--quick] [--device cpu]

Models are measured in interleaved rounds (`engine.models.latency.interleaved_latency`: each round
times every form once, in a rotated order); the table and the speedups use the lowest per-round
10th percentile (the JSON also has the median of the round medians and their spread), since on a
shared machine load spikes only ever add time.
Plans use random grouping and selection: latency depends on the kept counts, not on which
kernels are kept."""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from engine.common.devices import resolve_device
from engine.common.fileio import write_json_atomic
from engine.gkp.planner import plan_pruning
from engine.gkp.prune_config import PruneConfig
from engine.gkp.reconstruct import apply_plan, deploy_summary
from engine.models.cifar_resnet import CifarResNet
from engine.models.latency import interleaved_latency
from engine.models.metrics import count_cost

FORMS = ("original", "grouped", "dense", "auto")


@dataclass(frozen=True)
class Case:
    """One model at one input shape; `pointwise` also prunes the 1x1 convs."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int, int]
    pointwise: bool = False


def cases(full: bool, quick: bool) -> list[Case]:
    """The benchmark matrix: quick = batch 1 only and no ResNet-50 1x1 variant; full adds
    ResNet-50 at batch 8."""
    resnet50 = lambda: torchvision.models.resnet50()  # noqa: E731
    chosen = [
        Case("resnet20", lambda: CifarResNet(20), (1, 3, 32, 32)),
        Case("resnet20", lambda: CifarResNet(20), (64, 3, 32, 32)),
        Case("resnet56", lambda: CifarResNet(56), (1, 3, 32, 32)),
        Case("resnet56", lambda: CifarResNet(56), (64, 3, 32, 32)),
        Case("resnet50", resnet50, (1, 3, 224, 224)),
        Case("resnet50+1x1", resnet50, (1, 3, 224, 224), pointwise=True),
    ]
    if full:
        chosen += [Case("resnet50", resnet50, (8, 3, 224, 224)),
                   Case("resnet50+1x1", resnet50, (8, 3, 224, 224), pointwise=True)]
    if quick:
        chosen = [c for c in chosen if c.input_shape[0] == 1 and not c.pointwise]
    return chosen


def run_case(case: Case, memory_format: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build, prune, deploy in every form and time one case."""
    torch.manual_seed(0)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    model = case.build().eval().to(memory_format=fmt)
    x = torch.randn(case.input_shape).contiguous(memory_format=fmt)
    plan = plan_pruning(model, PruneConfig(grouping="random", selection="random", include_pointwise=case.pointwise))
    device = resolve_device(args.device)
    model, x = model.to(device), x.to(device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        auto = apply_plan(model, plan, form="auto", example_input=x)
        decide_s = time.perf_counter() - start
        models = {"original": model, "grouped": apply_plan(model, plan, form="grouped"),
                  "dense": apply_plan(model, plan, form="dense"), "auto": auto}
        timing = interleaved_latency(models, x, rounds=args.rounds, repeats=args.repeats, threads=args.threads)
        latency = {name: times.to_dict() for name, times in timing.items()}
    finally:
        torch.set_num_threads(previous_threads)
    per_layer = deploy_summary(auto)["layers"]
    layers = per_layer.values()
    grouped_ms = sum(r["grouped_ms"] or 0.0 for r in layers)
    dense_ms = sum(r["dense_ms"] or 0.0 for r in layers)
    saving_ms = sum(max(0.0, (r["dense_ms"] or 0.0) - (r["grouped_ms"] or 0.0)) for r in layers)
    before, after = count_cost(model, (1, *case.input_shape[1:])), count_cost(models["grouped"], (1, *case.input_shape[1:]))
    base = latency["original"]["best_ms"]
    return {
        "model": case.name,
        "batch": case.input_shape[0],
        "input": list(case.input_shape[1:]),
        "memory_format": memory_format,
        "device": str(device),
        "pointwise_pruned": case.pointwise,
        "threads": args.threads,
        "mkldnn": not args.no_mkldnn,
        "pruned_layers": len(plan.layers),
        "macs_per_image_m": {"original": before.macs / 1e6, "pruned": after.macs / 1e6},
        "latency_ms": latency,
        "speedup": {form: base / latency[form]["best_ms"] for form in FORMS},
        "auto": {
            "layers_grouped": sum(r["form"] == "grouped" for r in layers),
            "decide_seconds": decide_s,
            "fallback": any("whole model" in r["note"] for r in layers),
            # Where the time goes: the pruned layers' own time in each form, as auto measured it.
            "pruned_layers_dense_ms": dense_ms,
            "pruned_layers_grouped_ms": grouped_ms,
            "pruned_layers_share_of_original": dense_ms / base if base else 0.0,
            # What per-layer choices could save if layer times simply added up.
            "per_layer_bound_speedup": base / (base - saving_ms) if base > saving_ms else float("inf"),
            "layers": per_layer,
        },
    }


def print_row(row: dict[str, Any]) -> None:
    lat, spd, auto = row["latency_ms"], row["speedup"], row["auto"]
    shape = f"b{row['batch']} {row['input'][1]}px"
    fmt = "CL" if row["memory_format"] == "channels_last" else "NCHW"
    print(
        f"{row['model']:<13} {shape:<10} {fmt:<5}"
        + "".join(f" {lat[f]['best_ms']:>9.2f}" for f in FORMS)
        + f"  x{spd['grouped']:.2f} x{spd['auto']:.2f}  {auto['layers_grouped']:>2}/{row['pruned_layers']:<2}"
        + f"  {100 * auto['pruned_layers_share_of_original']:>4.0f}%"
        + f"  {auto['pruned_layers_dense_ms']:>7.2f}/{auto['pruned_layers_grouped_ms']:<7.2f}"
        + f"  x{auto['per_layer_bound_speedup']:.2f}"
        + (" fallback" if auto["fallback"] else ""),
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json_out", nargs="?", help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads while timing (default 1)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per form per round (default 5)")
    parser.add_argument("--formats", default="nchw,channels_last", help="memory formats, comma-separated")
    parser.add_argument("--full", action="store_true", help="add ResNet-50 at batch 8")
    parser.add_argument("--quick", action="store_true", help="batch 1, 3x3 layers only")
    parser.add_argument("--models", default="", help="only these models, comma-separated (e.g. resnet50,resnet50+1x1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:i] or auto (default cpu)")
    parser.add_argument("--no-mkldnn", action="store_true", help="time with oneDNN (mkldnn) disabled")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"mkldnn {'off' if args.no_mkldnn else 'on'}; latency in ms (best p10 of {args.rounds} rounds)")
    print(f"{'model':<13} {'input':<10} {'fmt':<5}" + "".join(f" {f:>9}" for f in FORMS)
          + "  speedup g/a  grouped  pruned-share  pruned dense/grouped ms  bound")
    rows = []
    flags = torch.backends.mkldnn.flags(enabled=False) if args.no_mkldnn else contextlib.nullcontext()
    with flags:
        only = {m.strip() for m in args.models.split(",") if m.strip()}
        for case in (c for c in cases(args.full, args.quick) if not only or c.name in only):
            for memory_format in formats:
                row = run_case(case, memory_format, args)
                print_row(row)
                rows.append(row)
    if args.json_out:
        write_json_atomic(args.json_out, {"torch": torch.__version__, "results": rows})
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
