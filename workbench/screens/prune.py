"""Prune controls: the settings form (validated by the engine as you type, TMI-GKP's snapshot
folder included) with the data field, a run that names each phase with its own progress and
time, before/after cost with the equivalence check, and saving the result."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
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
)

from engine.common.errors import ConfigError, WorkbenchError
from engine.common.progress import DONE, FAILED, PENDING, RUNNING, SKIPPED, PhaseState
from engine.formats.listing import epoch_ranges, snapshot_epochs

from ..data_field import DataField
from ..jobs import CANCELLED
from ..model_view import human_count
from ..prune_form import DEFAULT_CHOICE, FIELDS, FormField, apply_form, field_text

if TYPE_CHECKING:
    from engine.config import RunConfig
    from engine.models.latency import RoundTimes

    from ..app import WorkbenchApp

EQUIVALENCE_TOLERANCE = 1e-4  # max |Δ| between the deployed and the masked dense model


PHASE_MARKS = {DONE: ("✓", "green"), RUNNING: ("▶", "bold cyan"), FAILED: ("✗", "bold red"), SKIPPED: ("–", "dim")}


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}" if before else "—"


def snapshot_check(config: "RunConfig") -> tuple[bool, str]:
    """Whether TMI-GKP's snapshots are usable for this config, and a line saying what was found
    (nothing to say when the grouping needs none)."""
    if config.prune.resolved_grouping != "tmi":
        return True, ""
    if not config.model.snapshots:
        return False, "TMI-GKP needs training snapshots: set Snapshots to a folder of per-epoch checkpoints"
    try:
        epochs = snapshot_epochs(config.model.snapshots, tuple(config.prune.ticket_window), config.prune.ticket_step)
    except WorkbenchError as exc:
        return False, f"Snapshots: {exc}"
    return True, f"snapshots: {len(epochs)} ticket epochs ({epoch_ranges(epochs)})"


def phase_lines(phases: tuple[PhaseState, ...], cancelled: bool = False) -> Text:
    """One line per phase: mark, name, time, its own progress while running, why it failed."""
    text = Text()
    for state in phases:
        mark, style = PHASE_MARKS.get(state.status, ("·", "dim"))
        if cancelled and state.status in (FAILED, RUNNING):
            mark, style = "■", "yellow"
        line = Text.assemble((f"{mark} ", style), f"{state.name:<12}")
        if state.status != PENDING:
            line.append(f"{state.seconds:6.1f} s")
        if state.status == RUNNING and state.fraction:
            line.append(f"  {state.fraction:4.0%}")
        if state.note and not cancelled:
            line.append(f"  {state.note}", style="red" if state.status == FAILED else "dim")
        text.append_text(line)
        text.append("\n")
    text.rstrip()
    return text


def _timing(times: "RoundTimes") -> str:
    """Median ms with the interquartile range of the round medians."""
    return f"{times.median_ms:.3g} ({times.q1_ms:.3g}–{times.q3_ms:.3g})"


class PruneScreen(Screen[None]):
    """Settings form on the left, run and results on the right."""

    BINDINGS = [
        Binding("ctrl+r", "run", "Run pruning"),
        Binding("ctrl+s", "save", "Save"),
    ]

    app: "WorkbenchApp"

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="prune-body"):
            with VerticalScroll(id="prune-form"):
                for field in FIELDS:
                    with Horizontal(classes="form-row"):
                        yield Label(field.label, classes="form-label")
                        yield self._field_widget(field)
                yield DataField(id="prune-data")
                yield Static(id="form-status")
            with VerticalScroll(id="prune-results"):
                with Horizontal(classes="button-row"):
                    yield Button("Run ^r", id="prune-run", variant="primary", compact=True)
                    yield Button("Cancel ^g", id="prune-cancel", compact=True)
                yield ProgressBar(id="prune-progress", show_eta=False)
                yield Static(id="prune-status")
                yield Static(id="prune-phases")
                table: DataTable[str] = DataTable(id="prune-metrics", cursor_type="none")
                table.add_columns("", "before", "after", "change")
                yield table
                yield Static(id="prune-checks")
                with Horizontal(classes="button-row"):
                    yield Input(placeholder="path of the pruned model (.pt)", id="save-path", compact=True)
                    yield Button("Save ^s", id="prune-save", compact=True)
        yield Footer()

    def _field_widget(self, field: FormField) -> Input | Select[str]:
        config = self.app.config
        text = field_text(config, field)
        if field.kind in ("choice", "bool"):
            options = [(option, option) for option in field.options]
            if field.optional:
                options.insert(0, ("(the method's)", DEFAULT_CHOICE))
            return Select(options, value=text, allow_blank=False, id=field.widget_id, compact=True)
        return Input(value=text, placeholder=field.placeholder, id=field.widget_id, compact=True)

    def on_mount(self) -> None:
        self.query_one("#save-path", Input).value = self.app.default_save_path()
        self.watch(self.app, "session_revision", self._session_changed)
        self.watch(self.app, "jobs_revision", self.refresh_progress)
        self.watch(self.app, "clock", self.refresh_progress)

    def _session_changed(self, _revision: int = 0) -> None:
        self._check_form()
        self.refresh_results()

    def form_texts(self) -> dict[str, str]:
        """Every field's current text, by config key."""
        texts: dict[str, str] = {}
        for field in FIELDS:
            widget = self.query_one(f"#{field.widget_id}")
            texts[field.key] = str(widget.value) if isinstance(widget, (Input, Select)) else ""
        return texts

    def form_config(self) -> "RunConfig":
        """The config with the form applied; `ConfigError` for the first bad field."""
        return apply_form(self.app.config, self.form_texts())

    @on(Input.Changed, "#prune-form .form-row Input")
    @on(Select.Changed, "#prune-form Select")
    def _check_form(self) -> None:
        status = self.query_one("#form-status", Static)
        try:
            config = self.form_config()
        except ConfigError as exc:
            status.update(Text(str(exc), style="bold red"))
            return
        usable, snapshots = snapshot_check(config)
        if not usable:
            status.update(Text(f"✗ {snapshots}", style="bold red"))
            return
        ws = self.app.session.workspace
        extra = f"\n{snapshots}" if snapshots else ""
        if ws is None:
            status.update(Text(f"settings are valid{extra}", style="green"))
            return
        method = config.prune.method
        if method == "l1-filter":
            status.update(Text("✓ L1-norm filter pruning, MAC-matched to GKP at this rate", style="green"))
            return
        if method == "itp" and config.itp.granularity != "grouped-kernel":
            config = dataclasses.replace(config, prune=dataclasses.replace(config.prune, groups=1))
        layers = dataclasses.replace(ws, config=config).layers()
        eligible = [layer for layer in layers if layer.eligible]
        if method == "itp":
            training = "FastAT" if config.itp.adversarial else "clean"
            status.update(Text(f"✓ {len(eligible)} of {len(layers)} convs get {config.itp.granularity} masks; "
                               f"{config.itp.epochs} epochs of {training} training", style="green"))
            return
        status.update(Text(f"✓ {len(eligible)} of {len(layers)} convs will be pruned{extra}", style="green"))

    @on(Button.Pressed, "#prune-run")
    def action_run(self) -> None:
        try:
            config = self.form_config()
        except ConfigError as exc:
            self.notify(str(exc), title="Prune settings", severity="error")
            return
        usable, snapshots = snapshot_check(config)
        if not usable:
            self.notify(snapshots, title="Prune settings", severity="error")
            return
        self.app.start_prune(config)

    @on(Button.Pressed, "#prune-cancel")
    def _cancel(self) -> None:
        self.app.action_cancel_jobs()

    @on(Button.Pressed, "#prune-save")
    def action_save(self) -> None:
        self.app.start_save(self.query_one("#save-path", Input).value)

    def refresh_progress(self, _revision: int = 0) -> None:
        """The latest prune job: its state and time, an overall bar while it runs (gone once it
        stops, whatever the reason), and every phase with its own progress and time."""
        job = self.app.latest_job("prune")
        bar = self.query_one("#prune-progress", ProgressBar)
        status = self.query_one("#prune-status", Static)
        phases = self.query_one("#prune-phases", Static)
        bar.display = job is not None and job.active
        if job is None:
            status.update("Not pruned yet: set the method and rate, then run (^r).")
            phases.update("")
            return
        if job.active:
            bar.update(total=1.0, progress=job.fraction or 0.0)
        state = Text.assemble(f"{job.label}: ", (job.status, "bold red" if job.error else ""), f" ({job.seconds:.1f} s)")
        if job.error:
            state.append(f" — {job.error}", style="red")
        status.update(state)
        phases.update(phase_lines(job.phases, cancelled=job.status == CANCELLED))

    def refresh_results(self) -> None:
        outcome = self.app.session.outcome
        table = self.query_one("#prune-metrics", DataTable)
        checks = self.query_one("#prune-checks", Static)
        table.clear()
        if outcome is None:
            checks.update("")
            return
        before, after = outcome.cost_before, outcome.cost_after
        table.add_row("params", human_count(before.params), human_count(after.params), _change(before.params, after.params))
        macs = after.macs if outcome.effective_macs is None else outcome.effective_macs  # of kept weights
        table.add_row("MACs", human_count(before.macs), human_count(macs), _change(before.macs, macs))
        original, pruned = outcome.latency["original"], outcome.latency["pruned"]
        verdict = outcome.latency_verdict
        table.add_row(
            f"ms (batch {outcome.latency_batch})", _timing(original), _timing(pruned),
            verdict if verdict == "within noise" else _change(original.median_ms, pruned.median_ms),
        )
        accuracy = outcome.accuracy
        if accuracy is not None:
            table.add_row(f"val acc, raw (n={accuracy.n})", f"{accuracy.before:.1%}", f"{accuracy.raw:.1%}",
                          f"{100 * (accuracy.raw - accuracy.before):+.1f} pt")
            if accuracy.recalibrated is not None:
                table.add_row("val acc, BN recalibrated", f"{accuracy.before:.1%}", f"{accuracy.recalibrated:.1%}",
                              f"{100 * (accuracy.recalibrated - accuracy.before):+.1f} pt")
        plan = outcome.plan
        error = outcome.equivalence_max_abs_err
        ok = error <= EQUIVALENCE_TOLERANCE
        counts = outcome.deploy.get("counts", {})
        layers = outcome.deploy.get("layers", {})
        grouped = [name for name, layer in layers.items() if layer["form"] == "grouped"]
        forms = f" — grouped: {', '.join(grouped)}" if grouped and len(grouped) < len(layers) else ""
        dense_note = "narrower convs: filters removed" if plan.filters else "dense keeps the zeros"
        checks.update(Text.assemble(
            ("✓ " if ok else "✗ ", "bold green" if ok else "bold red"),
            f"equivalence: max |Δ| {error:.2e} vs the masked dense model on {outcome.equivalence_input}\n",
            f"{plan.method}: {plan.pruned_count} convs pruned, {len(plan.skipped)} skipped, "
            f"planned in {outcome.seconds:.2f} s\n",
            f"deployed ({outcome.deploy.get('form')}): {counts.get('grouped', 0)} grouped, "
            f"{counts.get('dense', 0)} dense ({dense_note}){forms}; latency {verdict} "
            f"over {original.rounds} interleaved rounds",
            *((f"\n⚠ {warning}", "bold yellow") for warning in outcome.warnings),
        ))
