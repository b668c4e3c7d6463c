"""Redraw the screenshots in docs/screenshots/ from the code as it is: the bundled sample model at
120×36, driven by Textual's Pilot through a real session (open, prune, inspect a layer, step
through a beam cut, fine-tune 3 epochs, evaluate 256 test digits, help). About a minute on 2 cores.

    python docs/draw_screenshots.py"""

from __future__ import annotations

import asyncio
from pathlib import Path

from textual.widgets import Input

from workbench.app import WorkbenchApp, build_config

OUT = Path(__file__).resolve().parent / "screenshots"
SIZE = (120, 36)
LAYER = "layer2.0.conv2"
FINETUNE_EPOCHS = "3"
EXAMPLES = "256"


async def idle(app: WorkbenchApp, pilot, settle: float = 0.5) -> None:
    """Wait for every job to finish, then for the screen to catch up."""
    await pilot.pause(0.2)
    await app.workers.wait_for_complete()
    await pilot.pause(settle)
    app.clear_notifications()
    await pilot.pause()


def shoot(app: WorkbenchApp, name: str) -> None:
    app.save_screenshot(str(OUT / f"{name}.svg"))
    print(f"wrote {OUT / name}.svg")


async def draw() -> None:
    app = WorkbenchApp(build_config(None, {"run.device": "cpu"}))
    async with app.run_test(size=SIZE) as pilot:
        while not app.jobs:
            await pilot.pause()
        await idle(app, pilot)
        shoot(app, "overview")
        await pilot.press("p", "ctrl+r")
        await idle(app, pilot)
        shoot(app, "prune")
        app.action_overview()
        app.open_layer(LAYER)
        await pilot.pause()
        await pilot.press("down", "right")
        await pilot.pause(0.3)
        shoot(app, "inspector")
        app.action_overview()
        app.open_decisions(LAYER)
        await pilot.pause()
        cuts = [i for i, step in enumerate(app.screen.replay.steps) if type(step.event).__name__ == "BeamCut"]
        app.screen.go(cuts[0])
        await idle(app, pilot, 0.3)
        shoot(app, "decisions")
        await pilot.press("j")
        await pilot.pause()
        app.screen.query_one("#ft-epochs", Input).value = FINETUNE_EPOCHS
        app.screen.query_one("#ev-examples", Input).value = EXAMPLES
        await pilot.press("f")
        await idle(app, pilot)
        shoot(app, "jobs_training")
        await pilot.press("e")
        await idle(app, pilot)
        await pilot.press("r")
        await pilot.pause(0.3)
        shoot(app, "jobs_robustness")
        app.action_overview()
        await pilot.press("question_mark")
        await pilot.pause(0.3)
        shoot(app, "help")


if __name__ == "__main__":
    asyncio.run(draw())
