"""Training snapshots for TMI-GKP (SPEC §3.2, §6): a directory of per-epoch state dicts, or a
compact archive that stores each snapshot's conv weights as int8 deltas from the final weights
(used for the bundled sample model)."""

from __future__ import annotations

import io
import itertools
import os
import re
import zipfile
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from ..common.errors import CheckpointError, ConfigError, SnapshotError
from ..common.fileio import write_bytes_atomic
from ..models.architectures import Shapes, StateMismatch, compare_shapes, tensor_shapes
from .checkpoints import read_state_dict

SNAPSHOT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".th", ".tar", ".ckpt", ".bin")
ARCHIVE_FORMAT = "gkp-snapshots"
ARCHIVE_VERSION = 1
EXPECTED_NAMES = "epoch_12.pt, epoch12.pth, checkpoint_12.pt or 12.pt"
_EPOCH_KEYWORD = re.compile(r"(?:epoch|ep)[_\-]?(\d+)", re.IGNORECASE)
_SHOWN = 8  # missing epochs listed before "..."
_FINGERPRINT_RTOL = 1e-6
_ARCHIVE_KEYS: tuple[str, ...] = ("format", "version", "epochs", "names", "final_l1")
_SMALL_ARRAY = 1 << 24  # bytes: the archive's index arrays are far smaller
_MAX_RATIO = 1100  # an archive member expands at most this much (deflate: about 1032-fold)

StateDict = dict[str, torch.Tensor]


def load_snapshots(
    path: str | os.PathLike[str],
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    window: tuple[int, int] | None = None,
    step: int = 1,
) -> dict[int, StateDict]:
    """Every snapshot of `open_snapshots` read into memory at once."""
    source = open_snapshots(path, reference=reference, window=window, step=step)
    return {epoch: source[epoch] for epoch in source}


def open_snapshots(
    path: str | os.PathLike[str],
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    window: tuple[int, int] | None = None,
    step: int = 1,
) -> "SnapshotSource":
    """Snapshots by epoch for every `step`-th epoch of `window` (inclusive; default: from the
    first to the last epoch found), read one at a time when asked for, so a pass over them holds
    one snapshot. `path` is a directory of per-epoch files, or an archive from
    `save_snapshot_archive`, which needs `reference` (the final weights) and yields only the conv
    weights. Each snapshot must match `reference` (or, without one, the first snapshot)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ConfigError(f"ticket step must be a positive integer, got {step!r}")
    if window is not None and (len(window) != 2 or window[0] > window[1]):
        raise ConfigError(f"ticket window must be (first, last) with first <= last, got {window!r}")
    target = Path(path)
    if not target.exists():
        raise SnapshotError(f"snapshot path {target} does not exist")
    if target.is_file():
        return _Archive(target, reference, window, step)
    files = snapshot_files(target)
    if not files:
        raise SnapshotError(
            f"no snapshot files in {target}: expected one file per epoch named like {EXPECTED_NAMES}"
        )
    return _Directory(files, reference, _requested_epochs(sorted(files), window, step))


class SnapshotSource(Mapping[int, StateDict]):
    """The ticket snapshots, epoch -> state dict, each read and checked when asked for (nothing
    is kept, so ask once per pass). `check` reads them all once to fail early."""

    epochs: list[int]

    def __getitem__(self, epoch: int) -> StateDict:
        if epoch not in self.epochs:
            raise KeyError(epoch)
        return self._read(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epochs)

    def __len__(self) -> int:
        return len(self.epochs)

    def __contains__(self, epoch: object) -> bool:
        return epoch in self.epochs

    def check(self) -> None:
        """Read every snapshot once (one at a time): `SnapshotError` for the first that does
        not fit."""
        for epoch in self.epochs:
            self._read(epoch)

    @abstractmethod
    def _read(self, epoch: int) -> StateDict:
        """Read and check one snapshot."""


class _Directory(SnapshotSource):
    """Per-epoch files, each checked against the reference or the window's first snapshot."""

    def __init__(self, files: dict[int, Path], reference: Mapping[str, torch.Tensor] | None, epochs: list[int]) -> None:
        self.files, self.epochs = files, epochs
        self.reference = None if reference is None else tensor_shapes(reference)
        self.first: Shapes | None = None

    def _state(self, epoch: int) -> StateDict:
        try:
            return read_state_dict(self.files[epoch]).state_dict
        except CheckpointError as exc:
            raise SnapshotError(str(exc)) from None

    def _read(self, epoch: int) -> StateDict:
        file, state = self.files[epoch], self._state(epoch)
        if self.reference is not None:
            _check_match(compare_shapes(self.reference, tensor_shapes(state)),
                         f"snapshot {file.name} does not match the model")
            return state
        first = self.epochs[0]
        if epoch == first:
            self.first = tensor_shapes(state)
            return state
        if self.first is None:
            self.first = tensor_shapes(self._state(first))
        _check_match(compare_shapes(self.first, tensor_shapes(state)),
                     f"snapshots mix architectures: {file.name} differs from {self.files[first].name}")
        return state


