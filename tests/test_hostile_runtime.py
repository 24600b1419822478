"""Hostile inputs to the runtime: configs that lie, tensors that contradict them, prompts past the context, and
option values that used to crash; each is refused with one line (`Error: ...`, exit 1) before anything large is
allocated, and never with a traceback."""

import copy
import json
import shutil
import time
from dataclasses import replace

import pytest
import torch

from conftest import copy_of, rewrite_manifest, run_cli
from zipmoe.demo import PRESETS, model_config
from zipmoe.errors import ChecksumError, FormatError
from zipmoe.pack import PackOptions, pack
from zipmoe.runtime.config import ModelArgs, UnsupportedModelError, config_problems
from zipmoe.runtime.engine import Engine, EngineOptions
from zipmoe.runtime.generate import PromptError, SamplingError, SamplingOptions, generate, prefill
from zipmoe.runtime.pipeline import BudgetError

PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64] * 4
MIXTRAL = model_config(PRESETS["tiny"])  # the config of the tiny demo checkpoint: 2 layers, 4 experts, context 4096
QWEN = model_config(PRESETS["qwen-moe-bench"])


@pytest.fixture(scope="module")
def tiny(checkpoints):
    return checkpoints.packed(checkpoints.demo("tiny"))


@pytest.fixture(scope="module")
def short_context(tiny, tmp_path_factory):
    """The tiny container, its config saying the context is 64 tokens."""
    return with_config(tiny, tmp_path_factory.mktemp("short"), max_position_embeddings=64)


def with_config(container, tmp_path, **changes):
    """A copy of ``container`` whose config.json (in the manifest) has ``changes``."""
    path = copy_of(container, tmp_path)
    rewrite_manifest(path, lambda doc: doc["config"].update(changes))
    return path


def engine(path, **options):
    return Engine(path, EngineOptions(device="cpu", dtype="float32", **options))


def assert_one_line_error(code, err, fragment, status=1):
    assert code == status and "Traceback" not in err and fragment in err and len(err.strip().splitlines()) == 1, err


# -- 1. config.json: every field the runtime uses, checked before anything is built -------------------------------


