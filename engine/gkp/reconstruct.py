"""Reconstruction of pruned layers (SPEC §5): each planned conv becomes a dense grouped
convolution that gathers its kept input channels and returns outputs in the original channel
order, so BatchNorm, shortcuts and the next layer stay untouched. Also the zero-masked dense
reference, the `grouped` / `dense` / `auto` deployment forms and pruned-checkpoint structure,
for a plan's kernel or weight masks (zeroed weights) and removed filters too."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..common.devices import exact_fp32, resolve_device
from ..common.errors import ConfigError
from ..models.latency import measure_latency
from ..models.surgery import remove_filters, silence_filters, silenced_tensors
from .masked import ZeroMaskedConv
from .plan import LayerPlan, PrunePlan

FORMS: tuple[str, ...] = ("grouped", "dense", "auto")
# `auto` keeps a layer grouped only when it beats the dense form by more than this fraction,
# and keeps the whole model's grouped layers only if the model is not slower by more than it.
AUTO_MARGIN = 0.05
# The whole-model guard times original and deployed model alternately this many times and
# compares the fastest of each, so one load spike cannot decide it.
GUARD_ROUNDS = 3

LayerTimer = Callable[[nn.Module, torch.Tensor], float]
"""Milliseconds one forward of the module takes on the given input (injectable for tests)."""


def _is_channels_last(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)


def _select_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x.index_select(1, index)` that keeps a channels-last tensor channels-last: there it
    gathers along the contiguous channel axis of the (pixels, channels) view, which is several
    times cheaper than `index_select` across planes followed by a layout conversion."""
    if not _is_channels_last(x):
        return x.index_select(1, index)
    b, c, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
    picked = torch.gather(pixels, 1, index.expand(b * h * w, -1))
    return picked.view(b, h, w, -1).permute(0, 3, 1, 2)


class GroupedKernelConv(nn.Conv2d):
    """A GKP-pruned conv: gathers each group's kept input channels (`input_index`), runs one
    grouped convolution and puts the outputs back in the original channel order (`output_order`).
    As an `nn.Conv2d` with `in_channels = groups * kept` it is counted, trained and moved like
    any conv; `dense_in_channels` is the original C_in."""

    def __init__(
        self,
        dense_in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        *,
        groups: int,
        kept: int,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            groups * kept, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
            device=device, dtype=dtype,
        )
        self.dense_in_channels = dense_in_channels
        self.kept = kept
        self.register_buffer("input_index", torch.zeros(groups, kept, dtype=torch.long, device=device))
        self.register_buffer("output_order", torch.arange(out_channels, device=device))

    def reset_parameters(self) -> None:
        """Zeros, not a random init: the weights always come from a dense conv or a state dict,
        and building the structure must not consume the global RNG."""
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def empty(cls, layer_plan: LayerPlan, conv: nn.Conv2d) -> "GroupedKernelConv":
        """Zero-weight module with `conv`'s hyper-parameters, device and dtype and the plan's
        indices: the structure a pruned state dict is loaded into."""
        layer_plan.check()
        layer_plan.check_conv(conv)
        module = cls(
            layer_plan.in_channels, layer_plan.out_channels, layer_plan.kernel_size,
            groups=layer_plan.groups, kept=layer_plan.kept, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        order = torch.tensor([i for group in layer_plan.filter_groups for i in group])
        with torch.no_grad():  # `copy_` moves the indices onto the module's device
            module.input_index.copy_(torch.tensor(layer_plan.kept_channels))
            module.output_order.copy_(torch.argsort(order))
        if _is_channels_last(conv.weight):
            module.to(memory_format=torch.channels_last)
        return module

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, layer_plan: LayerPlan) -> "GroupedKernelConv":
        """The pruned layer: `conv`'s kept grouped kernels packed group by group."""
        module = cls.empty(layer_plan, conv)
        with torch.no_grad():
            module.weight.copy_(conv.weight[module._kernel_index()].reshape(module.weight.shape))
            if conv.bias is not None:
                module.bias.copy_(conv.bias[module.filter_order()])
        return module

    def _kernel_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(filter, input channel) of every kept kernel, each `(groups, C_out/groups, kept)`, in
        the order of this module's weight."""
        n, kept = self.groups, self.kept
        m = self.out_channels // n
        rows = self.filter_order().view(n, m, 1).expand(n, m, kept)
        cols = self.input_index.view(n, 1, kept).expand(n, m, kept)
        return rows, cols

    def filter_order(self) -> torch.Tensor:
        """Original index of each output of the grouped conv (the inverse of `output_order`)."""
        return torch.argsort(self.output_order)

    def to_dense_conv(self) -> nn.Conv2d:
        """The equivalent ungrouped `nn.Conv2d` over all `dense_in_channels`, pruned kernels zero."""
        dense = nn.utils.skip_init(
            nn.Conv2d, self.dense_in_channels, self.out_channels, self.kernel_size,
            stride=self.stride, padding=self.padding, dilation=self.dilation,
            bias=self.bias is not None, padding_mode=self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.dense_bias())
        if _is_channels_last(self.weight):
            dense.to(memory_format=torch.channels_last)
        return dense

    def dense_weight(self) -> torch.Tensor:
        """The `(C_out, dense C_in, kh, kw)` weight, pruned kernels zero; differentiable in `weight`."""
        rows, cols = self._kernel_index()
        dense = self.weight.new_zeros(self.out_channels, self.dense_in_channels, *self.kernel_size)
        dense = dense.index_put((rows, cols), self.weight.reshape(*rows.shape, *self.kernel_size))
        return dense.contiguous(memory_format=torch.channels_last) if _is_channels_last(self.weight) else dense

    def dense_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[self.output_order]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            # Same outputs and gradients as the grouped path below, but autograd through one dense
            # conv runs several times faster than through the gather, grouped conv and permutation
            # (6x per training step on the sample ResNet-20, CPU): training and gradient attacks
            # cost what they cost unpruned, as in the papers' masked training.
            weight, bias = self.dense_weight(), self.dense_bias()
            if self.padding_mode != "zeros":
                x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
                return F.conv2d(x, weight, bias, self.stride, 0, self.dilation)
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        y = self._conv_forward(_select_channels(x, self.input_index.view(-1)), self.weight, self.bias)
        return _select_channels(y, self.output_order)

    def extra_repr(self) -> str:
        return f"dense_in_channels={self.dense_in_channels}, kept={self.kept}, " + super().extra_repr()


