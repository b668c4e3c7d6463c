"""The bench runner's bookkeeping (the benchmarks themselves are scripts, not tests)."""

from bench.__main__ import with_earlier_steps


def test_a_partial_bench_run_keeps_the_other_steps_results() -> None:
    earlier = {
        "command": "python -m bench", "seconds": 600.0,
        "steps": [{"step": "prune", "status": "ok", "seconds": 300.0}, {"step": "tui", "status": "ok", "seconds": 60.0},
                  {"step": "study", "status": "failed: RuntimeError: boom", "seconds": 1.0}],
        "data": {"prune": {"old": 1}, "tui": {"old": 2}},
    }
    now = {"command": "python -m bench --steps tui --docs", "seconds": 50.0,
           "steps": [{"step": "tui", "status": "ok", "seconds": 50.0}], "data": {"tui": {"new": 3}}}
    merged = with_earlier_steps(now, earlier)
    assert [s["step"] for s in merged["steps"]] == ["prune", "tui"]  # the failed study had no data to keep
    assert merged["data"] == {"prune": {"old": 1}, "tui": {"new": 3}}
    assert merged["seconds"] == 350.0
    assert merged["command"] == "python -m bench, then python -m bench --steps tui --docs"
    assert with_earlier_steps(now, None) is now
