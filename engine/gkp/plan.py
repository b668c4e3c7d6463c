"""The pruning plan: per pruned layer its filter groups and the input channels each group keeps,
with the method, every parameter, and the skipped layers. Serialises to stable JSON.

Two optional parts serve the methods whose result is not a grouped conv: `masks` (kernel or
weight masks learned by in-train pruning, kept as zeroed weights) and `filters` (whole filters
removed by L1-norm filter pruning). A plan with either is written as version 2, which readers
of version 1 refuse rather than misread; plans without them stay version 1."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..common.checks import is_whole
from ..common.errors import PlanError
from ..common.fileio import write_text_atomic

PLAN_VERSION = 1
MASKED_PLAN_VERSION = 2  # a plan with `masks` or `filters`
PLAN_VERSIONS: tuple[int, ...] = (PLAN_VERSION, MASKED_PLAN_VERSION)
MASK_GRANULARITIES: tuple[str, ...] = ("kernel", "weight")
# Bounds on what a plan read from a file may declare, checked before anything is built from it.
MAX_CHANNELS = 65_536
MAX_KERNEL = 1024


@dataclass
class LayerPlan:
    """One pruned conv: `filter_groups[g]` are the output filters of group g (ascending) and
    `kept_channels[g]` the S input channels that group keeps (ascending)."""

    name: str
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    filter_groups: list[list[int]]
    kept_channels: list[list[int]]
    grouping: str
    selection: str
    score: float | None = None

    @property
    def groups(self) -> int:
        return len(self.filter_groups)

    @property
    def kept(self) -> int:
        return len(self.kept_channels[0])

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the layer's kernels pruned."""
        return 1.0 - self.kept / self.in_channels

    def check(self) -> None:
        """Raise `PlanError` unless the groups partition the filters equally and every group
        keeps the same number of distinct, in-range input channels."""
        n = len(self.filter_groups)
        if n == 0 or len(self.kept_channels) != n:
            raise PlanError(f"{self.name}: {n} filter groups but {len(self.kept_channels)} kept lists")
        flat = sorted(i for group in self.filter_groups for i in group)
        if flat != list(range(self.out_channels)):
            raise PlanError(f"{self.name}: filter groups do not partition its {self.out_channels} filters")
        if len({len(g) for g in self.filter_groups}) != 1:
            raise PlanError(f"{self.name}: filter groups differ in size")
        sizes = {len(k) for k in self.kept_channels}
        if len(sizes) != 1 or not 1 <= sizes.pop() <= self.in_channels:
            raise PlanError(f"{self.name}: groups keep different or impossible channel counts")
        for kept in self.kept_channels:
            if len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= self.in_channels:
                raise PlanError(f"{self.name}: kept channels repeat or fall outside 0..{self.in_channels - 1}")

    def check_conv(self, module: nn.Module | None) -> None:
        """Raise `PlanError` unless `module` is a dense Conv2d of the shape this layer was planned for."""
        if module is None:
            raise PlanError(f"plan layer {self.name!r} does not exist in this model")
        if not isinstance(module, nn.Conv2d) or module.groups != 1:
            raise PlanError(f"plan layer {self.name!r} is not a dense Conv2d in this model")
        shape = (module.out_channels, module.in_channels, *module.kernel_size)
        planned = (self.out_channels, self.in_channels, *self.kernel_size)
        if shape != planned:
            raise PlanError(f"plan layer {self.name!r} expects weight {planned}, model has {shape}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kernel_size"] = list(self.kernel_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerPlan":
        """A layer entry read from a file: its sizes are checked against MAX_CHANNELS and
        MAX_KERNEL before any list in it is copied, then the entry itself (`check`)."""
        try:
            name = data["name"]
            if not isinstance(name, str):
                raise TypeError(f"layer name {name!r} is not text")
            sizes = (data["out_channels"], data["in_channels"], *data["kernel_size"])
            limits = (MAX_CHANNELS, MAX_CHANNELS, MAX_KERNEL, MAX_KERNEL)
            if len(sizes) != 4 or not all(is_whole(v) and 1 <= v <= top for v, top in zip(sizes, limits)):
                raise ValueError(f"{name}: channel counts and kernel size must be whole numbers within "
                                 f"{MAX_CHANNELS} and {MAX_KERNEL}, got {sizes}")
            out_channels, in_channels = sizes[0], sizes[1]
            groups, kept = data["filter_groups"], data["kept_channels"]
            if not _short_lists(groups, out_channels) or not _short_lists(kept, out_channels * in_channels):
                raise ValueError(f"{name}: filter_groups and kept_channels must be lists of index lists "
                                 f"no longer than the layer's {out_channels} filters and {in_channels} channels")
            layer = cls(
                name=name,
                out_channels=out_channels,
                in_channels=in_channels,
                kernel_size=(sizes[2], sizes[3]),
                filter_groups=[[int(i) for i in g] for g in groups],
                kept_channels=[sorted(int(i) for i in k) for k in kept],
                grouping=str(data["grouping"]),
                selection=str(data["selection"]),
                score=None if data.get("score") is None else float(data["score"]),
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            detail = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise PlanError(f"malformed layer entry in plan: {detail}") from None
        layer.check()
        return layer


def _short_lists(value: Any, total: int) -> bool:
    """Whether `value` is a list of at most `total` lists of whole numbers, `total` entries in all
    (lengths are compared before any entry is read)."""
    return (
        isinstance(value, list) and len(value) <= total and all(isinstance(v, list) for v in value)
        and sum(len(v) for v in value) <= total and all(is_whole(i) for v in value for i in v)
    )


@dataclass
class MaskLayer:
    """A conv whose pruned weights are zeroed, not removed: `bits` is the keep mask (1 = kept),
    row-major over `(C_out, C_in)` for `kernel` granularity or the whole weight for `weight`,
    packed 8 entries a byte (most significant bit first) and written in hex; `kept` counts the
    ones."""

    name: str
    granularity: str
    weight_shape: tuple[int, int, int, int]
    kept: int
    bits: str

    @property
    def mask_shape(self) -> tuple[int, ...]:
        return self.weight_shape[:2] if self.granularity == "kernel" else self.weight_shape

    @property
    def pruned_share(self) -> float:
        """Fraction of mask entries pruned."""
        return 1.0 - self.kept / int(np.prod(self.mask_shape))

    @classmethod
    def from_keep(cls, name: str, granularity: str, weight_shape: tuple[int, ...], keep: torch.Tensor) -> "MaskLayer":
        flat = keep.detach().to("cpu", torch.bool).flatten().numpy()
        layer = cls(name, granularity, tuple(int(d) for d in weight_shape), int(flat.sum()),  # type: ignore[arg-type]
                    np.packbits(flat).tobytes().hex())
        layer.check()
        return layer

    def keep(self) -> torch.Tensor:
        """The keep mask as a bool tensor of `mask_shape`."""
        n = int(np.prod(self.mask_shape))
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(self.bits), dtype=np.uint8))[:n]
        return torch.from_numpy(bits.astype(bool)).reshape(self.mask_shape)

    def weight_keep(self) -> torch.Tensor:
        """The keep mask broadcast to the full weight shape (float 0/1)."""
        keep = self.keep().float()
        return keep[:, :, None, None].expand(self.weight_shape) if self.granularity == "kernel" else keep

    def check(self) -> None:
        """Raise `PlanError` unless granularity, shape, bit string and count agree."""
        if self.granularity not in MASK_GRANULARITIES:
            raise PlanError(f"{self.name}: mask granularity must be one of {', '.join(MASK_GRANULARITIES)}")
        if len(self.weight_shape) != 4 or min(self.weight_shape) < 1:
            raise PlanError(f"{self.name}: a masked layer needs a 4-d conv weight shape, got {self.weight_shape}")
        n = int(np.prod(self.mask_shape))
        try:
            packed = bytes.fromhex(self.bits)
        except ValueError:
            raise PlanError(f"{self.name}: mask bits are not hexadecimal") from None
        if len(packed) != (n + 7) // 8 or int(self.keep().sum()) != self.kept:
            raise PlanError(f"{self.name}: mask bits do not hold {n} entries with {self.kept} kept")

    def check_conv(self, module: nn.Module | None) -> None:
        if module is None:
            raise PlanError(f"masked layer {self.name!r} does not exist in this model")
        if not isinstance(module, nn.Conv2d) or tuple(module.weight.shape) != tuple(self.weight_shape):
            raise PlanError(f"masked layer {self.name!r} expects a conv weight {tuple(self.weight_shape)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MaskLayer":
        """A mask entry read from a file: its shape is checked against MAX_CHANNELS and MAX_KERNEL
        and the bit string's length against it before any bit is read, then the entry (`check`)."""
        try:
            shape = data["weight_shape"]
            limits = (MAX_CHANNELS, MAX_CHANNELS, MAX_KERNEL, MAX_KERNEL)
            if not isinstance(shape, list) or len(shape) != 4 or not all(
                    is_whole(v) and 1 <= v <= top for v, top in zip(shape, limits)):
                raise ValueError(f"weight_shape must be 4 whole numbers within {MAX_CHANNELS} and {MAX_KERNEL}")
            bits, kept = data["bits"], data["kept"]
            if not isinstance(bits, str) or len(bits) > 2 * (shape[0] * shape[1] * shape[2] * shape[3] + 7) // 8 \
                    or not is_whole(kept):
                raise ValueError("bits must be a hex string no longer than the mask it holds, kept a whole number")
            layer = cls(str(data["name"]), str(data["granularity"]), tuple(shape), kept, bits)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise PlanError(f"malformed mask entry in plan: {detail}") from None
        layer.check()
        return layer

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["weight_shape"] = list(self.weight_shape)
        return data


@dataclass
class FilterLayer:
    """A conv whose filters outside `kept` (ascending) are removed physically, with what reads them."""

    name: str
    out_channels: int
    kept: list[int]

    def check(self) -> None:
        if not self.kept or len(set(self.kept)) != len(self.kept) or self.kept != sorted(self.kept) \
                or self.kept[0] < 0 or self.kept[-1] >= self.out_channels:
            raise PlanError(f"{self.name}: kept filters must be distinct ascending indices in 0..{self.out_channels - 1}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FilterLayer":
        """A filter entry read from a file, its size bounded by MAX_CHANNELS before the list is read."""
        try:
            filters, kept = data["out_channels"], data["kept"]
            if not (is_whole(filters) and 1 <= filters <= MAX_CHANNELS) or not _short_lists([kept], filters):
                raise ValueError(f"out_channels must be a whole number within {MAX_CHANNELS} and kept a list of "
                                 "at most that many indices")
            layer = cls(str(data["name"]), filters, [int(i) for i in kept])
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise PlanError(f"malformed filter entry in plan: {detail}") from None
        layer.check()
        return layer


@dataclass
class SkippedLayer:
    """A conv the plan leaves dense, and why."""

    name: str
    reason: str


@dataclass
class PrunePlan:
    """Everything needed to rebuild a pruned model from its dense checkpoint."""

    method: str
    params: dict[str, Any]
    layers: list[LayerPlan]
    skipped: list[SkippedLayer] = field(default_factory=list)
    arch: dict[str, Any] | None = None
    masks: list[MaskLayer] = field(default_factory=list)
    filters: list[FilterLayer] = field(default_factory=list)

    @property
    def version(self) -> int:
        return MASKED_PLAN_VERSION if self.masks or self.filters else PLAN_VERSION

    @property
    def pruned_count(self) -> int:
        """How many convs the plan prunes: grouped, masked or filter-pruned."""
        return len(self.layers) + len(self.masks) + len(self.filters)

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "version": self.version,
            "method": self.method,
            "params": self.params,
            "arch": self.arch,
            "layers": [layer.to_dict() for layer in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
        }
        if self.masks:
            data["masks"] = [m.to_dict() for m in self.masks]
        if self.filters:
            data["filters"] = [asdict(f) for f in self.filters]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        write_text_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any) -> "PrunePlan":
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list) or "method" not in data:
            raise PlanError("not a pruning plan (expects an object with 'method' and a list of 'layers')")
        if data.get("version") not in PLAN_VERSIONS:
            raise PlanError(f"plan version {data.get('version')!r} is not supported (expects one of {PLAN_VERSIONS})")
        try:
            skipped = [SkippedLayer(str(s["name"]), str(s["reason"])) for s in data.get("skipped", [])]
            masks = [MaskLayer.from_dict(m) for m in data.get("masks", [])]
            filters = [FilterLayer.from_dict(f) for f in data.get("filters", [])]
        except (KeyError, TypeError) as exc:
            raise PlanError(f"malformed skipped-layer, mask or filter entry in plan: {exc!r}") from None
        plan = cls(
            method=str(data["method"]),
            params=dict(data.get("params") or {}),
            layers=[LayerPlan.from_dict(entry) for entry in data["layers"]],
            skipped=skipped,
            arch=data.get("arch"),
            masks=masks,
            filters=filters,
        )
        if plan.version != data["version"]:
            raise PlanError(f"plan version {data['version']} does not match its content (expects {plan.version})")
        if plan.filters and (plan.layers or plan.masks):
            raise PlanError("a plan removes whole filters or prunes kernels, not both")
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PrunePlan":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PlanError(f"cannot read plan {path}: {exc.strerror}") from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan {path} is not valid JSON: {exc}") from None

    def check_fits(self, model: nn.Module) -> None:
        """Raise `PlanError` naming the first layer of the plan that `model` does not have in the
        shape the plan was made for."""
        modules = dict(model.named_modules())
        for layer in self.layers:
            layer.check_conv(modules.get(layer.name))
        for mask in self.masks:
            mask.check_conv(modules.get(mask.name))
        for filt in self.filters:
            conv = modules.get(filt.name)
            if not isinstance(conv, nn.Conv2d) or conv.out_channels != filt.out_channels:
                raise PlanError(f"plan layer {filt.name!r} expects a conv with {filt.out_channels} filters in this model")
