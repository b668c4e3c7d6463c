"""Fuzz suite for files users bring: crafted checkpoints, generated here in temporary folders, must
never run code (a marker file that a payload would write must never appear), never allocate
what the file does not hold (size bombs run in a subprocess under a memory cap, so a regression
fails the test instead of the machine), and always end in one clear error rather than a crash."""

from __future__ import annotations

import collections
import copy
import importlib
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.common.errors import ArchitectureError, CheckpointError, ConfigError, WorkbenchError
from engine.config import RunConfig
from engine.formats.checkpoints import load_checkpoint, save_checkpoint
from engine.gkp.planner import plan_pruning
from engine.gkp.prune_config import PruneConfig
from engine.gkp.reconstruct import apply_plan
from engine.models.architectures import ArchSpec
from engine.models.normalization import Normalization, parse_normalization

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_models" / "resnet20_digits.pt"
# Address space for the subprocess: a normal prune run of the sample peaks at 3.7-3.8 GiB of
# virtual memory (3.1 GiB of it reserved by importing torch) and fails below ~3.5 GiB.
MEMORY_CAP = int(4.5 * 2**30)

PAYLOAD = '''
from pathlib import Path
from torch import nn

Path({marker!r}).write_text("imported")


def make(num_classes=10, in_channels=1):
    Path({marker!r}).write_text("called")
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))


def tiny(num_classes=10, in_channels=1):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3))
'''


@pytest.fixture
def marker(tmp_path: Path) -> Any:
    """The file every payload would write; it must not exist when a test ends."""
    path = tmp_path / "MARK"
    yield path
    assert not path.exists(), f"a crafted file ran code: {path.read_text()}"


@pytest.fixture
def payload_module(tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module whose import and factory both write the marker: code that *could*
    run if a loader imported what a file names."""
    name = "fuzz_payload_" + "".join(c for c in tmp_path.name if c.isalnum())
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{name}.py").write_text(textwrap.dedent(PAYLOAD.format(marker=str(marker))))
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


@pytest.fixture(scope="module")
def sample_record() -> dict[str, Any]:
    """The bundled sample checkpoint as the plain record a crafted file is made from."""
    return torch.load(SAMPLE, weights_only=True)


@pytest.fixture(scope="module")
def pruned_record(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real pruned workbench checkpoint of the sample (grouped layers and plan)."""
    loaded = load_checkpoint(SAMPLE)
    plan = plan_pruning(loaded.model, PruneConfig())
    path = tmp_path_factory.mktemp("pruned") / "pruned.pt"
    save_checkpoint(path, apply_plan(loaded.model, plan, form="grouped"), loaded.arch, loaded.normalization, plan=plan)
    return torch.load(path, weights_only=True)


def crafted(tmp_path: Path, name: str, record: Any) -> Path:
    path = tmp_path / name
    torch.save(record, path)
    return path


# --- case 1: a file never chooses code to import or call ------------------------------------------


@pytest.mark.parametrize("factory", ["os:system", "subprocess:getoutput", "subprocess:Popen", "payload"])
def test_a_stored_factory_never_runs(factory: str, tmp_path: Path, marker: Path, payload_module: str,
                                     sample_record: dict[str, Any]) -> None:
    name, params = {
        "os:system": ("os:system", {"command": f"touch {marker}"}),
        "subprocess:getoutput": ("subprocess:getoutput", {"cmd": f"touch {marker}"}),
        "subprocess:Popen": ("subprocess:Popen", {"args": ["touch", str(marker)]}),
        "payload": (f"{payload_module}:make", {"num_classes": 10, "in_channels": 1}),
    }[factory]
    path = crafted(tmp_path, "evil.pt", {**sample_record, "arch": {"family": "custom", "name": name, "params": params}})
    with pytest.raises(ArchitectureError, match=f"name it yourself with --arch {name}"):
        load_checkpoint(path)
    assert payload_module not in sys.modules


def test_a_factory_the_user_names_runs(tmp_path: Path, payload_module: str, marker: Path) -> None:
    """The positive control: the same kind of file loads, and its code runs, once the user names
    the factory (or allows code from files) for this run."""
    module = importlib.import_module(payload_module)
    model = module.tiny()
    spec = ArchSpec("custom", f"{payload_module}:tiny", {"num_classes": 10, "in_channels": 1})
    path = tmp_path / "custom.pt"
    save_checkpoint(path, model, spec, Normalization((0.5,), (0.25,)))
    with pytest.raises(ArchitectureError, match=f"--arch {payload_module}:tiny"):
        load_checkpoint(path)
    assert load_checkpoint(path, arch=f"{payload_module}:tiny").arch == spec
    assert load_checkpoint(path, trust_pickle=True).arch == spec
    assert marker.read_text() == "imported"
    marker.unlink()


def test_a_whole_model_pickle_never_runs_its_reduce(tmp_path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    path = crafted(tmp_path, "reduce.pt", {"state_dict": {"w": torch.zeros(2)}, "hook": Payload()})
    with pytest.raises(WorkbenchError):
        load_checkpoint(path)


# --- case 2: stored sizes are checked before anything is allocated -----------------------------------

SUBPROCESS = '''
import contextlib, io, json, resource, sys
cap, cases = int(sys.argv[1]), json.loads(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from engine.formats.checkpoints import load_checkpoint
from workbench.cli import main
results = {}
for name, argv in cases.items():
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv) if argv[0] != "load" else load_checkpoint(argv[1]) and 0
    except BaseException as exc:
        code = f"{type(exc).__name__}: {str(exc)[:200]}"
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
'''


def _bomb_archive(path: Path) -> None:
    """A TMI snapshot archive whose header for the first weight declares 36 x 10^6 x 10^6 bytes
    over a few stored ones."""
    arrays = {"format": np.array("gkp-snapshots"), "version": np.array(1), "epochs": np.arange(35, 71),
              "names": np.array(["layer1.0.conv1.weight"]), "final_l1": np.zeros(1), "scales": np.zeros((36, 1), np.float32)}
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, value)
            archive.writestr(f"{key}.npy", buffer.getvalue())
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, {"descr": "|i1", "fortran_order": False, "shape": (36, 10**6, 10**6)})
        archive.writestr("q0.npy", buffer.getvalue() + b"\0" * 64)


