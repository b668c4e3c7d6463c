"""The folder a batch run writes. It is checked and locked before any work, created (or, with
`--force`, built beside the previous run and swapped in) only when the run first writes, and
marked by a manifest, `.gkp-run.json`, that lists every file the run writes before it writes
it: `--force` removes exactly those files and refuses a folder holding anything else."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from engine.common.checks import utf8
from engine.common.errors import ConfigError
from engine.common.fileio import FOLDER_MODE, reported, temp_prefix, write_json_atomic, write_text_atomic

MANIFEST = ".gkp-run.json"
MANIFEST_FORMAT = "gkp-workbench/run"
MANIFEST_VERSION = 1
MAX_LISTED = 10_000  # entries a manifest may list
MAX_DEPTH = 4  # folder levels a listed file may sit below the run folder


def next_run_folder(parent: Path, name: str) -> Path:
    """The first `parent/name-N` (N = 1, 2, ...) that does not exist yet: a guess, which
    `RunFolder.create` makes good by creating the folder exclusively."""
    number = 1
    while (parent / f"{name}-{number}").exists():
        number += 1
    return parent / f"{name}-{number}"


class RunFolder:
    """One run's output folder. `kind` says what `create` will do: "create" a missing folder,
    use an "empty" one, "replace" a previous run, take the "next" free `runs/<name>-N`, or
    nothing ("resume"). Only the writer (rank 0 under torchrun) locks, creates and lists."""

    def __init__(self, path: Path | None, kind: str, *, writer: bool, default: tuple[Path, str] | None = None) -> None:
        self.path = path
        self.kind = kind
        self.writer = writer
        self.default = default
        self.files: set[str] = set()
        self.created = kind == "resume"  # whether the folder holds this run (so far)
        self._locks: list[int] = []
        self._previous: set[str] = set()

    # --- choosing and checking -----------------------------------------------------------------

    @classmethod
    def for_run(cls, out: Path | None, *, name: str, force: bool, writer: bool = True) -> "RunFolder":
        """The folder for a new run: `out`, or the next free `runs/<name>-N` when None. Refuses
        (`ConfigError`) a path that is a file or cannot be created, a non-empty folder without
        `force`, and with `force` any folder that is not a previous run holding only its files."""
        if out is None:
            folder = cls(None, "next", writer=writer, default=(Path("runs"), name))
            if not writer:
                folder.path = next_run_folder(Path("runs"), name)
            return folder
        _check_text(out)
        if not writer:
            return cls(out, "create", writer=False)
        kind = _existing_kind(out)
        folder = cls(out, kind, writer=True)
        if kind == "create":
            _check_creatable(out)
            return folder
        try:
            folder._lock(out)
            if any(out.iterdir()):
                if not force:
                    raise ConfigError(
                        f"output directory {out} is not empty; pass --force to replace the run in it "
                        f"or --resume {out} to continue it"
                    )
                if out.is_symlink():
                    raise ConfigError(f"refusing to replace {out}: it is a symbolic link; give the folder itself")
                folder._previous = _run_files(out)
                _check_writable(out.parent, f"cannot replace {out}")
                folder.kind = "replace"
            _check_writable(out, f"cannot write into {out}")
        except BaseException:
            folder.close()
            raise
        return folder

    @classmethod
    def for_resume(cls, out: Path, *, writer: bool = True) -> "RunFolder":
        """The folder of an interrupted run, locked, with the temporary files a killed run left
        removed; `ConfigError` when it is not a run folder."""
        _check_text(out)
        folder = cls(out, "resume", writer=writer)
        if not writer:
            return folder
        if not out.is_dir():
            raise ConfigError(f"{out} holds no resumable run (it is not a folder)")
        try:
            folder._lock(out)
            folder.files = _read_manifest(out, "it cannot be resumed")
            _check_writable(out, f"cannot continue the run in {out}")
            _remove_temporaries(out, folder.files)
        except BaseException:
            folder.close()
            raise
        return folder

    # --- writing -----------------------------------------------------------------------------------

    def create(self, first: dict[str, str]) -> Path:
        """The first write: make the folder (locked) holding the manifest and the `first` files
        (name → text); a previous run is replaced only now, by building the new folder beside it
        and swapping the two, so it stays intact if anything before fails."""
        assert self.writer, "only the writing process creates the run folder"
        if self.kind == "next":
            assert self.default is not None
            self.path = self._create_next(*self.default)
        elif self.kind == "create":
            assert self.path is not None
            with reported(self.path):
                try:
                    self.path.mkdir(parents=True)
                except FileExistsError:
                    raise ConfigError(f"{self.path} was created by someone else while this run was starting; "
                                      "choose another --out") from None
            self._lock(self.path)
        elif self.kind == "replace":
            assert self.path is not None
            self._replace(self.path, first)
            self.created = True
            return self.path
        assert self.path is not None
        try:
            self._write_first(self.path, first)
        except BaseException:
            _remove_run(self.path, self.files, keep_folder=self.kind == "empty")
            raise
        self.created = True
        return self.path

    def claim(self, *names: str) -> None:
        """List `names` (paths relative to the folder) in the manifest before they are written."""
        new = set(names) - self.files
        if not self.writer or not new:
            return
        assert self.path is not None
        self.files |= new
        _write_manifest(self.path, self.files)

    def file(self, name: str) -> Path:
        """The path of `name` in the folder, listed in the manifest first."""
        self.claim(name)
        assert self.path is not None
        return self.path / name

    def close(self) -> None:
        """Release the lock(s)."""
        while self._locks:
            os.close(self._locks.pop())

    # --- internals ---------------------------------------------------------------------------------

    def _lock(self, path: Path) -> None:
        """Hold an exclusive lock on the folder itself for the rest of the run (no lock file to
        leave behind); `ConfigError` when another run holds it."""
        with reported(path):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another gkp-workbench run is writing to {path}; wait for it to end or choose another --out") from None
        self._locks.append(fd)

    def _create_next(self, parent: Path, name: str) -> Path:
        """Create and lock the first free `parent/name-N`; exclusive creation settles a race."""
        candidate = next_run_folder(parent, name)
        with reported(candidate):
            parent.mkdir(parents=True, exist_ok=True)
            while True:
                try:
                    candidate.mkdir()
                    break
                except FileExistsError:
                    candidate = next_run_folder(parent, name)
        self._lock(candidate)
        return candidate

    def _write_first(self, path: Path, first: dict[str, str]) -> None:
        self.files |= set(first)
        _write_manifest(path, self.files)
        for name, text in first.items():
            write_text_atomic(path / name, text)

    def _replace(self, out: Path, first: dict[str, str]) -> None:
        """Build the new run in a temporary folder beside `out`, then swap: `out` moves to a
        second temporary name, the new folder takes its place, and the old run's listed files
        are removed. The old run is rechecked first, under its lock."""
        with reported(out.parent):
            fresh = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
        try:
            os.chmod(fresh, FOLDER_MODE)
            self._lock(fresh)
            self._write_first(fresh, first)
            if _run_files(out) != self._previous:
                raise ConfigError(f"the previous run in {out} changed while this run was starting; nothing was replaced")
            with reported(out.parent):
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.rename(out, old)  # onto the empty folder just made: atomic
                try:
                    os.rename(fresh, out)
                except OSError:
                    os.rename(old, out)
                    raise
        except BaseException:
            _remove_run(fresh, self.files)
            raise
        _remove_run(old, self._previous)


# --- checks -----------------------------------------------------------------------------------------


def _check_text(path: Path) -> None:
    utf8("the output folder", str(path))


def _existing_kind(out: Path) -> str:
    """"create" when `out` does not exist, "empty" for a folder (its contents decide later)."""
    try:
        is_dir = out.is_dir()
        exists = is_dir or out.exists() or out.is_symlink()
    except OSError as exc:
        raise ConfigError(f"cannot use output folder {out}: {exc.strerror}") from None
    if not exists:
        return "create"
    if not is_dir:
        raise ConfigError(f"output path {out} exists and is not a directory")
    return "empty"


def _check_creatable(out: Path) -> None:
    """`ConfigError` unless the nearest existing folder above `out` is a writable folder."""
    ancestor = out.absolute().parent
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"cannot create output folder {out}: {ancestor} is not a folder")
    _check_writable(ancestor, f"cannot create output folder {out}")


def _check_writable(folder: Path, what: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {folder} is not writable")


def _listed(entry: Any) -> str:
    """One manifest entry, checked to name a place inside the folder."""
    if not isinstance(entry, str) or "\\" in entry or "\x00" in entry:
        raise ValueError(entry)
    parts = PurePosixPath(entry).parts
    if (not parts or len(parts) > MAX_DEPTH or entry != str(PurePosixPath(entry)) or entry.startswith("/")
            or any(part in (".", "..") for part in parts) or entry == MANIFEST):
        raise ValueError(entry)
    return entry


_REPLACING = "refusing to delete anything in it, even with --force"


def _read_manifest(folder: Path, consequence: str) -> set[str]:
    """The files the run in `folder` listed; `ConfigError` ending in `consequence` when there is
    no valid manifest."""
    path = folder / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise ConfigError(f"{folder} is not a gkp-workbench run folder (it has no {MANIFEST}); {consequence}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if (not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION
                or not isinstance(data.get("files"), list) or len(data["files"]) > MAX_LISTED):
            raise ValueError("not a manifest")
        return {_listed(entry) for entry in data["files"]}
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        raise ConfigError(f"{folder} has a damaged {MANIFEST}; {consequence}") from None


def _write_manifest(folder: Path, files: set[str]) -> None:
    write_json_atomic(folder / MANIFEST, {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": sorted(files)})


def _is_temporary(name: str, siblings: set[str]) -> bool:
    """Whether `name` is an atomic writer's temporary file of one of `siblings`."""
    return name.endswith(".tmp") and any(name.startswith(temp_prefix(s)) for s in siblings)


