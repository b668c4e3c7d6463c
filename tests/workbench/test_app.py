"""The interactive workbench: decision replay against real plans, Pilot tests of every screen and
of the main flow (open → inspect → prune with SR-GKP → step through a beam decision → start and
cancel a fine-tune), jobs, error paths, the shared checkpoint, and SVG snapshots."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pilot_support import make_config, settle
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Select, Static
from torch import nn
from torch.utils.data import Subset

from engine.common.errors import ConfigError
from engine.gkp.layers import discover_layers
from engine.gkp.planner import plan_pruning
from engine.gkp.prune_config import PruneConfig
from engine.gkp.traces import BeamCut, TraceEvent
from engine.models.metrics import count_cost
from sample_models import SAMPLE_CHECKPOINT, is_sample
from widgets.heatmap import Heatmap
from widgets.plots import ComparisonBars, CurvePlot
from widgets.stepper import StepperView
from workbench.app import WorkbenchApp, build_config
from workbench.commands import WorkbenchCommands
from workbench.jobs import CANCELLED, DONE
from workbench.keys import bindings_markdown
from workbench.model_scan import inspect_model
from workbench.model_view import layer_rows
from workbench.prune_form import FIELDS, apply_form
from workbench.replay import LayerReplay
from workbench.screens.decisions import DecisionScreen
from workbench.screens.help import HelpScreen
from workbench.screens.jobs import JobsScreen
from workbench.screens.layer import LayerScreen
from workbench.screens.normalization import NormalizationScreen
from workbench.screens.overview import OverviewScreen
from workbench.screens.prune import PruneScreen

REPO = Path(__file__).resolve().parents[2]


# ---- helpers --------------------------------------------------------------------------


def tiny_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 16, 1),
    )


def plan_with_events(config: PruneConfig, snapshots: dict[int, dict[str, torch.Tensor]] | None = None
                     ) -> tuple[Any, list[TraceEvent]]:
    events: list[TraceEvent] = []
    plan = plan_pruning(tiny_model(), config, snapshots=snapshots, on_event=events.append)
    return plan, events


def events_by_layer(events: list[TraceEvent]) -> dict[str, list[TraceEvent]]:
    out: dict[str, list[TraceEvent]] = {}
    for event in events:
        out.setdefault(event.layer, []).append(event)
    return out


def fake_snapshots(model: nn.Module, epochs: range) -> dict[int, dict[str, torch.Tensor]]:
    """Weights drifting towards the final ones, as training snapshots do."""
    generator = torch.Generator().manual_seed(2)
    state = model.state_dict()
    return {
        epoch: {k: v + (len(epochs) - i) * 0.01 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
        for i, epoch in enumerate(epochs)
    }


# ---- decision replay ---------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    PruneConfig(groups=4),
    PruneConfig(groups=4, trace_level="full", include_pointwise=True),
    PruneConfig(groups=4, grouping="random", selection="l2"),
    PruneConfig(groups=4, grouping="cluster:kpca", selection="greedy"),
    PruneConfig(groups=2, grouping="smoothness-snaking", selection="least-smooth", rate=0.5),
], ids=["sr-gkp", "sr-gkp-full-pointwise", "random-l2", "kpca-greedy", "least-smooth"])
def test_replay_ends_in_the_plan(config: PruneConfig) -> None:
    plan, events = plan_with_events(config)
    by_layer = events_by_layer(events)
    for layer in plan.layers:
        replay = LayerReplay(by_layer[layer.name])
        assert replay.final_groups == tuple(tuple(g) for g in layer.filter_groups)
        assert replay.final_kept == tuple(tuple(k) for k in layer.kept_channels)
        for position in range(len(replay.steps)):
            frame = replay.frame(position)
            assert frame.title and frame.position == position
    for skipped in plan.skipped:
        frame = LayerReplay(by_layer[skipped.name]).frame(0)
        assert frame.stage == "skipped" and skipped.reason in frame.notes


def test_replay_of_tmi_vote_ends_in_the_plan() -> None:
    config = PruneConfig(method="tmi-gkp", groups=4, ticket_window=(0, 2), tmi_schemes=["kpca", "spectral"])
    plan, events = plan_with_events(config, fake_snapshots(tiny_model(), range(0, 3)))
    replay = LayerReplay(events_by_layer(events)[plan.layers[0].name])
    stages = [replay.frame(i).stage for i in range(len(replay.steps))]
    assert stages.count("TMI ticket") == 3 and "TMI vote" in stages and "TMI clustering" in stages
    vote = replay.frame(stages.index("TMI vote"))
    assert vote.table is not None and sum(int(row[1]) for row in vote.table.rows) == 3
    assert replay.final_groups == tuple(tuple(g) for g in plan.layers[0].filter_groups)
    assert replay.final_kept == tuple(tuple(k) for k in plan.layers[0].kept_channels)


def test_snaking_deals_one_filter_per_step() -> None:
    plan, events = plan_with_events(PruneConfig(groups=4))
    replay = LayerReplay(events_by_layer(events)[plan.layers[0].name])
    first = replay.first_of("snake_deal")
    assert first is not None
    for rank in range(16):
        frame = replay.frame(first + rank)
        assert frame.stage == "snaking" and frame.groups is not None
        assert sum(len(g) for g in frame.groups) == rank + 1
        assert frame.table is not None and "current" in frame.table.marks
    assert replay.steps[first + 15].decision and not replay.steps[first + 14].decision
    assert replay.next_decision(first) == first + 15
    assert replay.previous_decision(first + 15) < first


def test_beam_cut_frame_shows_every_candidate() -> None:
    plan, events = plan_with_events(PruneConfig(groups=4))
    replay = LayerReplay(events_by_layer(events)[plan.layers[1].name])
    position = replay.first_of("beam_cut")
    assert position is not None
    event = replay.steps[position].event
    assert isinstance(event, BeamCut)
    frame = replay.frame(position)
    assert frame.table is not None and len(frame.table.rows) == len(event.candidates)
    assert frame.table.marks == tuple("keep" if c.survived else "cut" for c in event.candidates)
    assert frame.focus_group == event.group


# ---- model view, forms and keys ----------------------------------------------------------


def test_inspect_model_matches_the_engine() -> None:
    model = tiny_model()
    info = inspect_model(model, count_cost(model, (1, 3, 16, 16)), power=2)
    weight = model[4].weight.detach().double().numpy()
    assert set(info.smoothness) == {"0", "2", "4", "5"}
    # Eq. 1 written out: every cell against its in-kernel 8-neighbours, both directions counted.
    squared = weight ** 2
    hand = np.zeros(weight.shape[:2])
    for r, c, dr, dc in itertools.product(range(3), range(3), (-1, 0, 1), (-1, 0, 1)):
        if (dr, dc) != (0, 0) and 0 <= r + dr < 3 and 0 <= c + dc < 3:
            hand += np.abs(squared[:, :, r + dr, c + dc] - squared[:, :, r, c])
    assert np.allclose(info.smoothness["4"], hand, rtol=1e-6)
    assert np.allclose(info.filter_smoothness["4"], hand.sum(axis=1), rtol=1e-6)
    assert info.params["4"] == 32 * 16 * 9 + 32 and info.in_channels["4"] == 16
    plan, _ = plan_with_events(PruneConfig(groups=4))
    rows = {r.name: r for r in layer_rows(discover_layers(model, groups=4), info, plan)}
    assert rows["0"].status == "skipped" and "stem" in (rows["0"].reason or "")
    assert rows["4"].status == "pruned" and rows["4"].ratio == 1 - 9 / 16  # 43.75% of 16 channels: 9 kept
    assert rows["5"].status == "skipped"  # pointwise, left out of this plan




def test_prune_form_is_validated_by_the_engine() -> None:
    config = make_config(None)
    texts = {"prune.rate": "0.5", "prune.groups": "4", "prune.ticket_window": "1,3", "prune.beta": "auto"}
    updated = apply_form(config, texts)
    assert (updated.prune.rate, updated.prune.groups, updated.prune.ticket_window) == (0.5, 4, (1, 3))
    assert config.prune.rate == 0.4375  # the original is untouched
    with pytest.raises(ConfigError, match="Rate must be a number"):
        apply_form(config, {"prune.rate": "lots"})
    with pytest.raises(ConfigError, match="rate"):
        apply_form(config, {"prune.rate": "1.5"})
    assert {f.key for f in FIELDS} >= {"prune.method", "prune.rate", "prune.groups", "model.snapshots"}


def test_build_config_applies_overrides_and_rejects_bad_keys(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('[prune]\nrate = 0.25\n', encoding="utf-8")
    config = build_config(toml, {"prune.groups": 4})
    assert (config.prune.rate, config.prune.groups) == (0.25, 4)
    with pytest.raises(ConfigError):
        build_config(None, {"prune.nonsense": 1})


def test_docs_key_bindings_match_the_app() -> None:
    docs = (REPO / "docs" / "TUI.md").read_text(encoding="utf-8")
    assert bindings_markdown() in docs


# ---- screens -----------------------------------------------------------------------------


async def test_main_flow(checkpoint: Path) -> None:
    # Far more epochs than could finish before the ctrl+g that follows "f" lands.
    app = WorkbenchApp(make_config(checkpoint, **{"finetune.epochs": 1000}))
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        assert isinstance(app.screen, OverviewScreen)
        table = app.screen.query_one("#layers", DataTable)
        assert table.row_count == 19
        assert dict(app.summary_lines())["Model"].startswith("CIFAR ResNet-20")

        await pilot.press("down", "enter")
        assert isinstance(app.screen, LayerScreen) and app.screen.layer_name == "layer1.0.conv1"
        heatmap = app.screen.query_one(Heatmap)
        assert heatmap.data is not None and heatmap.data.values.shape == (16, 16) and heatmap.data.kept is None

        await pilot.press("escape", "p")
        assert isinstance(app.screen, PruneScreen)
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        plan = app.session.plan
        assert plan is not None and plan.method == "sr-gkp" and len(plan.layers) == 18
        metrics = app.screen.query_one("#prune-metrics", DataTable)
        assert metrics.get_row_at(1)[0] == "MACs" and metrics.get_row_at(1)[3].startswith("-")
        labels = [str(metrics.get_row_at(i)[0]) for i in range(metrics.row_count)]
        assert labels[3:] == ["val acc, raw (n=180)", "val acc, BN recalibrated"]
        checks = str(app.screen.query_one("#prune-checks", Static).render())
        assert "✓" in checks and "interleaved rounds" in checks
        outcome = app.session.outcome
        assert outcome is not None and outcome.accuracy is not None and outcome.recalibration is not None
        # The untrained test model guesses; every warning about it is on the screen.
        assert outcome.warnings and all(w in checks.replace("\n", "") for w in outcome.warnings)

        await pilot.press("o")
        app.open_layer("layer2.0.conv2")
        await pilot.pause()
        heatmap = app.screen.query_one(Heatmap)
        layer = plan.layer("layer2.0.conv2")
        assert heatmap.data is not None and heatmap.data.kept is not None
        assert heatmap.data.kept.sum() == len(layer.filter_groups[0]) * layer.kept * layer.groups

        await pilot.press("d")
        assert isinstance(app.screen, DecisionScreen)
        view = app.screen.query_one(StepperView)
        for _ in range(len(app.screen.replay.steps)):
            if view.frame is not None and view.frame.stage == "beam cut":
                break
            await pilot.press("n")
        assert view.frame is not None and view.frame.stage == "beam cut"
        event = app.screen.replay.steps[app.screen.position].event
        assert isinstance(event, BeamCut)
        assert view.query_one("#stepper-table", DataTable).row_count == len(event.candidates)
        await pilot.press("end")
        assert view.frame.groups == tuple(tuple(g) for g in layer.filter_groups)
        assert view.frame.kept == tuple(tuple(k) for k in layer.kept_channels)

        await pilot.press("escape", "escape", "j")
        assert isinstance(app.screen, JobsScreen)
        notes = str(app.screen.query_one("#job-notes", Static).render())
        assert notes.startswith("pruned model, validation accuracy (n=180): unpruned ") and "⚠" in notes
        await pilot.press("f", "ctrl+g")
        await settle(app, pilot)
        job = app.latest_job("finetune")
        assert job is not None and job.status == CANCELLED
        assert app.session.finetuned is None


async def test_stepper_plays_and_steps(checkpoint: Path) -> None:
    plan, events = plan_with_events(PruneConfig(groups=4))
    app = WorkbenchApp(make_config(checkpoint))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        name = plan.layers[0].name
        app.push_screen(DecisionScreen(name, events_by_layer(events)[name]))
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, DecisionScreen)
        await pilot.press("right", "right", "left")
        assert screen.position == 1
        await pilot.press("space")
        assert screen.playing
        await pilot.press("space")
        assert not screen.playing
        await pilot.press("end")
        assert screen.position == len(screen.replay.steps) - 1
        assert screen.query_one(StepperView).frame.stage == "layer done"
        await pilot.press("N")
        assert screen.position == screen.replay.previous_decision(len(screen.replay.steps) - 1)
        assert screen.query_one(StepperView).frame.stage == "final choice"


async def test_pruning_can_be_cancelled(checkpoint: Path) -> None:
    app = WorkbenchApp(make_config(checkpoint))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("p")
        assert isinstance(app.screen, PruneScreen)
        app.screen.action_run()
        app.action_cancel_jobs()  # in the same turn: the worker has barely started
        await settle(app, pilot)
        job = app.latest_job("prune")
        assert job is not None and job.status == CANCELLED
        assert app.session.outcome is None and app.session.plan is None
        assert "cancelled" in str(app.screen.query_one("#prune-status", Static).render())


async def test_jobs_evaluate_and_finetune(checkpoint: Path) -> None:
    app = WorkbenchApp(make_config(checkpoint, **{"finetune.epochs": 1}))
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await pilot.press("j", "e")
        await settle(app, pilot)
        assert app.latest_job("evaluate").status == DONE  # type: ignore[union-attr]
        attacks = app.screen.query_one("#attack-table", DataTable)
        assert attacks.row_count == 4 and [str(c.label) for c in attacks.columns.values()] == ["attack", "unpruned"]
        bars = app.screen.query_one(ComparisonBars)
        assert bars.categories[0] == "benign" and list(bars.models) == ["unpruned"]
        assert bars.title_text == "accuracy % on 8 test examples"
        robustness = app.session.evaluations["unpruned"].robustness
        shown = [[str(cell) for cell in attacks.get_row_at(i)] for i in range(attacks.row_count)]
        assert shown == [[label, f"{100 * acc:.1f}"] for label, acc in
                         [("benign", robustness.clean_acc), *((a.label, a.accuracy) for a in robustness.attacks)]]
        assert bars.models["unpruned"] == pytest.approx([float(row[1]) for row in shown], abs=0.05)

        await pilot.press("f")
        await settle(app, pilot)
        assert app.latest_job("finetune").status == DONE  # type: ignore[union-attr]
        assert app.session.finetuned is not None and len(app.session.epochs) == 1
        loss = app.screen.query_one("#loss-plot", CurvePlot).series["train loss"]
        assert loss[0] and loss[0][-1] == pytest.approx(1.0)
        assert loss[1] == [y for _, y in app.session.loss_curve] and all(y > 0 for y in loss[1])
        accuracy = app.screen.query_one("#acc-plot", CurvePlot).series
        (record,) = app.session.epochs
        assert accuracy["val benign"] == ([1.0], [100 * record.val["benign"]])
        assert accuracy["train"] == ([1.0], [100 * record.train_acc])


async def test_in_train_pruning_and_adasap_from_the_tui(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ITP chosen in the form trains, deploys and replays its masks; a bad value is one
    notification; AdaSAP's warmup makes the next pruning progressive, with sharpness traced."""
    from engine import pipeline

    real = pipeline.load_data

    def small(*args: Any, **kwargs: Any) -> Any:
        bundle = real(*args, **kwargs)
        return dataclasses.replace(bundle, train=Subset(bundle.train, range(128)), val=Subset(bundle.val, range(32)))

    monkeypatch.setattr(pipeline, "load_data", small)
    app = WorkbenchApp(make_config(checkpoint, **{
        "itp.epochs": 1, "itp.hw_weight": 2e5, "warmup.epochs": 1, "warmup.pruning_epochs": 1, "warmup.prune_frequency": 4,
        "sharpness.images": 32, "sharpness.steps": 1, "itp.adversarial": False,
    }))
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await pilot.press("p")
        screen = app.screen
        assert isinstance(screen, PruneScreen)
        screen.query_one("#field-prune-method", Select).value = "itp"
        screen.query_one("#field-itp-epochs", Input).value = "0"
        await pilot.pause()
        assert "itp.epochs" in str(screen.query_one("#form-status", Static).render())
        await pilot.press("ctrl+r")
        assert app.latest_job("prune") is None and any("itp.epochs" in n.message for n in app._notifications)
        screen.query_one("#field-itp-epochs", Input).value = "1"
        await pilot.pause()
        assert "grouped-kernel masks" in str(screen.query_one("#form-status", Static).render())
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        plan = app.session.plan
        assert plan is not None and plan.method == "itp" and plan.params["granularity"] == "grouped-kernel"
        assert "✓" in str(screen.query_one("#prune-checks", Static).render())
        app.open_decisions("layer1.0.conv1")
        await pilot.pause()
        decisions = app.screen
        assert isinstance(decisions, DecisionScreen)
        view = decisions.query_one(StepperView)
        assert view.frame is not None and view.frame.stage == "ITP mask"
        await pilot.press("end")
        assert view.frame.kept == tuple(tuple(k) for k in plan.layer("layer1.0.conv1").kept_channels)
        assert view.query_one("#stepper-table", DataTable).row_count == 8  # one row per filter group

        await pilot.press("escape", "j", "w")
        await settle(app, pilot)
        assert app.latest_job("warmup").status == DONE and app.session.warmed is not None  # type: ignore[union-attr]
        await pilot.press("p")
        app.screen.query_one("#field-prune-method", Select).value = "sr-gkp"
        await pilot.pause()
        await pilot.press("ctrl+r")
        await settle(app, pilot)
        assert app.latest_job("prune").status == DONE  # type: ignore[union-attr]
        kinds = {e.kind for e in app.session.events}
        assert {"rho_epoch", "progressive_prune", "sharpness", "final_choice"} <= kinds
        assert [e.when for e in app.session.events if e.kind == "sharpness"] == ["before_prune", "after_prune"]


