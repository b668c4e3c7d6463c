"""Headless batch mode end to end: outputs, report consistency, exit codes, resume, bad input."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch

from engine import pipeline
from engine import report as report_module
from engine.common.progress import Progress
from engine.config import RunConfig
from engine.data.datasets import load_data
from engine.formats.checkpoints import load_checkpoint
from engine.gkp.plan import PrunePlan
from engine.robustness.attacks import evaluate_robustness
from sample_models import SAMPLE_CHECKPOINT, SAMPLE_SNAPSHOTS
from workbench import batch
from workbench.cli import build_parser, main

QUICK = ["--epochs", "1", "--max-examples", "48"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small evaluation settings so each end-to-end run takes seconds."""
    path = tmp_path_factory.mktemp("config") / "quick.toml"
    path.write_text(
        "[evaluate]\nthresholds = [8]\nseverities = [3]\nbatch_size = 48\n"
        "[deploy]\nform = \"grouped\"\n[prune]\nrecalibrate_images = 256\n"
    )
    return path


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


class _Ticking(datetime):
    """A clock a second further on at every reading: reports built twice would differ."""

    calls = 0

    @classmethod
    def now(cls, tz=None):  # type: ignore[override]
        cls.calls += 1
        return datetime(2025, 1, 1, tzinfo=tz) + timedelta(seconds=cls.calls)


@pytest.mark.parametrize("method", ["sr-gkp", "tmi-gkp"])
def test_sample_end_to_end(method: str, tmp_path: Path, quick_config: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_module, "datetime", _Ticking)  # printed report == written report, always
    out = tmp_path / "run"
    code, stdout, stderr = run(["--batch", "--method", method, "--config", str(quick_config),
                                "--out", str(out), "--json", *QUICK], capsys)
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report == json.loads((out / "report.json").read_text())
    for name in ("plan.json", "decisions.jsonl", "pruned.pt", "finetuned.pt", "config.toml", "log.txt",
                 "finetune/last.pt", "finetune/best_benign.pt"):
        assert (out / name).is_file(), name
    prune, model = report["prune"], report["model"]
    assert report["stages_completed"] == ["prune", "finetune", "evaluate"]
    assert prune["method"] == method and model["params"] == prune["params_before"]
    assert prune["params_after"] < model["params"] and prune["macs_after"] < model["macs"]
    assert prune["macs_reduction"] == pytest.approx(1 - prune["macs_after"] / model["macs"])
    # 43.75% of the 18 pruned 3x3 layers' MACs, counted by hand: at 32x32, 16x16 and 8x8 every
    # layer but the two strided ones costs 16*16*9*1024 = 2,359,296; the strided ones half that.
    assert prune["macs_after"] == model["macs"] - 0.4375 * 17 * 2_359_296
    assert prune["equivalence_max_abs_err"] < 1e-4
    assert [s["name"] for s in prune["layers_skipped"]] == ["conv1"]
    steps = prune["step_seconds"]
    assert set(steps) == {"plan", "recalibrate", "rebuild", "check", "latency"} and steps["plan"] == prune["seconds"]
    assert all(seconds > 0 for seconds in steps.values())
    plan = PrunePlan.load(out / "plan.json")
    assert len(plan.layers) == len(prune["layers"]) == 18
    assert all(layer.kept == round(0.5625 * layer.in_channels) for layer in plan.layers)
    evaluation = report["evaluate"]
    assert evaluation["n_examples"] == 48 and set(evaluation["attacks"]) == {"fgsm-0.01", "fgsm-0.1", "pgd-8/255"}
    # The report's figures are what the saved model scores on those 48 examples, probes included.
    finetuned = load_checkpoint(out / "finetuned.pt")
    again = evaluate_robustness(finetuned.model, finetuned.normalization, load_data("digits").test,
                                saved_attacks(out), device="cpu", max_examples=48, batch_size=48, seed=0)
    assert (again.clean_acc, {a.label: a.accuracy for a in again.attacks}) == (
        evaluation["clean_acc"], evaluation["attacks"])
    frequency, corruption = evaluation["frequency"], evaluation["corruption"]
    assert frequency["n_examples"] == corruption["n_examples"] == 48
    assert frequency["clean_acc"] == corruption["clean_acc"] == evaluation["clean_acc"]
    assert [row["theta"] for row in frequency["rows"]] == [8]
    assert {r["severity"] for r in corruption["results"]} == {3} and len(corruption["results"]) > 1
    assert corruption["mean_acc"] == pytest.approx(sum(r["accuracy"] for r in corruption["results"])
                                                   / len(corruption["results"]))
    assert corruption["robustness_ratio"] == pytest.approx(corruption["mean_acc"] / corruption["clean_acc"])
    assert evaluation["baseline"]["clean_acc"] > 0.9  # the unpruned sample model
    assert report["deploy"]["latency_ms"]["original"] > 0 and report["environment"]["packages"]["torch"]
    reopened = load_checkpoint(out / "pruned.pt")
    assert PrunePlan.from_dict(reopened.plan).to_json() == plan.to_json()
    first_line = json.loads((out / "decisions.jsonl").read_text().splitlines()[0])
    assert first_line["kind"] in {"layer_skipped", "layer_start"}
    # Pruning collapses the sample to one class; recalibration brings it back, and pruned.pt holds
    # the recalibrated statistics: reopened, it scores exactly the recalibrated accuracy.
    accuracy = prune["accuracy"]
    assert accuracy["n"] == report["data"]["n_val"] == 180 and accuracy["before"] > 0.95
    assert accuracy["raw"] < 0.2 and accuracy["recalibrated"] > 0.85
    assert prune["recalibration"]["images"] == 256 and prune["recalibration"]["layers"] == 19
    assert any("before BatchNorm recalibration: predicts" in w for w in report["warnings"])
    saved = RunConfig.load(out / "config.toml")
    assert (saved.model.checkpoint, saved.model.snapshots, saved.data.spec) == (
        str(SAMPLE_CHECKPOINT), str(SAMPLE_SNAPSHOTS), "digits")
    saved.model.checkpoint, saved.run.stages = str(out / "pruned.pt"), ["prune"]
    ws = pipeline.open_workspace(saved)
    assert pipeline.validation_accuracy(ws, ws.model, "reopened").clean_acc == accuracy["recalibrated"]
    if method == "tmi-gkp":
        assert prune["snapshots"] == {"source": str(SAMPLE_SNAPSHOTS), "epochs": list(range(35, 71))}
    else:
        assert prune["snapshots"] is None