def _run_files(folder: Path) -> set[str]:
    """The files the run in `folder` listed, once every entry of the folder is checked to be
    one of them, a temporary file of one, or a folder on the way to one (never a link);
    `ConfigError` naming the first entry the workbench did not write."""
    files = _read_manifest(folder, _REPLACING)

    def walk(directory: Path, prefix: str) -> None:
        names = {f.split("/", 1)[0] for f in files_under(prefix)} | ({MANIFEST} if not prefix else set())
        for entry in os.scandir(directory):
            relative = prefix + entry.name
            if relative in files and entry.is_file(follow_symlinks=False):
                continue
            if entry.name == MANIFEST and not prefix and entry.is_file(follow_symlinks=False):
                continue
            if _is_temporary(entry.name, names) and entry.is_file(follow_symlinks=False):
                continue
            if entry.is_dir(follow_symlinks=False) and files_under(relative + "/"):
                walk(Path(entry.path), relative + "/")
                continue
            raise ConfigError(f"{folder} holds {relative}, which no gkp-workbench run wrote; {_REPLACING}")

    def files_under(prefix: str) -> list[str]:
        return [f[len(prefix):] for f in files if f.startswith(prefix)]

    with reported(folder):
        walk(folder, "")
    return files


def _remove_temporaries(folder: Path, files: set[str]) -> None:
    """Delete the temporary files a killed run left beside its listed files and manifest."""
    for directory in {folder} | {folder / PurePosixPath(f).parent for f in files}:
        siblings = {PurePosixPath(f).name for f in files if folder / PurePosixPath(f).parent == directory}
        if directory == folder:
            siblings.add(MANIFEST)
        if not directory.is_dir() or directory.is_symlink():
            continue
        for entry in os.scandir(directory):
            if _is_temporary(entry.name, siblings) and entry.is_file(follow_symlinks=False):
                with reported(Path(entry.path)):
                    os.unlink(entry.path)


def _remove_run(folder: Path, files: set[str], *, keep_folder: bool = False) -> None:
    """Delete a run folder's listed files, their temporary files and the manifest, then the
    folders left empty (`folder` itself too unless `keep_folder`); anything else stays (and so
    does its folder)."""
    _remove_temporaries(folder, files)
    for name in [*files, MANIFEST]:
        if any((folder / parent).is_symlink() for parent in PurePosixPath(name).parents):
            continue  # a folder on the way became a link: whatever it points to is not the run's
        with reported(folder / name):
            (folder / name).unlink(missing_ok=True)
    parents = sorted({PurePosixPath(f).parents[i] for f in files for i in range(len(PurePosixPath(f).parts) - 1)},
                     key=lambda p: -len(p.parts))
    for parent in [*parents] if keep_folder else [*parents, PurePosixPath(".")]:
        try:
            (folder / parent).rmdir()
        except OSError:
            pass  # not empty: something the run did not write stays where it is
