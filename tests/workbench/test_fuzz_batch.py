"""Fuzz suite for the batch runner driven as an attacker or a careless user would: `--force` only
ever removes what a run wrote, input found bad at any point leaves a previous run intact, every
input or environment failure is exit 2 with one line, an interrupt at any moment is 130, one
writer per run folder, no temporary file outlives a failure, and a run folder never chooses code."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from workbench import batch
from workbench.cli import main
from workbench.run_folder import MANIFEST

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "sample_models" / "resnet20_digits.pt"
QUICK_TOML = '[evaluate]\nthresholds = [8]\nseverities = [3]\nbatch_size = 48\n[deploy]\nform = "grouped"\n'
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "quick.toml"
    path.write_text(QUICK_TOML)
    return path


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory: pytest.TempPathFactory, quick: Path) -> Path:
    """A finished prune run: the previous run each test copies and must not lose."""
    out = tmp_path_factory.mktemp("previous") / "run"
    assert main(["--batch", "--stages", "prune", "--config", str(quick), "--out", str(out), "--quiet"]) == 0
    return out


def copy_run(previous_run: Path, folder: Path) -> Path:
    shutil.copytree(previous_run, folder, symlinks=True)
    return folder


def tree(root: Path) -> dict[str, bytes]:
    """Every file and link under `root` with its content (a link: its target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path.relative_to(root))] = os.readlink(path).encode()
        elif path.is_file():
            found[str(path.relative_to(root))] = path.read_bytes()
    return found


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def assert_one_line(stderr: str, phrase: str) -> None:
    assert stderr.startswith("error: ") and phrase in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make `folder` unwritable: by mode for a user, by the immutable flag for root (whom modes
    do not stop); skips where neither is possible."""
    root = os.geteuid() == 0
    if root:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("cannot make a folder read-only for root here (no chattr +i)")
    else:
        folder.chmod(0o555)
    try:
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


# --- case 3: --force removes only what a run wrote ---------------------------------------------------


@pytest.mark.parametrize("case", ["state.json is not a marker", "manifest lists a path outside", "unlisted file",
                                  "listed file is a link", "listed folder is a link", "damaged manifest"])
def test_force_never_deletes_what_no_run_wrote(case: str, tmp_path: Path, previous_run: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "outside.txt").write_text("keep")
    folder = tmp_path / "d"
    if case == "state.json is not a marker":
        folder.mkdir()
        (folder / "notes.txt").write_text("x")
        (folder / "state.json").write_text("{}")
    else:
        copy_run(previous_run, folder)
        manifest = json.loads((folder / MANIFEST).read_text())
        if case == "manifest lists a path outside":
            manifest["files"].append("../outside.txt")
        elif case == "unlisted file":
            (folder / "notes.txt").write_text("mine")
        elif case == "listed file is a link":
            (folder / "pruned.pt").unlink()
            (folder / "pruned.pt").symlink_to(tmp_path / "outside.txt")
        elif case == "listed folder is a link":
            (tmp_path / "elsewhere").mkdir()
            (tmp_path / "elsewhere" / "last.pt").write_text("keep")
            (folder / "finetune").symlink_to(tmp_path / "elsewhere")
            manifest["files"].append("finetune/last.pt")
        (folder / MANIFEST).write_text("[" if case == "damaged manifest" else json.dumps(manifest))
    before = tree(tmp_path)
    code, stderr = run(["--batch", "--stages", "prune", "--out", str(folder), "--force", "--quiet"], capsys)
    assert code == 2
    assert_one_line(stderr, "refusing to delete")
    assert tree(tmp_path) == before


# --- case 4: bad input found after the checks of the folder leaves the previous run intact -----------------


@pytest.mark.parametrize("case", ["unknown exclude", "NaN weights", "negative threshold", "NaN normalisation"])
def test_input_found_bad_late_leaves_the_previous_run_intact(case: str, tmp_path: Path, previous_run: Path,
                                                              quick: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    config = inputs / "bad.toml"
    config.write_text(QUICK_TOML)
    args = ["--batch", "--stages", "prune", "--quiet", "--config", str(config)]
    if case == "unknown exclude":
        config.write_text(QUICK_TOML + '[prune]\nexclude = ["layer9.conv"]\n')
    elif case == "NaN weights":
        record = torch.load(SAMPLE, weights_only=True)
        record["state_dict"]["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
        torch.save(record, inputs / "nan.pt")
        args.append(str(inputs / "nan.pt"))
    elif case == "negative threshold":
        config.write_text(QUICK_TOML.replace("thresholds = [8]", "thresholds = [-1]"))
    else:
        args += ["--normalize", "nan,nan"]
    folder = copy_run(previous_run, tmp_path / "d")
    before = tree(tmp_path)
    code, stderr = run([*args, "--out", str(folder), "--force"], capsys)
    assert code == 2
    assert_one_line(stderr, {"unknown exclude": "layer9.conv", "NaN weights": "NaN", "negative threshold": "thresholds",
                             "NaN normalisation": "finite"}[case])
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["d", "inputs"]
    code, stderr = run([*args, "--out", str(tmp_path / "fresh")], capsys)
    assert code == 2 and not (tmp_path / "fresh").exists()


def test_force_replaces_a_run_by_a_swap_and_lists_every_file(tmp_path: Path, previous_run: Path, quick: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_run(previous_run, tmp_path / "d")
    (folder / ".decisions.jsonl.k1ll3d.tmp").write_text("left by a killed run")
    old_inode = folder.stat().st_ino
    code, stderr = run(["--batch", "--stages", "prune", "--config", str(quick), "--out", str(folder), "--force",
                        "--quiet", "--rate", "0.25"], capsys)
    assert code == 0, stderr
    assert folder.stat().st_ino != old_inode  # built beside the old run and swapped in
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # neither folder of the swap is left
    listed = json.loads((folder / MANIFEST).read_text())["files"]
    assert sorted(listed) == sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != MANIFEST)
    assert json.loads((folder / "report.json").read_text())["prune"]["rate"] == 0.25


# --- case 5: input and environment failures are exit 2 with one line ----------------------------------------


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"completed": "prune"}', b'{"completed": [1]}',
                                     b'{"completed": ["evaluate"]}', b'{"completed": [], "results": []}',
                                     b'{"completed": [], "results": {"prune": 1}}', b"\xff\xfe"])
def test_resume_with_a_damaged_state_is_bad_input(content: bytes, tmp_path: Path, previous_run: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_run(previous_run, tmp_path / "d")
    (folder / "state.json").write_bytes(content)
    before = tree(tmp_path)
    code, stderr = run(["--resume", str(folder), "--quiet"], capsys)
    assert code == 2
    assert_one_line(stderr, "cannot be resumed")
    assert tree(tmp_path) == before


def test_paths_that_are_not_utf8_are_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / os.fsdecode(b"model-\xff.pt")
    shutil.copy(SAMPLE, model)
    for args, phrase in (([str(model), "--out", str(tmp_path / "run")], "model.checkpoint must be UTF-8 text"),
                         (["--out", str(tmp_path / os.fsdecode(b"run-\xfe"))], "the output folder must be UTF-8 text")):
        code, stderr = run([*args, "--batch", "--stages", "prune", "--quiet"], capsys)
        assert code == 2
        assert_one_line(stderr, phrase)
    assert [p.name for p in tmp_path.iterdir()] == [model.name]


def test_unusable_output_paths_are_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile.txt").write_text("x")
    args = ["--batch", "--stages", "prune", "--quiet", "--out"]
    code, stderr = run([*args, str(tmp_path / "afile.txt" / "sub")], capsys)
    assert code == 2
    assert_one_line(stderr, "afile.txt is not a folder")
    parent, immutable = tmp_path / "read-only", tmp_path / "immutable"
    parent.mkdir()
    immutable.mkdir()
    with read_only(parent), read_only(immutable):
        code, stderr = run([*args, str(parent / "run")], capsys)
        assert code == 2
        assert_one_line(stderr, "is not writable")
        code, stderr = run([*args, str(immutable)], capsys)
        assert code == 2
        assert_one_line(stderr, "is not writable")
    assert not (parent / "run").exists() and not list(immutable.iterdir())


def test_a_write_refused_by_the_system_is_bad_input(tmp_path: Path, quick: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A folder that passes the checks but refuses the first write (a race, a file system that
    lies about permissions) still ends in one line, with nothing left behind."""
    real_mkstemp = batch.tempfile.mkstemp

    def refused(*args: object, **kwargs: object) -> tuple[int, str]:
        if str(tmp_path) in str(kwargs.get("dir", "")):
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("engine.common.fileio.tempfile.mkstemp", refused)
    out = tmp_path / "run"
    out.mkdir()
    code, stderr = run(["--batch", "--stages", "prune", "--config", str(quick), "--out", str(out), "--quiet"], capsys)
    assert code == 2
    assert_one_line(stderr, "Permission denied")
    assert not list(out.iterdir())


