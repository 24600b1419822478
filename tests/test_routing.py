"""Routing traces: the synthetic generator against the real routers' statistics, the trace file format (round trip
and hostile files), fitting a trace to a model, recording and replaying."""

import json
import math
import os
import time

import numpy as np
import pytest

from zipmoe.errors import OutputError
from zipmoe.runtime import routing
from zipmoe.runtime.routing import (
    REFERENCE_STATISTICS,
    REFERENCE_ZIPF_RANGE,
    RoutingError,
    RoutingRecorder,
    RoutingReplay,
    RoutingTrace,
    parse_routing,
    routing_statistics,
    synthetic_trace,
)


def small_trace(requests=3, tokens=5, layers=3, experts=8, k=2, seed=1):
    return synthetic_trace(
        "qwen",
        num_layers=layers,
        num_experts=experts,
        top_k=k,
        requests=requests,
        tokens_per_request=tokens,
        seed=seed,
    )


# --- the generator against the table -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen", "deepseek"])
def test_generator_reproduces_every_row_of_the_reference_table(name):
    trace = synthetic_trace(name, num_layers=24, requests=250, tokens_per_request=19, seed=0)
    stats = routing_statistics(trace, prompt_tokens=19)
    off = {key: stats[key] / want - 1 for key, want in REFERENCE_STATISTICS[name].items()}
    assert all(abs(x) <= 0.10 for x in off.values()), {k: f"{stats[k]:.3f} ({v:+.1%})" for k, v in off.items()}
    # the range of the fitted exponent across layers: the extremes of 24 noisy fits, a looser target
    low, high = REFERENCE_ZIPF_RANGE[name]
    assert stats["zipf_exponent_min"] == pytest.approx(low, rel=0.2)
    assert stats["zipf_exponent_max"] == pytest.approx(high, rel=0.2)


def test_generator_is_fast_and_deterministic():
    start = time.perf_counter()
    a = synthetic_trace("deepseek", num_layers=24, requests=8, tokens_per_request=64, seed=7)
    assert time.perf_counter() - start < 1.0
    b = synthetic_trace("deepseek", num_layers=24, requests=8, tokens_per_request=64, seed=7)
    c = synthetic_trace("deepseek", num_layers=24, requests=8, tokens_per_request=64, seed=8)
    assert a == b and a != c
    assert (a.num_experts, a.top_k, a.num_layers, len(a.requests)) == (64, 6, 24, 8)
    assert all(r.shape == (64, 24, 6) and r.dtype == np.int16 and not r.flags.writeable for r in a.requests)
    assert RoutingTrace(64, 6, 24, a.requests) == a  # distinct, in range: passes the constructor's checks


@pytest.mark.parametrize("experts, k", [(8, 2), (128, 8), (5, 5), (60, 1)])
def test_generator_for_other_model_shapes(experts, k):
    trace = parse_routing(
        "synthetic:deepseek", num_layers=2, num_experts=experts, top_k=k, requests=3, tokens_per_request=4
    )
    assert (trace.num_experts, trace.top_k, trace.num_layers) == (experts, k, 2)
    RoutingTrace(experts, k, 2, trace.requests)  # valid


def test_statistics_of_a_hand_made_trace():
    # E=4, k=1, one layer; requests route to [0, 0, 1] and [1, 2]
    trace = RoutingTrace(4, 1, 1, (np.array([[[0]], [[0]], [[1]]]), np.array([[[1]], [[2]]])))
    stats = routing_statistics(trace)
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    ranks, counts = np.log([1, 2, 3]), np.log([2, 2, 1])
    assert stats == pytest.approx(
        {
            "distinct_experts_per_prompt": 2.0,
            "max_expert_count_per_prompt": 1.5,
            "prompt_entropy_bits": (h3 + 1.0) / 2,
            "global_entropy_bits": -(2 * 0.4 * math.log2(0.4) + 0.2 * math.log2(0.2)),
            "zipf_exponent_median": -np.polyfit(ranks, counts, 1)[0],
            "zipf_exponent_min": -np.polyfit(ranks, counts, 1)[0],
            "zipf_exponent_max": -np.polyfit(ranks, counts, 1)[0],
            "top10_share": 0.4,
            "top25_share": 0.4,
            "top50_share": 0.8,
            "consecutive_prompt_jaccard": 1 / 3,
        }
    )
    # a prompt is the first prompt_tokens tokens: [0, 0] and [1, 2]
    assert routing_statistics(trace, prompt_tokens=2)["max_expert_count_per_prompt"] == 1.5
    assert routing_statistics(trace, prompt_tokens=1)["consecutive_prompt_jaccard"] == 0.0
    single = RoutingTrace(4, 1, 1, (np.array([[[3]]]),))
    assert math.isnan(routing_statistics(single)["consecutive_prompt_jaccard"])
    assert math.isnan(routing_statistics(single)["zipf_exponent_median"])
    with pytest.raises(RoutingError, match="prompt_tokens"):
        routing_statistics(trace, prompt_tokens=0)


