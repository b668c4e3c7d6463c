"""Responsiveness of the interactive workbench against its targets: launch to first screen
(<= 2 s), to the layer names on screen (<= 1 s) and to everything (model, smoothness, MACs and
data: <= 3 s), heatmap render of a 512×512 layer (<= 50 ms) and the longest main-thread stall
while a fine-tune runs (<= 100 ms); also the longest stall while the model opens. Prints a table
and writes bench/results/tui_responsiveness.json.

    .venv/bin/python -m bench.tui_responsiveness [--checkpoint PATH] [--launches 5] [--stall-seconds 15]

Launches are measured in fresh processes (imports included), alternating between the bundled
sample model (or a seeded untrained ResNet-20 of its shape when the sample is not built) and a
seeded untrained CIFAR ResNet-56 saved as a plain state dict in a temporary folder (with
../shared's CIFAR-10 folder as its data when present); each figure is the median of the
launches, with the range and the process CPU time beside it (on a loaded machine the CPU time is
what a quiet one would take). "layers visible" is the first frame after the overview's table
has rows, "model ready" the first with smoothness and MACs, "everything" the open job done. The
stall is the largest lateness of a 10 ms main-thread timer while fine-tuning runs in its worker
with the Jobs screen and its live plots on screen."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.common.fileio import write_json_atomic
from engine.formats.checkpoints import save_checkpoint
from engine.gkp.smoothness import kernel_smoothness
from engine.models.architectures import ArchSpec
from engine.models.cifar_resnet import CifarResNet
from engine.models.normalization import Normalization
from sample_models import SAMPLE_CHECKPOINT

RESULTS = Path(__file__).resolve().parent / "results" / "tui_responsiveness.json"
SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset"
LAUNCH_STAGES = ("first_screen", "layers_visible", "model_ready", "everything")
LAUNCH_TARGETS_MS = {"first_screen": 2000.0, "layers_visible": 1000.0, "everything": 3000.0}
TARGETS_MS = {
    **{f"{model}_{stage}": target for model in ("sample", "resnet56") for stage, target in LAUNCH_TARGETS_MS.items()},
    "heatmap_512_first_render": 50.0, "finetune_max_stall": 100.0,
}
TICK = 0.01  # seconds between the stall probe's timer ticks
COUNTS = ("visible_lines", "finetune_ticks", "finetune_progress_points", "finetune_epochs_done")

# Run in a fresh interpreter: prints JSON with wall-clock (and process CPU) stamps of the first
# screen, the layer names on screen, the model ready and everything open, so the parent can
# include interpreter start and every import, and the largest lateness of a main-thread timer
# while the model opens.
_LAUNCH_CHILD = r"""
import json, sys, time
from workbench.app import WorkbenchApp, build_config
from widgets.heatmap import Heatmap
imported = time.time()
stamps = {"imported": imported, "imported_cpu": time.process_time()}
TICK = float(sys.argv[3])
gaps = []


def stamp(name):
    if name not in stamps:
        stamps[name], stamps[name + "_cpu"] = time.time(), time.process_time()


class Timed(WorkbenchApp):
    def on_ready(self):
        stamp("first_screen")  # Textual: the first frame has been displayed
        self.last_tick = time.perf_counter()
        self.set_interval(TICK, self.tick)
        super().on_ready()

    def tick(self):
        now = time.perf_counter()
        gaps.append(now - self.last_tick - TICK)
        self.last_tick = now
        # A tick runs after the frame that showed what the previous one found.
        if self.screen.query("#layers") and self.screen.query_one("#layers").row_count:
            stamp("layers_visible")
        if self.session.info is not None:
            stamp("model_ready")
        opened = self.latest_job("open")
        if opened is not None and not opened.active:
            stamp("everything")


overrides = {"run.device": "cpu", "data.spec": sys.argv[2]}
if sys.argv[1]:
    overrides["model.checkpoint"] = sys.argv[1]
app = Timed(build_config(None, overrides))

async def pilot(p):
    while "everything" not in stamps and app.session.open_error is None:
        await p.pause(0.01)
    await p.pause(0.05)
    stamps["open_error"] = app.session.open_error
    stamps["data_note"] = app.session.data_note
    stamps["open_max_stall"] = 1000 * max(gaps[1:], default=0.0)
    app.exit()

