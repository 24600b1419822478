"""A built-in, offline MoE checkpoint: Mixtral architecture, random init, Hugging Face layout.

`build_demo_checkpoint` writes what ``MixtralForCausalLM.from_config(...).save_pretrained(dir)`` would: a
``config.json``, a ``generation_config.json``, BF16 weights initialised like transformers does (normal, std 0.02;
norms at one) in ``model.safetensors`` or shards with a ``model.safetensors.index.json``, and a byte-level BPE
tokenizer (256 byte tokens plus ``<s>``, ``</s>``, ``<pad>``). No network, no transformers needed. Random weights
compress like freshly initialised ones, not like trained ones; `zipmoe bench codecs` takes any checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zipmoe.errors import OutputError

BYTE_VOCAB = 256
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


@dataclass(frozen=True)
class Preset:
    """Dimensions of a demo model."""

    hidden: int
    intermediate: int
    layers: int
    experts: int
    heads: int
    kv_heads: int
    max_shard_bytes: int


PRESETS = {
    # Fast enough for unit tests.
    "tiny": Preset(hidden=128, intermediate=256, layers=2, experts=4, heads=4, kv_heads=2, max_shard_bytes=1 << 30),
    # `make demo`: ~120 MB in three shards.
    "small": Preset(hidden=512, intermediate=1024, layers=4, experts=8, heads=8, kv_heads=4, max_shard_bytes=50 << 20),
    # `zipmoe bench`: Qwen1.5-MoE-A2.7B expert shapes (2048 x 1408), 6 experts, one layer.
    "bench": Preset(
        hidden=2048, intermediate=1408, layers=1, experts=6, heads=16, kv_heads=16, max_shard_bytes=1 << 30
    ),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte maps to a printable character."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def tokenizer_json() -> dict:
    """A byte-level BPE ``tokenizer.json`` (no merges) that the ``tokenizers`` library loads."""
    alphabet = sorted(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    added = [
        {"id": BYTE_VOCAB + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    ]  # fmt: skip
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": [],
        },
    }  # fmt: skip


def mixtral_config(preset: Preset) -> dict:
    vocab = BYTE_VOCAB + len(SPECIAL_TOKENS)
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab,
        "hidden_size": preset.hidden,
        "intermediate_size": preset.intermediate,
        "num_hidden_layers": preset.layers,
        "num_attention_heads": preset.heads,
        "num_key_value_heads": preset.kv_heads,
        "head_dim": preset.hidden // preset.heads,
        "num_local_experts": preset.experts,
        "num_experts_per_tok": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": BYTE_VOCAB,
        "eos_token_id": BYTE_VOCAB + 1,
        "pad_token_id": BYTE_VOCAB + 2,
        "torch_dtype": "bfloat16",
    }


def _shapes(preset: Preset) -> dict[str, tuple[int, ...]]:
    h, i, head_dim = preset.hidden, preset.intermediate, preset.hidden // preset.heads
    vocab = BYTE_VOCAB + len(SPECIAL_TOKENS)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for layer in range(preset.layers):
        p = f"model.layers.{layer}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (preset.heads * head_dim, h)
        shapes[f"{p}.self_attn.k_proj.weight"] = (preset.kv_heads * head_dim, h)
        shapes[f"{p}.self_attn.v_proj.weight"] = (preset.kv_heads * head_dim, h)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, preset.heads * head_dim)
        shapes[f"{p}.block_sparse_moe.gate.weight"] = (preset.experts, h)
        for e in range(preset.experts):
            shapes[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = (i, h)
            shapes[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = (h, i)
            shapes[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = (i, h)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    return shapes


def build_demo_checkpoint(out_dir: Path, preset: str = "small", seed: int = 0, force: bool = False) -> Path:
    """Write a random-init Mixtral checkpoint in Hugging Face layout to ``out_dir``; return the directory.

    Raises:
        OutputError: ``out_dir`` is not empty (without ``force``) or cannot be written.
    """
    import torch
    from safetensors.torch import save_file

    if preset not in PRESETS:
        raise OutputError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    spec = PRESETS[preset]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise OutputError(f"{out_dir} is not empty (use --force to overwrite)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob("*.safetensors"):
            old.unlink()
        generator = torch.Generator().manual_seed(seed)
        tensors = {}
        for name, shape in _shapes(spec).items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shards = _shard(tensors, spec.max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for k, shard in enumerate(shards, start=1):
                name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, out_dir / name, metadata={"format": "pt"})
                weight_map.update({t: name for t in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            _write_json(
                out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
            )
        config = mixtral_config(spec)
        _write_json(out_dir / "config.json", config)
        _write_json(
            out_dir / "generation_config.json",
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False},
        )
        _write_json(out_dir / "tokenizer.json", tokenizer_json())
        _write_json(
            out_dir / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "model_max_length": 4096,
                "chat_template": _CHAT_TEMPLATE,
            },
        )  # fmt: skip
    except OSError as exc:
        raise OutputError(f"cannot write {out_dir}: {exc.strerror or exc}") from None
    return out_dir


_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _shard(tensors: dict, max_bytes: int) -> list[dict]:
    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def cached_demo_checkpoint(preset: str) -> Path:
    """The demo checkpoint of ``preset`` under the user cache directory, built on first use."""
    import os

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zipmoe" / f"demo-{preset}"
    if not (cache / "config.json").is_file():
        build_demo_checkpoint(cache, preset, force=True)
    return cache
