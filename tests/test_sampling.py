"""Sampling controls: each logits processor against transformers' own on random logits, the order they apply in,
the penalties' history (prompt and output for repetition, output only for frequency and presence), seeded draws,
and the defaults a container's generation_config.json gives `zipmoe run`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conftest import assert_one_line_error, run_cli
from zipmoe.runtime.engine import Engine, EngineOptions
from zipmoe.runtime.request import SamplingError, SamplingOptions, generation_defaults, sampling_with_defaults
from zipmoe.runtime.sampling import (
    Sampler,
    apply_frequency_presence,
    apply_repetition_penalty,
    min_p_filter,
    top_k_filter,
    top_p_filter,
    warp,
)

V = 64
CPU = ("--device", "cpu", "--dtype", "float32")


def random_logits(seed: int) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


def history(seed: int, n: int = 20) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed + 1000)).tolist()


def seen_mask(ids: list[int]) -> torch.Tensor:
    mask = torch.zeros(V, dtype=torch.bool)
    mask[ids] = True
    return mask


def same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """The same logits, -inf in the same places (what was filtered), the rest within float32 rounding."""
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)


# -- each processor is transformers' --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_is_transformers(seed, penalty):
    logits, ids = random_logits(seed), history(seed)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), logits[None].clone())[0]
    same(apply_repetition_penalty(logits, seen_mask(ids), penalty), theirs)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 5, V - 1, V, V + 10])
def test_top_k_is_transformers(seed, k):
    logits = random_logits(seed)
    same(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits[None].clone())[0])


def test_top_k_keeps_ties_as_transformers_does():
    logits = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    ours = top_k_filter(logits, 2)
    same(ours, TopKLogitsWarper(2)(None, logits[None].clone())[0])
    assert torch.isfinite(ours).tolist() == [False, True, True, False, True]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.9, 0.999])
def test_top_p_is_transformers(seed, p):
    logits = random_logits(seed)
    ours = top_p_filter(logits, p)
    same(ours, TopPLogitsWarper(p)(None, logits[None].clone())[0])
    assert torch.isfinite(ours).sum() >= 1


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_is_transformers(seed, min_p):
    logits = random_logits(seed)
    same(min_p_filter(logits, min_p), MinPLogitsWarper(min_p)(None, logits[None].clone())[0])


@pytest.mark.parametrize("seed", range(8))
def test_the_chain_is_transformers_in_its_order(seed):
    """Repetition penalty, temperature, top-k, top-p, min-p: `Sampler` draws from the distribution transformers'
    `_get_logits_processor` list gives (same filtered tokens, same probabilities)."""
    rng = np.random.default_rng(seed)
    options = SamplingOptions(
        temperature=float(rng.uniform(0.3, 1.5)), top_k=int(rng.integers(0, 40)), top_p=float(rng.uniform(0.3, 1)),
        min_p=float(rng.uniform(0, 0.2)), repetition_penalty=float(rng.uniform(0.8, 1.5)),
    )  # fmt: skip
    logits, ids = random_logits(seed), history(seed)
    processors = [RepetitionPenaltyLogitsProcessor(options.repetition_penalty)]
    processors.append(TemperatureLogitsWarper(options.temperature))
    if options.top_k:
        processors.append(TopKLogitsWarper(options.top_k))
    processors += [TopPLogitsWarper(options.top_p), MinPLogitsWarper(options.min_p)]
    theirs = LogitsProcessorList(processors)(torch.tensor([ids]), logits[None].clone())[0]
    ours = warp(apply_repetition_penalty(logits, seen_mask(ids), options.repetition_penalty), options)
    same(ours, theirs)
    assert torch.allclose(torch.softmax(ours, -1), torch.softmax(theirs, -1), atol=1e-6)


def test_frequency_and_presence_penalties_are_openais_definition():
    logits, generated = random_logits(0), [3, 3, 3, 7, 9, 9]
    counts = torch.bincount(torch.tensor(generated), minlength=V).float()
    ours = apply_frequency_presence(logits, counts, 0.5, -1.25)
    expected = logits.numpy().copy()
    for token in set(generated):  # logit[j] -= frequency * count[j] + presence * (count[j] > 0)
        expected[token] -= 0.5 * generated.count(token) + -1.25 * 1.0
    assert np.allclose(ours.numpy(), expected, atol=1e-6)


# -- the sampler ------------------------------------------------------------------------------------------------------


def draws(options: SamplingOptions, logits_seq: list[torch.Tensor], prompt=(1, 2)) -> list[int]:
    sampler = Sampler(options, list(prompt))
    return [sampler.next(logits) for logits in logits_seq]


def test_a_seeded_sample_is_reproducible_and_seeds_differ():
    seq = [random_logits(i) for i in range(30)]
    options = SamplingOptions(temperature=1.0, top_k=20, top_p=0.95, min_p=0.01, repetition_penalty=1.1,
                              frequency_penalty=0.3, presence_penalty=0.2, seed=7)  # fmt: skip
    first = draws(options, seq)
    assert draws(options, seq) == first
    assert draws(SamplingOptions(**{**options.__dict__, "seed": 8}), seq) != first


def test_draws_stay_within_the_filter_and_follow_its_distribution():
    logits = random_logits(3)
    options = SamplingOptions(temperature=0.8, top_k=6, top_p=0.9, seed=1)
    allowed = torch.isfinite(warp(logits, options))
    sampler = Sampler(options, [])
    tokens = [sampler.next(logits) for _ in range(4000)]
    assert all(allowed[t] for t in tokens)
    counts = np.bincount(tokens, minlength=V) / len(tokens)
    assert np.abs(counts - torch.softmax(warp(logits, options), -1).numpy()).max() < 0.03


def test_greedy_applies_the_penalties_before_argmax():
    logits = torch.linspace(2.0, 1.0, V)  # token 0 is the most likely, then 1, 2, ...
    assert draws(SamplingOptions(), [logits] * 3, prompt=[0]) == [0, 0, 0]  # no penalty: argmax as before
    # Presence and frequency count the output only: the prompt's token 0 is still chosen first, then not again.
    assert draws(SamplingOptions(presence_penalty=2.0), [logits] * 4, prompt=[0]) == [0, 1, 2, 3]
    assert draws(SamplingOptions(frequency_penalty=2.0), [logits] * 3, prompt=[0]) == [0, 1, 2]
    # Repetition counts the prompt too (2 / 1.2 < 1.98): the prompt's token 0 is passed over from the start.
    assert draws(SamplingOptions(repetition_penalty=1.2), [logits] * 3, prompt=[0]) == [1, 2, 3]
    # As transformers' greedy search with the processor: argmax of the penalised logits.
    theirs = RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([[0]]), logits[None].clone())
    assert int(theirs.argmax()) == 1


def test_the_sampler_takes_bf16_and_batched_shapes():
    logits = random_logits(5)
    assert draws(SamplingOptions(), [logits.bfloat16()[None]]) == [int(logits.bfloat16().float().argmax())]


# -- options -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("top_k", -1, "--top-k must be an integer >= 0 (0: off), got -1"),
        ("min_p", 1.5, "--min-p must be between 0 and 1, got 1.5"),
        ("repetition_penalty", 0.0, "--repetition-penalty must be a finite number > 0 (1: off), got 0.0"),
        ("repetition_penalty", float("inf"), "--repetition-penalty must be a finite number > 0"),
        ("frequency_penalty", 2.5, "--frequency-penalty must be between -2 and 2, got 2.5"),
        ("presence_penalty", float("nan"), "--presence-penalty must be between -2 and 2, got nan"),
        ("stop", ("a", "b", "c", "d", "e"), "--stop must be at most 4 strings, got 5"),
        ("stop", ("",), "--stop must be non-empty strings, got ''"),
        ("stop", ("x" * 257,), "--stop must be at most 256 characters each, got one of 257"),
        ("stop", 5, "--stop must be a string or a list of strings, got int"),
    ],
)
def test_options_out_of_range_name_their_flag(field, value, message):
    with pytest.raises(SamplingError) as info:
        SamplingOptions(**{field: value})
    assert str(info.value).startswith(message)


def test_stop_takes_a_string_or_a_list():
    assert SamplingOptions(stop="\n").stop == ("\n",)
    assert SamplingOptions(stop=["a", "b"]).stop == ("a", "b")


# -- generation_config.json defaults -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc, defaults",
    [
        ({}, {"temperature": 0.0}),
        ({"do_sample": False, "temperature": 0.6, "top_p": 0.9}, {"temperature": 0.0, "top_p": 0.9}),
        ({"do_sample": True}, {"temperature": 1.0}),
        (
            {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0, "repetition_penalty": 1.05},
            {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0, "repetition_penalty": 1.05},
        ),
        ({"do_sample": True, "top_k": None, "max_new_tokens": 9}, {"temperature": 1.0}),  # other keys are not read
    ],
)
def test_generation_config_defaults_as_transformers_reads_them(doc, defaults):
    assert generation_defaults(doc) == (defaults, [])


def test_bad_generation_config_values_are_ignored_with_a_warning():
    doc = {"do_sample": "yes", "temperature": -1, "top_k": 2.5, "top_p": True, "repetition_penalty": 1.1}
    defaults, warnings = generation_defaults(doc)
    assert defaults == {"temperature": 0.0, "repetition_penalty": 1.1}
    assert warnings == [
        'generation_config.json: do_sample must be true or false, got "yes"; ignored (greedy)',
        "generation_config.json: temperature must be a finite number >= 0, got -1; ignored",
        "generation_config.json: top_p must be a number, got true; ignored",
        "generation_config.json: top_k must be an integer, got 2.5; ignored",
    ]
    assert generation_defaults([1])[1] == [
        "generation_config.json: expected a JSON object, got an array; its sampling defaults are ignored"
    ]


def test_flags_override_the_defaults_and_unset_flags_do_not():
    defaults = {"temperature": 0.6, "top_k": 20}
    assert sampling_with_defaults(defaults, temperature=None, top_k=5, seed=3) == SamplingOptions(
        temperature=0.6, top_k=5, seed=3
    )
    assert sampling_with_defaults(defaults, temperature=0) == SamplingOptions(temperature=0, top_k=20)


@pytest.fixture(scope="module")
def sampling_container(checkpoints, tmp_path_factory):
    """The tiny demo with a generation_config.json that samples (temperature 0.7, top_k 5), and one with bad values."""
    from zipmoe.pack import PackOptions, pack

    out = {}
    for name, config in {
        "samples": {"eos_token_id": 2, "do_sample": True, "temperature": 0.7, "top_k": 5},
        "bad": {"eos_token_id": 2, "do_sample": True, "top_p": 7},
    }.items():
        source = tmp_path_factory.mktemp(name) / "demo"
        shutil.copytree(checkpoints.demo("tiny"), source)
        (source / "generation_config.json").write_text(json.dumps(config))
        out[name] = source.parent / "model.zmoe"
        pack(str(source), out[name], PackOptions())
    return out


def test_the_engine_run_and_prompts_take_the_containers_defaults(capsys, sampling_container, tmp_path):
    path = sampling_container["samples"]
    with Engine(path, EngineOptions(device="cpu", dtype="float32")) as e:
        assert e.default_sampling(max_new_tokens=4) == SamplingOptions(max_new_tokens=4, temperature=0.7, top_k=5)
        assert e.default_sampling(temperature=0.0, top_k=None).greedy
        sampled = e.generate_text("Hello", e.default_sampling(max_new_tokens=6, stop_at_eos=False))[0]
        greedy = e.generate_text("Hello", e.default_sampling(max_new_tokens=6, stop_at_eos=False, temperature=0))[0]
    assert sampled != greedy

    args = ("run", str(path), "-n", "6", "--ignore-eos", *CPU)
    code, out, err = run_cli(capsys, *args, "Hello", "--json")
    ran = json.loads(out)
    assert code == 0 and ran["text"] == sampled
    assert ran["usage"] == {"prompt_tokens": ran["prompt_tokens"], "completion_tokens": 6,
                            "total_tokens": ran["prompt_tokens"] + 6}  # fmt: skip
    batch = tmp_path / "batch.jsonl"
    batch.write_text('"Hello"\n{"prompt": "Hello", "temperature": 0}\n')
    code, out, err = run_cli(capsys, *args, "--prompts", str(batch))
    assert code == 0 and [json.loads(line)["text"] for line in out.splitlines()] == [sampled, greedy]


def test_a_bad_generation_config_value_is_a_warning_not_an_error(capsys, sampling_container):
    code, out, err = run_cli(capsys, "run", str(sampling_container["bad"]), "Hello", "-n", "1", "--json", *CPU)
    assert code == 0, err
    assert "generation_config.json: top_p must be between 0 and 1, got 7; ignored" in " ".join(err.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0"),
        (["--stop", ""], "--stop must be non-empty strings"),
        (["--stop", "a", "--stop", "b", "--stop", "c", "--stop", "d", "--stop", "e"], "--stop must be at most 4"),
    ],
)
def test_bad_sampling_flags_are_one_line_errors_before_the_model_loads(capsys, monkeypatch, args, message):
    import zipmoe.runtime.engine as engine_module

    monkeypatch.setattr(engine_module, "Engine", None)  # loading a model would fail the test with a TypeError
    for command in ("run", "chat"):
        prompt = ["Hello"] if command == "run" else []
        code, _, err = run_cli(capsys, command, "no-such.zmoe", *prompt, *args)
        assert_one_line_error(code, err, message)


@pytest.mark.parametrize("temperature", [1e-39, 1e-308, 5e-324])
def test_a_vanishing_temperature_samples_the_most_likely_token(temperature):
    """Logits divided by a temperature below ~1e-38 overflow float32; the draw is still the limit, the argmax (a NaN
    distribution used to fail the generation)."""
    logits = random_logits(1)
    sampler = Sampler(SamplingOptions(temperature=temperature, top_p=0.9, min_p=0.1), [1, 2])
    assert sampler.next(logits) == int(torch.argmax(logits))