# fmt: off
@pytest.mark.parametrize(
    "base, changes, message",
    [
        (MIXTRAL, {"num_hidden_layers": 10**9}, "'num_hidden_layers' must be an integer in 1..1024, got 1000000000"),
        (MIXTRAL, {"num_hidden_layers": 0}, "'num_hidden_layers' must be an integer in 1..1024, got 0"),
        (MIXTRAL, {"num_hidden_layers": "2"}, "'num_hidden_layers' must be an integer in 1..1024, got '2'"),
        (MIXTRAL, {"num_hidden_layers": 2.0}, "'num_hidden_layers' must be an integer in 1..1024, got 2.0"),
        (MIXTRAL, {"num_hidden_layers": True}, "'num_hidden_layers' must be an integer in 1..1024, got True"),
        (MIXTRAL, {"num_hidden_layers": None}, "'num_hidden_layers' is missing (an integer in 1..1024)"),
        (MIXTRAL, {"hidden_size": 10**30}, "'hidden_size' must be an integer in 1..65536, got an integer of 100 bits"),
        (MIXTRAL, {"vocab_size": 5_000_000}, "'vocab_size' must be an integer in 1..4194304, got 5000000"),
        (MIXTRAL, {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": None},
         "'num_attention_heads' must be a divisor of hidden_size (128) without head_dim, got 3"),
        (MIXTRAL, {"num_key_value_heads": 3}, "'num_key_value_heads' must be a divisor of num_attention_heads (4)"),
        (MIXTRAL, {"head_dim": 33}, "'head_dim' must be even (rotary embeddings rotate pairs of features), got 33"),
        (MIXTRAL, {"head_dim": 0}, "'head_dim' must be an integer in 1..1024, got 0"),
        (MIXTRAL, {"num_local_experts": 0}, "'num_local_experts' must be an integer in 1..4096, got 0"),
        (MIXTRAL, {"num_local_experts": 100_000}, "'num_local_experts' must be an integer in 1..4096, got 100000"),
        (MIXTRAL, {"num_experts_per_tok": 0}, "'num_experts_per_tok' must be an integer in 1..4, got 0"),
        (MIXTRAL, {"num_experts_per_tok": 5}, "'num_experts_per_tok' must be an integer in 1..4, got 5"),
        (MIXTRAL, {"intermediate_size": -5}, "'intermediate_size' must be an integer in 1..262144, got -5"),
        (MIXTRAL, {"rms_norm_eps": 0}, "'rms_norm_eps' must be a finite number > 0 and < 1, got 0"),
        (MIXTRAL, {"rms_norm_eps": 1.5}, "'rms_norm_eps' must be a finite number > 0 and < 1, got 1.5"),
        (MIXTRAL, {"rms_norm_eps": float("nan")}, "'rms_norm_eps' must be a finite number > 0 and < 1, got nan"),
        (MIXTRAL, {"rms_norm_eps": "1e-5"}, "'rms_norm_eps' must be a finite number > 0 and < 1, got '1e-5'"),
        (MIXTRAL, {"rope_theta": float("inf")}, "'rope_theta' must be a finite number > 0, got inf"),
        (MIXTRAL, {"rope_theta": -1}, "'rope_theta' must be a finite number > 0, got -1"),
        (MIXTRAL, {"rope_parameters": {"rope_theta": 0}}, "config.json rope_parameters: 'rope_theta' must be a finite"),
        (MIXTRAL, {"rope_parameters": [1, 2]}, "'rope_parameters' must be an object, got [1, 2]"),
        (MIXTRAL, {"rope_scaling": {"type": "yarn", "factor": 4}}, "rope_type 'yarn' is not supported"),
        (MIXTRAL, {"sliding_window": -4}, "'sliding_window' must be an integer in 0..16777216, got -4"),
        (MIXTRAL, {"max_position_embeddings": 2**40}, "'max_position_embeddings' must be an integer in 1..16777216"),
        (MIXTRAL, {"eos_token_id": 259}, "'eos_token_id' must be a token id in 0..258 or a list of them, got 259"),
        (MIXTRAL, {"eos_token_id": [1, "x"]}, "'eos_token_id' must be a token id in 0..258 or a list of them"),
        (MIXTRAL, {"eos_token_id": -1}, "'eos_token_id' must be a token id in 0..258 or a list of them, got -1"),
        (MIXTRAL, {"tie_word_embeddings": "yes"}, "'tie_word_embeddings' must be true or false, got 'yes'"),
        (QWEN, {"qkv_bias": 1}, "'qkv_bias' must be true or false, got 1"),
        (QWEN, {"decoder_sparse_step": 0}, "'decoder_sparse_step' must be an integer in 1..1024, got 0"),
        (QWEN, {"decoder_sparse_step": 3}, "decoder_sparse_step 3 and mlp_only_layers [] leave no MoE layer"),
        (QWEN, {"mlp_only_layers": [2]}, "'mlp_only_layers' must be a list of integers in 0..1, got [2]"),
        (QWEN, {"mlp_only_layers": [0], "intermediate_size": 0}, "'intermediate_size' must be a positive integer"),
        (QWEN, {"layer_types": ["full_attention"]}, "'layer_types' must be a list of 2 values from full_attention, sl"),
        (QWEN, {"layer_types": ["full_attention", "x"]}, "'layer_types' must be a list of 2 values"),
        (QWEN, {"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window without layer_types"),
        ({**QWEN, "model_type": "olmoe"}, {"clip_qkv": -1.0}, "'clip_qkv' must be a finite number > 0, got -1.0"),
    ],
)
# fmt: on
def test_config_problems_name_the_key_expected_and_got(base, changes, message):
    config = {**copy.deepcopy(base), **changes}
    problems = config_problems(config)
    assert problems and problems[0].startswith("config.json") and message in problems[0], problems
    assert all("\n" not in p for p in problems)
    with pytest.raises(UnsupportedModelError) as info:
        ModelArgs.from_hf_config(config)
    assert str(info.value) == problems[0]


def test_config_problems_lists_every_problem_and_none_for_good_configs():
    assert config_problems(MIXTRAL) == [] and config_problems(QWEN) == []
    problems = config_problems({**MIXTRAL, "hidden_size": 0, "num_experts_per_tok": 0, "rms_norm_eps": -1})
    assert [p.split("'")[1] for p in problems] == ["hidden_size", "num_experts_per_tok", "rms_norm_eps"]
    assert config_problems({**QWEN, "model_type": "llama"})[0].startswith("zipmoe run does not support model_type")
    assert ModelArgs.from_hf_config(MIXTRAL).context == 4096
    assert ModelArgs.from_hf_config({**MIXTRAL, "max_position_embeddings": None}).context == 131_072


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, zipmoe.runtime.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_hidden_layers": 1_000_000_000}, "'num_hidden_layers' must be an integer in 1..1024, got 1000000000"),
        ({"num_experts_per_tok": 0}, "'num_experts_per_tok' must be an integer in 1..4, got 0"),
        ({"num_hidden_layers": 100}, "config.json says 100 layers, the container holds tensors for 2"),
    ],
)
def test_cli_refuses_a_lying_config_at_once(capsys, tiny, tmp_path, changes, message):
    path = with_config(tiny, tmp_path, **changes)
    started = time.perf_counter()
    code, out, err = run_cli(capsys, "run", str(path), "Hello", "--device", "cpu", "-n", "2")
    assert time.perf_counter() - started < 3.0  # well under a second alone; the bound allows a busy machine
    assert_one_line_error(code, err, message)
    assert out == ""


