"""Reusable buffers for the experts being fetched.

A fetched expert needs a buffer for the bytes read and one for its decoded weights, tens of MB each at real model
sizes. Freshly allocated, every one of them is mapped and zeroed page by page by the kernel on first touch (5 ms for
35 MB on the project's machine, about as long as decoding it); handed back here once the tiers have declined to keep
it, it is reused by the next fetch of the same size instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np


class BufferPool:
    """Free buffers by size, at most ``limit`` bytes of them (the rest are released to the allocator).

    Args:
        allocate: makes a new uint8 buffer of the given size (plain, aligned for direct reads, or pinned).
        limit: the most bytes kept free; the fetches in flight never hold more than the reservation, so a limit of
            the reservation keeps the pool within the budget.
    """

    def __init__(self, allocate: Callable[[int], np.ndarray], limit: int) -> None:
        self._allocate = allocate
        self.limit = limit
        self._free: dict[int, list[np.ndarray]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A buffer of ``nbytes`` bytes (a reused one when there is one of that size)."""
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self._free_bytes -= nbytes
                return free.pop()
        return self._allocate(nbytes)

    def give(self, buf: np.ndarray) -> None:
        """Hand back a buffer that nothing uses any more."""
        with self._lock:
            if self._free_bytes + buf.size <= self.limit:
                self._free.setdefault(buf.size, []).append(buf)
                self._free_bytes += buf.size

    @property
    def free_bytes(self) -> int:
        return self._free_bytes