app.run(headless=True, size=(80, 24), auto_pilot=pilot)
print(json.dumps(stamps))
"""


def launch(checkpoint: str, data: str) -> dict[str, float]:
    """One launch in a fresh process: milliseconds (wall and process CPU) from the start of the
    process to each of LAUNCH_STAGES, and the longest stall while opening."""
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-c", _LAUNCH_CHILD, checkpoint, data, str(TICK)], capture_output=True, text=True,
        check=True, cwd=Path(__file__).resolve().parents[1],
    )
    stamps = json.loads(done.stdout.strip().splitlines()[-1])
    if stamps.get("open_error"):
        raise SystemExit(f"the workbench could not open the model: {stamps['open_error']}")
    if stamps.get("data_note", "").startswith("none"):
        raise SystemExit(f"the workbench did not load the data: {stamps['data_note']}")
    out = {stage: 1000 * (stamps[stage] - start) for stage in LAUNCH_STAGES}
    out.update({f"{stage}_cpu": 1000 * stamps[f"{stage}_cpu"] for stage in LAUNCH_STAGES})
    out.update({"imports": 1000 * (stamps["imported"] - start), "open_max_stall": stamps["open_max_stall"]})
    return out


def launches(models: dict[str, tuple[str, str]], count: int) -> dict[str, dict[str, Any]]:
    """`count` launches of each model, interleaved, summarised per measure: median, min, max."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for _ in range(count):
        for name, (checkpoint, data) in models.items():
            runs[name].append(launch(checkpoint, data))
    summary: dict[str, dict[str, Any]] = {}
    for name, measured in runs.items():
        summary[name] = {
            key: {"median": statistics.median(r[key] for r in measured), "min": min(r[key] for r in measured),
                  "max": max(r[key] for r in measured)}
            for key in measured[0]
        }
    return summary


async def heatmap_render() -> dict[str, float]:
    """Time a 512×512 heatmap in a 200×60 terminal: building the colour styles (once per
    process; the workbench does it in the worker that opens the model), preparing the matrix,
    drawing every visible line cold, redrawing them warm (cached), and a page scroll. The heap
    is frozen first, as the workbench does once a model is open."""
    from textual.app import App, ComposeResult

    from widgets.heatmap import Heatmap, HeatmapData, style_table
    from workbench.app import freeze_heap

    start = time.perf_counter()
    style_table()
    styles_ms = 1000 * (time.perf_counter() - start)

    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.standard_normal((512, 512, 3, 3)))
    start = time.perf_counter()
    values = kernel_smoothness(weight).numpy().astype(np.float32)
    smoothness_ms = 1000 * (time.perf_counter() - start)
    groups = [list(range(g, 512, 8)) for g in range(8)]
    kept = [sorted(rng.choice(512, 288, replace=False).tolist()) for _ in range(8)]
    freeze_heap()
    heatmap = Heatmap()

    class Host(App[None]):
        def compose(self) -> ComposeResult:
            yield heatmap

    results: dict[str, float] = {"kernel_smoothness_512x512": smoothness_ms, "heatmap_style_table_once": styles_ms}
    app = Host()
    async with app.run_test(size=(200, 60)) as pilot:
        await pilot.pause()
        height = heatmap.scrollable_content_region.height
        start = time.perf_counter()
        heatmap.show(HeatmapData.build(values, groups, kept))
        prepared = time.perf_counter()
        for y in range(height):
            heatmap.render_line(y)
        cold = time.perf_counter()
        for y in range(height):
            heatmap.render_line(y)
        warm = time.perf_counter()
        heatmap.scroll_to(y=height, animate=False)
        await pilot.pause()
        scroll_start = time.perf_counter()
        for y in range(height):
            heatmap.render_line(y)
        scrolled = time.perf_counter()
        results.update({
            "heatmap_512_prepare": 1000 * (prepared - start),
            "heatmap_512_first_render": 1000 * (cold - start),
            "heatmap_512_warm_redraw": 1000 * (warm - cold),
            "heatmap_512_page_scroll": 1000 * (scrolled - scroll_start),
            "visible_lines": float(height),
        })
    return results


async def finetune_stall(checkpoint: str, seconds: float) -> dict[str, float]:
    """Largest lateness of a main-thread timer while fine-tuning runs (started from the Jobs
    screen, whose live plots redraw meanwhile); the job is cancelled after `seconds`."""
    from workbench.app import WorkbenchApp, build_config
    from workbench.screens.jobs import JobsScreen

    overrides: dict[str, Any] = {"run.device": "cpu", "finetune.device": "cpu", "finetune.epochs": 100,
                                 "data.spec": "digits"}
    if checkpoint:
        overrides["model.checkpoint"] = checkpoint
    app = WorkbenchApp(build_config(None, overrides))
    gaps: list[float] = []
    async with app.run_test(size=(120, 40)) as pilot:
        while not app.jobs:  # the open job starts once the first frame is up
            await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.press("j")
        screen = app.screen
        assert isinstance(screen, JobsScreen)
        last = time.perf_counter()

        def tick() -> None:
            nonlocal last
            now = time.perf_counter()
            gaps.append(now - last - TICK)
            last = now

        timer = app.set_interval(TICK, tick)
        screen.action_finetune()
        job = app.latest_job("finetune")
        assert job is not None
        deadline = time.perf_counter() + seconds
        # Yield to the event loop until the deadline; the timer ticks meanwhile.
        while time.perf_counter() < deadline and job.active:
            await asyncio.sleep(0.05)
        timer.stop()
        if job.error:
            raise SystemExit(f"the fine-tune job failed: {job.error}")
        steps, epochs = len(app.session.loss_curve), len(app.session.epochs)
        app.action_cancel_jobs()
        await app.workers.wait_for_complete()
        await pilot.pause()
    lateness = np.array(gaps[1:]) * 1000
    return {
        "finetune_max_stall": float(lateness.max()),
        "finetune_p99_stall": float(np.percentile(lateness, 99)),
        "finetune_ticks": float(lateness.size),
        "finetune_progress_points": float(steps),
        "finetune_epochs_done": float(epochs),
    }


