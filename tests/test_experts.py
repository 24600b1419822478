"""Which tensors are routed experts, per architecture and layout."""

from zipmoe.formats.experts import ExpertTensor, classify
from zipmoe.formats.safetensors_file import SourceTensor


def tensors(*specs):
    return [
        SourceTensor(name, "BF16", tuple(shape), 0, 2 * int(__import__("math").prod(shape))) for name, shape in specs
    ]


def test_mixtral_per_expert():
    layout = classify(
        {"model_type": "mixtral", "num_local_experts": 8, "num_hidden_layers": 2},
        tensors(
            ("model.layers.1.block_sparse_moe.experts.7.w2.weight", (4, 2)),
            ("model.layers.1.block_sparse_moe.gate.weight", (8, 4)),
            ("model.layers.0.self_attn.q_proj.weight", (4, 4)),
        ),
    )
    assert layout.family == "mixtral" and layout.n_experts == 8
    assert layout.experts == {"model.layers.1.block_sparse_moe.experts.7.w2.weight": ExpertTensor(1, 7)}
    assert layout.warnings == ()


def test_shared_experts_stay_dense():
    for model_type, key in (("qwen2_moe", "num_experts"), ("deepseek_v3", "n_routed_experts")):
        layout = classify(
            {"model_type": model_type, key: 4},
            tensors(
                ("model.layers.3.mlp.experts.2.gate_proj.weight", (2, 4)),
                ("model.layers.3.mlp.shared_expert.gate_proj.weight", (2, 4)),
                ("model.layers.3.mlp.shared_experts.up_proj.weight", (2, 4)),
                ("model.layers.3.mlp.shared_expert_gate.weight", (1, 4)),
                ("model.layers.3.mlp.gate.e_score_correction_bias", (4,)),
            ),
        )
        assert list(layout.experts) == ["model.layers.3.mlp.experts.2.gate_proj.weight"]


def test_fused_tensors():
    layout = classify(
        {"model_type": "qwen3_moe", "num_experts": 4},
        tensors(
            ("model.layers.0.mlp.experts.gate_up_proj", (4, 6, 8)),
            ("model.layers.0.mlp.experts.down_proj", (4, 8, 3)),
            ("model.layers.1.mlp.experts.down_proj", (5, 8, 3)),  # not [n_experts, ...]
        ),
    )
    assert layout.experts == {
        "model.layers.0.mlp.experts.gate_up_proj": ExpertTensor(0, None),
        "model.layers.0.mlp.experts.down_proj": ExpertTensor(0, None),
    }
    assert any("not [4, ...]" in w for w in layout.warnings)


def test_unknown_architecture_is_all_dense_with_a_warning():
    layout = classify({"model_type": "llama"}, tensors(("model.layers.0.mlp.experts.0.w1.weight", (2, 2))))
    assert layout.experts == {} and layout.family is None
    assert "unknown architecture 'llama'" in layout.warnings[0] and "as dense" in layout.warnings[0]


def test_missing_config_or_expert_count():
    assert "no config.json" in classify(None, []).warnings[0]
    layout = classify({"model_type": "olmoe"}, tensors(("model.layers.0.mlp.experts.0.up_proj.weight", (2, 2))))
    assert layout.experts == {} and "no valid 'num_experts'" in layout.warnings[0]
    layout = classify(
        {"model_type": "olmoe", "num_experts": 2}, tensors(("model.layers.0.mlp.experts.5.up_proj.weight", (2, 2)))
    )
    assert layout.experts == {} and "expert 5 >= num_experts=2" in layout.warnings[0]
