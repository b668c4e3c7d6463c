"""The comparison study on digits: SR-GKP's table in miniature on the bundled sample ResNet-20.
Unpruned, L1-norm filter pruning, TMI-GKP, SR-GKP and four ablations, all at matched MACs (the
GKP methods land on the same MACs by construction; L1 is matched to them with `match_macs`),
each fine-tuned with the same budget and evaluated on the same test images: benign accuracy,
FGSM ε 0.01 / 0.1, PGD-3 ε 8/255, the frequency probe at θ = 2 and 4, and the corruption ratio,
as mean ± std over seeds.

    python -m bench.study [--full] [--seeds N] [--epochs N] [--jobs N] [--mode standard] [--docs]

Quick (default): 3 seeds × 6 epochs. Full: 5 seeds × 20 epochs. The seed drives pruning (TMI
clustering, random groupings) and fine-tuning (order, augmentation); the data split and attack
randomness stay at seed 0, the split the sample model was trained on, so every model is tested
on the same 359 unseen digits. Each (method, seed) runs in a worker process with one torch
thread. GKP models are fine-tuned and evaluated in their zero-masked dense form, whose pruned
kernels get zero gradient and so stay exactly zero: the same function and the same training as
the grouped form (checked after training against the grouped rebuild), with inference at the
speed of a dense conv.
Results go to bench/results/study.json; `--docs` also writes docs/study/ and the table in
docs/STUDY.md."""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import pipeline
from engine.baselines.filter_pruning import match_macs
from engine.common.fileio import write_json_atomic, write_text_atomic
from engine.config import RunConfig
from engine.gkp.plan import PrunePlan
from engine.gkp.reconstruct import apply_plan, equivalence_error, masked_dense
from engine.models.metrics import count_cost
from engine.training.finetune_config import MODES
from sample_models import use_sample_when_unset

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "study.json"
DOCS = REPO / "docs" / "STUDY.md"
DOCS_DIR = REPO / "docs" / "study"
DATA_SEED = 0  # the split the bundled sample model was trained on
THETAS = (2, 4)  # digits are 8x8 images upsampled to 32 px: their spectrum lies within radius ~4
EQUIVALENCE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Method:
    """One row of the study: `kind` is unpruned, l1 or gkp; `prune` overrides [prune] keys."""

    key: str
    label: str
    kind: str
    prune: dict[str, str] = field(default_factory=dict)


METHODS: tuple[Method, ...] = (
    Method("unpruned", "Unpruned (not fine-tuned)", "unpruned"),
    Method("l1", "L1-norm filter pruning, MAC-matched", "l1"),
    Method("tmi-gkp", "TMI-GKP (TMI clustering + greedy)", "gkp", {"method": "tmi-gkp"}),
    Method("sr-gkp", "SR-GKP (smoothness snaking + smooth beam)", "gkp", {"method": "sr-gkp"}),
    Method("snake-greedy", "Ablation: smoothness snaking + greedy", "gkp", {"method": "sr-gkp", "selection": "greedy"}),
    Method("tmi-beam", "Ablation: TMI clustering + smooth beam", "gkp", {"method": "tmi-gkp", "selection": "smooth-beam"}),
    Method("least-smooth", "Ablation: smoothness snaking + least-smooth selection", "gkp",
           {"method": "sr-gkp", "selection": "least-smooth"}),
    Method("random", "Ablation: random grouping + random selection", "gkp", {"grouping": "random", "selection": "random"}),
)
BY_KEY = {m.key: m for m in METHODS}
# Metric key in a unit's result, table header.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("benign", "Benign"),
    ("fgsm-0.01", "FGSM 0.01"),
    ("fgsm-0.1", "FGSM 0.1"),
    ("pgd-8/255", "PGD-3 8/255"),
    *((f"{band}@{t}", f"{band.capitalize()} θ={t}") for t in THETAS for band in ("low", "high")),
    ("corruption_ratio", "Corruption ratio"),
)


