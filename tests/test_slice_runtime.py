"""Serving AMAT slices: exact weights per mode, dbsc's per-token precision, the slice cache's policies and PCW."""

import json
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from conftest import run_cli
from zipmoe.quant import reference as ref
from zipmoe.quant.spec import LSB, MSB, Precision, SliceSpec
from zipmoe.runtime import slices
from zipmoe.runtime.cache import BudgetError
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
from zipmoe.runtime.slice_cache import SliceCache
from zipmoe.runtime.slices import Slice

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
    """dbsc by hand: each token's top expert at high precision when it is critical, everything else low."""

    def __init__(self, high, low, threshold):
        self.high, self.low, self.threshold = high, low, threshold

    def on_phase(self, phase):
        pass

    def run(self, layer, x, top_index, top_weight):
        critical = (top_weight[:, 0] / top_weight.sum(-1)) >= self.threshold
        outputs = {}
        for e, tokens, slots in expert_assignments(top_index):
            y = torch.empty(len(tokens), x.shape[1])
            for i, (t, s) in enumerate(zip(tokens.tolist(), slots.tolist())):
                w = self.high if (s == 0 and bool(critical[t])) else self.low
                y[i] = expert_output(x, w[(layer, e)], torch.tensor([t]), torch.tensor([s]), top_weight)[0]
            outputs[e] = (tokens, y)
        return accumulate(x, outputs)


@pytest.mark.parametrize(
    "mode, precision", [("q8", Precision.HIGH), ("q4", Precision.LOW), ("q4-trunc", Precision.TRUNC)]
)
@pytest.mark.parametrize("fused", [False, True])
def test_uniform_modes_serve_exactly_the_dequantized_slices(sliced, mode, precision, fused, monkeypatch):
    """Bit for bit through dequantized weights; within float32 rounding when multiplying straight from slices."""
    monkeypatch.setattr(slices, "FUSED_MAX_TOKENS", len(PROMPT) if fused else 0)
    tokens = torch.tensor(PROMPT)
    with engine(sliced, mode=mode) as e:
        reference = Transformer(e.args, e.dense, InMemoryExperts(reference_weights(e, precision)))
        expected = reference.forward(tokens, 0, reference.new_cache(32), all_logits=True)
        got = e.model.forward(tokens, 0, e.model.new_cache(32), all_logits=True)
        if fused:
            assert torch.allclose(got, expected, rtol=0, atol=1e-5) and not torch.equal(got, expected)
        else:
            assert torch.equal(got, expected)


def test_dbsc_picks_the_precision_per_token(sliced):
    tokens = torch.tensor(PROMPT)
    with engine(sliced, mode="dbsc", critical_threshold=0.55) as e:
        backend = PerTokenReference(reference_weights(e, Precision.HIGH), reference_weights(e, Precision.LOW), 0.55)
        reference = Transformer(e.args, e.dense, backend)
        expected = reference.forward(tokens, 0, reference.new_cache(32), all_logits=True)
        got = e.model.forward(tokens, 0, e.model.new_cache(32), all_logits=True)
        assert torch.allclose(got, expected, rtol=0, atol=1e-5)
        stats = e.cache.stats
        assert 0 < stats.critical_tokens < stats.tokens  # both precisions were used
        assert stats.computed["high"] > 0 and stats.computed["low"] > 0


@pytest.mark.parametrize("mode", ["q8", "q4", "dbsc"])
@pytest.mark.parametrize("warmup", ["pcw", "none", "empty"])
def test_tight_budget_gives_the_tokens_of_an_unlimited_one(sliced, mode, warmup):
    sampling = SamplingOptions(max_new_tokens=10, temperature=0.8, seed=3, stop_at_eos=False)
    with engine(sliced, mode=mode) as e:
        expected = generate(e.model, PROMPT, sampling).tokens
        minimum = e.cache_minimum()
        assert e.cache.stats.misses[MSB] == len(e.cache.cached[MSB])  # unlimited: every slice read once
    with engine(sliced, mode=mode, warmup=warmup, memory_budget=minimum + 3 * 4096) as e:
        assert generate(e.model, PROMPT, sampling).tokens == expected
        stats = e.cache.stats
        assert stats.peak_bytes <= e.budget and stats.misses[MSB] > len(e.cache.cached[MSB])
        assert len(stats.decode_misses) == 9 and sum(stats.decode_misses) + stats.prefill_misses == sum(
            stats.misses.values()
        )


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


# -- the cache's policies, on a store whose experts are tiny and whose slices have known sizes ------------------


@dataclass
class _Args:
    n_layers: int = 3
    top_k: int = 2
    sparse_layers: tuple = (True, True, True)


