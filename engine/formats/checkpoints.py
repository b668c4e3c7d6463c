"""Reading the checkpoints users bring (state dicts in the usual wrappers, whole-model pickles
recovered without running their code) and writing the workbench's own self-describing format.

A file is data: nothing in it chooses code to import or call (a stored model factory runs only
when the user names it), and nothing in it is built before its sizes are checked against the
tensors the file actually holds."""

from __future__ import annotations

import collections
import os
import pickle
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..common.errors import (
    ArchitectureError,
    CheckpointError,
    ConfigError,
    PlanError,
    WorkbenchError,
)
from ..common.fileio import torch_save_atomic
from ..gkp.plan import PrunePlan
from ..models.architectures import (
    ArchSpec,
    build_model,
    compare_shapes,
    resolve_architecture,
    tensor_shapes,
)
from ..models.normalization import Normalization
from .listing import (
    WORKBENCH_FORMAT,
    WRAPPER_KEYS,
    InertObject,
    check_file,
    module_state,
    module_tensors,
    stand_in,
    strip_module_prefix,
)

WORKBENCH_VERSION = 1
WEIGHTS_ONLY = "state_dict"
RESTRICTED = "pickled model (restricted)"
TRUSTED = "pickled model (trusted)"
_DETAIL_CHARS = 160
# Containers, entries and nesting a loaded object may have once shared references are counted
# as often as they are reached: far above any checkpoint's, far below a memory bomb's.
MAX_ENTRIES = 5_000_000
MAX_NESTING = 100


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready to use: the model (eval mode, weights loaded, no normalisation layer),
    its architecture, the normalisation if known, and where the weights came from. `state_dict`
    is the model's own (its tensors, not a copy: the file's weights are not held twice)."""

    model: nn.Module
    arch: ArchSpec
    normalization: Normalization | None
    state_dict: dict[str, torch.Tensor]
    path: Path
    source_format: str
    metadata: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None


@dataclass
class StateDictFile:
    """The weights found in one file: the state dict (prefixes stripped), how they were stored
    (e.g. "state_dict['model_state_dict']") and the wrapper's scalar entries."""

    state_dict: dict[str, torch.Tensor]
    source_format: str
    metadata: dict[str, Any]


# --- public API -------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    normalization: Normalization | None = None,
    trust_pickle: bool = False,
) -> LoadedCheckpoint:
    """Load a checkpoint file into its model. `arch` overrides inference (see
    `engine.models.architectures`); `normalization` overrides the stored one; `trust_pickle` allows a
    full, code-executing unpickle of whole-model pickles."""
    target = Path(path)
    obj, base = _read_object(target, trust_pickle)
    if isinstance(obj, dict) and obj.get("format") == WORKBENCH_FORMAT:
        return _load_workbench(target, obj, arch, normalization, trust_pickle)
    found = _extract(target, obj, base)
    spec = resolve_architecture(arch, found.state_dict)
    model = _instantiate(target, spec, found.state_dict, None)
    return LoadedCheckpoint(
        model, spec, normalization, model.state_dict(), target, found.source_format, found.metadata, None
    )


