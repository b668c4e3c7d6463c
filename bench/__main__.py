"""`python -m bench` (what `make bench` runs): every benchmark in a fixed order, each printing its
table and writing JSON under bench/results/ (git-ignored), then a summary of what ran and how long.

    python -m bench [--quick | --full] [--steps prune,deploy,attacks,finetune,tui,methods,study] [--docs]

Order and what --quick (default; 11-14 min measured on 2 shared cores, plus ~8 min since the
prune step was rewritten) and --full run:

1. prune    pruning time and peak memory in units of a ResNet-56 forward (bench/prune_speed.py,
            one process per case): the engine with the trace off and on (SR-GKP ResNet-56 and
            ResNet-50, TMI-GKP on the sample), the TUI's prune job, and the whole
            `--batch --stages prune` command split into import / plan / rebuild / check /
            latency. Quick: 2 interleaved repeats, without the ResNet-50 command; full: 5.
2. deploy   deployed latency, original vs grouped / dense / auto (bench/deploy_latency.py):
            ResNet-20/56 at batch 1 and 64 (32 px), ResNet-50 at batch 1 (224 px) with 3x3 and
            with 1x1 convs pruned; NCHW, one thread. Full adds channels-last and ResNet-50 at
            batch 8. On a GPU machine the same matrix runs again on the GPU.
3. attacks  attack-evaluation throughput (bench/attack_throughput.py): clean, FGSM, PGD-3 and the
            default suite on ResNet-20 at 32 px, CPU and GPU when present. Full uses 4x the images.
4. finetune fine-tune throughput (bench/finetune_throughput.py): standard, fastat and asam next to
            a plain PyTorch loop on a pruned ResNet-20, interleaved, CPU and GPU when present. Full
            uses 5 rounds and 5x the CPU images.
5. tui      interactive responsiveness (bench/tui_responsiveness.py), when that script exists.
6. methods  training throughput of standard, fastat, asam, AdaSAP warmup and in-train pruning
            epochs on the sample, interleaved (bench/method_throughput.py): quick 5 rounds of
            512 images, full 10 rounds.
7. study    the comparison study on digits (bench/study.py): quick 3 seeds x 6 epochs, full
            5 seeds x 20 epochs.

Not in the default set (35 minutes on 2 cores): `--steps study-methods`, the study's rows
for in-train pruning and AdaSAP on the sample and the shared CIFAR-10 subset
(bench/study_methods.py, 3 seeds).

A failing step is reported and the others still run; the exit code is 1 if any failed. `--docs`
also rewrites the generated sections of docs/BENCH.md and docs/STUDY.md. bench/results/bench.json
keeps the latest results of every step: those this run skipped are carried over from before."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.common.fileio import write_json_atomic

from . import (
    attack_throughput,
    deploy_latency,
    finetune_throughput,
    method_throughput,
    prune_speed,
    study,
    study_methods,
)

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
BENCH_DOC = HERE.parent / "docs" / "BENCH.md"
STEPS = ("prune", "deploy", "attacks", "finetune", "tui", "methods", "study", "study-methods")
DEFAULT_STEPS = tuple(s for s in STEPS if s != "study-methods")


def deploy_json(device: str) -> Path:
    return RESULTS_DIR / f"deploy_latency_{device.split(':')[0]}.json"


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def step_prune(full: bool, docs: bool) -> dict[str, Any]:
    cases = prune_speed.CASES if full else [c for c in prune_speed.CASES if c != "command:sr-gkp:resnet50"]
    return prune_speed.main(["--repeats", "5" if full else "2", *cases])


def step_deploy(full: bool, docs: bool) -> dict[str, Any]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        extra = ["--full"] if full else ["--formats", "nchw"]
        deploy_latency.main([str(deploy_json(device)), "--device", device, *extra])
    return {device: _read(deploy_json(device)) for device in devices}


def step_attacks(full: bool, docs: bool) -> dict[str, Any]:
    return attack_throughput.main(["--images", "1024", "--gpu-images", "16384"] if full else [])


def step_finetune(full: bool, docs: bool) -> dict[str, Any]:
    return finetune_throughput.main(["--images", "1920", "--rounds", "5"] if full else [])


def step_tui(full: bool, docs: bool) -> dict[str, Any]:
    if not (HERE / "tui_responsiveness.py").is_file():
        raise RuntimeError("bench/tui_responsiveness.py is not there")
    out = RESULTS_DIR / "tui_responsiveness.json"
    subprocess.run([sys.executable, "-m", "bench.tui_responsiveness", "--out", str(out)], check=True)
    return _read(out)


def step_study(full: bool, docs: bool) -> dict[str, Any]:
    return study.main((["--full"] if full else []) + (["--docs"] if docs else []))


def step_methods(full: bool, docs: bool) -> dict[str, Any]:
    return method_throughput.main(["--rounds", "10" if full else "5"])


def step_study_methods(full: bool, docs: bool) -> dict[str, Any]:
    return study_methods.main((["--seeds", "5"] if full else []) + (["--docs"] if docs else []))


RUNNERS: dict[str, Callable[[bool, bool], dict[str, Any]]] = {
    "prune": step_prune, "deploy": step_deploy, "attacks": step_attacks, "finetune": step_finetune,
    "tui": step_tui, "methods": step_methods, "study": step_study, "study-methods": step_study_methods,
}


def render_prune(data: dict[str, Any]) -> str:
    return prune_speed.render(data["results"])


def render_deploy(data: dict[str, Any]) -> str:
    lines = [("| model | input | format | device | original ms | grouped ms | dense ms | auto ms | auto speedup "
              "| layers grouped by auto | pruned layers' share of time |"),
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["results"]:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['model']} | b{r['batch']} {r['input'][1]} px | {r['memory_format']} | {r.get('device', 'cpu')} | "
            + " | ".join(f"{lat[f]['best_ms']:.2f}" for f in deploy_latency.FORMS)
            + f" | ×{r['speedup']['auto']:.2f} | {r['auto']['layers_grouped']}/{r['pruned_layers']} "
            f"| {100 * r['auto']['pruned_layers_share_of_original']:.0f}% |"
        )
    return "\n".join(lines)


def render_attacks(data: dict[str, Any]) -> str:
    lines = ["| suite | device | images | seconds | images/s |", "|---|---|---:|---:|---:|"]
    for r in data["results"]:
        lines.append(f"| {r['suite']} | {r['device']} | {r['images']} | {r['seconds']:.2f} | {r['images_per_second']:.1f} |")
    return "\n".join(lines)


def render_finetune(data: dict[str, Any]) -> str:
    lines = [f"{data['model']}; {data['data']}; the second of two epochs, {data['rounds']} interleaved rounds, "
             f"{data['machine']['threads']} CPU thread(s).", "",
             "| device | loop | images/s (median) | min | max | × plain (median of rounds) |",
             "|---|---|---:|---:|---:|---:|"]
    for s in data["summary"]:
        lines.append(f"| {s['device']} | {s['loop']} | {s['median']:.1f} | {s['min']:.1f} | {s['max']:.1f} "
                     f"| {s['vs_plain']:.2f} |")
    lines += [f"\n{note}" for note in data.get("notes", [])]
    return "\n".join(lines)


def render_tui(data: dict[str, Any]) -> str:
    targets = data.get("targets_ms", {})
    lines = ["| measure | ms | target ms |", "|---|---:|---:|"]
    for name, value in data["results"].items():
        target = targets.get(name)
        lines.append(f"| {name} | {value:.1f} | {'' if target is None else f'≤ {target:g}'} |")
    return "\n".join(lines)


def render_bench(summary: dict[str, Any]) -> str:
    """The generated section of docs/BENCH.md: this run's steps and the tables of what they measured."""
    machine = study.machine()
    parts = [(f"Generated by `{summary['command']}` on {machine['cpu']} ({machine['cores']} cores, "
              f"{machine['platform']}; torch {machine['torch']}); total {summary['seconds'] / 60:.1f} min."), "",
             "| step | status | minutes |", "|---|---|---:|"]
    parts += [f"| {s['step']} | {s['status']} | {s['seconds'] / 60:.1f} |" for s in summary["steps"]]
    data = summary["data"]
    sections = [("Pruning time and peak memory", data.get("prune"), render_prune),
                *((f"Deployed latency ({d})", data.get("deploy", {}).get(d), render_deploy) for d in ("cpu", "cuda")),
                ("Attack-evaluation throughput", data.get("attacks"), render_attacks),
                ("Fine-tune throughput", data.get("finetune"), render_finetune),
                ("Training throughput of the methods (sample, interleaved)", data.get("methods"), method_throughput.render),
                ("TUI responsiveness", data.get("tui"), render_tui)]
    for title, result, render in sections:
        if result is not None:
            parts += ["", f"### {title}", "", render(result)]
    if "study" in data or "study-methods" in data:
        parts += ["", "### Comparison study", "", "See [STUDY.md](STUDY.md)."]
    return "\n".join(parts)


