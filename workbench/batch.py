"""Headless batch runner: the engine pipeline with an output directory, resumable state,
progress on stderr, a summary on stdout, and exit codes scripts can rely on."""

from __future__ import annotations

import argparse
import json
import logging
import os
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
from engine.common.fileio import json_text, write_json_atomic
from engine.common.progress import Progress, ProgressCallback, check_cancel
from engine.config import RunConfig
from engine.formats.checkpoints import load_checkpoint
from engine.gkp.traces import TraceFile, read_jsonl, write_jsonl
from engine.models.architectures import is_factory
from engine.report import build_report
from engine.training.finetune import STATE_FILE as FINETUNE_STATE
from engine.training.finetune_config import metric_filename
from sample_models import is_sample, use_sample_when_unset

from .exit_codes import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK
from .run_folder import RunFolder

STATE_FILE = "state.json"
CONFIG_FILE = "config.toml"
LOG_FILE = "log.txt"
WARMUP_TRACE = "warmup.jsonl"
# The report sections each stage adds to state.json's results.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "warmup": ("warmup",), "prune": ("prune", "deploy", "sharpness"), "finetune": ("finetune", "sharpness"),
    "evaluate": ("evaluate",),
}
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


def _attach_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def read_state(out: Path, stages: list[str]) -> dict[str, Any]:
    """The `state.json` of an interrupted run of `stages`, checked: `ConfigError` when it is
    missing, unreadable or not a state this run could have written."""
    path = out / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{out} holds no resumable run (no {STATE_FILE})") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"{path} cannot be read ({reason}); the run cannot be resumed, start it again with --force") from None
    completed = state.get("completed") if isinstance(state, dict) else None
    results = state.get("results", {}) if isinstance(state, dict) else None
    done = completed if isinstance(completed, list) and completed == stages[:len(completed)] else None
    sections = {section for stage in done or [] for section in STAGE_SECTIONS[stage]}
    if done is None or not isinstance(results, dict) or not all(
            key in sections and isinstance(value, dict) for key, value in results.items()):
        raise ConfigError(
            f"{path} is not the state of a run of stages {','.join(stages)}; the run cannot be resumed, "
            "start it again with --force"
        )
    return state


def run_batch(config: RunConfig, folder: RunFolder, *, resume: bool, progress: ProgressPrinter | None,
              cancel: threading.Event) -> dict[str, Any]:
    """Run the configured stages into `folder` and return the report. Every input is checked
    before the folder is created (or the previous run in it replaced); under torchrun only rank
    0 writes."""
    assert folder.path is not None or not resume
    state: dict[str, Any] = read_state(folder.path, config.run.stages) if resume and folder.path else {"completed": []}
    ws = pipeline.open_workspace(config)
    try:
        if "prune" in config.run.stages and "prune" not in state["completed"]:
            pipeline.check_prune_input(ws)  # no eligible layer, unknown architecture, missing snapshots
            if pipeline.needs_snapshots(config):
                pipeline.load_ticket_snapshots(ws).check()  # fail on bad snapshots before writing anything
        pipeline.check_evaluation_config(config)
        check_cancel(cancel)  # interrupted while loading: stop before anything is written
        main = ws.ctx.is_main
        if main and not resume:
            folder.create({CONFIG_FILE: config.to_toml(), STATE_FILE: json_text(state), LOG_FILE: ""})
        ws.ctx.barrier()
        handler = _attach_log(folder.file(LOG_FILE)) if main else logging.NullHandler()
        try:
            return _run_stages(ws, folder, state, resume=resume, progress=progress if main else None, cancel=cancel)
        finally:
            log.removeHandler(handler)
            handler.close()
    finally:
        ws.ctx.close()


def _training_files(config: RunConfig, folder: str) -> list[str]:
    """The files a training stage writes under `folder/`: the resumable state and one best
    model per tracked metric."""
    metrics = ["benign", *(spec.label for spec in config.finetune.attack_specs())]
    return [f"{folder}/{FINETUNE_STATE}", *(f"{folder}/best_{metric_filename(m)}.pt" for m in metrics)]


