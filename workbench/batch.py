"""Headless batch runner: the engine pipeline with an output directory, resumable state,
progress on stderr, a summary on stdout, and exit codes scripts can rely on."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

from engine import pipeline
from engine.common.errors import Cancelled, ConfigError, WorkbenchError
from engine.common.fileio import write_json_atomic
from engine.common.progress import Progress
from engine.config import RunConfig
from engine.formats.checkpoints import load_checkpoint
from engine.gkp.traces import TraceFile
from engine.report import build_report
from sample_models import is_sample, use_sample_when_unset

from .exit_codes import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK

STATE_FILE = "state.json"
CONFIG_FILE = "config.toml"
log = logging.getLogger("gkp-workbench")


class ProgressPrinter:
    """Progress on stderr: a redrawn bar on a terminal, a plain line per step otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._last: tuple[str, int] | None = None

    def __call__(self, event: Progress) -> None:
        key = (event.stage, event.done)
        if key == self._last:
            return
        self._last = key
        total = f"/{event.total}" if event.total else ""
        text = f"[{event.stage}] {event.done}{total} {event.message}".rstrip()
        if self.tty and event.fraction is not None:
            filled = int(24 * event.fraction)
            bar = "#" * filled + "-" * (24 - filled)
            self.stream.write(f"\r{text[:60]:<60} |{bar}| {100 * event.fraction:5.1f}%")
            if event.fraction >= 1.0:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def check_output(out: Path, *, force: bool) -> bool:
    """Whether `out` holds a previous run to replace; refuse a non-empty folder without `force`
    and never touch a folder the workbench did not make."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    if not any(out.iterdir()):
        return False
    if not force:
        raise ConfigError(f"output directory {out} is not empty; pass --force to replace it or --resume {out} to continue it")
    if not (out / STATE_FILE).exists():
        raise ConfigError(f"{out} is not a gkp-workbench output directory; refusing to delete it even with --force")
    return True


def _attach_log(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def run_batch(config: RunConfig, out: Path, *, resume: bool, force: bool, progress: ProgressPrinter | None,
              cancel: threading.Event) -> dict[str, Any]:
    """Run the configured stages into `out` and return the report. Every input is checked before
    the output directory is created (or a previous run in it replaced); under torchrun only rank
    0 writes."""
    state: dict[str, Any] = {"completed": []}
    if resume:
        state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
    replace = False if resume else check_output(out, force=force)
    ws = pipeline.open_workspace(config)
    try:
        if "prune" in config.run.stages and "prune" not in state["completed"]:
            pipeline.check_prunable(ws)
            if pipeline.needs_snapshots(config):
                pipeline.load_ticket_snapshots(ws).check()  # fail on bad snapshots before writing anything
        pipeline.check_evaluation_config(config)
        main = ws.ctx.is_main
        if main:
            if replace:
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
        ws.ctx.barrier()
        handler = _attach_log(out) if main else logging.NullHandler()
        try:
            return _run_stages(ws, out, state, resume=resume, progress=progress if main else None, cancel=cancel)
        finally:
            log.removeHandler(handler)
            handler.close()
    finally:
        ws.ctx.close()


def _run_stages(ws: pipeline.Workspace, out: Path, state: dict[str, Any], *, resume: bool,
                progress: ProgressPrinter | None, cancel: threading.Event) -> dict[str, Any]:
    config, main = ws.config, ws.ctx.is_main
    if main and not resume:
        config.save(out / CONFIG_FILE)
        write_json_atomic(out / STATE_FILE, state)
    log.info("run started: stages %s, model %s", ",".join(config.run.stages), ws.checkpoint.path)
    results: dict[str, Any] = dict(state.get("results", {}))
    model, plan = ws.model, ws.plan

    written: list[dict[str, Any]] = []  # the last report.json, returned as is (same `created` stamp)

    def finish(stage: str, sections: dict[str, Any]) -> None:
        results.update(sections)
        state["completed"].append(stage)
        state["results"] = results
        written[:] = [build_report(ws, results, state["completed"])]
        if main:
            write_json_atomic(out / "report.json", written[0])
            write_json_atomic(out / STATE_FILE, state)
        log.info("stage %s done", stage)

    def save(name: str, stage: str) -> None:
        if main:
            pipeline.save_model(ws, out / name, model, plan, {"stage": stage})

    if "prune" in config.run.stages:
        if "prune" in state["completed"]:
            reopened = load_checkpoint(out / "pruned.pt")
            model, plan = reopened.model, pipeline.plan_of(reopened)
        else:
            with TraceFile(out / "decisions.jsonl") if main else nullcontext() as writer:
                on_event = writer.emit if writer is not None else None
                outcome = pipeline.prune(ws, on_event=on_event, progress=progress, cancel=cancel)
            model, plan = outcome.model, outcome.plan
            if main:
                plan.save(out / "plan.json")
            save("pruned.pt", "prune")
            finish("prune", pipeline.prune_sections(outcome))
    if "finetune" in config.run.stages:
        if "finetune" in state["completed"]:
            model = load_checkpoint(out / "finetuned.pt").model
        else:
            resumable = resume and (out / "finetune" / "last.pt").is_file()
            result = pipeline.finetune_model(ws, model, plan, out / "finetune", resume=resumable,
                                             progress=progress, cancel=cancel)
            if not result.completed:
                raise Cancelled("fine-tuning interrupted")
            save("finetuned.pt", "finetune")
            finish("finetune", {"finetune": pipeline.finetune_section(ws, result)})
    if "evaluate" in config.run.stages and "evaluate" not in state["completed"]:
        evaluation = pipeline.evaluate(ws, model, progress=progress, cancel=cancel).to_dict()
        if config.evaluate.baseline and plan is not None and "prune" in config.run.stages:
            evaluation["baseline"] = pipeline.evaluate(ws, ws.model, progress=progress, cancel=cancel).to_dict()
        finish("evaluate", {"evaluate": evaluation})
    log.info("run finished")
    return written[0] if written else build_report(ws, results, state["completed"])


def summary_table(report: dict[str, Any]) -> str:
    """A plain-text summary of the report for people reading the terminal."""
    rows: list[tuple[str, str]] = []
    model = report["model"]
    rows.append(("model", f"{model['arch']}"))
    rows.append(("params / MACs", f"{model['params']:,} / {model['macs']:,}"))
    prune = report.get("prune")
    if prune:
        rows.append(("method", f"{prune['method']} rate {prune['rate']} groups {prune['groups']}"))
        rows.append(("params after", f"{prune['params_after']:,} ({100 * prune['params_reduction']:.1f}% fewer)"))
        rows.append(("MACs after", f"{prune['macs_after']:,} ({100 * prune['macs_reduction']:.1f}% fewer)"))
        rows.append(("layers pruned / skipped", f"{len(prune['layers'])} / {len(prune['layers_skipped'])}"))
        rows.append(("prune time", f"{prune['seconds']:.2f} s"))
        rows.append(("equivalence max |err|", f"{prune['equivalence_max_abs_err']:.2e}"))
    deploy = report.get("deploy")
    if deploy:
        lat = deploy["latency_ms"]
        rows.append((f"latency ({deploy['form']}, batch {deploy['batch']})",
                     f"{lat['original']:.2f} ms -> {lat['pruned']:.2f} ms ({lat['speedup']:.2f}x)"))
    finetune = report.get("finetune")
    if finetune:
        rows.append(("fine-tune", f"{finetune['epochs']} epochs, {finetune['mode']}, {finetune['seconds']:.1f} s"))
    ev = report.get("evaluate")
    if ev:
        base = ev.get("baseline")
        def cell(value: float, key: str | None) -> str:
            ref = None if base is None else (base["clean_acc"] if key is None else base["attacks"].get(key))
            return f"{100 * value:.2f}%" + ("" if ref is None else f"  (unpruned {100 * ref:.2f}%)")
        rows.append((f"clean accuracy (n={ev['n_examples']})", cell(ev["clean_acc"], None)))
        for label, acc in ev["attacks"].items():
            rows.append((label, cell(acc, label)))
        if ev.get("corruption"):
            ratio = ev["corruption"]["robustness_ratio"]
            rows.append(("corruption ratio", "n/a" if ratio is None else f"{ratio:.3f}"))
        if ev.get("frequency"):
            parts = [f"θ={r['theta']:g}: {100 * r['low_acc']:.1f}/{100 * r['high_acc']:.1f}%" for r in ev["frequency"]["rows"]]
            rows.append(("low/high-pass accuracy", ", ".join(parts)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _config_from_args(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[RunConfig, Path, bool]:
    if args.resume is not None:
        out = args.resume
        if not (out / STATE_FILE).is_file() or not (out / CONFIG_FILE).is_file():
            raise ConfigError(f"{out} holds no resumable run (no {STATE_FILE} / {CONFIG_FILE})")
        config = RunConfig.load(out / CONFIG_FILE)
        if "run.device" in overrides:
            config.set("run.device", overrides["run.device"])
            config.set("finetune.device", overrides["run.device"])
        return config, out, True
    config = RunConfig.load(args.config) if args.config else RunConfig()
    for key, value in overrides.items():
        config.set(key, value)
    use_sample_when_unset(config)
    config.validate()
    name = "sample" if is_sample(config.model.checkpoint) else Path(config.model.checkpoint).stem
    return config, args.out or Path("runs") / name, False


def run_from_args(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Entry point for `--batch`: exit 0 ok, 2 bad input, 130 interrupted, 1 internal error."""
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set()) if threading.current_thread() is threading.main_thread() else None
    out: Path | None = None
    try:
        config, out, resume = _config_from_args(args, overrides)
        started = time.perf_counter()
        report = run_batch(config, out, resume=resume, force=args.force, progress=ProgressPrinter(sys.stderr), cancel=cancel)
        if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports
            return EXIT_OK
        if args.json:
            print(json.dumps(report, indent=2, sort_keys=True))
        else:
            print(summary_table(report))
            print(f"\noutputs in {out} ({time.perf_counter() - started:.1f} s)")
        return EXIT_OK
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (Cancelled, KeyboardInterrupt):
        where = f"; continue with --resume {out}" if out is not None and (out / STATE_FILE).exists() else ""
        print(f"interrupted{where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence: traceback to log.txt only
        if out is not None and out.is_dir():
            log_path = out / "log.txt"
        else:
            fd, name = tempfile.mkstemp(prefix="gkp-workbench-error-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        with open(log_path, "a", encoding="utf-8") as handle:
            handle.write(traceback.format_exc())
        print(f"internal error: {type(exc).__name__}: {exc}; details in {log_path}", file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
