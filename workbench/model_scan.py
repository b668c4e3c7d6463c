"""Computes the model view's data with the engine, in the worker that opens a model: each conv's
size and kernel-smoothness matrix."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from engine.gkp.reconstruct import GroupedKernelConv
from engine.gkp.smoothness import kernel_smoothness
from engine.models.metrics import ModelCost

from .model_view import ModelInfo


@contextmanager
def single_threaded() -> Iterator[None]:
    """One intra-op thread for the duration: measuring a model opened a moment ago is a batch of
    one and small matrices, which threads do not speed up, while waking torch's thread pool costs
    0.3-0.5 s of CPU on a busy machine (measured: counting MACs of the sample took 0.3-0.5 s with
    two threads, 0.015 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dense_conv_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The (C_out, C_in, k, k) weight of conv `name`; a pruned layer is expanded to its dense
    form with the pruned kernels zero."""
    module = model.get_submodule(name)
    weight = module.dense_weight() if isinstance(module, GroupedKernelConv) else module.weight
    return weight.detach()


def conv_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def inspect_model(model: nn.Module, cost: ModelCost, power: float) -> ModelInfo:
    """Every conv's size and smoothness matrix (depthwise and grouped convs have no matrix: their
    kernels do not form a C_out × C_in one), with the model's already counted `cost`."""
    start = time.perf_counter()
    info = ModelInfo(cost)
    for name in conv_names(model):
        module = model.get_submodule(name)
        info.params[name] = sum(p.numel() for p in module.parameters(recurse=False))
        info.in_channels[name] = (module.dense_in_channels if isinstance(module, GroupedKernelConv)
                                  else module.in_channels)  # type: ignore[assignment]
        if isinstance(module, GroupedKernelConv) or module.groups == 1:  # type: ignore[union-attr]
            heat = kernel_smoothness(dense_conv_weight(model, name), power)
            info.smoothness[name] = heat.numpy().astype(np.float32)
            # What engine.gkp.smoothness.filter_smoothness returns, without recomputing the matrix.
            info.filter_smoothness[name] = heat.sum(dim=1).numpy()
    info.seconds = time.perf_counter() - start
    return info