@dataclass(frozen=True)
class DeployChoice:
    """How one pruned layer is deployed (`requested` is the form asked of `apply_plan`); timings
    only when `auto` measured them."""

    requested: str
    form: str
    grouped_ms: float | None = None
    dense_ms: float | None = None
    input_shape: tuple[int, ...] | None = None
    note: str = ""


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def _filters_kept(plan: PrunePlan) -> dict[str, list[int]]:
    return {f.name: f.kept for f in plan.filters}


def install_plan_structure(model: nn.Module, plan: PrunePlan) -> None:
    """In place: swap every planned conv for an empty `GroupedKernelConv` of the right shapes
    (a `ZeroMaskedConv` for a masked one; smaller convs where filters are removed), so a pruned
    model's state dict loads with `strict=True`."""
    plan.check_fits(model)
    for layer in plan.layers:
        _replace(model, layer.name, GroupedKernelConv.empty(layer, model.get_submodule(layer.name)))
    for mask in plan.masks:
        _replace(model, mask.name, ZeroMaskedConv(model.get_submodule(mask.name), mask))
    if plan.filters:
        remove_filters(model, _filters_kept(plan))


def masked_dense(model: nn.Module, plan: PrunePlan, *, share_unplanned: bool = False) -> nn.Module:
    """A copy of `model` whose planned convs keep only their kept kernels (the others zeroed):
    the reference every reconstruction must match. `share_unplanned` copies only the tensors the
    plan writes (planned and masked convs' weights, removed filters' conv and BatchNorm terms) and
    reuses every other parameter and buffer of `model` (less memory, for a reference that is only
    run, never trained)."""
    plan.check_fits(model)
    written = [
        *(model.get_submodule(layer.name).weight for layer in plan.layers),
        *(model.get_submodule(mask.name).weight for mask in plan.masks),
        *silenced_tensors(model, _filters_kept(plan)),
    ]
    planned = {id(t) for t in written}
    tensors = (*model.parameters(), *model.buffers()) if share_unplanned else ()
    masked = copy.deepcopy(model, memo={id(t): t for t in tensors if id(t) not in planned})
    for layer in plan.layers:
        conv = masked.get_submodule(layer.name)
        keep = conv.weight.new_zeros(layer.out_channels, layer.in_channels)
        for filters, kept in zip(layer.filter_groups, layer.kept_channels):
            keep[torch.tensor(filters)[:, None], torch.tensor(kept)[None, :]] = 1
        with torch.no_grad():
            conv.weight.mul_(keep[:, :, None, None])
    for mask in plan.masks:
        conv = masked.get_submodule(mask.name)
        with torch.no_grad():
            conv.weight.mul_(torch.empty_like(conv.weight).copy_(mask.weight_keep()))
    if plan.filters:
        silence_filters(masked, _filters_kept(plan))
    return masked