def test_the_error_handler_itself_cannot_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def bug(*_args: object) -> None:
        raise RuntimeError("simulated bug")

    def nowhere(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(batch.pipeline, "check_evaluation_config", bug)
    monkeypatch.setattr(batch.tempfile, "mkstemp", nowhere)
    code, stderr = run(["--batch", "--stages", "prune", "--out", str(tmp_path / "run"), "--quiet"], capsys)
    assert code == 1
    assert stderr == "internal error: RuntimeError: simulated bug; the traceback could not be saved\n"


# --- case 1 (run folders): nothing in a run folder chooses code ---------------------------------------------


PAYLOAD = """
from pathlib import Path

Path({marker!r}).write_text("imported")


def make(num_classes=10, in_channels=1):
    Path({marker!r}).write_text("called")
"""


@pytest.mark.parametrize("case", ["pruned.pt names a factory", "config.toml names a factory", "config.toml trusts pickles"])
def test_resume_never_runs_code_the_run_folder_names(case: str, tmp_path: Path, previous_run: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    marker, name = tmp_path / "MARK", "fuzz_run_payload_" + "".join(c for c in tmp_path.name if c.isalnum())
    (tmp_path / f"{name}.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    factory = f"{name}:make"
    folder = copy_run(previous_run, tmp_path / "d")
    if case == "pruned.pt names a factory":
        record = torch.load(folder / "pruned.pt", weights_only=True)
        record["arch"] = {"family": "custom", "name": factory, "params": {"num_classes": 10, "in_channels": 1}}
        torch.save(record, folder / "pruned.pt")
    else:
        key, value = ("arch", f'"{factory}"') if "factory" in case else ("trust_pickle", "true")
        lines = (folder / "config.toml").read_text().splitlines()
        (folder / "config.toml").write_text("\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line
                                                      for line in lines) + "\n")
    code, stderr = run(["--resume", str(folder), "--quiet"], capsys)
    assert code == 2
    assert_one_line(stderr, "--trust-pickle" if "trusts" in case else f"--arch {factory}")
    assert not marker.exists() and name not in sys.modules


# --- case 6: an interrupt at any moment, even while importing, is 130 ------------------------------------------


# Runs the rest of its arguments as a Python command with SIGINT at its default and unblocked, as a
# terminal's Ctrl-C finds it: a child inherits both across exec, and the test process's may have been
# changed by the libraries earlier tests loaded (Python leaves an ignored SIGINT ignored).
AS_FROM_A_TERMINAL = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                      "signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


@pytest.mark.parametrize("moment", ["engine", "torch"])
def test_interrupt_while_importing_exits_130(moment: str, tmp_path: Path) -> None:
    """SIGINT as soon as `-X importtime` shows the first `engine` module (the CLI's own imports)
    or the first `torch` module (the batch runner's) finished importing."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", AS_FROM_A_TERMINAL, "-X", "importtime", "-m", "workbench",
                                "--batch", "--out", str(out)],
                               cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("import time:") and line.split("|")[-1].strip().split(".")[0] == moment:
            process.send_signal(signal.SIGINT)
            break
    rest = process.stderr.read()
    process.wait(timeout=120)
    said = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert process.returncode == 130 and said[-1:] == ["interrupted"] and "Traceback" not in rest, rest[-3000:]
    assert not out.exists()


def test_interrupt_while_loading_replaces_nothing(tmp_path: Path, previous_run: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while the model and data load (the batch runner's handler only sets its cancel
    event) stops before the first write: a previous run under --force is still there."""
    checks = batch.pipeline.check_evaluation_config

    def interrupted(config: object) -> None:
        signal.raise_signal(signal.SIGINT)
        checks(config)

    monkeypatch.setattr(batch.pipeline, "check_evaluation_config", interrupted)
    folder = copy_run(previous_run, tmp_path / "d")
    before = tree(tmp_path)
    code, stderr = run(["--batch", "--stages", "prune", "--out", str(folder), "--force", "--quiet"], capsys)
    assert code == 130 and stderr == "interrupted\n"
    assert tree(tmp_path) == before


# --- case 7: one writer per run folder ---------------------------------------------------------------------------


def test_a_locked_folder_is_refused(tmp_path: Path, previous_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = copy_run(previous_run, tmp_path / "d")
    empty = tmp_path / "empty"
    empty.mkdir()
    before = tree(tmp_path)
    new_run = ["--batch", "--stages", "prune", "--quiet", "--out"]
    for held, attempts in ((folder, [[*new_run, str(folder), "--force"], ["--resume", str(folder)]]),
                           (empty, [[*new_run, str(empty)]])):
        fd = os.open(held, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another process's run would
        try:
            for args in attempts:
                code, stderr = run(args, capsys)
                assert code == 2
                assert_one_line(stderr, f"another gkp-workbench run is writing to {held}")
        finally:
            os.close(fd)
    assert tree(tmp_path) == before


def test_a_second_run_on_a_busy_folder_exits_2_and_the_first_finishes(tmp_path: Path, quick: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "workbench", "--batch", "--stages", "prune", "--config", str(quick),
                              "--out", str(out), "--quiet"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "state.json").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second could start"
    for flags in (["--force"], []):
        code, stderr = run(["--batch", "--stages", "prune", "--config", str(quick), "--out", str(out), "--quiet", *flags], capsys)
        assert code == 2
        assert_one_line(stderr, "another gkp-workbench run is writing to")
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert json.loads((out / "state.json").read_text())["completed"] == ["prune"]
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == {
        "config.toml", "decisions.jsonl", "log.txt", "plan.json", "pruned.pt", "report.json", "state.json"}


# --- case 8: a full disk leaves no temporary file, and resume removes those a killed run left ------------------

FILE_LIMIT = '''
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # files stop growing at 1 MiB
sys.argv = ["workbench", *sys.argv[1:]]
runpy.run_module("workbench", run_name="__main__")
'''


def test_disk_full_leaves_no_temporary_file_and_resume_cleans_up(tmp_path: Path, quick: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    full = subprocess.run([sys.executable, "-c", FILE_LIMIT, "--batch", "--stages", "prune", "--config", str(quick),
                           "--out", str(out), "--quiet"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert full.returncode == 2, full.stderr
    assert_one_line(full.stderr, "cannot write")
    assert "decisions.jsonl: File too large" in full.stderr
    assert not [p.name for p in out.rglob("*.tmp")]
    (out / ".decisions.jsonl.k1ll3d.tmp").write_text("left by a killed run")
    (out / f".{MANIFEST}.k1ll3d.tmp").write_text("{")
    code, stderr = run(["--resume", str(out), "--quiet"], capsys)
    assert code == 0, stderr
    assert not [p.name for p in out.rglob("*.tmp")]
    assert json.loads((out / "state.json").read_text())["completed"] == ["prune"]
