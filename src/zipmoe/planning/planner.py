"""The cache planner: how much of the budget holds decoded experts and how much sign-mantissa planes, and which
experts go where, from the activation model (`zipmoe.planning.activation`) and measured costs (`calibration`).

For a candidate split of the tier bytes (a share ``r`` decoded, the rest as planes, or as whole records in a
container without split records), the experts with the highest inclusion probabilities over all layers are pinned
decoded, the next ones as planes, until each share is full. Per MoE layer, the activation model gives the exact
distribution of (f decoded, s planes, m neither) among a token's k experts, and a decode step of that layer costs::

    io      = m * read(record) + s * read(exponents)             (one storage device, requests in a row)
    cpu     = (s + m) * decode + k * compute                     (the same cores decode and compute)
    latency = max(io, cpu) + overlap_loss * min(io, cpu)

The reference takes ``max(io, cpu)``: io and decoding fully overlapped. How much they overlap depends on the machine
(the first read overlaps nothing, a layer waits for the one before, decoding slows down while it shares the cores
with compute): on one 2-core machine decode steps took ``io + cpu``, on another about halfway between. So
``overlap_loss`` is measured too (`Costs.overlap_loss`: layers of misses timed through the engine's pipeline), and
`OVERLAP_LOSS` (1: no overlap credited) stands in only where it was not. The expected TPOT is the dense part's time
plus the expected latency of every MoE layer. The split with the lowest expected TPOT is the plan.

A plan file names the container's manifest SHA-256; a runtime refuses a plan made for another container.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zipmoe._json import load_json
from zipmoe.errors import ZipmoeError
from zipmoe.planning.activation import Fit, split_distribution

PLAN_FORMAT = "zipmoe-plan"
PLAN_VERSION = 1
OVERLAP_LOSS = 1.0  # share of the shorter of io and cpu a decode step does not hide, when not measured
DEFAULT_STEPS = 20  # candidate splits: 0, 1/20, ..., 1 of the tier bytes decoded
MAX_PLAN_NBYTES = 64 << 20
MAX_PINNED = 1 << 20
PIN_SHARE = 0.9  # of each tier's planned experts pinned; the rest of the tier is left to LFU


class PlanError(ZipmoeError, ValueError):
    """A plan file that cannot be used: unreadable, malformed, or made for another container."""


@dataclass(frozen=True)
class Costs:
    """What one expert costs on this machine (`zipmoe.planning.calibration`), and its sizes."""

    read_bytes_per_second: float
    decode_seconds: float  # one expert, all threads
    compute_seconds: float  # one expert, one token
    dense_seconds: float  # one token, everything but the routed experts
    record_nbytes: int
    exponent_nbytes: int  # what a sign-mantissa hit reads
    decoded_nbytes: int
    sm_nbytes: int  # the planes an `sm` tier holds (0: the container has no split records)
    compressed_nbytes: int  # a whole record in memory
    overlap_loss: float = OVERLAP_LOSS  # measured by the calibration (0: reads and cpu fully overlapped, 1: serial)

    def read_seconds(self, nbytes: int) -> float:
        return nbytes / self.read_bytes_per_second

    @property
    def decodes_per_read(self) -> float:
        """How many experts decode in the time one record is read (cache-affinity scheduling)."""
        return self.read_seconds(self.record_nbytes) / self.decode_seconds if self.decode_seconds > 0 else 1.0


@dataclass(frozen=True)
class Candidate:
    """One split of the tier bytes and what the model predicts for it."""

    decoded_share: float
    n_decoded: int
    n_compact: int  # experts held as planes (or whole records)
    hit_decoded: float  # expected share of expert uses served decoded
    hit_compact: float
    miss: float
    tpot_seconds: float


@dataclass
class Plan:
    """The chosen split, the experts pinned per tier, and the candidates it was chosen from."""

    container_sha256: str
    compact: str  # "sm" or "compressed": the form held beside decoded experts
    budget_bytes: int
    decoded_share: float
    pinned: dict[str, list[tuple[int, int]]]
    predicted_tpot_seconds: float
    candidates: list[Candidate]
    costs: Costs
    routing: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tiers(self) -> dict[str, float]:
        return {"decoded": self.decoded_share, self.compact: 1.0 - self.decoded_share}

    def loaded(self) -> LoadedPlan:
        """What a runtime uses of this plan (as `read_plan` would give it back)."""
        return LoadedPlan(
            self.container_sha256, self.budget_bytes, self.tiers,
            {kind: frozenset(keys) for kind, keys in self.pinned.items()}, self.predicted_tpot_seconds,
            self.costs.decodes_per_read,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "container_sha256": self.container_sha256,
            "compact": self.compact,
            "budget_bytes": self.budget_bytes,
            "decoded_share": self.decoded_share,
            "pinned": {kind: [list(key) for key in keys] for kind, keys in self.pinned.items()},
            "predicted_tpot_seconds": self.predicted_tpot_seconds,
            "candidates": [asdict(c) for c in self.candidates],
            "costs": asdict(self.costs),
            "routing": self.routing,
            **self.extra,
        }

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON (a ``.partial`` file renamed into place)."""
        target = Path(path)
        partial = target.with_name(target.name + ".partial")
        try:
            partial.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(partial, target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise PlanError(f"{path}: cannot write the plan ({exc.strerror or exc})") from None


@dataclass(frozen=True)
class LoadedPlan:
    """What a runtime needs of a plan file."""

    container_sha256: str
    budget_bytes: int
    tiers: dict[str, float]
    pinned: dict[str, frozenset[tuple[int, int]]]
    predicted_tpot_seconds: float
    decodes_per_read: float = 0.0  # from the measured costs (0: unknown)


def read_plan(path: str | os.PathLike[str], container_sha256: str) -> LoadedPlan:
    """Read and check a plan file for the container whose manifest has SHA-256 ``container_sha256``.

    Raises:
        PlanError: the file is unreadable, malformed, or made for another container.
    """
    where = str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
            raise PlanError(f"{where}: not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_PLAN_NBYTES + 1)
    except OSError as exc:
        raise PlanError(f"{where}: cannot read the plan ({exc.strerror or exc})") from None
    if len(data) > MAX_PLAN_NBYTES:
        raise PlanError(f"{where}: a plan file is at most {MAX_PLAN_NBYTES} bytes")
    doc = load_json(data, lambda reason: PlanError(f"{where}: {reason}"))
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT or doc.get("version") != PLAN_VERSION:
        raise PlanError(f"{where}: not a zipmoe plan (format {PLAN_FORMAT!r}, version {PLAN_VERSION})")
    sha = doc.get("container_sha256")
    if sha != container_sha256:
        raise PlanError(
            f"{where}: made for the container with manifest SHA-256 {str(sha)[:16]}..., not this one "
            f"({container_sha256[:16]}...); plan again with zipmoe plan"
        )
    compact, share, budget = doc.get("compact"), doc.get("decoded_share"), doc.get("budget_bytes")
    if compact not in ("sm", "compressed") or not _number(share, 0.0, 1.0) or not _integer(budget, 0, 2**63):
        raise PlanError(f"{where}: compact, decoded_share or budget_bytes is missing or out of range")
    pinned_doc = doc.get("pinned")
    if not isinstance(pinned_doc, dict) or set(pinned_doc) - {"decoded", compact}:
        raise PlanError(f"{where}: pinned must map decoded and {compact} to lists of [layer, expert]")
    pinned = {}
    for kind, keys in pinned_doc.items():
        if not isinstance(keys, list) or len(keys) > MAX_PINNED:
            raise PlanError(f"{where}: pinned {kind} must be a list of at most {MAX_PINNED} [layer, expert]")
        if not all(isinstance(k, list) and len(k) == 2 and all(_integer(v, 0, 1 << 20) for v in k) for k in keys):
            raise PlanError(f"{where}: pinned {kind} must be a list of [layer, expert] pairs")
        pinned[kind] = frozenset((int(a), int(b)) for a, b in keys)
    predicted = doc.get("predicted_tpot_seconds")
    costs = doc.get("costs") if isinstance(doc.get("costs"), dict) else {}
    read, decode, record = costs.get("read_bytes_per_second"), costs.get("decode_seconds"), costs.get("record_nbytes")
    ratio = record / read / decode if all(_number(v, 1e-12, math.inf) for v in (read, decode, record)) else 0.0
    return LoadedPlan(
        sha, int(budget), {"decoded": float(share), compact: 1.0 - float(share)}, pinned,
        float(predicted) if _number(predicted, 0.0, math.inf) else math.nan, min(ratio, 64.0),
    )  # fmt: skip


def _number(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _integer(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def layer_latency(costs: Costs, f: int, s: int, m: int, compact: str) -> float:
    """Expected seconds of one MoE layer's decode step with f decoded hits, s compact hits and m misses."""
    k = f + s + m
    compact_read = costs.exponent_nbytes if compact == "sm" else 0
    io = m * costs.read_seconds(costs.record_nbytes) + s * costs.read_seconds(compact_read)
    cpu = (s + m) * costs.decode_seconds + k * costs.compute_seconds
    return max(io, cpu) + costs.overlap_loss * min(io, cpu)


def plan_tiers(
    fit: Fit,
    moe_layers: list[int],
    k: int,
    costs: Costs,
    capacity: int,
    *,
    container_sha256: str,
    budget_bytes: int,
    routing: str,
    steps: int = DEFAULT_STEPS,
    decoded_share: float | None = None,
) -> Plan:
    """Choose the split of ``capacity`` tier bytes (see the module docstring); deterministic.

    ``decoded_share`` forces one of the candidate splits (the nearest) instead of the cheapest.
    """
    compact = "sm" if costs.sm_nbytes > 0 else "compressed"
    compact_nbytes = costs.sm_nbytes if compact == "sm" else costs.compressed_nbytes
    n_layers, n_experts = fit.log_w.shape
    if n_layers != len(moe_layers):
        raise ValueError(f"the fit has {n_layers} layers, the model {len(moe_layers)} MoE layers")
    order = np.lexsort((np.arange(n_layers * n_experts), -fit.targets.ravel()))  # most used first, ties by index
    latency = np.zeros((k + 1,) * 3)
    for f, s, m in np.ndindex(*latency.shape):
        if f + s + m == k:
            latency[f, s, m] = layer_latency(costs, f, s, m, compact)
    counts = np.arange(k + 1)

    def layer_cost(layer: int, groups: np.ndarray) -> tuple[float, np.ndarray]:
        """Expected latency of one layer and its expected uses served (decoded, compact, storage)."""
        dist = split_distribution(fit.log_w[layer], k, groups)
        hits = [(dist.sum(axis=axes) * counts).sum() for axes in ((1, 2), (0, 2), (0, 1))]
        return float((dist * latency).sum()), np.array(hits)

    def split(ranked: np.ndarray, nbytes: int, share: float) -> tuple[int, int, np.ndarray]:
        """Hold the first of ``ranked`` decoded and the next ones compact, in ``nbytes`` split at ``share``."""
        n_decoded = min(int(nbytes * share) // costs.decoded_nbytes, ranked.size)
        n_compact = min(int(nbytes * (1 - share)) // max(1, compact_nbytes), ranked.size - n_decoded)
        groups = np.full(ranked.size, 2)
        groups[ranked[:n_decoded]] = 0
        groups[ranked[n_decoded : n_decoded + n_compact]] = 1
        return n_decoded, n_compact, groups

    shares = [step / steps for step in range(steps + 1)]
    candidates = []  # global: one share, the most used experts of all layers first
    for share in shares:
        n_decoded, n_compact, groups = split(order, capacity, share)
        groups = groups.reshape(n_layers, n_experts)
        tpot, hits = costs.dense_seconds, np.zeros(3)
        for layer in range(n_layers):
            cost, used = layer_cost(layer, groups[layer])
            tpot, hits = tpot + cost, hits + used
        hits /= n_layers * k
        candidates.append(Candidate(share, n_decoded, n_compact, *map(float, hits), tpot))
    if decoded_share is None:
        best = min(range(len(candidates)), key=lambda i: (candidates[i].tpot_seconds, -candidates[i].decoded_share))
    else:
        best = min(range(len(candidates)), key=lambda i: abs(candidates[i].decoded_share - decoded_share))
    chosen = candidates[best]
    ranked = [(int(i) // n_experts, int(i) % n_experts) for i in order]
    pinned = {
        "decoded": ranked[: int(chosen.n_decoded * PIN_SHARE)],
        compact: ranked[chosen.n_decoded : chosen.n_decoded + int(chosen.n_compact * PIN_SHARE)],
    }
    pinned = {kind: sorted((moe_layers[layer], e) for layer, e in keys) for kind, keys in pinned.items()}
    # the alternative the planner does not take, for comparison: every layer an equal part of the bytes, split at
    # its own best share (on every case measured, one share over the most used experts of all layers did as well
    # or better, since that ranking already gives a hot layer more of the bytes)
    per_layer = costs.dense_seconds
    for layer in range(n_layers):
        ranked_layer = np.lexsort((np.arange(n_experts), -fit.targets[layer]))
        per_layer += min(layer_cost(layer, split(ranked_layer, capacity // n_layers, share)[2])[0] for share in shares)
    return Plan(
        container_sha256, compact, budget_bytes, chosen.decoded_share, pinned, chosen.tpot_seconds, candidates, costs,
        routing, extra={"per_layer_tpot_seconds": per_layer},
    )  # fmt: skip