def with_earlier_steps(summary: dict[str, Any], earlier: dict[str, Any] | None) -> dict[str, Any]:
    """This run's summary plus the steps an earlier run measured and this one did not, so
    `--steps X --docs` rewrites X's tables and keeps the others."""
    if earlier is None:
        return summary
    ran = {s["step"] for s in summary["steps"]}
    kept = [s for s in earlier.get("steps", []) if s["step"] not in ran and s["step"] in earlier.get("data", {})]
    if not kept:
        return summary
    steps = sorted([*kept, *summary["steps"]], key=lambda s: STEPS.index(s["step"]))
    data = {s["step"]: earlier["data"][s["step"]] for s in kept} | summary["data"]
    return {**summary, "command": f"{earlier['command']}, then {summary['command']}", "steps": steps, "data": data,
            "seconds": round(sum(s["seconds"] for s in steps), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default: the quick variant of every step")
    mode.add_argument("--full", action="store_true", help="the complete grid of every step (much longer; not timed on 2 cores)")
    parser.add_argument("--steps", default=",".join(DEFAULT_STEPS),
                        help=f"which steps, comma-separated, of {','.join(STEPS)} (default: all but study-methods)")
    parser.add_argument("--docs", action="store_true", help="rewrite the generated sections of docs/BENCH.md and docs/STUDY.md")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        parser.error(f"--steps takes a subset of {','.join(STEPS)}")
    bench_json = RESULTS_DIR / "bench.json"
    earlier = _read(bench_json) if bench_json.is_file() else None
    started = time.perf_counter()
    done: list[dict[str, Any]] = []
    data: dict[str, Any] = {}
    for step in (s for s in STEPS if s in steps):
        print(f"\n== {step} ==", flush=True)
        begin = time.perf_counter()
        try:
            data[step] = RUNNERS[step](args.full, args.docs)
            status = "ok"
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - one broken bench must not stop the others
            traceback.print_exc()
            status = f"failed: {type(exc).__name__}: {exc}"
        done.append({"step": step, "status": status, "seconds": round(time.perf_counter() - begin, 1)})
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    seconds = round(time.perf_counter() - started, 1)
    summary = {"command": command.strip(), "mode": "full" if args.full else "quick", "steps": done,
               "seconds": seconds, "data": data}
    summary = with_earlier_steps(summary, earlier)
    write_json_atomic(bench_json, summary)
    print(f"\n{'step':<8} {'minutes':>7}  status")
    for s in done:
        print(f"{s['step']:<8} {s['seconds'] / 60:7.1f}  {s['status']}")
    print(f"total {seconds / 60:.1f} min; results in {RESULTS_DIR}")
    if args.docs:
        study.replace_section(BENCH_DOC, "bench", render_bench(summary))
        print(f"wrote {BENCH_DOC}")
    return 0 if all(s["status"] == "ok" for s in done) else 1


if __name__ == "__main__":
    sys.exit(main())
