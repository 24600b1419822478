"""Worker threads for chunk-parallel kernels (the kernels release the GIL, so threads scale across cores)."""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
_RANGES_PER_THREAD = 4


def available_cpus() -> int:
    """CPUs this process may run on (honours taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def split_range(n_items: int, n_parts: int) -> list[tuple[int, int]]:
    """Split ``range(n_items)`` into at most ``n_parts`` contiguous, near-equal, non-empty ranges."""
    n_parts = max(1, min(n_parts, n_items))
    bounds = [n_items * i // n_parts for i in range(n_parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n_parts) if bounds[i] < bounds[i + 1]]


class Workers:
    """A fixed pool of threads that runs contiguous ranges of independent items (chunks) in parallel.

    Args:
        threads: number of threads; `None` means every available CPU.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = max(1, threads or available_cpus())
        self._pool: ThreadPoolExecutor | None = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="zipmoe")
        return self._pool

    def run_ranges(self, fn: Callable[[int, int], T], n_items: int, min_items: int = 1) -> list[T]:
        """Call ``fn(first, last)`` over a split of ``range(n_items)``; return the results in range order."""
        return self.run_segments(lambda _, first, last: fn(first, last), [n_items], min_items)

    def run_segments(self, fn: Callable[[int, int, int], T], counts: Sequence[int], min_items: int = 1) -> list[T]:
        """Call ``fn(group, first, last)`` over the items of several groups (the chunks of several parts).

        All items are split into tasks that may span groups: a few tasks per thread, so a thread slowed by other
        work does not hold up the rest, and at least ``min_items`` items per task, so that each task outweighs the
        cost of handing it to a thread. Returns every call's result, in order.
        """
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + count)
        total = offsets[-1]
        n_tasks = min(self.threads * _RANGES_PER_THREAD, total // max(1, min_items)) if self.threads > 1 else 1

        def task(first: int, last: int) -> list[T]:
            results = []
            group = bisect.bisect_right(offsets, first) - 1
            while group < len(counts) and offsets[group] < last:
                lo, hi = max(first, offsets[group]), min(last, offsets[group + 1])
                if hi > lo:
                    results.append(fn(group, lo - offsets[group], hi - offsets[group]))
                group += 1
            return results

        ranges = split_range(total, n_tasks)
        if len(ranges) <= 1:
            batches = [task(first, last) for first, last in ranges]
        else:
            futures = [self._executor().submit(task, first, last) for first, last in ranges]
            batches = [future.result() for future in futures]
        return [result for batch in batches for result in batch]

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the pool."""
        return self._executor().submit(fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
