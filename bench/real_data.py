"""The comparison study on real data: the public CIFAR-10 ResNet-20 of ../shared/checkpoints
(ImageNet normalisation) on the real CIFAR-10 images of ../shared/data/cifar10-subset. Unpruned,
SR-GKP, smoothness snaking + TMI-GKP's greedy selection, and L1-norm filter pruning matched to
the same MACs: test accuracy right after pruning (raw), after BatchNorm recalibration on 1,024
training images, and after fine-tuning, with FGSM ε 0.01 / 0.1 and PGD-3 ε 8/255 on the
recalibrated and the fine-tuned models, as mean ± std over seeds.

    python -m bench.real_data [--seeds N] [--epochs N] [--jobs N] [--docs]

Defaults: 3 seeds × 3 fine-tuning epochs. The subset's loader split is used as is: its five
training batches give 3,357 train and 373 val images (seed 0, stratified), its `test_batch` the
930 test images; all of them come from CIFAR-10's training set, which the model was trained on.
The seed draws the recalibration images and drives fine-tuning (order, augmentation); SR-GKP and
L1 pruning are deterministic. TMI-GKP itself is not run: it needs training snapshots of the
model's ticket window (epochs 35-70 of its original training), and this public checkpoint comes
without any. Each (method, seed) runs in a worker process with one torch thread; GKP models are
fine-tuned and evaluated in their zero-masked dense form (bench/study.py explains why that is the
same training). Results go to bench/results/real_data.json; `--docs` also writes
docs/study/real_data.json and the real-data section of docs/STUDY.md."""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import pipeline
from engine.baselines.filter_pruning import match_macs
from engine.common.fileio import write_json_atomic
from engine.config import RunConfig
from engine.gkp.planner import plan_pruning
from engine.gkp.reconstruct import apply_plan, equivalence_error
from engine.models.batchnorm import recalibrate_batchnorm
from engine.models.metrics import count_cost
from engine.robustness.attacks import evaluate_robustness
from engine.robustness.collapse import collapse_warnings

from .study import EQUIVALENCE_TOLERANCE, Method, machine, replace_section, trainable_masked

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CHECKPOINT = SHARED / "checkpoints" / "cifar10_resnet20_dp-wrapped.th"
CIFAR = SHARED / "data" / "cifar10-subset"
RESULTS = REPO / "bench" / "results" / "real_data.json"
DOCS = REPO / "docs" / "STUDY.md"
DOCS_JSON = REPO / "docs" / "study" / "real_data.json"
DATA_SEED = 0
RECALIBRATE_IMAGES = 1024
ATTACKS = {"fgsm-0.01": "FGSM 0.01", "fgsm-0.1": "FGSM 0.1", "pgd-8/255": "PGD-3 8/255"}

METHODS: tuple[Method, ...] = (
    Method("unpruned", "Unpruned (not fine-tuned)", "unpruned"),
    Method("l1", "L1-norm filter pruning, MAC-matched", "l1"),
    Method("sr-gkp", "SR-GKP (smoothness snaking + smooth beam)", "gkp", {"method": "sr-gkp"}),
    Method("snake-greedy", "Smoothness snaking + greedy (TMI-GKP's selection)", "gkp",
           {"method": "sr-gkp", "selection": "greedy"}),
)
BY_KEY = {m.key: m for m in METHODS}
# Stage of the model, metric key → table header.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("raw", "benign", "Raw"),
    ("recalibrated", "benign", "Recalibrated"),
    ("finetuned", "benign", "Fine-tuned"),
    *(("recalibrated", a, f"Recal. {title}") for a, title in ATTACKS.items()),
    *(("finetuned", a, f"Fine-tuned {title}") for a, title in ATTACKS.items()),
)


def real_config(seed: int, epochs: int, device: str) -> RunConfig:
    """SPEC defaults on the shared model and images, except the seeds, the epoch budget and the
    evaluation (no probes: the study reads clean and attacked accuracy)."""
    config = RunConfig()
    for key, value in {
        "model.checkpoint": str(CHECKPOINT), "model.normalize": "imagenet", "data.spec": f"cifar10:{CIFAR}",
        "run.seed": DATA_SEED, "run.device": device, "run.stages": ["prune", "finetune", "evaluate"],
        "deploy.form": "grouped", "finetune.seed": seed, "finetune.epochs": epochs, "finetune.device": device,
        "evaluate.frequency": False, "evaluate.corruption": False,
    }.items():
        config.set(key, value)
    config.validate()
    return config


def gkp_target(ws: pipeline.Workspace) -> int:
    """MACs of the model pruned by GKP at the default rate and groups (every variant keeps the
    same kernels' count, so the same MACs): what L1 filter pruning is matched to."""
    plan = plan_pruning(ws.model, ws.config.prune, arch=ws.checkpoint.arch.to_dict())
    return count_cost(apply_plan(ws.model, plan, form="grouped"), ws.input_shape).macs


