"""Shared fixtures: locally built checkpoints (no network), hypothesis profiles, helpers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub: tests never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from zipmoe.quant.spec import SliceSpec

settings.register_profile("default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("expensive", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Tiny configs of every family zipmoe recognises, as transformers builds them.
COMMON = dict(
    vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, intermediate_size=64)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         intermediate_size=64, head_dim=16)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32)),
    "deepseek_v2": ("DeepseekV2Config", dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                             moe_intermediate_size=32, intermediate_size=64, first_k_dense_replace=1,
                                             kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)),
    "deepseek_v3": ("DeepseekV3Config", dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                             moe_intermediate_size=32, intermediate_size=64, first_k_dense_replace=1,
                                             kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=8, n_group=2, topk_group=1)),
}  # fmt: skip
N_EXPERTS = 4

# DeepSeek configs the runtime is compared with transformers on (its MLA needs as many key/value heads as heads):
# V2 with YaRN, no q_lora and group-limited routing; V3 with q_lora, YaRN as V3 sets it, noaux_tc routing, and one
# multi-token-prediction layer after the last (its tensors written by hand: transformers does not build it).
DEEPSEEK = {
    "deepseek_v2": ("DeepseekV2Config", dict(
        num_key_value_heads=4, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, moe_intermediate_size=32, intermediate_size=64, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, routed_scaling_factor=2.0, max_position_embeddings=128,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 0.8, "original_max_position_embeddings": 32},
    )),
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_key_value_heads=4, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=3, moe_intermediate_size=32, intermediate_size=64, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, n_group=4, topk_group=2, max_position_embeddings=128,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 32},
    )),
}  # fmt: skip


def build_deepseek(family: str, out: Path, *, fused: bool = False) -> Path:
    """A random-init BF16 DeepSeek checkpoint (`DEEPSEEK`) written by transformers, or with ``fused`` its in-memory
    state dict (fused 3-D experts). V3's routers get an ``e_score_correction_bias`` large enough to change which
    experts are chosen, and an MTP layer's tensors follow the last layer."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    cls, kwargs = DEEPSEEK[family]
    config = getattr(transformers, cls)(**{**COMMON, **kwargs})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if family == "deepseek_v3":
        with torch.no_grad():
            for layer in model.model.layers[config.first_k_dense_replace :]:
                layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.02, 0.02, config.n_routed_experts))
    if fused:
        out.mkdir(parents=True)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        config.save_pretrained(out)
    else:
        model.save_pretrained(out)
        tensors = load_file(out / "model.safetensors")
    if family == "deepseek_v3":  # the MTP layer, as DeepSeek-V3 stores it (a full decoder layer plus projections)
        mtp, h = f"model.layers.{config.num_hidden_layers}.", config.hidden_size
        for name, tensor in list(tensors.items()):
            if name.startswith(f"model.layers.{config.num_hidden_layers - 1}."):
                tensors[mtp + name.split(".", 3)[3]] = tensor.clone()
        tensors |= {mtp + "eh_proj.weight": torch.zeros(h, 2 * h, dtype=torch.bfloat16),
                    mtp + "enorm.weight": torch.ones(h, dtype=torch.bfloat16),
                    mtp + "hnorm.weight": torch.ones(h, dtype=torch.bfloat16)}  # fmt: skip
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def build_family(family: str, out: Path, *, fused: bool = False, max_shard_size: str | None = None) -> Path:
    """A random-init BF16 checkpoint of ``family`` written by transformers (``save_pretrained``), or, with
    ``fused``, its in-memory state dict (fused 3-D expert tensors) written with safetensors."""
    import torch
    import transformers
    from safetensors.torch import save_file

    cls, kwargs = FAMILIES[family]
    config = getattr(transformers, cls)(**COMMON, **kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if fused:
        out.mkdir(parents=True)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            out / "model.safetensors",
            metadata={"format": "pt"},
        )
        config.save_pretrained(out)
    elif max_shard_size:
        model.save_pretrained(out, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("checkpoints"))


