"""The runtime: logits and tokens against transformers, bit-identical serving from a container, the cache."""

import json

import pytest
import torch

from conftest import assert_matches_transformers, copy_of, rewrite_manifest, run_cli
from zipmoe.pack import PackOptions, pack
from zipmoe.runtime.config import ModelArgs, UnsupportedModelError
from zipmoe.runtime.engine import Engine, EngineOptions, parse_size
from zipmoe.runtime.generate import SamplingOptions, generate
from zipmoe.runtime.model import InMemoryExperts, Transformer
from zipmoe.runtime.pipeline import BudgetError
from zipmoe.runtime.weights import load_checkpoint

RUNTIME_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64]
CPU = torch.device("cpu")


def engine(path, **options) -> Engine:
    return Engine(path, EngineOptions(device="cpu", dtype="float32", **options))


def reference_model(path):
    args, dense, experts = load_checkpoint(path, CPU, torch.float32)
    return Transformer(args, dense, InMemoryExperts(experts))


def greedy(model, n=16):
    return generate(model, PROMPT, SamplingOptions(max_new_tokens=n, stop_at_eos=False)).tokens


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_matches_transformers(checkpoints, family):
    source = checkpoints.family(family)
    assert_matches_transformers(reference_model(source), source, PROMPT)


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_container_serves_the_same_bits_as_the_safetensors(checkpoints, family):
    source = checkpoints.family(family)
    packed = checkpoints.packed(source)
    ref = reference_model(source)
    tokens = torch.tensor(PROMPT)
    expected = ref.forward(tokens, 0, ref.new_cache(32), all_logits=True)
    expected_tokens = greedy(ref)
    with engine(packed) as e:
        minimum, decoded = e.cache_minimum(), e.source.decoded_nbytes
    configurations = {
        "unlimited": {},
        "minimum": {"memory_budget": minimum},
        "every tier": {"memory_budget": minimum + 3 * decoded, "tiers": "decoded=0.4,compressed=0.3,sm=0.3"},
    }
    for name, options in configurations.items():
        with engine(packed, **options) as e:
            logits = e.model.forward(tokens, 0, e.model.new_cache(32), all_logits=True)
            assert torch.equal(logits, expected), name
            assert greedy(e.model) == expected_tokens, name
            if name != "unlimited":
                stats = e.pipeline.stats
                assert stats.served_from["storage"] > 0 and stats.peak_bytes <= e.budget


@pytest.mark.parametrize(
    "family", ["qwen3_moe", "mixtral"]
)  # fused Mixtral keeps its router under mlp, not block_sparse_moe
def test_fused_layout_serves_like_per_expert(checkpoints, family):
    per_expert = reference_model(checkpoints.family(family))
    with engine(checkpoints.packed(checkpoints.family(family, fused=True))) as e:
        tokens = torch.tensor(PROMPT)
        assert torch.equal(
            e.model.forward(tokens, 0, e.model.new_cache(16), all_logits=True),
            per_expert.forward(tokens, 0, per_expert.new_cache(16), all_logits=True),
        )


TIER_MIXES = [
    ("decoded=1", "lru"),
    ("compressed=1", "lru"),
    ("sm=1", "lru"),
    ("decoded=0.5,compressed=0.5", "lru"),
    ("decoded=0.3,sm=0.7", "lfu"),
    ("decoded=0.2,compressed=0.4,sm=0.4", "lfu"),
]


@pytest.mark.parametrize("tiers, policy", TIER_MIXES)
def test_small_budget_gives_the_tokens_of_an_unlimited_one(checkpoints, tiers, policy):
    packed = checkpoints.packed(checkpoints.demo("tiny"))
    sampling = SamplingOptions(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=3, stop_at_eos=False)
    with engine(packed) as unlimited:
        expected = unlimited.generate_tokens(PROMPT, sampling).tokens
        assert unlimited.pipeline.stats.served_from["storage"] == len(unlimited.container.experts)  # each read once
        # the minimum, plus room for about five of the eight experts compressed
        budget = unlimited.cache_minimum() + 5 * unlimited.source.record_nbytes
    with engine(packed, memory_budget=budget, tiers=tiers, policy=policy) as small:
        assert small.generate_tokens(PROMPT, sampling).tokens == expected
        stats = small.pipeline.stats
        assert stats.peak_bytes <= small.budget
        assert stats.served_from["storage"] > len(small.container.experts)  # experts were evicted and read again
        for tier in ("compressed", "sm"):
            if f"{tier}=1" in tiers or f"{tier}=0.7" in tiers:  # room for several experts: some hits
                assert stats.served_from.get(tier, 0) > 0


def test_budget_below_the_minimum(checkpoints):
    packed = checkpoints.packed(checkpoints.demo("tiny"))
    with engine(packed) as e:
        minimum = e.cache_minimum()
    with pytest.raises(BudgetError, match=rf"below the minimum of {minimum / 1e6:.1f} MB"):
        engine(packed, memory_budget=minimum - 1)


def test_uncompressed_container_serves_the_same_tokens(checkpoints, tmp_path):
    source = checkpoints.demo("tiny")
    raw = tmp_path / "raw.zmoe"
    pack(str(source), raw, PackOptions(coder=None))
    with engine(checkpoints.packed(source)) as compressed, engine(raw) as uncompressed:
        assert greedy(compressed.model) == greedy(uncompressed.model)
        assert uncompressed.source.record_nbytes > 1.4 * compressed.source.record_nbytes