def read_state_dict(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> StateDictFile:
    """Just the weights of a checkpoint file (any supported storage form), without building a
    model; `CheckpointError` when the file holds none or holds impossible tensors."""
    target = Path(path)
    obj, base = _read_object(target, trust_pickle)
    return _extract(target, obj, base)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: ArchSpec,
    normalization: Normalization,
    *,
    plan: PrunePlan | dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write `model` (the bare network, without a normalisation wrapper) atomically in the
    gkp-workbench format, which reloads with `weights_only=True` and records everything needed
    to rebuild it."""
    if not isinstance(normalization, Normalization):
        raise ConfigError("a workbench checkpoint must record the model's input normalisation")
    described = {
        "arch": arch.to_dict(),
        "plan": plan.to_dict() if isinstance(plan, PrunePlan) else plan,
        "metadata": dict(metadata or {}),
    }
    for name, value in described.items():
        _check_plain(value, name)
    record = {
        "format": WORKBENCH_FORMAT,
        "version": WORKBENCH_VERSION,
        "normalization": normalization.to_dict(),
        "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        **described,
    }
    torch_save_atomic(record, path)


# --- reading files ----------------------------------------------------------------------------


def _read_object(path: Path, trust_pickle: bool) -> tuple[Any, str]:
    """The top-level object of a torch-saved file and how it was read: weights-only first, then
    the restricted unpickler, or (only with `trust_pickle`) a full unpickle."""
    check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _plain(path, torch.load(path, map_location="cpu", weights_only=True)), WEIGHTS_ONLY
    except Exception:  # any failure here is diagnosed by the stricter paths below
        pass
    if trust_pickle:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a trusted unpickle may fail in arbitrary user code
            raise CheckpointError(f"checkpoint {path} could not be unpickled even with trust: {_detail(exc)}") from None
        return _plain(path, obj), TRUSTED
    foreign: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle(foreign))
    except Exception as exc:  # corrupt input can fail anywhere inside the unpickler
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not written by torch.save: {_detail(exc)}") from None
    obj = _plain(path, obj)
    if foreign and not _holds_tensors(obj):
        raise CheckpointError(_needs_trust(path, foreign))
    return obj, RESTRICTED


def _plain(path: Path, obj: Any) -> Any:
    """`obj` with every dict subclass (an OrderedDict may carry attributes from the file that
    shadow its methods) rebuilt as a plain dict, also inside pickled-object stand-ins; shared
    references are rebuilt once, but counted each time they are reached, so a small file cannot
    expand into MAX_ENTRIES entries, and circular or deeper than MAX_NESTING is refused."""
    done: dict[int, Any] = {}
    sizes: dict[int, int] = {}
    path_ids: set[int] = set()

    def rebuild(value: Any, depth: int) -> tuple[Any, int]:
        key = id(value)
        if key in done:
            return done[key], sizes[key]
        if not isinstance(value, (dict, list, tuple, InertObject)):
            return value, 1
        if depth > MAX_NESTING or key in path_ids:
            raise CheckpointError(f"checkpoint {path} holds data nested circularly or more than {MAX_NESTING} deep")
        path_ids.add(key)
        total = 1
        if isinstance(value, dict):
            out: Any = {}
            for k, v in dict.items(value):
                out[k], size = rebuild(v, depth + 1)
                total += size
        elif isinstance(value, InertObject):
            out = value
            for name in ("inert_args", "inert_state", "inert_items"):
                value.__dict__[name], size = rebuild(value.__dict__[name], depth + 1)
                total += size
        else:
            items = []
            for item in value:
                rebuilt, size = rebuild(item, depth + 1)
                items.append(rebuilt)
                total += size
            out = items if isinstance(value, list) else tuple(items)
        if total > MAX_ENTRIES:
            raise CheckpointError(f"checkpoint {path} expands to more than {MAX_ENTRIES:,} entries; it is not a checkpoint")
        path_ids.discard(key)
        done[key], sizes[key] = out, total
        return out, total

    return rebuild(obj, 0)[0]


def _detail(exc: BaseException) -> str:
    """First sentence of an exception message, shortened, for the end of an error sentence."""
    text = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _needs_trust(path: Path, foreign: list[str]) -> str:
    """Error text for a pickle whose weights only exist after running the code it names."""
    return (
        f"the weights in checkpoint {path} cannot be recovered without running the code of {foreign[0]}; "
        "if you trust its source, allow code from files with --trust-pickle (model.trust_pickle in a config)"
    )


# --- restricted unpickling --------------------------------------------------------------------


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals the restricted unpickler resolves: tensor rebuilders and plain containers."""
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    }
    for module in ("builtins", "__builtin__"):
        allowed.update({(module, "set"): set, (module, "frozenset"): frozenset})
    allowed.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    return allowed


def _restricted_pickle(foreign: list[str]) -> types.SimpleNamespace:
    """A `pickle_module` for `torch.load` (which supplies storages through persistent_load)
    whose unpickler maps every global outside the allowlist to an inert stand-in class and
    records its name in `foreign`."""
    allowed = _allowed_globals()
    stand_ins: dict[tuple[str, str], type] = {}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            key = (module, name)
            if key in allowed:
                return allowed[key]
            if key not in stand_ins:
                foreign.append(f"{module}.{name}")
                stand_ins[key] = stand_in(module, name)
            return stand_ins[key]

    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="gkp_restricted_pickle", Unpickler=RestrictedUnpickler, load=load)


