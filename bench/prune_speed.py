"""Pruning at interactive speed: planning time with the decision trace off and on, peak memory,
and where the whole `--batch --stages prune` command spends its time, each as a ratio to this
machine's *unit*, one forward pass of CIFAR ResNet-56 on 256 images (one thread, eval mode),
timed in the same process right before and after every case, so figures compare across
machines and stay readable on a shared one. Every case runs in a fresh process (its own peak
RSS); `--repeats` interleaves the cases and the table gives the median and the range.

Cases (default: all):
  engine:sr-gkp:resnet56   plan_pruning, SR-GKP defaults, CIFAR ResNet-56 (random weights);
                           an untimed warm-up plan, then trace off, then on (TraceFile writing
                           decisions.jsonl, as batch does)
  engine:tmi-gkp:sample    TMI-GKP on the bundled digits ResNet-20 and its 36 ticket snapshots
                           (the archive, streamed); scikit-learn imported beforehand; then a
                           re-plan at rate 0.25 with the clusterings remembered
  engine:sr-gkp:resnet50   SR-GKP on torchvision ResNet-50 (random weights; its 16 3x3 convs),
                           no warm-up
  tui:sr-gkp:sample        pipeline.prune as the TUI's prune job runs it (plan, rebuild, check,
  tui:sr-gkp:resnet56      latency; events kept in a list), on an opened workspace
  command:sr-gkp:resnet56  the whole CLI command in a subprocess: wall time, peak RSS, the
  command:tmi-gkp:sample   report's step split (plan / rebuild / check / latency) and, from a
  command:sr-gkp:resnet50  separate process, the time to import what the command imports

Run: `python -m bench.prune_speed [--repeats N] [case ...]`; results also go to
bench/results/prune_speed.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.common.fileio import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results" / "prune_speed.json"
REPO = Path(__file__).resolve().parents[1]
UNIT_IMAGES = 256
# targets in units (issue 18): the engine's, then the whole prune stage's with traces
TARGETS = {"engine:sr-gkp:resnet56": 0.6, "engine:tmi-gkp:sample": 2.0, "engine:sr-gkp:resnet50": 10.0,
           "command:sr-gkp:resnet56": 1.0}
PEAK_TARGET_MB = {"command:sr-gkp:resnet50": 1024.0}
REPLAN_RATE = 0.25  # TMI's re-plan: another rate than the default 0.4375


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024.0


def _peak_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


class Unit:
    """One forward of CIFAR ResNet-56 on 256 images, one thread: the machine's unit of time."""

    def __init__(self) -> None:
        from engine.models.cifar_resnet import CifarResNet

        torch.manual_seed(0)
        self.model = CifarResNet(56).eval()
        self.images = torch.randn(UNIT_IMAGES, 3, 32, 32)
        self.times: list[float] = []

    def measure(self, repeats: int = 3) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                self.model(self.images[:32])
                for _ in range(repeats):
                    start = time.perf_counter()
                    self.model(self.images)
                    self.times.append(time.perf_counter() - start)
        finally:
            torch.set_num_threads(threads)

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


