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
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TextIO

from engine import pipeline
from engine.common.errors import Cancelled, ConfigError, WorkbenchError
from engine.common.fileio import AtomicJsonLines, write_json_atomic
from engine.common.progress import Progress, ProgressCallback
from engine.config import RunConfig
from engine.formats.checkpoints import load_checkpoint
from engine.gkp.traces import read_jsonl, write_jsonl
from engine.report import build_report
from sample_models import is_sample, use_sample_when_unset

from .exit_codes import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK

STATE_FILE = "state.json"
CONFIG_FILE = "config.toml"
WARMUP_TRACE = "warmup.jsonl"
log = logging.getLogger("gkp-workbench")


class ProgressPrinter:
    """Progress on stderr, one line per stage and model: redrawn in place with a bar and ETA on a
    terminal; otherwise a plain line when a stage starts, at every tenth of the way and at its end."""

    def __init__(self, stream: TextIO, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.clock = clock
        self._key: tuple[str, str] | None = None
        self._started = 0.0
        self._tenths = -1
        self._open_line = False

    def about(self, subject: str) -> ProgressCallback:
        """A progress callback whose lines name `subject` (e.g. "pruned model")."""
        return lambda event: self.show(subject, event)

    def show(self, subject: str, event: Progress) -> None:
        key = (event.stage, subject)
        now = self.clock()
        if key != self._key:
            self.end_line()
            self._key, self._started, self._tenths = key, now, -1
        fraction = event.fraction
        elapsed = now - self._started
        label = f"[{event.stage}] {subject}"
        if fraction is None:
            text = f"{label}: {event.message}".rstrip(": ")
        else:
            eta = elapsed / fraction * (1 - fraction) if fraction > 0 else None
            timing = f"{_clock_text(elapsed)} elapsed" + ("" if eta is None or fraction >= 1 else f", ETA {_clock_text(eta)}")
            text = f"{label} {100 * fraction:5.1f}% ({timing}) {event.message}".rstrip()
        if self.tty:
            bar = "" if fraction is None else "|" + "#" * int(20 * fraction) + "-" * (20 - int(20 * fraction)) + "| "
            self.stream.write(f"\r\033[K{bar}{text}")
            self._open_line = True
            if fraction is not None and fraction >= 1:
                self.end_line()
        else:
            tenths = -2 if fraction is None else int(10 * fraction)
            if tenths == self._tenths and tenths != -2:
                return
            self._tenths = tenths
            self.stream.write(text + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        """Close a line left open by a terminal redraw."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


def _clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def next_run_folder(parent: Path, name: str) -> Path:
    """The first `parent/name-N` (N = 1, 2, ...) that does not exist yet, so a second run never
    fails or overwrites because an earlier one is there."""
    number = 1
    while (parent / f"{name}-{number}").exists():
        number += 1
    return parent / f"{name}-{number}"


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
            pipeline.check_prune_input(ws)  # no eligible layer, unknown architecture, missing snapshots
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

    def finish(stage: str, sections: dict[str, Any]) -> None:
        results.update(sections)
        state["completed"].append(stage)
        state["results"] = results
        if main:
            write_json_atomic(out / "report.json", build_report(ws, results, state["completed"]))
            write_json_atomic(out / STATE_FILE, state)
        log.info("stage %s done", stage)

    def save(name: str, stage: str) -> None:
        if main:
            pipeline.save_model(ws, out / name, model, plan, {"stage": stage})

    def about(subject: str) -> ProgressCallback | None:
        return None if progress is None else progress.about(subject)

    sharpness: dict[str, Any] = dict(results.get("sharpness", {}))

    def sharpen(when: str, measured: Any, on_event: Any = None) -> dict[str, Any]:
        """The report's sharpness section, with `when` measured on `measured` if the run measures it."""
        if config.measures_sharpness():
            value = pipeline.measure_sharpness(ws, measured, when, cancel=cancel, on_event=on_event)
            sharpness.update({when: value.value, f"loss_{when}": value.loss, "rho": value.rho,
                              "steps": value.steps, "images": value.images})
        return {"sharpness": dict(sharpness)} if sharpness else {}

    if "warmup" in config.run.stages:
        if "warmup" in state["completed"]:
            model = load_checkpoint(out / "warmed.pt").model
        else:
            resumable = resume and (out / "warmup" / "last.pt").is_file()
            phase = pipeline.warmup(ws, out / "warmup", resume=resumable, progress=about("model"), cancel=cancel)
            model = phase.model
            if main:
                write_jsonl(out / WARMUP_TRACE, phase.events)
            save("warmed.pt", "warmup")
            finish("warmup", {"warmup": pipeline.warmup_section(ws, phase)})
    if "prune" in config.run.stages:
        if "prune" in state["completed"]:
            reopened = load_checkpoint(out / "pruned.pt")
            model, plan = reopened.model, pipeline.plan_of(reopened)
        else:
            resumable = resume and (out / "prune" / "last.pt").is_file()
            with AtomicJsonLines(out / "decisions.jsonl") if main else nullcontext() as writer:
                on_event = writer.write if writer is not None else None
                if on_event is not None and (out / WARMUP_TRACE).is_file():
                    for event in read_jsonl(out / WARMUP_TRACE):
                        on_event(event)
                sharpen("before_prune", model, on_event)
                outcome = pipeline.prune(ws, model=model, out_dir=out / "prune", resume=resumable, on_event=on_event,
                                         progress=about(ws.checkpoint.path.name), cancel=cancel)
                sharp = sharpen("after_prune", outcome.model, on_event)
            model, plan = outcome.model, outcome.plan
            if main:
                plan.save(out / "plan.json")
            save("pruned.pt", "prune")
            _warn_if_off_target(outcome)
            finish("prune", {**pipeline.prune_sections(outcome), **sharp})
    if "finetune" in config.run.stages:
        if "finetune" in state["completed"]:
            model = load_checkpoint(out / "finetuned.pt").model
        else:
            resumable = resume and (out / "finetune" / "last.pt").is_file()
            result = pipeline.finetune_model(ws, model, plan, out / "finetune", resume=resumable,
                                             progress=about(_model_label(plan, [])), cancel=cancel)
            if not result.completed:
                raise Cancelled("fine-tuning interrupted")
            save("finetuned.pt", "finetune")
            finish("finetune", {"finetune": pipeline.finetune_section(ws, result), **sharpen("after_finetune", model)})
    if "evaluate" in config.run.stages and "evaluate" not in state["completed"]:
        label = _model_label(plan, state["completed"])
        evaluation = pipeline.evaluate(ws, model, progress=about(label), cancel=cancel).to_dict()
        if config.evaluate.baseline and plan is not None and "prune" in config.run.stages:
            evaluation["baseline"] = pipeline.evaluate(ws, ws.model, progress=about("unpruned model"),
                                                       cancel=cancel).to_dict()
        finish("evaluate", {"evaluate": evaluation})
    log.info("run finished")
    if progress is not None:
        progress.end_line()
    return build_report(ws, results, state["completed"])


def _warn_if_off_target(outcome: pipeline.PruneOutcome) -> None:
    """In-train pruning that could not reach its target within the tolerance still yields a
    valid model: say so on stderr (and in the report's `prune.itp.target_met`)."""
    itp = outcome.details.get("itp")
    if itp is not None and not itp["target_met"]:
        log.warning("in-train pruning missed its target: complexity %.4f vs %.4f", itp["achieved_complexity"],
                    itp["target_complexity"])
        print(f"warning: in-train pruning reached complexity {itp['achieved_complexity']:.4f}, "
              f"{100 * itp['relative_error']:+.2f}% from the target {itp['target_complexity']:.4f} (outside the "
              "tolerance); the model is saved as it is", file=sys.stderr)


def _model_label(plan: Any, completed: list[str]) -> str:
    """What the progress lines call the model a stage works on."""
    kind = "pruned model" if plan is not None else "model"
    return f"fine-tuned {kind}" if "finetune" in completed else kind


def summary_table(report: dict[str, Any]) -> str:
    """A plain-text summary of the report for people reading the terminal."""
    rows: list[tuple[str, str]] = []
    model = report["model"]
    rows.append(("model", f"{model['arch']}"))
    rows.append(("params / MACs", f"{model['params']:,} / {model['macs']:,}"))
    warm = report.get("warmup")
    if warm:
        rows.append(("warmup (AdaSAP)", f"{warm['epochs']} epochs, ρ {warm['rho_min']}–{warm['rho_max']} by "
                     f"{warm['importance']}, {warm['seconds']:.1f} s"))
    prune = report.get("prune")
    if prune:
        granularity = f" {prune['granularity']}" if prune.get("granularity") else ""
        rows.append(("method", f"{prune['method']}{granularity} rate {prune['rate']} groups {prune['groups']}"))
        rows.append(("params after", f"{prune['params_after']:,} ({100 * prune['params_reduction']:.1f}% fewer)"))
        rows.append(("MACs after", f"{prune['macs_after']:,} ({100 * prune['macs_reduction']:.1f}% fewer)"))
        if prune.get("target_macs"):
            rows.append(("MAC target", f"{prune['target_macs']:,} ({100 * (prune['macs_after'] / prune['target_macs'] - 1):+.2f}%)"))
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
        epochs = finetune["epochs"]
        rho = "" if finetune.get("rho") is None else f" ρ {finetune['rho']:g} ({finetune['sam_partition']})"
        rows.append(("fine-tune", f"{epochs} epoch{'s' if epochs != 1 else ''}, {finetune['mode']}{rho}, {finetune['seconds']:.1f} s"))
    sharp = report.get("sharpness")
    if sharp:
        points = [f"{when.replace('_', ' ')} {sharp[when]:.4f}" for when in ("before_prune", "after_prune", "after_finetune")
                  if when in sharp]
        rows.append((f"sharpness (ρ {sharp['rho']:g})", ", ".join(points)))
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
            rows.append(("relative robustness R_C", "n/a" if ratio is None else f"{ratio:.3f}"))
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
    return config, args.out or next_run_folder(Path("runs"), name), False


def run_from_args(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Entry point for `--batch`: exit 0 ok, 2 bad input, 130 interrupted, 1 internal error."""
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set()) if threading.current_thread() is threading.main_thread() else None
    out: Path | None = None
    try:
        config, out, resume = _config_from_args(args, overrides)
        started = time.perf_counter()
        report = run_batch(config, out, resume=resume, force=args.force, progress=None if args.quiet else ProgressPrinter(sys.stderr), cancel=cancel)
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