async def test_without_data_pruning_works_and_data_jobs_say_what_is_missing(checkpoint: Path) -> None:
    app = WorkbenchApp(make_config(checkpoint, **{"data.spec": ""}))
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        assert dict(app.summary_lines())["Data"].startswith("none set")
        await pilot.press("p", "ctrl+r")
        await settle(app, pilot)
        outcome = app.session.outcome
        assert outcome is not None and outcome.accuracy is None
        assert "set the data (--data, or the data field)" in str(app.screen.query_one("#prune-checks", Static).render())
        phases = str(app.screen.query_one("#prune-phases", Static).render())
        assert "– recalibrate" in phases and "no data" in phases and "✓ check" in phases
        await pilot.press("j", "e")
        await settle(app, pilot)
        assert app.latest_job("evaluate") is None  # refused before it starts, saying where to set data
        assert any("needs data (none is set); set it in the data field" in n.message for n in app._notifications)


async def test_bad_input_is_a_notification_not_a_crash(tmp_path: Path, checkpoint: Path) -> None:
    missing = WorkbenchApp(make_config(tmp_path / "nope.pt"))
    async with missing.run_test(size=(80, 24)) as pilot:
        await settle(missing, pilot)
        assert missing.latest_job("open") is None  # refused at once, before torch is needed
        assert "nope.pt" in str(missing.screen.query_one("#summary", Static).render())
        assert any("nope.pt" in n.message for n in missing._notifications)

    app = WorkbenchApp(make_config(checkpoint))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("p")
        rate = app.screen.query_one("#field-prune-rate", Input)
        rate.value = "2"
        await pilot.pause()
        assert "rate" in str(app.screen.query_one("#form-status", Static).render())
        await pilot.press("ctrl+r")
        assert app.latest_job("prune") is None
        await pilot.press("ctrl+s")
        assert any("Nothing to save" in n.message for n in app._notifications)
        rate.value = "0.5"
        app.screen.query_one("#field-prune-method", Select).value = "tmi-gkp"
        await pilot.press("ctrl+r")
        assert app.latest_job("prune") is None  # refused by the form, naming the field on screen
        assert any("set Snapshots" in n.message and "--snapshots" not in n.message for n in app._notifications)


