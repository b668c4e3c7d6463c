"""The decision stepper on in-train pruning and AdaSAP traces: the mask-evolution view (which
entries turned off in which epoch) ends in the plan's kept channels, and AdaSAP's radii, pruning
steps and sharpness read as steps."""

from __future__ import annotations

from typing import Any

import pytest

from engine.adasap.adasap_config import WarmupConfig
from engine.adasap.phases import run_warmup
from engine.gkp.prune_config import PruneConfig
from engine.gkp.traces import MODEL, MaskEpoch, SharpnessMeasured, TraceEvent
from engine.itp.itp_config import ItpConfig
from engine.itp.trainer import run_itp
from engine.training.finetune_config import FinetuneConfig
from workbench.replay import LayerReplay

TRAINING = FinetuneConfig(batch_size=32, device="cpu", eval_max_examples=16)


@pytest.mark.parametrize(("granularity", "b"), [("grouped-kernel", 2e4), ("kernel", 1e5)])
def test_mask_evolution_replay_ends_in_the_plan(small_digits: Any, tiny_cnn: Any, granularity: str, b: float) -> None:
    itp = ItpConfig(granularity=granularity, epochs=3, prune_start=1, prune_end=2, hw_weight=b, adversarial=False)
    outcome = run_itp(tiny_cnn(), small_digits, small_digits.normalization, PruneConfig(rate=0.5, groups=4), itp,
                      TRAINING, (1, 1, 32, 32), None)
    events = [e for e in outcome.events if e.layer == "3"]
    replay = LayerReplay(events)
    kinds = [s.event.kind for s in replay.steps]
    assert kinds[0] == "mask_setup" and kinds.count("mask_epoch") == 3 and "mask_freeze" in kinds
    last = replay.frame(len(replay.steps) - 1)
    assert last.table is not None and last.table.columns[0] == "row"
    rows = [row[1] for row in last.table.rows]
    if granularity == "grouped-kernel":
        assert len(rows) == 4 and all(len(r) == 8 for r in rows)
        assert replay.final_kept == tuple(tuple(k) for k in outcome.plan.layers[0].kept_channels)
        assert all(r.count("·") == len(outcome.plan.layers[0].kept_channels[0]) for r in rows)
    else:
        keep = outcome.plan.masks[0].keep()
        assert [[ch == "·" for ch in r] for r in rows] == keep.tolist()
    turned = {e.epoch: len(e.turned_off) for e in events if isinstance(e, MaskEpoch)}
    assert any(turned.values())  # the hardware loss turned entries off inside the window
    for step in replay.steps:
        if isinstance(step.event, MaskEpoch) and turned[step.event.epoch]:
            marked = sum(row.count(str(step.event.epoch)) for _, row in replay.frame(replay.steps.index(step)).table.rows)
            assert marked >= 1 and step.decision


def test_adasap_steps_read_as_decisions(small_digits: Any, tiny_cnn: Any) -> None:
    phase = run_warmup(tiny_cnn(), small_digits, small_digits.normalization, WarmupConfig(epochs=1), TRAINING, None)
    sharp = SharpnessMeasured(MODEL, "before_prune", 0.25, 0.1, 0.05, 5, 64)
    events: list[TraceEvent] = [*phase.events, sharp]
    replay = LayerReplay([e for e in events if e.layer in ("3", MODEL)])
    assert replay.layer == "3"
    rho = replay.frame(0)
    assert rho.stage == "AdaSAP ρ" and "0.01–2" in rho.title
    assert rho.table is not None and rho.table.marks[0] == "win"  # least important first, at ρ_max
    assert rho.table.rows[0][2] == "2"
    last = replay.frame(1)
    assert last.stage == "sharpness" and "0.25" in last.title