@dataclass(frozen=True)
class Settings:
    """What one study run does; `quick()` and `full()` are the documented presets."""

    seeds: tuple[int, ...]
    epochs: int
    jobs: int
    device: str = "cpu"
    mode: str = "standard"
    methods: tuple[str, ...] = tuple(m.key for m in METHODS)

    @staticmethod
    def quick(jobs: int = 2) -> Settings:
        return Settings(seeds=(0, 1, 2), epochs=6, jobs=jobs)

    @staticmethod
    def full(jobs: int = 2) -> Settings:
        return Settings(seeds=(0, 1, 2, 3, 4), epochs=20, jobs=jobs)


def study_config(seed: int, epochs: int, device: str, mode: str = "standard") -> RunConfig:
    """The run configuration of one study unit: SPEC defaults except the seeds, the epoch budget,
    the fine-tuning mode, the probe thresholds, the deployed form (grouped: the study times
    nothing) and BatchNorm recalibration (off)."""
    config = RunConfig()
    use_sample_when_unset(config)
    config.run.seed = DATA_SEED
    config.run.device = device
    config.prune.seed = seed
    config.deploy.form = "grouped"
    # Fine-tuning starts from the masked dense model with the unpruned model's BatchNorm
    # statistics, as when the table below was generated; bench/real_data.py measures recalibration.
    config.prune.recalibrate_images = 0
    config.finetune.seed = seed
    config.finetune.epochs = epochs
    config.finetune.device = device
    config.finetune.mode = mode
    config.evaluate.thresholds = list(THETAS)
    config.validate()
    return config


def gkp_macs(device: str = "cpu") -> int:
    """MACs of the sample model pruned by GKP at the default rate and groups: the target L1
    filter pruning is matched to (every GKP variant keeps the same number of kernels)."""
    ws = pipeline.open_workspace(study_config(0, 1, device))
    ws.config.prune.grouping, ws.config.prune.selection = "random", "random"
    return pipeline.prune(ws).cost_after.macs


def trainable_masked(model: nn.Module, plan: PrunePlan) -> tuple[nn.Module, list[Any]]:
    """The zero-masked dense form of a GKP plan, with gradient hooks that keep the pruned
    kernels at zero while it trains; returns the model and the hook handles."""
    dense = masked_dense(model, plan)
    handles = []
    for layer in plan.layers:
        weight = dense.get_submodule(layer.name).weight
        keep = (weight.detach() != 0).any(dim=(2, 3), keepdim=True).to(weight.dtype)
        expected = layer.out_channels * len(layer.kept_channels[0])
        if int(keep.sum()) != expected:
            raise RuntimeError(f"{layer.name}: {int(keep.sum())} non-zero kernels, the plan keeps {expected}")
        handles.append(weight.register_hook(lambda grad, keep=keep: grad * keep))
    return dense, handles


def run_unit(key: str, seed: int, epochs: int, target_macs: int, device: str, mode: str) -> dict[str, Any]:
    """Prune (or not), fine-tune and evaluate one method with one seed; runs in a worker."""
    torch.set_num_threads(1)
    method = BY_KEY[key]
    ws = pipeline.open_workspace(study_config(seed, epochs, device, mode))
    for name, value in method.prune.items():
        ws.config.set(f"prune.{name}", value)
    started = time.perf_counter()
    info: dict[str, Any] = {}
    plan = None
    if method.kind == "unpruned":
        model = ws.model
        cost = count_cost(model, ws.input_shape)
    elif method.kind == "l1":
        match = match_macs(ws.model, target_macs, ws.input_shape)
        model = match.result.model
        cost = count_cost(model, ws.input_shape)
        info = {"filter_ratio": match.result.ratio, "macs_relative_error": match.relative_error}
    else:
        outcome = pipeline.prune(ws)
        plan, cost = outcome.plan, outcome.cost_after
        model, handles = trainable_masked(ws.model, plan)
    prune_s = time.perf_counter() - started
    finetune_s, val = 0.0, None
    if method.kind != "unpruned":
        result = pipeline.finetune_model(ws, model, plan, None)
        finetune_s = result.seconds
        val = result.history[-1].val.get("benign")
    if plan is not None:
        for handle in handles:
            handle.remove()
        batch = ws.example_batch()
        error = equivalence_error(apply_plan(model, plan, form="grouped"), model, batch)
        if not error < EQUIVALENCE_TOLERANCE:
            raise RuntimeError(f"{key} seed {seed}: the fine-tuned model left its pruned structure (max |err| {error:.2e})")
        info["grouped_equivalence_max_abs_err"] = error
    started = time.perf_counter()
    evaluation = pipeline.evaluate(ws, model)
    metrics = {"benign": evaluation.robustness.clean_acc,
               **{a.label: a.accuracy for a in evaluation.robustness.attacks}}
    for row in evaluation.frequency.rows if evaluation.frequency else []:
        metrics[f"low@{row.theta:g}"], metrics[f"high@{row.theta:g}"] = row.low_acc, row.high_acc
    if evaluation.corruption is not None:
        metrics["corruption_ratio"] = evaluation.corruption.robustness_ratio
    return {
        "method": key, "seed": seed, "macs": cost.macs, "params": cost.params, "metrics": metrics,
        "n_test": evaluation.robustness.n_examples, "val_benign_last_epoch": val,
        "prune_seconds": prune_s, "finetune_seconds": finetune_s,
        "evaluate_seconds": time.perf_counter() - started, **info,
    }


