"""A hierarchical, compression-aware expert cache under one byte budget (the ZipMoE idea, with LRU tiers).

Tiers, fastest first:

* **decoded**: compute-ready expert weights on the compute device; a hit costs nothing.
* **compressed**: expert records as stored in the container (about 2/3 of their BF16 size) in host memory; a hit
  costs a decode (Numba, GIL released) but no storage read.
* **storage**: the container; a miss costs one read of the record and a decode.

A fetched expert's weights go to the decoded tier and its record to the compressed tier; each tier evicts its
least recently used entries on its own. The compressed tier is inclusive (it also holds records of experts that are
decoded), so an expert evicted from the decoded tier stays one decode away. The ZipMoE reference's third tier, which
keeps only an expert's sign+mantissa bytes and reads its exponents on a miss, is not implemented.

The budget covers the two tiers plus the experts being fetched: ``max_inflight`` experts (records, decode buffers
and weights) are reserved first, the rest is split between the tiers by ``decoded_fraction``. The minimum budget is
that reservation. For one MoE layer, experts already decoded are computed first while the others are read and
decoded on worker threads; results are summed in expert order, so the output does not depend on what was cached.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from zipmoe.errors import ZipmoeError
from zipmoe.runtime.model import ExpertWeights, accumulate, expert_assignments, expert_output
from zipmoe.runtime.store import ExpertStore

DECODED, COMPRESSED, STORAGE = "decoded", "compressed", "storage"
PREFILL, DECODE = "prefill", "decode"


class BudgetError(ZipmoeError, ValueError):
    """A memory budget below what the runtime needs."""


@dataclass
class PhaseCounts:
    """Expert requests, those that read storage (misses), and bytes read, in the prefill and in decoding."""

    requests: dict[str, int] = field(default_factory=lambda: {PREFILL: 0, DECODE: 0})
    misses: dict[str, int] = field(default_factory=lambda: {PREFILL: 0, DECODE: 0})
    bytes_read: dict[str, int] = field(default_factory=lambda: {PREFILL: 0, DECODE: 0})

    def miss_rate(self, phase: str) -> float:
        return self.misses[phase] / self.requests[phase] if self.requests[phase] else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            phase: {"requests": self.requests[phase], "misses": self.misses[phase],
                    "miss_rate": self.miss_rate(phase), "bytes_read": self.bytes_read[phase]}
            for phase in (PREFILL, DECODE)
        }  # fmt: skip


@dataclass
class CacheStats:
    """What the cache did (counts are expert fetches; bytes are exact)."""

    hits: dict[str, int] = field(default_factory=lambda: {DECODED: 0, COMPRESSED: 0, STORAGE: 0})
    bytes_read: int = 0  # from storage
    bytes_decoded: int = 0  # BF16 bytes produced by decoding
    peak_bytes: int = 0  # tiers plus in-flight experts
    stall_seconds: float = 0.0  # time the compute waited for experts
    phases: PhaseCounts = field(default_factory=PhaseCounts)

    @property
    def requests(self) -> int:
        return sum(self.hits.values())

    def hit_rate(self, tier: str) -> float:
        return self.hits[tier] / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "served_from": dict(self.hits),
            "hit_rate": {tier: self.hit_rate(tier) for tier in self.hits},
            "bytes_read": self.bytes_read,
            "bytes_decoded": self.bytes_decoded,
            "peak_bytes": self.peak_bytes,
            "stall_seconds": self.stall_seconds,
            "phases": self.phases.to_json(),
        }


def minimum_budget(store: ExpertStore, max_inflight: int) -> int:
    """Bytes for ``max_inflight`` experts being fetched at once: record, decode buffer and compute weights each."""
    return max_inflight * (store.record_nbytes + store.source_nbytes + store.decoded_nbytes)


def in_issue_order(running: dict[Future, Any], stats: Any) -> Iterator[tuple[Any, Any]]:
    """``(job, result)`` of ``running`` futures in the order they were submitted, the wait added to ``stats``.

    Consuming in issue order (expert order), not completion order, keeps the cache state reproducible. The caller
    may submit more while iterating.
    """
    while running:
        future = next(iter(running))
        start = time.perf_counter()
        wait([future])
        stats.stall_seconds += time.perf_counter() - start
        yield running.pop(future), future.result()


class ExpertCache:
    """The expert backend of a model served from a container (see the module docstring).

    Args:
        store: the container's experts.
        budget: bytes for the tiers and the in-flight experts.
        decoded_fraction: share of the tier bytes for decoded experts; the rest holds compressed records.
        threads: threads that fetch experts (each reads its record; the store decodes on its own threads).
        max_inflight: experts fetched at once (defaults to the model's experts per token).

    Raises:
        BudgetError: the budget is below `minimum_budget`.
    """

    def __init__(
        self,
        store: ExpertStore,
        budget: int,
        *,
        decoded_fraction: float = 0.25,
        threads: int = 1,
        max_inflight: int | None = None,
    ) -> None:
        if not 0.0 <= decoded_fraction <= 1.0:
            raise BudgetError(f"decoded fraction must be between 0 and 1, got {decoded_fraction}")
        self.store = store
        self.max_inflight = max_inflight or store.args.top_k
        self.reserved = minimum_budget(store, self.max_inflight)
        if budget < self.reserved:
            raise BudgetError(
                f"memory budget {budget / 1e6:.1f} MB is below the minimum of {self.reserved / 1e6:.1f} MB "
                f"for this model ({self.max_inflight} experts being fetched at once)"
            )
        self.budget = budget
        tiers = budget - self.reserved
        self.capacity = {DECODED: int(tiers * decoded_fraction), COMPRESSED: tiers - int(tiers * decoded_fraction)}
        self.decoded: OrderedDict[tuple[int, int], ExpertWeights] = OrderedDict()
        self.compressed: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.used = {DECODED: 0, COMPRESSED: 0}
        self.stats = CacheStats()
        self.phase = PREFILL
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="zipmoe-fetch")

    # -- the backend --------------------------------------------------------------------------------------------------

    def run(self, layer: int, x: torch.Tensor, top_index: torch.Tensor, top_weight: torch.Tensor) -> torch.Tensor:
        """Compute one MoE layer's routed experts: hits first, then misses in the order their reads were issued."""
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        pending = []
        phases = self.stats.phases
        for expert, tokens, slots in expert_assignments(top_index):
            key = (layer, expert)
            phases.requests[self.phase] += 1
            weights = self.decoded.get(key)
            if weights is None:
                pending.append((expert, tokens, slots))
                continue
            self.decoded.move_to_end(key)
            if key in self.compressed:
                self.compressed.move_to_end(key)
            self.stats.hits[DECODED] += 1
            outputs[expert] = (tokens, expert_output(x, weights, tokens, slots, top_weight))
        queue = iter(pending)
        running: dict[Future, tuple[int, torch.Tensor, torch.Tensor, str]] = {}

        def launch() -> None:
            for expert, tokens, slots in queue:
                key = (layer, expert)
                record = self.compressed.pop(key, None)
                tier = STORAGE if record is None else COMPRESSED
                if record is not None:
                    self.used[COMPRESSED] -= record.nbytes
                running[self._pool.submit(self.store.fetch, key, record)] = (expert, tokens, slots, tier)
                self._note_peak()
                if len(running) >= self.max_inflight:
                    return

        launch()
        for (expert, tokens, slots, tier), (weights, record) in in_issue_order(running, self.stats):
            self.stats.hits[tier] += 1
            self.stats.bytes_decoded += self.store.source_nbytes
            if tier == STORAGE:
                self.stats.bytes_read += record.nbytes
                phases.misses[self.phase] += 1
                phases.bytes_read[self.phase] += record.nbytes
            outputs[expert] = (tokens, expert_output(x, weights, tokens, slots, top_weight))
            self._admit((layer, expert), weights, record)
            launch()
        return accumulate(x, outputs)

    # -- admission and eviction ------------------------------------------------------------------------------------------

    def _admit(self, key: tuple[int, int], weights: ExpertWeights, record: np.ndarray) -> None:
        """Keep a fetched expert's record in the compressed tier and its weights in the decoded tier, each LRU.

        The compressed tier is inclusive: it also holds the records of recently decoded experts, so an expert
        evicted from the decoded tier is still one decode away instead of one storage read.
        """
        if weights.nbytes <= self.capacity[DECODED]:
            while self.used[DECODED] + weights.nbytes > self.capacity[DECODED]:
                _, victim = self.decoded.popitem(last=False)  # least recently used
                self.used[DECODED] -= victim.nbytes
            self.decoded[key] = weights
            self.used[DECODED] += weights.nbytes
        self._keep_compressed(key, record)
        self._note_peak()

    def _keep_compressed(self, key: tuple[int, int], record: np.ndarray) -> None:
        """Put a record in the compressed tier, evicting its least recently used records; drop it if too large."""
        if record.nbytes > self.capacity[COMPRESSED]:
            return
        while self.used[COMPRESSED] + record.nbytes > self.capacity[COMPRESSED]:
            _, victim = self.compressed.popitem(last=False)
            self.used[COMPRESSED] -= victim.nbytes
        self.compressed[key] = record
        self.used[COMPRESSED] += record.nbytes

    def _note_peak(self) -> None:
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.used[DECODED] + self.used[COMPRESSED] + self.reserved)

    def on_phase(self, phase: str) -> None:
        self.phase = phase

    @property
    def bytes_in_use(self) -> int:
        return self.used[DECODED] + self.used[COMPRESSED]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.store.close()