def _holds_tensors(obj: Any) -> bool:
    """Whether a restricted unpickle found weights, bare or under a wrapper key."""
    return _as_state_dict(obj) is not None or (
        isinstance(obj, Mapping) and any(_as_state_dict(obj.get(k)) is not None for k in WRAPPER_KEYS)
    )


# --- finding the weights ----------------------------------------------------------------------


def _as_state_dict(value: Any) -> dict[str, torch.Tensor] | None:
    """`value` as a state dict: a mapping of names to tensors, a module, or a pickled module's
    stand-in; None when it is none of these."""
    if isinstance(value, nn.Module):
        return {k: v.detach() for k, v in value.state_dict().items()}
    if module_state(value) is not None:
        tensors = module_tensors(value, lambda v: isinstance(v, torch.Tensor))
        return {k: v.detach() for k, v in tensors.items()} or None
    if isinstance(value, Mapping) and value and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        return dict(value)
    return None


def _scalars(wrapper: Mapping[str, Any]) -> dict[str, Any]:
    """The wrapper's scalar entries (epoch, best accuracy, ...), 0-d tensors as numbers."""
    out: dict[str, Any] = {}
    for key, value in wrapper.items():
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            value = value.item()
        if isinstance(key, str) and isinstance(value, (bool, int, float, str)):
            out[key] = value
    return out


def _extract(path: Path, obj: Any, base: str) -> StateDictFile:
    """Locate the state dict in a loaded object: bare, or under one of WRAPPER_KEYS."""
    found = _as_state_dict(obj)
    if found is not None:
        return StateDictFile(_checked_tensors(path, strip_module_prefix(found)), base, {})
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            found = _as_state_dict(obj.get(key))
            if found is not None:
                label = f"{base}[{key!r}]" if base == WEIGHTS_ONLY else f"{base} under [{key!r}]"
                return StateDictFile(_checked_tensors(path, strip_module_prefix(found)), label, _scalars(obj))
        keys = ", ".join(repr(k) for k in list(obj)[:5]) or "none"
        raise CheckpointError(f"checkpoint {path} holds no model weights (a dict with keys {keys})")
    if isinstance(obj, torch.Tensor):
        raise CheckpointError(f"checkpoint {path} holds a single tensor of shape {tuple(obj.shape)}, not a model's weights")
    kind = obj.pickled_class if isinstance(obj, InertObject) else type(obj).__name__
    raise CheckpointError(f"checkpoint {path} holds a {kind} object, not a model's weights")


