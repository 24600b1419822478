"""`zipmoe bench slices`: bytes read, misses, TPOT and perplexity of the precision modes at one memory budget.

Every method serves the same container (packed with ``--slices``) under the same expert-memory budget and the same
simulated storage, generating from the same prompt (the first tokens of the evaluation text, greedy, EOS ignored):

* ``lossless``: BF16 experts through the compression-aware cache (decoded float32/BF16 experts);
* ``q8``: AMAT high bits (MSB and LSB slices, an LRU of experts);
* ``q4``: AMAT low bits (MSB slices alone);
* ``dbsc``: the prefill at 8 bits; decoding: critical experts (router probability at least the threshold, at most
  two per token) at 8 bits, the rest at 4; MSB slices LRU, LSB slices evicted first; decoding starts with what LRU
  left after the prefill (the last layers' slices: the ``last-layer`` warm start);
* ``dbsc+pcw``: the same with predictive cache warmup;
* ``dbsc+random``: the cache refilled with random experts' MSB slices when decoding starts;
* ``dbsc+empty``: the cache emptied when decoding starts (the paper's baseline for PCW).

Perplexity is measured on the evaluation text with every expert in memory, since the budget changes what is read,
not what is computed. Each method runs ``repeat`` times, interleaved, each time with a fresh
engine (a cold cache); the median TPOT is reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from zipmoe.evaluate import perplexity
from zipmoe.runtime.engine import Engine, EngineOptions
from zipmoe.runtime.generate import SamplingOptions

# (label, mode, warmup)
METHODS = (
    ("lossless", "lossless", "last-layer"),
    ("q8", "q8", "last-layer"),
    ("q4", "q4", "last-layer"),
    ("dbsc", "dbsc", "last-layer"),
    ("dbsc+pcw", "dbsc", "pcw"),
    ("dbsc+random", "dbsc", "random"),
    ("dbsc+empty", "dbsc", "empty"),
)
FIRST_DECODE_TOKENS = 16


@dataclass
class SliceBenchRow:
    """One method's measurements."""

    method: str
    mode: str
    warmup: str
    perplexity: float = 0.0
    tpot_seconds: list[float] = field(default_factory=list)  # one per round
    ttft_seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)  # of the last round

    @property
    def tpot(self) -> float:
        return statistics.median(self.tpot_seconds)

    @property
    def decode_bytes_read(self) -> int:
        return self.cache["phases"]["decode"]["bytes_read"]

    @property
    def decode_miss_rate(self) -> float:
        return self.cache["phases"]["decode"]["miss_rate"]

    @property
    def first_decode_misses(self) -> int | None:
        """Slice misses in the first decode tokens (slice modes only)."""
        per_step = self.cache.get("decode_misses")
        return None if per_step is None else sum(per_step[:FIRST_DECODE_TOKENS])

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "mode": self.mode,
            "warmup": self.warmup,
            "perplexity": self.perplexity,
            "tpot_seconds": self.tpot,
            "tpot_rounds": self.tpot_seconds,
            "ttft_seconds": statistics.median(self.ttft_seconds),
            "decode_bytes_read": self.decode_bytes_read,
            "decode_miss_rate": self.decode_miss_rate,
            "first_decode_misses": self.first_decode_misses,
            "tokens": self.tokens,
            "cache": self.cache,
        }


