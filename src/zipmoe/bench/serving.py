"""`zipmoe bench run`: serving speed under a memory budget, against the baselines, each in a fresh process.

Every configuration generates from the same prompt ids (greedy, EOS ignored) on the same checkpoint, with the same
routing: by default a synthetic trace calibrated to a real router (``synthetic:qwen``, `zipmoe.runtime.routing`)
replaces the random-init router's choices, so every layer computes exactly the experts the trace names (the tokens
are then not the model's own, but the same in every row, and equal to the full model's under the same trace).
Configurations:

* ``full``: every weight in memory, no cache (the upper bound);
* ``uncompressed``: the same runtime on a container packed with ``--coder none``, in its best configuration: every
  candidate (`BASELINE_CANDIDATES`: decoded LRU or LFU, a tier of raw BF16 records, a mix) runs, and the fastest
  TPOT is labelled ``uncompressed`` (the others are kept as ``uncompressed candidate`` rows);
* ``zipmoe``: the lossless container with the runtime's default tiers and policy (`EngineOptions`), and any
  ``--sweep`` configuration as ``zipmoe TIERS POLICY``;
* ``zipmoe-planned`` (``--plan auto``): the lossless container with a plan (`zipmoe.planning`) fitted on the first
  half of the trace's requests and this machine's measured costs, measured on the second half, with cache-affinity
  issue order, and again with FIFO order (``zipmoe-planned, fifo``); the plan's predicted TPOT is in the JSON;
* ``zipmoe, router``: the model's own router, the correctness row (the same tokens as ``full, router``);
* ``zipmoe, all hits``: a budget that holds every expert decoded, timed on a second generation;
* ``accelerate``: transformers with accelerate's disk offload of half of the routed experts (whole layers, the
  granularity accelerate offloads at) and everything else in memory, reading from the page cache.

Budgets are percentages of the checkpoint's BF16 expert bytes and cover the expert tiers and the fetches in flight
(decoded experts are float32 on a CPU, twice their BF16 size; BF16 on a GPU). Storage is simulated at a bandwidth
(``--storage 1.25``: reads through the page cache, then a wait as if a device of that speed served them) or real
(``direct``: O_DIRECT reads from the disk, bypassing the page cache). Each configuration runs in its own process, so
its peak resident memory above what it had after loading the dense weights measures the cache's real footprint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zipmoe.errors import ZipmoeError

DIRECT = "direct"
ROUTER = "router"
PLANNED = "zipmoe-planned"
TRACE_REQUESTS = 8  # requests of a synthetic trace: plans fit on the first half, every row replays the next one
# (tiers, policy) the uncompressed baseline tries at every budget and storage; the fastest is reported
BASELINE_CANDIDATES = (
    ("decoded=1", "lru"),
    ("decoded=1", "lfu"),
    ("compressed=1", "lfu"),
    ("decoded=0.5,compressed=0.5", "lfu"),
)


@dataclass
class ServingRow:
    """One configuration's measurements."""

    method: str
    budget_percent: float | None
    storage: float | str | None  # simulated GB/s, "direct", or None (the page cache at full speed)
    result: dict[str, Any] = field(default_factory=dict)
    config: str = ""  # tiers and policy, for runtime rows

    @property
    def storage_gbps(self) -> float | None:
        return self.storage if isinstance(self.storage, float) else None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "budget_percent": self.budget_percent,
            "storage_gbps": self.storage_gbps,
            "io": "direct" if self.storage == DIRECT else "buffered",
            "config": self.config,
            **self.result,
        }


def _current_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _trace(config: dict[str, Any], args: Any) -> Any:
    """The routing trace of a configuration (None: the model's own router), fitted to the model."""
    if config["routing"] == ROUTER:
        return None
    from zipmoe.runtime.routing import parse_routing

    trace = parse_routing(
        config["routing"], num_layers=sum(args.sparse_layers), num_experts=args.n_experts, top_k=args.top_k,
        requests=TRACE_REQUESTS, tokens_per_request=len(config["prompt"]) + config["new_tokens"], seed=0,
    )  # fmt: skip
    return trace.for_model(sum(args.sparse_layers), args.n_experts, args.top_k)


