"""Promises README makes about the command line, each checked: `--help` lists every flag,
`--config RUN/config.toml` reproduces a run, and `--trust-pickle` is what lets a whole-model
pickle run its code (with a payload that really runs when allowed)."""

from __future__ import annotations

import re
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from engine.formats.checkpoints import load_checkpoint
from workbench.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
QUICK = "[evaluate]\nthresholds = [8]\nseverities = [3]\n[deploy]\nform = \"grouped\"\n[prune]\nrecalibrate_images = 64\n"


def test_help_lists_every_flag_and_readme_names_only_real_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    flags = {flag for action in build_parser()._actions for flag in action.option_strings if flag.startswith("--")}
    assert flags - shown == set()  # store_true switches (--batch, --trust-pickle, ...) included
    usage = REPO.joinpath("README.md").read_text().split("## Batch mode", 1)[1].split("```")[1]
    assert set(re.findall(r"--[a-z][a-z-]*", usage)) <= flags


def test_a_runs_config_toml_reproduces_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    quick = tmp_path / "quick.toml"
    quick.write_text(QUICK)
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["--stages", "prune", "--seed", "5", "--selection", "random", "--rate", "0.5", "--quiet"]
    assert main(["--batch", "--config", str(quick), "--out", str(first), *args]) == 0
    assert main(["--batch", "--config", str(first / "config.toml"), "--out", str(second), "--quiet"]) == 0
    capsys.readouterr()
    assert (second / "config.toml").read_text() == (first / "config.toml").read_text()
    assert (second / "plan.json").read_text() == (first / "plan.json").read_text()
    a, b = load_checkpoint(first / "pruned.pt").state_dict, load_checkpoint(second / "pruned.pt").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    default = tmp_path / "default"  # the flags mattered: without them the run differs
    assert main(["--batch", "--config", str(quick), "--out", str(default), "--stages", "prune", "--quiet"]) == 0
    assert (default / "plan.json").read_text() != (first / "plan.json").read_text()


PAYLOAD = '''
from pathlib import Path
import torch
from engine.models.cifar_resnet import CifarResNet

Path({marker!r}).write_text("imported")


class Boxed:
    """A model that only exists after its factory runs: the pickle names the code to call."""

    def __reduce__(self):
        return (build, (8,))


def build(depth):
    Path({marker!r}).write_text("called")
    torch.manual_seed(0)
    return CifarResNet(depth, num_classes=10, in_channels=1)
'''


def test_only_trust_pickle_lets_a_whole_model_pickle_run_its_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    name, marker = "trust_payload_" + uuid.uuid4().hex, tmp_path / "MARK"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PAYLOAD.format(marker=str(marker))))
    monkeypatch.syspath_prepend(str(tmp_path))
    model_path = tmp_path / "boxed.pt"
    torch.save(__import__(name).Boxed(), model_path)
    marker.unlink()
    del sys.modules[name]
    quick = tmp_path / "quick.toml"
    quick.write_text(QUICK)
    args = [str(model_path), "--batch", "--stages", "prune", "--data", "digits", "--normalize", "0.5,0.25",
            "--config", str(quick), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and "allow code from files with --trust-pickle" in stderr and len(stderr.strip().splitlines()) == 1
    assert not marker.exists() and name not in sys.modules  # importable, yet never imported
    assert not (tmp_path / "refused" / "pruned.pt").exists()
    assert main([*args, "--out", str(tmp_path / "trusted"), "--trust-pickle"]) == 0, capsys.readouterr().err
    assert marker.read_text() == "called"
    assert "trust_pickle = true" in (tmp_path / "trusted" / "config.toml").read_text()
    sys.modules.pop(name, None)