def _metrics(evaluation: pipeline.Evaluation) -> dict[str, float]:
    report = evaluation.robustness
    return {"benign": report.clean_acc, **{a.label: a.accuracy for a in report.attacks}}


def run_unit(key: str, seed: int, epochs: int, target_macs: int, device: str) -> dict[str, Any]:
    """Prune (or not), measure raw, recalibrate, measure, fine-tune and measure one method with one
    seed; runs in a worker process."""
    torch.set_num_threads(1)
    method = BY_KEY[key]
    ws = pipeline.open_workspace(real_config(seed, epochs, device))
    for name, value in method.prune.items():
        ws.config.set(f"prune.{name}", value)
    assert ws.data is not None
    started = time.perf_counter()
    stages: dict[str, dict[str, float]] = {}
    if method.kind == "unpruned":
        evaluation = pipeline.evaluate(ws, ws.model, label="unpruned model")
        cost = count_cost(ws.model, ws.input_shape)
        return {"method": key, "seed": seed, "macs": cost.macs, "params": cost.params,
                "stages": {"raw": _metrics(evaluation)}, "warnings": evaluation.warnings,
                "n_test": evaluation.robustness.n_examples, "seconds": time.perf_counter() - started}
    plan = None
    info: dict[str, Any] = {}
    if method.kind == "l1":
        match = match_macs(ws.model, target_macs, ws.input_shape)
        model: nn.Module = match.result.model
        info = {"filter_ratio": match.result.ratio, "macs_relative_error": match.relative_error}
    else:
        plan = plan_pruning(ws.model, ws.config.prune, arch=ws.checkpoint.arch.to_dict())
        model, handles = trainable_masked(ws.model, plan)
    cost = count_cost(model if plan is None else apply_plan(ws.model, plan, form="grouped"), ws.input_shape)
    raw = evaluate_robustness(model, ws.normalization, ws.data.test, [], device=str(ws.device), seed=DATA_SEED)
    stages["raw"] = {"benign": raw.clean_acc}
    warnings = collapse_warnings("pruned model before recalibration", raw.clean_acc, raw.clean_predicted, ws.data.classes)
    recalibration = recalibrate_batchnorm(model, ws.data.train, ws.normalization, n_images=RECALIBRATE_IMAGES,
                                          seed=seed, device=ws.device)
    evaluation = pipeline.evaluate(ws, model, label="recalibrated model")
    stages["recalibrated"] = _metrics(evaluation)
    warnings += evaluation.warnings
    result = pipeline.finetune_model(ws, model, plan, None)
    if plan is not None:
        for handle in handles:
            handle.remove()
        error = equivalence_error(apply_plan(model, plan, form="grouped"), model, ws.example_batch())
        if not error < EQUIVALENCE_TOLERANCE:
            raise RuntimeError(f"{key} seed {seed}: the fine-tuned model left its pruned structure (max |err| {error:.2e})")
        info["grouped_equivalence_max_abs_err"] = error
    evaluation = pipeline.evaluate(ws, model, label="fine-tuned model")
    stages["finetuned"] = _metrics(evaluation)
    warnings += evaluation.warnings
    return {
        "method": key, "seed": seed, "macs": cost.macs, "params": cost.params, "stages": stages,
        "warnings": warnings, "n_test": evaluation.robustness.n_examples,
        "recalibration": recalibration.to_dict(), "finetune_seconds": result.seconds,
        "val_benign_last_epoch": result.history[-1].val.get("benign"), "seconds": time.perf_counter() - started,
        **info,
    }


