"""Every key the workbench advertises (footer and help) does something on every screen that shows
it; `o` always reaches the overview; after a tab switch the keys go to the tab's content."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pilot_support import make_config, settle
from textual.binding import Binding
from textual.command import CommandPalette
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, TabbedContent

from widgets.filter_table import FilterTable
from widgets.heatmap import Heatmap
from widgets.stepper import StepperView
from workbench.app import WorkbenchApp
from workbench.keys import APP_BINDINGS
from workbench.screens.decisions import DecisionScreen
from workbench.screens.help import HelpScreen
from workbench.screens.jobs import JobsScreen
from workbench.screens.layer import LayerScreen
from workbench.screens.open import OpenScreen
from workbench.screens.overview import OverviewScreen
from workbench.screens.prune import PruneScreen

LAYER = "layer2.0.conv2"  # 32×32: room to move the cursor every way
NAVIGATION = {"overview": OverviewScreen, "switch_mode('prune')": PruneScreen, "switch_mode('jobs')": JobsScreen}
TABS = {"tab('heatmap')": "heatmap", "tab('filters')": "filters", "tab('groups')": "groups",
        "tab('tab-training')": "tab-training", "tab('tab-robustness')": "tab-robustness"}


def keys(bindings: list[Any]) -> list[tuple[str, Binding]]:
    """Every key of every binding (a binding may name several, e.g. `right,l`)."""
    return [(key, b) for b in bindings if isinstance(b, Binding) for key in b.key.split(",")]


def state(app: WorkbenchApp) -> tuple[Any, ...]:
    """What a key can change: the screen, the focus, what is drawn, the notifications."""
    return (id(app.screen), id(app.focused), app.export_screenshot(), len(app._notifications))


async def stop_jobs(app: WorkbenchApp, pilot: Pilot[Any]) -> None:
    if any(job.active for job in app.jobs):
        for job in app.jobs:
            job.cancel.set()
        await app.workers.wait_for_complete()
        await pilot.pause()


async def check_keys(app: WorkbenchApp, pilot: Pilot[Any], where: str, bindings: list[Any],
                     enter: Callable[[], Awaitable[None]], is_there: Callable[[], bool],
                     prepare: Callable[[], Awaitable[None]]) -> None:
    """Press each key in the context `enter` sets up (only when a key left it: `is_there`) and
    `prepare` resets cheaply, and check that something changed (or, for a key that leads to
    where the app already is, that it is there)."""
    for key, binding in keys(bindings):
        if not is_there():
            await enter()
        await prepare()
        before = state(app)
        screen_before = app.screen
        await pilot.press(key)
        await pilot.pause()
        target = NAVIGATION.get(binding.action)
        tab = TABS.get(binding.action)
        if target is not None and isinstance(screen_before, target) and len(app.screen_stack) == 1:
            assert isinstance(app.screen, target), f"{key} on {where}"
        elif tab is not None and screen_before.query(TabbedContent) and \
                screen_before.query_one(TabbedContent).active == tab:
            assert app.screen is screen_before, f"{key} on {where}"
        else:
            assert state(app) != before, f"{key} ({binding.description}) did nothing on {where}"
        if isinstance(app.screen, (HelpScreen, OpenScreen, CommandPalette)):
            await pilot.press("escape")
        await stop_jobs(app, pilot)
        app.clear_notifications()


async def test_every_advertised_key_does_something(checkpoint: Path, tmp_path: Path) -> None:
    app = WorkbenchApp(make_config(checkpoint, **{"finetune.epochs": 1000}))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("p", "ctrl+r")  # pruned, so the row order and the stepper have something to show
        await settle(app, pilot)
        app.screen.query_one("#save-path", Input).value = str(tmp_path / "pruned.pt")

        def on(kind: type, **checks: Any) -> Callable[[], bool]:
            return lambda: isinstance(app.screen, kind) and all(
                getattr(app.screen, name) == value for name, value in checks.items())

        async def nothing() -> None:
            pass

        async def overview() -> None:
            app.action_overview()
            await pilot.pause()

        async def with_filter() -> None:  # so esc has a filter to clear and the table has the keys
            app.screen.query_one("#layer-filter", Input).value = "layer"
            app.screen.query_one("#layers", DataTable).focus()
            await pilot.pause()

        async def inspector() -> None:
            app.action_overview()
            app.open_layer(LAYER)
            await pilot.pause()

        def centred(tab: str) -> Callable[[], Awaitable[None]]:
            async def prepare() -> None:  # mid-matrix: every cursor key can move
                app.screen.action_tab(tab)
                app.screen.query_one(Heatmap).move_cursor(12, 12)
                await pilot.pause()
            return prepare

        async def stepper() -> None:
            app.action_overview()
            app.open_decisions(LAYER)
            await pilot.pause()

        async def mid_replay() -> None:  # a tall step, mid-replay, scrolled a little
            screen = app.screen
            assert isinstance(screen, DecisionScreen)
            screen.go(screen.replay.first_of("beam_cut") or len(screen.replay.steps) // 2)
            await pilot.pause()
            body = screen.query_one(StepperView).body
            assert body.max_scroll_y > 0, "a beam cut at 80×24 scrolls"
            body.scroll_to(y=2, animate=False)
            await pilot.pause()

        def mode(name: str) -> Callable[[], Awaitable[None]]:
            async def enter() -> None:
                app.action_overview()
                await app.switch_mode(name)
                await pilot.pause()
            return enter

        async def buttons_focused() -> None:
            app.screen.query_one("#job-finetune").focus()

        everywhere = list(APP_BINDINGS)
        await check_keys(app, pilot, "overview", everywhere + OverviewScreen.BINDINGS, overview,
                         on(OverviewScreen), with_filter)
        await check_keys(app, pilot, "inspector", everywhere + LayerScreen.BINDINGS + Heatmap.BINDINGS, inspector,
                         on(LayerScreen), centred("heatmap"))
        await check_keys(app, pilot, "filter profile", FilterTable.BINDINGS, inspector, on(LayerScreen),
                         centred("filters"))
        await check_keys(app, pilot, "decision stepper", everywhere + DecisionScreen.BINDINGS, stepper,
                         on(DecisionScreen), mid_replay)
        await check_keys(app, pilot, "prune", everywhere + PruneScreen.BINDINGS, mode("prune"), on(PruneScreen), nothing)
        await check_keys(app, pilot, "jobs", everywhere + JobsScreen.BINDINGS, mode("jobs"), on(JobsScreen),
                         buttons_focused)
        await overview()
        await pilot.press("ctrl+p")
        assert isinstance(app.screen, CommandPalette)
        await pilot.press("escape")


async def test_o_reaches_the_overview_from_every_screen(checkpoint: Path) -> None:
    """It used to do nothing in the inspector and the stepper, and to return to the inspector
    from Prune or Jobs."""
    app = WorkbenchApp(make_config(checkpoint))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("p", "ctrl+r")
        await settle(app, pilot)
        for route in (["open"], ["open", "d"], ["open", "p"], ["open", "j"], ["open", "d", "j"]):
            await pilot.press("o")
            for step in route:
                if step == "open":
                    app.open_layer(LAYER)
                    await pilot.pause()
                else:
                    await pilot.press(step)
            await pilot.press("o")
            assert isinstance(app.screen, OverviewScreen) and len(app.screen_stack) == 1, route


async def test_keys_reach_the_tab_content_after_a_tab_switch(checkpoint: Path) -> None:
    """`s`, `l` and the arrows did nothing after `f` or `h` until Tab was pressed."""
    app = WorkbenchApp(make_config(checkpoint))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        app.open_layer(LAYER)
        await pilot.pause()
        screen = app.screen
        table, heatmap = screen.query_one(FilterTable), screen.query_one(Heatmap)
        await pilot.press("f", "s")
        assert table.by_smoothness and app.focused is table
        await pilot.press("h", "l")
        assert heatmap.log_scale is False and app.focused is heatmap
        await pilot.press("down")
        assert heatmap.cursor == (1, 0)
        await pilot.press("g")
        assert app.focused is screen.query_one("#group-scroll")
        await pilot.press("j", "r")
        assert app.screen.query_one("#job-tabs", TabbedContent).active == "tab-robustness"
        await pilot.press("t")
        assert app.screen.query_one("#job-tabs", TabbedContent).active == "tab-training"
