"""Measured costs for the planner: read speed, decode and compute time of one expert, the dense part of a token.

The ZipMoE reference plans with fixed delay constants; zipmoe measures them on the machine that will serve, with the
engine's own device, dtype, threads and storage settings (a few seconds), and caches the result per container and
settings under ``~/.cache/zipmoe/calibration/``. On a real device the read speed is the slower of the bare reads and
what a whole miss (read, then decode) takes beyond its decode. How much of a layer's reads and decoding overlap is
measured as well, by timing layers of misses through the engine's own pipeline (`Costs.overlap_loss`).
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import Future
from dataclasses import asdict, replace
from pathlib import Path

import torch

from zipmoe.planning.planner import Costs
from zipmoe.runtime.model import expert_output
from zipmoe.runtime.pipeline import PipelineStats
from zipmoe.runtime.policies import DECODE, LFU
from zipmoe.runtime.representations import COMPRESSED, DECODED, SM, LosslessExperts
from zipmoe.runtime.tiers import Tiers
from zipmoe.store import cache_dir
from zipmoe.summary import manifest_sha256

SAMPLES = 4  # experts read, decoded and computed per measurement
ROUNDS = 3  # of decoding them (after one to warm up)
CALIBRATION_VERSION = "v2"  # part of the cache key: results of another version are measured again
OVERLAP_ROUNDS = 5  # layers of k misses timed through the pipeline


def _cache_path(engine) -> Path:
    options = engine.options
    key = "-".join(
        str(part)
        for part in (
            CALIBRATION_VERSION,
            manifest_sha256(engine.container)[:16],
            engine.device.type,
            str(engine.dtype).split(".")[-1],
            engine.threads,
            options.io,
            options.simulate_storage_gbps,
        )  # fmt: skip
    )
    return cache_dir() / "calibration" / f"{key}.json"


def calibrate(engine, *, use_cache: bool = True) -> Costs:
    """Measure what one expert costs when ``engine`` serves it (see the module docstring)."""
    path = _cache_path(engine)
    if use_cache and path.is_file():
        try:
            return Costs(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            pass  # measured again below
    costs = _measure(engine)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(costs)), encoding="utf-8")
    except OSError:
        pass  # a cache that cannot be written is not an error
    return costs


def _measure(engine) -> Costs:
    source: LosslessExperts = engine.source
    layouts = list(source.layouts.values())
    step = max(1, len(layouts) // SAMPLES)
    samples = [(layout.layer, layout.expert) for layout in layouts[::step][:SAMPLES]]
    gbps = engine.options.simulate_storage_gbps
    # reads, as the engine's storage does them (a simulated device has its speed by definition)
    started, nbytes = time.perf_counter(), 0
    for key in samples:
        layout = source.layouts[key]
        source.storage.read(layout.offset, layout.nbytes)
        nbytes += layout.nbytes
    read_rate = gbps * 1e9 if gbps else nbytes / max(time.perf_counter() - started, 1e-9)
    # decode: of records already in memory, so that only decoding is timed
    records = {}
    for key in samples:
        fetch = source.fetch(key, {}, (DECODED,), _now)
        records[key] = fetch.finish()
    times = []
    for round_ in range(ROUNDS + 1):  # the first round warms the kernels up
        weights = []
        for key in samples:
            started = time.perf_counter()
            fetch = source.fetch(key, {COMPRESSED: records[key][COMPRESSED][0]}, (DECODED,), _now)
            weights.append(fetch.finish()[DECODED][0])
            if round_:
                times.append(time.perf_counter() - started)
    decode = statistics.median(times)  # the median: a noisy moment on a shared machine moves it little
    if not gbps:
        # a real device: what a miss costs beyond its decode (a read contending with decoding, O_DIRECT's buffer
        # handling) can be more than the bare reads above, never less
        record = sum(source.layouts[key].nbytes for key in samples) / len(samples)
        times = []
        for key in samples * 2:
            started = time.perf_counter()
            source.fetch(key, {}, (DECODED,), _now).finish()
            times.append(time.perf_counter() - started)
        read_rate = min(read_rate, record / max(statistics.median(times) - decode, 1e-6))
    # compute: one token through an expert, and through the model without its routed experts
    x = torch.randn(1, engine.args.hidden_size, device=engine.device, dtype=engine.dtype)
    one = torch.zeros(1, dtype=torch.long, device=engine.device)
    weight = torch.ones(1, 1, device=engine.device, dtype=engine.dtype)
    expert_output(x, weights[0], one, one, weight)
    times = []
    for w in weights * 4:
        started = time.perf_counter()
        expert_output(x, w, one, one, weight)
        times.append(time.perf_counter() - started)
    compute = statistics.median(times)
    dense = _dense_seconds(engine)
    costs = Costs(
        read_bytes_per_second=read_rate,
        decode_seconds=decode,
        compute_seconds=compute,
        dense_seconds=dense,
        record_nbytes=source.record_nbytes,
        exponent_nbytes=source.sm_read_nbytes,
        decoded_nbytes=source.decoded_nbytes,
        sm_nbytes=source.sm_nbytes,
        compressed_nbytes=source.record_nbytes,
    )
    return replace(costs, overlap_loss=_overlap_loss(engine, costs))


def _overlap_loss(engine, costs: Costs) -> float:
    """How much of the shorter of a layer's reads and its decoding and compute the pipeline fails to hide.

    Times layers whose k experts all miss, through the engine's own pipeline with nothing held, and places the median
    between the two bounds of the cost model: ``max(io, cpu)`` (0: fully overlapped) and ``io + cpu`` (1: serial).
    """
    args, pipeline = engine.args, engine.pipeline
    k = args.top_k
    layer = args.sparse_layers.index(True)
    x = torch.randn(1, args.hidden_size, device=engine.device, dtype=engine.dtype)
    weight = torch.full((1, k), 1.0 / k, device=engine.device, dtype=engine.dtype)
    io = k * costs.read_seconds(costs.record_nbytes)
    cpu = k * (costs.decode_seconds + costs.compute_seconds)
    saved = pipeline.tiers, pipeline.stats, pipeline.phase
    pipeline.tiers = Tiers({kind: (0, (kind,)) for kind in (DECODED, COMPRESSED, SM)}, LFU())
    pipeline.stats, pipeline.phase = PipelineStats(), DECODE
    times = []
    try:
        for round_ in range(min(OVERLAP_ROUNDS, args.n_experts // k)):
            experts = torch.arange(round_ * k, (round_ + 1) * k, device=engine.device).reshape(1, k)
            started = time.perf_counter()
            pipeline.run(layer, x, experts, weight)
            times.append(time.perf_counter() - started)
    finally:
        pipeline.tiers, pipeline.stats, pipeline.phase = saved
    if not times or min(io, cpu) <= 0:
        return 1.0
    return min(1.0, max(0.0, (statistics.median(times) - max(io, cpu)) / min(io, cpu)))


class _NoExperts:
    """An expert backend that computes nothing: what is left of a forward pass is the dense part."""

    def run(self, layer, x, top_index, top_weight, top_prob=None):
        return torch.zeros_like(x)

    def on_phase(self, phase):
        pass


def _dense_seconds(engine) -> float:
    model = engine.model
    experts, model.experts = model.experts, _NoExperts()
    try:
        cache = model.new_cache(16)
        token = torch.tensor([1], device=engine.device)
        model.forward(token, 0, cache)
        times = []
        for position in range(1, 9):
            started = time.perf_counter()
            model.forward(token, position, cache)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        model.experts = experts


def _now(fn, *args) -> Future:
    """Run a decode on the calling thread (calibration times it directly)."""
    future: Future = Future()
    future.set_result(fn(*args))
    return future