def test_size_bombs_fail_cleanly_under_a_memory_cap(tmp_path: Path, sample_record: dict[str, Any],
                                                    pruned_record: dict[str, Any]) -> None:
    def with_arch(**params: Any) -> dict[str, Any]:
        record = copy.deepcopy(sample_record)
        record["arch"]["params"].update(params)
        return record

    wide_plan = copy.deepcopy(pruned_record)
    wide_plan["plan"]["layers"][0]["out_channels"] = 10**9
    shared_plan = copy.deepcopy(pruned_record)
    kept = list(range(10_000))
    shared_plan["plan"]["layers"][0]["kept_channels"] = [kept] * 100_000  # 10^9 entries expanded, ~1 MB stored
    view = dict(sample_record["state_dict"])
    view["conv1.weight"] = torch.zeros(1).expand(16, 100_000, 3, 3)  # a view over one stored value
    _bomb_archive(tmp_path / "bomb.npz")
    files = {
        "plan out_channels": crafted(tmp_path, "wide_plan.pt", wide_plan),
        "plan shared lists": crafted(tmp_path, "shared_plan.pt", shared_plan),
        "arch width": crafted(tmp_path, "width.pt", with_arch(width=100_000)),
        "arch depth": crafted(tmp_path, "depth.pt", with_arch(depth=6 * 10**6 + 2)),
        "tensor view": crafted(tmp_path, "view.pt", view),
    }
    cases = {name: [str(path), "--batch", "--stages", "prune", "--quiet", "--normalize", "0.3,0.3",
                    "--out", str(tmp_path / "out")] for name, path in files.items()}
    cases["snapshot archive"] = ["--batch", "--method", "tmi-gkp", "--snapshots", str(tmp_path / "bomb.npz"),
                                 "--stages", "prune", "--quiet", "--out", str(tmp_path / "out")]
    normal = crafted(tmp_path, "normal_pruned.pt", pruned_record)
    cases["normal sample (control)"] = ["load", str(SAMPLE)]
    cases["normal pruned (control)"] = ["load", str(normal)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SUBPROCESS, str(MEMORY_CAP), json.dumps(cases)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.splitlines()[-1])
    expected = {"plan out_channels": "channel counts and kernel size must be whole numbers within 65536",
                "plan shared lists": "expands to more than",
                "arch width": "arch.params.width must be a whole number from 1 to 1024, got 100000",
                "arch depth": "depth 6n+2 up to 1202", "tensor view": "over 1 stored values",
                "snapshot archive": "declares more data than the archive holds"}
    for name, phrase in expected.items():
        code, stderr = results[name]
        assert code == 2 and stderr.startswith("error: ") and phrase in stderr, (name, code, stderr)
        assert len(stderr.strip().splitlines()) == 1, (name, stderr)
    assert results["normal sample (control)"][0] == 0 and results["normal pruned (control)"][0] == 0, results
    assert not (tmp_path / "out").exists()


