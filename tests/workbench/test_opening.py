"""Opening in the workbench: the layers are listed from the file before torch and the model are
there, a file that cannot be a checkpoint is reported at once, another checkpoint can be opened
from inside the app, and data that does not fit the model is refused in words."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from pilot_support import make_config, save_test_checkpoint, settle
from textual.widgets import DataTable, Input, Static

from workbench import tasks
from workbench.app import WorkbenchApp
from workbench.model_view import OPENING
from workbench.screens.jobs import JobsScreen
from workbench.screens.open import OpenScreen


async def test_layers_are_listed_before_the_model_opens(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer names took 4-14 s to appear: they waited for torch, the model and its smoothness."""
    release = threading.Event()
    real = tasks.open_workspace

    def slow_open(config: Any, **options: Any) -> Any:
        release.wait(30)
        return real(config, **options)

    monkeypatch.setattr(tasks, "open_workspace", slow_open)
    app = WorkbenchApp(make_config(checkpoint))
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            while not app.jobs:  # the open job starts right after the layers are listed
                await pilot.pause()
            await pilot.pause()
            table = app.screen.query_one("#layers", DataTable)
            assert app.session.info is None and table.row_count == 19
            assert str(table.get_row_at(1)[0]) == "layer1.0.conv1" and str(table.get_row_at(1)[-1]) == OPENING
            assert "19 convs listed from the file" in str(app.screen.query_one("#summary", Static).render())
            release.set()
            await settle(app, pilot)
            assert app.session.info is not None and table.row_count == 19
            assert str(table.get_row_at(1)[-1]) == "will prune"
    finally:
        release.set()


async def test_open_another_checkpoint_from_the_app(tmp_path: Path, checkpoint: Path) -> None:
    """There was no way to open another file without restarting, and a missing file was only
    reported after the model worker had loaded torch (~5.6 s)."""
    other = save_test_checkpoint(tmp_path / "rgb.pt", in_channels=3)
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    app = WorkbenchApp(make_config(checkpoint, **{"model.arch": "resnet20"}))
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await pilot.press("ctrl+o")
        screen = app.screen
        assert isinstance(screen, OpenScreen)
        path = screen.query_one("#open-path", Input)
        for text, words in ((tmp_path / "nope.pt", "does not exist"), (tmp_path / "notes.txt", "text file")):
            path.value = str(text)
            await pilot.press("enter")
            assert app.screen is screen and words in str(screen.query_one("#open-error", Static).render())
        path.value = str(other)
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.config.model.checkpoint == str(other) and app.config.model.arch == ""  # old override dropped
        assert app.sub_title == "rgb.pt" and app.session.workspace is not None
        assert app.session.workspace.in_channels == 3 and len(app.session.rows()) == 19


async def test_data_that_does_not_fit_is_refused_in_words(tmp_path: Path) -> None:
    """A CIFAR (3-channel) model opened without data was evaluated on digits copied to three
    channels, without a word; there was no way to choose the data in the app."""
    rgb = save_test_checkpoint(tmp_path / "rgb.pt", in_channels=3)
    app = WorkbenchApp(make_config(rgb))
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        ws = app.session.workspace
        assert ws is not None and ws.data is None
        data_line = dict(app.summary_lines())["Data"]
        assert "digits refused: digits images have 1 channel but the model takes 3" in data_line
        await pilot.press("j", "e")
        assert app.latest_job("evaluate") is None
        assert any("needs data" in n.message and "data field" in n.message for n in app._notifications)
        screen = app.screen
        assert isinstance(screen, JobsScreen)
        field = screen.query_one("#jobs-data .data-spec", Input)
        status = screen.query_one("#jobs-data .data-status", Static)
        field.value = "mnist"
        await pilot.pause()
        assert "unknown dataset spec 'mnist'" in str(status.render())
        field.value = f"cifar10:{tmp_path / 'nowhere'}"
        await pilot.pause()
        assert "does not exist" in str(status.render())
        field.value = "digits"
        field.focus()
        await pilot.press("enter")
        await settle(app, pilot)
        job = app.latest_job("data")
        assert job is not None and job.status == "failed" and "1 channel but the model takes 3" in (job.error or "")
        assert app.session.workspace.data is None
