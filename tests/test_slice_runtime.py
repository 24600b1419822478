"""Serving AMAT slices: exact weights per mode, dbsc's per-token precision, the slice cache's policies and PCW."""

import json
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from conftest import run_cli
from zipmoe.quant import reference as ref
from zipmoe.quant.spec import LSB, MSB, Precision, SliceSpec
from zipmoe.runtime import representations
from zipmoe.runtime.engine import Engine, EngineOptions
from zipmoe.runtime.generate import SamplingOptions, generate
from zipmoe.runtime.model import (
    ExpertWeights,
    InMemoryExperts,
    Transformer,
    accumulate,
    expert_assignments,
    expert_output,
)
from zipmoe.runtime.pipeline import BudgetError, ExpertPipeline
from zipmoe.runtime.policies import SlicePolicy
from zipmoe.runtime.representations import Fetch
from zipmoe.runtime.tiers import Tiers

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64, 11, 12]


@pytest.fixture(scope="module")
def sliced(checkpoints):
    return checkpoints.packed(checkpoints.family("qwen2_moe"), slices=SliceSpec(8, 4))


def engine(path, **options) -> Engine:
    return Engine(path, EngineOptions(device="cpu", dtype="float32", **options))


def reference_weights(e: Engine, precision: Precision) -> dict[tuple[int, int], ExpertWeights]:
    """Every expert's weights at ``precision``, made by the numpy twins from the container's slices."""
    c, spec = e.container, e.container.slice_spec
    experts = {}
    for layer, expert in c.experts:
        lsb = {(t.name, p): x for t, p, x in c.read_slices(layer, expert, LSB)}
        parts = {}
        for t, p, msb in c.read_slices(layer, expert, MSB):
            rows, cols = t.shape
            w = ref.dequantize(msb, lsb[(t.name, p)], rows, cols, spec, precision)
            parts[t.name.rsplit(".", 2)[-2]] = torch.from_numpy(w)
        experts[(layer, expert)] = ExpertWeights(parts["gate_proj"], parts["up_proj"], parts["down_proj"])
    return experts


class PerTokenReference:
    """dbsc by hand, decoding: a token's experts in its two top slots at high precision when their router
    probability reaches the threshold, everything else low."""

    def __init__(self, high, low, threshold):
        self.high, self.low, self.threshold = high, low, threshold

    def on_phase(self, phase):
        pass

    def run(self, layer, x, top_index, top_weight, top_prob):
        outputs = {}
        for e, tokens, slots in expert_assignments(top_index):
            y = torch.empty(len(tokens), x.shape[1])
            for i, (t, s) in enumerate(zip(tokens.tolist(), slots.tolist())):
                w = self.high if (s < 2 and float(top_prob[t, s]) >= self.threshold) else self.low
                y[i] = expert_output(x, w[(layer, e)], torch.tensor([t]), torch.tensor([s]), top_weight)[0]
            outputs[e] = (tokens, y)
        return accumulate(x, outputs)


@pytest.mark.parametrize(
    "mode, precision", [("q8", Precision.HIGH), ("q4", Precision.LOW), ("q4-trunc", Precision.TRUNC)]
)
@pytest.mark.parametrize("fused", [False, True])
def test_uniform_modes_serve_exactly_the_dequantized_slices(sliced, mode, precision, fused, monkeypatch):
    """Bit for bit through dequantized weights; within float32 rounding when multiplying straight from slices."""
    monkeypatch.setattr(representations, "FUSED_MAX_TOKENS", len(PROMPT) if fused else 0)
    tokens = torch.tensor(PROMPT)
    with engine(sliced, mode=mode) as e:
        reference = Transformer(e.args, e.dense, InMemoryExperts(reference_weights(e, precision)))
        expected = reference.forward(tokens, 0, reference.new_cache(32), all_logits=True)
        got = e.model.forward(tokens, 0, e.model.new_cache(32), all_logits=True)
        if fused:
            assert torch.allclose(got, expected, rtol=0, atol=1e-5) and not torch.equal(got, expected)
        else:
            assert torch.equal(got, expected)