def test_oversized_config_values_are_refused() -> None:
    for key, value in [("data.image_size", 100_000), ("deploy.latency_batch", 1_000_000), ("run.seed", 2**70),
                       ("prune.ticket_window", [0, 10**15])]:
        config = RunConfig()
        config.set(key, value)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config.validate()


# --- case 5: odd objects inside a state dict ----------------------------------------------------------


def test_attributes_on_a_pickled_ordered_dict_shadow_nothing(tmp_path: Path, sample_record: dict[str, Any]) -> None:
    state = collections.OrderedDict(sample_record["state_dict"])
    state.__dict__.update(keys=5, get=3, values=4, _metadata=7)
    wrapper = collections.OrderedDict(state_dict=state, epoch=3)
    wrapper.__dict__.update(get=1, keys=2)
    for record in (state, wrapper):
        loaded = load_checkpoint(crafted(tmp_path, "odd.pt", record))
        assert list(loaded.state_dict) == list(sample_record["state_dict"])
        assert all(torch.equal(loaded.state_dict[k], v) for k, v in sample_record["state_dict"].items())


def test_circular_and_deeply_nested_data_is_refused(tmp_path: Path, sample_record: dict[str, Any]) -> None:
    loop: list[Any] = []
    loop.append(loop)
    deep: list[Any] = []
    for _ in range(150):
        deep = [deep]
    for name, extra in (("loop.pt", loop), ("deep.pt", deep)):
        with pytest.raises(CheckpointError, match="nested circularly or more than 100 deep"):
            load_checkpoint(crafted(tmp_path, name, {**sample_record, "metadata": {"x": extra}}))


# --- case 9: values that would be cast or break the report ------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    (lambda sd: sd.update({"conv1.weight": sd["conv1.weight"].to(torch.complex64)}), "conv1.weight as a torch.complex64"),
    (lambda sd: sd.update({"conv1.weight": sd["conv1.weight"].to(torch.int8)}), "stores conv1.weight as torch.int8"),
    (lambda sd: sd.update({"bn1.num_batches_tracked": torch.tensor(1.5)}), "bn1.num_batches_tracked as torch.float32"),
    (lambda sd: sd["layer2.0.conv1.weight"].view(-1)[3].fill_(float("nan")), "NaN or infinite values in layer2.0.conv1.weight"),
    (lambda sd: sd["bn1.running_var"].fill_(float("inf")), "NaN or infinite values in bn1.running_var"),
])
def test_weights_must_be_finite_real_numbers_of_the_models_kind(change: Any, message: str, tmp_path: Path,
                                                                 sample_record: dict[str, Any]) -> None:
    record = copy.deepcopy(sample_record)
    change(record["state_dict"])
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(crafted(tmp_path, "odd.pt", record))


@pytest.mark.parametrize("text", ["nan,nan", "0.5,inf", "0.5,-1", "inf,0.5", "0.1,0.2,0.3/0.1,nan,0.1"])
def test_normalisation_must_be_finite_with_positive_std(text: str, tmp_path: Path, sample_record: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="must be (positive )?finite"):
        parse_normalization(text)
    mean, std = text.split("/") if "/" in text else text.split(",")
    record = {**sample_record, "normalization": {"mean": [float(v) for v in mean.split(",")],
                                                  "std": [float(v) for v in std.split(",")]}}
    with pytest.raises(CheckpointError, match="damaged gkp-workbench checkpoint: normalisation"):
        load_checkpoint(crafted(tmp_path, "norm.pt", record))
