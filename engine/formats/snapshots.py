"""Training snapshots for TMI-GKP (SPEC §3.2, §6): a directory of per-epoch state dicts, or a
compact archive that stores each snapshot's conv weights as int8 deltas from the final weights
(used for the bundled sample model)."""

from __future__ import annotations

import io
import os
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
from .listing import (
    EXPECTED_NAMES,
    SMALL_ARRAY,
    array_headers,
    array_nbytes,
    requested_epochs,
    snapshot_files,
)

ARCHIVE_FORMAT = "gkp-snapshots"
ARCHIVE_VERSION = 1
_FINGERPRINT_RTOL = 1e-6
_ARCHIVE_KEYS: tuple[str, ...] = ("format", "version", "epochs", "names", "final_l1")

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
    return _Directory(files, reference, requested_epochs(sorted(files), window, step))


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
        self.epochs = requested_epochs(sorted(found), window, step)
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
    headers = array_headers(path)
    with np.load(path, allow_pickle=False) as data:
        index = {key: data[key] for key in _ARCHIVE_KEYS if key in headers and array_nbytes(headers[key]) <= SMALL_ARRAY}
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
