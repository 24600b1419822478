"""The expert pipeline: one MoE layer's routed experts from tiers and storage, under one byte budget.

For each MoE layer (`ExpertPipeline.run`):

1. Every expert some token chose is looked up in the tiers (`zipmoe.runtime.tiers`); the policy hears of the use.
2. Experts whose needed representations are all held are computed at once, while
3. the others are issued together to the storage thread, in expert order, as far as the in-flight reservation
   allows (each fetch reserves what it will hold: the bytes it reads and the weights it makes); the storage thread
   reads each one's missing bytes (`zipmoe.runtime.representations`) and hands every piece that has arrived to the
   decode thread, which decodes it on all cores, and goes on to the next read at once;
4. the compute thread takes fetched experts in issue order, computes them, and offers their new representations to
   the tiers (the policy admits or not), which frees their reservation and lets the next fetch start.

Results are summed in expert order (`accumulate`), so the output never depends on what was cached or how fast
storage was: served from a container at any budget, a model gives the tokens it gives with every expert in memory.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from zipmoe.runtime.model import accumulate, expert_assignments
from zipmoe.runtime.policies import DECODE, PREFILL
from zipmoe.runtime.representations import STORAGE, Fetch, LosslessExperts, SliceExperts
from zipmoe.runtime.storage import Storage
from zipmoe.runtime.tiers import Tiers
from zipmoe.sizes import BudgetError  # torch-free, so the CLI can check sizes before loading torch

MAX_CRITICAL = 2  # dbsc: at most this many critical experts per token (the two highest-probability slots)
SCHEDULES = ("fifo", "affinity")


@dataclass
class PipelineStats:
    """What the pipeline did. Counts are expert uses (one per expert a layer's tokens chose), bytes are exact."""

    requests: dict[str, int] = field(default_factory=lambda: {PREFILL: 0, DECODE: 0})
    served_from: dict[str, int] = field(default_factory=dict)  # per use: the cheapest place that served it
    hits: dict[str, int] = field(default_factory=dict)  # per needed representation that was held
    misses: dict[str, int] = field(default_factory=dict)  # per needed representation that was not
    storage_reads: dict[str, int] = field(default_factory=lambda: {PREFILL: 0, DECODE: 0})  # uses that read storage
    bytes_read: dict[str, int] = field(default_factory=lambda: {PREFILL: 0, DECODE: 0})
    bytes_decoded: int = 0  # BF16 bytes produced by decoding
    peak_bytes: int = 0  # tiers plus in-flight fetches
    stall_seconds: float = 0.0  # time the compute thread waited for fetches
    busy_seconds: float = 0.0  # storage busy during miss-heavy layers ...
    window_seconds: float = 0.0  # ... out of the time from their first read to their last
    computed: dict[str, int] = field(default_factory=lambda: {"high": 0, "low": 0})  # slice modes: expert runs
    tokens: int = 0  # slice modes: token-layer routings
    critical_tokens: int = 0  # of which had a critical expert (dbsc)
    decode_misses: list[int] = field(default_factory=list)  # reads from storage in each decode step
    prefetched_bytes: int = 0  # read at start for the experts a plan pins
    decode_seconds: float = 0.0  # time the decode thread spent decoding fetched records

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_bytes_read(self) -> int:
        return sum(self.bytes_read.values())

    def rate(self, where: str) -> float:
        return self.served_from.get(where, 0) / self.total_requests if self.total_requests else 0.0

    def miss_rate(self, kind: str | None = None) -> float:
        kinds = [kind] if kind else list(self.misses)
        asked = sum(self.hits.get(k, 0) + self.misses.get(k, 0) for k in kinds)
        return sum(self.misses.get(k, 0) for k in kinds) / asked if asked else 0.0

    @property
    def storage_busy(self) -> float | None:
        """Fraction of the time storage was busy in miss-heavy layers (None: there were none)."""
        return min(1.0, self.busy_seconds / self.window_seconds) if self.window_seconds > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.total_requests,
            "served_from": dict(self.served_from),
            "served_rate": {where: self.rate(where) for where in self.served_from},
            "hits": dict(self.hits),
            "misses": dict(self.misses),
            "miss_rate": {**{k: self.miss_rate(k) for k in self.misses}, "all": self.miss_rate()},
            "bytes_read": self.total_bytes_read,
            "bytes_decoded": self.bytes_decoded,
            "peak_bytes": self.peak_bytes,
            "stall_seconds": self.stall_seconds,
            "storage_busy": self.storage_busy,
            "computed": dict(self.computed),
            "critical_fraction": self.critical_tokens / self.tokens if self.tokens else 0.0,
            "decode_misses": list(self.decode_misses),
            "prefetched_bytes": self.prefetched_bytes,
            "decode_seconds": self.decode_seconds,
            "phases": {
                phase: {"requests": self.requests[phase], "storage_reads": self.storage_reads[phase],
                        "miss_rate": self.storage_reads[phase] / self.requests[phase] if self.requests[phase] else 0.0,
                        "bytes_read": self.bytes_read[phase]}
                for phase in (PREFILL, DECODE)
            },
        }  # fmt: skip


