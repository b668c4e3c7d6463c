"""Memory housekeeping: after a large temporary is freed, the resident size drops; the cycle
collector pauses for a block (planning) and comes back as it was."""

import gc

import numpy as np
import pytest
import torch

from engine.common.memory import _trim, collection_paused, release_free_memory


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(_trim() is None, reason="needs glibc's malloc_trim")
def test_freed_small_blocks_go_back_to_the_os():
    release_free_memory()
    before = _rss_mb()
    blocks = [np.ones(1 << 13) for _ in range(3200)]  # 200 MiB in 64 KiB blocks, below glibc's mmap threshold
    del blocks[:-1]  # the last block keeps the heap's top in use, so free() alone cannot shrink it
    held = _rss_mb()
    release_free_memory()
    assert held - before > 100
    assert _rss_mb() < held - 100


def test_the_collector_pauses_for_the_block_and_comes_back_as_it_was():
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collection_paused():
        assert not gc.isenabled()
        raise RuntimeError("cancelled")
    assert gc.isenabled()
    gc.disable()
    try:
        with collection_paused():
            pass
        assert not gc.isenabled()  # a caller's own pause is left alone
    finally:
        gc.enable()


def test_planning_runs_with_the_collector_paused():
    """Trace events are many small containers: each full collection would scan every object the
    process holds, so the planner pauses it while events are built and emitted."""
    from engine.gkp.planner import plan_pruning
    from engine.gkp.prune_config import PruneConfig
    from engine.models.cifar_resnet import CifarResNet

    torch.manual_seed(0)
    seen: set[bool] = set()
    plan_pruning(CifarResNet(8), PruneConfig(), on_event=lambda event: seen.add(gc.isenabled()))
    assert seen == {False} and gc.isenabled()
