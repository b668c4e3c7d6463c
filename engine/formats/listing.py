"""What checkpoint and snapshot files hold, read without torch, so the workbench can list a
model's layers and check a snapshot folder before torch has loaded: the checks every checkpoint
passes first, the restricted unpickler's inert stand-ins, a torch file's tensor names and shapes
(from the pickle alone, never the weights), and the epochs of a snapshot folder or archive."""

from __future__ import annotations

import collections
import itertools
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..common.errors import CheckpointError, SnapshotError

WORKBENCH_FORMAT = "gkp-workbench"
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "net")
SNAPSHOT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".th", ".tar", ".ckpt", ".bin")
EXPECTED_NAMES = "epoch_12.pt, epoch12.pth, checkpoint_12.pt or 12.pt"
_EPOCH_KEYWORD = re.compile(r"(?:epoch|ep)[_\-]?(\d+)", re.IGNORECASE)
_SHOWN = 8  # missing epochs listed before "..."
SMALL_ARRAY = 1 << 24  # bytes: a snapshot archive's index arrays are far smaller
_MAX_RATIO = 1100  # an archive member expands at most this much (deflate: about 1032-fold)
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's pre-zip format


# --- checks every checkpoint passes first -----------------------------------------------------


def check_file(path: Path) -> None:
    """Reject paths that cannot be a torch checkpoint (missing, a folder, empty, text, TorchScript)
    before anything loads them."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    try:
        with path.open("rb") as handle:
            head = handle.read(512)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if head.startswith(b"PK"):
        if _is_torchscript(path):
            raise CheckpointError(
                f"{path} is a TorchScript archive, not a checkpoint; save the model's state_dict() instead"
            )
        return
    if head.startswith(b"\x80"):
        return
    kind = "a text file" if _is_text(head) else "an unrecognised binary file"
    raise CheckpointError(f"{path} is not a PyTorch checkpoint (it is {kind})")


def _is_torchscript(path: Path) -> bool:
    """Whether a zip file is a TorchScript archive (it holds constants.pkl)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False  # loading reports the damage


def _is_text(head: bytes) -> bool:
    """Whether the first bytes of a file decode as UTF-8 text."""
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # only a character cut off at the end of the sample
    return True


# --- inert stand-ins for pickled objects ------------------------------------------------------