def snapshot_files(directory: Path) -> dict[int, Path]:
    """Epoch → file for the snapshot files of `directory` (names holding one epoch number)."""
    found: dict[int, Path] = {}
    for file in sorted(directory.iterdir()):
        epoch = epoch_of(file.name) if file.is_file() and not file.name.startswith(".") else None
        if epoch is None:
            continue
        if epoch in found:
            raise SnapshotError(f"epoch {epoch} has two snapshot files in {directory}: {found[epoch].name} and {file.name}")
        found[epoch] = file
    return found


def epoch_of(name: str) -> int | None:
    """The epoch number in a snapshot file name: its only integer, or the one after "epoch"/"ep"
    (as in resnet20_epoch_7.pt); None for other files."""
    stem = name
    while (suffix := Path(stem).suffix.lower()) in SNAPSHOT_SUFFIXES:
        stem = stem[: -len(suffix)]
    if stem == name:
        return None
    numbers = re.findall(r"\d+", stem)
    if len(numbers) == 1:
        return int(numbers[0])
    tagged = _EPOCH_KEYWORD.findall(stem)
    return int(tagged[0]) if len(tagged) == 1 else None


def save_snapshot_archive(
    path: str | os.PathLike[str],
    snapshots: Mapping[int, Mapping[str, torch.Tensor]],
    final_state: Mapping[str, torch.Tensor],
) -> None:
    """Write the conv weights (4-D tensors) of every snapshot as int8 deltas from `final_state`
    with one float scale per tensor (`max|delta|/127`), compressed, atomically."""
    names = [k for k, v in final_state.items() if isinstance(v, torch.Tensor) and v.dim() == 4]
    if not names:
        raise SnapshotError("the final state has no conv weights (4-D tensors) to archive")
    if not snapshots:
        raise SnapshotError("there are no snapshots to archive")
    epochs = sorted(int(e) for e in snapshots)
    arrays: dict[str, np.ndarray] = {
        "format": np.array(ARCHIVE_FORMAT),
        "version": np.array(ARCHIVE_VERSION),
        "epochs": np.array(epochs, dtype=np.int64),
        "names": np.array(names),
        "final_l1": np.array([float(final_state[n].double().abs().sum()) for n in names]),
    }
    scales = np.zeros((len(epochs), len(names)), dtype=np.float32)
    for i, name in enumerate(names):
        final = final_state[name].detach().cpu().double().numpy()
        quantised = np.zeros((len(epochs), *final.shape), dtype=np.int8)
        for j, epoch in enumerate(epochs):
            weight = snapshots[epoch].get(name)
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != final.shape:
                raise SnapshotError(f"snapshot of epoch {epoch} has no conv weight {name!r} of shape {final.shape}")
            delta = weight.detach().cpu().double().numpy() - final
            scale = np.float32(np.abs(delta).max() / 127.0)
            scales[j, i] = scale
            if scale > 0:
                quantised[j] = np.clip(np.rint(delta / float(scale)), -127, 127).astype(np.int8)
        arrays[f"q{i}"] = quantised
    arrays["scales"] = scales
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


class _Archive(SnapshotSource):
    """A compact archive, checked against the reference's conv weights when opened; each epoch
    dequantised (`final + q * scale`, float32) when asked for."""

    def __init__(self, path: Path, reference: Mapping[str, torch.Tensor] | None, window: tuple[int, int] | None,
                 step: int) -> None:
        if reference is None:
            raise SnapshotError(
                f"{path} is a compact snapshot archive of deltas from the final weights; pass the final state dict as reference"
            )
        try:
            arrays = _read_archive(path, reference)
        except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise SnapshotError(f"{path} is neither a snapshot directory nor a readable snapshot archive ({exc})") from None
        names = [str(n) for n in arrays["names"]]
        found = [int(e) for e in arrays["epochs"]]
        if not found or len(set(found)) != len(found):
            raise SnapshotError(f"snapshot archive {path.name} is damaged: its epochs are missing or repeated")
        for i, name in enumerate(names):
            ref = reference[name]
            l1 = float(ref.double().abs().sum())
            if abs(l1 - float(arrays["final_l1"][i])) > _FINGERPRINT_RTOL * max(1.0, l1):
                raise SnapshotError(
                    f"snapshot archive {path.name} was made from different final weights than the reference (key {name!r})"
                )
        self.epochs = _requested_epochs(sorted(found), window, step)
        self.position = {epoch: j for j, epoch in enumerate(found)}
        self.names, self.arrays = names, arrays
        self.finals = {name: reference[name].detach().cpu().double() for name in names}

    def _read(self, epoch: int) -> StateDict:
        j, arrays = self.position[epoch], self.arrays
        return {
            name: (self.finals[name] + torch.from_numpy(arrays[f"q{i}"][j].astype(np.float64)) * float(arrays["scales"][j, i]))
            .to(torch.float32)
            for i, name in enumerate(self.names)
        }