# -- 2. the container's tensors must be the ones the config implies -------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_hidden_layers": 1}, "config.json says 1 layer, the container holds tensors for 2"),
        ({"hidden_size": 65536}, "tensor model.embed_tokens.weight: config.json implies a float tensor of shape "
                                 "[259, 65536], the container holds BF16 [259, 128]"),
        ({"vocab_size": 4_000_000}, "shape [4000000, 128], the container holds BF16 [259, 128]"),
        ({"num_key_value_heads": 4}, "tensor model.layers.0.self_attn.k_proj.weight: config.json implies a float "
                                     "tensor of shape [128, 128], the container holds BF16 [64, 128]"),
        ({"num_local_experts": 8}, "tensor model.layers.0.block_sparse_moe.gate.weight: config.json implies a float "
                                   "tensor of shape [8, 128], the container holds BF16 [4, 128]"),
        ({"intermediate_size": 4096}, "expert (layer 0, expert 0) model.layers.0.block_sparse_moe.experts.0.w1.weight:"
                                      " config.json implies a float tensor of shape [4096, 128], the container holds "
                                      "BF16 [256, 128]"),
        ({"tie_word_embeddings": True, "model_type": "olmoe", "num_experts": 4},
         "config.json implies a tensor model.layers.0.self_attn.q_norm.weight [128]; the container has none"),
    ],
)  # fmt: skip
def test_tensors_that_contradict_the_config_are_refused_before_loading(tiny, tmp_path, changes, message):
    path = with_config(tiny, tmp_path, **changes)
    started = time.perf_counter()
    with pytest.raises(UnsupportedModelError) as info:
        engine(path)
    assert time.perf_counter() - started < 3.0  # well under a second alone; the bound allows a busy machine
    assert message in str(info.value) and "\n" not in str(info.value)


def test_expert_records_must_cover_exactly_the_moe_layers(tiny):
    from zipmoe.formats.reader import Container
    from zipmoe.runtime.weights import check_tensors

    with Container(tiny) as c:
        manifest, small = c.manifest, c.small_tensors
    args = ModelArgs.from_hf_config(manifest.config)
    check_tensors(args, manifest, small)
    missing = replace(manifest, experts=tuple(r for r in manifest.experts if (r.layer, r.expert) != (1, 3)))
    with pytest.raises(UnsupportedModelError, match=r"implies 4 experts in each of 2 MoE layers; the container has no "
                                                    r"\(layer 1, expert 3\)$"):  # fmt: skip
        check_tensors(args, missing, small)
    extra = replace(manifest, experts=(*manifest.experts, replace(manifest.experts[0], expert=4)))
    with pytest.raises(UnsupportedModelError, match=r"; the container holds \(layer 0, expert 4\)$"):
        check_tensors(args, extra, small)


# -- 3. prompts and the context ---------------------------------------------------------------------------------------


def test_a_prompt_past_the_context_is_refused_or_truncated(short_context):
    with engine(short_context) as e:
        long = list(range(3, 103))  # 100 tokens; the context is 64
        with pytest.raises(PromptError) as info:
            e.generate_tokens(long, SamplingOptions(max_new_tokens=4))
        assert str(info.value) == (
            "the prompt has 100 tokens and --max-new-tokens 4 asks for 4 more: 104 exceeds the model's context of "
            "64 tokens (use --truncate to keep the last 60 prompt tokens)"
        )
        with pytest.raises(PromptError, match="--max-new-tokens 64 leaves no room for a prompt in the model's context"):
            e.generate_tokens(PROMPT, SamplingOptions(max_new_tokens=64, truncate=True))
        truncated = e.generate_tokens(long, SamplingOptions(max_new_tokens=4, stop_at_eos=False, truncate=True))
        assert (truncated.prompt_tokens, truncated.dropped_tokens, len(truncated.tokens)) == (60, 40, 4)
        assert truncated.tokens == e.generate_tokens(long[40:], SamplingOptions(4, stop_at_eos=False)).tokens
        with pytest.raises(PromptError, match="token id 300, outside the model's vocabulary of 259"):
            e.generate_tokens([1, 300], SamplingOptions(max_new_tokens=1))


