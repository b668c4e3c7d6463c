"""Jobs: launch AdaSAP's warmup, fine-tuning and robustness evaluation in the background, follow
their progress, live training curves, and the attack results of every model side by side."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    ProgressBar,
    Select,
    Static,
    TabbedContent,
    TabPane,
)

from engine.common.errors import ConfigError
from engine.training.finetune_config import MODES
from widgets.bars import bar
from widgets.plots import ComparisonBars, CurvePlot

from ..jobs import CANCELLED, DONE, FAILED, RUNNING
from ..prune_form import FormField, parse_field

if TYPE_CHECKING:
    from engine.pipeline import Evaluation, PruneOutcome
    from engine.training.finetune import EpochRecord

    from ..app import WorkbenchApp

STATUS_STYLES = {RUNNING: "bold cyan", DONE: "green", FAILED: "bold red", CANCELLED: "yellow"}
JOB_BAR = 10
PLOT_INTERVAL = 0.5  # seconds between live plot redraws while a job reports progress
EPOCHS_FIELD = FormField("finetune.epochs", "Epochs", "int")
WARMUP_FIELD = FormField("warmup.epochs", "Warmup epochs", "int")


def accuracy_rows(evaluations: dict[str, "Evaluation"]) -> tuple[list[str], dict[str, list[float]]]:
    """Categories (benign, then each attack) and, per model label, accuracy in percent (NaN
    where a model was not attacked that way)."""
    categories: list[str] = []
    models: dict[str, list[float]] = {}
    for label, evaluation in evaluations.items():
        report = evaluation.robustness
        values = {"benign": report.clean_acc, **{a.label: a.accuracy for a in report.attacks}}
        for name in values:
            if name not in categories:
                categories.append(name)
        models[label] = [100.0 * values.get(name, float("nan")) for name in categories]
    for label, values in models.items():
        values.extend([float("nan")] * (len(categories) - len(values)))
    return categories, models


def result_notes(outcome: "PruneOutcome | None", evaluations: dict[str, "Evaluation"]) -> Text:
    """The pruned model's validation accuracy before and after BatchNorm recalibration, then every
    warning about the numbers shown (collapsed models, skipped steps, failed attack checks)."""
    text = Text()
    accuracy = None if outcome is None else outcome.accuracy
    if accuracy is not None:
        recalibrated = "" if accuracy.recalibrated is None else f", BN-recalibrated {accuracy.recalibrated:.1%}"
        text.append(f"pruned model, validation accuracy (n={accuracy.n}): unpruned {accuracy.before:.1%}, "
                    f"raw {accuracy.raw:.1%}{recalibrated}")
    warnings = [] if outcome is None else list(outcome.warnings)
    warnings += [w for evaluation in evaluations.values() for w in evaluation.warnings]
    for warning in dict.fromkeys(warnings):
        text.append(("\n" if text else "") + f"⚠ {warning}", style="bold yellow")
    return text


class JobsScreen(Screen[None]):
    """Fine-tune and evaluate controls, the job list and the result plots."""

    BINDINGS = [
        Binding("f", "finetune", "Fine-tune"),
        Binding("e", "evaluate", "Evaluate"),
        Binding("w", "warmup", "AdaSAP warmup"),
        Binding("ctrl+g", "app.cancel_jobs", "Cancel jobs"),
    ]

    app: "WorkbenchApp"

    def __init__(self) -> None:
        super().__init__()
        self._last_draw = 0.0
        self._draw_pending = False
        self._drawn_epochs: list[EpochRecord] | None = None

    def compose(self) -> ComposeResult:
        config = self.app.config.finetune
        yield Header()
        with Horizontal(id="job-controls", classes="button-row"):
            yield Button("Fine-tune f", id="job-finetune", variant="primary", compact=True)
            yield Button("Evaluate e", id="job-evaluate", compact=True)
            yield Button("Cancel ^g", id="job-cancel", compact=True)
            yield Label("epochs", classes="inline-label")
            yield Input(str(config.epochs), id="ft-epochs", compact=True)
            yield Label("mode", classes="inline-label")
            yield Select([(m, m) for m in MODES], value=config.mode, allow_blank=False, id="ft-mode", compact=True)
            yield Input(placeholder="output folder (optional)", id="ft-out", compact=True)
            yield Button("Warmup w", id="job-warmup", compact=True)
            yield Input(str(self.app.config.warmup.epochs), id="warmup-epochs", compact=True)
        table: DataTable[Text | str] = DataTable(id="jobs-table", cursor_type="row")
        table.add_columns("#", "job", "status", "progress", "time", "detail")
        yield table
        yield ProgressBar(id="job-progress", show_eta=False)
        yield Static(id="job-notes")
        with TabbedContent(id="job-tabs"):
            with TabPane("Training", id="tab-training"):
                with Horizontal(classes="plots"):
                    yield CurvePlot("train loss", "epoch", id="loss-plot")
                    yield CurvePlot("accuracy %", "epoch", mark_points=True, id="acc-plot")
            with TabPane("Robustness", id="tab-robustness"):
                with Horizontal(classes="plots"):
                    attacks: DataTable[str] = DataTable(id="attack-table", cursor_type="none")
                    yield attacks
                    yield ComparisonBars("accuracy % by attack (press e to evaluate)", id="attack-bars")
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "jobs_revision", self.refresh_jobs)
        self.watch(self.app, "session_revision", self.refresh_results)

    def finetune_settings(self) -> tuple[int, str, Path | None]:
        """Epochs, mode and output folder from the controls; `ConfigError` when unreadable."""
        epochs = parse_field(EPOCHS_FIELD, self.query_one("#ft-epochs", Input).value)
        mode = str(self.query_one("#ft-mode", Select).value)
        out = self.query_one("#ft-out", Input).value.strip()
        return epochs, mode, Path(out) if out else None

    @on(Button.Pressed, "#job-finetune")
    def action_finetune(self) -> None:
        try:
            epochs, mode, out = self.finetune_settings()
        except ConfigError as exc:
            self.notify(str(exc), title="Fine-tune", severity="error")
            return
        self.app.start_finetune(epochs, mode, out)

    @on(Button.Pressed, "#job-evaluate")
    def action_evaluate(self) -> None:
        self.app.start_evaluate()

    @on(Button.Pressed, "#job-warmup")
    def action_warmup(self) -> None:
        try:
            epochs = parse_field(WARMUP_FIELD, self.query_one("#warmup-epochs", Input).value)
        except ConfigError as exc:
            self.notify(str(exc), title="Warmup", severity="error")
            return
        self.app.start_warmup(epochs)

    @on(Button.Pressed, "#job-cancel")
    def _cancel(self) -> None:
        self.app.action_cancel_jobs()

    def refresh_jobs(self, _revision: int = 0) -> None:
        table = self.query_one("#jobs-table", DataTable)
        table.clear()
        for job in reversed(self.app.jobs):
            fraction = job.fraction
            progress = "" if fraction is None else f"{bar(fraction, JOB_BAR)} {fraction:4.0%}"
            detail = job.error or (job.progress.message if job.progress is not None else "")
            table.add_row(
                str(job.id), job.label, Text(job.status, style=STATUS_STYLES.get(job.status, "")),
                progress, f"{job.seconds:.1f}s", detail, key=str(job.id),
            )
        active = next((j for j in reversed(self.app.jobs) if j.active), None)
        progress_bar = self.query_one("#job-progress", ProgressBar)
        progress_bar.display = active is not None
        if active is not None and active.progress is not None and active.progress.total:
            progress_bar.update(total=active.progress.total, progress=active.progress.done)
        self._schedule_training_draw()

    def _schedule_training_draw(self) -> None:
        """Redraw the live plots at most every PLOT_INTERVAL, always ending on the latest data."""
        if self._draw_pending:
            return
        wait = self._last_draw + PLOT_INTERVAL - time.monotonic()
        if wait <= 0:
            self._draw_training()
        else:
            self._draw_pending = True
            self.set_timer(wait, self._draw_training)

    def _draw_training(self) -> None:
        self._draw_pending = False
        self._last_draw = time.monotonic()
        session = self.app.session
        loss = session.loss_curve
        self.query_one("#loss-plot", CurvePlot).show({"train loss": ([x for x, _ in loss], [y for _, y in loss])})
        if self._drawn_epochs == session.epochs:
            return  # the accuracy plot only changes when an epoch ends
        self._drawn_epochs = list(session.epochs)
        epochs = [float(r.epoch) for r in session.epochs]
        series = {"train": (epochs, [100 * r.train_acc for r in session.epochs])}
        metrics = sorted({m for r in session.epochs for m in r.val})
        for metric in metrics:
            points = [(float(r.epoch), 100 * r.val[metric]) for r in session.epochs if metric in r.val]
            series[f"val {metric}"] = ([x for x, _ in points], [y for _, y in points])
        self.query_one("#acc-plot", CurvePlot).show(series)

    def refresh_results(self, _revision: int = 0) -> None:
        evaluations = self.app.session.evaluations
        notes = result_notes(self.app.session.outcome, dict(evaluations))
        self.query_one("#job-notes", Static).update(notes)
        self.query_one("#job-notes", Static).display = bool(notes)
        categories, models = accuracy_rows(dict(evaluations))
        table = self.query_one("#attack-table", DataTable)
        table.clear(columns=True)
        if models:
            table.add_columns("attack", *models)
            for i, category in enumerate(categories):
                table.add_row(category, *(f"{values[i]:.1f}" for values in models.values()))
        counts = sorted({ev.robustness.n_examples for ev in evaluations.values()})
        bars = self.query_one("#attack-bars", ComparisonBars)
        bars.title_text = (
            f"accuracy % on {'/'.join(str(n) for n in counts)} test examples" if counts
            else "accuracy % by attack (press e to evaluate)"
        )
        bars.show(categories, models)
        self._draw_training()
