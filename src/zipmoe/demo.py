"""Built-in, offline MoE checkpoints: Mixtral, Qwen2-MoE or DeepSeek-V2 architecture, random init, Hugging Face
layout.

`build_demo_checkpoint` writes what ``AutoModelForCausalLM.from_config(...).save_pretrained(dir)`` would: a
``config.json``, a ``generation_config.json``, BF16 weights initialised like transformers does (normal, std 0.02;
norms at one) in ``model.safetensors`` or shards with a ``model.safetensors.index.json``, and a byte-level BPE
tokenizer (256 byte tokens plus ``<s>``, ``</s>``, ``<pad>``). No network, no torch or transformers needed: numpy
draws the weights. Random weights compress like freshly initialised ones, not like trained ones; `zipmoe bench
codecs` takes any checkpoint.
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
    intermediate: int  # of each routed expert
    layers: int
    experts: int
    heads: int
    kv_heads: int
    max_shard_bytes: int
    family: str = "mixtral"  # a family of `zipmoe.families`: its module writes the family's config keys
    top_k: int = 2
    shared_intermediate: int = 0  # shared expert(s), in all


PRESETS = {
    # Fast enough for unit tests.
    "tiny": Preset(hidden=128, intermediate=256, layers=2, experts=4, heads=4, kv_heads=2, max_shard_bytes=1 << 30),
    # The DeepSeek-V2 architecture (multi-head latent attention, shared experts) at the size of "tiny".
    "tiny-deepseek": Preset(
        hidden=128,
        intermediate=128,
        layers=2,
        experts=8,
        heads=4,
        kv_heads=4,
        max_shard_bytes=1 << 30,
        family="deepseek_v2",
        top_k=2,
        shared_intermediate=256,
    ),  # fmt: skip
    # `make demo`: ~120 MB in three shards.
    "small": Preset(hidden=512, intermediate=1024, layers=4, experts=8, heads=8, kv_heads=4, max_shard_bytes=50 << 20),
    # `zipmoe bench codecs`: Qwen1.5-MoE-A2.7B expert shapes (2048 x 1408), 6 experts, one layer.
    "bench": Preset(
        hidden=2048, intermediate=1408, layers=1, experts=6, heads=16, kv_heads=16, max_shard_bytes=1 << 30
    ),
    # `zipmoe bench run`: Qwen1.5-MoE-A2.7B (Qwen2-MoE architecture, 60 experts of 2048 x 1408, top-4, shared
    # expert of 5632) with 2 of its 24 layers and a byte-level vocabulary: 2.2 GB, 2.1 GB of it routed experts.
    "qwen-moe-bench": Preset(
        hidden=2048,
        intermediate=1408,
        layers=2,
        experts=60,
        heads=16,
        kv_heads=16,
        max_shard_bytes=1 << 30,
        family="qwen2_moe",
        top_k=4,
        shared_intermediate=5632,
    ),  # fmt: skip
    # `zipmoe bench run --preset deepseek-v2-lite`: DeepSeek-V2-Lite (DeepSeek-V2 architecture: multi-head latent
    # attention, 64 routed experts of 2048 x 1408, top-6, 2 shared experts) with 2 of its 26 MoE layers: 2.3 GB.
    "deepseek-v2-lite": Preset(
        hidden=2048,
        intermediate=1408,
        layers=2,
        experts=64,
        heads=16,
        kv_heads=16,
        max_shard_bytes=1 << 30,
        family="deepseek_v2",
        top_k=6,
        shared_intermediate=2816,
    ),  # fmt: skip
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


def model_config(preset: Preset) -> dict:
    """The ``config.json`` of a preset, with the keys transformers writes for its family."""
    from zipmoe.families import family_for

    vocab = BYTE_VOCAB + len(SPECIAL_TOKENS)
    common = {
        "vocab_size": vocab,
        "hidden_size": preset.hidden,
        "num_hidden_layers": preset.layers,
        "num_experts_per_tok": preset.top_k,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": BYTE_VOCAB,
        "eos_token_id": BYTE_VOCAB + 1,
        "pad_token_id": BYTE_VOCAB + 2,
        "torch_dtype": "bfloat16",
    }
    return {**common, **family_for(preset.family).demo_config(preset)}


def _shapes(preset: Preset) -> dict[str, tuple[int, ...]]:
    """Every tensor of a preset's checkpoint: the dense ones the runtime reads (`zipmoe.runtime.shapes`), each
    layer's routed experts after its router, in per-expert layout."""
    from zipmoe.runtime.config import ModelArgs
    from zipmoe.runtime.shapes import dense_shapes, expert_shapes, router_name

    args = ModelArgs.from_hf_config(model_config(preset))
    dense = dense_shapes(args)
    tail = {name: dense.pop(name) for name in ("model.norm.weight", "lm_head.weight")}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in dense.items():
        shapes[name] = shape
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer is not None and name == router_name(args, int(layer)):
            for e in range(args.n_experts):
                shapes.update(expert_shapes(args, int(layer), e))
    return shapes | tail