def test_statistics_chunk_boundaries_do_not_change_results(monkeypatch):
    trace = small_trace(requests=7, tokens=4)
    whole = routing_statistics(trace)
    monkeypatch.setattr(routing, "_stat_chunk", lambda layers, experts: 2)
    assert routing_statistics(trace) == pytest.approx(whole)


# --- files ---------------------------------------------------------------------------------------------------------


def test_write_read_round_trip_is_canonical(tmp_path):
    trace = small_trace()
    path = tmp_path / "t.jsonl"
    trace.write(path)
    assert not os.path.exists(str(path) + ".partial")
    lines = path.read_bytes().split(b"\n")
    assert lines[0] == b'{"format":"zipmoe-routing","version":1,"num_experts":8,"top_k":2,"num_layers":3}'
    assert lines[1] == b'{"tokens":' + json.dumps(trace.requests[0].tolist()).replace(" ", "").encode() + b"}"
    assert lines[-1] == b"" and len(lines) == 5
    back = RoutingTrace.read(path)
    assert back == trace
    back.write(tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()


def test_write_failure_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="cannot write routing trace"):
        small_trace().write(tmp_path / "missing" / "t.jsonl")


def test_reader_accepts_spaced_json_and_blank_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{ "num_layers": 1, "top_k": 2, "num_experts": 3, "version": 1, "format": "zipmoe-routing" }\n'
        "\n"
        '{"tokens": [[[2, 0]], [[1, 2]]]}\n'
        "\n"
    )
    assert RoutingTrace.read(path) == RoutingTrace(3, 2, 1, (np.array([[[2, 0]], [[1, 2]]]),))


HEADER = '{"format":"zipmoe-routing","version":1,"num_experts":8,"top_k":2,"num_layers":2}'
GOOD = '{"tokens":[[[0,1],[2,3]]]}'


def header(**changes):
    value = json.loads(HEADER)
    value.update(changes)
    return json.dumps({k: v for k, v in value.items() if v is not None})


@pytest.mark.parametrize(
    "text, line, expected",
    [
        ("", None, "empty file"),
        ("\n\n", None, "empty file"),
        ("not json\n", 1, "not UTF-8 JSON"),
        (b"\xff\xfe\n", 1, "not UTF-8"),
        ("[" * 100 + "]" * 100 + "\n", 1, "nested deeper"),
        ("[1, 2]\n" + GOOD, 1, "header object"),
        (header(format="zipmoe") + "\n" + GOOD, 1, "not a routing trace"),
        (header(version=2) + "\n" + GOOD, 1, "version 2"),
        (header(version=True) + "\n" + GOOD, 1, "version True"),
        (header(top_k=None) + "\n" + GOOD, 1, "lacks top_k"),
        (header(model="x") + "\n" + GOOD, 1, "unexpected header keys 'model'"),
        (header(num_experts=4097) + "\n" + GOOD, 1, "num_experts 4097 is out of range"),
        (header(top_k=65, num_experts=100) + "\n" + GOOD, 1, "top_k 65 is out of range"),
        (header(num_layers=1025) + "\n" + GOOD, 1, "num_layers 1025 is out of range"),
        (header(num_layers=0) + "\n" + GOOD, 1, "num_layers 0 is out of range"),
        (header(top_k=9) + "\n" + GOOD, 1, "top_k 9 is larger than num_experts 8"),
        (header(num_experts="8") + "\n" + GOOD, 1, "must be an integer"),
        (header(num_experts=8.0) + "\n" + GOOD, 1, "must be an integer"),
        (HEADER + "\n", 1, "no requests"),
        (HEADER + "\n" + GOOD + "\n[]\n", 3, "expected a request"),
        (HEADER + '\n{"tokens":[]}\n', 2, "empty request"),
        (HEADER + '\n{"tokens":{}}\n', 2, "tokens must be a list"),
        (HEADER + '\n{"tokens":[[[0,1],[2,3]]],"prompt":"x"}\n', 2, "unexpected request keys 'prompt'"),
        (HEADER + '\n{"tokens":[[[0,1],[2,3]],[[0,1]]]}\n', 2, "token 1 has 1 layers, expected 2"),
        (HEADER + '\n{"tokens":[[[0,1],[2,3],[4,5]]]}\n', 2, "token 0 has 3 layers, expected 2"),
        (HEADER + '\n{"tokens":[[[0,1],[2,3,4]]]}\n', 2, "token 0 layer 1 has 3 experts, expected 2"),
        (HEADER + '\n{"tokens":[[[0],[2]]]}\n', 2, "token 0 layer 0 has 1 experts, expected 2"),
        (HEADER + '\n{"tokens":[[[0,1],[2,8]]]}\n', 2, "token 0 layer 1: expert id 8 is out of range 0..7"),
        (HEADER + '\n{"tokens":[[[0,-1],[2,3]]]}\n', 2, "expert id -1 is out of range"),
        (HEADER + '\n{"tokens":[[[0,1],[2,3]],[[0,1],[9' + "9" * 40 + ",3]]]}\n", 2, "token 1 layer 1: expert id"),
        (HEADER + '\n{"tokens":[[[0,1],[3,3]]]}\n', 2, "token 0 layer 1: expert 3 is listed twice"),
        (HEADER + '\n{"tokens":[[[0,1],[2,true]]]}\n', 2, "expert id True is not an integer"),
        (HEADER + '\n{"tokens":[[[0,1],[2,3.0]]]}\n', 2, "expert id 3.0 is not an integer"),
        (HEADER + '\n{"tokens":[[[0,1],[2,null]]]}\n', 2, "expert id None is not an integer"),
        (HEADER + '\n{"tokens":[[[0,1],"ab"]]}\n', 2, "token 0 layer 1 is not a list"),
        (HEADER + '\n{"tokens":[7]}\n', 2, "token 0 is not a list of layers"),
        (HEADER + '\n{"tokens":[[[0,1],[2,[3]]]]}\n', 2, "expert id [3] is not an integer"),
        (HEADER + "\n" + GOOD + '\n{"tokens":[[[0,1],[2,3]]\n', 3, "not UTF-8 JSON"),
    ],
)
def test_hostile_trace_files(tmp_path, text, line, expected):
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RoutingError) as info:
        RoutingTrace.read(path)
    message = str(info.value)
    assert "\n" not in message and expected in message
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: ")


