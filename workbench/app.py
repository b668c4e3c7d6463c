"""The interactive workbench (Textual): lists the checkpoint's layers at once, opens the model in
a worker (torch starts loading at launch), shows it, and runs pruning, saving, data loading,
fine-tuning and evaluation as background jobs whose workers only post messages."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual import work
from textual.app import App
from textual.reactive import reactive

from engine.common.errors import Cancelled, ConfigError, WorkbenchError
from engine.config import RunConfig
from engine.data.spec import parse_data_spec
from engine.formats.listing import check_file, index_checkpoint
from engine.models.normalization import UNKNOWN_NORMALIZATION, Normalization
from sample_models import SAMPLE_SNAPSHOTS, is_sample, use_sample_when_unset

from .commands import WorkbenchCommands
from .jobs import (
    CANCELLED,
    DONE,
    FAILED,
    Job,
    JobDelivered,
    JobDone,
    JobFailed,
    JobProgressed,
    ProgressRelay,
)
from .keys import APP_BINDINGS, bindings_markdown
from .model_view import summary_lines
from .screens.confirm import ConfirmScreen
from .screens.decisions import DecisionScreen
from .screens.help import HelpScreen
from .screens.jobs import JobsScreen
from .screens.layer import LayerScreen
from .screens.normalization import NormalizationScreen
from .screens.open import OpenScreen
from .screens.overview import OverviewScreen
from .screens.prune import PruneScreen
from .session import (
    COMPLETE,
    FINETUNED,
    PARTIAL,
    PRUNED_MODEL,
    WARMED,
    Session,
    saved_files,
)

if TYPE_CHECKING:
    from . import tasks

TICK_SECONDS = 1.0  # how often running jobs' clocks are redrawn when they report nothing new
QUIT_WAIT_SECONDS = 5.0  # how long quitting waits for cancelled jobs to stop
HELP_SCREEN = "help"
NO_DATA = ("none set: pruning works but measures no accuracy and recalibrates no BatchNorm; fine-tuning and "
           "evaluation need data; set it in the data field (Jobs or Prune screen)")


@dataclass(frozen=True)
class PaletteCommand:
    title: str
    help: str
    callback: Callable[[], Any]


class WorkbenchApp(App[int]):
    """GKP workbench: overview, layer inspector, decision stepper, prune and jobs screens."""

    TITLE = "GKP workbench"
    CSS_PATH = Path(__file__).with_name("workbench.tcss")  # absolute, so subclasses elsewhere find it
    MODES: ClassVar[dict[str, Any]] = {"overview": OverviewScreen, "prune": PruneScreen, "jobs": JobsScreen}
    DEFAULT_MODE = "overview"
    COMMANDS = App.COMMANDS | {WorkbenchCommands}
    BINDINGS = APP_BINDINGS

    # Signals for the screens' watchers, which redraw what changed: no repaint of the whole app.
    session_revision: reactive[int] = reactive(0, repaint=False)
    jobs_revision: reactive[int] = reactive(0, repaint=False)
    clock: reactive[int] = reactive(0, repaint=False)  # ticks while jobs run, for their elapsed times alone

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        self.config = config
        self.session = Session()
        self.jobs: list[Job] = []
        self._finishers: dict[str, Callable[[Job, Any], None]] = {
            "open": self._data_loaded, "data": self._data_loaded, "prune": self._pruned, "save": self._saved,
            "finetune": self._finetuned, "evaluate": self._evaluated, "warmup": self._warmed,
        }

    # ---- lifecycle and state ------------------------------------------------------------

    @property
    def checkpoint_label(self) -> str:
        path = self.config.model.checkpoint
        return Path(path).name if path else "the bundled sample model"

    def on_mount(self) -> None:
        self.sub_title = self.checkpoint_label
        self.set_interval(TICK_SECONDS, self._tick)

    def on_ready(self) -> None:
        """The first frame is on screen: list the checkpoint's layers (without torch), then start
        the worker that opens the model."""
        self.open_model()

    def open_model(self) -> None:
        """List the configured checkpoint's layers now (a file that cannot be a checkpoint is
        reported at once) and open it in a worker."""
        path = Path(self.config.model.checkpoint)
        try:
            check_file(path)
        except WorkbenchError as exc:
            self._open_failed(str(exc))
            return
        try:
            self.session.listing = index_checkpoint(path)
        except WorkbenchError:
            self.session.listing = None  # opening reads what listing cannot, or says why not
        self.changed()
        self.start_job("open", f"open {self.checkpoint_label}", "open_model", self.config)

    def _open_failed(self, error: str) -> None:
        self.session.open_error = f"Could not open {self.checkpoint_label}: {error}"
        self.notify(self.session.open_error, title="Failed", severity="error", timeout=8)
        self.changed()

    def changed(self) -> None:
        """Tell every screen the session changed."""
        self.session_revision += 1

    def _tick(self) -> None:
        if any(job.active for job in self.jobs):
            self.clock += 1  # running jobs' clocks advance even when they report nothing

    def latest_job(self, kind: str) -> Job | None:
        return next((job for job in reversed(self.jobs) if job.kind == kind), None)

    def summary_lines(self) -> list[tuple[str, str]]:
        session = self.session
        assert session.workspace is not None and session.info is not None
        lines = summary_lines(session.workspace, session.info, session.rows(), session.data_note)
        outcome = session.outcome
        if outcome is not None:
            before, after = outcome.cost_before, outcome.cost_after
            lines.append((
                "Pruned",
                f"{outcome.plan.method}: params {1 - after.params / before.params:.1%} fewer, "
                f"MACs {1 - after.macs / before.macs:.1%} fewer, max |Δ| {outcome.equivalence_max_abs_err:.1e}",
            ))
        return lines

    def default_save_path(self) -> str:
        stem = Path(self.config.model.checkpoint).stem if self.config.model.checkpoint else "sample"
        return f"{stem}_{self.config.prune.method}_pruned.pt"

    # ---- jobs ---------------------------------------------------------------------------

    def start_job(self, kind: str, label: str, task: str, *args: Any) -> Job | None:
        """Run `tasks.<task>(*args, progress, cancel)` in a worker thread, one job of a kind at a
        time."""
        if any(job.active and job.kind == kind for job in self.jobs):
            self.notify(f"A {kind} job is already running; cancel it first (ctrl+g).", severity="warning")
            return None
        job = Job(len(self.jobs) + 1, kind, label)
        self.jobs.append(job)
        self.jobs_revision += 1
        self._run_job(job, task, args)
        return job

    @work(thread=True, exit_on_error=False)
    def _run_job(self, job: Job, task: str, args: tuple[Any, ...]) -> None:
        try:
            # Imported here, in the worker: the engine loads torch, which would hold the main
            # thread for seconds before the first screen.
            from . import tasks

            result = getattr(tasks, task)(*args, ProgressRelay(job.id, self.post_message), job.cancel)
        except Cancelled:
            self.post_message(JobFailed(job.id, "cancelled", cancelled=True))
        except WorkbenchError as exc:
            self.post_message(JobFailed(job.id, str(exc), cancelled=False))
        except Exception as exc:  # an engine bug must not take the UI down; show it and log it
            self.post_message(JobFailed(
                job.id, f"internal error: {type(exc).__name__}: {exc}", cancelled=False,
                detail=traceback.format_exc(),
            ))
        else:
            self.post_message(JobDone(job.id, result))

    def _job(self, job_id: int) -> Job:
        return self.jobs[job_id - 1]

    def on_job_progressed(self, message: JobProgressed) -> None:
        job = self._job(message.job_id)
        job.progress = message.progress
        metrics = message.progress.metrics
        if job.kind in ("finetune", "warmup"):
            if "loss" in metrics and metrics.get("steps"):
                x = metrics["epoch"] - 1 + metrics["step"] / metrics["steps"]
                self.session.loss_curve.append((x, float(metrics["loss"])))
            if "record" in metrics:
                self.session.epochs.append(metrics["record"])
        self.jobs_revision += 1

    def on_job_delivered(self, message: JobDelivered) -> None:
        job = self._job(message.job_id)
        if job.kind == "open":
            self._model_ready(message.part)
        elif job.kind == "evaluate":
            self._evaluation_part(message.part)

    def on_job_done(self, message: JobDone) -> None:
        job = self._job(message.job_id)
        job.status, job.finished = DONE, time.monotonic()
        self._finishers[job.kind](job, message.result)
        self.jobs_revision += 1

    def on_job_failed(self, message: JobFailed) -> None:
        job = self._job(message.job_id)
        job.status = CANCELLED if message.cancelled else FAILED
        job.error = None if message.cancelled else message.error
        job.finished = time.monotonic()
        if message.detail:
            self.log.error(message.detail)
        if job.kind == "open" and self.session.workspace is None:
            self.session.open_error = f"Could not open {self.checkpoint_label}: {message.error}"
        elif job.kind == "open":
            self.session.data_note = f"none: {message.error}"
        self.changed()
        kept = " Results finished so far are kept, marked partial." if job.kind == "evaluate" and self.session.evaluations else ""
        self.notify(
            f"{job.label}: {message.error}.{kept}", title="Cancelled" if message.cancelled else "Failed",
            severity="warning" if message.cancelled else "error", timeout=8,
        )
        self.jobs_revision += 1

    def action_cancel_jobs(self) -> None:
        active = [job for job in self.jobs if job.active]
        for job in active:
            job.cancel.set()
        self.notify(f"Cancelling {len(active)} job(s)…" if active else "No job is running.")

    # ---- opening and data ---------------------------------------------------------------

    def _model_ready(self, opened: tasks.Opened) -> None:
        session = self.session
        session.workspace, session.info, session.events = opened.workspace, opened.info, opened.events
        self.config = opened.workspace.config  # its data spec may be the one the checkpoint records
        session.data_note = "" if self.config.data.spec else NO_DATA
        freeze_heap()
        self.changed()

    def set_data(self, spec: str) -> None:
        """Load the data of `spec` for the open model in the background (checked at once; refused
        in words when the model cannot have been trained on it)."""
        ws = self._workspace_or_notify()
        if ws is None:
            return
        try:
            parse_data_spec(spec)
        except WorkbenchError as exc:
            self.notify(str(exc), title="Data", severity="error")
            return
        self.start_job("data", f"data {spec.strip()}", "load_data_for", ws, spec.strip())

    def _data_loaded(self, job: Job, loaded: tasks.DataLoaded | None) -> None:
        session, ws = self.session, self.session.workspace
        if loaded is None or ws is None:
            return
        if loaded.data is None:
            session.data_note = f"none: {loaded.spec} refused: {loaded.refused}"
            self.notify(f"{loaded.spec} not used: {loaded.refused}. Set the data the model was trained on "
                        "(data field on the Jobs or Prune screen).", title="Data refused", severity="warning", timeout=12)
            self.changed()
            return
        # Torch and the engine are loaded by now (a worker built `loaded`), so this import is free.
        from engine.pipeline import with_data

        session.workspace = with_data(ws, loaded.data, "chosen in the app" if job.kind == "data" else None)
        self.config.data.spec = loaded.spec
        session.data_note = "; ".join(loaded.notes)
        session.evaluations.clear()  # they were on other data
        session.evaluation_status.clear()
        if job.kind == "data":
            self.notify(f"{loaded.data.name}: {len(loaded.data.test)} test images.", title="Data")  # type: ignore[arg-type]
        self.changed()

    def action_open_checkpoint(self) -> None:
        self.push_screen(OpenScreen(self.config.model.checkpoint), self.reopen)

    def reopen(self, path: str | None) -> None:
        """Open another checkpoint in place of this one: the session starts afresh; settings
        that belonged to the old model (architecture and normalisation overrides, the sample's
        snapshots) are dropped."""
        if not path:
            return
        if any(job.active for job in self.jobs):
            self.notify("Jobs are running; cancel them first (ctrl+g).", severity="warning")
            return
        config = copy.deepcopy(self.config)
        config.model.checkpoint, config.model.arch, config.model.normalize = path, "", ""
        if config.model.snapshots == str(SAMPLE_SNAPSHOTS) and not is_sample(path):
            config.model.snapshots = ""
        self.config, self.session = config, Session()
        self.sub_title = self.checkpoint_label
        self.switch_mode("overview")
        while len(self.screen_stack) > 1:
            self.pop_screen()
        self.changed()
        self.open_model()

    # ---- pruning and saving -------------------------------------------------------------

    def _workspace_or_notify(self) -> Any:
        ws = self.session.workspace
        if ws is None:
            self.notify(self.session.open_error or "The model is still opening.", severity="warning")
        return ws

    def _adasap_config(self, config: RunConfig) -> RunConfig:
        """`config` as an AdaSAP run (a warmup stage first) once this session has warmed up, so
        pruning is progressive and fine-tuning is AdaSAP's robustness phase."""
        if self.session.warmed is None or config.adasap:
            return config
        config = copy.deepcopy(config)
        config.run.stages = ["warmup", *config.run.stages]
        return config

    def start_prune(self, config: RunConfig) -> None:
        ws = self._workspace_or_notify()
        if ws is None or (config.prune.method == "itp" and not self._with_normalization(
                "in-train pruning", partial(self.start_prune, config))):
            return
        self.config = ws.config = config
        self.changed()
        job_ws = dataclasses.replace(ws, config=self._adasap_config(config))
        method = config.prune.method + (f" {config.itp.granularity}" if config.prune.method == "itp" else "")
        adasap = " after AdaSAP warmup" if self.session.warmed is not None else ""
        label = f"prune {method} rate {config.prune.rate:g} groups {config.prune.groups}{adasap}"
        self.start_job("prune", label, "prune_model", job_ws, self.session.warmed)

    def start_warmup(self, epochs: int) -> None:
        """AdaSAP's warmup of the opened model (SPEC §9) in the background."""
        ws = self._workspace_or_notify()
        if ws is None or not self._with_normalization("the AdaSAP warmup", partial(self.start_warmup, epochs)):
            return
        config = copy.deepcopy(self.config)
        config.warmup.epochs = epochs
        config.run.stages = ["warmup", "prune"]
        try:
            config.warmup.validate()
        except ConfigError as exc:
            self.notify(str(exc), title="Warmup", severity="error")
            return
        label = f"AdaSAP warmup ({epochs} epochs, ρ {config.warmup.rho_min:g}–{config.warmup.rho_max:g})"
        if self.start_job("warmup", label, "warmup_model", dataclasses.replace(ws, config=config)) is not None:
            self.session.loss_curve.clear()
            self.session.epochs.clear()

    def _warmed(self, job: Job, result: tasks.Warmed) -> None:
        session = self.session
        session.warmed, session.warmup_events = result.phase.model, result.events
        session.evaluations.pop(WARMED, None)
        self.notify(f"Warmed up {len(result.phase.training.history)} epoch(s); pruning now follows AdaSAP "
                    "(progressive, then ASAM fine-tuning).", title="AdaSAP warmup")
        self.changed()

    def _pruned(self, job: Job, result: tasks.Pruned) -> None:
        outcome = result.outcome
        session = self.session
        session.outcome, session.events = outcome, [*session.warmup_events, *result.events]
        session.finetuned = session.finetune_result = None
        for label in (PRUNED_MODEL, FINETUNED):
            session.evaluations.pop(label, None)
            session.evaluation_status.pop(label, None)
        before, after = outcome.cost_before, outcome.cost_after
        macs = after.macs if outcome.effective_macs is None else outcome.effective_macs  # of kept weights
        accuracy = outcome.accuracy
        measured = "" if accuracy is None else (
            f" Validation accuracy {accuracy.before:.1%} → {accuracy.raw:.1%} raw"
            + ("" if accuracy.recalibrated is None else f" → {accuracy.recalibrated:.1%} after BN recalibration")
            + "."
        )
        self.notify(
            f"{outcome.plan.pruned_count} convs pruned in {job.seconds:.1f} s; "
            f"MACs {1 - macs / before.macs:.1%} fewer.{measured} "
            "Open a layer and press d to step through its decisions.",
            title="Pruned", severity="warning" if outcome.warnings else "information",
        )
        self.changed()

    def start_save(self, path_text: str, replace: bool = False) -> None:
        """Save the pruned model, its plan and trace; asks before replacing existing files."""
        ws, outcome = self.session.workspace, self.session.outcome
        if ws is None or outcome is None:
            self.notify("Nothing to save yet: run pruning first (ctrl+r on the prune screen).", severity="warning")
            return
        if not path_text.strip():
            self.notify("Enter the path to save the pruned model to.", severity="error")
            return
        path = Path(path_text.strip()).expanduser().resolve()
        existing = [p for p in saved_files(path) if p.exists()]
        if existing and not replace:
            names = ", ".join(p.name for p in existing)
            self.push_screen(
                ConfirmScreen(f"{names} already exist{'s' if len(existing) == 1 else ''} in {path.parent}. Replace?",
                              "Replace", "Keep"),
                lambda yes: self.start_save(path_text, replace=True) if yes else None,
            )
            return
        events = list(self.session.events)
        self.start_job("save", f"save {path.name}", "save_pruned", ws, outcome, events, path)

    def _saved(self, job: Job, paths: list[Path]) -> None:
        self.notify("Wrote " + ", ".join(str(p) for p in paths), title="Saved", timeout=10)

    # ---- fine-tuning and evaluation -----------------------------------------------------

    def _with_normalization(self, job: str, then: Callable[[], None]) -> bool:
        """True when the normalisation is known; otherwise ask for it and run `then` after."""
        ws = self.session.workspace
        if ws is None or not ws.normalization_source.startswith(UNKNOWN_NORMALIZATION):
            return True

        def chosen(norm: Normalization | None) -> None:
            if norm is None:
                self.notify(f"{job} needs the model's input normalisation; not started.", severity="warning")
                return
            ws.normalization, ws.normalization_source = norm, "set by the user"
            self.changed()
            then()

        self.push_screen(NormalizationScreen(ws.checkpoint.path.name, job, ws.in_channels), chosen)
        return False

    def _with_data(self, job: str) -> bool:
        """True when the model has data; otherwise say why not and where to set it."""
        ws = self.session.workspace
        if ws is not None and ws.data is None:
            note = self.session.data_note
            reason = "none is set" if note.startswith("none set") else note.removeprefix("none: ")
            self.notify(f"{job} needs data ({reason}); set it in the data field.", title="No data", severity="warning")
            return False
        return True

    def start_finetune(self, epochs: int, mode: str, out_dir: Path | None) -> None:
        ws = self._workspace_or_notify()
        if ws is None or not self._with_data("Fine-tuning") or not self._with_normalization(
            "fine-tuning", partial(self.start_finetune, epochs, mode, out_dir)
        ):
            return
        config = copy.deepcopy(self.config)
        config.finetune.epochs, config.finetune.mode = epochs, mode
        try:
            config.finetune.validate()
        except ConfigError as exc:
            self.notify(str(exc), title="Fine-tune", severity="error")
            return
        config = self._adasap_config(config)
        mode = config.finetune_settings().mode
        session = self.session
        # Fine-tuning starts from the pruned model of this session, else the opened one.
        base_label, base = (
            (PRUNED_MODEL, session.outcome.model) if session.outcome is not None
            else next(iter(session.models().items()))
        )
        job_ws = dataclasses.replace(ws, config=config)
        label = f"fine-tune {base_label} ({mode}, {epochs} epochs)"
        if self.start_job("finetune", label, "finetune_copy", job_ws, base, session.plan, out_dir) is not None:
            session.loss_curve.clear()
            session.epochs.clear()

    def _finetuned(self, job: Job, result: tasks.Finetuned) -> None:
        outcome, model = result.result, result.model
        if not outcome.completed:
            job.status = CANCELLED
            self.notify(f"{job.label}: cancelled after {len(outcome.history)} epoch(s).", severity="warning")
            return
        self.session.finetuned, self.session.finetune_result = model, outcome
        self.session.evaluations.pop(FINETUNED, None)
        self.session.evaluation_status.pop(FINETUNED, None)
        best = outcome.best.get("benign")
        detail = f"; best validation accuracy {best.value:.1%} at epoch {best.epoch}" if best else ""
        self.notify(f"Fine-tuned {len(outcome.history)} epoch(s) in {outcome.seconds:.1f} s{detail}.", title="Fine-tuned")
        self.changed()

    def start_evaluate(self, settings: RunConfig | None = None) -> None:
        """Evaluate every model of the session with the evaluation settings of `settings` (the
        Jobs screen's form; default the current config)."""
        ws = self._workspace_or_notify()
        if ws is None or not self._with_data("Evaluation") or not self._with_normalization(
            "robustness evaluation", partial(self.start_evaluate, settings)
        ):
            return
        config = copy.deepcopy(self.config)
        if settings is not None:
            config.evaluate = copy.deepcopy(settings.evaluate)
        models = self.session.models()
        job_ws = dataclasses.replace(ws, config=config)
        if self.start_job("evaluate", f"evaluate {', '.join(models)}", "evaluate_models", job_ws, models) is None:
            return
        for label in models:
            self.session.evaluations.pop(label, None)
            self.session.evaluation_status[label] = "queued"
        self.changed()

    def _evaluation_part(self, part: tasks.EvaluationPart) -> None:
        self.session.evaluations[part.label] = part.evaluation
        self.session.evaluation_status[part.label] = COMPLETE if part.complete else PARTIAL
        self.changed()

    def _evaluated(self, job: Job, results: dict[str, Any]) -> None:
        lines = [f"{label}: clean {ev.robustness.clean_acc:.1%}" for label, ev in results.items()]
        self.notify("; ".join(lines), title="Evaluated")
        self.changed()

    # ---- navigation ---------------------------------------------------------------------

    def action_overview(self) -> None:
        """Show the overview itself, whatever screen is open above it."""
        self.switch_mode("overview")
        while len(self.screen_stack) > 1:
            self.pop_screen()

    def action_quit(self) -> None:  # type: ignore[override]
        """Quit; while jobs run, ask first, then cancel them and wait (briefly) for them to stop."""
        active = [job for job in self.jobs if job.active]
        if not active:
            self.exit()
            return
        labels = ", ".join(job.label for job in active)
        self.push_screen(ConfirmScreen(f"{labels} still running. Cancel and quit?", "Quit", "Stay"),
                         lambda yes: self._cancel_and_quit() if yes else None)

    def _cancel_and_quit(self) -> None:
        self.action_cancel_jobs()
        deadline = time.monotonic() + QUIT_WAIT_SECONDS

        def check() -> None:
            if not any(job.active for job in self.jobs) or time.monotonic() > deadline:
                self.exit()

        self.set_interval(0.05, check)

    def open_layer(self, name: str) -> None:
        info = self.session.info
        if info is None:
            self.notify("The model is still opening.", severity="warning")
            return
        if name not in info.smoothness:
            self.notify(f"{name} is not a dense conv, so it has no kernel-smoothness heatmap.", severity="warning")
            return
        self.push_screen(LayerScreen(name))

    def open_decisions(self, name: str) -> None:
        events = self.session.layer_events(name)
        if not any(event.layer == name for event in events):
            row = self.session.row(name)
            why = f" ({row.status_text})" if row is not None and row.reason else ""
            self.notify(f"No decision trace for {name}{why}: prune the model first (p, then ctrl+r).",
                        severity="warning")
            return
        self.push_screen(DecisionScreen(name, events))

    def action_help(self) -> None:
        """Show the help; built once (its Markdown takes a while to lay out), then reused."""
        if isinstance(self.screen, HelpScreen):
            return
        if not self.is_screen_installed(HELP_SCREEN):
            self.install_screen(HelpScreen(bindings_markdown()), HELP_SCREEN)
        self.push_screen(HELP_SCREEN)

    def palette_commands(self) -> list[PaletteCommand]:
        """Every action by name, then one entry per layer to inspect and per traced layer."""
        switch = partial(partial, self.run_action)
        on_screen = self._palette_screen_action
        commands = [
            PaletteCommand("Overview", "model summary and layer table (o)", switch("overview")),
            PaletteCommand("Prune settings", "method, rate, groups and parameters (p)", switch("switch_mode('prune')")),
            PaletteCommand("Jobs", "fine-tuning and evaluation progress and results (j)", switch("switch_mode('jobs')")),
            PaletteCommand("Open checkpoint", "open another model file (ctrl+o)", self.action_open_checkpoint),
            PaletteCommand("Run pruning", "prune with the settings on the prune screen (ctrl+r)", on_screen("prune", "run")),
            PaletteCommand("Save pruned model", "write the model, plan and decision trace (ctrl+s)", on_screen("prune", "save")),
            PaletteCommand("Fine-tune", "fine-tune the pruned model in the background (f)", on_screen("jobs", "finetune")),
            PaletteCommand("Evaluate robustness", "clean and attacked accuracy of every model (e)", on_screen("jobs", "evaluate")),
            PaletteCommand("AdaSAP warmup", "adaptive sharpness-aware warmup before pruning (w)", on_screen("jobs", "warmup")),
            PaletteCommand("Cancel jobs", "stop every running job (ctrl+g)", self.action_cancel_jobs),
            PaletteCommand("Help", "screens and key bindings (?)", self.action_help),
        ]
        info = self.session.info
        if info is not None:
            traced = {event.layer for event in self.session.events}
            for name in info.smoothness:
                commands.append(
                    PaletteCommand(f"Inspect layer {name}", "heatmap, filters and groups", partial(self.open_layer, name))
                )
                if name in traced:
                    commands.append(PaletteCommand(
                        f"Decisions of layer {name}", "step through the pruning decisions",
                        partial(self.open_decisions, name),
                    ))
        return commands

    def _palette_screen_action(self, mode: str, action: str) -> Callable[[], Any]:
        async def run() -> None:
            await self.switch_mode(mode)
            await self.screen.run_action(action)

        return run


def freeze_heap() -> None:
    """Put every object alive now (the imports, the opened model and data) out of the cyclic
    garbage collector's reach: a full collection over torch's heap stalls the UI for a few
    hundred milliseconds, while these objects live as long as the app anyway."""
    gc.freeze()


def build_config(config_path: Path | None, overrides: dict[str, Any]) -> RunConfig:
    """The run config: defaults, then the TOML file, then the command-line overrides."""
    config = RunConfig.load(config_path) if config_path else RunConfig()
    for key, value in overrides.items():
        config.set(key, value)
    use_sample_when_unset(config)
    config.validate()
    return config


def run_app(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Build the config (bad input raises `WorkbenchError` for the CLI to report) and run the
    workbench until the user quits; returns the exit code."""
    app = WorkbenchApp(build_config(getattr(args, "config", None), overrides))
    freeze_heap()
    app.run()
    return app.return_code or 0
