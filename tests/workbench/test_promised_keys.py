"""Keys and clicks docs/TUI.md promises, each checked by what it changes on screen: `t` toggles
the heatmap's rows between group order and original order, `h` / `f` / `g` switch the layer
tabs, and clicking a column header of the layer table sorts by it (again: reversed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pilot_support import make_config, settle
from textual.widgets import DataTable, TabbedContent

from widgets.heatmap import Heatmap
from workbench.app import WorkbenchApp
from workbench.screens.layer import LayerScreen
from workbench.screens.overview import OverviewScreen


async def test_t_toggles_row_order_and_h_f_g_switch_tabs(checkpoint: Path) -> None:
    app = WorkbenchApp(make_config(checkpoint))
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await pilot.press("p", "ctrl+r")
        await settle(app, pilot)
        await pilot.press("o")
        app.open_layer("layer2.0.conv2")
        await pilot.pause()
        assert isinstance(app.screen, LayerScreen)
        heatmap = app.screen.query_one(Heatmap)
        grouped = np.concatenate([list(g) for g in app.session.plan.layer("layer2.0.conv2").filter_groups])
        assert heatmap.data is not None and np.array_equal(heatmap.data.row_order, grouped)
        assert not np.array_equal(grouped, np.arange(len(grouped)))  # the two orders differ here
        await pilot.press("t")
        assert np.array_equal(heatmap.data.row_order, np.arange(len(grouped)))
        await pilot.press("t")
        assert np.array_equal(heatmap.data.row_order, grouped)
        tabs = app.screen.query_one(TabbedContent)
        for key, tab in (("f", "filters"), ("g", "groups"), ("h", "heatmap")):
            await pilot.press(key)
            assert tabs.active == tab


async def test_clicking_a_column_header_sorts_by_it(checkpoint: Path) -> None:
    app = WorkbenchApp(make_config(checkpoint))
    async with app.run_test(size=(120, 32)) as pilot:
        await settle(app, pilot)
        assert isinstance(app.screen, OverviewScreen)
        table = app.screen.query_one("#layers", DataTable)
        labels = [str(c.label) for c in table.columns.values()]

        async def click_header(label: str) -> list[float]:
            index = labels.index(label)
            x = sum(c.get_render_width(table) for c in list(table.columns.values())[:index]) + 1
            await pilot.click(table, offset=(x, 0))
            await pilot.pause()
            column = [str(table.get_row_at(i)[labels.index("params")]) for i in range(table.row_count)]
            return [float(v.replace(",", "").rstrip("kM")) * (1000 if v.endswith("k") else 1) for v in column]

        params = await click_header("params")
        assert params == sorted(params) and params != sorted(params, reverse=True)
        assert await click_header("params") == sorted(params, reverse=True)
        names = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        await click_header("layer")
        assert [str(table.get_row_at(i)[0]) for i in range(table.row_count)] == sorted(names)
