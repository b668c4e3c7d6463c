"""Same decisions, proven: every golden case (methods, ablation pairings, compat modes, models
and seeds; see decision_digests.py) plans to the same decisions and the same trace bytes as the
engine that generated golden/decisions.json."""

from __future__ import annotations

import json

import pytest
from decision_digests import (
    GOLDEN,
    SHARED_CHECKPOINT,
    cases,
    run_case,
    touches_issue_13,
)

GOLDEN_CASES = json.loads(GOLDEN.read_text(encoding="utf-8"))["cases"]


def test_the_golden_file_covers_every_case():
    assert sorted(GOLDEN_CASES) == sorted(case.name for case in cases())


@pytest.mark.parametrize("case", cases(), ids=lambda case: case.name)
def test_plan_and_trace_match_the_golden_digests(case):
    if case.model == "shared-resnet20" and not SHARED_CHECKPOINT.is_file():
        pytest.skip("../shared/checkpoints is not present")
    assert not touches_issue_13(case)
    assert run_case(case) == GOLDEN_CASES[case.name]