def build_demo_checkpoint(out_dir: Path, preset: str = "small", seed: int = 0, force: bool = False) -> Path:
    """Write a random-init checkpoint of ``preset`` in Hugging Face layout to ``out_dir``; return the directory.

    Raises:
        OutputError: ``out_dir`` is not empty (without ``force``) or cannot be written.
    """
    import numpy as np

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
        rng = np.random.default_rng(seed)
        tensors = {}  # name -> BF16 bit patterns (numpy has no bfloat16), as torch's .to(torch.bfloat16) rounds
        for name, shape in _shapes(spec).items():
            if name.endswith("norm.weight"):
                tensors[name] = np.full(shape, BF16_ONE, np.uint16)
            elif name.endswith(".bias"):
                tensors[name] = np.zeros(shape, np.uint16)
            else:
                tensors[name] = _to_bf16(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02))
        shards = _shard(tensors, spec.max_shard_bytes)
        if len(shards) == 1:
            _save_bf16(out_dir / "model.safetensors", shards[0])
        else:
            weight_map = {}
            for k, shard in enumerate(shards, start=1):
                name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                _save_bf16(out_dir / name, shard)
                weight_map.update({t: name for t in shard})
            total = sum(t.nbytes for t in tensors.values())
            _write_json(
                out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
            )
        config = model_config(spec)
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


BF16_ONE = 0x3F80


def _to_bf16(values):
    """float32 values as BF16 bit patterns (uint16), rounded to nearest even like torch (no NaNs here)."""
    bits = values.view("<u4")
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


def _save_bf16(path: Path, tensors: dict) -> None:
    """A safetensors file of BF16 tensors given as uint16 bit patterns, byte for byte what
    ``safetensors.torch.save_file(..., metadata={"format": "pt"})`` writes (tensors sorted by name, header padded
    with spaces to 8 bytes); no torch needed."""
    import struct

    names = sorted(tensors)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            f.write(tensors[name].tobytes())


def _shard(tensors: dict, max_bytes: int) -> list[dict]:
    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def cached_demo_checkpoint(preset: str) -> Path:
    """The demo checkpoint of ``preset`` in zipmoe's cache directory (`zipmoe.store.cache_dir`), built on first use and
    again when the preset's config.json has changed."""
    from zipmoe.store import cache_dir

    cache = cache_dir() / f"demo-{preset}"
    try:
        current = json.loads((cache / "config.json").read_text(encoding="utf-8")) == model_config(PRESETS[preset])
    except (OSError, ValueError):
        current = False
    if not current:  # never built, or built by a zipmoe whose preset differed
        build_demo_checkpoint(cache, preset, force=True)
    return cache


TRAINED_FIXTURE = "qwen2-moe-stdlib"


def trained_checkpoint() -> Path:
    """The small trained Qwen2-MoE checkpoint of this repository's tests (``scripts/train_fixture.py`` made it).

    Raises:
        CheckpointError: zipmoe is not running from a source checkout that has it.
    """
    from zipmoe.errors import CheckpointError

    path = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / TRAINED_FIXTURE
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"the trained test checkpoint is not at {path} (it ships with zipmoe's source tree, not with the "
            "package): pass a checkpoint and --text"
        )
    return path


def cached_container(source: Path, name: str, **options) -> Path:
    """``source`` packed with ``options`` into zipmoe's cache directory, once (re-packed when the source changes).

    (Benchmarks use it for containers packed with fixed options; a model a user serves goes to the model store,
    `zipmoe.store`, one container per directory.)
    """
    from zipmoe.pack import PackOptions, pack
    from zipmoe.store import cache_dir

    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{name}.zmoe"
    newest = max(f.stat().st_mtime for f in source.iterdir())
    if not out.is_file() or out.stat().st_mtime < newest:
        pack(str(source), out, PackOptions(force=True, **options))
    return out
