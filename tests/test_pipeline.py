"""The expert pipeline's parts: tiers under a budget, the LRU and LFU policies, the sign-mantissa tier's reads,
routing replay and recording."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zipmoe.runtime.engine import Engine, EngineOptions, parse_tiers
from zipmoe.runtime.generate import SamplingOptions
from zipmoe.runtime.pipeline import BudgetError
from zipmoe.runtime.policies import FIFO, LFU, LRU, SlicePolicy
from zipmoe.runtime.routing import RoutingTrace, synthetic_trace
from zipmoe.runtime.tiers import Tiers

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64]


def engine(path, **options) -> Engine:
    return Engine(path, EngineOptions(device="cpu", dtype="float32", **options))


# -- policies on tiers of known sizes -----------------------------------------------------------------------------


def use(tiers, key, tokens=1, kind="decoded", nbytes=100):
    """What the pipeline does for one use: tell the policy, look up, admit on a miss; whether it was a hit."""
    tiers.policy.on_use(key, tokens)
    if tiers.get(kind, key) is not None:
        return True
    tiers.admit(kind, key, object(), nbytes)
    return False


def test_lru_evicts_the_least_recently_used():
    tiers = Tiers({"decoded": (300, ("decoded",))}, LRU())
    for e in (0, 1, 2, 0, 3):  # 0 was used again, so 1 goes
        use(tiers, (0, e))
    assert set(tiers.pools["decoded"].held["decoded"]) == {(0, 0), (0, 2), (0, 3)}


def test_fifo_evicts_the_first_admitted_whatever_its_use():
    tiers = Tiers({"decoded": (300, ("decoded",))}, FIFO())
    for e in (0, 1, 2, 0, 0, 3):  # 0 is used again and again, and still goes first
        use(tiers, (0, e))
    assert set(tiers.pools["decoded"].held["decoded"]) == {(0, 1), (0, 2), (0, 3)}


def test_lfu_weighs_uses_by_tokens_and_keeps_frequent_experts():
    tiers = Tiers({"decoded": (200, ("decoded",))}, LFU())
    held = tiers.pools["decoded"].held["decoded"]
    use(tiers, (0, 0), tokens=5)
    use(tiers, (0, 1), tokens=1)
    assert not use(tiers, (0, 2), tokens=1) and (0, 2) not in held  # no colder than anything held: not admitted
    assert not use(tiers, (0, 2), tokens=1) and set(held) == {(0, 0), (0, 2)}  # 2 tokens > 1: evicts expert 1
    assert not use(tiers, (0, 3), tokens=3) and set(held) == {(0, 0), (0, 3)}  # 3 tokens at once
    tiers.policy.on_phase(tiers, "prefill")  # a new request: counts start again
    assert not use(tiers, (0, 4), tokens=1) and (0, 4) in held


def test_lfu_does_not_fall_off_the_lru_cliff():
    """A cycle of more experts than fit: LRU never hits; LFU keeps a stable subset and hits on it."""
    hits = {}
    for name, policy in (("lru", LRU()), ("lfu", LFU())):
        tiers = Tiers({"decoded": (300, ("decoded",))}, policy)
        hits[name] = sum(use(tiers, (0, e)) for _ in range(10) for e in range(4))
    assert hits["lru"] == 0 and hits["lfu"] >= 20


@settings(max_examples=200, deadline=None)
@given(
    policy=st.sampled_from(["lru", "lfu", "fifo", "slices", "dbsc"]),
    capacity=st.integers(0, 1000),
    accesses=st.lists(
        st.tuples(
            st.integers(0, 2),
            st.integers(0, 7),
            st.sampled_from(["a", "b"]),
            st.integers(1, 400),
            st.integers(1, 8),
            st.booleans(),
        ),
        max_size=120,
    ),  # fmt: skip
)
def test_no_access_sequence_exceeds_a_pool(policy, capacity, accesses):
    if policy in ("slices", "dbsc"):
        chosen = SlicePolicy(lsb_first=policy == "dbsc", warmup="pcw")
        chosen_kinds = {"a": "msb", "b": "lsb"}
        tiers = Tiers({"slices": (capacity, ("msb", "lsb"))}, chosen, depends={"lsb": "msb"})
    else:
        chosen_kinds = {"a": "a", "b": "b"}
        chosen = {"lru": LRU, "lfu": LFU, "fifo": FIFO}[policy]()
        tiers = Tiers({"a": (capacity, ("a",)), "b": (capacity // 2, ("b",))}, chosen)
    for layer, expert, kind, nbytes, tokens, phase_change in accesses:
        if phase_change:
            chosen.on_phase(tiers, "decode" if getattr(chosen, "phase", "prefill") == "prefill" else "prefill")
        key = (layer, expert)
        chosen.on_use(key, tokens, 0.1 * tokens)
        tiers.admit(chosen_kinds[kind], key, kind, nbytes)
        for pool in tiers.pools.values():
            assert 0 <= pool.used <= pool.capacity
            assert pool.used == sum(n for entries in pool.held.values() for _, n in entries.values())
        if "lsb" in tiers.kinds:  # an LSB slice is only ever held beside its MSB slice
            held = tiers.pools["slices"].held
            assert set(held["lsb"]) <= set(held["msb"])


def test_parse_tiers():
    assert parse_tiers("decoded=0.25, compressed=0.75") == {"decoded": 0.25, "compressed": 0.75, "sm": 0.0}
    for bad, message in [("decoded", "expected NAME=SHARE"), ("gpu=1", "unknown tier 'gpu'"),
                         ("sm=1.5", "between 0 and 1"), ("decoded=x", "not a number"),
                         ("decoded=0.7,sm=0.7", "more than the whole budget")]:  # fmt: skip
        with pytest.raises(BudgetError, match=message):
            parse_tiers(bad)


# -- the sign-mantissa tier and storage ---------------------------------------------------------------------------


def test_a_sign_mantissa_hit_reads_exactly_the_exponent_section(checkpoints):
    packed = checkpoints.packed(checkpoints.demo("tiny"))
    with engine(packed) as unlimited:
        budget = unlimited.cache_minimum() + 8 * unlimited.source.sm_nbytes  # every expert's planes
    with engine(packed, memory_budget=budget, tiers="sm=1") as e:
        assert e.source.split and e.container.manifest.format_version >= 4
        e.generate_tokens(PROMPT, SamplingOptions(max_new_tokens=4, stop_at_eos=False))  # planes of what it used
        stats = e.pipeline.stats
        held = [key for key in e.source.layouts if e.tiers.holds("sm", key)]
        assert stats.served_from["storage"] == len(held) > 1 and stats.served_from["sm"] > 0  # each read once
        before = e.storage.snapshot()
        e.pipeline.stats = type(stats)()
        layouts = e.source.layouts
        # the prompt's first token again at position 0: the experts it chose then, every use a sign-mantissa hit
        e.model.forward(torch.tensor([PROMPT[0]]), 0, e.model.new_cache(4))
        after = e.storage.snapshot()
        served = e.pipeline.stats.served_from
        assert set(served) == {"sm"}
        used = [key for key in layouts if e.tiers.holds("sm", key)]
        expected = sum(layouts[key].exponent_nbytes for key in used) * served["sm"] // len(used)
        assert after.bytes_read - before.bytes_read == e.pipeline.stats.total_bytes_read
        assert after.reads - before.reads == served["sm"]  # one read per hit
        exponent_sizes = {layouts[key].exponent_nbytes for key in used}
        assert len(exponent_sizes) == 1 and e.pipeline.stats.total_bytes_read == expected
        assert all(layout.exponent_nbytes < layout.nbytes / 3 for layout in layouts.values())


@pytest.mark.parametrize("io", ["buffered", "direct"])
def test_io_modes_serve_the_same_tokens(checkpoints, io):
    packed = checkpoints.packed(checkpoints.demo("tiny"))
    sampling = SamplingOptions(max_new_tokens=6, stop_at_eos=False)
    with engine(packed) as reference:
        expected = reference.generate_tokens(PROMPT, sampling).tokens
        minimum = reference.cache_minimum()
    with engine(packed, memory_budget=minimum + 100_000, io=io, tiers="decoded=0.3,sm=0.7") as e:
        assert e.generate_tokens(PROMPT, sampling).tokens == expected
        assert e.storage.io in ("buffered", "direct")
        assert e.pipeline.stats.storage_busy is None or 0.0 <= e.pipeline.stats.storage_busy <= 1.0


# -- routing ------------------------------------------------------------------------------------------------------


def test_replay_is_deterministic_and_computes_the_trace_experts(checkpoints, tmp_path):
    packed = checkpoints.packed(checkpoints.demo("tiny"))
    sampling = SamplingOptions(max_new_tokens=8, stop_at_eos=False)
    with engine(packed) as e:
        layers = sum(e.args.sparse_layers)
        trace = synthetic_trace("qwen", num_layers=layers, num_experts=e.args.n_experts, top_k=e.args.top_k,
                                requests=1, tokens_per_request=len(PROMPT) + 8)  # fmt: skip
        runs = []
        for _ in range(2):
            e.replay_routing(trace)
            recorder = e.record_routing()
            result = e.generate_tokens(PROMPT, sampling)
            recorder.end_request()
            runs.append((result.tokens, recorder.trace()))
        assert runs[0][0] == runs[1][0]
        recorded = runs[0][1]
        # the model computed the trace's experts, token by token (the last generated token is never forwarded)
        tokens = recorded.requests[0]
        assert tokens.shape[0] == len(PROMPT) + 7
        expected = trace.requests[0][: tokens.shape[0]]
        assert (np.sort(tokens, axis=-1) == np.sort(expected, axis=-1)).all()
        path = tmp_path / "routing.jsonl"
        recorded.write(path)
        assert RoutingTrace.read(path) == recorded
        e.replay_routing(None)
        assert e.model.replay is None


def test_cli_run_records_routing(checkpoints, tmp_path, capsys):
    from conftest import run_cli

    path = tmp_path / "trace.jsonl"
    packed = str(checkpoints.packed(checkpoints.demo("tiny")))
    code, _, err = run_cli(capsys, "run", packed, "Hello", "-n", "3", "--device", "cpu", "--record-routing", str(path),
                           "--tiers", "decoded=0.5,sm=0.5", "--policy", "lfu", "--memory-budget", "3MB")  # fmt: skip
    assert code == 0, err
    trace = RoutingTrace.read(path)
    assert len(trace.requests) == 1 and trace.num_experts == 4 and trace.num_layers == 2  # the tiny model's