def test_unsupported_architecture_lists_the_supported_ones(checkpoints, tmp_path):
    packed = copy_of(checkpoints.packed(checkpoints.demo("tiny")), tmp_path)
    rewrite_manifest(packed, lambda doc: doc["config"].update(model_type="llama"))
    with pytest.raises(
        UnsupportedModelError, match="supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, dee"
    ):
        engine(packed)
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        ModelArgs.from_hf_config(None)


def test_sampling_is_reproducible_and_greedy_is_argmax(checkpoints):
    with engine(checkpoints.packed(checkpoints.demo("tiny"))) as e:
        sampled = SamplingOptions(max_new_tokens=12, temperature=1.0, top_p=0.8, seed=11, stop_at_eos=False)
        first, second = e.generate_tokens(PROMPT, sampled).tokens, e.generate_tokens(PROMPT, sampled).tokens
        assert first == second
        other = e.generate_tokens(PROMPT, SamplingOptions(12, 1.0, 0.8, seed=12, stop_at_eos=False)).tokens
        assert other != first
        logits = e.model.forward(torch.tensor(PROMPT), 0, e.model.new_cache(16))
        assert e.generate_tokens(PROMPT, SamplingOptions(max_new_tokens=1)).tokens == [int(torch.argmax(logits))]


def test_text_generation_with_the_embedded_tokenizer(checkpoints):
    with engine(checkpoints.packed(checkpoints.demo("tiny"))) as e:
        ids = e.tokenizer.encode("Hello, zipmoe!")
        assert e.tokenizer.decode(ids) == "Hello, zipmoe!"
        chat = e.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        assert chat == "<s>user: hi\nassistant: "
        pieces = []
        text, result = e.generate_text(
            "Hello", SamplingOptions(max_new_tokens=8, stop_at_eos=False), on_text=pieces.append
        )
        assert "".join(pieces) == text and len(result.tokens) == 8 and result.ttft > 0


def test_parse_size():
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1.5g") == int(1.5 * 2**30)
    assert parse_size("50%", percent_of=1000) == 500
    with pytest.raises(BudgetError, match="cannot read size"):
        parse_size("lots")
    with pytest.raises(BudgetError, match="unknown size unit"):
        parse_size("3 parsecs")


def test_cli_run(capsys, checkpoints):
    packed = str(checkpoints.packed(checkpoints.demo("tiny")))
    code, out, err = run_cli(
        capsys, "run", packed, "Hello", "-n", "6", "--device", "cpu", "--dtype", "float32", "--json"
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["new_tokens"] == 6 and doc["cache"]["requests"] > 0 and doc["model"]["dtype"] == "float32"
    code, out, err = run_cli(
        capsys, "run", packed, "Hello", "-n", "4", "--memory-budget", "2MB", "--simulate-storage", "2"
    )
    assert code == 0 and "time per output token" in err and "experts read from storage" in err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["Hello", "--device", "cuda"], "no CUDA GPU is available"),
        (["   "], "the prompt is empty"),
        (["Hello", "--memory-budget", "1kB"], "below the minimum of"),
        (["Hello", "--memory-budget", "lots"], "cannot read size"),
    ],  # a bad --dtype is a usage error that lists the choices: tests/test_flags.py
)
def test_cli_run_errors(capsys, checkpoints, args, fragment):
    if args[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is available")
    code, _, err = run_cli(capsys, "run", str(checkpoints.packed(checkpoints.demo("tiny"))), *args)
    assert code == 1 and err.startswith("Error: ") and fragment in err and "Traceback" not in err


def test_pipeline_exposes_its_accounting(checkpoints):
    with engine(checkpoints.packed(checkpoints.demo("tiny")), memory_budget="2.5MB", tiers="decoded=0.5,sm=0.5") as e:
        greedy(e.model, 8)
        tiers, stats = e.tiers, e.pipeline.stats
        assert tiers.used <= tiers.capacity_total and all(p.used <= p.capacity for p in tiers.pools.values())
        assert stats.total_requests == sum(stats.served_from.values())
        assert sum(stats.rate(where) for where in stats.served_from) == pytest.approx(1.0)
        assert stats.bytes_decoded > 0 and stats.total_bytes_read > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_serving_matches_cpu_and_ignores_the_budget(checkpoints):
    packed = checkpoints.packed(checkpoints.demo("tiny"))
    tokens = torch.tensor(PROMPT)
    with engine(packed) as cpu:
        expected = cpu.model.forward(tokens, 0, cpu.model.new_cache(16), all_logits=True)
    with Engine(packed, EngineOptions(device="cuda", dtype="float32")) as gpu:
        assert next(iter(gpu.dense.values())).is_cuda
        logits = gpu.model.forward(tokens.cuda(), 0, gpu.model.new_cache(16), all_logits=True).cpu()
        assert torch.allclose(logits, expected, atol=1e-4)
        unlimited = greedy(gpu.model, 12)
        budget = gpu.cache_minimum() + 2 * gpu.source.record_nbytes
    with Engine(packed, EngineOptions(device="cuda", dtype="bfloat16", memory_budget=budget)) as small:
        with Engine(packed, EngineOptions(device="cuda", dtype="bfloat16")) as big:
            assert greedy(small.model, 12) == greedy(big.model, 12)
        assert small.pipeline.stats.served_from["storage"] > len(small.container.experts)
    assert len(unlimited) == 12