async def test_save_writes_model_plan_and_trace(tmp_path: Path, checkpoint: Path) -> None:
    app = WorkbenchApp(make_config(checkpoint))
    target = tmp_path / "out" / "pruned.pt"
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        await pilot.press("p", "ctrl+r")
        await settle(app, pilot)
        app.screen.query_one("#save-path", Input).value = str(target)
        await pilot.press("ctrl+s")
        await settle(app, pilot)
        assert app.latest_job("save").status == DONE  # type: ignore[union-attr]
    assert target.is_file() and target.with_suffix(".plan.json").is_file()
    assert target.with_suffix(".decisions.jsonl").is_file()

    reopened = WorkbenchApp(make_config(target))
    async with reopened.run_test(size=(100, 32)) as pilot:
        await settle(reopened, pilot)
        rows = reopened.session.rows()
        assert sum(r.status == "pruned" for r in rows) == 18
        row = next(r for r in rows if r.name == "layer3.0.conv2")  # dense shape, grouped size
        assert (row.out_channels, row.in_channels) == (64, 64) and row.params == 64 * row.kept * 9
        heat = reopened.session.info.smoothness[row.name]  # type: ignore[union-attr]
        assert heat.shape == (64, 64) and int((heat == 0).sum()) == 64 * (64 - row.kept)  # type: ignore[operator]
        assert reopened.session.events  # the saved trace comes back with the checkpoint
        reopened.open_decisions("layer3.0.conv2")
        await pilot.pause()
        assert isinstance(reopened.screen, DecisionScreen)


