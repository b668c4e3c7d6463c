"""Handing freed memory back: after a large temporary is freed, the resident size drops."""

import numpy as np
import pytest

from engine.common.memory import _trim, release_free_memory


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