@dataclass
class _Job:
    expert: int
    tokens: torch.Tensor
    slots: torch.Tensor
    high: torch.Tensor | None
    needed: tuple[str, ...]
    held: dict[str, Any]
    cost: int = 0


class ExpertPipeline:
    """The expert backend of a model served from a container (see the module docstring).

    Args:
        source: what experts are made from (`LosslessExperts` or `SliceExperts`).
        tiers: the held representations and their policy.
        storage: the container's bytes (for utilisation statistics).
        reservation: bytes for fetches in flight (part of the budget, apart from the tiers).
        critical_threshold: slice ``dbsc`` mode: a selected expert whose raw router probability is at least this is
            critical (computed at high precision), at most `MAX_CRITICAL` per token.
        schedule: the order a layer's fetches are issued in: ``fifo`` (expert order), or ``affinity`` (ZipMoE's
            cache-affinity scheduling, `affinity_order`).
        decodes_per_read: ``affinity``: how many decode-only fetches fit in the time of one storage read.
    """

    def __init__(
        self,
        source: LosslessExperts | SliceExperts,
        tiers: Tiers,
        storage: Storage,
        reservation: int,
        *,
        critical_threshold: float = 0.0,
        schedule: str = "fifo",
        decodes_per_read: float = 1.0,
    ) -> None:
        if schedule not in SCHEDULES:
            raise BudgetError(f"unknown schedule {schedule!r} (choose {', '.join(SCHEDULES)})")
        self.schedule = schedule
        self.decodes_per_read = decodes_per_read
        self.source = source
        self.tiers = tiers
        self.storage = storage
        self.reservation = reservation
        self.threshold = critical_threshold
        self.stats = PipelineStats()
        self.phase = PREFILL
        self.args = source.args
        self._first_layer = self.args.sparse_layers.index(True) if any(self.args.sparse_layers) else 0
        self._io = ThreadPoolExecutor(1, thread_name_prefix="zipmoe-io")
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="zipmoe-decode")

    # -- the backend --------------------------------------------------------------------------------------------------

    def run(
        self,
        layer: int,
        x: torch.Tensor,
        top_index: torch.Tensor,
        top_weight: torch.Tensor,
        top_prob: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One MoE layer's routed experts: held ones first, then fetched ones in issue order.

        ``top_prob`` ([T, K]) are the raw router probabilities of the chosen experts (dbsc's critical experts).
        """
        stats = self.stats
        if self.phase == DECODE and layer == self._first_layer:
            stats.decode_misses.append(0)
        high_slots = self._high_slots(top_index, top_weight, top_prob)
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        pending: list[_Job] = []
        share = (top_weight / top_weight.sum(dim=-1, keepdim=True)).float()
        for expert, tokens, slots in expert_assignments(top_index):
            key = (layer, expert)
            high = None if high_slots is None else high_slots[tokens, slots]
            needed = self.source.needs(high)
            self.tiers.policy.on_use(key, len(tokens), float(share[tokens, slots].sum()))
            held = {}
            for kind in self.source.kinds:
                value = self.tiers.get(kind, key)
                if value is not None:
                    held[kind] = value
            stats.requests[self.phase] += 1
            for kind in needed:
                counts = stats.hits if kind in held else stats.misses
                counts[kind] = counts.get(kind, 0) + 1
            job = _Job(expert, tokens, slots, high, needed, held)
            if all(kind in held for kind in needed):
                self._served(needed[0])
                outputs[expert] = (tokens, self._compute(key, job, x, top_weight))
            else:
                pending.append(job)
        if pending:
            self._fetch_and_compute(layer, pending, x, top_weight, outputs)
        return accumulate(x, outputs)

    def _high_slots(self, top_index, top_weight, top_prob) -> torch.Tensor | None:
        """Which (token, slot) compute at high precision ([T, K] bool), or None for the lossless source."""
        mode = self.source.mode
        if mode is None:
            return None
        if mode == "high" or (mode == "dbsc" and self.phase == PREFILL):
            return torch.ones_like(top_index, dtype=torch.bool)
        if mode != "dbsc":
            return torch.zeros_like(top_index, dtype=torch.bool)
        probs = top_prob if top_prob is not None else top_weight.float()
        critical = probs >= self.threshold
        critical[:, MAX_CRITICAL:] = False  # slots are in decreasing probability
        self.stats.tokens += critical.shape[0]
        self.stats.critical_tokens += int(critical.any(dim=1).sum())
        return critical

    def _served(self, where: str) -> None:
        self.stats.served_from[where] = self.stats.served_from.get(where, 0) + 1

    def _compute(self, key, job: _Job, x: torch.Tensor, top_weight: torch.Tensor) -> torch.Tensor:
        if job.high is not None:
            precision = "high" if bool(job.high.any()) else "low"
            self.stats.computed[precision] += 1
            if precision == "high" and not bool(job.high.all()):
                self.stats.computed["low"] += 1
        return self.source.compute(key, job.held, x, job.tokens, job.slots, top_weight, job.high)

    def _fetch_and_compute(self, layer: int, pending: list[_Job], x, top_weight, outputs) -> None:
        stats = self.stats
        if self.schedule == "affinity":
            pending = affinity_order(pending, self.decodes_per_read)
        queue = deque(pending)
        inflight: deque[tuple[_Job, Future]] = deque()
        reserved = 0
        storage_before = self.storage.snapshot()
        started = time.perf_counter()
        last_read = [started]

        def read_done(_: Future) -> None:
            last_read[0] = time.perf_counter()

        def launch() -> None:
            nonlocal reserved
            while queue:
                job = queue[0]
                job.cost = self.source.fetch_nbytes(job.held, job.needed)
                if inflight and reserved + job.cost > self.reservation:
                    break
                queue.popleft()
                reserved += job.cost
                future = self._io.submit(self.source.fetch, (layer, job.expert), job.held, job.needed, self._decode)
                future.add_done_callback(read_done)
                inflight.append((job, future))
            self._note_peak(reserved)

        launch()
        reads = 0
        while inflight:
            job, future = inflight.popleft()
            waited = time.perf_counter()
            fetch: Fetch = future.result()
            new = fetch.finish() if fetch.finish else {}
            stats.stall_seconds += time.perf_counter() - waited
            self._served(fetch.served_from)
            stats.bytes_read[self.phase] += fetch.bytes_read
            stats.bytes_decoded += fetch.bytes_decoded
            if fetch.served_from == STORAGE:
                reads += 1
                stats.storage_reads[self.phase] += 1
                if self.phase == DECODE and stats.decode_misses:
                    stats.decode_misses[-1] += fetch.reads
            job.held.update({kind: value for kind, (value, _) in new.items()})
            key = (layer, job.expert)
            outputs[job.expert] = (job.tokens, self._compute(key, job, x, top_weight))
            job.held = {}  # what the tiers do not keep is freed now, not when the layer ends
            self.source.recycle(fetch, self._admit(key, new))
            del new, fetch
            reserved -= job.cost
            launch()
        if reads >= max(2, len(pending) // 2):  # a miss-heavy layer: was storage kept busy?
            after = self.storage.snapshot()
            stats.busy_seconds += after.busy_seconds - storage_before.busy_seconds
            stats.window_seconds += max(0.0, last_read[0] - started)

    def _decode(self, fn, *args) -> Future:
        """Run a fetch's decode step on the decode thread, adding its time to ``stats.decode_seconds``."""

        def timed():
            started = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.stats.decode_seconds += time.perf_counter() - started

        return self._decoder.submit(timed)

    def _admit(self, key, new: dict[str, tuple[Any, int]]) -> set[str]:
        """Offer a fetch's new representations to the tiers, fastest first; of the compact lossless forms (a whole
        record, or its sign-mantissa planes) only one is kept: the record if its tier takes it. Returns what was
        kept."""
        kept: set[str] = set()
        for kind in self.tiers.kinds:
            if kind not in new or self.tiers.capacity(kind) <= 0 or (kind == "sm" and "compressed" in kept):
                continue
            value, nbytes = new[kind]
            if self.tiers.admit(kind, key, value, nbytes):
                kept.add(kind)
        self._note_peak(0)
        return kept

    def _note_peak(self, reserved: int) -> None:
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.tiers.used + max(reserved, self.reservation))

    def on_phase(self, phase: str) -> None:
        """Told by the generation loop when the prefill and when decoding starts (applies warm starts)."""
        wanted = self.tiers.policy.on_phase(self.tiers, phase)
        self.phase = PREFILL if wanted else phase  # a warm start's reads count as prefill
        for kind, key in wanted:  # until the tiers are full
            if self.tiers.holds(kind, key):
                continue
            if self.source.nbytes(kind) > self.tiers.free(kind):
                break
            self.stats.bytes_read[PREFILL] += self._read_into_tier(kind, key)
        self.phase = phase

    def _read_into_tier(self, kind: str, key: tuple[int, int]) -> int:
        """Read ``key`` from storage and offer its ``kind`` to the tiers, outside any layer; the bytes read."""
        fetch = self.source.fetch(key, {}, (kind,), self._decoder.submit)
        value, nbytes = (fetch.finish() if fetch.finish else {})[kind]
        self.source.recycle(fetch, {kind} if self.tiers.admit(kind, key, value, nbytes) else set())
        return fetch.bytes_read

    def prefetch(self, pinned: dict[str, frozenset[tuple[int, int]]]) -> None:
        """Read the experts a plan pins and keep each in its tier (before the first token)."""
        for kind in self.tiers.kinds:
            for key in sorted(pinned.get(kind, ())):
                if not self.tiers.holds(kind, key):
                    self.stats.prefetched_bytes += self._read_into_tier(kind, key)
        self._note_peak(0)

    @property
    def bytes_in_use(self) -> int:
        return self.tiers.used

    def close(self) -> None:
        self._io.shutdown(wait=True)
        self._decoder.shutdown(wait=True)
        self.storage.close()


def affinity_order(jobs: list[_Job], decodes_per_read: float) -> list[_Job]:
    """ZipMoE's cache-affinity order for a layer's fetches, so that storage and the decode workers are both busy.

    Type I fetches read a record from storage and decode it; Type II fetches decode a form already held (a whole
    record, or planes plus a small exponent read). Each type is ordered by the tokens waiting on it (most first; the
    expert order among equals), and they are interleaved: one Type I, then as many Type II as decode in the time of
    its read (`decodes_per_read`, at least one), and so on. The results are still summed in expert order.
    """
    compact = ("compressed", "sm")
    type1 = [j for j in jobs if not any(kind in j.held for kind in compact)]
    type2 = [j for j in jobs if any(kind in j.held for kind in compact)]
    type1.sort(key=lambda j: -len(j.tokens))
    type2.sort(key=lambda j: -len(j.tokens))
    step = max(1, round(decodes_per_read))
    ordered: list[_Job] = []
    while type1 or type2:
        if type1:
            ordered.append(type1.pop(0))
        ordered.extend(type2[:step])
        del type2[:step]
    return ordered