@dataclass
class SliceBenchReport:
    """All rows, the settings, and the targets of the issue checked against them."""

    rows: list[SliceBenchRow]
    settings: dict[str, Any]

    def row(self, method: str) -> SliceBenchRow:
        return next(r for r in self.rows if r.method == method)

    def targets(self) -> list[tuple[str, str, bool]]:
        """(target, measured, met) for the SliceMoE targets this bench measures."""
        q8, dbsc, pcw, empty = (self.row(m) for m in ("q8", "dbsc", "dbsc+pcw", "dbsc+empty"))
        bytes_ratio = dbsc.decode_bytes_read / q8.decode_bytes_read if q8.decode_bytes_read else float("nan")
        ppl_ratio = dbsc.perplexity / q8.perplexity
        cut = 1 - pcw.first_decode_misses / empty.first_decode_misses if empty.first_decode_misses else float("nan")
        return [
            ("dbsc reads <= 0.6x the bytes of q8 (decode)", f"{bytes_ratio:.2f}x", bytes_ratio <= 0.6),
            ("dbsc perplexity within 3% of q8", f"{100 * (ppl_ratio - 1):+.2f}%", ppl_ratio <= 1.03),
            (f"PCW cuts misses in the first {FIRST_DECODE_TOKENS} decode tokens by >= 30% vs an empty cache",
             f"{100 * cut:.0f}% ({pcw.first_decode_misses} vs {empty.first_decode_misses})", cut >= 0.3),
        ]  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "rows": [r.to_json() for r in self.rows],
            "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in self.targets()],
        }


def run_slice_bench(
    container: Path,
    text: str,
    *,
    budget: str = "30%",
    storage_gbps: float | None = 1.25,
    prompt_tokens: int = 256,
    new_tokens: int = 32,
    eval_tokens: int = 8192,
    context: int = 256,
    threshold: float | None = None,
    repeat: int = 3,
    threads: int | None = None,
    device: str = "cpu",
    on_step: Callable[[str], None] | None = None,
) -> SliceBenchReport:
    """Measure every method of `METHODS` on ``container`` (see the module docstring)."""
    base = EngineOptions(device=device, threads=threads, simulate_storage_gbps=storage_gbps)
    if threshold is not None:
        base = replace(base, critical_threshold=threshold)
    rows = [SliceBenchRow(label, mode, warmup) for label, mode, warmup in METHODS]
    with Engine(container, replace(base, simulate_storage_gbps=None)) as engine:
        prompt = engine.tokenizer.encode(text)[:prompt_tokens]
    sampling = SamplingOptions(max_new_tokens=new_tokens, stop_at_eos=False)
    for round_index in range(repeat):
        for row in rows:
            if on_step:
                on_step(f"{row.method}: generation {round_index + 1}/{repeat}")
            options = replace(base, mode=row.mode, warmup=row.warmup, memory_budget=budget)
            with Engine(container, options) as engine:
                result = engine.generate_tokens(prompt, sampling)
                row.tpot_seconds.append(result.tpot)
                row.ttft_seconds.append(result.ttft)
                row.tokens = result.tokens
                row.cache = engine.pipeline.stats.to_json()
    ppl: dict[str, float] = {}
    for row in rows:
        if row.mode not in ppl:
            if on_step:
                on_step(f"{row.mode}: perplexity")
            options = replace(base, simulate_storage_gbps=None)
            ppl[row.mode] = perplexity(container, text, [row.mode], context=context, max_tokens=eval_tokens,
                                       options=options)[0].perplexity  # fmt: skip
        row.perplexity = ppl[row.mode]
    settings = {
        "container": str(container),
        "budget": budget,
        "storage_gbps": storage_gbps,
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "eval_tokens": eval_tokens,
        "context": context,
        "repeat": repeat,
        "device": device,
        "threads": threads,
        "critical_threshold": base.critical_threshold,
    }
    return SliceBenchReport(rows, settings)


def plot(report: SliceBenchReport, path: Path) -> None:
    """Perplexity against TPOT, one point per method, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    for row, marker in zip(report.rows, "osD^v<>p*", strict=False):
        ax.scatter(row.tpot * 1000, row.perplexity, s=40, marker=marker, label=row.method, alpha=0.85)
    ax.legend(fontsize=8)  # methods can share a perplexity (dbsc with and without warmup): a legend, not labels
    s = report.settings
    ax.set_xlabel("time per output token (ms)")
    ax.set_ylabel("perplexity (held-out text)")
    storage = "page cache" if s["storage_gbps"] is None else f"{s['storage_gbps']:g} GB/s simulated storage"
    ax.set_title(f"zipmoe bench slices: budget {s['budget']} of BF16 experts, {storage}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
