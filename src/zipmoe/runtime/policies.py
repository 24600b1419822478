"""What the expert tiers keep: admission and eviction policies behind one interface (`zipmoe.runtime.tiers.Policy`).

* `LRU`: admit everything, evict the least recently used. `FIFO`: evict the first admitted (a baseline).
* `LFU`: token-weighted least frequently used, the ZipMoE reference's policy: an expert's count grows by the number of
  tokens routed to it; the victim is the lowest count (the least recently used among equals); an expert is only
  admitted over a victim with a lower count than its own, so one-off experts do not flush frequent ones, and a
  cycle over more experts than fit keeps a stable subset instead of evicting each one just before its next use
  (LRU's cliff). Counts start again with each request (each prefill), as the reference resets them per batch.
* `SlicePolicy`: SliceMoE's dynamic bit-sliced caching (DBSC) and predictive cache warmup (PCW) over a pool of MSB
  and LSB slices; see its docstring.

A policy is told every use (`on_use`) before the pipeline looks anything up, so counts include the current token.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping

from zipmoe.runtime.tiers import Key, Pool, Tiers

PREFILL, DECODE = "prefill", "decode"
DEFAULT_THRESHOLD = 0.4  # dbsc: raw router probability that makes a selected expert critical (docs/RUNTIME.md)
MSB, LSB = "msb", "lsb"


class LRU:
    """Least recently used (the order `Tiers` keeps)."""

    name = "lru"

    def on_use(self, key: Key, tokens: int, weight: float = 0.0) -> None:
        pass

    def admits(self, tiers: Tiers, pool: Pool, kind: str, key: Key, nbytes: int) -> bool:
        return True

    def victim(self, tiers: Tiers, pool: Pool) -> tuple[str, Key]:
        return next(pool.entries())

    def on_phase(self, tiers: Tiers, phase: str) -> list[tuple[str, Key]]:
        return []


class FIFO:
    """First in, first out: the victim is the entry admitted longest ago, whatever its use since (a baseline)."""

    name = "fifo"

    def __init__(self) -> None:
        self.admitted: dict[tuple[str, Key], int] = {}
        self._clock = 0

    def on_use(self, key: Key, tokens: int, weight: float = 0.0) -> None:
        pass

    def admits(self, tiers: Tiers, pool: Pool, kind: str, key: Key, nbytes: int) -> bool:
        self._clock += 1
        self.admitted[(kind, key)] = self._clock
        return True

    def victim(self, tiers: Tiers, pool: Pool) -> tuple[str, Key]:
        return min(pool.entries(), key=lambda entry: self.admitted.get(entry, 0))

    def on_phase(self, tiers: Tiers, phase: str) -> list[tuple[str, Key]]:
        return []


class LFU:
    """Token-weighted least frequently used (the ZipMoE reference's policy)."""

    name = "lfu"

    def __init__(self) -> None:
        self.counts: dict[Key, int] = {}

    def on_use(self, key: Key, tokens: int, weight: float = 0.0) -> None:
        self.counts[key] = self.counts.get(key, 0) + tokens

    def _coldest(self, pool: Pool) -> tuple[str, Key]:
        return min(pool.entries(), key=lambda entry: self.counts.get(entry[1], 0))  # min() keeps recency among equals

    def admits(self, tiers: Tiers, pool: Pool, kind: str, key: Key, nbytes: int) -> bool:
        if pool.used + nbytes <= pool.capacity:
            return True
        return self.counts.get(self._coldest(pool)[1], 0) < self.counts.get(key, 0)

    def victim(self, tiers: Tiers, pool: Pool) -> tuple[str, Key]:
        return self._coldest(pool)

    def on_phase(self, tiers: Tiers, phase: str) -> list[tuple[str, Key]]:
        if phase == PREFILL:
            self.counts.clear()
        return []


class PlannedLFU(LFU):
    """Token-weighted LFU around the experts a plan pins (`zipmoe.planning`): pinned experts are never evicted, and
    the rest of each tier is managed as `LFU` manages it."""

    name = "planned"

    def __init__(self, pinned: Mapping[str, frozenset[Key]]) -> None:
        super().__init__()
        self.pinned = pinned

    def _coldest(self, pool: Pool) -> tuple[str, Key] | None:  # type: ignore[override]
        free = [(kind, key) for kind, key in pool.entries() if key not in self.pinned.get(kind, ())]
        return min(free, key=lambda entry: self.counts.get(entry[1], 0)) if free else None

    def admits(self, tiers: Tiers, pool: Pool, kind: str, key: Key, nbytes: int) -> bool:
        if key in self.pinned.get(kind, ()) or pool.used + nbytes <= pool.capacity:
            return True
        victim = self._coldest(pool)
        return victim is not None and self.counts.get(victim[1], 0) < self.counts.get(key, 0)

    def victim(self, tiers: Tiers, pool: Pool) -> tuple[str, Key]:
        return self._coldest(pool) or next(pool.entries())


POLICIES = {"lru": LRU, "lfu": LFU, "fifo": FIFO}
WARMUPS = ("pcw", "last-layer", "random", "empty")


class SlicePolicy:
    """DBSC and PCW over one pool of MSB and LSB slices (SliceMoE).

    Eviction: with ``lsb_first`` (dbsc), any cached LSB slice goes before any MSB slice (an LSB slice is useless
    without its MSB, so evicting an MSB takes its LSB along: `Tiers.depends`); otherwise (the ``high`` and ``low``
    modes) the least recently used slice goes. Within a kind the victim is the least recently used, except during a
    PCW prefill.

    Warm starts (what the cache holds when decoding starts):

    * ``pcw`` (predictive cache warmup): during the prefill, the policy counts per expert the tokens routed to it
      (frequency) and their share of the routing weight (score); space is made by evicting the LSB slices of the
      lowest-scoring experts first, then the MSB slices of the least frequently used, so the slices left when decoding
      starts are those the prompt used most, across all layers. At the end of the prefill the recency orders are
      rewritten by the same measures, so decoding evicts in that order until its own accesses take over.
    * ``last-layer``: whatever plain LRU left (mostly the last layers' experts).
    * ``random``: the cache is emptied and refilled with the MSB slices of experts drawn at random (seeded), read
      from storage before the first decode step.
    * ``empty``: the cache is emptied (the paper's baseline).
    """

    name = "slices"

    def __init__(self, *, lsb_first: bool, warmup: str = "pcw", experts: list[Key] | None = None, seed: int = 0):
        if warmup not in WARMUPS:
            raise ValueError(f"unknown warmup {warmup!r} (choose {', '.join(WARMUPS)})")
        self.lsb_first = lsb_first
        self.warmup = warmup
        self.phase = PREFILL
        self.frequency: dict[Key, int] = {}
        self.score: dict[Key, float] = {}
        self._experts = experts or []
        self._random = random.Random(seed)

    def on_use(self, key: Key, tokens: int, weight: float = 0.0) -> None:
        if self.phase == PREFILL:
            self.frequency[key] = self.frequency.get(key, 0) + tokens
            self.score[key] = self.score.get(key, 0.0) + weight

    def admits(self, tiers: Tiers, pool: Pool, kind: str, key: Key, nbytes: int) -> bool:
        """Always, except during a PCW prefill, where a slice is kept only if it is used at least as much as what
        it would evict (an LSB slice never evicts an MSB slice in dbsc)."""
        if pool.used + nbytes <= pool.capacity or not (self.phase == PREFILL and self.warmup == "pcw"):
            return True
        victim_kind, victim = self.victim(tiers, pool)
        if kind == LSB and victim_kind == MSB and self.lsb_first:
            return False
        if kind == LSB and victim_kind == LSB:
            return self.score.get(key, 0.0) >= self.score.get(victim, 0.0)
        return victim_kind == LSB or self.frequency.get(key, 0) >= self.frequency.get(victim, 0)

    def victim(self, tiers: Tiers, pool: Pool) -> tuple[str, Key]:
        by_use = self.phase == PREFILL and self.warmup == "pcw"
        lsb, msb = pool.held[LSB], pool.held[MSB]
        if lsb and self.lsb_first:
            return LSB, (min(lsb, key=lambda k: self.score.get(k, 0.0)) if by_use else next(iter(lsb)))
        if not msb:
            return LSB, next(iter(lsb))
        return MSB, (min(msb, key=lambda k: self.frequency.get(k, 0)) if by_use else next(iter(msb)))

    def on_phase(self, tiers: Tiers, phase: str) -> list[tuple[str, Key]]:
        """Apply the warm start when decoding begins; returns the slices to read now (``random``)."""
        wanted: list[tuple[str, Key]] = []
        if phase == PREFILL:
            self.frequency.clear()
            self.score.clear()
        elif self.phase == PREFILL:
            pool = next(iter(tiers.pools.values()))
            if self.warmup == "pcw":
                for kind, measure in ((MSB, self.frequency), (LSB, self.score)):
                    order = sorted(pool.held[kind].items(), key=lambda item: measure.get(item[0], 0))  # stable
                    pool.held[kind] = OrderedDict(order)
            elif self.warmup in ("empty", "random"):
                tiers.clear()
            if self.warmup == "random":
                wanted = [(MSB, key) for key in self._random.sample(self._experts, len(self._experts))]
        self.phase = phase
        return wanted