def use_fitted_plan(engine: Any, trace: Any, *, schedule: str, decoded_share: float | None = None) -> Any:
    """Serve ``engine`` with a plan fitted on the first half of ``trace``'s requests (None: the synthetic default);
    returns the plan."""
    from zipmoe.planning.build import plan_engine

    fitted = None if trace is None else slice(0, max(1, len(trace.requests) // 2))
    plan = plan_engine(engine, trace, requests=fitted, decoded_share=decoded_share)
    engine.pipeline.schedule = schedule
    engine.use_plan(plan.loaded())
    return plan


def measured_request(trace: Any) -> int:
    """The request every configuration replays: the first of the second half (a plan is fitted on the first half;
    a trace of one request is both fitted on and measured)."""
    return len(trace.requests) // 2


def _child(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration (in this process) and return its measurements."""
    import torch

    from zipmoe._memory import peak_rss_bytes
    from zipmoe.runtime.generate import SamplingOptions, generate

    prompt = config["prompt"]
    sampling = SamplingOptions(max_new_tokens=config["new_tokens"], stop_at_eos=False)
    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    method = config["method"]
    out: dict[str, Any] = {}
    if method == "accelerate":
        return _accelerate(config, prompt, sampling)
    if method.startswith("full"):
        from zipmoe.runtime.model import InMemoryExperts, Transformer
        from zipmoe.runtime.routing import RoutingReplay
        from zipmoe.runtime.weights import load_checkpoint

        args, dense, experts = load_checkpoint(config["checkpoint"], device, dtype)
        model = Transformer(args, dense, InMemoryExperts(experts))
        trace = _trace(config, args)
        loaded = _current_rss()
        generate(model, prompt[:4], SamplingOptions(max_new_tokens=2))  # warm-up (GPU kernels, allocator)
        if trace is not None:
            model.replay = RoutingReplay(trace, measured_request(trace))
        result = generate(model, prompt, sampling)
    else:
        from zipmoe.codecs.parts import warm_up
        from zipmoe.runtime.engine import DEFAULT_POLICY, Engine, EngineOptions

        warm_up()
        storage = config["storage"]
        options = EngineOptions(
            device=device.type,
            dtype=str(dtype).removeprefix("torch."),
            memory_budget=config["budget"],
            tiers=config.get("tiers"),
            policy=config.get("policy") or DEFAULT_POLICY,
            threads=config["threads"],
            io=DIRECT if storage == DIRECT else "buffered",
            simulate_storage_gbps=storage if isinstance(storage, float) else None,
        )
        engine = Engine(config["container"], options)
        trace = _trace(config, engine.args)
        if trace is not None:
            engine.replay_routing(trace, measured_request(trace))
        loaded = _current_rss()  # before a plan prefetches its pinned experts: they count against the budget
        if method.startswith(PLANNED):
            schedule = config.get("schedule") or "affinity"
            plan = use_fitted_plan(engine, trace, schedule=schedule, decoded_share=config.get("decoded_share"))
            out["predicted_tpot_seconds"] = plan.predicted_tpot_seconds
            out["plan"] = {"decoded_share": plan.decoded_share, "compact": plan.compact,
                           "pinned": {kind: len(keys) for kind, keys in plan.pinned.items()}}  # fmt: skip
        if config.get("warm"):
            engine.generate_tokens(prompt, sampling)
            engine.pipeline.stats.__init__()  # count the timed generation only
        result = engine.generate_tokens(prompt, sampling)
        out["cache"] = engine.pipeline.stats.to_json()
        out["budget_bytes"] = engine.budget
        out["dense_bytes"] = engine.dense_bytes
        out["io"] = engine.storage.io
        out["storage_warning"] = engine.storage.warning
        engine.close()
    out.update(
        tokens=result.tokens,
        ttft_seconds=result.ttft,
        tpot_seconds=result.tpot,
        tokens_per_second=result.tokens_per_second,
        rss_after_load=loaded,
        peak_rss=peak_rss_bytes(),
    )
    if "cache" in out:
        out["bytes_read"] = out["cache"]["bytes_read"]
    return out


def _accelerate(config: dict[str, Any], prompt: list[int], sampling: Any) -> dict[str, Any]:
    import torch
    import transformers

    from zipmoe._memory import peak_rss_bytes

    with tempfile.TemporaryDirectory(prefix="zipmoe-offload-") as folder:
        gpu = config["device"] == "cuda"
        model = transformers.AutoModelForCausalLM.from_pretrained(
            config["checkpoint"],
            dtype=torch.bfloat16 if gpu else torch.float32,
            device_map=_offload_map(config["checkpoint"], 0 if gpu else "cpu", config["offload_fraction"]),
            offload_folder=folder,
        ).eval()
        loaded = _current_rss()
        ids = torch.tensor([prompt], device="cuda" if gpu else "cpu")
        with torch.no_grad():
            model(ids[:, :4], use_cache=True)  # warm-up
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            cache = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            ttft = time.perf_counter() - start
            tokens, steps = [token], []
            for _ in range(sampling.max_new_tokens - 1):
                start = time.perf_counter()
                out = model(torch.tensor([[token]], device=ids.device), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = int(out.logits[0, -1].argmax())
                steps.append(time.perf_counter() - start)
                tokens.append(token)
    return {
        "tokens": tokens,
        "ttft_seconds": ttft,
        "tpot_seconds": sum(steps) / len(steps),
        "tokens_per_second": len(steps) / sum(steps),
        "rss_after_load": loaded,
        "peak_rss": peak_rss_bytes(),
        "device_map": sorted(set(model.hf_device_map.values())),
    }


def _offload_map(checkpoint: str, device: int | str, fraction: float) -> dict[str, int | str]:
    """An accelerate device map that keeps everything on ``device`` but the routed experts of the last ``fraction``
    of the MoE layers, which go to disk (accelerate offloads whole modules: one layer's experts at a time)."""
    import re

    import accelerate
    import transformers

    from zipmoe.formats.checkpoint import open_checkpoint
    from zipmoe.runtime.config import ModelArgs

    config = open_checkpoint(checkpoint).config
    args = ModelArgs.from_hf_config(config)
    on_disk = set(range(args.n_layers - round(args.n_layers * fraction), args.n_layers))
    with accelerate.init_empty_weights():  # the modules as transformers names them (they differ from the files')
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))
    device_map: dict[str, int | str] = {}
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        if m := re.match(r"model\.layers\.(\d+)\.(?:.+\.)?experts(?=\.)", name):  # a layer's routed experts: one module
            device_map[m[0]] = "disk" if int(m[1]) in on_disk else device
        else:
            device_map[name.rsplit(".", 1)[0]] = device
    return device_map


def _run_child(config: dict[str, Any]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "zipmoe.bench.serving", json.dumps(config)], capture_output=True, text=True
    )
    if result.returncode != 0:
        lines = (result.stderr or "").strip().splitlines()
        raise ZipmoeError(
            f"benchmark configuration {config['method']} failed: {lines[-1] if lines else result.returncode}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_serving_bench(
    checkpoint: Path,
    container: Path,
    uncompressed: Path,
    *,
    budgets: tuple[float, ...] = (25, 50, 100),
    storages: tuple[float | str, ...] = (1.25, DIRECT),
    routing: str = "synthetic:qwen",
    sweep: tuple[tuple[str, str], ...] = (),
    plan: bool = False,
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    accelerate_tokens: int = 4,
    threads: int = 2,
    device: str = "cpu",
    vocab: int = 256,
    on_row: Any = None,
) -> list[ServingRow]:
    """Run every configuration (see the module docstring); returns one row each, the ``full`` rows first.

    ``sweep``: extra zipmoe configurations ``(tiers, policy)`` at every budget and storage. ``plan``: add the
    ``zipmoe-planned`` rows (a plan fitted on the trace's first half; cache-affinity and FIFO issue order).
    """
    prompt = np.random.default_rng(0).integers(0, vocab, prompt_tokens).tolist()
    base = {"prompt": prompt, "new_tokens": new_tokens, "threads": threads, "device": device, "routing": routing}
    note = on_row or (lambda s: None)
    rows = []

    def run(method: str, budget: float | None, storage: float | str | None, **extra: Any) -> ServingRow:
        config_label = " ".join(filter(None, (extra.get("tiers"), extra.get("policy"))))
        where = "page cache" if storage is None else storage if storage == DIRECT else f"{storage:g} GB/s"
        note(f"{method} {config_label}, budget {'everything' if budget is None else f'{budget:g}%'}, {where}")
        config = {**base, "method": method, "storage": storage, "checkpoint": str(checkpoint)}
        config.update(budget=None if budget is None else f"{budget}%", **extra)
        row = ServingRow(method, budget, storage, _run_child(config), config_label)
        rows.append(row)
        return row

    full = run("full", None, None)
    full_router = run("full, router", None, None, routing=ROUTER) if routing != ROUTER else full
    for storage in storages:
        for budget in budgets:
            candidates = [
                run("uncompressed candidate", budget, storage, container=str(uncompressed), tiers=tiers, policy=policy)
                for tiers, policy in BASELINE_CANDIDATES
            ]
            best = min(candidates, key=lambda r: r.result["tpot_seconds"])
            rows.append(ServingRow("uncompressed", budget, storage, dict(best.result), best.config))
            run("zipmoe", budget, storage, container=str(container))
            if plan:
                run(PLANNED, budget, storage, container=str(container), schedule="affinity")
                run(f"{PLANNED}, fifo", budget, storage, container=str(container), schedule="fifo")
            for tiers, policy in sweep:
                run(f"zipmoe {tiers} {policy}", budget, storage, container=str(container), tiers=tiers, policy=policy)
    run("zipmoe, router", min(budgets), storages[0], container=str(container), routing=ROUTER)
    run("zipmoe, all hits", None, None, container=str(container), warm=True, tiers="decoded=1")
    accelerate = {**base, "method": "accelerate", "checkpoint": str(checkpoint), "new_tokens": accelerate_tokens}
    accelerate["offload_fraction"] = 0.5
    note("accelerate disk offload (the model's own router)")
    try:
        rows.append(ServingRow("accelerate", 50, None, _run_child(accelerate)))
    except ZipmoeError as exc:
        rows.append(ServingRow("accelerate", 50, None, {"error": str(exc)}))
    for row in rows:  # every configuration must generate the reference tokens of its routing (accelerate: first ones)
        tokens = row.result.get("tokens")
        reference = full_router if row.method in ("accelerate", "zipmoe, router", "full, router") else full
        if tokens is not None:
            row.result["tokens_match_full"] = tokens == reference.result["tokens"][: len(tokens)]
    return rows


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