class InertObject:
    """Stand-in for an object of a pickled class that is never imported: it records the
    constructor arguments, the state and any items pickle hands it, and does nothing else."""

    pickled_class = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertObject":
        obj = super().__new__(cls)
        obj.__dict__.update(inert_args=args, inert_state=None, inert_items=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["inert_state"] = state

    def append(self, item: Any) -> None:
        self.inert_items.append(item)

    def extend(self, items: Any) -> None:
        self.inert_items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.inert_items.append((key, value))


def stand_in(module: str, name: str) -> type[InertObject]:
    """A fresh inert class standing in for `module.name`."""
    return type(name, (InertObject,), {"pickled_class": f"{module}.{name}"})


def module_state(obj: Any) -> dict[str, Any] | None:
    """The recorded `__dict__` of a pickled nn.Module stand-in, or None for anything else."""
    if isinstance(obj, InertObject):
        state = obj.inert_state
        if isinstance(state, dict) and isinstance(state.get("_parameters"), Mapping) and isinstance(
            state.get("_modules"), Mapping
        ):
            return state
    return None


def module_tensors(obj: Any, is_tensor: Callable[[Any], bool], prefix: str = "") -> dict[str, Any]:
    """Parameters and persistent buffers of a pickled module tree (the values `is_tensor`
    accepts), with dotted names, in the order `nn.Module.state_dict` uses."""
    state = module_state(obj)
    out: dict[str, Any] = {}
    if state is None:
        return out
    for name, value in state["_parameters"].items():
        if is_tensor(value):
            out[prefix + name] = value
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_buffers") or {}).items():
        if is_tensor(value) and name not in skip:
            out[prefix + name] = value
    for name, child in state["_modules"].items():
        out.update(module_tensors(child, is_tensor, f"{prefix}{name}."))
    return out


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict without the `module.` prefix (DataParallel, possibly nested) when every key
    carries it; otherwise the same entries."""
    out = dict(state_dict)
    while out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


# --- tensor names and shapes of a checkpoint --------------------------------------------------


@dataclass(frozen=True)
class TensorShape:
    """A tensor of the pickle, known by its shape only (its data is never read)."""

    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class ConvShape:
    """A conv weight of a checkpoint: its name (without `.weight`), weight shape and the number of
    parameters (weight and bias)."""

    name: str
    shape: tuple[int, int, int, int]
    params: int


@dataclass
class CheckpointIndex:
    """Tensor names and shapes of one checkpoint (wrapper and `module.` prefixes removed) and,
    for the workbench's own format, its stored architecture and plan."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    arch: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def convs(self) -> list[ConvShape]:
        """Every 4-D `<name>.weight`, in file order, with its bias counted."""
        out = []
        for key, shape in self.shapes.items():
            if key.endswith(".weight") and len(shape) == 4:
                name = key[: -len(".weight")]
                bias = self.shapes.get(f"{name}.bias")
                params = TensorShape(shape).numel + (TensorShape(bias).numel if bias is not None else 0)
                out.append(ConvShape(name, shape, params))  # type: ignore[arg-type]
        return out


class _Storage:
    """What a persistent storage id stands for: nothing is read."""


def _rebuild_tensor(storage: Any, offset: int, size: Any, *args: Any) -> TensorShape:
    return TensorShape(tuple(int(s) for s in size))


def _rebuild_parameter(data: Any, *args: Any) -> Any:
    return data


_INDEX_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
}


class _IndexUnpickler(pickle.Unpickler):
    """Reads a torch pickle into plain containers, `TensorShape`s for tensors and inert stand-ins
    for every other class; runs no code of the file and reads no storage."""

    def find_class(self, module: str, name: str) -> Any:
        return _INDEX_GLOBALS.get((module, name)) or stand_in(module, name)

    def persistent_load(self, pid: Any) -> _Storage:
        return _Storage()


def _unpickle(handle: BinaryIO) -> Any:
    return _IndexUnpickler(handle, encoding="latin1").load()