def _spread(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(units: list[dict[str, Any]], methods: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per method, in table order: mean and sample std over its seeds of every metric."""
    rows = []
    for key in methods:
        mine = sorted((u for u in units if u["method"] == key), key=lambda u: u["seed"])
        if not mine:
            continue
        stats = {}
        for column, _ in COLUMNS:
            values = [u["metrics"][column] for u in mine if u["metrics"].get(column) is not None]
            if values:
                mean, std = _spread(values)
                stats[column] = {"mean": mean, "std": std, "values": values}
        rows.append({
            "method": key, "label": BY_KEY[key].label, "seeds": [u["seed"] for u in mine],
            "macs": mine[0]["macs"], "params": mine[0]["params"], "metrics": stats,
            "finetune_seconds": statistics.fmean(u["finetune_seconds"] for u in mine),
            "prune_seconds": statistics.fmean(u["prune_seconds"] for u in mine),
            "filter_ratio": mine[0].get("filter_ratio"),
        })
    return rows


def _cell(stat: dict[str, Any] | None, percent: bool) -> str:
    if stat is None:
        return "—"
    scale, digits = (100.0, 1) if percent else (1.0, 3)
    text = f"{scale * stat['mean']:.{digits}f}"
    return text if stat["std"] is None else f"{text} ± {scale * stat['std']:.{digits}f}"


def render_table(rows: list[dict[str, Any]]) -> str:
    """The study table in Markdown: accuracies in %, the corruption ratio as a fraction."""
    head = ["Method", "MACs (M)", "Params (K)", *(title for _, title in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in rows:
        cells = [row["label"], f"{row['macs'] / 1e6:.2f}", f"{row['params'] / 1e3:.1f}"]
        cells += [_cell(row["metrics"].get(key), key != "corruption_ratio") for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PLOT_SERIES: tuple[tuple[str, str], ...] = (
    ("benign", "Benign"), ("fgsm-0.01", "FGSM ε=0.01"), ("pgd-8/255", "PGD-3 ε=8/255"), ("fgsm-0.1", "FGSM ε=0.1"),
)
PLOT_COLORS = ("#333333", "#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#dd8452")


def _axis(values: list[float]) -> tuple[float, float, float]:
    """A zoomed percent axis (low, high, tick step) holding every value with a little room."""
    low = max(0.0, 5 * math.floor((min(values) - 1) / 5))
    high = min(100.0, 5 * math.ceil((max(values) + 1) / 5))
    step = next(s for s in (1, 2, 5, 10, 20) if (high - low) / s <= 6)
    return low, high, step


def render_svg(rows: list[dict[str, Any]]) -> str:
    """One panel per attack setting, each with its own zoomed accuracy axis: every seed as a dot,
    the mean as a bar, ±std as a whisker, one colour per method."""
    panel_w, panel_h, left, top, gap = 215, 260, 50, 50, 25
    width = left + len(PLOT_SERIES) * (panel_w + gap)
    height = top + panel_h + 40 + 18 * math.ceil(len(rows) / 2)
    slot = panel_w / max(1, len(rows))
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            'font-family="sans-serif" font-size="12">'),
           f'<rect width="{width}" height="{height}" fill="white"/>',
           (f'<text x="{left}" y="20" font-size="14">Test accuracy (%) per method: dots are seeds, bars the '
            'mean, whiskers ±std. Each panel has its own zoomed axis.</text>')]
    for p, (key, title) in enumerate(PLOT_SERIES):
        x0 = left + p * (panel_w + gap)
        values = [100 * v for row in rows for v in row["metrics"].get(key, {}).get("values", [])]
        if not values:
            continue
        low, high, step = _axis(values)

        def y(v: float, low: float = low, high: float = high) -> float:
            """Panel height of a percentage."""
            return top + panel_h * (1 - (v - low) / (high - low))

        out.append(f'<text x="{x0 + panel_w / 2:.1f}" y="{top - 10}" text-anchor="middle" font-weight="bold">{title}</text>')
        out.append(f'<rect x="{x0}" y="{top}" width="{panel_w}" height="{panel_h}" fill="none" stroke="#999"/>')
        tick = low
        while tick <= high + 1e-9:
            out.append(f'<line x1="{x0}" x2="{x0 + panel_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#e5e5e5"/>')
            out.append(f'<text x="{x0 - 4}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
            tick += step
        for i, row in enumerate(rows):
            stat = row["metrics"].get(key)
            if stat is None:
                continue
            color, cx = PLOT_COLORS[i % len(PLOT_COLORS)], x0 + (i + 0.5) * slot
            mean = 100 * stat["mean"]
            out.append(f'<line x1="{cx - slot * 0.35:.1f}" x2="{cx + slot * 0.35:.1f}" y1="{y(mean):.1f}" '
                       f'y2="{y(mean):.1f}" stroke="{color}" stroke-width="3"/>')
            if stat["std"]:
                lo, hi = max(low, mean - 100 * stat["std"]), min(high, mean + 100 * stat["std"])
                out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(lo):.1f}" y2="{y(hi):.1f}" stroke="{color}"/>')
            for v in stat["values"]:
                out.append(f'<circle cx="{cx:.1f}" cy="{y(100 * v):.1f}" r="3" fill="{color}" fill-opacity="0.6"/>')
    for i, row in enumerate(rows):
        lx, ly = left + (i % 2) * 480, top + panel_h + 30 + 18 * (i // 2)
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{PLOT_COLORS[i % len(PLOT_COLORS)]}"/>')
        out.append(f'<text x="{lx + 18}" y="{ly}">{row["label"]}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def machine() -> dict[str, Any]:
    """Where the study ran."""
    cpu = platform.processor()
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text(encoding="utf-8"))
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def render_section(report: dict[str, Any]) -> str:
    """The generated part of docs/STUDY.md: how it was made, the table and the plot."""
    s, m = report["settings"], report["machine"]
    ratio = next((r["filter_ratio"] for r in report["summary"] if r["method"] == "l1"), None)
    l1_note = "" if ratio is None else f"; L1 prunes {100 * ratio:.2f}% of each block's first-conv filters"
    return "\n".join([
        (f"Generated by `{report['command']}` on {report['finished'][:10]}: {len(s['seeds'])} seeds "
         f"({', '.join(map(str, s['seeds']))}) × {s['epochs']} fine-tuning epochs ({s['mode']} mode), "
         f"{s['jobs']} worker processes of one torch thread on {m['cpu']} ({m['cores']} cores, {m['platform']}; "
         f"torch {m['torch']}), device {s['device']}; wall time {report['seconds'] / 60:.1f} min."),
        "",
        (f"Test split: {report['n_test']} digits. GKP target MACs {report['target_macs'] / 1e6:.2f} M{l1_note}. "
         "Accuracies in %, mean ± sample std over seeds; the unpruned model is evaluated once."),
        "",
        render_table(report["summary"]),
        "",
        "![Accuracy per method](study/study.svg)",
        "",
        "Raw per-seed results: [study/study.json](study/study.json).",
    ])


def replace_section(path: Path, name: str, body: str) -> None:
    """Rewrite what lies between `<!-- name:begin -->` and `<!-- name:end -->` in a Markdown file,
    or append the marked section when the markers are missing; atomically."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    write_text_atomic(path, text)


def run_study(settings: Settings, command: str) -> dict[str, Any]:
    """Run every (method, seed) unit over a pool of worker processes and summarise."""
    started = time.perf_counter()
    target = gkp_macs(settings.device)
    units = [(key, seed) for key in settings.methods for seed in (settings.seeds[:1] if key == "unpruned" else settings.seeds)]
    # Longest first (TMI clustering), so the pool does not end on one slow straggler.
    units.sort(key=lambda unit: (BY_KEY[unit[0]].prune.get("method") != "tmi-gkp", BY_KEY[unit[0]].kind == "unpruned"))
    results: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=settings.jobs, mp_context=context) as pool:
        futures = {pool.submit(run_unit, key, seed, settings.epochs, target, settings.device, settings.mode): (key, seed)
                   for key, seed in units}
        for future in as_completed(futures):
            unit = future.result()
            results.append(unit)
            m = unit["metrics"]
            print(f"{unit['method']:<13} seed {unit['seed']}  benign {100 * m['benign']:5.1f}  "
                  f"pgd {100 * m['pgd-8/255']:5.1f}  MACs {unit['macs'] / 1e6:6.2f} M  "
                  f"({len(results)}/{len(units)}, {time.perf_counter() - started:5.0f} s)", flush=True)
    summary = summarize(results, settings.methods)
    return {
        "command": command,
        "settings": {"seeds": list(settings.seeds), "epochs": settings.epochs, "mode": settings.mode, "jobs": settings.jobs,
                     "device": settings.device, "data_seed": DATA_SEED, "thetas": list(THETAS)},
        "machine": machine(),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - started,
        "target_macs": target,
        "n_test": results[0]["n_test"],
        "summary": summary,
        "units": sorted(results, key=lambda u: (settings.methods.index(u["method"]), u["seed"])),
    }


def write_docs(report: dict[str, Any]) -> None:
    """docs/study/study.json and study.svg, and the generated section of docs/STUDY.md."""
    write_json_atomic(DOCS_DIR / "study.json", report)
    write_text_atomic(DOCS_DIR / "study.svg", render_svg(report["summary"]))
    replace_section(DOCS, "study", render_section(report))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="5 seeds x 20 epochs (default: quick, 3 seeds x 6 epochs)")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs per model")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--mode", default="standard", help="fine-tuning mode: standard (default), fastat, sam or asam")
    parser.add_argument("--methods", default="", help=f"subset, comma-separated: {', '.join(BY_KEY)}")
    parser.add_argument("--docs", action="store_true", help="also write docs/study/ and the table in docs/STUDY.md")
    args = parser.parse_args(argv)
    preset = Settings.full(args.jobs) if args.full else Settings.quick(args.jobs)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) or preset.methods
    unknown = [m for m in methods if m not in BY_KEY]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(BY_KEY)}")
    if args.mode not in MODES:
        parser.error(f"--mode must be one of {', '.join(MODES)}")
    if any(v is not None and v < 1 for v in (args.seeds, args.epochs)) or args.jobs < 1:
        parser.error("--seeds, --epochs and --jobs must be at least 1")
    settings = Settings(
        seeds=tuple(range(args.seeds)) if args.seeds else preset.seeds,
        epochs=args.epochs or preset.epochs, jobs=args.jobs, device=args.device, mode=args.mode,
        methods=tuple(key for key in BY_KEY if key in methods),
    )
    command = "python -m bench.study " + " ".join(argv if argv is not None else sys.argv[1:])
    report = run_study(settings, command.strip())
    print(render_table(report["summary"]))
    print(f"study took {report['seconds'] / 60:.1f} min")
    write_json_atomic(RESULTS, report)
    if args.docs:
        write_docs(report)
        print(f"wrote {DOCS} and {DOCS_DIR}/")
    return report


if __name__ == "__main__":
    main()