def test_cli_truncate_flag(capsys, short_context):
    prompt = "a long prompt " * 10  # 140 byte-level tokens
    code, _, err = run_cli(capsys, "run", str(short_context), prompt, "--device", "cpu", "-n", "4")
    assert_one_line_error(code, err, "the prompt has 140 tokens and --max-new-tokens 4 asks for 4 more")
    code, out, err = run_cli(capsys, "run", str(short_context), prompt, "--device", "cpu", "-n", "4", "--truncate",
                             "--json")  # fmt: skip
    doc = json.loads(out)
    assert code == 0 and (doc["prompt_tokens"], doc["dropped_prompt_tokens"]) == (60, 80)
    assert "--truncate: the prompt's first 80 tokens were left out" in err


def test_chunked_prefill_gives_the_logits_and_tokens_of_one_pass(tiny):
    with engine(tiny) as e:
        model = e.model
        whole = model.forward(torch.tensor(PROMPT), 0, one := model.new_cache(64))
        chunked = prefill(model, PROMPT, chunks := model.new_cache(64), chunk=7)
        assert torch.allclose(chunked, whole, rtol=0, atol=1e-5)
        assert torch.allclose(chunks.k, one.k, rtol=0, atol=1e-5) and torch.allclose(chunks.v, one.v, atol=1e-5)
        options = SamplingOptions(max_new_tokens=6, stop_at_eos=False)
        assert generate(model, PROMPT, options, prefill_chunk=7).tokens == generate(model, PROMPT, options).tokens


def test_a_long_prompt_is_prefilled_in_bounded_chunks(tiny):
    with engine(tiny) as e:
        calls = []
        forward = e.model.forward

        def spy(tokens, start, cache, **kwargs):
            calls.append((start, tokens.shape[0], cache.max_len))
            return forward(tokens, start, cache, **kwargs)

        e.model.forward = spy
        result = e.generate_tokens([i % 256 for i in range(1200)], SamplingOptions(max_new_tokens=2, stop_at_eos=False))
    assert result.prompt_tokens == 1200 and len(result.tokens) == 2
    prefill_calls = calls[:-1]
    assert [start for start, _, _ in prefill_calls] == list(range(0, 1200, 256))
    assert max(n for _, n, _ in calls) == 256 and calls[-1][:2] == (1200, 1)
    assert {size for _, _, size in calls} == {1202}  # the KV cache: prompt + new tokens, within the context


# -- 4. option values that used to crash --------------------------------------------------------------------------


# fmt: off
@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", str(2**70)], "--seed must be in 0..9223372036854775807 (2**63-1), got 1180591620717411303424"),
        (["--storage", "1e-300"], "--storage must be a finite positive bandwidth of at least 0.001"),
        (["--storage", "nan"], "--storage must be a finite positive bandwidth"),
        (["--storage", "inf"], "--storage must be a finite positive bandwidth"),
        (["--memory-budget", "9" * 400 + "B"], "size '9999999999999999999999999999999999999...' is too large (at most"),
        (["--memory-budget", "9" * 400], "--memory-budget 9999999999999999999999999999999999999...: give a unit"),
        (["--memory-budget", "1e400"], "cannot read size '1e400'"),
        (["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
        (["--mode", "garbage"], "unknown mode 'garbage' (choose lossless or qN-base; q8, q4 and dbsc need a container"),
        (["--mode", "q4"], "--mode q4: this container holds no AMAT slices (pack it with --slices 8:4)"),
        (["--max-new-tokens", "5000"], "--max-new-tokens 5000 leaves no room for a prompt in the model's context of"),
    ],
)
# fmt: on
def test_cli_run_bad_values_are_one_line_errors(capsys, tiny, args, message):
    code, out, err = run_cli(capsys, "run", str(tiny), "Hello", "--device", "cpu", *args)
    assert_one_line_error(code, err, message)


