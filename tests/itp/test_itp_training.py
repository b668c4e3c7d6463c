"""In-train pruning's training: on the sample it lands on its MAC target (the hardware loss turns
masks off inside the window, completion does the rest) with a plan that reconstructs exactly;
an interrupted run resumes bit for bit; the trace records every epoch and the freeze."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.common.errors import ConfigError
from engine.common.progress import Progress
from engine.formats.checkpoints import load_checkpoint
from engine.gkp.prune_config import PruneConfig
from engine.gkp.reconstruct import apply_plan, equivalence_error, masked_dense
from engine.gkp.traces import MaskEpoch, MaskFreeze, MaskSetup
from engine.itp.itp_config import ItpConfig
from engine.itp.trainer import run_itp
from engine.models.metrics import count_cost
from engine.training.finetune_config import FinetuneConfig
from sample_models import SAMPLE_CHECKPOINT


def training(**changes) -> FinetuneConfig:
    return dataclasses.replace(FinetuneConfig(batch_size=32, device="cpu", eval_max_examples=32), **changes)


def test_itp_on_the_sample_reaches_its_mac_target(small_digits: Any, tiny_cnn: Any) -> None:
    sample = load_checkpoint(SAMPLE_CHECKPOINT)
    shape = (1, 1, 32, 32)
    itp = ItpConfig(epochs=2, prune_start=1, prune_end=1, hw_weight=1e6)
    outcome = run_itp(sample.model, small_digits, sample.normalization, PruneConfig(), itp, training(), shape, None)
    masked = sum(c.macs for c in outcome.setup.costs.values())
    target = outcome.setup.whole_macs - (1 - outcome.setup.target) * masked
    grouped = apply_plan(outcome.model, outcome.plan, form="grouped")
    deployed_macs = count_cost(grouped, shape).macs
    assert abs(deployed_macs - target) / target <= 0.02
    assert outcome.effective_macs == pytest.approx(deployed_macs, rel=1e-6)
    assert outcome.freeze.target_met and outcome.freeze.learned < 0.95  # the hardware loss turned masks off
    x = torch.stack([small_digits.val[i][0] for i in range(8)])
    assert equivalence_error(grouped, masked_dense(outcome.model, outcome.plan), x) <= 1e-5
    assert outcome.plan.method == "itp" and outcome.plan.params["granularity"] == "grouped-kernel"
    kinds = [e.kind for e in outcome.events]
    layers = len(outcome.setup.names)
    assert kinds.count(MaskSetup.kind) == layers and kinds.count(MaskEpoch.kind) == 2 * layers
    assert kinds.count(MaskFreeze.kind) == layers and kinds.count("layer_done") == layers
    first = [e for e in outcome.events if isinstance(e, MaskEpoch) and e.epoch == 1]
    assert all(e.phase == "learning" for e in first) and sum(len(e.turned_off) for e in first) > 0
    assert all(e.phase == "frozen" and not e.turned_off and not e.turned_on
               for e in outcome.events if isinstance(e, MaskEpoch) and e.epoch == 2)


@pytest.mark.parametrize(("granularity", "b"), [("grouped-kernel", 3e4), ("kernel", 1.5e5)])
def test_resume_after_interrupt_equals_an_uninterrupted_run(small_digits: Any, tiny_cnn: Any, tmp_path: Path,
                                                            granularity: str, b: float) -> None:
    prune = PruneConfig(rate=0.5, groups=4)
    itp = ItpConfig(granularity=granularity, epochs=3, prune_start=1, prune_end=2, hw_weight=b)
    args = (small_digits, small_digits.normalization, prune, itp, training(epochs=3), (1, 1, 32, 32))
    straight = run_itp(tiny_cnn(), *args, tmp_path / "a")

    cancel = threading.Event()

    def stop_in_epoch_two(p: Progress) -> None:
        if (p.metrics.get("epoch"), p.metrics.get("step")) == (2, 2):
            cancel.set()

    with pytest.raises(Exception) as info:
        run_itp(tiny_cnn(), *args, tmp_path / "b", progress=stop_in_epoch_two, cancel=cancel)
    assert info.type.__name__ == "Cancelled"
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    assert any(e.turned_off for e in straight.events if isinstance(e, MaskEpoch) and e.epoch == 1)
    if granularity == "grouped-kernel":
        with pytest.raises(ConfigError, match="other itp settings"):  # filter groups of other weights
            run_itp(tiny_cnn(seed=7), *args, tmp_path / "b", resume=True)
    resumed = run_itp(tiny_cnn(seed=1 if granularity == "grouped-kernel" else 7), *args, tmp_path / "b", resume=True)
    assert resumed.plan.to_json() == straight.plan.to_json()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e.to_dict() for e in resumed.events] == [e.to_dict() for e in straight.events]
