"""Planning for an open engine: measure its costs, fit the activation model to a routing trace, choose the split."""

from __future__ import annotations

import numpy as np

from zipmoe.families import family_for
from zipmoe.planning.activation import fit_weights
from zipmoe.planning.calibration import calibrate
from zipmoe.planning.planner import Plan, plan_tiers
from zipmoe.runtime.routing import RoutingError, RoutingTrace, parse_routing
from zipmoe.summary import manifest_sha256

FIT_REQUESTS = 64  # requests of a synthetic trace the model is fitted on
FIT_TOKENS = 64


def auto_routing(model_type: str | None) -> str:
    """The synthetic routing an architecture is planned with when no trace is given."""
    family = family_for(model_type)
    return family.routing if family is not None else "synthetic:qwen"


def plan_engine(
    engine,
    routing: str | RoutingTrace | None = None,
    *,
    requests: slice | None = None,
    decoded_share: float | None = None,
) -> Plan:
    """A plan for ``engine``'s container, budget and settings.

    Args:
        engine: an open `Engine` (lossless mode).
        routing: a trace, a spec (``synthetic:NAME`` or a path), or None for the architecture's synthetic default.
        requests: fit on these requests of the trace only (the benchmark fits on one half and measures the other).
        decoded_share: force this split instead of the cheapest (`plan_tiers`).
    """
    args = engine.args
    moe_layers = [layer for layer in range(args.n_layers) if args.sparse_layers[layer]]
    embedded = engine.container.manifest.routing
    if routing is None and embedded is not None:  # statistics stored at pack time (`pack --routing`)
        spec = "embedded"
        counts, tokens = _embedded_counts(embedded, len(moe_layers), args.n_experts, args.top_k)
    else:
        spec = routing if isinstance(routing, str) else auto_routing(args.family) if routing is None else "trace"
        trace = routing if isinstance(routing, RoutingTrace) else parse_routing(
            spec, num_layers=len(moe_layers), num_experts=args.n_experts, top_k=args.top_k, requests=FIT_REQUESTS,
            tokens_per_request=FIT_TOKENS,
        )  # fmt: skip
        counts, tokens = trace.for_model(len(moe_layers), args.n_experts, args.top_k).counts(requests)
    fit = fit_weights(counts / tokens, args.top_k)
    return plan_tiers(
        fit, moe_layers, args.top_k, calibrate(engine), engine.budget - engine.reservation,
        container_sha256=manifest_sha256(engine.container), budget_bytes=engine.budget, routing=spec,
        decoded_share=decoded_share,
    )  # fmt: skip


def _embedded_counts(stats, layers: int, experts: int, top_k: int) -> tuple[np.ndarray, int]:
    """The counts a container stores, for a model of ``layers`` sparse layers (a trace of more uses its first)."""
    if stats.num_experts != experts or stats.top_k != top_k or stats.num_layers < layers:
        raise RoutingError(
            f"the container's routing statistics are for {stats.num_layers} layers of {stats.num_experts} experts, "
            f"top-{stats.top_k}; the model has {layers} of {experts}, top-{top_k}"
        )
    return np.array(stats.counts[:layers], dtype=np.float64), stats.tokens