@pytest.mark.parametrize("threshold", [0.28, 0.35])
def test_dbsc_picks_the_precision_per_token(sliced, threshold):
    tokens = torch.tensor(PROMPT)
    with engine(sliced, mode="dbsc", critical_threshold=threshold) as e:
        backend = PerTokenReference(
            reference_weights(e, Precision.HIGH), reference_weights(e, Precision.LOW), threshold
        )
        reference = Transformer(e.args, e.dense, backend)
        expected = reference.forward(tokens, 0, reference.new_cache(32), all_logits=True)
        e.pipeline.on_phase("decode")  # the prefill runs every expert at high precision
        got = e.model.forward(tokens, 0, e.model.new_cache(32), all_logits=True)
        assert torch.allclose(got, expected, rtol=0, atol=1e-5)
        stats = e.pipeline.stats
        assert 0 < stats.critical_tokens < stats.tokens  # both precisions were used
        assert stats.computed["high"] > 0 and stats.computed["low"] > 0


def test_dbsc_prefill_runs_at_high_precision(sliced):
    tokens = torch.tensor(PROMPT)
    with engine(sliced, mode="dbsc") as dbsc, engine(sliced, mode="q8") as high:
        dbsc.pipeline.on_phase("prefill")
        got = dbsc.model.forward(tokens, 0, dbsc.model.new_cache(32), all_logits=True)
        assert torch.equal(got, high.model.forward(tokens, 0, high.model.new_cache(32), all_logits=True))
        assert dbsc.pipeline.stats.computed["low"] == 0


@pytest.mark.parametrize("mode", ["q8", "q4", "dbsc"])
@pytest.mark.parametrize("warmup", ["pcw", "last-layer", "random", "empty"])
def test_tight_budget_gives_the_tokens_of_an_unlimited_one(sliced, mode, warmup):
    sampling = SamplingOptions(max_new_tokens=10, temperature=0.8, seed=3, stop_at_eos=False)
    with engine(sliced, mode=mode) as e:
        expected = generate(e.model, PROMPT, sampling).tokens
        minimum = e.cache_minimum()
        held = e.tiers.pools["slices"].held
        assert e.pipeline.stats.misses[MSB] == len(held[MSB])  # unlimited: every slice read once
    with engine(sliced, mode=mode, warmup=warmup, memory_budget=minimum + 3 * 4096) as e:
        assert generate(e.model, PROMPT, sampling).tokens == expected
        stats = e.pipeline.stats
        assert stats.peak_bytes <= e.budget and stats.misses[MSB] > len(e.tiers.pools["slices"].held[MSB])
        assert len(stats.decode_misses) == 9


def test_modes_need_slices_and_budgets_a_minimum(checkpoints, sliced, capsys):
    lossless = checkpoints.packed(checkpoints.family("qwen2_moe"))
    code, _, err = run_cli(capsys, "run", str(lossless), "hi", "--mode", "dbsc", "--device", "cpu")
    assert code == 1 and "this container holds no AMAT slices (pack it with --slices 8:4)" in err
    code, _, err = run_cli(capsys, "run", str(sliced), "hi", "--mode", "q6", "--device", "cpu")
    assert code == 1 and "unknown mode 'q6' for MAT(8,4) slices (choose lossless, q8, q4, dbsc)" in err
    with pytest.raises(BudgetError, match="below the minimum"):
        engine(sliced, mode="q4", memory_budget=1000)
    with pytest.raises(BudgetError, match="unknown warmup"):
        engine(sliced, mode="q4", warmup="hot")


# -- the slice policy on the pipeline, with a source whose slices are tiny and have known sizes ------------------


@dataclass
class _Args:
    n_layers: int = 3
    top_k: int = 2
    sparse_layers: tuple = (True, True, True)


class FakeSource:
    """Slices of 100 (MSB) and 80 (LSB) bytes; weights that make every expert's output easy to tell apart."""

    kinds = (MSB, LSB)

    def __init__(self, mode):
        self.args, self.mode = _Args(), mode
        self.record_nbytes = {MSB: 100, LSB: 80}
        self.reads = []

    def nbytes(self, kind):
        return self.record_nbytes[kind]

    def fetch_nbytes(self, held, needed):
        return sum(self.record_nbytes[k] for k in needed if k not in held)

    def needs(self, high):
        return (MSB, LSB) if bool(high.any()) else (MSB,)

    def fetch(self, key, held, needed, submit):
        missing = [k for k in needed if k not in held]
        self.reads += [(key, k) for k in missing]
        fetch = Fetch(key, "storage", bytes_read=sum(self.record_nbytes[k] for k in missing), reads=len(missing))
        fetch.finish = lambda: {k: (k, self.record_nbytes[k]) for k in missing}
        return fetch

    def recycle(self, fetch, kept):
        pass

    def compute(self, key, held, x, tokens, slots, top_weight, high):
        eye = torch.eye(2) * (1 + key[1] + (0.5 if bool(high.any()) else 0))
        return expert_output(x, ExpertWeights(eye, eye, eye), tokens, slots, top_weight)