async def test_overview_filters_and_sorts(checkpoint: Path) -> None:
    app = WorkbenchApp(make_config(checkpoint))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        screen = app.screen
        assert isinstance(screen, OverviewScreen)
        table = screen.query_one("#layers", DataTable)
        await pilot.press("slash", *"layer3", "enter")
        assert table.row_count == 6 and screen.selected_layer() == "layer3.0.conv1"
        await pilot.press("escape")
        assert table.row_count == 19
        await pilot.press("s", "s", "s", "s", "s")  # order, name, params, MACs, MACs after, smoothness
        smooth = [r.mean_smoothness for r in app.session.rows()]
        assert table.get_row_at(0)[4] == f"{min(smooth):.4g}"  # column 4: mean smoothness
        assert screen.selected_layer() == "layer3.0.conv1"  # the cursor stays on its layer
        await pilot.press("r")
        assert table.get_row_at(0)[4] == f"{max(smooth):.4g}"
        await pilot.press("slash", *"skipped", "enter")
        assert table.row_count == 1 and table.get_row_at(0)[0] == "conv1"


async def test_palette_and_help_cover_every_action(checkpoint: Path) -> None:
    app = WorkbenchApp(make_config(checkpoint))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        titles = [c.title for c in app.palette_commands()]
        for action in ("Run pruning", "Save pruned model", "Fine-tune", "Evaluate robustness", "Cancel jobs", "Help"):
            assert action in titles
        assert "Inspect layer layer3.2.conv2" in titles
        provider = WorkbenchCommands(app.screen)
        hits = [hit async for hit in provider.search("inspect layer3.2.conv2")]
        assert hits and hits[0].text == "Inspect layer layer3.2.conv2"
        hits[0].command()
        await pilot.pause()
        assert isinstance(app.screen, LayerScreen) and app.screen.layer_name == "layer3.2.conv2"
        commands = {c.title: c for c in app.palette_commands()}
        await commands["Prune settings"].callback()
        assert isinstance(app.screen, PruneScreen)
        await commands["Overview"].callback()
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, OverviewScreen)  # the overview itself, not the inspector above it