def _run_stages(ws: pipeline.Workspace, folder: RunFolder, state: dict[str, Any], *, resume: bool,
                progress: ProgressPrinter | None, cancel: threading.Event) -> dict[str, Any]:
    config, main = ws.config, ws.ctx.is_main
    out = folder.path
    assert out is not None
    log.info("run started: stages %s, model %s", ",".join(config.run.stages), ws.checkpoint.path)
    results: dict[str, Any] = dict(state.get("results", {}))
    model, plan = ws.model, ws.plan
    # A run folder is data: of the code its config asks for, only a factory the user named again runs.
    factory = config.model.arch if is_factory(config.model.arch) else None

    written: dict[str, Any] = {}  # the last report.json, returned as is (same `created` stamp)

    def finish(stage: str, sections: dict[str, Any]) -> None:
        results.update(sections)
        state["completed"].append(stage)
        state["results"] = results
        written["report"] = build_report(ws, results, state["completed"])
        if main:
            write_json_atomic(folder.file("report.json"), written["report"])
            write_json_atomic(folder.file(STATE_FILE), state)
        log.info("stage %s done", stage)

    def save(name: str, stage: str) -> None:
        if main:
            pipeline.save_model(ws, folder.file(name), model, plan, {"stage": stage})

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
            model = load_checkpoint(out / "warmed.pt", arch=factory).model
        else:
            folder.claim(*_training_files(config, "warmup"), "warmed.pt", WARMUP_TRACE)
            resumable = resume and (out / "warmup" / FINETUNE_STATE).is_file()
            phase = pipeline.warmup(ws, out / "warmup", resume=resumable, progress=about("model"), cancel=cancel)
            model = phase.model
            if main:
                write_jsonl(folder.file(WARMUP_TRACE), phase.events)
            save("warmed.pt", "warmup")
            finish("warmup", {"warmup": pipeline.warmup_section(ws, phase)})
    if "prune" in config.run.stages:
        if "prune" in state["completed"]:
            reopened = load_checkpoint(out / "pruned.pt", arch=factory)
            model, plan = reopened.model, pipeline.plan_of(reopened)
        else:
            folder.claim("decisions.jsonl", "plan.json", "pruned.pt")
            if pipeline.trains_to_prune(config):
                folder.claim(*_training_files(config, "prune"))
            resumable = resume and (out / "prune" / FINETUNE_STATE).is_file()
            with TraceFile(out / "decisions.jsonl") if main else nullcontext() as writer:
                on_event = writer.emit if writer is not None else None
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
            finish("prune", {**pipeline.prune_sections(outcome), **sharp})
    if "finetune" in config.run.stages:
        if "finetune" in state["completed"]:
            model = load_checkpoint(out / "finetuned.pt", arch=factory).model
        else:
            folder.claim(*_training_files(config, "finetune"), "finetuned.pt")
            resumable = resume and (out / "finetune" / FINETUNE_STATE).is_file()
            result = pipeline.finetune_model(ws, model, plan, out / "finetune", resume=resumable,
                                             progress=about(_model_label(plan, [])), cancel=cancel)
            if not result.completed:
                raise Cancelled("fine-tuning interrupted")
            save("finetuned.pt", "finetune")
            finish("finetune", {"finetune": pipeline.finetune_section(ws, result), **sharpen("after_finetune", model)})
    if "evaluate" in config.run.stages and "evaluate" not in state["completed"]:
        label = _model_label(plan, state["completed"])
        evaluation = pipeline.evaluate(ws, model, label=label, progress=about(label), cancel=cancel).to_dict()
        if config.evaluate.baseline and plan is not None and "prune" in config.run.stages:
            evaluation["baseline"] = pipeline.evaluate(ws, ws.model, label="unpruned model",
                                                       progress=about("unpruned model"), cancel=cancel).to_dict()
        finish("evaluate", {"evaluate": evaluation})
    log.info("run finished")
    if progress is not None:
        progress.end_line()
    return written.get("report") or build_report(ws, results, state["completed"])


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
        rows.extend(_accuracy_rows(prune))
    deploy = report.get("deploy")
    if deploy:
        rows.extend(_latency_rows(deploy, narrowed=bool(prune) and prune["method"] == "l1-filter"))
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
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    warnings = report.get("warnings") or []
    return "\n".join(lines + ([""] if warnings else []) + [f"warning: {w}" for w in warnings])


def _accuracy_rows(prune: dict[str, Any]) -> list[tuple[str, str]]:
    """Validation accuracy of the unpruned, raw pruned and recalibrated model."""
    accuracy, recalibration = prune.get("accuracy"), prune.get("recalibration")
    if accuracy is None:
        return [("accuracy after pruning", "not measured (no data)")]
    n = accuracy["n"]
    rows = [(f"val accuracy unpruned (n={n})", f"{100 * accuracy['before']:.2f}%"),
            ("  pruned, raw", f"{100 * accuracy['raw']:.2f}%")]
    if accuracy["recalibrated"] is not None:
        rows.append((f"  recalibrated ({recalibration['images']} images)", f"{100 * accuracy['recalibrated']:.2f}%"))
    return rows


def _latency_rows(deploy: dict[str, Any], *, narrowed: bool = False) -> list[tuple[str, str]]:
    """Median latency with its interquartile range over interleaved rounds, the verdict, and
    how the pruned layers were deployed (`narrowed`: filters were removed, so dense layers are
    smaller convs, not the original ones with zeros)."""
    latency = deploy["latency"]
    before, after = latency["original"], latency["pruned"]

    def spread(t: dict[str, Any]) -> str:
        return f"{t['median_ms']:.2f} ms (IQR {t['q1_ms']:.2f}-{t['q3_ms']:.2f})"

    verdict = latency["verdict"]
    if verdict != "within noise":
        verdict = f"{deploy['latency_ms']['speedup']:.2f}x, {verdict}"
    counts = deploy.get("counts") or {}
    layers = deploy.get("layers") or {}
    grouped = [name for name, layer in layers.items() if layer["form"] == "grouped"]
    forms = f"{counts.get('grouped', 0)} grouped, {counts.get('dense', 0)} dense"
    if grouped and len(grouped) < len(layers):
        forms += f" (grouped: {', '.join(grouped)})"
    elif narrowed:
        forms += " (dense: narrower convs, filters removed)"
    elif not grouped:
        forms += " (the original computation with zeros: any latency change is noise)"
    return [
        (f"latency ({deploy['form']}, batch {deploy['batch']}, {before['rounds']} rounds)",
         f"{spread(before)} -> {spread(after)}: {verdict}"),
        ("pruned layers deployed", forms),
    ]


