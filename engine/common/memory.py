"""Handing freed memory back to the operating system: numpy and torch free large temporaries
into the C allocator, which keeps them (glibc raises its mmap threshold after the first large
free), so a process's resident size stays at its high-water mark after a big computation."""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _trim() -> object | None:
    """glibc's `malloc_trim`, or None on other C libraries."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS (glibc only; a no-op elsewhere)."""
    trim = _trim()
    if trim is not None:
        trim(0)  # type: ignore[operator]
