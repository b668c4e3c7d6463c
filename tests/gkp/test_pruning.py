"""The orchestrator: plans for each method and ablation pair, compat `reference` effects,
determinism, snapshot errors, bad configs, progress and cancellation, and the real checkpoint."""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections.abc import Mapping

import pytest
import torch
from test_tmi import average_ranks
from torch import nn

from engine.common.errors import Cancelled, CheckpointError, ConfigError, SnapshotError
from engine.gkp.plan import PrunePlan
from engine.gkp.planner import plan_pruning
from engine.gkp.prune_config import GROUPINGS, SELECTIONS, PruneConfig
from engine.gkp.selection import pair_beta
from engine.gkp.traces import BeamCut, BeamFinal, LayerStart, StartResults, TraceEvent
from engine.models.cifar_resnet import CifarResNet


def tiny(c_in: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, c_in, 3), nn.ReLU(), nn.Conv2d(c_in, 16, 3), nn.ReLU(),
                         nn.Conv2d(16, 8, 3), nn.Conv2d(8, 16, 1))


def snapshots_for(model: nn.Module, epochs, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    final = model.state_dict()
    return {e: {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in final.items()} for e in epochs}


def test_sr_gkp_plan_for_resnet20():
    model = CifarResNet(20)
    plan = plan_pruning(model, PruneConfig(), arch={"family": "cifar_resnet", "depth": 20})
    assert plan.method == "sr-gkp" and plan.arch == {"family": "cifar_resnet", "depth": 20}
    assert [s.name for s in plan.skipped] == ["conv1"] and "stem" in plan.skipped[0].reason
    assert len(plan.layers) == 18
    for layer in plan.layers:
        layer.check()
        assert layer.kept == round(0.5625 * layer.in_channels)
        assert (layer.grouping, layer.selection) == ("smoothness-snaking", "smooth-beam")
        assert layer.groups == 8 and layer.score is not None
    plan.check_fits(model)
    assert PrunePlan.from_dict(plan.to_dict()).to_json() == plan.to_json()


def test_params_record_every_parameter():
    params = plan_pruning(tiny(), PruneConfig(exclude=["4"])).params
    assert set(params) == {f.name for f in dataclasses.fields(PruneConfig)}
    assert params["grouping"] == "smoothness-snaking" and params["selection"] == "smooth-beam"
    assert params["ticket_window"] == [35, 70] and params["exclude"] == ["4"]


def test_same_seed_gives_byte_identical_plans():
    model = tiny()
    for config in (PruneConfig(), PruneConfig(grouping="random", selection="random", seed=3)):
        assert plan_pruning(model, config).to_json() == plan_pruning(model, config).to_json()
    a = plan_pruning(model, PruneConfig(grouping="random", seed=1)).to_json()
    assert a != plan_pruning(model, PruneConfig(grouping="random", seed=2)).to_json()


def test_tmi_gkp_is_deterministic_and_votes_per_layer():
    model = tiny()
    snapshots = snapshots_for(model, range(3, 7))
    config = PruneConfig(method="tmi-gkp", ticket_window=(3, 6), seed=4)
    first = plan_pruning(model, config, snapshots=snapshots)
    assert first.to_json() == plan_pruning(model, config, snapshots=snapshots).to_json()
    assert all(layer.grouping.startswith("tmi:") for layer in first.layers if layer.kernel_size != (1, 1))
    assert all(layer.selection == "greedy" for layer in first.layers)


@pytest.mark.parametrize("grouping", [g for g in GROUPINGS if g != "tmi"])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_every_grouping_selection_pair_makes_a_valid_plan(grouping, selection):
    model = tiny()
    plan = plan_pruning(model, PruneConfig(grouping=grouping, selection=selection, groups=4))
    assert len(plan.layers) == 2
    for layer in plan.layers:
        layer.check()
        assert (layer.grouping, layer.selection) == (grouping, selection)
        assert (layer.score is None) == (selection in ("l2", "least-smooth", "random"))


def test_pointwise_layers_use_magnitude_snaking():
    plan = plan_pruning(tiny(), PruneConfig(include_pointwise=True, groups=4))
    assert [(l.name, l.grouping) for l in plan.layers] == [
        ("2", "smoothness-snaking"), ("4", "smoothness-snaking"), ("5", "magnitude-snaking")]


def test_compat_reference_changes_the_kept_count():
    model = tiny(c_in=15)  # S = round(0.5625 * 15) = 8, reference int(0.5625 * 16) = 9
    paper = plan_pruning(model, PruneConfig(groups=4)).layer("2")
    reference = plan_pruning(model, PruneConfig(groups=4, compat="reference")).layer("2")
    assert (paper.kept, reference.kept) == (8, 9)


def test_compat_reference_freezes_beta_at_the_first_cut():
    events: dict[str, list[TraceEvent]] = {"paper": [], "reference": []}
    for compat, sink in events.items():
        plan_pruning(tiny(), PruneConfig(compat=compat, groups=4), on_event=sink.append)
    beta = {compat: next(e for e in sink if isinstance(e, StartResults) and e.layer == "2").beta
            for compat, sink in events.items()}
    assert beta == {"paper": pair_beta(9, 16), "reference": pair_beta(4, 16)}


def test_compat_reference_cuts_at_the_final_size():
    # rate 0.375 of C_in = 16: S = 10 either way, and S - 1 = 9 is a multiple of check_every = 3
    cuts = {}
    for compat in ("paper", "reference"):
        events: list[TraceEvent] = []
        plan = plan_pruning(tiny(), PruneConfig(compat=compat, groups=4, rate=0.375), on_event=events.append)
        assert plan.layer("2").kept == 10
        cuts[compat] = sorted({e.size for e in events if isinstance(e, BeamCut) and e.layer == "2"})
        finals = [e for e in events if isinstance(e, BeamFinal) and e.layer == "2"]
        assert {len(e.candidates) for e in finals} == {2 if compat == "reference" else 16}
    assert cuts == {"paper": [4, 7], "reference": [4, 7, 10]}


def test_compat_reference_gamma_has_no_floor():
    # rate 0.875 of C_in = 16: S = 2 either way; gamma = floor(0.2 * 2) = 0 under reference
    for compat, gamma in (("paper", 1), ("reference", 0)):
        events: list[TraceEvent] = []
        plan_pruning(tiny(), PruneConfig(compat=compat, groups=4, rate=0.875, grouping="random", selection="greedy"),
                     on_event=events.append)
        results = [e for e in events if isinstance(e, StartResults) and e.layer == "2"]
        assert {len(m) for r in results for m in r.members} == {2}
        assert {r.gamma for r in results} == {gamma}
        assert ({r.beta for r in results} == {0.0}) == (compat == "reference")


def test_tmi_weighting_follows_compat():
    model = tiny()
    snapshots = snapshots_for(model, [5])
    for compat in ("paper", "reference"):
        events: list[TraceEvent] = []
        plan_pruning(model, PruneConfig(method="tmi-gkp", ticket_window=(5, 5), compat=compat, tmi_alpha=0.25),
                     snapshots=snapshots, on_event=events.append)
        ticket = next(e for e in events if e.kind == "tmi_ticket")
        # ranks recomputed here from the gap statistics (1 = smallest, ties share their mean rank)
        rank_mean, rank_var = average_ranks(ticket.gap_mean), average_ranks(ticket.gap_var)
        assert (list(ticket.rank_mean), list(ticket.rank_var)) == (rank_mean, rank_var)
        assert len(set(ticket.gap_mean)) > 1 and len(set(ticket.gap_var)) > 1  # the ranks tell schemes apart
        expected = [(m + 0.25 * v) if compat == "paper" else (0.25 * m + v) for m, v in zip(rank_mean, rank_var)]
        assert list(ticket.score) == pytest.approx(expected)
        assert ticket.winner == ticket.schemes[expected.index(min(expected))]


class OneAtATime(Mapping):
    """Snapshots that record each read and check the previous snapshot was let go first."""

    class State(dict):
        pass

    def __init__(self, snapshots):
        self.snapshots, self.reads, self.given = snapshots, [], []

    def __getitem__(self, epoch):
        assert all(ref() is None for ref in self.given), "a snapshot is still held while the next is read"
        self.reads.append(epoch)
        state = self.State(self.snapshots[epoch])
        self.given.append(weakref.ref(state))
        return state

    def __iter__(self):
        return iter(self.snapshots)

    def __len__(self):
        return len(self.snapshots)

    def __contains__(self, epoch):
        return epoch in self.snapshots


def test_tmi_reads_each_snapshot_once_and_holds_one_at_a_time():
    model = tiny()
    snapshots = snapshots_for(model, range(3, 7))
    config = PruneConfig(method="tmi-gkp", ticket_window=(3, 6), seed=4)
    source = OneAtATime(snapshots)
    streamed = plan_pruning(model, config, snapshots=source)
    assert source.reads == [3, 4, 5, 6]
    assert streamed.to_json() == plan_pruning(model, config, snapshots=snapshots).to_json()


def test_tmi_without_snapshots_is_a_clear_error():
    with pytest.raises(SnapshotError, match="^TMI-GKP needs training snapshots"):
        plan_pruning(tiny(), PruneConfig(method="tmi-gkp"))
    with pytest.raises(SnapshotError, match="needs training snapshots"):
        plan_pruning(tiny(), PruneConfig(grouping="tmi"), snapshots={})


def test_missing_ticket_epochs_name_the_epochs_found():
    model = tiny()
    snapshots = snapshots_for(model, list(range(0, 31)) + [40])
    with pytest.raises(SnapshotError) as info:
        plan_pruning(model, PruneConfig(method="tmi-gkp"), snapshots=snapshots)
    assert str(info.value) == ("the ticket window 35-70 needs snapshots of epochs 35-39, 41-70, "
                               "but only epochs 0-30, 40 were found")


def test_snapshot_without_the_layer_is_a_clear_error():
    model = tiny()
    snapshots = snapshots_for(model, [1])
    del snapshots[1]["4.weight"]
    with pytest.raises(SnapshotError, match="epoch 1 has no weight '4.weight'"):
        plan_pruning(model, PruneConfig(method="tmi-gkp", ticket_window=(1, 1), groups=4), snapshots=snapshots)


def test_forced_clustering_needs_no_snapshots():
    plan = plan_pruning(tiny(), PruneConfig(grouping="cluster:kpca", selection="greedy", groups=4))
    assert {l.grouping for l in plan.layers} == {"cluster:kpca"}


@pytest.mark.parametrize("change, message", [
    ({"method": "gkp"}, "prune.method must be one of sr-gkp, tmi-gkp, itp, l1-filter, got 'gkp'"),
    ({"grouping": "kmeans"}, "prune.grouping must be one of"),
    ({"selection": "best"}, "prune.selection must be one of"),
    ({"rate": 1.0}, r"prune.rate must be a number in \[0, 1\)"),
    ({"groups": 0}, "prune.groups must be a whole number of at least 1, got 0"),
    ({"compat": "legacy"}, "prune.compat must be one of paper, reference"),
    ({"seed": -1}, "prune.seed must be a whole number from 0 to 4294967295, got -1"),
    ({"smoothness_power": 3}, "prune.smoothness_power must be one of 1, 2, got 3"),
    ({"skip_stem": "yes"}, "prune.skip_stem must be true or false"),
    ({"exclude": "conv1"}, "prune.exclude must be a list of names, got 'conv1'"),
    ({"beam_width": 0}, "prune.beam_width must be a whole number of at least 1"),
    ({"check_every": 1.5}, "prune.check_every must be a whole number of at least 1"),
    ({"beam_width": 4, "check_every": 6}, r"prune.beam_width \*\* \(check_every \+ 1\) is 16384 beam candidates"),
    ({"csb_alpha": 1.5}, r"prune.csb_alpha must be a number in \[0, 1\]"),
    ({"gamma_ratio": 0.0}, r"prune.gamma_ratio must be a number in \(0, 1\]"),
    ({"beta": "big"}, 'prune.beta must be "auto" or a number >= 0'),
    ({"beta": -1.0}, 'prune.beta must be "auto" or a number >= 0'),
    ({"tmi_alpha": float("nan")}, "prune.tmi_alpha must be a number >= 0"),
    ({"ticket_window": (70, 35)}, "prune.ticket_window must be two epochs"),
    ({"ticket_step": 0}, "prune.ticket_step must be a whole number of at least 1"),
    ({"tmi_schemes": []}, "prune.tmi_schemes must be a list of distinct names, not empty"),
    ({"tmi_schemes": ["kpca", "umap"]}, "each of prune.tmi_schemes must be one of"),
    ({"trace_level": "all"}, "prune.trace_level must be one of decisions, full"),
])
def test_bad_configs_fail_with_one_clear_sentence(change, message):
    config = dataclasses.replace(PruneConfig(), **change)
    with pytest.raises(ConfigError, match=message):
        config.validate()
    with pytest.raises(ConfigError):
        plan_pruning(tiny(), config)


def test_non_finite_weights_are_a_clear_error():
    model = tiny()
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="layer 2 has NaN or infinite weights"):
        plan_pruning(model, PruneConfig())
    model = tiny()
    snapshots = snapshots_for(model, [1])
    snapshots[1]["2.weight"][0, 0, 0, 0] = float("inf")
    with pytest.raises(SnapshotError, match="epoch 1 has NaN or infinite values in 2.weight"):
        plan_pruning(model, PruneConfig(method="tmi-gkp", ticket_window=(1, 1), groups=4), snapshots=snapshots)


