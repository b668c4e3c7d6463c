"""Evaluation and probes sharded across torchrun processes, with counts merged so the totals
equal a single-process run, and cancellation agreed at the merge: a process that was cancelled
still reaches it, so no process waits there for one that left."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

from ..common.distributed import DistContext, shard
from ..common.errors import Cancelled, DataError
from ..models.normalization import Normalization
from .attacks import AttackSpec, RobustnessReport, evaluate_robustness
from .batch_eval import example_count
from .probes import CorruptionReport, FrequencyReport, corruption_probe, frequency_probe

Report = TypeVar("Report", RobustnessReport, FrequencyReport, CorruptionReport)


def _sharded(
    run: Callable[..., Report],
    merge: Callable[[Sequence[Report]], Report],
    model: nn.Module,
    normalization: Normalization,
    dataset: object,
    ctx: DistContext,
    max_examples: int | None,
    options: dict[str, Any],
) -> Report:
    """`run` on this process's strided shard of the first `max_examples` items, merged over the
    processes; Cancelled on every process when any was cancelled."""
    if not ctx.distributed:
        return run(model, normalization, dataset, max_examples=max_examples, **options)
    n = example_count(dataset, max_examples)
    if n < ctx.world_size:
        raise DataError(f"cannot shard {n} evaluation examples over {ctx.world_size} processes")
    try:
        local: Report | None = run(model, normalization, shard(dataset, n, ctx), **options)
    except Cancelled:
        local = None
    reports = ctx.all_gather(local)
    if any(r is None for r in reports):
        raise Cancelled("cancelled")
    return merge(reports)


def evaluate_sharded(
    model: nn.Module,
    normalization: Normalization,
    dataset: object,
    attacks: Sequence[AttackSpec | str],
    *,
    ctx: DistContext,
    max_examples: int | None = None,
    **options: Any,
) -> RobustnessReport:
    """`attacks.evaluate_robustness` on the first `max_examples` items, each process taking a
    strided shard, merged into one report on every process. Clean and deterministic attacks
    (FGSM) count exactly as one process would; attacks with a random start draw per shard."""
    return _sharded(evaluate_robustness, RobustnessReport.merge, model, normalization, dataset, ctx,
                    max_examples, {"attacks": attacks, **options})


def frequency_sharded(
    model: nn.Module, normalization: Normalization, dataset: object, *, ctx: DistContext,
    max_examples: int | None = None, **options: Any,
) -> FrequencyReport:
    """`probes.frequency_probe` sharded like `evaluate_sharded`; the counts equal one process's."""
    return _sharded(frequency_probe, FrequencyReport.merge, model, normalization, dataset, ctx,
                    max_examples, options)


def corruption_sharded(
    model: nn.Module, normalization: Normalization, dataset: object, *, ctx: DistContext,
    max_examples: int | None = None, **options: Any,
) -> CorruptionReport:
    """`probes.corruption_probe` sharded like `evaluate_sharded`; random corruptions draw per
    shard, as attacks with a random start do."""
    return _sharded(corruption_probe, CorruptionReport.merge, model, normalization, dataset, ctx,
                    max_examples, options)