class FakeStorage:
    @dataclass
    class Snapshot:
        busy_seconds: float = 0.0

    def snapshot(self):
        return self.Snapshot()

    def close(self):
        pass


def slice_pipeline(mode, capacity, warmup="pcw", threshold=0.6):
    experts = [(layer, e) for layer in range(3) for e in range(6)]
    policy = SlicePolicy(lsb_first=mode == "dbsc", warmup=warmup, experts=experts)
    tiers = Tiers({"slices": (capacity, (MSB, LSB))}, policy, depends={LSB: MSB})
    return ExpertPipeline(FakeSource(mode), tiers, FakeStorage(), 180, critical_threshold=threshold)


def route(pipeline, layer, experts, probs):
    """One token routed to ``experts`` (top first) with router probabilities ``probs``."""
    x = torch.ones(1, 2)
    top = torch.tensor([probs], dtype=torch.float32)
    pipeline.run(layer, x, torch.tensor([experts]), top, top)


def held(pipeline, kind):
    return set(pipeline.tiers.pools["slices"].held[kind])


def test_dbsc_evicts_lsb_slices_before_any_msb():
    pipeline = slice_pipeline("dbsc", 4 * 100)  # room: 4 MSB, or fewer with LSBs
    pipeline.on_phase("decode")
    route(pipeline, 0, [0, 1], [0.9, 0.1])  # expert 0 critical: MSB+LSB; expert 1: MSB
    assert held(pipeline, LSB) == {(0, 0)} and held(pipeline, MSB) == {(0, 0), (0, 1)}
    route(pipeline, 1, [2, 3], [0.5, 0.5])  # both critical at 0.5 < 0.6? no: two MSBs; 4 MSB + 1 LSB do not fit
    assert not held(pipeline, LSB) and len(held(pipeline, MSB)) == 4  # the LSB went first, no MSB evicted
    route(pipeline, 0, [0, 1], [0.9, 0.1])
    stats = pipeline.stats
    assert stats.hits == {MSB: 2} and stats.misses == {MSB: 4, LSB: 2}
    assert stats.computed == {"high": 2, "low": 4}


def test_dbsc_allows_two_critical_experts_per_token():
    pipeline = slice_pipeline("dbsc", 10_000, threshold=0.3)
    pipeline.on_phase("decode")
    route(pipeline, 0, [0, 1, 2], [0.45, 0.35, 0.32])  # three above the threshold: only the top two are critical
    assert held(pipeline, LSB) == {(0, 0), (0, 1)}
    assert pipeline.stats.critical_tokens == 1 and pipeline.stats.computed == {"high": 2, "low": 1}


def test_high_mode_is_an_lru_of_whole_experts():
    pipeline = slice_pipeline("high", 2 * 180)  # room: two experts
    pipeline.on_phase("decode")
    for layer, experts in [(0, [0, 1]), (1, [0, 1]), (0, [0, 1])]:
        route(pipeline, layer, experts, [0.5, 0.5])
    assert held(pipeline, MSB) == held(pipeline, LSB) == {(0, 0), (0, 1)}
    assert pipeline.stats.misses == {MSB: 6, LSB: 6} and pipeline.stats.computed["low"] == 0


def _prefilled(warmup):
    """Prefill runs layer by layer: expert 0 serves all four tokens of every layer, the others one each."""
    pipeline = slice_pipeline("low", 3 * 100, warmup=warmup)  # room: three MSBs
    pipeline.on_phase("prefill")
    for layer in range(3):
        top = torch.tensor([[0, 1 + layer], [0, 1 + layer], [0, 4], [0, 5]])
        pipeline.run(layer, torch.ones(4, 2), top, torch.full((4, 2), 0.5), torch.full((4, 2), 0.5))
    pipeline.on_phase("decode")
    return pipeline


def test_pcw_keeps_the_experts_the_prompt_used_most():
    assert held(_prefilled("last-layer"), MSB) == {(2, 3), (2, 4), (2, 5)}  # what LRU leaves: the last layer
    pcw = _prefilled("pcw")
    assert held(pcw, MSB) == {(0, 0), (1, 0), (2, 0)}  # the hot expert of every layer
    assert not held(_prefilled("empty"), MSB)
    # Decoding evicts the least used first: layer 2's expert 0 was used by 4 tokens like the others; ties keep LRU.
    assert list(pcw.tiers.pools["slices"].held[MSB]) == [(0, 0), (1, 0), (2, 0)]
    route(pcw, 0, [0, 3], [0.5, 0.5])
    assert pcw.stats.decode_misses == [1] and (0, 0) in held(pcw, MSB) and (1, 0) not in held(pcw, MSB)


