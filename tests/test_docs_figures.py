"""Figures quoted in README come from one source: the TUI row from the generated table in
docs/BENCH.md (written from bench JSON by `python -m bench --docs`), the sample model's row from
sample_models/sample.json and from evaluating the bundled sample here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sample_models import SAMPLE_CHECKPOINT

REPO = Path(__file__).resolve().parents[1]


def readme_row(measure_start: str) -> str:
    """The figure cell of README's headline-table row whose measure starts with the given text."""
    for line in REPO.joinpath("README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith(measure_start):
            return cells[1]
    raise AssertionError(f"README has no headline row starting {measure_start!r}")


def bench_table() -> dict[str, float]:
    """The generated TUI-responsiveness table of docs/BENCH.md, in ms."""
    text = REPO.joinpath("docs", "BENCH.md").read_text()
    generated = text.split("<!-- bench:begin -->", 1)[1].split("<!-- bench:end -->", 1)[0]
    section = generated.split("### TUI responsiveness", 1)[1].split("###", 1)[0]
    return {m[1]: float(m[2]) for m in re.finditer(r"^\| (\w+) \| ([\d.]+) \|", section, re.M)}


def test_readme_tui_figures_are_bench_mds() -> None:
    table = bench_table()
    first, listed, heatmap, stall = (part.strip() for part in readme_row("TUI on the sample").split("(")[0].split("/"))
    assert first == f"{table['sample_first_screen'] / 1000:.2f} s"
    assert listed == f"{table['sample_layers_visible'] / 1000:.2f} s"
    assert heatmap == f"{table['heatmap_512_first_render']:.0f} ms"
    assert stall == f"{table['finetune_max_stall']:.0f} ms"


@pytest.mark.slow
def test_readme_sample_accuracies_are_measured_ones() -> None:
    from engine.data.datasets import load_data
    from engine.formats.checkpoints import load_checkpoint
    from engine.robustness.attacks import evaluate_robustness

    cell = readme_row("sample model (digits) clean")
    quoted = [float(v) for v in cell.split("%")[0].split("/")]
    n = int(re.search(r"n = (\d+)", cell).group(1))  # type: ignore[union-attr]
    recorded = json.loads(SAMPLE_CHECKPOINT.with_name("sample.json").read_text())
    assert (quoted[0], n) == (round(100 * recorded["test_acc"], 1), recorded["n_test"])
    sample = load_checkpoint(SAMPLE_CHECKPOINT)
    report = evaluate_robustness(sample.model, sample.normalization, load_data("digits").test,
                                 ["fgsm:eps=0.01", "fgsm:eps=0.1", "pgd:eps=8/255,alpha=2/255,steps=3"], device="cpu")
    measured = [report.clean_acc, *(a.accuracy for a in report.attacks)]
    assert report.n_examples == n and quoted == [round(100 * acc, 1) for acc in measured]