def dense_equivalent(model: nn.Module) -> nn.Module:
    """A copy of `model` with every pruned layer in its dense form (pruned kernels zero), or
    `model` itself when none is pruned: the same function for measuring accuracy, at the unpruned
    model's speed (narrow grouped layers infer several times slower on a CPU)."""
    pruned = [name for name, module in model.named_modules() if isinstance(module, (GroupedKernelConv, ZeroMaskedConv))]
    if not pruned:
        return model
    dense = copy.deepcopy(model)
    for name in pruned:
        _replace(dense, name, dense.get_submodule(name).to_dense_conv())
    return dense


def _input_shapes(
    model: nn.Module, names: Iterable[str], example_input: torch.Tensor
) -> dict[str, tuple[torch.Size, bool]]:
    """Input shape (and whether it is channels-last) of each named module on `example_input`."""
    seen: dict[str, tuple[torch.Size, bool]] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen.setdefault(name, (args[0].shape, _is_channels_last(args[0])))
        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen


def _default_timer(module: nn.Module, x: torch.Tensor) -> float:
    """The 10th-percentile call time: on a shared machine, load spikes inflate the median of one
    form and not the other, while the fast tail tracks what the layer itself costs."""
    return measure_latency(module, x, device=x.device, warmup=2, repeats=15, min_seconds=0.02).p10_ms