def test_random_warm_start_fills_the_cache_with_random_experts_before_decoding():
    first, second = _prefilled("random"), _prefilled("random")
    assert len(held(first, MSB)) == 3 and held(first, MSB) == held(second, MSB)  # seeded
    assert held(first, MSB) != {(2, 3), (2, 4), (2, 5)}
    assert first.stats.bytes_read["prefill"] == (3 * 4 + 3) * 100  # the warm start's reads count as prefill


def test_cli_run_and_eval_with_slices(checkpoints, tmp_path, capsys):
    sliced = checkpoints.packed(checkpoints.demo("tiny"), slices=SliceSpec(8, 4))
    code, _, err = run_cli(capsys, "run", str(sliced), "hello", "-n", "4", "--mode", "dbsc", "--device", "cpu",
                           "--memory-budget", "60%", "--ignore-eos")  # fmt: skip
    assert code == 0 and "MSB slices: hits / misses" in err and "tokens with a critical expert" in err
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    code, out, _ = run_cli(capsys, "eval", "ppl", str(sliced), "--text", str(text), "--context", "32",
                           "--max-tokens", "64", "--device", "cpu", "--json")  # fmt: skip
    doc = json.loads(out)
    assert code == 0 and [r["mode"] for r in doc["results"]] == ["lossless", "q8", "q4", "dbsc", "q4-base", "q4-trunc"]
    assert all(r["tokens"] == 64 and np.isfinite(r["perplexity"]) for r in doc["results"])
    (tmp_path / "e.txt").write_text("")
    code, _, err = run_cli(capsys, "eval", "ppl", str(sliced), "--text", str(tmp_path / "e.txt"), "--device", "cpu")
    assert code == 1 and "fewer than two tokens" in err


@pytest.mark.parametrize(
    "args, message",
    [  # a bad --warmup is a usage error that lists the choices: tests/test_flags.py
        (["eval", "ppl", "{c}", "--text", "{missing}"], "cannot read it as UTF-8 text"),
        (["eval", "ppl", "{c}", "--text", "{binary}"], "cannot read it as UTF-8 text"),
        (["eval", "ppl", "{c}", "--text", "{text}", "--mode", "q4,q6"], "unknown mode 'q6' for MAT(8,4) slices"),
    ],
)
def test_cli_bad_slice_options_are_one_line_errors(checkpoints, tmp_path, capsys, args, message):
    sliced = checkpoints.packed(checkpoints.demo("tiny"), slices=SliceSpec(8, 4))  # it has a tokenizer
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "text.txt").write_text("some text to score " * 8)
    names = {"c": sliced, "missing": tmp_path / "none.txt", "binary": tmp_path / "binary.txt",
             "text": tmp_path / "text.txt"}  # fmt: skip
    code, out, err = run_cli(capsys, *[a.format(**names) for a in args], "--device", "cpu")
    assert code == 1 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["q8", "q4", "dbsc"])
def test_cuda_serves_the_slices_like_the_cpu(sliced, mode):
    tokens = torch.tensor(PROMPT)
    with engine(sliced, mode=mode) as cpu:
        expected = cpu.model.forward(tokens, 0, cpu.model.new_cache(32), all_logits=True)
    with Engine(sliced, EngineOptions(device="cuda", dtype="float32", mode=mode)) as gpu:
        logits = gpu.model.forward(tokens.cuda(), 0, gpu.model.new_cache(32), all_logits=True).cpu()
        payload, _ = next(iter(gpu.tiers.pools["slices"].held["msb"].values()))
        assert payload.payloads[0].is_cuda
        assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()
        minimum = gpu.cache_minimum()
    sampling = SamplingOptions(max_new_tokens=10, stop_at_eos=False)
    options = EngineOptions(device="cuda", dtype="bfloat16", mode=mode)
    with Engine(sliced, options) as big, Engine(sliced, replace(options, memory_budget=minimum + 4096)) as small:
        assert generate(small.model, PROMPT, sampling).tokens == generate(big.model, PROMPT, sampling).tokens
        assert small.pipeline.stats.misses["msb"] > len(small.container.experts)