def test_unknown_excluded_layer_is_an_error_and_known_one_is_skipped():
    with pytest.raises(ConfigError, match="prune.exclude names no conv layer of this model: conv9"):
        plan_pruning(tiny(), PruneConfig(exclude=["conv9"]))
    plan = plan_pruning(tiny(), PruneConfig(exclude=["2"]))
    assert [l.name for l in plan.layers] == ["4"]
    assert ("2", "excluded by config") in [(s.name, s.reason) for s in plan.skipped]


def test_progress_per_layer_and_events_in_layer_order():
    reports, events = [], []
    plan_pruning(tiny(), PruneConfig(groups=4), progress=reports.append, on_event=events.append)
    assert [(r.stage, r.done, r.total) for r in reports] == [("prune", 0, 2), ("prune", 1, 2), ("prune", 2, 2)]
    assert [e.layer for e in events if isinstance(e, LayerStart)] == ["2", "4"]


def test_cancel_between_and_inside_layers():
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        plan_pruning(tiny(), PruneConfig(), cancel=cancel)
    cancel = threading.Event()
    seen = []

    def stop_in_second_group(event):
        seen.append(event)
        if event.kind == "final_choice":
            cancel.set()

    with pytest.raises(Cancelled):
        plan_pruning(tiny(), PruneConfig(groups=4), on_event=stop_in_second_group, cancel=cancel)
    assert sum(e.kind == "final_choice" for e in seen) == 1  # stopped inside the first layer


@pytest.mark.shared
def test_real_checkpoint_plans_quickly_and_deterministically(shared_checkpoint):
    state = torch.load(shared_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model = CifarResNet(20)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    images = torch.randn(256, 3, 32, 32)
    plans, plan_seconds, forward_seconds = [], [], []
    for _ in range(2):  # interleaved, best of two: planning in units of one forward on 256 images
        started = time.perf_counter()
        plans.append(plan_pruning(model, PruneConfig()))
        plan_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        with torch.no_grad():
            model.eval()(images)
        forward_seconds.append(time.perf_counter() - started)
    plan = plans[0]
    assert plan.to_json() == plans[1].to_json()
    assert min(plan_seconds) < 1.5 * min(forward_seconds)  # measured 0.22-0.45 forwards here
    assert [l.kept for l in plan.layers] == [9] * 7 + [18] * 6 + [36] * 5
    plan.check_fits(model)