def test_hostile_sizes(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    path.write_text(HEADER + "\n" + GOOD + "\n" + '{"tokens":[' + ",".join(["[[0,1],[2,3]]"] * 8) + "]}\n")
    monkeypatch.setattr(routing, "MAX_TOKENS", 8)
    with pytest.raises(RoutingError, match=r":3: too many tokens \(more than 8 in the file\)"):
        RoutingTrace.read(path)
    monkeypatch.setattr(routing, "MAX_TOKENS", 9)
    assert RoutingTrace.read(path).num_tokens == 9
    monkeypatch.setattr(routing, "MAX_LINE_BYTES", 100)
    with pytest.raises(RoutingError, match=r":3: line longer than 100 bytes$"):
        RoutingTrace.read(path)
    with pytest.raises(RoutingError, match="cannot read routing trace .*missing"):
        RoutingTrace.read(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "requests, expected",
    [
        ((), "no requests"),
        ([np.zeros((0, 2, 2), dtype=np.int16)], "request 0: empty request"),
        ([np.zeros((1, 2, 2), dtype=np.float32)], "must be integers"),
        ([np.array([[[0, 1], [2, 3]]]), np.array([[[0, 1]]])], r"request 1: request has shape \(1, 1, 2\)"),
        ([np.array([[[0, 1], [5, 5]]])], "request 0: token 0 layer 1: expert 5 is listed twice"),
        ([np.array([[[0, 1], [2, 8]]])], "expert id 8 is out of range 0..7"),
        (np.zeros((1, 1, 2, 2), dtype=np.int16), "sequence of"),
    ],
)
def test_trace_constructor_checks(requests, expected):
    with pytest.raises(RoutingError, match=expected):
        RoutingTrace(8, 2, 2, requests)


def test_trace_arrays_are_copied_and_read_only():
    mine = np.array([[[0, 1], [2, 3]]], dtype=np.int16)
    trace = RoutingTrace(8, 2, 2, [mine])
    mine[0, 0, 0] = 7
    assert trace.requests[0][0, 0, 0] == 0 and not trace.requests[0].flags.writeable
    assert isinstance(trace.requests, tuple)


# --- fitting to a model, parse_routing -----------------------------------------------------------------------------


def test_for_model_rules():
    trace = small_trace(layers=4)
    assert trace.for_model(4, 8, 2) is trace
    first = trace.for_model(2, 8, 2)
    assert first.num_layers == 2
    assert all(np.array_equal(a, b[:, :2]) for a, b in zip(first.requests, trace.requests))
    with pytest.raises(RoutingError, match="4 sparse layers, the model 6"):
        trace.for_model(6, 8, 2)
    with pytest.raises(RoutingError, match="8 experts per layer, the model 16"):
        trace.for_model(4, 16, 2)
    with pytest.raises(RoutingError, match="top-2 experts, the model top-3"):
        trace.for_model(4, 8, 3)


def test_parse_routing(tmp_path):
    common = {"num_layers": 3, "num_experts": 60, "top_k": 4, "requests": 2, "tokens_per_request": 6}
    qwen = parse_routing("synthetic:qwen", **common, seed=3)
    assert qwen == synthetic_trace("qwen", num_layers=3, requests=2, tokens_per_request=6, seed=3)
    path = tmp_path / "trace.jsonl"
    synthetic_trace("qwen", num_layers=5, requests=2, tokens_per_request=6).write(path)
    from_file = parse_routing(str(path), **common)
    assert from_file.num_layers == 3 and len(from_file.requests) == 2
    with pytest.raises(RoutingError, match="choices: synthetic:deepseek, synthetic:qwen") as info:
        parse_routing("synthetic:mixtral", **common)
    assert "\n" not in str(info.value)
    with pytest.raises(RoutingError, match="cannot read routing trace"):
        parse_routing(str(tmp_path / "nope.jsonl"), **common)
    with pytest.raises(RoutingError, match="top_k 70 is out of range"):
        parse_routing("synthetic:qwen", **{**common, "top_k": 70})
    with pytest.raises(RoutingError, match="requests must be an integer >= 1"):
        parse_routing("synthetic:qwen", **{**common, "requests": 0})
    with pytest.raises(RoutingError, match="unknown synthetic routing 'x'; choices: deepseek, qwen"):
        synthetic_trace("x", num_layers=1)


# --- recording and replaying ---------------------------------------------------------------------------------------


def test_recorder_rebuilds_the_trace_it_was_fed(tmp_path):
    trace = small_trace(requests=3, tokens=7, layers=3)
    recorder = RoutingRecorder(3, 8, 2)
    for request in trace.requests:
        steps = [(0, 4), (4, 1), (5, 1), (6, 1)]  # prefill of 4 tokens, then decode one by one
        for start, count in steps:
            for layer in range(3):
                recorder.record(layer, request[start : start + count, layer].astype(np.int64))
        recorder.end_request()
    recorder.end_request()  # nothing recorded since: no empty request
    assert recorder.trace() == trace
    recorder.write(tmp_path / "rec.jsonl")
    assert RoutingTrace.read(tmp_path / "rec.jsonl") == trace


def test_recorder_refuses_misuse():
    recorder = RoutingRecorder(2, 8, 2)
    with pytest.raises(RoutingError, match="no request recorded"):
        recorder.trace()
    with pytest.raises(RoutingError, match="got sparse layer 1, expected layer 0"):
        recorder.record(1, np.zeros((1, 2), dtype=np.int64))
    with pytest.raises(RoutingError, match=r"shape \(1, 3\)"):
        recorder.record(0, np.array([[0, 1, 2]]))
    with pytest.raises(RoutingError, match="out of range 0..7"):
        recorder.record(0, np.array([[0, 8]]))
    recorder.record(0, np.array([[0, 1], [2, 3]]))
    with pytest.raises(RoutingError, match="layer 1 has 1 tokens, layer 0 of this step 2"):
        recorder.record(1, np.array([[0, 1]]))
    with pytest.raises(RoutingError, match="after 1 of 2 sparse layers"):
        recorder.end_request()
    recorder.record(1, np.array([[0, 1], [4, 4]]))
    recorder.end_request()
    with pytest.raises(RoutingError, match="expert 4 is listed twice"):
        recorder.trace()


def test_replay_wraps_around():
    trace = small_trace(requests=2, tokens=5, layers=3)
    replay = RoutingReplay(trace, 1)
    request = trace.requests[1]
    assert replay.num_tokens == 5
    assert np.array_equal(replay.choices(2, 0, 5), request[:, 2])
    got = replay.choices(1, 3, 6)  # positions 3, 4, 0, 1, 2, 3
    assert got.shape == (6, 2) and got.dtype == np.int64
    assert np.array_equal(got, request[[3, 4, 0, 1, 2, 3], 1])
    assert np.array_equal(replay.choices(0, 12, 1), request[2:3, 0])
    assert replay.choices(0, 0, 0).shape == (0, 2)
    with pytest.raises(RoutingError, match="sparse layer 3 out of range 0..2"):
        replay.choices(3, 0, 1)
    with pytest.raises(RoutingError, match="negative"):
        replay.choices(0, -1, 1)
    with pytest.raises(RoutingError, match="request 2 out of range 0..1"):
        RoutingReplay(trace, 2)
