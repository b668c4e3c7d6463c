"""Memory housekeeping around big computations: handing freed memory back to the operating
system (numpy and torch free large temporaries into the C allocator, which keeps them: glibc
raises its mmap threshold after the first large free, so a process's resident size stays at its
high-water mark), and pausing Python's cycle collector while a computation builds many small
objects."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def collection_paused() -> Iterator[None]:
    """Pause the cycle collector for the block. Building many small containers (trace events)
    triggers full collections, each scanning every object torch and the model hold; objects are
    still freed by reference counting, and cycles are collected once the block ends."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