def saved_attacks(out: Path) -> list[str]:
    return RunConfig.load(out / "config.toml").evaluate.attacks


def test_summary_table_on_stdout(tmp_path: Path, quick_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = run(["--batch", "--stages", "prune", "--config", str(quick_config),
                                "--out", str(tmp_path / "run")], capsys)
    assert code == 0, stderr
    assert "MACs after" in stdout and "equivalence max |err|" in stdout
    assert "latency (grouped, batch 1, 8 rounds)" in stdout and " ms (IQR " in stdout
    assert "pruned layers deployed" in stdout and "18 grouped, 0 dense" in stdout
    assert "val accuracy unpruned (n=180)" in stdout
    lines = stderr.splitlines()  # plain lines when stderr is not a terminal, one per tenth at most
    assert any(line.startswith("[plan] resnet20_digits.pt 100.0%") for line in lines), stderr
    assert len([line for line in lines if line.startswith("[plan]")]) <= 11
    for phase in ("recalibrate", "rebuild", "check", "latency"):  # a line per phase of the prune
        assert any(line.startswith(f"[{phase}] resnet20_digits.pt 100.0%") for line in lines), stderr


def test_second_run_without_out_takes_the_next_folder(tmp_path: Path, quick_config: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for number in (1, 2):
        code, stdout, stderr = run(["--batch", "--stages", "prune", "--config", str(quick_config), "--quiet"], capsys)
        assert code == 0, stderr
        assert f"outputs in {Path('runs') / f'sample-{number}'}" in stdout
        assert stderr == ""  # --quiet: no progress lines
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["sample-1", "sample-2"]


def test_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    parser_actions = [a for a in build_parser()._actions if a.option_strings and a.nargs != 0]
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside words
    for action in parser_actions:
        assert "".join(action.help.split()) in text
        assert "(default: " in action.help, action.option_strings
    assert "--method{sr-gkp,tmi-gkp,itp,l1-filter}pruningmethod(default:sr-gkp)" in text


def _printed(events: list[tuple[str, Progress]], tty: bool) -> str:
    stream = io.StringIO()
    stream.isatty = lambda: tty  # type: ignore[method-assign]
    ticks = iter(range(1000))
    printer = batch.ProgressPrinter(stream, clock=lambda: float(next(ticks)))
    for subject, event in events:
        printer.show(subject, event)
    printer.end_line()
    return stream.getvalue()


def test_progress_lines_name_the_model_and_stay_few() -> None:
    steps = [("pruned model", Progress("finetune", i, 200, f"step {i}")) for i in range(201)]
    base = [("unpruned model", Progress("evaluate", i, 4)) for i in range(5)]
    plain = _printed(steps + base, tty=False).splitlines()
    assert len([l for l in plain if l.startswith("[finetune] pruned model")]) == 11  # 0%, 10%, ..., 100%
    assert plain[-1].startswith("[evaluate] unpruned model 100.0% (0:04 elapsed)")
    assert "(0:20 elapsed, ETA 3:00)" in plain[1]  # 10% after 20 ticks: 180 to go
    live = _printed(steps + base, tty=True)
    assert live.count("\n") == 2  # one finished line per stage and model, redrawn in place
    assert live.count("\r") == len(steps) + len(base)


def test_shared_checkpoint_on_real_cifar(shared_checkpoint: Path, shared_cifar: str, tmp_path: Path,
                                        quick_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's done-when: prune,evaluate on the real ResNet-20 and real CIFAR-10 images prints
    raw and recalibrated accuracy, with a collapse warning on the raw one."""
    out = tmp_path / "run"
    code, stdout, stderr = run([str(shared_checkpoint), "--batch", "--stages", "prune,evaluate",
                                "--normalize", "imagenet", "--data", shared_cifar, "--config", str(quick_config),
                                "--out", str(out), "--max-examples", "16"], capsys)
    assert code == 0, stderr
    assert "  pruned, raw " in stdout and "  recalibrated (256 images) " in stdout
    assert "warning: pruned model before BatchNorm recalibration: " in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["version"] == 2 and report["model"]["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert report["model"]["normalization"]["source"] == "set by the user"
    assert report["model"]["params"] == 269_722 and report["data"]["channels"] == 3
    assert report["data"]["spec"] == shared_cifar and report["data"]["n_val"] == 373
    accuracy = report["prune"]["accuracy"]
    assert accuracy["n"] == 373 and accuracy["before"] > 0.9 and accuracy["recalibrated"] > accuracy["raw"] + 0.2
    assert any(w.startswith("pruned model before BatchNorm recalibration") for w in report["warnings"])
    assert not any("after BatchNorm recalibration" in w for w in report["warnings"])
    again = load_checkpoint(out / "pruned.pt")
    assert again.normalization is not None and again.normalization.mean == (0.485, 0.456, 0.406)


def test_no_data_skips_recalibration_and_refuses_data_stages(shared_checkpoint: Path, tmp_path: Path,
                                                             quick_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, stdout, stderr = run([str(shared_checkpoint), "--batch", "--stages", "prune", "--config", str(quick_config),
                                "--out", str(out)], capsys)
    assert code == 0, stderr
    assert "accuracy after pruning" in stdout and "not measured (no data)" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["data"] is None and report["prune"]["accuracy"] is None and report["prune"]["recalibration"] is None
    assert report["prune"]["equivalence_input"].startswith("random images")
    assert any("set the data (--data" in w for w in report["warnings"])
    for stages in ("prune,evaluate", "finetune"):
        code, _, stderr = run([str(shared_checkpoint), "--batch", "--stages", stages, "--normalize", "imagenet",
                               "--out", str(tmp_path / stages)], capsys)
        assert code == 2 and stderr.startswith("error: ") and "--data" in stderr and len(stderr.strip().splitlines()) == 1
        assert not (tmp_path / stages).exists()


def test_sample_data_mismatch_is_refused(shared_cifar: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = run(["--batch", "--stages", "prune", "--data", shared_cifar, "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "3 channels but the model takes 1" in stderr and not (tmp_path / "x").exists()


def test_reopen_pruned_model_in_batch(tmp_path: Path, quick_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = tmp_path / "first"
    assert run(["--batch", "--stages", "prune", "--config", str(quick_config), "--out", str(first)], capsys)[0] == 0
    code, stdout, stderr = run([str(first / "pruned.pt"), "--batch", "--stages", "evaluate", "--config",
                                str(quick_config), "--out", str(tmp_path / "second"), "--json", "--max-examples", "16"], capsys)
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["model"]["params"] < 200_000  # the pruned model, not the dense one
    assert "baseline" not in report["evaluate"]
    assert (report["data"]["spec"], report["data"]["source"]) == ("digits", "recorded in the checkpoint")
    assert RunConfig.load(tmp_path / "second" / "config.toml").data.spec == "digits"


def _bad_checkpoint_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    corrupt = tmp / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    foreign = tmp / "mlp.pt"
    torch.save({"fc1.weight": torch.zeros(4, 3), "fc2.weight": torch.zeros(2, 4)}, foreign)
    toml = tmp / "bad.toml"
    toml.write_text("[prune\nrate = 1\n")
    unknown = tmp / "unknown.toml"
    unknown.write_text("[prune]\nrat = 0.5\n")
    two_devices = tmp / "two_devices.toml"
    two_devices.write_text("[run]\ndevice = \"auto\"\n[finetune]\ndevice = \"cpu\"\n")
    return {
        "malformed device": (["--device", "cuda:-1"], "device must be auto, cpu, cuda or cuda:N"),
        "non-numeric device": (["--device", "cuda:x"], "device must be auto, cpu, cuda or cuda:N"),
        "two devices": (["--config", str(two_devices)], "finetune.device must be auto or the same as run.device"),
        "missing file": ([str(tmp / "nope.pt")], "does not exist"),
        "corrupt file": ([str(corrupt)], "corrupt"),
        "unknown arch": ([str(foreign)], "architecture"),
        "rate out of range": (["--rate", "1.5"], "rate"),
        "groups not dividing": (["--groups", "7"], "groups"),
        "bad TOML": (["--config", str(toml)], "not valid TOML"),
        "unknown key": (["--config", str(unknown)], "unknown key 'rat'"),
        "bad attack": (["--attacks", "fgsn:eps=0.1"], "fgsn"),
        "bad data": (["--data", "mnist"], "digits"),
        "missing normalisation": ([], "normalisation"),
        "NaN normalisation": (["--normalize", "nan,nan"], "normalisation mean values must be finite numbers"),
        "infinite std": (["--normalize", "0.5,inf"], "normalisation std values must be positive finite numbers"),
        "huge seed": (["--seed", str(2**70)], "run.seed must be a whole number from 0 to 4294967295"),
        "unbounded attack steps": (["--attacks", "pgd:steps=1e8"], "steps must be a whole number from 0 to 100000"),
    }


@pytest.mark.parametrize("case", ["missing file", "corrupt file", "unknown arch", "rate out of range",
                                  "groups not dividing", "bad TOML", "unknown key", "bad attack", "bad data",
                                  "malformed device", "non-numeric device", "two devices",
                                  "NaN normalisation", "infinite std", "huge seed", "unbounded attack steps"])
def test_bad_input_exits_2_and_writes_nothing(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args, phrase = _bad_checkpoint_cases(tmp_path)[case]
    out = tmp_path / "out"
    code, stdout, stderr = run([*args, "--batch", "--out", str(out)], capsys)
    assert code == 2
    assert phrase in stderr and stderr.startswith("error: ") and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_normalisation_and_snapshots(shared_checkpoint: Path, shared_cifar: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, stderr = run([str(shared_checkpoint), "--batch", "--data", shared_cifar, "--out", str(out)], capsys)
    assert code == 2 and "normalisation" in stderr and not out.exists()
    code, _, stderr = run([str(shared_checkpoint), "--batch", "--method", "tmi-gkp", "--stages", "prune",
                           "--out", str(out)], capsys)
    assert code == 2 and "snapshots" in stderr and not out.exists()
    code, _, stderr = run(["--batch", "--method", "tmi-gkp", "--stages", "prune", "--snapshots",
                           str(tmp_path), "--out", str(out)], capsys)
    assert code == 2 and "snapshot" in stderr and not out.exists()
    # In-train pruning trains inside the prune stage: it needs data and the normalisation too.
    itp = [str(shared_checkpoint), "--batch", "--method", "itp", "--stages", "prune", "--out", str(out)]
    code, _, stderr = run(itp, capsys)
    assert code == 2 and "in-train pruning needs data" in stderr and not out.exists()
    code, _, stderr = run([*itp, "--data", shared_cifar], capsys)
    assert code == 2 and "normalisation" in stderr and not out.exists()


def test_existing_output_needs_force(tmp_path: Path, quick_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["--batch", "--stages", "prune", "--config", str(quick_config), "--out", str(out)]
    assert run(args, capsys)[0] == 0
    code, _, stderr = run(args, capsys)
    assert code == 2 and "--force" in stderr
    assert run([*args, "--force"], capsys)[0] == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    code, _, stderr = run(["--batch", "--stages", "prune", "--out", str(foreign), "--force"], capsys)
    assert code == 2 and "refusing" in stderr and (foreign / "thesis.tex").read_text() == "precious"


def test_internal_error_exits_1_with_traceback_only_in_log(tmp_path: Path, quick_config: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(batch.pipeline, "evaluate", broken)
    out = tmp_path / "run"
    code, _, stderr = run(["--batch", "--stages", "prune,evaluate", "--config", str(quick_config),
                           "--out", str(out)], capsys)
    assert code == 1
    assert "simulated bug" in stderr and "Traceback" not in stderr
    assert "Traceback" in (out / "log.txt").read_text()
    assert json.loads((out / "state.json").read_text())["completed"] == ["prune"]


def test_interrupt_exits_130_and_resume_finishes(tmp_path: Path, quick_config: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "workbench", "--batch", "--config", str(quick_config), "--out", str(out),
               "--epochs", "2", "--max-examples", "16"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("[finetune]"):
            process.send_signal(signal.SIGINT)
            break
    _, rest = process.communicate(timeout=300)
    assert process.returncode == 130, rest
    assert f"--resume {out}" in rest
    state = json.loads((out / "state.json").read_text())
    assert state["completed"] == ["prune"]
    interrupted = json.loads((out / "report.json").read_text())
    assert interrupted["stages_completed"] == ["prune"]
    pruned = (out / "pruned.pt").read_bytes()
    resumed = subprocess.run([sys.executable, "-m", "workbench", "--resume", str(out), "--json"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["stages_completed"] == ["prune", "finetune", "evaluate"]
    assert [epoch["epoch"] for epoch in report["finetune"]["history"]] == [1, 2]
    # The finished prune stage is kept, not redone: same file, same figures.
    assert (out / "pruned.pt").read_bytes() == pruned
    assert {k: v for k, v in report["prune"].items() if "seconds" not in k and k != "latency_ms"} == {
        k: v for k, v in interrupted["prune"].items() if "seconds" not in k and k != "latency_ms"}
    assert report["evaluate"]["n_examples"] == 16 and (out / "finetuned.pt").is_file()


def test_torchrun_two_processes_match_one(tmp_path: Path, quick_config: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--batch", "--stages", "evaluate", "--config", str(quick_config), "--max-examples", "32",
              "--attacks", "fgsm:eps=0.01;fgsm:eps=0.1", "--json"]
    single = subprocess.run([sys.executable, "-m", "workbench", *common, "--out", str(tmp_path / "one")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "workbench"]
    double = subprocess.run([*launcher, *common, "--out", str(tmp_path / "two")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr
    one, two = json.loads(single.stdout)["evaluate"], json.loads(double.stdout)["evaluate"]
    assert two["n_examples"] == one["n_examples"] == 32
    assert two["clean_acc"] == one["clean_acc"] and two["attacks"] == one["attacks"]  # FGSM is deterministic
    assert two["frequency"]["rows"] == one["frequency"]["rows"]  # the probes are sharded too
    assert two["corruption"]["n_examples"] == one["corruption"]["n_examples"] == 32
    assert json.loads((tmp_path / "two" / "report.json").read_text())["evaluate"]["attacks"] == one["attacks"]
