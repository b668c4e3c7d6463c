"""Command palette entries for every workbench action, including one per layer (inspect it,
step through its decisions)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from .app import WorkbenchApp


class WorkbenchCommands(Provider):
    """Serves `WorkbenchApp.palette_commands()`: shown in full when the palette opens, fuzzy
    matched as the user types."""

    @property
    def workbench(self) -> "WorkbenchApp":
        return self.app  # type: ignore[return-value]

    async def discover(self) -> Hits:
        for command in self.workbench.palette_commands():
            yield DiscoveryHit(command.title, command.callback, help=command.help)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for command in self.workbench.palette_commands():
            score = matcher.match(command.title)
            if score > 0:
                yield Hit(score, matcher.highlight(command.title), command.callback, help=command.help)
