"""The cache planner: split choice on constructed cases, plan files, planned runs, cache-affinity order."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import run_cli
from zipmoe.planning.activation import fit_weights
from zipmoe.planning.planner import Costs, PlanError, layer_latency, plan_tiers, read_plan
from zipmoe.runtime.engine import Engine, EngineOptions
from zipmoe.runtime.generate import SamplingOptions
from zipmoe.runtime.pipeline import _Job, affinity_order
from zipmoe.summary import manifest_sha256

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64]
COSTS = Costs(
    read_bytes_per_second=1e9, decode_seconds=0.010, compute_seconds=0.001, dense_seconds=0.020,
    record_nbytes=10_000_000, exponent_nbytes=2_000_000, decoded_nbytes=20_000_000, sm_nbytes=8_000_000,
    compressed_nbytes=10_000_000,
)  # fmt: skip


def skewed_fit(layers=2, experts=16, k=2):
    freq = np.linspace(3, 1, experts)
    return fit_weights(np.tile(freq / freq.sum() * k, (layers, 1)), k)


def test_the_planner_is_deterministic_and_prefers_what_is_cheap():
    fit = skewed_fit()
    plans = [plan_tiers(fit, [0, 1], 2, COSTS, 200_000_000, container_sha256="s", budget_bytes=1, routing="r")
             for _ in range(2)]  # fmt: skip
    assert plans[0].to_json() == plans[1].to_json()
    # decoding is free and reading slow: compact planes hold 2.5x more experts per byte, so no decoded share
    cheap_decode = replace(COSTS, decode_seconds=0.0, compute_seconds=0.0, read_bytes_per_second=1e8)
    assert plan_tiers(fit, [0, 1], 2, cheap_decode, 200_000_000, container_sha256="s", budget_bytes=1,
                      routing="r").decoded_share == 0.0  # fmt: skip
    # decoding is very expensive and reading free: every byte decoded
    dear_decode = replace(COSTS, decode_seconds=1.0, read_bytes_per_second=1e15)
    plan = plan_tiers(fit, [0, 1], 2, dear_decode, 200_000_000, container_sha256="s", budget_bytes=1, routing="r")
    assert plan.decoded_share == 1.0 and len(plan.pinned["decoded"]) == int(10 * 0.9)
    # the pinned experts are the most used, in every layer
    assert {e for _, e in plan.pinned["decoded"]} == set(range(5))


def test_the_expected_latency_is_the_exact_average_over_splits():
    fit = skewed_fit(layers=1, experts=6, k=2)
    plan = plan_tiers(fit, [3], 2, COSTS, 40_000_000, container_sha256="s", budget_bytes=1, routing="r", steps=1)
    only_decoded = plan.candidates[1]  # two experts decoded, nothing compact
    assert only_decoded.n_decoded == 2 and only_decoded.n_compact == 0
    # brute force over all 2-subsets of 6 experts, with the fitted weights
    import itertools

    w = np.exp(fit.log_w[0])
    subsets = list(itertools.combinations(range(6), 2))
    p = np.array([w[a] * w[b] for a, b in subsets])
    p /= p.sum()
    order = np.argsort(-fit.targets[0], kind="stable")
    decoded = set(order[:2].tolist())
    expected = COSTS.dense_seconds + sum(
        pi * layer_latency(COSTS, len(decoded & set(s)), 0, 2 - len(decoded & set(s)), "sm")
        for pi, s in zip(p, subsets)
    )
    assert only_decoded.tpot_seconds == pytest.approx(expected, rel=1e-12)


def test_one_share_over_all_layers_beats_equal_per_layer_splits():
    # a layer with two hot experts beside a flat one: the global ranking gives the hot layer the decoded bytes
    hot, flat = np.array([40.0, 30.0] + [1.0] * 14), np.ones(16)
    fit = fit_weights(np.stack([hot / hot.sum() * 2, flat / flat.sum() * 2]), 2)
    plan = plan_tiers(fit, [0, 1], 2, COSTS, 40_000_000, container_sha256="s", budget_bytes=1, routing="r")
    assert plan.pinned["decoded"] == [(0, 0)]  # 90% of two decoded experts, both in the hot layer
    assert plan.predicted_tpot_seconds < plan.extra["per_layer_tpot_seconds"]
    assert plan.to_json()["per_layer_tpot_seconds"] == plan.extra["per_layer_tpot_seconds"]


def test_the_measured_overlap_moves_a_layer_between_max_and_sum():
    io, cpu = 3 * COSTS.read_seconds(COSTS.record_nbytes), 3 * COSTS.decode_seconds + 3 * COSTS.compute_seconds
    for loss, expected in ((0.0, max(io, cpu)), (1.0, io + cpu), (0.25, max(io, cpu) + 0.25 * min(io, cpu))):
        assert layer_latency(replace(COSTS, overlap_loss=loss), 0, 0, 3, "sm") == pytest.approx(expected)


def test_calibration_measures_on_the_engine_and_leaves_it_as_it_was(tiny_packed):
    from zipmoe.planning.calibration import calibrate

    with Engine(tiny_packed, EngineOptions(device="cpu", dtype="float32", simulate_storage_gbps=1.0)) as e:
        tiers, stats = e.pipeline.tiers, e.pipeline.stats
        costs = calibrate(e, use_cache=False)
        assert e.pipeline.tiers is tiers and e.pipeline.stats is stats and stats.total_requests == 0
        assert tiers.used == 0
    assert 0.0 <= costs.overlap_loss <= 1.0
    assert costs.read_bytes_per_second == 1e9  # a simulated device has its speed by definition
    assert costs.decode_seconds > 0 and costs.compute_seconds > 0 and costs.dense_seconds > 0


def test_affinity_order_interleaves_reads_and_decodes_by_tokens():
    def job(expert, tokens, held=()):
        return _Job(expert, torch.arange(tokens), torch.zeros(tokens), None, ("decoded",), dict.fromkeys(held, 1))

    jobs = [job(0, 1), job(1, 5, ["sm"]), job(2, 3), job(3, 2, ["compressed"]), job(4, 4, ["sm"]), job(5, 3)]
    assert [j.expert for j in affinity_order(jobs, 1.0)] == [2, 1, 5, 4, 0, 3]
    assert [j.expert for j in affinity_order(jobs, 2.4)] == [2, 1, 4, 5, 3, 0]


@pytest.fixture(scope="module")
def tiny_packed(checkpoints):
    return checkpoints.packed(checkpoints.demo("tiny"))


def test_a_planned_run_gives_the_tokens_of_an_unplanned_one(tiny_packed, tmp_path, capsys):
    sampling = SamplingOptions(max_new_tokens=8, stop_at_eos=False)
    with Engine(tiny_packed, EngineOptions(device="cpu", dtype="float32")) as e:
        expected = e.generate_tokens(PROMPT, sampling).tokens
        budget = e.reservation + 4 * e.source.decoded_nbytes
    plan_path = tmp_path / "plan.json"
    code, out, err = run_cli(capsys, "plan", str(tiny_packed), "-m", f"{budget}B", "-o", str(plan_path), "--device",
                             "cpu", "--dtype", "float32", "--simulate-storage", "1", "--json", "--plot",
                             str(tmp_path / "plan.png"))  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["container_sha256"] and len(doc["candidates"]) == 21 and plan_path.is_file()
    assert (tmp_path / "plan.png").stat().st_size > 1000
    for schedule in ("affinity", "fifo"):
        options = EngineOptions(device="cpu", dtype="float32", plan=str(plan_path), schedule=schedule)
        with Engine(tiny_packed, options) as planned:
            assert planned.generate_tokens(PROMPT, sampling).tokens == expected
            pinned = planned.plan.pinned["decoded"]
            assert all(planned.tiers.holds("decoded", key) for key in pinned)  # prefetched, never evicted
            assert planned.pipeline.stats.prefetched_bytes > 0 or not pinned
    with Engine(tiny_packed, EngineOptions(device="cpu", dtype="float32", memory_budget=budget, plan="auto")) as auto:
        assert auto.generate_tokens(PROMPT, sampling).tokens == expected


def test_a_plan_for_another_container_is_refused(tiny_packed, checkpoints, tmp_path, capsys):
    other = checkpoints.packed(checkpoints.family("qwen2_moe"))
    plan_path = tmp_path / "plan.json"
    code, _, err = run_cli(capsys, "plan", str(other), "-m", "100%", "-o", str(plan_path), "--device", "cpu")
    assert code == 0, err
    code, _, err = run_cli(capsys, "run", str(tiny_packed), "Hello", "--plan", str(plan_path), "--device", "cpu")
    assert code == 1 and "made for the container with manifest SHA-256" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(PlanError, match="planned for a budget of"):
        Engine(other, EngineOptions(device="cpu", plan=str(plan_path), memory_budget=12345))
    bad = tmp_path / "bad.json"
    for text, message in [("{", "JSON"), ('{"format": "x"}', "not a zipmoe plan"), ("[]", "not a zipmoe plan")]:
        bad.write_text(text)
        with pytest.raises(PlanError, match=message):
            read_plan(bad, "0" * 64)
    doc = json.loads(plan_path.read_text())
    doc["pinned"]["decoded"] = [[0, -1]]
    bad.write_text(json.dumps(doc))
    with Engine(other, EngineOptions(device="cpu")) as e:
        with pytest.raises(PlanError, match="pairs"):
            read_plan(bad, manifest_sha256(e.container))


def test_pack_stores_routing_statistics_and_auto_plans_use_them(checkpoints, tmp_path, capsys):
    source = checkpoints.demo("tiny")
    trace_path = tmp_path / "trace.jsonl"
    packed = checkpoints.packed(source)
    code, _, err = run_cli(capsys, "run", str(packed), "Hello there", "-n", "6", "--device", "cpu",
                           "--record-routing", str(trace_path))  # fmt: skip
    assert code == 0, err
    out = tmp_path / "with-routing.zmoe"
    code, _, err = run_cli(capsys, "pack", str(source), "-o", str(out), "--routing", str(trace_path), "--quiet")
    assert code == 0, err
    from zipmoe.formats.reader import Container
    from zipmoe.planning.build import plan_engine
    from zipmoe.runtime.routing import RoutingTrace

    trace = RoutingTrace.read(trace_path)
    with Container(out) as c:
        stats = c.manifest.routing
        assert stats.tokens == trace.num_tokens and sum(map(sum, stats.counts)) == trace.num_tokens * 2 * 2
    with Engine(out, EngineOptions(device="cpu", dtype="float32", memory_budget="80%")) as e:
        assert plan_engine(e).routing == "embedded"
    code, _, err = run_cli(capsys, "verify", str(out))
    assert code == 0, err


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(routing={"num_experts": 4}), "missing field 'top_k'"),
        (lambda d: d.update(routing={"num_experts": 4, "top_k": 2, "num_layers": 1, "tokens": 3, "counts": [[1, 2]]}),
         "expected 1 rows of 4 counts"),
        (lambda d: d.update(routing={"num_experts": 4, "top_k": 2, "num_layers": 1, "tokens": 3,
                                     "counts": [[1, 2, 9, 0]]}), "counts from 0 to 3"),
        (lambda d: d.update(routing={"num_experts": 4, "top_k": 9, "num_layers": 1, "tokens": 3,
                                     "counts": [[1, 2, 0, 0]]}), "out of range"),
    ],
)  # fmt: skip
def test_malformed_routing_statistics_are_refused(checkpoints, tmp_path, mutate, message):
    from conftest import rewrite_manifest
    from zipmoe.errors import FormatError
    from zipmoe.formats.reader import Container

    path = tmp_path / "c.zmoe"
    path.write_bytes(checkpoints.packed(checkpoints.demo("tiny")).read_bytes())
    rewrite_manifest(path, mutate)
    with pytest.raises(FormatError, match=message):
        Container(path)