def _config_from_args(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[RunConfig, bool]:
    if args.resume is not None:
        out = args.resume
        if not (out / STATE_FILE).is_file() or not (out / CONFIG_FILE).is_file():
            raise ConfigError(f"{out} holds no resumable run (no {STATE_FILE} / {CONFIG_FILE})")
        config = RunConfig.load(out / CONFIG_FILE)
        _confirm_code(config, overrides, out)
        if "run.device" in overrides:
            config.set("run.device", overrides["run.device"])
            config.set("finetune.device", overrides["run.device"])
        return config, True
    config = RunConfig.load(args.config) if args.config else RunConfig()
    for key, value in overrides.items():
        config.set(key, value)
    use_sample_when_unset(config)
    config.validate()
    return config, False


def _confirm_code(config: RunConfig, overrides: dict[str, Any], out: Path) -> None:
    """A run folder is data: a model factory or trusted unpickling its config.toml asks for is
    honoured only when the user asks for it again on this command line."""
    arch = config.model.arch.strip()
    if is_factory(arch) and str(overrides.get("model.arch", "")).strip() != arch:
        raise ConfigError(f"the run in {out} builds its model with the factory {arch}, which is code; "
                          f"if you trust it, pass --arch {arch} with --resume")
    if config.model.trust_pickle and overrides.get("model.trust_pickle") is not True:
        raise ConfigError(f"the run in {out} reads its checkpoint with --trust-pickle, which runs code from the file; "
                          "if you trust it, pass --trust-pickle with --resume")


def _say(text: str) -> None:
    """One line on stderr; the error paths must not fail, whatever state the terminal is in."""
    try:
        print(text, file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - nowhere left to report to
        pass


def _save_traceback(folder: RunFolder | None) -> str:
    """Write the current traceback to the run's log (a temporary file when the run has no
    folder of its own yet) and say where it went."""
    text = traceback.format_exc()
    try:
        if folder is not None and folder.created and folder.path is not None:
            path = folder.file(LOG_FILE)
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(text)
            return f"details in {path}"
    except Exception:  # noqa: BLE001 - fall back to a temporary file
        pass
    try:
        fd, name = tempfile.mkstemp(prefix="gkp-workbench-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return f"details in {name}"
    except Exception:  # noqa: BLE001 - nowhere to write: say so rather than fail
        return "the traceback could not be saved"


def run_from_args(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Entry point for `--batch`: exit 0 ok, 2 bad input or environment (one line), 130
    interrupted, 1 internal error (traceback in the run's log.txt only)."""
    cancel = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set()) if threading.current_thread() is threading.main_thread() else None
    folder: RunFolder | None = None
    writer = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone writes and reports
    try:
        config, resume = _config_from_args(args, overrides)
        if resume:
            folder = RunFolder.for_resume(args.resume, writer=writer)
        else:
            name = "sample" if is_sample(config.model.checkpoint) else Path(config.model.checkpoint).stem
            folder = RunFolder.for_run(args.out, name=name, force=args.force, writer=writer)
        started = time.perf_counter()
        report = run_batch(config, folder, resume=resume, progress=None if args.quiet else ProgressPrinter(sys.stderr), cancel=cancel)
        if not writer:
            return EXIT_OK
        if args.json:
            print(json.dumps(report, indent=2, sort_keys=True))
        else:
            print(summary_table(report))
            print(f"\noutputs in {folder.path} ({time.perf_counter() - started:.1f} s)")
        return EXIT_OK
    except WorkbenchError as exc:
        _say(f"error: {exc}")
        return EXIT_BAD_INPUT
    except OSError as exc:  # the environment: permissions, a full disk, a vanished folder
        _say(f"error: {exc.filename}: {exc.strerror}" if exc.filename else f"error: {exc.strerror or exc}")
        return EXIT_BAD_INPUT
    except (Cancelled, KeyboardInterrupt):
        out = folder.path if folder is not None and folder.created else None
        _say("interrupted" + (f"; continue with --resume {out}" if out is not None and (out / STATE_FILE).exists() else ""))
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence: traceback to log.txt only
        _say(f"internal error: {type(exc).__name__}: {exc}; {_save_traceback(folder)}")
        return EXIT_INTERNAL
    finally:
        if folder is not None:
            folder.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