async def test_opens_the_shared_checkpoint_and_asks_for_normalisation(shared_checkpoint: Path, shared_cifar: str) -> None:
    """A CIFAR model opened with digits is not evaluated on them: the digits are refused in
    words; the data field loads the CIFAR folder; evaluation then asks for the normalisation."""
    app = WorkbenchApp(make_config(shared_checkpoint, **{"data.spec": "digits", "evaluate.max_examples": 32}))
    async with app.run_test(size=(100, 32)) as pilot:
        await settle(app, pilot)
        assert app.session.open_error is None
        ws = app.session.workspace
        assert ws is not None and ws.data is None
        assert ws.normalization_source.startswith("unknown")
        assert len(app.session.rows()) == 19
        assert "1 channel but the model takes 3" in dict(app.summary_lines())["Data"]
        await pilot.press("j", "e")
        assert app.latest_job("evaluate") is None and isinstance(app.screen, JobsScreen)
        assert any("needs data" in n.message for n in app._notifications)

        data = app.screen.query_one("#jobs-data .data-spec", Input)
        data.value = shared_cifar
        data.focus()
        await pilot.press("enter")
        await settle(app, pilot)
        ws = app.session.workspace
        assert ws is not None and ws.data is not None and ws.data.in_channels == 3 and ws.data.num_classes == 10
        assert app.config.data.spec == shared_cifar
        app.screen.query_one("#job-evaluate").focus()
        await pilot.press("e")
        assert isinstance(app.screen, NormalizationScreen)
        await pilot.press(*"imagenet", "enter")
        assert app.session.workspace.normalization.mean == (0.485, 0.456, 0.406)
        job = app.latest_job("evaluate")
        assert job is not None
        await settle(app, pilot)
        assert job.status == DONE
        # evaluated with the normalisation just given: the clean count is the one it gives here
        ws = app.session.workspace
        images = torch.stack([ws.data.test[i][0] for i in range(32)])
        labels = torch.tensor([ws.data.test[i][1] for i in range(32)])
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
        with torch.no_grad():
            expected = int((ws.model.eval()((images - mean) / std).argmax(1) == labels).sum())
        assert app.session.evaluations["unpruned"].robustness.clean_correct == expected


