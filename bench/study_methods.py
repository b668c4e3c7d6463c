"""The study's rows for the two seed methods beyond GKP: in-train mask pruning (ITP: grouped-kernel
and kernel masks, FastAT on and off, and a sweep of its hardware-loss weight b) and AdaSAP
(warmup + SR-GKP, warmup + L1 filters), beside SR-GKP and L1 filter pruning, at the same MACs and
the same training budget in epochs, on two models:

- `digits`: the bundled sample ResNet-20 on its own digits split (test = 359 unseen digits);
- `cifar`: the shared public CIFAR-10 ResNet-20 (`../shared/checkpoints`, ImageNet normalisation)
  on the shared CIFAR-10 subset (`../shared/data`): its 3,730 `data_batch` images split
  (stratified, seed 0) into 3,357 train and 373 validation images, and its 930 `test_batch`
  images as the test split. All of them come from CIFAR-10's *training* set, on which that
  model was trained: the figures compare methods, they do not measure generalisation.

    python -m bench.study_methods [--datasets digits,cifar] [--seeds N] [--jobs N] [--rows a,b] [--resume] [--docs]

Sharpness (SPEC §9's estimator on 256 training images) is measured after pruning, after training
and, for AdaSAP, after the warmup. Budget (per row, every seed): digits 6 epochs, CIFAR 3 epochs: GKP and L1 rows fine-tune for
all of them; ITP trains with masks for all of them (masks learn in epochs 1-4 / 1-2 and freeze,
then recover); AdaSAP splits them into warmup, one progressive-pruning epoch and ASAM fine-tuning
(2+1+3 / 1+1+1). FastAT and ASAM epochs cost about twice a standard one. Each (dataset, row,
seed) runs in a worker process with one torch thread. Results go to
bench/results/study_methods.json; `--docs` writes docs/study/methods.json and the marked section
of docs/STUDY.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from engine import pipeline
from engine.common.fileio import write_json_atomic
from engine.config import RunConfig
from engine.models.metrics import count_cost
from sample_models import use_sample_when_unset

from .study import DOCS, DOCS_DIR, REPO, _cell, _spread, machine, replace_section

RESULTS = REPO / "bench" / "results" / "study_methods.json"
PARTIAL = RESULTS.with_suffix(".partial.json")  # units finished so far, rewritten after each one
SHARED = REPO.parent / "shared"
CIFAR_CHECKPOINT = SHARED / "checkpoints" / "cifar10_resnet20_dp-wrapped.th"
CIFAR_DATA = SHARED / "data" / "cifar10-subset"
DATA_SEED = 0
SECTION = "study-methods"
SHARPNESS_IMAGES = 256  # half the SPEC default: the estimate is measured twice per unit


@dataclass(frozen=True)
class Dataset:
    """One model and its data, the training budget in epochs and how each kind of row splits it."""

    key: str
    label: str
    epochs: int
    itp_window: tuple[int, int]
    adasap_split: tuple[int, int, int]  # warmup, progressive pruning, ASAM fine-tuning
    settings: dict[str, Any] = field(default_factory=dict)


DATASETS: dict[str, Dataset] = {
    "digits": Dataset("digits", "bundled sample ResNet-20 on digits", 6, (1, 4), (2, 1, 3), {
        "data.spec": "digits", "evaluate.thresholds": [2, 4],
    }),
    "cifar": Dataset("cifar", "shared CIFAR-10 ResNet-20 on the shared CIFAR-10 subset", 3, (1, 2), (1, 1, 1), {
        "model.checkpoint": str(CIFAR_CHECKPOINT), "model.normalize": "imagenet",
        "data.spec": f"cifar10:{CIFAR_DATA}", "evaluate.frequency": False, "evaluate.severities": [3],
        "evaluate.attacks": ["fgsm:eps=0.01", "pgd:eps=8/255,alpha=2/255,steps=3"], "evaluate.max_examples": 500,
    }),
}


@dataclass(frozen=True)
class Row:
    """One row: `kind` is unpruned, oneshot (prune, then fine-tune), itp or adasap; `settings`
    are config keys set for it."""

    key: str
    label: str
    kind: str
    settings: dict[str, Any] = field(default_factory=dict)


ROWS: tuple[Row, ...] = (
    Row("unpruned", "Unpruned (not trained further)", "unpruned"),
    Row("sr-gkp", "SR-GKP, standard fine-tune", "oneshot", {"prune.method": "sr-gkp"}),
    Row("sr-gkp-fastat", "SR-GKP, FastAT fine-tune", "oneshot", {"prune.method": "sr-gkp", "finetune.mode": "fastat"}),
    Row("l1", "L1 filters, standard fine-tune", "oneshot", {"prune.method": "l1-filter"}),
    Row("itp-gk-at", "ITP grouped-kernel, FastAT", "itp", {"itp.granularity": "grouped-kernel", "itp.adversarial": True}),
    Row("itp-gk", "ITP grouped-kernel, clean", "itp", {"itp.granularity": "grouped-kernel", "itp.adversarial": False}),
    Row("itp-k-at", "ITP kernel, FastAT", "itp", {"itp.granularity": "kernel", "itp.adversarial": True}),
    Row("itp-k", "ITP kernel, clean", "itp", {"itp.granularity": "kernel", "itp.adversarial": False}),
    Row("adasap-sr", "AdaSAP: warmup + SR-GKP + ASAM", "adasap", {"prune.method": "sr-gkp"}),
    Row("adasap-l1", "AdaSAP: warmup + L1 filters + ASAM", "adasap", {"prune.method": "l1-filter"}),
    Row("itp-gk-at-b2e3", "ITP grouped-kernel, FastAT, b = 2e3", "itp",
        {"itp.granularity": "grouped-kernel", "itp.adversarial": True, "itp.hw_weight": 2e3}),
    Row("itp-gk-at-b2e5", "ITP grouped-kernel, FastAT, b = 2e5", "itp",
        {"itp.granularity": "grouped-kernel", "itp.adversarial": True, "itp.hw_weight": 2e5}),
)
BY_KEY = {row.key: row for row in ROWS}
SWEEP_ONLY_ON = "digits"  # the b sweep runs on the sample only
COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("benign", "Benign", True),
    ("fgsm-0.01", "FGSM 0.01", True),
    ("pgd-8/255", "PGD-3 8/255", True),
    ("relative_robustness", "R_C", False),
    ("sharpness_after_prune", "Sharpness after prune", False),
    ("sharpness_final", "Sharpness final", False),
    ("learned_complexity", "ITP learned ψ", False),
)


def unit_config(dataset: Dataset, row: Row, seed: int, device: str) -> RunConfig:
    """The run configuration of one (dataset, row, seed): SPEC defaults, the dataset's model,
    data and evaluation, the row's method, the budget split, the seeds, sharpness always."""
    config = RunConfig()
    for key, value in {**dataset.settings, **row.settings}.items():
        config.set(key, value)
    use_sample_when_unset(config)
    config.run.seed = DATA_SEED
    config.run.device = config.finetune.device = device
    config.prune.seed = config.finetune.seed = seed
    config.deploy.form = "grouped"
    config.sharpness.when = "always"
    config.sharpness.images = SHARPNESS_IMAGES
    config.finetune.epochs = dataset.epochs
    config.itp.epochs = dataset.epochs
    config.itp.prune_start, config.itp.prune_end = dataset.itp_window
    if row.kind == "itp":
        config.prune.method = "itp"
    if row.kind == "adasap":
        config.run.stages = ["warmup", "prune", "finetune", "evaluate"]
        config.warmup.epochs, config.warmup.pruning_epochs, config.finetune.epochs = dataset.adasap_split
    config.validate()
    return config


