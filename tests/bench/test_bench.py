"""The bench runner's bookkeeping (the benchmarks themselves are scripts, not tests)."""

from bench.__main__ import with_earlier_steps
from bench.prune_speed import render, summarise


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


def test_finetune_throughput_compares_each_round_with_its_own_plain_loop() -> None:
    from bench.finetune_throughput import summarise

    rows = [{"device": "cpu", "loop": loop, "round": r, "images_per_second": rate}
            for r, rates in ((1, (100.0, 90.0, 50.0, 40.0)), (2, (200.0, 190.0, 110.0, 70.0)), (3, (150.0, 160.0, 75.0, 60.0)))
            for loop, rate in zip(("plain", "standard", "fastat", "asam"), rates)]
    summary = {s["loop"]: s for s in summarise(rows)}
    assert summary["plain"]["vs_plain"] == 1.0 and summary["plain"]["median"] == 150.0
    assert summary["standard"]["vs_plain"] == 0.95  # median of 0.9, 0.95, 1.067: not 160 / 150
    assert (summary["asam"]["n"], summary["asam"]["min"], summary["asam"]["max"]) == (3, 40.0, 70.0)


def test_prune_speed_summarises_runs_in_units():
    runs = [
        {"unit_s": 0.5, "command_s": 2.0, "import_s": 1.0, "prune_seconds": 0.5, "peak_rss_mb": 900.0,
         "steps": {"plan": 0.5, "rebuild": 0.25, "check": 0.1, "latency": 0.1}},
        {"unit_s": 1.0, "command_s": 3.0, "import_s": 1.5, "prune_seconds": 0.8, "peak_rss_mb": 950.0,
         "steps": {"plan": 0.8, "rebuild": 0.5, "check": 0.2, "latency": 0.2}},
    ]
    summary = summarise("command:sr-gkp:resnet56", runs)
    assert summary["n"] == 2 and summary["peak_rss_mb"] == 950.0 and summary["target_units"] == 1.0
    assert summary["command_s_units"] == {"median": 3.5, "min": 3.0, "max": 4.0}
    assert summary["step_plan_units"] == {"median": 0.9, "min": 0.8, "max": 1.0}
    row = render({"command:sr-gkp:resnet56": summary}).splitlines()[-1]
    assert row.startswith("| command:sr-gkp:resnet56 | 2 | 0.75 |") and "import 1.75, plan 0.90" in row
    tmi = [{"unit_s": 1.0, "off_s": 4.0, "on_s": 4.2, "replan_s": 0.3, "peak_rss_mb": 900.0},
           {"unit_s": 0.5, "off_s": 2.5, "on_s": 2.6, "replan_s": 0.2, "peak_rss_mb": 800.0}]
    cells = render({"engine:tmi-gkp:sample": summarise("engine:tmi-gkp:sample", tmi)}).splitlines()[-1].split(" | ")
    assert cells[4:6] == ["4.70 (4.20–5.20) (3.40 s)", "0.35 (0.30–0.40) (0.25 s)"]  # trace on, then re-plan


def test_study_methods_resume_skips_finished_units_and_ignores_other_devices(tmp_path, monkeypatch) -> None:
    import json

    from bench import study_methods

    partial = tmp_path / "study_methods.partial.json"
    monkeypatch.setattr(study_methods, "PARTIAL", partial)
    metrics = {"benign": 0.9, "fgsm-0.01": 0.8, "pgd-8/255": 0.5, "relative_robustness": None,
               "sharpness_after_prune": None, "sharpness_final": 0.1, "learned_complexity": None}
    unit = {"dataset": "digits", "row": "unpruned", "seed": 0, "metrics": metrics, "macs": 4e7, "params": 2.7e5,
            "train_seconds": 1.0, "n_test": 359}
    partial.write_text(json.dumps({"device": "cpu", "units": [unit, {"dataset": "nope", "row": "unpruned", "seed": 0}]}))
    assert study_methods.finished_units("cuda") == []
    assert study_methods.finished_units("cpu") == [unit]
    report = study_methods.run_study(["digits"], ["unpruned"], (0, 1), 1, "cpu", "test", resume=True)
    assert report["units"] == [unit] and report["settings"]["resumed_units"] == 1  # nothing left to run
    assert report["summary"][0]["metrics"]["benign"]["mean"] == 0.9
    assert "resumed: 1 units" in study_methods.resumed_note(report["settings"])
    partial.write_text("{not json")
    assert study_methods.finished_units("cpu") == []
