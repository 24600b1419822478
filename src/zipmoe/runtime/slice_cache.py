"""A slice-level expert cache (SliceMoE's DBSC and PCW): MSB and LSB slices under one byte budget, all layers.

Modes:

* ``high`` (``q8`` for MAT(8,4)): every expert computes at the high bit width, so it needs both slices; the two
  move together and the cache is an LRU of experts.
* ``low`` (``q4``): every expert computes from its MSB slice alone; an LRU of MSB slices. ``trunc`` is the same
  with naive truncation (a quality baseline).
* ``dbsc``: per token, the top expert is *critical* when its share of the token's top-k routing weight is at least
  ``threshold``; a critical expert computes at the high bit width (MSB and LSB), every other selected expert from its
  MSB slice alone. MSB slices are an LRU; LSB slices have the lowest priority: while any LSB slice is cached, it
  is evicted before any MSB slice (an LSB slice is useless without its MSB, so evicting an MSB takes its LSB along).

Each slice has its own hit or miss. Experts whose slices are cached compute first while missing slices are read on
worker threads; results are summed in expert order, so output does not depend on what was cached.

Predictive cache warmup (``warmup="pcw"``): during the prefill the cache counts, per expert, the tokens routed to it
(frequency) and their routing weight (score). While the prefill runs, space is made by evicting the LSB slices of
the lowest-scoring experts first, then the MSB slices of the least frequently used ones, so the slices that remain
when decoding starts are those the prompt used most, across all layers, not just the last layers' (what plain LRU
leaves). At the end of the prefill the LRU orders are rewritten by the same measures, lowest first, so decoding
evicts in that order until its own accesses take over. ``warmup="none"`` keeps whatever plain LRU left;
``warmup="empty"`` empties the cache before decoding (the paper's baseline).
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from zipmoe.quant.spec import LSB, MSB, Precision
from zipmoe.runtime.cache import DECODE, PREFILL, BudgetError, PhaseCounts, in_issue_order
from zipmoe.runtime.model import accumulate, expert_assignments
from zipmoe.runtime.slices import Slice, SliceStore

MODES = ("high", "low", "trunc", "dbsc")
WARMUPS = ("pcw", "none", "empty")
DEFAULT_THRESHOLD = 0.5
_PRECISION = {"high": Precision.HIGH, "low": Precision.LOW, "trunc": Precision.TRUNC}


@dataclass
class SliceStats:
    """What the slice cache did: hits and misses per slice kind, bytes read, and which precision experts ran at."""

    hits: dict[str, int] = field(default_factory=lambda: {MSB: 0, LSB: 0})
    misses: dict[str, int] = field(default_factory=lambda: {MSB: 0, LSB: 0})
    bytes_read: int = 0
    peak_bytes: int = 0  # cached slices plus the in-flight reservation
    stall_seconds: float = 0.0
    computed: dict[str, int] = field(default_factory=lambda: {"high": 0, "low": 0})  # expert runs per precision
    tokens: int = 0  # token-layer routings seen
    critical_tokens: int = 0  # of which had a critical expert (dbsc)
    prefill_misses: int = 0
    decode_misses: list[int] = field(default_factory=list)  # slice misses of each decode step
    phases: PhaseCounts = field(default_factory=PhaseCounts)  # per expert: a miss reads at least one slice

    def miss_rate(self, kind: str | None = None) -> float:
        kinds = (kind,) if kind else (MSB, LSB)
        requests = sum(self.hits[k] + self.misses[k] for k in kinds)
        return sum(self.misses[k] for k in kinds) / requests if requests else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "hits": dict(self.hits),
            "misses": dict(self.misses),
            "miss_rate": {MSB: self.miss_rate(MSB), LSB: self.miss_rate(LSB), "all": self.miss_rate()},
            "bytes_read": self.bytes_read,
            "peak_bytes": self.peak_bytes,
            "stall_seconds": self.stall_seconds,
            "computed": dict(self.computed),
            "critical_fraction": self.critical_tokens / self.tokens if self.tokens else 0.0,
            "prefill_misses": self.prefill_misses,
            "decode_misses": list(self.decode_misses),
            "phases": self.phases.to_json(),
        }


def minimum_slice_budget(store: SliceStore, max_inflight: int) -> int:
    """Bytes for ``max_inflight`` experts' slices being read at once, plus one expert's weights being computed."""
    return max_inflight * (store.record_nbytes[MSB] + store.record_nbytes[LSB]) + store.decoded_nbytes


class SliceCache:
    """The expert backend for a container's AMAT slices (see the module docstring).

    Args:
        store: the container's slices.
        budget: bytes for cached slices and the in-flight reservation.
        mode: ``high``, ``low``, ``trunc`` or ``dbsc``.
        threshold: dbsc: the top expert's share of its token's top-k routing weight that makes it critical.
        warmup: ``pcw``, ``none`` or ``empty`` (what the cache holds when decoding starts).
        threads: threads that read slices.
        max_inflight: experts being read at once (defaults to the model's experts per token).

    Raises:
        BudgetError: the budget is below `minimum_slice_budget`, or a mode, warmup or threshold is unknown.
    """

    def __init__(
        self,
        store: SliceStore,
        budget: int,
        *,
        mode: str = "dbsc",
        threshold: float = DEFAULT_THRESHOLD,
        warmup: str = "pcw",
        threads: int = 1,
        max_inflight: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise BudgetError(f"unknown slice mode {mode!r} (choose {', '.join(MODES)})")
        if warmup not in WARMUPS:
            raise BudgetError(f"unknown warmup {warmup!r} (choose {', '.join(WARMUPS)})")
        if not 0.0 <= threshold <= 1.0:
            raise BudgetError(f"the critical-expert threshold must be between 0 and 1, got {threshold}")
        self.store = store
        self.mode, self.threshold, self.warmup = mode, threshold, warmup
        self.max_inflight = max_inflight or store.args.top_k
        self.reserved = minimum_slice_budget(store, self.max_inflight)
        if budget < self.reserved:
            raise BudgetError(
                f"memory budget {budget / 1e6:.1f} MB is below the minimum of {self.reserved / 1e6:.1f} MB "
                f"for this model's slices ({self.max_inflight} experts being read at once)"
            )
        self.budget = budget
        self.capacity = budget - self.reserved
        self.cached: dict[str, OrderedDict[tuple[int, int], Slice]] = {MSB: OrderedDict(), LSB: OrderedDict()}
        self.used = 0
        self.stats = SliceStats()
        self.phase = PREFILL
        self.frequency: dict[tuple[int, int], int] = {}  # prefill tokens routed to each expert
        self.score: dict[tuple[int, int], float] = {}  # their summed share of the routing weight
        self._first_layer = store.args.sparse_layers.index(True) if any(store.args.sparse_layers) else 0
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="zipmoe-slices")

    # -- the backend --------------------------------------------------------------------------------------------------

    def run(self, layer: int, x: torch.Tensor, top_index: torch.Tensor, top_weight: torch.Tensor) -> torch.Tensor:
        """Compute one MoE layer's routed experts: cached experts first, then the rest in read order."""
        if self.phase == DECODE and layer == self._first_layer:
            self.stats.decode_misses.append(0)
        share = (top_weight / top_weight.sum(dim=-1, keepdim=True)).float()  # [T, K]
        critical = share[:, 0] >= self.threshold  # [T]: the top expert (slot 0) is critical
        if self.mode == "dbsc":
            self.stats.tokens += critical.numel()
            self.stats.critical_tokens += int(critical.sum())
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        pending = []
        for expert, tokens, slots in expert_assignments(top_index):
            key = (layer, expert)
            if self.phase == PREFILL:
                self.frequency[key] = self.frequency.get(key, 0) + len(tokens)
                self.score[key] = self.score.get(key, 0.0) + float(share[tokens, slots].sum())
            high = self._high_tokens(critical, tokens, slots)
            need = (MSB, LSB) if bool(high.any()) else (MSB,)
            held = {kind: self._lookup(kind, key) for kind in need}
            job = (expert, tokens, slots, high, held)
            self.stats.phases.requests[self.phase] += 1
            if all(held.values()):
                outputs[expert] = self._compute(x, key, job, top_weight)
            else:
                pending.append(job)
        self._fetch_and_compute(layer, x, pending, top_weight, outputs)
        return accumulate(x, outputs)

    def _high_tokens(self, critical: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Which of an expert's tokens it computes at the high bit width."""
        if self.mode == "high":
            return torch.ones_like(tokens, dtype=torch.bool)
        if self.mode == "dbsc":
            return (slots == 0) & critical[tokens]
        return torch.zeros_like(tokens, dtype=torch.bool)

    def _lookup(self, kind: str, key: tuple[int, int]) -> Slice | None:
        """A cached slice (made most recently used), counting the hit or the miss."""
        found = self.cached[kind].get(key)
        if found is not None:
            self.cached[kind].move_to_end(key)
            self.stats.hits[kind] += 1
        else:
            self.stats.misses[kind] += 1
            if self.phase == PREFILL:
                self.stats.prefill_misses += 1
            elif self.stats.decode_misses:
                self.stats.decode_misses[-1] += 1
        return found

    def _fetch_and_compute(self, layer: int, x: torch.Tensor, pending: list, top_weight: torch.Tensor, outputs: dict):
        queue = iter(pending)
        running: dict[Future, tuple] = {}

        def read(key: tuple[int, int], kinds: list[str]) -> dict[str, Slice]:
            return {kind: self.store.read(key, kind) for kind in kinds}

        def launch() -> None:
            for job in queue:
                missing = [kind for kind, found in job[4].items() if found is None]
                running[self._pool.submit(read, (layer, job[0]), missing)] = job
                if len(running) >= self.max_inflight:
                    return

        launch()
        for (expert, tokens, slots, high, held), fetched in in_issue_order(running, self.stats):
            nbytes = sum(s.nbytes for s in fetched.values())
            self.stats.bytes_read += nbytes
            self.stats.phases.misses[self.phase] += 1
            self.stats.phases.bytes_read[self.phase] += nbytes
            job = (expert, tokens, slots, high, {**held, **fetched})
            outputs[expert] = self._compute(x, (layer, expert), job, top_weight)
            for kind in (MSB, LSB):  # the MSB first: an LSB is only kept beside its MSB
                if kind in fetched:
                    self._admit(kind, (layer, expert), fetched[kind])
            launch()

    def _compute(self, x: torch.Tensor, key: tuple[int, int], job: tuple, top_weight: torch.Tensor):
        """One expert's output for its tokens: high precision for ``high`` tokens, the low path for the rest."""
        _, tokens, slots, high, held = job
        low = _PRECISION["trunc" if self.mode == "trunc" else "low"]
        msb, lsb = held[MSB], held.get(LSB)
        output = self.store.output
        if bool(high.all()):
            self.stats.computed["high"] += 1
            return tokens, output(key, msb, lsb, Precision.HIGH, x, tokens, slots, top_weight)
        self.stats.computed["low"] += 1
        if not bool(high.any()):
            return tokens, output(key, msb, None, low, x, tokens, slots, top_weight)
        self.stats.computed["high"] += 1
        y = torch.empty(len(tokens), x.shape[1], dtype=x.dtype, device=x.device)
        y[high] = output(key, msb, lsb, Precision.HIGH, x, tokens[high], slots[high], top_weight).to(x.dtype)
        y[~high] = output(key, msb, None, low, x, tokens[~high], slots[~high], top_weight).to(x.dtype)
        return tokens, y

    # -- admission and eviction ------------------------------------------------------------------------------------

    def _admit(self, kind: str, key: tuple[int, int], data: Slice) -> None:
        """Cache a slice just read (an LSB only beside its MSB), then evict by the policy until the budget holds."""
        if data.nbytes > self.capacity or (kind == LSB and key not in self.cached[MSB]):
            return
        self.cached[kind][key] = data
        self.used += data.nbytes
        while self.used > self.capacity:
            self._evict(*self._victim())
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.used + self.reserved)

    def _victim(self) -> tuple[str, tuple[int, int]]:
        """The slice to evict: dbsc's LSB slices before any MSB; during a PCW prefill the least used, else the LRU."""
        lsb, msb = self.cached[LSB], self.cached[MSB]
        by_use = self.phase == PREFILL and self.warmup == "pcw"  # min() keeps the LRU order among equals
        if lsb and self.mode == "dbsc":
            return LSB, min(lsb, key=lambda k: self.score.get(k, 0.0)) if by_use else next(iter(lsb))
        return MSB, min(msb, key=lambda k: self.frequency.get(k, 0)) if by_use else next(iter(msb))

    def _evict(self, kind: str, key: tuple[int, int]) -> None:
        self.used -= self.cached[kind].pop(key).nbytes
        if kind == MSB and key in self.cached[LSB]:
            self.used -= self.cached[LSB].pop(key).nbytes

    def on_phase(self, phase: str) -> None:
        """Told by the generation loop when the prefill starts and when decoding starts (applies the warmup)."""
        if phase == PREFILL:
            self.frequency.clear()
            self.score.clear()
        elif phase == DECODE and self.phase == PREFILL:
            if self.warmup == "pcw":
                for kind, measure in ((MSB, self.frequency), (LSB, self.score)):
                    order = sorted(self.cached[kind].items(), key=lambda item: measure.get(item[0], 0))  # stable
                    self.cached[kind] = OrderedDict(order)
            elif self.warmup == "empty":
                for kind in (MSB, LSB):
                    self.cached[kind].clear()
                self.used = 0
        self.phase = phase

    @property
    def bytes_in_use(self) -> int:
        return self.used

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.store.close()
