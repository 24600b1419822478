"""Byte-budgeted tiers of held expert representations, with admission and eviction delegated to a policy.

A `Tiers` object holds, per representation (``decoded``, ``sm``, ``compressed``, ``msb``, ``lsb``), the experts kept
in that form. Representations are grouped into **pools**, each with a byte capacity: the lossless pipeline gives each
representation its own pool (``--tiers decoded=F,sm=F,compressed=F``); the slice pipeline puts MSB and LSB slices in
one pool, so that they compete for the same bytes. The policy (`zipmoe.runtime.policies`) says whether an expert is
admitted and which held representation is evicted to make room; this module only keeps the books, and guarantees
that no pool ever holds more than its capacity.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

Key = tuple[int, int]  # (layer, expert)


@dataclass
class Pool:
    """Representations sharing one byte capacity; ``held[kind]`` is in recency order (least recent first)."""

    name: str
    capacity: int
    kinds: tuple[str, ...]
    used: int = 0
    held: dict[str, OrderedDict[Key, tuple[Any, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.held = {kind: OrderedDict() for kind in self.kinds}

    def entries(self) -> Iterator[tuple[str, Key]]:
        """Every ``(kind, key)`` held, each kind in recency order."""
        for kind, entries in self.held.items():
            for key in entries:
                yield kind, key


class Policy(Protocol):
    """Decides what the tiers keep (see `zipmoe.runtime.policies`)."""

    name: str

    def on_use(self, key: Key, tokens: int) -> None:
        """An expert is used by ``tokens`` tokens (a hit or a miss), before anything is fetched or admitted."""

    def admits(self, tiers: Tiers, pool: Pool, kind: str, key: Key, nbytes: int) -> bool:
        """Whether to keep ``key`` as ``kind`` in ``pool`` (which may mean evicting what `victim` names)."""

    def victim(self, tiers: Tiers, pool: Pool) -> tuple[str, Key]:
        """What to evict from a non-empty ``pool`` to make room."""

    def on_phase(self, tiers: Tiers, phase: str) -> None:
        """The generation loop entered ``prefill`` or ``decode``."""


class Tiers:
    """Held representations of experts under per-pool byte capacities.

    Args:
        pools: pool name -> (capacity in bytes, representations it holds).
        policy: admission and eviction.
        depends: representation -> the one it is useless without (an LSB slice without its MSB slice): evicting
            the latter evicts the former, and the former is only admitted beside the latter.
    """

    def __init__(
        self,
        pools: Mapping[str, tuple[int, tuple[str, ...]]],
        policy: Policy,
        depends: Mapping[str, str] | None = None,
    ) -> None:
        self.pools = {name: Pool(name, max(0, capacity), kinds) for name, (capacity, kinds) in pools.items()}
        self._pool_of = {kind: pool for pool in self.pools.values() for kind in pool.kinds}
        self.policy = policy
        self.depends = dict(depends or {})

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._pool_of)

    def capacity(self, kind: str) -> int:
        return self._pool_of[kind].capacity

    def free(self, kind: str) -> int:
        """Bytes not yet used in the pool that holds ``kind``."""
        pool = self._pool_of[kind]
        return pool.capacity - pool.used

    def get(self, kind: str, key: Key) -> Any | None:
        """The held ``kind`` of ``key`` (made most recently used), or None."""
        entries = self._pool_of[kind].held[kind]
        found = entries.get(key)
        if found is None:
            return None
        entries.move_to_end(key)
        return found[0]

    def holds(self, kind: str, key: Key) -> bool:
        return key in self._pool_of[kind].held[kind]

    def admit(self, kind: str, key: Key, value: Any, nbytes: int) -> bool:
        """Keep ``value`` as ``kind`` of ``key`` if the policy agrees, evicting its victims; whether it was kept."""
        pool = self._pool_of[kind]
        entries = pool.held[kind]
        if key in entries:
            entries.move_to_end(key)
            return True
        needed = self.depends.get(kind)
        if nbytes > pool.capacity or (needed is not None and not self.holds(needed, key)):
            return False
        if not self.policy.admits(self, pool, kind, key, nbytes):
            return False
        while pool.used + nbytes > pool.capacity:
            victim_kind, victim_key = self.policy.victim(self, pool)
            if (victim_kind, victim_key) == (needed, key):  # never evict what this entry depends on
                return False
            self.evict(victim_kind, victim_key)
        entries[key] = (value, nbytes)
        pool.used += nbytes
        return True

    def evict(self, kind: str, key: Key) -> None:
        """Drop ``kind`` of ``key`` and whatever depends on it."""
        pool = self._pool_of[kind]
        _, nbytes = pool.held[kind].pop(key)
        pool.used -= nbytes
        for dependent, needed in self.depends.items():
            if needed == kind and self.holds(dependent, key):
                self.evict(dependent, key)

    def clear(self) -> None:
        for pool in self.pools.values():
            for entries in pool.held.values():
                entries.clear()
            pool.used = 0

    @property
    def used(self) -> int:
        return sum(pool.used for pool in self.pools.values())

    @property
    def capacity_total(self) -> int:
        return sum(pool.capacity for pool in self.pools.values())