def _read_index_object(path: Path) -> Any:
    """The top-level object of a torch file (zip or pre-zip format) with tensors as shapes."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(names) != 1:
                raise CheckpointError(f"checkpoint {path} is a zip file without one data.pkl")
            with archive.open(names[0]) as handle:
                return _unpickle(handle)
    with path.open("rb") as handle:
        if _unpickle(handle) != _LEGACY_MAGIC:
            raise CheckpointError(f"checkpoint {path} is not in a torch.save format this reader knows")
        _unpickle(handle)  # protocol version
        _unpickle(handle)  # system info
        return _unpickle(handle)


def _shapes_of(value: Any) -> dict[str, tuple[int, ...]] | None:
    """`value` as name → shape when it is a state dict or a pickled module."""
    if module_state(value) is not None:
        found = module_tensors(value, lambda v: isinstance(v, TensorShape))
    elif isinstance(value, Mapping) and value and all(
        isinstance(k, str) and isinstance(v, TensorShape) for k, v in value.items()
    ):
        found = dict(value)
    else:
        return None
    return {k: v.shape for k, v in strip_module_prefix(found).items()} or None


def index_checkpoint(path: str | Path) -> CheckpointIndex:
    """Tensor names and shapes of a checkpoint, found where `load_checkpoint` finds the weights
    (bare, under a wrapper key, in a pickled model, in the workbench format). `CheckpointError`
    for a file that is not a checkpoint or holds no weights; reading is fast even for big files,
    since only the pickle is read."""
    target = Path(path)
    check_file(target)
    try:
        obj = _read_index_object(target)
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt input can fail anywhere inside the unpickler
        raise CheckpointError(f"checkpoint {target} is corrupt or not written by torch.save ({type(exc).__name__})") from None
    if isinstance(obj, Mapping) and obj.get("format") == WORKBENCH_FORMAT:
        shapes = _shapes_of(obj.get("state_dict"))
        arch, plan = obj.get("arch"), obj.get("plan")
        return CheckpointIndex(target, shapes or {}, arch if isinstance(arch, dict) else None,
                               plan if isinstance(plan, dict) else None, dict(obj.get("metadata") or {}))
    shapes = _shapes_of(obj)
    if shapes is None and isinstance(obj, Mapping):
        shapes = next((s for key in WRAPPER_KEYS if (s := _shapes_of(obj.get(key))) is not None), None)
    if shapes is None:
        raise CheckpointError(f"checkpoint {target} holds no model weights that can be listed")
    return CheckpointIndex(target, shapes)


# --- snapshot folders and archives ------------------------------------------------------------


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


def archive_epochs(path: Path) -> list[int]:
    """The epochs a compact snapshot archive holds (its `epochs` array only, loaded once its
    header shows a size the archive holds)."""
    try:
        headers = array_headers(path)
        if "epochs" not in headers or array_nbytes(headers["epochs"]) > SMALL_ARRAY:
            raise ValueError("it has no epochs array of a readable size")
        with np.load(path, allow_pickle=False) as data:
            return sorted(int(e) for e in data["epochs"])
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as exc:
        raise SnapshotError(f"{path} is neither a snapshot directory nor a readable snapshot archive ({exc})") from None


def snapshot_epochs(path: str | Path, window: tuple[int, int] | None, step: int) -> list[int]:
    """The epochs TMI-GKP would read from a snapshot folder or archive for `window` at `step`;
    `SnapshotError` in words when the path is missing, holds no snapshots or lacks an epoch."""
    target = Path(path)
    if not target.exists():
        raise SnapshotError(f"snapshot path {target} does not exist")
    if target.is_file():
        return requested_epochs(archive_epochs(target), window, step)
    files = snapshot_files(target)
    if not files:
        raise SnapshotError(f"no snapshot files in {target}: expected one file per epoch named like {EXPECTED_NAMES}")
    return requested_epochs(sorted(files), window, step)


def requested_epochs(found: list[int], window: tuple[int, int] | None, step: int) -> list[int]:
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
        raise SnapshotError(f"missing epochs {listed} in {where} (found {epoch_ranges(found)})")
    return list(wanted)


def epoch_ranges(epochs: list[int]) -> str:
    """Sorted epochs as compact runs: "35..40, 43..70"."""
    runs: list[list[int]] = []
    for epoch in epochs:
        if runs and epoch == runs[-1][1] + 1:
            runs[-1][1] = epoch
        else:
            runs.append([epoch, epoch])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)


def array_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an .npz archive, read from the headers alone, each
    checked to hold no Python objects (whose loading would unpickle) and to need no more bytes
    than the archive stores for it (so loading cannot be made to allocate more than the file
    holds, beyond what compression gives)."""
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(member)
            if dtype.hasobject:
                raise ValueError(f"array {info.filename} holds pickled Python objects, which are never loaded")
            if array_nbytes((shape, dtype)) > info.file_size or info.file_size > _MAX_RATIO * max(1, info.compress_size):
                raise ValueError(f"array {info.filename} declares more data than the archive holds")
            headers[info.filename.removesuffix(".npy")] = (tuple(shape), dtype)
    return headers


def array_nbytes(header: tuple[tuple[int, ...], np.dtype]) -> int:
    """Bytes an array of this (shape, dtype) header takes once loaded."""
    shape, dtype = header
    return int(np.prod(shape, dtype=object)) * dtype.itemsize
