"""Jobs: launch AdaSAP's warmup, fine-tuning and robustness evaluation in the background (the
evaluation form: examples, attacks, probes; the data field), follow their progress, live training
curves, and the attack results of every model side by side as they finish."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import (
    Button,
    Checkbox,
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

from ..data_field import DataField
from ..jobs import CANCELLED, DONE, FAILED, RUNNING
from ..prune_form import FormField, parse_field
from ..session import COMPLETE

if TYPE_CHECKING:
    from engine.config import RunConfig
    from engine.pipeline import Evaluation, PruneOutcome
    from engine.training.finetune import EpochRecord

    from ..app import WorkbenchApp

STATUS_STYLES = {RUNNING: "bold cyan", DONE: "green", FAILED: "bold red", CANCELLED: "yellow"}
JOB_BAR = 10
PLOT_INTERVAL = 0.5  # seconds between live plot redraws while a job reports progress
EPOCHS_FIELD = FormField("finetune.epochs", "Epochs", "int")
EXAMPLES_FIELD = FormField("evaluate.max_examples", "Examples", "int")
QUICK_EXAMPLES = 512  # what the form evaluates on unless the run config names a number
NOT_YET = "…"  # a cell of an attack a model has not finished yet
DETAIL_MIN = 12  # the job table's label and detail columns never get narrower than this


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def fit_columns(table: DataTable[Any], rows: list[list[Any]], flexible: tuple[int, int]) -> list[list[Any]]:
    """Give every column of `table` a fixed width so the rows fit its width: the other columns
    as wide as their text, the two `flexible` text columns (label, detail) sharing the rest, the
    first one first, the second at least DETAIL_MIN; their text is cut with "…". So nothing is
    clipped by the edge or scrolls sideways."""
    columns = list(table.columns.values())
    need = [max([len(str(c.label))] + [len(str(r[i])) for r in rows]) for i, c in enumerate(columns)]
    first, second = flexible
    fixed = sum(w for i, w in enumerate(need) if i not in flexible)
    free = max(2 * DETAIL_MIN, table.scrollable_content_region.width - fixed - 2 * table.cell_padding * len(columns))
    width_first = min(need[first], max(DETAIL_MIN, free - min(need[second], max(DETAIL_MIN, free // 2))))
    widths = [*need]
    widths[first], widths[second] = width_first, free - width_first
    for column, width in zip(columns, widths):
        column.auto_width, column.width = False, width
    return [[_cut(cell, widths[i]) if i in flexible else cell for i, cell in enumerate(r)] for r in rows]
WARMUP_FIELD = FormField("warmup.epochs", "Warmup epochs", "int")


def accuracy_rows(evaluations: dict[str, "Evaluation"]) -> tuple[list[str], dict[str, list[float]]]:
    """Categories (benign, then each attack) and, per model label, accuracy in percent (NaN
    where a model was not attacked that way, or not yet)."""
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


def model_header(label: str, status: str | None) -> str:
    """A results column's title: the model, and whether its numbers are all there."""
    return label if status in (None, COMPLETE) else f"{label} ({status})"


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
        Binding("t", "tab('tab-training')", "Training tab"),
        Binding("r", "tab('tab-robustness')", "Robustness tab"),
        Binding("ctrl+g", "app.cancel_jobs", "Cancel jobs"),
    ]

    app: "WorkbenchApp"

    def __init__(self) -> None:
        super().__init__()
        self._last_draw = 0.0
        self._draw_pending = False
        self._drawn_epochs: list[EpochRecord] | None = None

    def compose(self) -> ComposeResult:
        config = self.app.config
        examples = config.evaluate.max_examples or QUICK_EXAMPLES
        yield Header()
        with Horizontal(id="job-controls", classes="button-row"):
            yield Button("Fine-tune f", id="job-finetune", variant="primary", compact=True)
            yield Label("epochs", classes="inline-label")
            yield Input(str(config.finetune.epochs), id="ft-epochs", compact=True)
            yield Label("mode", classes="inline-label")
            yield Select([(m, m) for m in MODES], value=config.finetune.mode, allow_blank=False, id="ft-mode", compact=True)
            yield Input(placeholder="output folder (optional)", id="ft-out", compact=True)
            yield Button("Warmup w", id="job-warmup", compact=True)
            yield Input(str(self.app.config.warmup.epochs), id="warmup-epochs", compact=True, tooltip="warmup epochs")
        with Horizontal(id="eval-controls", classes="button-row"):
            yield Button("Evaluate e", id="job-evaluate", compact=True)
            yield Label("examples", classes="inline-label")
            yield Input(str(examples), id="ev-examples", compact=True)
            yield Checkbox("freq. probe", False, id="ev-frequency", compact=True)
            yield Checkbox("corr. probe", False, id="ev-corruption", compact=True)
            yield Button("Cancel ^g", id="job-cancel", compact=True)
        with Horizontal(id="eval-attacks", classes="button-row"):
            yield Label("attacks", classes="inline-label")
            yield Input("; ".join(config.evaluate.attacks), id="ev-attacks", compact=True,
                        placeholder="fgsm:eps=0.01; pgd:eps=8/255,alpha=2/255,steps=3")
        yield DataField(id="jobs-data")
        table: DataTable[Text | str] = DataTable(id="jobs-table", cursor_type="row")
        table.add_columns("#", "job", "status", "progress", "time", "detail")
        yield table
        yield ProgressBar(id="job-progress", show_eta=False)
        yield Static(id="job-notes")
        with TabbedContent(id="job-tabs"):
            with TabPane("Training (t)", id="tab-training"):
                with Horizontal(classes="plots"):
                    yield CurvePlot("train loss", "epoch", id="loss-plot")
                    yield CurvePlot("accuracy %", "epoch", mark_points=True, id="acc-plot")
            with TabPane("Robustness (r)", id="tab-robustness"):
                with Horizontal(classes="plots"):
                    attacks: DataTable[str] = DataTable(id="attack-table", cursor_type="none")
                    yield attacks
                    yield ComparisonBars("accuracy % by attack (press e to evaluate)", id="attack-bars")
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "jobs_revision", self.refresh_jobs)
        self.watch(self.app, "session_revision", self.refresh_results)
        self.watch(self.app, "clock", self.refresh_times)

    def refresh_times(self, _tick: int = 0) -> None:
        """Only the running jobs' elapsed times (the rest changes with their reports)."""
        table = self.query_one("#jobs-table", DataTable)
        time_key, column = list(table.columns.items())[4]
        for job in self.app.jobs:
            text = f"{job.seconds:.1f}s"
            if job.active and str(job.id) in table.rows:
                if len(text) > column.width:
                    self.refresh_jobs()  # one more digit: the columns are fitted again
                    return
                table.update_cell(str(job.id), time_key, text)

    def finetune_settings(self) -> tuple[int, str, Path | None]:
        """Epochs, mode and output folder from the controls; `ConfigError` when unreadable."""
        epochs = parse_field(EPOCHS_FIELD, self.query_one("#ft-epochs", Input).value)
        mode = str(self.query_one("#ft-mode", Select).value)
        out = self.query_one("#ft-out", Input).value.strip()
        return epochs, mode, Path(out) if out else None

    def evaluate_settings(self) -> "RunConfig":
        """The config with the evaluation form applied and validated; `ConfigError` when not."""
        config = copy.deepcopy(self.app.config)
        evaluate = config.evaluate
        evaluate.max_examples = parse_field(EXAMPLES_FIELD, self.query_one("#ev-examples", Input).value)
        evaluate.attacks = [a.strip() for a in self.query_one("#ev-attacks", Input).value.split(";") if a.strip()]
        evaluate.frequency = self.query_one("#ev-frequency", Checkbox).value
        evaluate.corruption = self.query_one("#ev-corruption", Checkbox).value
        evaluate.validate()
        return config

    @on(Button.Pressed, "#job-finetune")
    def action_finetune(self) -> None:
        try:
            epochs, mode, out = self.finetune_settings()
        except ConfigError as exc:
            self.notify(str(exc), title="Fine-tune", severity="error")
            return
        self.action_tab("tab-training")
        self.app.start_finetune(epochs, mode, out)

    @on(Button.Pressed, "#job-evaluate")
    def action_evaluate(self) -> None:
        try:
            settings = self.evaluate_settings()
        except ConfigError as exc:
            self.notify(str(exc), title="Evaluate", severity="error")
            return
        self.action_tab("tab-robustness")
        self.app.start_evaluate(settings)

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

    def action_tab(self, tab: str) -> None:
        self.query_one("#job-tabs", TabbedContent).active = tab

    def refresh_jobs(self, _revision: int = 0) -> None:
        table = self.query_one("#jobs-table", DataTable)
        table.clear()
        rows = []
        for job in reversed(self.app.jobs):
            fraction = job.fraction
            progress = "" if fraction is None else f"{bar(fraction, JOB_BAR)} {fraction:4.0%}"
            detail = job.error or (job.progress.message if job.progress is not None and job.active else "")
            rows.append([str(job.id), job.label, Text(job.status, style=STATUS_STYLES.get(job.status, "")),
                         progress, f"{job.seconds:.1f}s", detail])
        for row in fit_columns(table, rows, flexible=(1, 5)):
            table.add_row(*row, key=str(row[0]))
        active = next((j for j in reversed(self.app.jobs) if j.active), None)
        progress_bar = self.query_one("#job-progress", ProgressBar)
        progress_bar.display = active is not None
        if active is not None and active.fraction is not None:
            progress_bar.update(total=1.0, progress=active.fraction)
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
        session = self.app.session
        evaluations = session.evaluations
        notes = result_notes(session.outcome, dict(evaluations))
        self.query_one("#job-notes", Static).update(notes)
        self.query_one("#job-notes", Static).display = bool(notes)
        categories, models = accuracy_rows(dict(evaluations))
        waiting = [label for label, status in session.evaluation_status.items() if label not in evaluations]
        table = self.query_one("#attack-table", DataTable)
        table.clear(columns=True)
        if models or waiting:
            table.add_columns("attack", *(model_header(label, session.evaluation_status.get(label))
                                          for label in [*models, *waiting]))
            for i, category in enumerate(categories or ["benign"]):
                cells = [NOT_YET if values[i] != values[i] else f"{values[i]:.1f}" for values in models.values()]
                table.add_row(category, *cells, *([NOT_YET] * len(waiting)))
        counts = sorted({ev.robustness.n_examples for ev in evaluations.values()})
        bars = self.query_one("#attack-bars", ComparisonBars)
        bars.title_text = (
            f"accuracy % on {'/'.join(str(n) for n in counts)} test examples" if counts
            else "accuracy % by attack (press e to evaluate)"
        )
        bars.show(categories, models)
        self._draw_training()