class CheckpointFactory:
    """Builds each checkpoint once per session; tests get a private copy when they intend to modify it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def family(self, family: str, *, fused: bool = False, max_shard_size: str | None = None) -> Path:
        name = family + ("-fused" if fused else "") + (f"-sharded-{max_shard_size}" if max_shard_size else "")
        path = self.root / name
        if not path.exists():
            build_family(family, path, fused=fused, max_shard_size=max_shard_size)
        return path

    def deepseek(self, family: str, *, fused: bool = False) -> Path:
        path = self.root / (f"{family}-runtime" + ("-fused" if fused else ""))
        if not path.exists():
            build_deepseek(family, path, fused=fused)
        return path

    def demo(self, preset: str = "tiny") -> Path:
        from zipmoe.demo import build_demo_checkpoint

        path = self.root / f"demo-{preset}"
        if not path.exists():
            build_demo_checkpoint(path, preset)
        return path

    def packed(self, source: Path, slices: SliceSpec | None = None) -> Path:
        """The container of ``source`` packed with default options, and AMAT ``slices`` if given (cached)."""
        from zipmoe.pack import PackOptions, pack

        suffix = f"-slices-{slices.high_bits}-{slices.low_bits}-{slices.group_size}" if slices else ""
        out = self.root / f"{source.name}{suffix}.zmoe"
        if not out.exists():
            pack(str(source), out, PackOptions(slices=slices))
        return out


def copy_of(path: Path, tmp_path: Path) -> Path:
    """A private copy of a file or directory."""
    target = tmp_path / path.name
    if path.is_dir():
        shutil.copytree(path, target)
    else:
        shutil.copy(path, target)
    return target


def write_safetensors(
    path: Path,
    tensors: dict[str, tuple[str, list[int], bytes]],
    *,
    metadata=None,
    header_suffix: bytes = b"",
    data_prefix: bytes = b"",
    data_suffix: bytes = b"",
) -> Path:
    """A safetensors file written by hand (any dtype, optional holes), to test what real writers may produce."""
    header: dict = {}
    data = bytearray(data_prefix)
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    blob = json.dumps(header).encode() + header_suffix
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(data) + data_suffix)
    return path


def bf16_bytes(shape: tuple[int, ...], seed: int = 0, std: float = 0.02) -> bytes:
    """Random BF16 values (round-to-nearest-even from float32) as little-endian bytes."""
    rng = np.random.default_rng(seed)
    f32 = (rng.standard_normal(int(np.prod(shape))) * std).astype(np.float32).view(np.uint32)
    return ((f32 + 0x7FFF + ((f32 >> 16) & 1)) >> 16).astype("<u2").tobytes()


def rewrite_manifest(path: Path, mutate=None, *, edit_text=None) -> None:
    """Apply ``mutate`` to a container's manifest JSON (or ``edit_text`` to its text, for JSON that `json` cannot
    write) and write it back with valid checksums."""
    from zipmoe.codecs.checksum import checksum
    from zipmoe.formats.constants import HEADER_NBYTES
    from zipmoe.formats.header import FileHeader

    data = bytearray(path.read_bytes())
    header = FileHeader.unpack(bytes(data[:HEADER_NBYTES]), len(data), str(path))
    if edit_text is not None:
        manifest = edit_text(bytes(data[header.manifest_offset :]).decode()).encode("utf-8", "surrogateescape")
    else:
        doc = json.loads(data[header.manifest_offset :])
        mutate(doc)
        manifest = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    new_header = FileHeader(
        header.alignment,
        header.manifest_offset + len(manifest),
        header.manifest_offset,
        len(manifest),
        checksum(manifest),
        header.format_version,
    )
    path.write_bytes(new_header.pack() + bytes(data[HEADER_NBYTES : header.manifest_offset]) + manifest)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``zipmoe ARGS`` in-process: (exit status, stdout, stderr)."""
    from zipmoe.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code, err, *fragments):
    """A CLI failure as users must see it: exit status 1 and one line ``Error: ...`` holding every fragment."""
    assert code == 1
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err and "internal error" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def assert_matches_transformers(ours, source: Path, prompt: list[int]) -> None:
    """The runtime model ``ours`` (built from checkpoint ``source``) gives transformers' logits in float32 within
    1e-5 on ``prompt``, and the same 16 greedy tokens."""
    import torch
    import transformers

    from zipmoe.runtime.generate import SamplingOptions, generate

    theirs = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tokens = torch.tensor(prompt)
    logits = ours.forward(tokens, 0, ours.new_cache(32), all_logits=True)
    with torch.no_grad():
        expected = theirs(tokens[None]).logits[0]
    assert torch.allclose(logits, expected, rtol=0, atol=1e-5), (logits - expected).abs().max()
    reference_tokens = theirs.generate(tokens[None], max_new_tokens=16, do_sample=False)[0, len(prompt) :].tolist()
    assert generate(ours, prompt, SamplingOptions(max_new_tokens=16, stop_at_eos=False)).tokens == reference_tokens