def run_unit(dataset_key: str, row_key: str, seed: int, device: str) -> dict[str, Any]:
    """Prune (or not), train and evaluate one row with one seed; runs in a worker."""
    torch.set_num_threads(1)
    dataset, row = DATASETS[dataset_key], BY_KEY[row_key]
    ws = pipeline.open_workspace(unit_config(dataset, row, seed, device))
    started = time.perf_counter()
    info: dict[str, Any] = {}
    model, sharp = ws.model, {}
    if row.kind != "unpruned":
        if row.kind == "adasap":
            model = pipeline.warmup(ws, None).model
            sharp["before_prune"] = pipeline.measure_sharpness(ws, model, "before_prune").value
        outcome = pipeline.prune(ws, model=model)
        model = outcome.model
        sharp["after_prune"] = pipeline.measure_sharpness(ws, model, "after_prune").value
        info = {"macs": outcome.effective_macs, "target_macs": outcome.target_macs,
                "params": outcome.cost_after.params, "equivalence_max_abs_err": outcome.equivalence_max_abs_err}
        if "itp" in outcome.details:
            details = outcome.details["itp"]
            info.update({k: details[k] for k in ("learned_complexity", "achieved_complexity", "completed_off",
                                                 "completed_on", "target_met")})
        if row.kind in ("oneshot", "adasap"):
            result = pipeline.finetune_model(ws, model, outcome.plan, None)
            info["finetune_mode"] = ws.config.finetune_settings().mode
            info["val_benign_last_epoch"] = result.history[-1].val.get("benign")
        sharp["final"] = pipeline.measure_sharpness(ws, model, "after_finetune").value
    else:
        cost = count_cost(model, ws.input_shape)
        info = {"macs": cost.macs, "params": cost.params}
        sharp["final"] = pipeline.measure_sharpness(ws, model, "unpruned").value
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    evaluation = pipeline.evaluate(ws, model)
    metrics = {"benign": evaluation.robustness.clean_acc,
               **{a.label: a.accuracy for a in evaluation.robustness.attacks},
               "relative_robustness": evaluation.corruption.robustness_ratio if evaluation.corruption else None,
               "sharpness_after_prune": sharp.get("after_prune"), "sharpness_final": sharp["final"],
               "learned_complexity": info.get("learned_complexity")}
    return {"dataset": dataset_key, "row": row_key, "seed": seed, "metrics": metrics, "sharpness": sharp,
            "n_test": evaluation.robustness.n_examples, "train_seconds": train_s,
            "evaluate_seconds": time.perf_counter() - started, **info}


