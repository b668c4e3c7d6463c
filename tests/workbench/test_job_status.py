"""Job status that tells the truth: the prune names its phases, a failure stops the bar, the TMI
form checks the snapshots as they are typed, evaluation results arrive per attack and model and
survive a cancel that acts at once, progress never goes back, the clock runs while a job says
nothing, saving never replaces a file unasked, and quitting asks while a job runs."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pilot_support import make_config, settle
from textual.widgets import DataTable, Input, ProgressBar, Select, Static

from engine.common.errors import Cancelled, WorkbenchError
from engine.common.progress import DONE, Progress
from engine.pipeline import PRUNE_PHASES
from sample_models import SAMPLE_SNAPSHOTS
from workbench import tasks
from workbench.app import WorkbenchApp
from workbench.jobs import CANCELLED
from workbench.screens.confirm import ConfirmScreen
from workbench.screens.jobs import JobsScreen
from workbench.screens.prune import PruneScreen
from workbench.session import COMPLETE, PARTIAL


async def settle_open(app: WorkbenchApp, pilot: Any) -> None:
    """Wait for the open job only (a blocked job of another kind may still be running)."""
    while app.latest_job("open") is None or app.latest_job("open").active:  # type: ignore[union-attr]
        await pilot.pause()
    await pilot.pause()


def blocked_task(release: threading.Event) -> Any:
    """A task that reports nothing until `release` (or its job's cancel) is set."""

    def task(*args: Any) -> None:
        cancel = args[-1]
        while not (release.is_set() or cancel.is_set()):
            time.sleep(0.01)
        if cancel.is_set():
            raise Cancelled("cancelled")

    return task


async def test_prune_phases_and_saving(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar sat at 100 % "done" while later steps ran; saving replaced files silently and
    named them by a relative path."""
    monkeypatch.chdir(tmp_path)
    app = WorkbenchApp(make_config(checkpoint))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("p", "ctrl+r")
        await settle(app, pilot)
        job = app.latest_job("prune")
        assert job is not None and [p.name for p in job.phases] == list(PRUNE_PHASES)
        assert all(p.status == DONE and p.seconds >= 0 for p in job.phases)
        shown = str(app.screen.query_one("#prune-phases", Static).render())
        assert all(f"✓ {name}" in shown for name in PRUNE_PHASES)
        assert not app.screen.query_one("#prune-progress", ProgressBar).display

        app.screen.query_one("#save-path", Input).value = "out.pt"
        await pilot.press("ctrl+s")
        await settle(app, pilot)
        target = tmp_path / "out.pt"
        assert target.is_file() and any(str(target) in n.message for n in app._notifications)
        before = target.stat().st_mtime_ns
        saves = len(app.jobs)
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, ConfirmScreen) and "out.pt" in app.screen.question
        await pilot.press("n")
        await settle(app, pilot)
        assert len(app.jobs) == saves and target.stat().st_mtime_ns == before
        await pilot.press("ctrl+s", "y")
        await settle(app, pilot)
        assert len(app.jobs) == saves + 1 and app.latest_job("save").status == DONE  # type: ignore[union-attr]


async def test_failure_stops_the_bar_and_the_tmi_form_checks_snapshots(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed prune left the bar animating; with TMI the form said "✓ 18 of 19 convs will be
    pruned" for an empty or missing snapshots path, and the failure said "pass --snapshots DIR"."""

    def failing(ws: Any, model: Any, progress: Any, cancel: Any) -> None:
        progress(Progress("plan", 0, None, "planning"))
        raise WorkbenchError("the plan could not be made")

    monkeypatch.setattr(tasks, "prune_model", failing)
    app = WorkbenchApp(make_config(checkpoint))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("p", "ctrl+r")
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, PruneScreen)
        assert not screen.query_one("#prune-progress", ProgressBar).display
        assert "failed" in str(screen.query_one("#prune-status", Static).render())
        assert "could not be made" in str(screen.query_one("#prune-status", Static).render())

        (tmp_path / "empty").mkdir()
        status = screen.query_one("#form-status", Static)
        screen.query_one("#field-prune-method", Select).value = "tmi-gkp"
        snapshots = screen.query_one("#field-model-snapshots", Input)
        for text, words in (("", "TMI-GKP needs training snapshots: set Snapshots"),
                            (str(tmp_path / "nope"), "does not exist"),
                            (str(tmp_path / "empty"), "no snapshot files"),
                            (str(SAMPLE_SNAPSHOTS), "36 ticket epochs (35..70)")):
            snapshots.value = text
            await pilot.pause()
            assert words in str(status.render()), text
        snapshots.value = str(tmp_path / "empty")
        await pilot.pause()
        jobs = len(app.jobs)
        await pilot.press("ctrl+r")
        assert len(app.jobs) == jobs
        assert any("no snapshot files" in n.message for n in app._notifications)


async def test_evaluation_results_arrive_per_attack_and_survive_a_cancel(checkpoint: Path) -> None:
    """Results appeared only when every model was done, ctrl+g threw them away after 12-115 s,
    and progress fell from 91 % to 0 % when the second model started."""
    app = WorkbenchApp(make_config(checkpoint, **{"evaluate.batch_size": 8}))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("p", "ctrl+r")
        await settle(app, pilot)
        await pilot.press("j")
        screen = app.screen
        assert isinstance(screen, JobsScreen)
        assert screen.query_one("#ev-examples", Input).value == "8"  # the run config's; 512 when it names none
        assert not screen.query_one("#ev-frequency").value and not screen.query_one("#ev-corruption").value
        screen.query_one("#ev-examples", Input).value = "16"
        screen.query_one("#ev-attacks", Input).value = "fgsm:eps=0.1; pgd:eps=0.1,alpha=0.01,steps=100"
        screen.query_one("#job-evaluate").focus()
        await pilot.press("e")
        job = app.latest_job("evaluate")
        assert job is not None
        status = app.session.evaluation_status
        fractions: list[float] = []
        while not (status.get("pruned") == PARTIAL and len(app.session.evaluations["pruned"].robustness.attacks) == 1):
            assert job.active, job.error
            fractions.append(job.fraction or 0.0)
            await pilot.pause(0.02)
        assert status["unpruned"] == COMPLETE and fractions == sorted(fractions)
        assert min(fractions) < 0.5 < max(fractions)  # the second model continues where the first ended
        await pilot.press("ctrl+g")  # in the pruned model's PGD, 100 steps on each of 2 batches
        started = time.monotonic()
        while job.active:
            await pilot.pause(0.01)
        assert job.status == CANCELLED and time.monotonic() - started < 1.0
        await pilot.pause()
        assert status == {"unpruned": COMPLETE, "pruned": PARTIAL}
        kept = app.session.evaluations["pruned"].robustness
        assert kept.n_examples == 16 and [a.label for a in kept.attacks] == ["fgsm-0.1"]
        table = screen.query_one("#attack-table", DataTable)
        assert [str(c.label) for c in table.columns.values()] == ["attack", "unpruned", "pruned (partial)"]
        assert table.get_row_at(2) == ["pgd-0.1", table.get_row_at(2)[1], "…"]
        jobs_table = screen.query_one("#jobs-table", DataTable)
        assert jobs_table.virtual_size.width <= jobs_table.scrollable_content_region.width  # nothing clipped or scrolling


async def test_the_clock_runs_and_quitting_asks_while_a_job_runs(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The time column froze while a job reported nothing; quitting with a job running took ~9 s
    and asked nothing."""
    release = threading.Event()
    monkeypatch.setattr(tasks, "prune_model", blocked_task(release))
    app = WorkbenchApp(make_config(checkpoint))
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await settle_open(app, pilot)
            await pilot.press("p", "ctrl+r", "j")
            table = app.screen.query_one("#jobs-table", DataTable)
            first = float(str(table.get_row_at(0)[4]).rstrip("s"))
            await pilot.pause(1.3)  # at least one tick of the app's one-second clock
            assert float(str(table.get_row_at(0)[4]).rstrip("s")) > first
            await pilot.press("ctrl+q")
            assert isinstance(app.screen, ConfirmScreen) and "prune" in app.screen.question
            await pilot.press("n")
            assert app.return_code is None and app.latest_job("prune").active  # type: ignore[union-attr]
            await pilot.press("ctrl+q", "y")
            started = time.monotonic()
            while app.return_code is None and time.monotonic() - started < 5:
                await pilot.pause(0.02)
            assert app.return_code == 0 and app.latest_job("prune").status == CANCELLED  # type: ignore[union-attr]
    finally:
        release.set()  # a failed check must not leave the worker waiting
