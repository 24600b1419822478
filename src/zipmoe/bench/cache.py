"""`zipmoe bench cache`: cache policies compared on one routing trace, at several budgets, in one process.

Every method serves the same lossless container under the same budget and simulated storage, replaying the same
request of the same trace (the planned methods fit their plan on the trace's first half, `zipmoe.bench.serving`):

* ``fifo``, ``lru``, ``lfu``: the default tiers (decoded experts) under that eviction policy;
* ``planned``: `zipmoe plan`'s split and pinned experts, LFU for the rest, fetches in expert (FIFO) order;
* ``planned+affinity``: the same with cache-affinity issue order.

Faster than `zipmoe bench run` (one process, shorter generations), so TPOT includes less warm-up and is noisier;
hit rates and bytes read are exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METHODS = (
    ("fifo", {"policy": "fifo"}),
    ("lru", {"policy": "lru"}),
    ("lfu", {"policy": "lfu"}),
    ("planned", {"plan": True, "schedule": "fifo"}),
    ("planned+affinity", {"plan": True, "schedule": "affinity"}),
)


@dataclass
class CacheRow:
    method: str
    budget_percent: float
    result: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "budget_percent": self.budget_percent, **self.result}


def run_cache_bench(
    container: Path,
    *,
    budgets: tuple[float, ...] = (10, 20, 30, 40, 50),
    storage_gbps: float = 1.25,
    routing: str = "synthetic:qwen",
    prompt_tokens: int = 32,
    new_tokens: int = 16,
    threads: int = 2,
    device: str = "cpu",
    on_row: Any = None,
) -> list[CacheRow]:
    """Every method at every budget (see the module docstring)."""
    import torch

    from zipmoe.bench.serving import _trace, measured_request, use_fitted_plan
    from zipmoe.codecs.parts import warm_up
    from zipmoe.runtime.engine import Engine, EngineOptions
    from zipmoe.runtime.generate import SamplingOptions

    warm_up()
    torch.set_num_threads(threads)
    prompt = np.random.default_rng(0).integers(0, 256, prompt_tokens).tolist()
    sampling = SamplingOptions(max_new_tokens=new_tokens, stop_at_eos=False)
    config = {"routing": routing, "prompt": prompt, "new_tokens": new_tokens}
    dtype = "float32" if device == "cpu" else "bfloat16"
    rows = []
    for budget in budgets:
        for method, settings in METHODS:
            (on_row or (lambda s: None))(f"{method}, budget {budget:g}%")
            options = EngineOptions(
                device=device, dtype=dtype, memory_budget=f"{budget}%", threads=threads,
                simulate_storage_gbps=storage_gbps, policy=settings.get("policy", "lfu"),
                schedule=settings.get("schedule"),
            )  # fmt: skip
            with Engine(container, options) as engine:
                trace = _trace(config, engine.args)
                engine.replay_routing(trace, measured_request(trace))
                predicted = None
                if settings.get("plan"):
                    plan = use_fitted_plan(engine, trace, schedule=settings["schedule"])
                    predicted = plan.predicted_tpot_seconds
                started = time.perf_counter()
                result = engine.generate_tokens(prompt, sampling)
                stats = engine.pipeline.stats
                rows.append(
                    CacheRow(
                        method,
                        budget,
                        {
                            "ttft_seconds": result.ttft,
                            "tpot_seconds": result.tpot,
                            "seconds": time.perf_counter() - started,
                            "served_rate": {k: stats.rate(k) for k in ("decoded", "compressed", "sm", "storage")},
                            "bytes_read": stats.total_bytes_read,
                            "prefetched_bytes": stats.prefetched_bytes,
                            "predicted_tpot_seconds": predicted,
                            "tokens": result.tokens,
                        },
                    )  # fmt: skip
                )
    return rows


def plot(rows: list[CacheRow], path: Path, title: str) -> None:
    """Decode-step hit rate and TPOT against the budget, one line per method, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hits, tpot) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=150)
    for method, _ in METHODS:
        mine = [r for r in rows if r.method == method]
        budgets = [r.budget_percent for r in mine]
        hits.plot(budgets, [1 - r.result["served_rate"]["storage"] for r in mine], marker="o", label=method)
        tpot.plot(budgets, [r.result["tpot_seconds"] * 1000 for r in mine], marker="o", label=method)
    hits.set_xlabel("budget (% of BF16 expert bytes)")
    hits.set_ylabel("expert uses served from memory")
    tpot.set_xlabel("budget (% of BF16 expert bytes)")
    tpot.set_ylabel("TPOT (ms)")
    tpot.legend(fontsize=8)
    for ax in (hits, tpot):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
