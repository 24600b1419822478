"""Every family zipmoe recognises, as transformers saves it: pack, verify against the source, unpack identically."""

import hashlib

import pytest

from conftest import FAMILIES, N_EXPERTS
from zipmoe.formats.reader import Container
from zipmoe.pack import pack
from zipmoe.unpack import unpack
from zipmoe.verify import verify

# Routed-expert tensors per (layer, expert): Mixtral w1/w2/w3, the others gate/up/down projections.
EXPERT_LAYERS = {"deepseek_v2": [1], "deepseek_v3": [1]}  # first_k_dense_replace=1: layer 0 is a dense MLP


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_roundtrip(source, tmp_path, family):
    out = tmp_path / f"{family}.zmoe"
    result = pack(str(source), out)
    assert result.family == family
    report = verify(out, str(source))
    assert report.ok, report.failures
    back = tmp_path / "unpacked"
    unpack(out, back)
    for f in sorted(source.iterdir()):
        assert digest(back / f.name) == digest(f), f.name
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_expert_checkpoints(checkpoints, tmp_path, family):
    source = checkpoints.family(family)
    out = check_roundtrip(source, tmp_path, family)
    layers = EXPERT_LAYERS.get(family, [0, 1])
    with Container(out) as c:
        assert sorted(c.experts) == [(layer, e) for layer in layers for e in range(N_EXPERTS)]
        for record in c.manifest.experts:
            assert len(record.members) == 3
        dense = [t.name for t in c.dense_tensors()]
        assert not any(".experts." in name and "shared" not in name for name in dense)
        if family in ("qwen2_moe", "deepseek_v2", "deepseek_v3"):
            assert any("shared_expert" in name for name in dense)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fused_checkpoints(checkpoints, tmp_path, family):
    source = checkpoints.family(family, fused=True)
    out = check_roundtrip(source, tmp_path, family)
    with Container(out) as c:
        fused = [t for t in c.manifest.tensors if t.fused]
        assert {t.name.rsplit(".", 1)[-1] for t in fused} == {"gate_up_proj", "down_proj"}
        assert all(len(t.parts) == N_EXPERTS for t in fused)
        members = c.read_expert(1, 3)
        assert sorted(m.tensor.name.rsplit(".", 1)[-1] for m in members) == ["down_proj", "gate_up_proj"]
        for member in members:
            whole = c.read_tensor(member.tensor.name)
            size = member.data.size
            assert member.part == 3 and whole[3 * size : 4 * size].tobytes() == member.data.tobytes()


def test_sharded_checkpoint_with_index(checkpoints, tmp_path):
    source = checkpoints.family("olmoe", max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").is_file()
    out = check_roundtrip(source, tmp_path, "olmoe")
    with Container(out) as c:
        assert len(c.manifest.safetensors) == len(list(source.glob("*.safetensors"))) > 1
        assert "model.safetensors.index.json" in [f.name for f in c.manifest.files]


@pytest.mark.parametrize("preset", ["tiny", "tiny-deepseek"])
def test_demo_checkpoints_are_what_transformers_builds(tmp_path, preset):
    """A demo checkpoint of each architecture loads in transformers with no missing or unexpected tensor, and the
    runtime built from it gives transformers' logits and greedy tokens (the family module wrote its config)."""
    import torch
    import transformers

    from conftest import assert_matches_transformers
    from zipmoe.demo import build_demo_checkpoint
    from zipmoe.runtime.weights import load_checkpoint
    from zipmoe.runtime.model import InMemoryExperts, Transformer

    source = build_demo_checkpoint(tmp_path / preset, preset)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(source, output_loading_info=True)
    assert not any(info.values()), info
    args, dense, experts = load_checkpoint(source, torch.device("cpu"), torch.float32)
    assert args.family == {"tiny": "mixtral", "tiny-deepseek": "deepseek_v2"}[preset]
    assert_matches_transformers(Transformer(args, dense, InMemoryExperts(experts)), source, [256, 72, 105, 33, 10])