def _read_archive(path: Path, reference: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The arrays of a snapshot archive, each loaded only once its header shows a size the
    archive holds and, for the quantised weights, the model's shape at every stored epoch."""
    headers = _array_headers(path)
    with np.load(path, allow_pickle=False) as data:
        index = {key: data[key] for key in _ARCHIVE_KEYS if key in headers and _nbytes(headers[key]) <= _SMALL_ARRAY}
        if str(index.get("format", "")) != ARCHIVE_FORMAT or int(index.get("version", -1)) != ARCHIVE_VERSION:
            raise SnapshotError(f"{path} is not a gkp-workbench snapshot archive (version {ARCHIVE_VERSION})")
        names, epochs = [str(n) for n in index.get("names", [])], len(index.get("epochs", []))
        for i, name in enumerate(names):
            ref = reference.get(name)
            shape = headers.get(f"q{i}", ((), np.dtype("O")))[0]
            if not isinstance(ref, torch.Tensor) or shape != (epochs, *ref.shape) or headers[f"q{i}"][1] != np.int8:
                raise SnapshotError(f"snapshot archive {path.name} does not match the model: key {name!r} of shape {shape[1:]}")
        if headers.get("scales", ((),))[0] != (epochs, len(names)) or len(index.get("final_l1", [])) != len(names):
            raise SnapshotError(f"snapshot archive {path.name} is damaged: its index does not match its {len(names)} weights")
        return {**index, "scales": data["scales"], **{f"q{i}": data[f"q{i}"] for i in range(len(names))}}


def _array_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an .npz archive, read from the headers alone, each
    checked to need no more bytes than the archive stores for it (so loading cannot be made to
    allocate more than the file holds, beyond what compression gives)."""
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(member)
            if dtype.hasobject or _nbytes((shape, dtype)) > info.file_size or info.file_size > _MAX_RATIO * max(1, info.compress_size):
                raise ValueError(f"array {info.filename} declares more data than the archive holds")
            headers[info.filename.removesuffix(".npy")] = (tuple(shape), dtype)
    return headers


def _nbytes(header: tuple[tuple[int, ...], np.dtype]) -> int:
    shape, dtype = header
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _requested_epochs(found: list[int], window: tuple[int, int] | None, step: int) -> list[int]:
    """Every `step`-th epoch of the window (or of the found range); `SnapshotError` listing the
    missing ones and what was found when any is absent."""
    first, last = window if window is not None else (found[0], found[-1])
    wanted = range(first, last + 1, step)
    have = set(found)
    count = len(wanted) - sum(1 for e in have if e in wanted)  # without listing a huge window
    if count:
        missing = list(itertools.islice((e for e in wanted if e not in have), _SHOWN))
        listed = ", ".join(str(e) for e in missing)
        if count > _SHOWN:
            listed += f", ... ({count} in all)"
        where = f"ticket window {first}..{last}" if window is not None else f"epochs {first}..{last}"
        if step > 1:
            where += f" at step {step}"
        raise SnapshotError(f"missing epochs {listed} in {where} (found {_ranges(found)})")
    return list(wanted)


def _ranges(epochs: list[int]) -> str:
    """Sorted epochs as compact runs: "35..40, 43..70"."""
    runs: list[list[int]] = []
    for epoch in epochs:
        if runs and epoch == runs[-1][1] + 1:
            runs[-1][1] = epoch
        else:
            runs.append([epoch, epoch])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def _check_match(mismatch: StateMismatch, context: str) -> None:
    """Raise `SnapshotError` naming the first mismatching key."""
    key = mismatch.first_key
    if key is None:
        return
    shapes = {k: (e, f) for k, e, f in mismatch.wrong_shape}
    if key in shapes:
        detail = f"expects shape {shapes[key][0]} but has {shapes[key][1]}"
    elif key in mismatch.missing:
        detail = "is missing"
    else:
        detail = "is unexpected"
    raise SnapshotError(f"{context}: key {key!r} {detail}")