@pytest.mark.skipif(not SAMPLE_CHECKPOINT.is_file(), reason="the bundled sample model is not built yet")
async def test_opens_the_bundled_sample() -> None:
    app = WorkbenchApp(make_config(None))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        assert app.session.workspace is not None and is_sample(app.session.workspace.checkpoint.path)
        rows = app.session.rows()
        assert len(rows) == 19 and rows[0].name == "conv1" and rows[0].status == "skipped"  # ResNet-20: stem + 18
        assert all(row.status != "skipped" for row in rows[1:])


# ---- snapshots (80x24) -------------------------------------------------------------------


def _snapshot_app(checkpoint: Path) -> WorkbenchApp:
    return WorkbenchApp(make_config(checkpoint))


def test_snapshot_overview(snap_compare: Any, checkpoint: Path) -> None:
    app = _snapshot_app(checkpoint)

    async def ready(pilot: Pilot[Any]) -> None:
        await settle(app, pilot)

    assert snap_compare(app, terminal_size=(80, 24), run_before=ready)


def test_snapshot_layer_inspector(snap_compare: Any, checkpoint: Path) -> None:
    app = _snapshot_app(checkpoint)

    async def inspect(pilot: Pilot[Any]) -> None:
        await settle(app, pilot)
        app.open_layer("layer2.0.conv2")
        await pilot.pause()
        await pilot.press("down", "right")

    assert snap_compare(app, terminal_size=(80, 24), run_before=inspect)


def test_snapshot_decision_stepper(snap_compare: Any, checkpoint: Path) -> None:
    app = _snapshot_app(checkpoint)

    async def step(pilot: Pilot[Any]) -> None:
        await settle(app, pilot)
        await pilot.press("p", "ctrl+r")
        await settle(app, pilot)
        await pilot.press("o")
        app.open_decisions("layer2.0.conv2")
        await pilot.pause()
        await pilot.press("n", "n", "n")
        app.clear_notifications()
        await pilot.pause()

    assert snap_compare(app, terminal_size=(80, 24), run_before=step)


def test_snapshot_prune_form(snap_compare: Any, checkpoint: Path) -> None:
    app = _snapshot_app(checkpoint)

    async def form(pilot: Pilot[Any]) -> None:
        await settle(app, pilot)
        await pilot.press("p")

    assert snap_compare(app, terminal_size=(80, 24), run_before=form)


def test_snapshot_help(snap_compare: Any, checkpoint: Path) -> None:
    app = _snapshot_app(checkpoint)

    async def help_screen(pilot: Pilot[Any]) -> None:
        await settle(app, pilot)
        await pilot.press("question_mark")

    assert snap_compare(app, terminal_size=(80, 24), run_before=help_screen)
