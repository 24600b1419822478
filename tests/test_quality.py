"""Quality on a trained model: SliceMoE's Table 1 pattern, and PCW against an empty cache.

The fixture is a 14 M-parameter Qwen2-MoE (16 experts, 4 per token) trained on the Python standard library by
``scripts/train_fixture.py``; ``heldout.txt`` holds standard-library files it never saw.
"""

from pathlib import Path

import pytest
import torch

from zipmoe.evaluate import perplexity
from zipmoe.pack import PackOptions, pack
from zipmoe.quant.spec import SliceSpec
from zipmoe.runtime.engine import Engine, EngineOptions
from zipmoe.runtime.generate import SamplingOptions
from zipmoe.runtime.model import InMemoryExperts, Transformer
from zipmoe.runtime.weights import load_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "qwen2-moe-stdlib"
CPU = EngineOptions(device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "trained.zmoe"
    pack(str(FIXTURE), out, PackOptions(slices=SliceSpec(8, 4)))
    return out


@pytest.fixture(scope="module")
def heldout():
    return (FIXTURE / "heldout.txt").read_text(encoding="utf-8")


def test_the_fixture_is_a_trained_model_transformers_agrees_with(heldout):
    import transformers

    args, dense, experts = load_checkpoint(FIXTURE, torch.device("cpu"), torch.float32)
    ours = Transformer(args, dense, InMemoryExperts(experts))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    tokens = torch.tensor(transformers.AutoTokenizer.from_pretrained(FIXTURE)(heldout[:2000])["input_ids"][:200])
    logits = ours.forward(tokens, 0, ours.new_cache(256), all_logits=True)
    with torch.no_grad():
        expected = theirs(tokens[None]).logits[0]
    assert torch.allclose(logits, expected, rtol=0, atol=1e-4), (logits - expected).abs().max()
    loss = torch.nn.functional.cross_entropy(logits[:-1], tokens[1:])
    assert float(loss) < 5.0  # far below uniform (ln 2048 = 7.6): the model has learned Python


def test_table1_pattern(trained, heldout):
    """AMAT 8-bit ~ BF16; AMAT 4-bit ~ 4-bit quantized on its own; naive truncation far worse than both."""
    modes = ["lossless", "q8", "q4", "dbsc", "q4-base", "q4-trunc"]
    results = perplexity(trained, heldout, modes, context=256, max_tokens=4096, options=CPU)
    ppl = {r.mode: r.perplexity for r in results}
    assert ppl["q8"] <= 1.01 * ppl["lossless"], ppl
    assert ppl["q4"] <= 1.05 * ppl["q4-base"], ppl
    assert ppl["q4-trunc"] >= 10 * ppl["lossless"], ppl
    assert ppl["q8"] <= ppl["dbsc"] <= ppl["q4"], ppl


def test_pcw_starts_decoding_with_fewer_misses_than_an_empty_cache(trained, heldout):
    first_misses = {}
    for warmup in ("pcw", "empty"):
        with Engine(trained, EngineOptions(device="cpu", dtype="float32", mode="dbsc", warmup=warmup,
                                           memory_budget="30%")) as e:  # fmt: skip
            prompt = e.tokenizer.encode(heldout)[:256]
            e.generate_tokens(prompt, SamplingOptions(max_new_tokens=17, stop_at_eos=False))
            first_misses[warmup] = sum(e.pipeline.stats.decode_misses[:16])
    assert first_misses["pcw"] < first_misses["empty"], first_misses
