"""Plots for jobs, on textual-plotext: live training curves and unpruned-vs-pruned accuracy bars.
Both take plain lists and redraw in place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from textual_plotext import PlotextPlot

SERIES_COLORS: tuple[str, ...] = ("cyan", "orange", "green", "magenta", "red", "blue")


class CurvePlot(PlotextPlot):
    """Named series against a shared x axis (epochs or steps); empty series are skipped. Lines
    are drawn in braille; with `mark_points` (for one point per epoch) each point is also
    marked, so a single epoch still shows."""

    def __init__(
        self, title: str, xlabel: str, *, mark_points: bool = False, id: str | None = None, classes: str | None = None
    ) -> None:
        super().__init__(id=id, classes=classes)
        self.title_text = title
        self.xlabel_text = xlabel
        self.mark_points = mark_points
        self.series: dict[str, tuple[list[float], list[float]]] = {}

    def on_mount(self) -> None:
        super().on_mount()
        self._draw()

    def show(self, series: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> None:
        self.series = {name: (list(x), list(y)) for name, (x, y) in series.items()}
        self._draw()

    def _draw(self) -> None:
        plt = self.plt
        plt.clear_figure()
        plt.title(self.title_text)
        plt.xlabel(self.xlabel_text)
        for i, (name, (x, y)) in enumerate(self.series.items()):
            if not x:
                continue
            color = SERIES_COLORS[i % len(SERIES_COLORS)]
            plt.plot(x, y, label=name, color=color, marker="braille")
            if self.mark_points:
                plt.scatter(x, y, color=color, marker="●")
        self.refresh()


class ComparisonBars(PlotextPlot):
    """Grouped bars: one group per category (benign, each attack), one bar per model."""

    def __init__(self, title: str, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.title_text = title
        self.categories: list[str] = []
        self.models: dict[str, list[float]] = {}

    def on_mount(self) -> None:
        super().on_mount()
        self._draw()

    def show(self, categories: Sequence[str], models: Mapping[str, Sequence[float]]) -> None:
        """`models` maps a model label to one value per category."""
        self.categories = list(categories)
        self.models = {name: list(values) for name, values in models.items()}
        self._draw()

    def _draw(self) -> None:
        plt = self.plt
        plt.clear_figure()
        plt.title(self.title_text)
        if self.categories and self.models:
            plt.multiple_bar(
                self.categories, list(self.models.values()), labels=list(self.models),
                color=list(SERIES_COLORS[: len(self.models)]),
            )
            plt.ylim(0, 100)
        self.refresh()
