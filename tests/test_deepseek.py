"""DeepSeek-V2 and V3 in the runtime: latent attention, YaRN, group-limited and noaux_tc routing, shared experts,
the MTP layer; logits and tokens against transformers, bit-identical serving from a container, config errors."""

import json

import numpy as np
import pytest
import torch

from conftest import DEEPSEEK, assert_matches_transformers, assert_one_line_error, copy_of, rewrite_manifest, run_cli
from zipmoe.runtime.block_args import RouterArgs
from zipmoe.runtime.config import ModelArgs, UnsupportedModelError, config_problems
from zipmoe.runtime.engine import Engine, EngineOptions, expert_bytes_summary
from zipmoe.runtime.generate import SamplingOptions, generate
from zipmoe.runtime.model import InMemoryExperts, Transformer
from zipmoe.runtime.router import choose_experts, routing_weights
from zipmoe.runtime.weights import load_checkpoint

FAMILIES = sorted(DEEPSEEK)
PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64]
CPU = torch.device("cpu")


def engine(path, **options) -> Engine:
    return Engine(path, EngineOptions(device="cpu", dtype="float32", threads=1, **options))


def reference_model(path):
    torch.set_num_threads(1)  # as `engine` computes: another thread count may sum a matmul in another order
    args, dense, experts = load_checkpoint(path, CPU, torch.float32)
    return Transformer(args, dense, InMemoryExperts(experts))


def greedy(model, n=16):
    return generate(model, PROMPT, SamplingOptions(max_new_tokens=n, stop_at_eos=False)).tokens


