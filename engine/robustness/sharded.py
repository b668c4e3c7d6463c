"""Evaluation sharded across torchrun processes, with counts merged so the totals equal a
single-process run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..common.distributed import DistContext, shard
from ..common.errors import DataError
from ..models.normalization import Normalization
from .attacks import AttackSpec, RobustnessReport, evaluate_robustness
from .batch_eval import example_count


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
    (FGSM) count exactly as one process would; attacks with a random start draw per shard. A
    shard's partial reports are its own, so `on_report` is only served by a single process."""
    if not ctx.distributed:
        return evaluate_robustness(model, normalization, dataset, attacks, max_examples=max_examples, **options)
    n = example_count(dataset, max_examples)
    if n < ctx.world_size:
        raise DataError(f"cannot shard {n} evaluation examples over {ctx.world_size} processes")
    options.pop("on_report", None)
    local = evaluate_robustness(model, normalization, shard(dataset, n, ctx), attacks, **options)
    return RobustnessReport.merge(ctx.all_gather(local))
