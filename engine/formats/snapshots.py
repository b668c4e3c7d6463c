"""Training snapshots for TMI-GKP (SPEC §3.2, §6): a directory of per-epoch state dicts, or a
compact archive that stores each snapshot's conv weights as int8 deltas from the final weights
(used for the bundled sample model)."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..common.errors import CheckpointError, ConfigError, SnapshotError
from ..common.fileio import write_bytes_atomic
from ..models.architectures import StateMismatch, compare_shapes, tensor_shapes
from .checkpoints import read_state_dict
from .listing import EXPECTED_NAMES, requested_epochs, snapshot_files

ARCHIVE_FORMAT = "gkp-snapshots"
ARCHIVE_VERSION = 1
_FINGERPRINT_RTOL = 1e-6

StateDict = dict[str, torch.Tensor]


def load_snapshots(
    path: str | os.PathLike[str],
    *,
    reference: Mapping[str, torch.Tensor] | None = None,
    window: tuple[int, int] | None = None,
    step: int = 1,
) -> dict[int, StateDict]:
    """Snapshots by epoch for every `step`-th epoch of `window` (inclusive; default: from the
    first to the last epoch found). `path` is a directory of per-epoch files, or an archive from
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
        return _load_archive(target, reference, window, step)
    files = snapshot_files(target)
    if not files:
        raise SnapshotError(
            f"no snapshot files in {target}: expected one file per epoch named like {EXPECTED_NAMES}"
        )
    snapshots: dict[int, StateDict] = {}
    first: tuple[str, StateDict] | None = None
    for epoch in requested_epochs(sorted(files), window, step):
        file = files[epoch]
        try:
            state = read_state_dict(file).state_dict
        except CheckpointError as exc:
            raise SnapshotError(str(exc)) from None
        if reference is not None:
            _check_match(compare_shapes(tensor_shapes(reference), tensor_shapes(state)),
                         f"snapshot {file.name} does not match the model")
        elif first is not None:
            _check_match(compare_shapes(tensor_shapes(first[1]), tensor_shapes(state)),
                         f"snapshots mix architectures: {file.name} differs from {first[0]}")
        else:
            first = (file.name, state)
        snapshots[epoch] = state
    return snapshots


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


def _load_archive(
    path: Path, reference: Mapping[str, torch.Tensor] | None, window: tuple[int, int] | None, step: int
) -> dict[int, StateDict]:
    """Dequantise an archive's conv weights (`final + q * scale`, float32) for the requested epochs."""
    if reference is None:
        raise SnapshotError(
            f"{path} is a compact snapshot archive of deltas from the final weights; pass the final state dict as reference"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SnapshotError(f"{path} is neither a snapshot directory nor a readable snapshot archive ({exc})") from None
    if str(arrays.get("format", "")) != ARCHIVE_FORMAT or int(arrays.get("version", -1)) != ARCHIVE_VERSION:
        raise SnapshotError(f"{path} is not a gkp-workbench snapshot archive (version {ARCHIVE_VERSION})")
    names = [str(n) for n in arrays["names"]]
    found = [int(e) for e in arrays["epochs"]]
    for i, name in enumerate(names):
        ref = reference.get(name)
        shape = tuple(arrays[f"q{i}"].shape[1:])
        if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != shape:
            raise SnapshotError(f"snapshot archive {path.name} does not match the model: key {name!r} of shape {shape}")
        l1 = float(ref.double().abs().sum())
        if abs(l1 - float(arrays["final_l1"][i])) > _FINGERPRINT_RTOL * max(1.0, l1):
            raise SnapshotError(
                f"snapshot archive {path.name} was made from different final weights than the reference (key {name!r})"
            )
    position = {epoch: j for j, epoch in enumerate(found)}
    finals = {name: reference[name].detach().cpu().double() for name in names}
    snapshots: dict[int, StateDict] = {}
    for epoch in requested_epochs(sorted(found), window, step):
        j = position[epoch]
        snapshots[epoch] = {
            name: (finals[name] + torch.from_numpy(arrays[f"q{i}"][j].astype(np.float64)) * float(arrays["scales"][j, i]))
            .to(torch.float32)
            for i, name in enumerate(names)
        }
    return snapshots


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