def _timed(run: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def _model_and_snapshots(name: str) -> tuple[torch.nn.Module, Any]:
    if name == "sample":
        from engine.formats.checkpoints import load_checkpoint
        from engine.formats.snapshots import open_snapshots
        from sample_models import SAMPLE_CHECKPOINT, SAMPLE_SNAPSHOTS

        loaded = load_checkpoint(SAMPLE_CHECKPOINT)
        return loaded.model, open_snapshots(SAMPLE_SNAPSHOTS, reference=loaded.state_dict, window=(35, 70))
    torch.manual_seed(0)
    if name == "resnet50":
        from torchvision.models import resnet50

        return resnet50().eval(), None
    from engine.models.cifar_resnet import CifarResNet

    return CifarResNet(int(name.removeprefix("resnet"))).eval(), None


def engine_case(method: str, model_name: str) -> dict[str, Any]:
    """plan_pruning alone, trace off then on, each without remembered clusterings; for TMI also
    a re-plan at another rate with the trace on, the layers' clusterings remembered (the TUI's
    "change the rate, prune again")."""
    from engine.gkp.clustering import forget_clusterings
    from engine.gkp.planner import plan_pruning
    from engine.gkp.prune_config import PruneConfig
    from engine.gkp.traces import TraceFile

    unit = Unit()
    model, snapshots = _model_and_snapshots(model_name)
    if method == "tmi-gkp":  # scikit-learn imported untimed (the command cases show the cold start)
        from engine.gkp.clustering import cluster_filters

        for scheme in ("kpca", "spectral", "tsne-dbscan"):
            cluster_filters(torch.rand(8, 9).double().numpy(), scheme, 2, 0)
    config = PruneConfig(method=method)
    if model_name != "resnet50":  # one untimed plan, so trace off (timed first) is as warm as trace on
        plan_pruning(model, config, snapshots=snapshots)
    baseline = _rss_mb()
    unit.measure()
    forget_clusterings()
    off_wall, off_cpu, _ = _timed(lambda: plan_pruning(model, config, snapshots=snapshots))
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "decisions.jsonl"

        def traced(settings: PruneConfig) -> None:
            with TraceFile(trace) as sink:
                plan_pruning(model, settings, snapshots=snapshots, on_event=sink.emit)

        forget_clusterings()
        on_wall, on_cpu, _ = _timed(lambda: traced(config))
        size = trace.stat().st_size
        events = sum(1 for _ in trace.open(encoding="utf-8"))
        if method == "tmi-gkp":
            out["replan_s"], out["replan_cpu_s"], _ = _timed(lambda: traced(PruneConfig(method=method, rate=REPLAN_RATE)))
    unit.measure()
    return {"unit_s": unit.seconds, "off_s": off_wall, "off_cpu_s": off_cpu, "on_s": on_wall, "on_cpu_s": on_cpu,
            **out, "trace_bytes": size, "trace_events": events, "baseline_rss_mb": baseline, "peak_rss_mb": _peak_mb()}


def _workspace(model_name: str) -> Any:
    from engine import pipeline
    from engine.config import RunConfig
    from sample_models import use_sample_when_unset

    config = RunConfig()
    config.run.stages = ["prune"]
    if model_name != "sample":
        folder = Path(tempfile.mkdtemp())
        model, _ = _model_and_snapshots(model_name)
        torch.save(model.state_dict(), folder / f"{model_name}.pt")
        config.model.checkpoint = str(folder / f"{model_name}.pt")
        config.model.normalize = "imagenet" if model_name == "resnet50" else "cifar10"
    use_sample_when_unset(config)
    return pipeline.open_workspace(config)


def tui_case(method: str, model_name: str) -> dict[str, Any]:
    """pipeline.prune on an opened workspace, as the TUI's prune job runs it."""
    from engine import pipeline

    unit = Unit()
    ws = _workspace(model_name)
    ws.config.prune.method = method
    unit.measure()
    events: list[Any] = []
    wall, cpu, outcome = _timed(lambda: pipeline.prune(ws, on_event=events.append))
    unit.measure()
    return {"unit_s": unit.seconds, "on_s": wall, "on_cpu_s": cpu, "steps": outcome.step_seconds,
            "trace_events": len(events), "peak_rss_mb": _peak_mb()}


def command_case(method: str, model_name: str) -> dict[str, Any]:
    """The whole `--batch --stages prune` command in a subprocess, and a bare import of it."""
    unit = Unit()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as folder:
        args = ["--method", method]
        if model_name != "sample":
            model, _ = _model_and_snapshots(model_name)
            checkpoint = Path(folder) / f"{model_name}.pt"
            torch.save(model.state_dict(), checkpoint)
            del model
            args += [str(checkpoint), "--normalize", "imagenet" if model_name == "resnet50" else "cifar10"]
        unit.measure()
        imports, _, _ = _timed(lambda: subprocess.run(
            [sys.executable, "-c", "import workbench.cli, workbench.batch, engine.pipeline, torchvision"],
            env=env, check=True))
        command = [sys.executable, "-m", "workbench", *args, "--batch", "--stages", "prune", "--json",
                   "--out", str(Path(folder) / "run")]
        wall, _, done = _timed(lambda: subprocess.run(command, env=env, check=True, capture_output=True, text=True))
        peak = _peak_mb(resource.RUSAGE_CHILDREN)
        unit.measure()
    prune = json.loads(done.stdout)["prune"]
    return {"unit_s": unit.seconds, "command_s": wall, "import_s": imports, "prune_seconds": prune["seconds"],
            "steps": prune["step_seconds"], "peak_rss_mb": peak}


KINDS: dict[str, Callable[[str, str], dict[str, Any]]] = {"engine": engine_case, "tui": tui_case, "command": command_case}
CASES = [
    "engine:sr-gkp:resnet56", "engine:tmi-gkp:sample", "engine:sr-gkp:resnet50",
    "tui:sr-gkp:sample", "tui:sr-gkp:resnet56",
    "command:sr-gkp:resnet56", "command:tmi-gkp:sample", "command:sr-gkp:resnet50",
]


def run_case(name: str) -> dict[str, Any]:
    kind, method, model = name.split(":")
    return KINDS[kind](method, model)


def _run_isolated(name: str) -> dict[str, Any]:
    """Run one case in a fresh interpreter and return its result."""
    done = subprocess.run([sys.executable, "-m", "bench.prune_speed", "--child", name],
                          capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range, in seconds and in units, of every timing of a case's runs."""
    keys = [k for k in runs[0] if k.endswith("_s") and k != "unit_s"] + (["prune_seconds"] if "prune_seconds" in runs[0] else [])
    steps = sorted(runs[0].get("steps", {}))
    out: dict[str, Any] = {"n": len(runs), "unit_s": _spread([r["unit_s"] for r in runs]),
                           "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    for key in keys:
        out[key] = _spread([r[key] for r in runs])
        out[key + "_units"] = _spread([r[key] / r["unit_s"] for r in runs])
    for step in steps:
        out[f"step_{step}_s"] = _spread([r["steps"][step] for r in runs])
        out[f"step_{step}_units"] = _spread([r["steps"][step] / r["unit_s"] for r in runs])
    for key in ("trace_bytes", "trace_events", "baseline_rss_mb"):
        if key in runs[0]:
            out[key] = runs[0][key]
    if name in TARGETS:
        out["target_units"] = TARGETS[name]
    if name in PEAK_TARGET_MB:
        out["target_peak_rss_mb"] = PEAK_TARGET_MB[name]
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def render(results: dict[str, Any]) -> str:
    """The table of docs/BENCH.md: per case the median (range) in units and in seconds."""
    lines = ["| case | n | unit s | trace off: units (s) | trace on: units (s) | re-plan, other rate: units (s) "
             "| split: units | peak RSS MB | target |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]

    def cell(r: dict[str, Any], key: str) -> str:
        if key not in r:
            return ""
        u, s = r[key + "_units"], r[key]
        return f"{u['median']:.2f} ({u['min']:.2f}–{u['max']:.2f}) ({s['median']:.2f} s)"

    for name, r in results.items():
        off = cell(r, "off_s")
        on = cell(r, "on_s") or cell(r, "command_s")
        split = ", ".join(f"{step} {r[f'step_{step}_units']['median']:.2f}"
                          for step in ("plan", "rebuild", "check", "latency") if f"step_{step}_units" in r)
        if "import_s_units" in r:
            split = f"import {r['import_s_units']['median']:.2f}, " + split
        target = []
        if "target_units" in r:
            target.append(f"≤ {r['target_units']:g} units")
        if "target_peak_rss_mb" in r:
            target.append(f"≤ {r['target_peak_rss_mb']:.0f} MB")
        lines.append(f"| {name} | {r['n']} | {r['unit_s']['median']:.2f} | {off} | {on} | {cell(r, 'replan_s')} | {split} | "
                     f"{r['peak_rss_mb']:.0f} | {', '.join(target)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"cases to run (default: all): {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs of every case, interleaved (default 3)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child)))
        return {}
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    chosen = args.cases or CASES
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
               "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    for repeat in range(args.repeats):
        for name in chosen:
            runs[name].append(_run_isolated(name))
            print(f"[{repeat + 1}/{args.repeats}] {name} done", file=sys.stderr, flush=True)
            write_json_atomic(RESULTS, {"machine": machine, "repeats": args.repeats, "runs": runs})  # so far
    results = {name: summarise(name, r) for name, r in runs.items()}
    print(render(results))
    data = {"machine": machine, "repeats": args.repeats, "results": results, "runs": runs}
    write_json_atomic(RESULTS, data)
    return data


if __name__ == "__main__":
    main()