def summarize(units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method, in table order: mean, sample std, n and the values of every column."""
    rows = []
    for method in METHODS:
        mine = sorted((u for u in units if u["method"] == method.key), key=lambda u: u["seed"])
        if not mine:
            continue
        cells = {}
        keys = dict.fromkeys((stage, metric) for u in mine for stage, values in u["stages"].items() for metric in values)
        for stage, metric in keys:
            values = [u["stages"][stage][metric] for u in mine if metric in u["stages"].get(stage, {})]
            cells[f"{stage}/{metric}"] = {
                "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                "n": len(values), "values": values,
            }
        rows.append({"method": method.key, "label": method.label, "seeds": [u["seed"] for u in mine],
                     "macs": mine[0]["macs"], "params": mine[0]["params"], "cells": cells,
                     "filter_ratio": mine[0].get("filter_ratio")})
    return rows


def _cell(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "—"
    text = f"{100 * stat['mean']:.1f}"
    return text if stat["std"] is None else f"{text} ± {100 * stat['std']:.1f}"


def render_table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str, str], ...]) -> str:
    head = ["Method", "MACs (M)", "Params (K)", *(title for _, _, title in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in rows:
        cells = [row["label"], f"{row['macs'] / 1e6:.2f}", f"{row['params'] / 1e3:.1f}"]
        if row["method"] == "unpruned":  # evaluated once, as it is: its numbers fill every stage
            cells += [_cell(row["cells"].get(f"raw/{metric}")) for _, metric, _ in columns]
        else:
            cells += [_cell(row["cells"].get(f"{stage}/{metric}")) for stage, metric, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_section(report: dict[str, Any]) -> str:
    """The generated part of the real-data section of docs/STUDY.md."""
    s, m = report["settings"], report["machine"]
    clean, robust = COLUMNS[:3], COLUMNS[3:]
    ratio = next((r["filter_ratio"] for r in report["summary"] if r["method"] == "l1"), None)
    warnings = sorted({w for u in report["units"] for w in u["warnings"]})
    return "\n".join([
        (f"Generated by `{report['command']}` on {report['finished'][:10]}: {len(s['seeds'])} seeds "
         f"({', '.join(map(str, s['seeds']))}) × {s['epochs']} fine-tuning epochs (standard mode), {s['jobs']} worker "
         f"processes of one torch thread on {m['cpu']} ({m['cores']} cores; torch {m['torch']}), device "
         f"{s['device']}; wall time {report['seconds'] / 60:.1f} min."),
        "",
        (f"Test split: {report['n_test']} images (one image = {100 / report['n_test']:.2f} points). GKP target MACs "
         f"{report['target_macs'] / 1e6:.2f} M" + ("" if ratio is None else f"; L1 prunes {100 * ratio:.2f}% of each "
         "block's first-conv filters") + f". Recalibration: {RECALIBRATE_IMAGES} training images drawn by the seed. "
         "Accuracies in %, mean ± sample std over seeds (n = number of seeds); the unpruned model is evaluated once."),
        "",
        render_table(report["summary"], clean),
        "",
        ("Robust accuracy after recalibration and after fine-tuning (FGSM and PGD-3, 3 steps of 2/255, ε in "
         "[0, 1] pixel units):"),
        "",
        render_table(report["summary"], robust),
        "",
        "Warnings the workbench gave on these models (test split):" if warnings else "No collapse warnings.",
        *(f"- {w}" for w in warnings),
        "",
        "Per-seed results: [study/real_data.json](study/real_data.json).",
    ])


def run(seeds: tuple[int, ...], epochs: int, jobs: int, device: str, methods: tuple[str, ...], command: str) -> dict[str, Any]:
    started = time.perf_counter()
    ws = pipeline.open_workspace(real_config(0, epochs, device))
    target = gkp_target(ws)
    units = [(key, seed) for key in methods for seed in (seeds[:1] if key == "unpruned" else seeds)]
    results: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_unit, key, seed, epochs, target, device) for key, seed in units]
        for future in as_completed(futures):
            unit = future.result()
            results.append(unit)
            last = unit["stages"].get("finetuned", unit["stages"]["raw"])["benign"]
            print(f"{unit['method']:<13} seed {unit['seed']}  raw {100 * unit['stages']['raw']['benign']:5.1f}  "
                  f"final {100 * last:5.1f}  ({len(results)}/{len(units)}, {time.perf_counter() - started:5.0f} s)",
                  flush=True)
    return {
        "command": command,
        "settings": {"seeds": list(seeds), "epochs": epochs, "jobs": jobs, "device": device, "data_seed": DATA_SEED,
                     "recalibrate_images": RECALIBRATE_IMAGES, "checkpoint": str(CHECKPOINT), "data": str(CIFAR)},
        "machine": machine(),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - started,
        "target_macs": target,
        "n_test": results[0]["n_test"],
        "summary": summarize(results),
        "units": sorted(results, key=lambda u: (methods.index(u["method"]), u["seed"])),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.real_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1), default 3")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per model, default 3")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--methods", default="", help=f"subset, comma-separated: {', '.join(BY_KEY)}")
    parser.add_argument("--docs", action="store_true", help="also write docs/study/real_data.json and docs/STUDY.md")
    args = parser.parse_args(argv)
    if not CHECKPOINT.is_file() or not (CIFAR / "cifar-10-batches-py").is_dir():
        parser.error(f"needs {CHECKPOINT} and {CIFAR} (../shared)")
    if min(args.seeds, args.epochs, args.jobs) < 1:
        parser.error("--seeds, --epochs and --jobs must be at least 1")
    chosen = {m.strip() for m in args.methods.split(",") if m.strip()} or set(BY_KEY)
    if chosen - set(BY_KEY):
        parser.error(f"unknown method {sorted(chosen - set(BY_KEY))[0]!r}; choose from {', '.join(BY_KEY)}")
    command = ("python -m bench.real_data " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    report = run(tuple(range(args.seeds)), args.epochs, args.jobs, args.device,
                 tuple(k for k in BY_KEY if k in chosen), command)
    print(render_section(report))
    write_json_atomic(RESULTS, report)
    if args.docs:
        write_json_atomic(DOCS_JSON, report)
        replace_section(DOCS, "real-data", render_section(report))
        print(f"wrote {DOCS} and {DOCS_JSON}")
    return report


if __name__ == "__main__":
    main()