@pytest.mark.parametrize("option", ["--temperature", "--top-p", "--decoded-fraction", "--critical-threshold"])
def test_cli_nan_options_are_usage_errors(capsys, tiny, option):
    code, _, err = run_cli(capsys, "run", str(tiny), "Hello", "--device", "cpu", option, "nan")
    assert code == 2 and f"Invalid value for '{option}'" in err and "Traceback" not in err


def test_nan_options_are_refused_by_the_library_too():
    for kwargs in ({"temperature": float("nan")}, {"top_p": float("nan")}, {"seed": -1}, {"max_new_tokens": 0}):
        with pytest.raises(SamplingError):
            SamplingOptions(**kwargs)
    for kwargs in ({"tiers": "decoded=nan"}, {"critical_threshold": float("nan")}, {"warmup": "hot"},
                   {"tiers": "decoded=0.8,sm=0.8"}, {"tiers": "gpu=1"}, {"policy": "mru"}, {"io": "mmap"}):
        with pytest.raises(BudgetError):
            EngineOptions(**kwargs)


def test_cli_run_prompt_that_is_not_utf8(capsys, tiny):
    prompt = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")  # how Linux hands such argv bytes to Python
    code, _, err = run_cli(capsys, "run", str(tiny), prompt, "--device", "cpu")
    assert_one_line_error(code, err, "the prompt is not valid UTF-8")


def test_top_p_zero_keeps_the_top_token(tiny):
    with engine(tiny) as e:
        greedy = e.generate_tokens(PROMPT, SamplingOptions(max_new_tokens=8, stop_at_eos=False)).tokens
        nucleus = SamplingOptions(max_new_tokens=8, temperature=1.0, top_p=0.0, seed=5, stop_at_eos=False)
        assert e.generate_tokens(PROMPT, nucleus).tokens == greedy


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "garbage"], "unknown mode 'garbage' (choose lossless or qN-base"),
        (["--memory-budget", "9" * 400 + "GB"], "is too large (at most 2**63 bytes)"),
        (["--context", "5000"], "--context 5000 exceeds the model's context of 4096 tokens"),
    ],
)
def test_cli_eval_shares_the_validations(capsys, tiny, tmp_path, args, message):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox " * 10)
    code, _, err = run_cli(capsys, "eval", "ppl", str(tiny), "--text", str(text), "--device", "cpu", *args)
    assert_one_line_error(code, err, message)


# -- 5. generation_config.json: corrupt or malformed is an error, not silently ignored ----------------------------


@pytest.fixture(scope="module")
def demo_dir(checkpoints, tmp_path_factory):
    """A private copy of the tiny demo checkpoint, to pack with other generation configs."""
    target = tmp_path_factory.mktemp("generation") / "tiny"
    shutil.copytree(checkpoints.demo("tiny"), target)
    return target


@pytest.mark.parametrize(
    "content, error, message",
    [
        (b"{not json", FormatError, "embedded generation_config.json: not UTF-8 JSON (Expecting property name"),
        (b"[[[[", FormatError, "embedded generation_config.json: not UTF-8 JSON"),
        (b"[2]", FormatError, "embedded generation_config.json: expected a JSON object, got list"),
        (b'{"eos_token_id": "x"}', UnsupportedModelError, "generation_config.json: 'eos_token_id' must be a token id"),
        (b'{"eos_token_id": [2, 99999]}', UnsupportedModelError, "in 0..258 or a list of them, got [2, 99999]"),
    ],
)
def test_a_malformed_generation_config_is_an_error(demo_dir, tmp_path, capsys, content, error, message):
    (demo_dir / "generation_config.json").write_bytes(content)
    out = tmp_path / "g.zmoe"
    pack(str(demo_dir), out, PackOptions(verify=False))
    with pytest.raises(error) as info:
        engine(out)
    assert message in str(info.value) and "\n" not in str(info.value)
    code, _, err = run_cli(capsys, "run", str(out), "Hello", "--device", "cpu", "-n", "1")
    assert_one_line_error(code, err, message)


def test_a_corrupt_generation_config_is_a_checksum_error(tiny, tmp_path):
    from zipmoe.formats.reader import Container

    path = copy_of(tiny, tmp_path)
    with Container(path) as c:
        blob = next(f.blob for f in c.manifest.files if f.name == "generation_config.json")
    data = bytearray(path.read_bytes())
    data[blob.offset + blob.nbytes - 1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        engine(path)