def _choose_auto(
    model: nn.Module,
    plan: PrunePlan,
    example_input: torch.Tensor,
    timer: LayerTimer,
) -> tuple[dict[str, nn.Module], dict[str, DeployChoice]]:
    shapes = _input_shapes(model, [layer.name for layer in plan.layers], example_input)
    modules: dict[str, nn.Module] = {}
    choices: dict[str, DeployChoice] = {}
    generator = torch.Generator().manual_seed(0)
    for layer in plan.layers:
        grouped = GroupedKernelConv.from_conv(model.get_submodule(layer.name), layer)
        dense = grouped.to_dense_conv()
        if layer.name not in shapes:
            modules[layer.name] = dense
            choices[layer.name] = DeployChoice("auto", "dense", note="not reached by the example input")
            continue
        shape, channels_last = shapes[layer.name]
        x = torch.randn(shape, generator=generator, dtype=grouped.weight.dtype).to(grouped.weight.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grouped_ms, dense_ms = timer(grouped, x), timer(dense, x)
        form = "grouped" if grouped_ms < dense_ms * (1.0 - AUTO_MARGIN) else "dense"
        modules[layer.name] = grouped if form == "grouped" else dense
        choices[layer.name] = DeployChoice("auto", form, grouped_ms, dense_ms, tuple(shape))
    return modules, choices


def _install(model: nn.Module, modules: dict[str, nn.Module], choices: dict[str, DeployChoice]) -> None:
    for name, module in modules.items():
        module.train(model.get_submodule(name).training)
        module.gkp_deploy = choices[name]
        _replace(model, name, module)


def _densify_if_slower(original: nn.Module, deployed: nn.Module, choices: dict[str, DeployChoice],
                       example: torch.Tensor, timer: LayerTimer) -> None:
    """`auto`'s whole-model guard: if the model with its grouped layers measures slower than the
    unpruned one, turn every grouped layer back into its dense form."""
    if not any(choice.form == "grouped" for choice in choices.values()):
        return
    timings = [(timer(original, example), timer(deployed, example)) for _ in range(GUARD_ROUNDS)]
    base_ms, auto_ms = min(t[0] for t in timings), min(t[1] for t in timings)
    if auto_ms <= base_ms * (1.0 + AUTO_MARGIN):
        return
    note = f"whole model with grouped layers measured {auto_ms:.3f} ms vs {base_ms:.3f} ms unpruned"
    dense_choices = {n: dataclasses.replace(c, form="dense", note=note) for n, c in choices.items() if c.form == "grouped"}
    _install(deployed, {n: deployed.get_submodule(n).to_dense_conv() for n in dense_choices}, dense_choices)


def apply_plan(
    model: nn.Module,
    plan: PrunePlan,
    *,
    form: str = "grouped",
    example_input: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    timer: LayerTimer | None = None,
) -> nn.Module:
    """A new model (the input is not changed) on `device` (default: the model's) with every planned
    conv deployed as `grouped`, `dense` (zeros kept) or, per layer, whichever of the two measures
    faster on `example_input`'s real layer inputs (`auto`); `auto` falls back to dense layers if
    the whole model then measures slower than the original. Train and save the `grouped` form:
    dense layers regrow pruned kernels when trained and do not load into the pruned structure."""
    if form not in FORMS:
        raise ConfigError(f"deploy form must be one of {', '.join(FORMS)}, got {form!r}")
    if form == "auto" and example_input is None:
        raise ConfigError("deploy form 'auto' needs an example input to time the layers on")
    plan.check_fits(model)
    deployed = copy.deepcopy(model)
    if device is not None:
        deployed.to(device if isinstance(device, torch.device) else resolve_device(device))
    _deploy_masks_and_filters(deployed, plan, form)
    if form != "auto":
        modules: dict[str, nn.Module] = {}
        for layer in plan.layers:
            grouped = GroupedKernelConv.from_conv(deployed.get_submodule(layer.name), layer)
            modules[layer.name] = grouped if form == "grouped" else grouped.to_dense_conv()
        _install(deployed, modules, {layer.name: DeployChoice(form, form) for layer in plan.layers})
        return deployed
    example = example_input.to(_device_of(deployed))
    timer = timer or _default_timer
    modules, choices = _choose_auto(deployed, plan, example, timer)
    original = model if _device_of(model) == _device_of(deployed) else copy.deepcopy(deployed)
    _install(deployed, modules, choices)
    _densify_if_slower(original, deployed, choices, example, timer)
    return deployed


def _deploy_masks_and_filters(model: nn.Module, plan: PrunePlan, form: str) -> None:
    """In place: a plan's masked layers as `ZeroMaskedConv` (the `grouped` form, to train and
    save) or as plain convs holding the zeros (otherwise: zeroed weights have no faster form),
    and its removed filters taken out (the same in every form)."""
    modules: dict[str, nn.Module] = {}
    choices: dict[str, DeployChoice] = {}
    for mask in plan.masks:
        masked = ZeroMaskedConv(model.get_submodule(mask.name), mask)
        modules[mask.name] = masked if form == "grouped" else masked.to_dense_conv()
        note = "" if form != "auto" else "zeroed weights: the dense form is the only one"
        choices[mask.name] = DeployChoice(form, "masked" if form == "grouped" else "dense", note=note)
    _install(model, modules, choices)
    if plan.filters:
        remove_filters(model, _filters_kept(plan))
        for f in plan.filters:
            model.get_submodule(f.name).gkp_deploy = DeployChoice(form, "dense", note=f"{len(f.kept)} filters kept")


def deploy_summary(model: nn.Module) -> dict[str, Any]:
    """The deployment of `model`'s pruned layers: the form asked for, how many layers ended up
    grouped or dense, and per layer its form and, for `auto`, the timings it was chosen on.
    Layers loaded from a pruned checkpoint (no deployment record) count as `grouped` (`masked`
    for zeroed-weight layers)."""
    layers: dict[str, dict[str, Any]] = {}
    requested: set[str] = set()
    for name, module in model.named_modules():
        choice = getattr(module, "gkp_deploy", None)
        if choice is None and isinstance(module, (GroupedKernelConv, ZeroMaskedConv)):
            choice = DeployChoice("grouped", "grouped" if isinstance(module, GroupedKernelConv) else "masked")
        if not isinstance(choice, DeployChoice):
            continue
        requested.add(choice.requested)
        record = asdict(choice)
        del record["requested"]
        record["input_shape"] = None if choice.input_shape is None else list(choice.input_shape)
        layers[name] = record
    return {
        "form": "+".join(sorted(requested)) if requested else None,
        "counts": {form: sum(r["form"] == form for r in layers.values())
                   for form in ("grouped", "dense", *(("masked",) if any(r["form"] == "masked" for r in layers.values()) else ()))},
        "layers": layers,
    }


def equivalence_error(a: nn.Module, b: nn.Module, inputs: torch.Tensor | Iterable[torch.Tensor]) -> float:
    """Largest absolute difference between the two models' outputs over `inputs` (one batch or
    several), both run in eval mode on their own device, in full fp32 (TF32 on an Ampere or newer
    GPU alone differs by more than the 1e-4 the check allows); their modes are restored after."""
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    modes = (a.training, b.training)
    worst = 0.0
    try:
        a.eval()
        b.eval()
        with torch.inference_mode(), exact_fp32():
            for x in batches:
                out_a = a(x.to(_device_of(a)))
                out_b = b(x.to(_device_of(b)))
                worst = max(worst, float((out_a.float().cpu() - out_b.float().cpu()).abs().max()))
    finally:
        a.train(modes[0])
        b.train(modes[1])
    return worst


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