def config_of(source) -> dict:
    return json.loads((source / "config.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers(checkpoints, family):
    source = checkpoints.deepseek(family)
    assert_matches_transformers(reference_model(source), source, PROMPT)


@pytest.mark.parametrize("family", FAMILIES)
def test_container_serves_the_same_bits_as_the_safetensors(checkpoints, family):
    source = checkpoints.deepseek(family)
    ref = reference_model(source)
    tokens = torch.tensor(PROMPT)
    expected = ref.forward(tokens, 0, ref.new_cache(32), all_logits=True)
    expected_tokens = greedy(ref)
    for packed in (checkpoints.packed(source), checkpoints.packed(checkpoints.deepseek(family, fused=True))):
        with engine(packed) as e:
            minimum = e.cache_minimum()
        for options in ({}, {"memory_budget": minimum}):
            with engine(packed, **options) as e:
                logits = e.model.forward(tokens, 0, e.model.new_cache(32), all_logits=True)
                assert torch.equal(logits, expected), (packed.name, options)
                assert greedy(e.model) == expected_tokens, (packed.name, options)
                if options:
                    assert e.pipeline.stats.served_from["storage"] > 0 and e.pipeline.stats.peak_bytes <= e.budget


def test_latent_cache_holds_the_latent_and_the_rope_key(checkpoints):
    model = reference_model(checkpoints.deepseek("deepseek_v2"))
    a = model.args
    cache = model.new_cache(16)
    assert cache.latent.shape == (3, 16, 16) and cache.rope_key.shape == (3, 16, 8)
    # kv_lora_rank + qk_rope_head_dim float32 values per layer, against 2 x heads x (8 + 8 or 12) for plain K/V
    assert model.cache_bytes_per_token == a.n_layers * (16 + 8) * 4 == 288
    model.forward(torch.tensor(PROMPT), 0, cache)
    assert cache.latent[:, : len(PROMPT)].abs().sum() > 0 and cache.latent[:, len(PROMPT) :].abs().sum() == 0
    # decoding token by token after a prefill gives the logits of one pass over the whole sequence
    whole = model.forward(torch.tensor(PROMPT + [11, 12]), 0, model.new_cache(16), all_logits=True)
    cache = model.new_cache(16)
    model.forward(torch.tensor(PROMPT), 0, cache)
    model.forward(torch.tensor([11]), len(PROMPT), cache)
    assert torch.allclose(model.forward(torch.tensor([12]), len(PROMPT) + 1, cache), whole[-1], rtol=0, atol=1e-5)


def test_run_reports_cache_bytes_per_token(checkpoints):
    with engine(checkpoints.packed(checkpoints.deepseek("deepseek_v3"))) as e:
        assert expert_bytes_summary(e)["kv_cache_bytes_per_token"] == 3 * (16 + 8) * 4


class Recorder:
    """Every MoE layer's chosen experts, as sets per token."""

    def __init__(self) -> None:
        self.choices = []

    def record(self, layer_position, top_index) -> None:
        self.choices.append(np.sort(top_index, axis=1))


def test_correction_bias_changes_which_experts_are_chosen(checkpoints):
    """V3 chooses by score + e_score_correction_bias: the test checkpoint's bias changes some choices, so a runtime
    that ignored it could not match transformers."""
    source = checkpoints.deepseek("deepseek_v3")
    args, dense, experts = load_checkpoint(source, CPU, torch.float32)
    choices = []
    for bias_scale in (1.0, 0.0):
        weights = {k: v * bias_scale if k.endswith("e_score_correction_bias") else v for k, v in dense.items()}
        model = Transformer(args, weights, InMemoryExperts(experts))
        model.recorder = Recorder()
        model.forward(torch.tensor(PROMPT), 0, model.new_cache(16))
        choices.append(model.recorder.choices)
    assert len(choices[0]) == 2 and any((with_bias != without).any() for with_bias, without in zip(*choices))


def test_group_limited_greedy_picks_within_the_best_groups():
    router = RouterArgs(method="group_limited_greedy", n_group=3, topk_group=2)
    # groups {0,1} {2,3} {4,5}, scored by their best expert: 0.30, 0.25, 0.20 -> experts 4 and 5 are out
    scores = torch.tensor([[0.30, 0.01, 0.25, 0.02, 0.20, 0.19]])
    assert choose_experts(router, scores, 3).tolist() == [[0, 2, 3]]
    assert choose_experts(RouterArgs(), scores, 3).tolist() == [[0, 2, 4]]  # greedy


def test_noaux_tc_chooses_by_biased_scores_and_weighs_by_unbiased_ones():
    router = RouterArgs(scoring="sigmoid", method="noaux_tc", n_group=2, topk_group=1, scaling=2.5,
                        float32_weights=True, renorm_epsilon=1e-20)  # fmt: skip
    scores = torch.tensor([[0.8, 0.1, 0.6, 0.5]])  # groups {0,1}: top-2 sum 0.9; {2,3}: 1.1
    assert choose_experts(router, scores, 2).tolist() == [[2, 3]]
    bias = torch.tensor([0.0, 0.3, 0.0, 0.0])  # {0,1} now sums to 1.2
    index = choose_experts(router, scores, 2, bias)
    assert index.tolist() == [[0, 1]]
    weights, raw = routing_weights(router, scores, index, True, torch.bfloat16)
    assert raw[0].tolist() == pytest.approx([0.8, 0.1])  # the bias chose, it does not weigh
    assert weights.dtype == torch.float32 and weights[0].tolist() == pytest.approx([0.8 / 0.9 * 2.5, 0.1 / 0.9 * 2.5])


def test_v2_scales_or_renormalises_as_deepseek_does():
    base = {"model_type": "deepseek_v2", **{k: v for k, v in DEEPSEEK["deepseek_v2"][1].items()}}
    base |= {"vocab_size": 300, "hidden_size": 64, "num_attention_heads": 4}
    scaled = ModelArgs.from_hf_config(base)
    assert (scaled.router.scaling, scaled.norm_topk_prob) == (2.0, False)
    renormalised = ModelArgs.from_hf_config({**base, "norm_topk_prob": True})
    assert (renormalised.router.scaling, renormalised.norm_topk_prob) == (1.0, True)


def test_mtp_layer_is_packed_and_ignored_by_run(checkpoints, tmp_path):
    source = checkpoints.deepseek("deepseek_v3")
    packed = checkpoints.packed(source)
    with engine(packed) as e:
        assert sorted({layer for layer, _ in e.container.experts}) == [1, 2, 3]  # layer 3: the MTP layer
        assert e.args.n_layers == 3 and not any(name.startswith("model.layers.3.") for name in e.dense)
        assert e.n_experts == 2 * 8 and expert_bytes_summary(e)["n_experts"] == 16  # the MTP layer's 8 are not run
    no_mtp = copy_of(packed, tmp_path)
    rewrite_manifest(no_mtp, lambda doc: doc["config"].update(num_nextn_predict_layers=0))
    with pytest.raises(UnsupportedModelError, match="config.json says 3 layers, the container holds tensors for 4"):
        engine(no_mtp)


V2 = {"model_type": "deepseek_v2", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 3,
      "num_attention_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
      "intermediate_size": 64, "first_k_dense_replace": 1, "q_lora_rank": None, "kv_lora_rank": 16,
      "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8}  # fmt: skip
V3 = {**V2, "model_type": "deepseek_v3", "q_lora_rank": 24, "n_group": 4, "topk_group": 2}


@pytest.mark.parametrize(
    "config, message",
    [
        ({**V2, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
         "rope_type 'dynamic' is not supported for deepseek_v2 (supported: 'default', 'yarn')"),
        ({**V2, "rope_scaling": {"type": "yarn"}}, "config.json rope_scaling: 'factor' is missing"),
        ({**V2, "rope_scaling": {"type": "yarn", "factor": -1}}, "'factor' must be a finite number > 0, got -1"),
        ({**V2, "topk_method": "noaux_tc"}, "'topk_method' must be one of greedy, group_limited_greedy, got 'noaux_tc'"),
        ({**V2, "scoring_func": "sigmoid"}, "'scoring_func' must be one of softmax, got 'sigmoid'"),
        ({**V2, "topk_method": "group_limited_greedy"}, "'n_group' is missing (topk_method 'group_limited_greedy'"),
        ({**V2, "topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1},
         "'n_group' must be a divisor of n_routed_experts (8), got 3"),
        ({**V2, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 5},
         "'topk_group' must be an integer in 1..4, got 5"),
        ({**V3, "topk_method": "group_limited_greedy"}, "'topk_method' must be one of noaux_tc, got 'group_limit"),
        ({**V3, "scoring_func": "softmax"}, "'scoring_func' must be one of sigmoid, got 'softmax'"),
        ({**V3, "n_group": 8}, "'n_group' must be at most n_routed_experts / 2 (4): noaux_tc scores a group by"),
        ({**V3, "num_experts_per_tok": 5}, "'num_experts_per_tok' must be at most topk_group x experts per group (4)"),
        ({**V2, "first_k_dense_replace": 3}, "'first_k_dense_replace' must be below num_hidden_layers (3)"),
        ({**V2, "moe_layer_freq": 2}, "'moe_layer_freq' must be an integer in 1..1, got 2"),
        ({**V2, "qk_rope_head_dim": 7}, "'qk_rope_head_dim' must be even"),
        ({**V2, "q_lora_rank": "x"}, "'q_lora_rank' must be an integer"),
        ({**V2, "intermediate_size": None}, "'intermediate_size' must be a positive integer: the first first_k_dense"),
    ],
)  # fmt: skip
def test_config_problems_name_the_key_expected_and_got(config, message):
    problems = config_problems(config)
    assert problems and message in problems[0], problems
    with pytest.raises(UnsupportedModelError, match="^config.json"):
        ModelArgs.from_hf_config(config)


def test_good_configs_have_no_problems():
    assert config_problems(V2) == [] and config_problems(V3) == []
    v3 = ModelArgs.from_hf_config(V3)
    assert (v3.router.method, v3.router.scoring, v3.router.scaling, v3.norm_topk_prob) == ("noaux_tc", "sigmoid",
                                                                                          2.5, True)  # fmt: skip
    assert v3.sparse_layers == (False, True, True) and v3.mtp_layers == 1 and v3.mla.rope_layout == "interleaved"


def test_run_refuses_an_unsupported_rope_type_in_one_line(checkpoints, tmp_path, capsys):
    packed = copy_of(checkpoints.packed(checkpoints.deepseek("deepseek_v2")), tmp_path)
    rewrite_manifest(packed, lambda doc: doc["config"].update(rope_parameters={"rope_type": "longrope"}))
    code, _, err = run_cli(capsys, "run", str(packed), "hello", "-n", "1", "--device", "cpu")
    assert_one_line_error(code, err, "rope_type 'longrope' is not supported for deepseek_v2")


def test_routers_stay_float32_in_a_bfloat16_run(checkpoints):
    packed = checkpoints.packed(checkpoints.deepseek("deepseek_v3"))
    with Engine(packed, EngineOptions(device="cpu", dtype="bfloat16")) as e:
        assert e.dense["model.layers.1.mlp.gate.weight"].dtype == torch.float32
        assert e.dense["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
        assert e.dense["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
        assert e.model.cache_bytes_per_token == 3 * (16 + 8) * 2
        assert len(greedy(e.model, 4)) == 4