def summarize(units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, row), in table order: mean and sample std over seeds of every metric."""
    rows = []
    for dataset in DATASETS:
        for row in ROWS:
            mine = sorted((u for u in units if u["dataset"] == dataset and u["row"] == row.key), key=lambda u: u["seed"])
            if not mine:
                continue
            stats = {}
            for column, _, _ in COLUMNS:
                values = [u["metrics"][column] for u in mine if u["metrics"].get(column) is not None]
                if values:
                    mean, std = _spread(values)
                    stats[column] = {"mean": mean, "std": std, "values": values}
            rows.append({"dataset": dataset, "row": row.key, "label": row.label, "seeds": [u["seed"] for u in mine],
                         "macs": statistics.fmean(u["macs"] for u in mine), "params": statistics.fmean(u["params"] for u in mine),
                         "target_macs": mine[0].get("target_macs"), "metrics": stats,
                         "train_seconds": statistics.fmean(u["train_seconds"] for u in mine)})
    return rows


def render_table(rows: list[dict[str, Any]], dataset: str) -> str:
    """One dataset's table in Markdown: accuracies in %, the rest as they are."""
    head = ["Row", "MACs (M)", "Params (K)", "n", *(title for _, title, _ in COLUMNS), "Train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for row in (r for r in rows if r["dataset"] == dataset):
        cells = [row["label"], f"{row['macs'] / 1e6:.2f}", f"{row['params'] / 1e3:.1f}", str(len(row["seeds"]))]
        cells += [_cell(row["metrics"].get(key), percent) for key, _, percent in COLUMNS]
        cells.append(f"{row['train_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resumed_note(settings: dict[str, Any]) -> str:
    resumed = settings.get("resumed_units", 0)
    return f" (resumed: {resumed} units came from an interrupted run, not in that time)" if resumed else ""


def render_section(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    parts = [(f"Generated by `{report['command']}` on {report['finished'][:10]}: seeds "
              f"{', '.join(map(str, s['seeds']))}, {s['jobs']} worker processes of one torch thread on {m['cpu']} "
              f"({m['cores']} cores, {m['platform']}; torch {m['torch']}); wall time {report['seconds'] / 60:.1f} min"
              f"{resumed_note(s)}. "
              "Mean ± sample std over seeds; accuracies in %; MACs are those of the kept weights.")]
    for key in s["datasets"]:
        dataset = DATASETS[key]
        n_test = next((u["n_test"] for u in report["units"] if u["dataset"] == key), 0)
        warm, prune_epochs, tune = dataset.adasap_split
        parts += ["", (f"**{dataset.label}** — budget {dataset.epochs} epochs per row (ITP masks learn in epochs "
                       f"{dataset.itp_window[0]}–{dataset.itp_window[1]}; AdaSAP {warm} warmup + {prune_epochs} pruning "
                       f"+ {tune} ASAM epochs); test n = {n_test}."), "", render_table(report["summary"], key)]
    parts += ["", "Raw per-seed results: [study/methods.json](study/methods.json)."]
    return "\n".join(parts)


def finished_units(device: str) -> list[dict[str, Any]]:
    """Units a previous, interrupted run finished on the same device (from PARTIAL), to skip on `--resume`."""
    try:
        saved = json.loads(PARTIAL.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(saved, dict) or saved.get("device") != device or not isinstance(saved.get("units"), list):
        return []
    return [u for u in saved["units"] if isinstance(u, dict) and u.get("dataset") in DATASETS
            and u.get("row") in BY_KEY and isinstance(u.get("seed"), int)]


def run_study(datasets: list[str], rows: list[str], seeds: tuple[int, ...], jobs: int, device: str,
              command: str, resume: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    units = [(d, r, seed) for d in datasets for r in rows
             if not (r.startswith("itp-gk-at-b") and d != SWEEP_ONLY_ON)
             for seed in (seeds[:1] if r == "unpruned" else seeds)]
    results = [u for u in finished_units(device) if (u["dataset"], u["row"], u["seed"]) in units] if resume else []
    done = {(u["dataset"], u["row"], u["seed"]) for u in results}
    if done:
        print(f"resuming: {len(done)} of {len(units)} units already finished in {PARTIAL}", flush=True)
    total = len(units)
    units = [u for u in units if u not in done]
    units.sort(key=lambda u: (u[0] != "cifar", BY_KEY[u[1]].kind not in ("adasap", "itp")))  # longest first
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(run_unit, d, r, seed, device): (d, r, seed) for d, r, seed in units}
        for future in as_completed(futures):
            unit = future.result()
            results.append(unit)
            write_json_atomic(PARTIAL, {"device": device, "units": results})
            m = unit["metrics"]
            print(f"{unit['dataset']:<6} {unit['row']:<15} seed {unit['seed']}  benign {100 * m['benign']:5.1f}  "
                  f"pgd {100 * m['pgd-8/255']:5.1f}  MACs {unit['macs'] / 1e6:6.2f} M  ({len(results)}/{total}, "
                  f"{time.perf_counter() - started:5.0f} s)", flush=True)
    return {
        "command": command,
        "settings": {"datasets": datasets, "rows": rows, "seeds": list(seeds), "jobs": jobs, "device": device,
                     "data_seed": DATA_SEED, "resumed_units": len(done),
                     "budgets": {d: dataclasses.asdict(DATASETS[d]) for d in datasets}},
        "machine": machine(),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - started,
        "summary": summarize(results),
        "units": sorted(results, key=lambda u: (u["dataset"], rows.index(u["row"]), u["seed"])),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.study_methods", description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits,cifar", help="digits, cifar or both (default both)")
    parser.add_argument("--rows", default="", help=f"subset, comma-separated: {', '.join(BY_KEY)}")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds 0..N-1 (default 3)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--docs", action="store_true", help="also write docs/study/methods.json and docs/STUDY.md's section")
    parser.add_argument("--resume", action="store_true", help=f"skip the units an interrupted run finished ({PARTIAL.name})")
    args = parser.parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] or list(BY_KEY)
    if not datasets or any(d not in DATASETS for d in datasets):
        parser.error(f"--datasets takes a subset of {','.join(DATASETS)}")
    if any(r not in BY_KEY for r in rows):
        parser.error(f"--rows takes a subset of {','.join(BY_KEY)}")
    if "cifar" in datasets and not (CIFAR_CHECKPOINT.is_file() and CIFAR_DATA.is_dir()):
        parser.error(f"the cifar rows need {CIFAR_CHECKPOINT} and {CIFAR_DATA}")
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    command = "python -m bench.study_methods " + " ".join(argv if argv is not None else sys.argv[1:])
    report = run_study(datasets, rows, tuple(range(args.seeds)), args.jobs, args.device, command.strip(), args.resume)
    for dataset in datasets:
        print(render_table(report["summary"], dataset))
    print(f"study took {report['seconds'] / 60:.1f} min")
    write_json_atomic(RESULTS, report)
    if args.docs:
        write_json_atomic(DOCS_DIR / "methods.json", report)
        replace_section(DOCS, SECTION, render_section(report))
        print(f"wrote {DOCS} and {DOCS_DIR / 'methods.json'}")
    return report


if __name__ == "__main__":
    main()