def _checked_tensors(path: Path, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` once every tensor is a plain dense one whose declared size its stored data
    covers (a view can claim any shape over a few bytes) and whose values are real, finite
    numbers or integers; `CheckpointError` naming the first tensor that is not."""
    for key, tensor in state_dict.items():
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_complex() or tensor.dtype == torch.bool:
            raise CheckpointError(
                f"checkpoint {path} stores {key} as a {tensor.dtype} {str(tensor.layout).removeprefix('torch.')} tensor; "
                "weights must be dense real numbers"
            )
        storage = tensor.untyped_storage().nbytes() // max(1, tensor.element_size()) - tensor.storage_offset()
        if tensor.numel() > storage:
            raise CheckpointError(
                f"checkpoint {path} declares {key} of shape {tuple(tensor.shape)} over {max(0, storage)} stored values"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint {path} has NaN or infinite values in {key}")
    return state_dict


# --- models -----------------------------------------------------------------------------------


def _instantiate(path: Path, spec: ArchSpec, state_dict: dict[str, torch.Tensor], plan: dict[str, Any] | None) -> nn.Module:
    """Build `spec` (with the plan's grouped convolutions when pruned), load the weights strictly
    and switch to eval mode. A built-in architecture is first built on the meta device, which
    allocates nothing, and checked against the weights' keys, shapes and kinds of value, so a
    stored spec or plan cannot make the real build larger than the weights the file holds."""
    try:
        parsed = None if plan is None else PrunePlan.from_dict(plan)
        if spec.family != "custom":
            with torch.device("meta"):
                _check_fit(path, spec, _structure(spec, parsed), state_dict)
        model = _structure(spec, parsed)
    except PlanError as exc:
        raise CheckpointError(f"checkpoint {path} holds a pruning plan that does not fit its model: {exc}") from None
    if spec.family == "custom":
        _check_fit(path, spec, model, state_dict)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise ArchitectureError(f"the weights do not load into {spec.describe()}: {_detail(exc)}") from None
    return model.eval()


def _structure(spec: ArchSpec, plan: PrunePlan | None) -> nn.Module:
    """A fresh model for `spec` with the plan's pruned layers in place."""
    model = build_model(spec)
    if plan is not None:
        from ..gkp.reconstruct import (
            install_plan_structure,  # deferred: pruned checkpoints only
        )

        install_plan_structure(model, plan)
    return model


def _check_fit(path: Path, spec: ArchSpec, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """`ArchitectureError` unless the weights have exactly the model's keys and shapes, and
    `CheckpointError` when one holds integers where the model keeps real numbers or the reverse
    (loading would cast them silently)."""
    expected = model.state_dict()
    mismatch = compare_shapes(tensor_shapes(expected), tensor_shapes(state_dict))
    if mismatch.total:
        raise ArchitectureError(f"the weights in {path} do not fit {spec.describe()}: {mismatch.summary()}")
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() != expected[key].is_floating_point():
            raise CheckpointError(
                f"checkpoint {path} stores {key} as {tensor.dtype}, but the model keeps {expected[key].dtype} there"
            )


def _load_workbench(
    path: Path, obj: dict[str, Any], arch: str | None, normalization: Normalization | None, trust_pickle: bool
) -> LoadedCheckpoint:
    """A checkpoint in the workbench's own format: stored architecture, normalisation and plan. A
    stored model factory is used only when `arch` names it too or `trust_pickle` is set."""
    version = obj.get("version")
    if version != WORKBENCH_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has gkp-workbench format version {version!r}; this version reads {WORKBENCH_VERSION}"
        )
    state_dict = _as_state_dict(obj.get("state_dict"))
    plan, metadata = obj.get("plan"), obj.get("metadata") or {}
    if state_dict is None or not (plan is None or isinstance(plan, dict)) or not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint {path} is a damaged gkp-workbench checkpoint (weights, plan or metadata unreadable)")
    state_dict = _checked_tensors(path, state_dict)
    record = obj.get("arch")
    factory = record.get("name") if isinstance(record, dict) and record.get("family") == "custom" else None
    chosen = arch is not None and arch.strip() == factory
    if factory is not None and arch is None and not trust_pickle:
        raise ArchitectureError(
            f"checkpoint {path} names its architecture by the model factory {str(factory)[:80]!r}, code that loading "
            f"would import and call; if you trust the file, name it yourself with --arch {str(factory)[:80]} "
            "(or allow code from files with --trust-pickle)"
        )
    stored_norm = obj.get("normalization")
    try:
        norm = normalization or (Normalization.from_dict(stored_norm) if stored_norm is not None else None)
        spec = ArchSpec.from_dict(record, allow_factory=lambda name: name == factory) if arch is None or chosen else None
    except WorkbenchError as exc:
        raise CheckpointError(f"checkpoint {path} is a damaged gkp-workbench checkpoint: {exc}") from None
    if spec is None:
        if plan is not None:
            raise ArchitectureError(f"checkpoint {path} is pruned and records its own architecture; drop the override")
        spec = resolve_architecture(arch, state_dict)
    model = _instantiate(path, spec, state_dict, plan)
    return LoadedCheckpoint(model, spec, norm, model.state_dict(), path, f"{WORKBENCH_FORMAT} v{version}", metadata, plan)


def _check_plain(value: Any, where: str) -> None:
    """Reject values a weights-only load could not read back (anything but JSON-like data)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"checkpoint {where} keys must be strings, not {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise ConfigError(
        f"checkpoint {where} is of type {type(value).__name__}; use numbers, strings, lists or dicts"
    )