def stand_in_checkpoint(folder: Path) -> Path:
    """A seeded, untrained ResNet-20 for 1-channel digits, shaped like the sample model."""
    torch.manual_seed(0)
    spec = ArchSpec("cifar_resnet", "resnet20", {
        "depth": 20, "naming": "layer", "shortcut": "A", "num_classes": 10, "in_channels": 1, "width": 16,
    })
    path = folder / "resnet20_standin.pt"
    save_checkpoint(path, CifarResNet(20, num_classes=10, in_channels=1), spec, Normalization((0.5,), (0.5,)))
    return path


def resnet56_checkpoint(folder: Path) -> Path:
    """A seeded, untrained CIFAR ResNet-56 for 3-channel 32 px images, saved as a plain state dict
    (what a user brings from another project)."""
    torch.manual_seed(0)
    path = folder / "resnet56_cifar.pt"
    torch.save(CifarResNet(56, num_classes=10, in_channels=3).state_dict(), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="model to open instead of the sample (default: the bundled sample)")
    parser.add_argument("--launches", type=int, default=5, help="launches per model (the median is reported)")
    parser.add_argument("--stall-seconds", type=float, default=15.0, help="how long to probe during fine-tuning")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoint, model = args.checkpoint, args.checkpoint
        elif SAMPLE_CHECKPOINT.is_file():
            checkpoint, model = "", "bundled sample (sample_models/resnet20_digits.pt)"
        else:
            checkpoint = str(stand_in_checkpoint(Path(tmp)))
            model = "seeded untrained ResNet-20, 1 channel (the sample model is not built)"
        cifar = f"cifar10:{SHARED_CIFAR}" if SHARED_CIFAR.is_dir() else ""
        models = {"sample": (checkpoint, "digits"), "resnet56": (str(resnet56_checkpoint(Path(tmp))), cifar)}
        opened = launches(models, args.launches)
        measured: dict[str, float] = {}
        for name, summary in opened.items():
            for stage in LAUNCH_STAGES:
                measured[f"{name}_{stage}"] = summary[stage]["median"]
                measured[f"{name}_{stage}_cpu"] = summary[f"{stage}_cpu"]["median"]
            measured[f"{name}_open_max_stall"] = summary["open_max_stall"]["median"]
        measured.update(asyncio.run(heatmap_render()))
        measured.update(asyncio.run(finetune_stall(checkpoint, args.stall_seconds)))
    load_after = os.getloadavg()
    results = {k: v for k, v in measured.items() if k not in COUNTS}
    counts = {k: int(v) for k, v in measured.items() if k in COUNTS}
    print(f"models: sample = {model}; resnet56 = seeded untrained CIFAR ResNet-56 (state dict), "
          f"data {models['resnet56'][1] or 'none'}")
    print(f"{args.launches} launches per model; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
          f"({os.cpu_count()} cores)")
    print(f"{'measure':34} {'ms':>10} {'target':>8}   range (launches)")
    for key, value in results.items():
        target = TARGETS_MS.get(key)
        mark = "" if target is None else (" ok" if value <= target else " MISSED")
        name, _, stage = key.partition("_")
        spread = opened.get(name, {}).get(stage)
        extra = f"   {spread['min']:.0f}-{spread['max']:.0f}" if spread else ""
        print(f"{key:34} {value:10.1f} {'' if target is None else f'{target:.0f}':>8}{mark:7}{extra}")
    print("  ".join(f"{key} {value}" for key, value in counts.items()))
    write_json_atomic(args.out, {
        "model": model,
        "targets_ms": TARGETS_MS,
        "results": results,
        "launches": {"count": args.launches, "per_model": opened, "data": {k: v[1] for k, v in models.items()}},
        "load_average": {"before": load_before, "after": load_after},
        "counts": counts,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "platform": platform.platform()},
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
