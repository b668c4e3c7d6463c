"""Named phases of a long operation: each with its own progress and time, an overall fraction
that never goes back, and a failed or skipped phase said in words."""

from __future__ import annotations

import itertools

import pytest

from engine.common.progress import (
    DONE,
    FAILED,
    PENDING,
    RUNNING,
    SKIPPED,
    Phases,
    Progress,
    part_progress,
    phases_fraction,
)


def test_phases_report_each_phase_with_its_own_progress_and_time() -> None:
    seen: list[Progress] = []
    ticks = itertools.count()
    phases = Phases(("plan", "latency", "probe"), seen.append, clock=lambda: float(next(ticks)))
    with phases.run("plan") as report:
        report(Progress("prune", 1, 4, "conv1"))
        report(Progress("prune", 4, 4, "done"))
    phases.skip("probe", "off")
    with pytest.raises(RuntimeError, match="boom"), phases.run("latency") as report:
        report(Progress("timing", 1, 2))
        raise RuntimeError("boom")
    assert [p.stage for p in seen] == ["plan", "plan", "plan", "plan", "probe", "latency", "latency", "latency"]
    assert seen[1].message == "conv1" and seen[1].metrics["phases"][0].fraction == 0.25
    final = {s.name: s for s in seen[-1].metrics["phases"]}
    assert final["plan"].status == DONE and final["plan"].seconds > 0
    assert final["probe"].status == SKIPPED and final["probe"].note == "off"
    assert final["latency"].status == FAILED and final["latency"].note == "boom" and final["latency"].fraction == 0.5
    fractions = [phases_fraction(p.metrics["phases"]) for p in seen]
    assert fractions == sorted(fractions), "the overall fraction never goes back"


def test_phases_fraction_counts_done_and_skipped_whole() -> None:
    from engine.common.progress import PhaseState

    states = (PhaseState("a", DONE), PhaseState("b", RUNNING, 0.5), PhaseState("c", SKIPPED), PhaseState("d", PENDING))
    assert phases_fraction(states) == pytest.approx(2.5 / 4)


def test_parts_of_one_operation_share_its_progress_in_turn() -> None:
    """The recalibrate phase measures, recalibrates and measures again: each part restarting at
    0 % must not take the phase's bar back."""
    seen: list[Progress] = []
    for index, what in enumerate(("before", "recalibration", "after")):
        part = part_progress(seen.append, index, 3, what)
        assert part is not None
        for done in range(5):
            part(Progress("accuracy", done, 4, f"batch {done}"))
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert seen[5].message == "recalibration: batch 0" and seen[5].stage == "accuracy"
    assert part_progress(None, 0, 3) is None
