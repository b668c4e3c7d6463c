"""Batch mode with the methods beyond GKP: in-train pruning, L1 filters and AdaSAP's stages, on
the sample with a small train split; their report keys, reopening their checkpoints, resuming an
interrupted warmup, and bad values exiting 2 with one line."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import pytest
from torch.utils.data import Subset

from engine import pipeline
from engine.common.errors import Cancelled
from engine.config import RunConfig
from engine.formats.checkpoints import load_checkpoint
from engine.gkp.plan import PrunePlan
from engine.gkp.traces import read_jsonl
from sample_models import use_sample_when_unset
from workbench import batch
from workbench.cli import main
from workbench.run_folder import RunFolder

QUICK_TOML = (
    "[evaluate]\nthresholds = [8]\nseverities = [3]\nbatch_size = 48\nmax_examples = 32\nbaseline = false\n"
    "attacks = [\"fgsm:eps=0.01\"]\n[deploy]\nform = \"grouped\"\n"
    "[sharpness]\nimages = 32\nsteps = 2\n[finetune]\nbatch_size = 32\neval_max_examples = 32\n"
)


@pytest.fixture
def small_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """The digits split with 96 training and 32 validation images, so training stages take seconds."""
    real = pipeline.load_data

    def load(*args, **kwargs):
        bundle = real(*args, **kwargs)
        return dataclasses.replace(bundle, train=Subset(bundle.train, range(96)), val=Subset(bundle.val, range(32)))

    monkeypatch.setattr(pipeline, "load_data", load)


@pytest.fixture
def quick(tmp_path: Path) -> Path:
    path = tmp_path / "quick.toml"
    path.write_text(QUICK_TOML)
    return path


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict | None, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 and out.startswith("{") else None, err


def test_itp_end_to_end(small_data: None, quick: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, report, err = run(["--batch", "--method", "itp", "--itp-epochs", "2", "--hw-weight", "200000",
                             "--stages", "prune,evaluate", "--config", str(quick), "--out", str(out), "--json"], capsys)
    assert code == 0, err
    prune = report["prune"]
    assert prune["method"] == "itp" and prune["granularity"] == "grouped-kernel"
    assert abs(prune["macs_after"] - prune["target_macs"]) / prune["target_macs"] <= 0.02
    assert prune["macs_after"] == prune["macs_deployed"]  # grouped-kernel masks deploy as grouped convs
    assert prune["itp"]["target_met"] and prune["equivalence_max_abs_err"] < 1e-4
    assert [r["epoch"] for r in prune["itp"]["training"]["history"]] == [1, 2]
    # The trained, masked model is recalibrated and measured like any pruned model.
    assert prune["accuracy"]["recalibrated"] is not None and prune["recalibration"]["layers"] == 19
    assert set(prune["step_seconds"]) == {"plan", "recalibrate", "rebuild", "check", "latency"}
    assert (out / "prune" / "last.pt").is_file()
    reopened = load_checkpoint(out / "pruned.pt")
    assert PrunePlan.from_dict(reopened.plan).to_json() == PrunePlan.load(out / "plan.json").to_json()
    kinds = {e.kind for e in read_jsonl(out / "decisions.jsonl")}
    assert {"mask_setup", "mask_epoch", "mask_freeze", "layer_done"} <= kinds
    assert report["evaluate"]["relative_robustness"] == report["evaluate"]["corruption"]["robustness_ratio"]


def test_kernel_masks_and_l1_filters_reopen(small_data: None, quick: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kernel"
    code, report, err = run(["--batch", "--method", "itp", "--granularity", "kernel", "--itp-epochs", "1",
                             "--stages", "prune", "--config", str(quick), "--out", str(out), "--json"], capsys)
    assert code == 0, err
    kernel = report["prune"]
    assert kernel["macs_after"] < kernel["macs_deployed"]  # zeroed weights are still computed
    plan = PrunePlan.load(out / "plan.json")
    assert plan.version == 2 and len(plan.masks) == 18 and not plan.layers
    code, again, err = run([str(out / "pruned.pt"), "--batch", "--stages", "evaluate", "--config", str(quick),
                            "--out", str(tmp_path / "kernel-eval"), "--json"], capsys)
    assert code == 0, err
    out = tmp_path / "l1"
    code, report, err = run(["--batch", "--method", "l1-filter", "--stages", "prune", "--config", str(quick),
                             "--out", str(out), "--json"], capsys)
    assert code == 0, err
    prune = report["prune"]
    assert prune["method"] == "l1-filter" and abs(prune["macs_after"] / prune["target_macs"] - 1) <= 0.01
    assert prune["params_after"] < 0.7 * report["model"]["params"]  # filters removed physically
    # Narrowed BatchNorm layers get the recalibrated statistics of their kept channels.
    assert prune["accuracy"]["recalibrated"] is not None and prune["equivalence_max_abs_err"] < 1e-4
    assert kernel["accuracy"]["before"] == prune["accuracy"]["before"]  # both against the model as opened
    reopened = load_checkpoint(out / "pruned.pt")
    assert sum(p.numel() for p in reopened.model.parameters()) == prune["params_after"]


def test_adasap_end_to_end_with_sharpness(small_data: None, quick: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, report, err = run(["--batch", "--stages", "warmup,prune,finetune", "--warmup-epochs", "1",
                             "--epochs", "1", "--config", str(quick), "--out", str(out), "--json"], capsys)
    assert code == 0, err
    assert report["stages_completed"] == ["warmup", "prune", "finetune"]
    assert report["warmup"]["epochs"] == 1 and report["prune"]["progressive"]["steps"] == 1
    sharp = report["sharpness"]
    assert all(sharp[k] >= 0 for k in ("before_prune", "after_prune", "after_finetune"))
    finetune = report["finetune"]
    assert (finetune["mode"], finetune["rho"], finetune["sam_partition"]) == ("asam", 2.0, "global")
    kinds = [e.kind for e in read_jsonl(out / "decisions.jsonl")]
    assert kinds[0] == "rho_epoch" and {"sharpness", "progressive_prune", "final_choice"} <= set(kinds)
    assert (out / "warmed.pt").is_file() and (out / "warmup" / "last.pt").is_file()


def test_interrupted_warmup_resumes(small_data: None, quick: Path, tmp_path: Path) -> None:
    config = RunConfig.load(quick)
    use_sample_when_unset(config)
    config.run.stages = ["warmup"]
    config.warmup.epochs = 2
    cancel = threading.Event()

    class StopAfterEpochOne(batch.ProgressPrinter):
        def show(self, subject, event) -> None:
            if event.metrics.get("epoch_done") and event.metrics.get("epoch") == 1:
                cancel.set()

    out = tmp_path / "run"
    folder = RunFolder.for_run(out, name="sample", force=False)
    try:
        with pytest.raises(Cancelled), open(os.devnull, "w") as sink:
            batch.run_batch(config, folder, resume=False, progress=StopAfterEpochOne(sink), cancel=cancel)
    finally:
        folder.close()
    assert json.loads((out / "state.json").read_text())["completed"] == []
    folder = RunFolder.for_resume(out)
    try:
        report = batch.run_batch(RunConfig.load(out / "config.toml"), folder, resume=True, progress=None,
                                 cancel=threading.Event())
    finally:
        folder.close()
    assert [r["epoch"] for r in report["warmup"]["history"]] == [1, 2]
    assert report["stages_completed"] == ["warmup"]


@pytest.mark.parametrize(("args", "phrase"), [
    (["--method", "itp", "--grouping", "random"], "prune.grouping and prune.selection apply to"),
    (["--method", "itp", "--itp-epochs", "0"], "itp.epochs"),
    (["--granularity", "filter"], "invalid choice"),
    (["--warmup-epochs", "-1", "--stages", "warmup,prune"], "warmup.epochs"),
    (["--stages", "warmup,prune,polish"], "run.stages"),
])
def test_bad_method_values_exit_2_with_one_line(args: list[str], phrase: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    try:
        code = main(["--batch", "--out", str(out), *args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and phrase in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error")]) == 1 and not out.exists()