class FakeStore:
    """Slices of 100 (MSB) and 80 (LSB) bytes; weights that make every expert's output easy to tell apart."""

    def __init__(self):
        self.args = _Args()
        self.record_nbytes = {MSB: 100, LSB: 80}
        self.decoded_nbytes = 0
        self.reads = []

    def read(self, key, kind):
        self.reads.append((key, kind))
        return Slice(kind, (), self.record_nbytes[kind])

    def output(self, key, msb, lsb, precision, x, tokens, slots, top_weight):
        eye = torch.eye(2) * (1 + key[1] + (0.5 if precision == Precision.HIGH else 0))
        return expert_output(x, ExpertWeights(eye, eye, eye), tokens, slots, top_weight)

    def close(self):
        pass


def route(cache, layer, experts, shares):
    """One token routed to ``experts`` (top first) with routing weights ``shares``."""
    x = torch.ones(1, 2)
    cache.run(layer, x, torch.tensor([experts]), torch.tensor([shares], dtype=torch.float32))


def test_dbsc_evicts_lsb_slices_before_any_msb():
    store = FakeStore()
    cache = SliceCache(store, 2 * 180 + 4 * 100, mode="dbsc", threshold=0.6)  # room: 4 MSB, or fewer with LSBs
    route(cache, 0, [0, 1], [0.9, 0.1])  # expert 0 critical: MSB+LSB; expert 1: MSB
    assert set(cache.cached[LSB]) == {(0, 0)} and set(cache.cached[MSB]) == {(0, 0), (0, 1)}
    route(cache, 1, [2, 3], [0.5, 0.5])  # no critical expert: two MSBs; 4 MSB + 1 LSB do not fit
    assert not cache.cached[LSB] and len(cache.cached[MSB]) == 4  # the LSB went first, no MSB evicted
    route(cache, 0, [0, 1], [0.9, 0.1])
    assert cache.stats.hits == {MSB: 2, LSB: 0} and cache.stats.misses == {MSB: 4, LSB: 2}
    assert cache.stats.computed == {"high": 2, "low": 4}


def test_high_mode_is_an_lru_of_whole_experts():
    store = FakeStore()
    cache = SliceCache(store, 2 * 180 + 2 * 180, mode="high")  # room: two experts
    cache.on_phase("decode")
    for layer, experts in [(0, [0, 1]), (1, [0, 1]), (0, [0, 1])]:
        route(cache, layer, experts, [0.5, 0.5])
    assert set(cache.cached[MSB]) == set(cache.cached[LSB]) == {(0, 0), (0, 1)}
    assert cache.stats.misses == {MSB: 6, LSB: 6} and cache.stats.computed["low"] == 0


def test_pcw_keeps_the_experts_the_prompt_used_most():
    """Prefill runs layer by layer: plain LRU ends up with the last layer; PCW with the most used, in every layer."""

    def prefill(warmup):
        cache = SliceCache(FakeStore(), 2 * 180 + 3 * 100, mode="low", warmup=warmup)  # room: three MSBs
        cache.on_phase("prefill")
        for layer in range(3):
            x = torch.ones(4, 2)
            # expert 0 serves all four tokens, expert 1+layer only one
            top = torch.tensor([[0, 1 + layer], [0, 1 + layer], [0, 4], [0, 5]])
            cache.run(layer, x, top, torch.full((4, 2), 0.5))
        cache.on_phase("decode")
        return cache

    assert set(prefill("none").cached[MSB]) == {(2, 3), (2, 4), (2, 5)}  # what LRU leaves: the last layer
    pcw = prefill("pcw")
    assert set(pcw.cached[MSB]) == {(0, 0), (1, 0), (2, 0)}  # the hot expert of every layer
    assert not prefill("empty").cached[MSB]
    # Decoding evicts the least used first: layer 2's expert 0 was used by 4 tokens like the others; ties keep LRU.
    assert list(pcw.cached[MSB]) == [(0, 0), (1, 0), (2, 0)]
    route(pcw, 0, [0, 3], [0.5, 0.5])
    assert pcw.stats.decode_misses == [1] and (0, 0) in pcw.cached[MSB] and (1, 0) not in pcw.cached[MSB]


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
    [
        (["run", "{c}", "hi", "--mode", "q4", "--warmup", "hot"], "unknown warmup 'hot' (choose pcw, none, empty)"),
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
        payload = next(iter(gpu.cache.cached["msb"].values()))
        assert payload.payloads[0].is_cuda
        assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()
        minimum = gpu.cache_minimum()
    sampling = SamplingOptions(max_new_tokens=10, stop_at_eos=False)
    options = EngineOptions(device="cuda", dtype="bfloat16", mode=mode)
    with Engine(sliced, options) as big, Engine(sliced, replace(options, memory_budget=minimum + 4096)) as small:
        assert generate(small.model, PROMPT, sampling).tokens == generate(big.model, PROMPT, sampling).tokens
        assert small.cache.stats.misses["msb"] > len(small.container.experts)
