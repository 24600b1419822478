"""Model hyper-parameters, read from the ``config.json`` a container embeds.

One `ModelArgs` describes every family the runtime serves; `ModelArgs.from_hf_config` maps each family's Hugging
Face config keys (and the defaults of its transformers config class when a key is missing or null) onto it.

A config.json is untrusted input: every field the runtime uses is checked for its type and range before anything is
built from it, and integers are capped (`MAX_LAYERS` ...) so that no config can ask for an absurd allocation.
`config_problems` lists every problem (``pack`` warns with them); `ModelArgs.from_hf_config` raises the first one.
This module does not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from zipmoe.errors import ZipmoeError

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

# Caps on what a config.json may claim. The largest published MoE models are far below each (DeepSeek-V3: 61 layers,
# hidden 7168, 128 heads, 256 experts of 2048, vocabulary 129,280; Llama 4 Scout: 10M context), so a value above a
# cap is a corrupt or hostile file.
MAX_LAYERS = 1024
MAX_HIDDEN = 65_536
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_EXPERTS = 4096
MAX_INTERMEDIATE = 262_144
MAX_VOCAB = 4_194_304
MAX_CONTEXT = 16_777_216
LAYER_TYPES = ("full_attention", "sliding_attention")
# max_position_embeddings when a config.json has none: the defaults of the transformers config classes.
DEFAULT_CONTEXT = {"mixtral": 131_072, "qwen2_moe": 32_768, "qwen3_moe": 32_768, "olmoe": 4096}


class UnsupportedModelError(ZipmoeError, ValueError):
    """The container holds a model the runtime cannot run (or a config.json it cannot trust)."""


@dataclass(frozen=True)
class ModelArgs:
    """Everything the runtime needs to build a model."""

    family: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    n_experts: int
    top_k: int
    moe_intermediate: int  # per routed expert
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to one
    sparse_layers: tuple[bool, ...]  # True: MoE block; False: a dense MLP of `dense_intermediate`
    dense_intermediate: int
    shared_expert_intermediate: int  # 0: no shared expert (Qwen2-MoE has one, behind a sigmoid gate)
    qkv_bias: bool
    o_bias: bool
    qk_norm: str | None  # None, "head" (Qwen3-MoE: per head) or "full" (OLMoE: over all q / k features)
    clip_qkv: float | None
    sliding_window: tuple[int | None, ...]  # per layer
    tie_embeddings: bool
    eos_token_ids: tuple[int, ...]
    context: int  # max_position_embeddings: the most tokens one sequence may hold

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert (gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | None) -> ModelArgs:
        """Map a Hugging Face ``config.json`` onto `ModelArgs`, after checking every field the runtime uses.

        Raises:
            UnsupportedModelError: an architecture or feature the runtime does not implement (the message lists
                what is supported), or the first of `config_problems`.
        """
        args, problems = _parse(config)
        if problems:
            raise UnsupportedModelError(problems[0])
        return args


def config_problems(config: dict[str, Any] | None) -> list[str]:
    """Why ``zipmoe run`` would refuse this ``config.json``: one line per problem, empty when it can build the model.

    Args:
        config: the parsed ``config.json`` (None: there is none).

    Returns:
        One-line problems naming the key, what was expected and what was found.
    """
    return _parse(config)[1]


def read_token_ids(doc: dict[str, Any], key: str, vocab_size: int, file: str) -> tuple[int, ...]:
    """The token ids under ``key`` of a JSON object (an id, a list of ids, or null: none), within the vocabulary.

    Raises:
        UnsupportedModelError: not an id in ``0..vocab_size-1`` or a list of them.
    """
    fields = _Fields(doc, file)
    ids = fields.token_ids(key, vocab_size)
    if fields.problems:
        raise UnsupportedModelError(fields.problems[0])
    return ids


class _Fields:
    """Reads fields of a JSON object with their types and ranges checked. A missing or null field takes its default;
    a bad one is recorded as a one-line problem and read as None."""

    def __init__(self, doc: dict[str, Any], file: str = "config.json", problems: list[str] | None = None) -> None:
        self.doc, self.file = doc, file
        self.problems = [] if problems is None else problems

    def fail(self, message: str) -> None:
        self.problems.append(f"{self.file}: {message}")

    def bad(self, key: str, expected: str, value: Any) -> None:
        self.fail(f"{key!r} must be {expected}, got {_show(value)}")

    def integer(self, key: str, low: int, high: int, default: Any = ...) -> int | None:
        value = self.doc.get(key)
        if value is None:
            if default is ...:
                self.fail(f"{key!r} is missing (an integer in {low}..{high})")
                return None
            return default
        if not (_is_int(value) and low <= value <= high):
            return self.bad(key, f"an integer in {low}..{high}", value)
        return value

    def number(self, key: str, default: float | None, below: float = math.inf) -> float | None:
        """A finite number in ``(0, below)``."""
        value = self.doc.get(key)
        if value is None:
            return default
        if not (_is_finite(value) and 0 < value < below):
            return self.bad(key, "a finite number > 0" + (f" and < {below:g}" if below < math.inf else ""), value)
        return float(value)

    def flag(self, key: str, default: bool) -> bool | None:
        value = self.doc.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            return self.bad(key, "true or false", value)
        return value

    def integers(self, key: str, low: int, high: int) -> list[int] | None:
        value = self.doc.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(_is_int(v) and low <= v <= high for v in value):
            return self.bad(key, f"a list of integers in {low}..{high}", value)
        return value

    def choices(self, key: str, allowed: tuple[str, ...], length: int | None) -> list[str] | None:
        value = self.doc.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != (length or len(value)) or not all(v in allowed for v in value):
            return self.bad(key, f"a list of {length} values from {', '.join(allowed)}", value)
        return value

    def token_ids(self, key: str, vocab_size: int | None) -> tuple[int, ...] | None:
        value = self.doc.get(key)
        if value is None:
            return ()
        high = (vocab_size or MAX_VOCAB) - 1
        ids = value if isinstance(value, list) else [value]
        if not all(_is_int(i) and 0 <= i <= high for i in ids):
            return self.bad(key, f"a token id in 0..{high} or a list of them", value)
        return tuple(ids)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _first_set(doc: dict[str, Any], key: str, fallback: str) -> str:
    return key if doc.get(key) is not None else fallback


def _is_finite(value: Any) -> bool:
    """A JSON number that converts to a finite float."""
    return isinstance(value, float) and math.isfinite(value) or _is_int(value) and value.bit_length() < 1024


def _show(value: Any) -> str:
    """A short repr of an untrusted value (huge integers and long lists are summarised)."""
    if _is_int(value) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value) if not isinstance(value, (list, dict)) or len(value) <= 16 else f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _parse(config: Any) -> tuple[ModelArgs | None, list[str]]:
    if not config:
        return None, ["the container has no config.json; the runtime needs one to build the model"]
    if not isinstance(config, dict):
        return None, [f"config.json must be a JSON object, got {type(config).__name__}"]
    family = config.get("model_type")
    if family not in SUPPORTED:
        return None, [
            f"zipmoe run does not support model_type {_show(family)} (supported: {', '.join(SUPPORTED)}); "
            "the container itself is fine and unpacks losslessly"
        ]
    f = _Fields(config)
    n_layers = f.integer("num_hidden_layers", 1, MAX_LAYERS)
    hidden = f.integer("hidden_size", 1, MAX_HIDDEN)
    vocab = f.integer("vocab_size", 1, MAX_VOCAB)
    values = dict(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        n_layers=n_layers,
        **_attention(f, family, hidden, n_layers),
        **_experts(f, family, n_layers),
        rms_eps=f.number("rms_norm_eps", 1e-6, below=1.0),
        rope_theta=_rope_theta(f),
        tie_embeddings=f.flag("tie_word_embeddings", False),
        eos_token_ids=f.token_ids("eos_token_id", vocab),
        context=f.integer("max_position_embeddings", 1, MAX_CONTEXT, DEFAULT_CONTEXT[family]),
    )
    if f.problems:
        return None, f.problems
    return ModelArgs(**values), []


def _attention(f: _Fields, family: str, hidden: int | None, n_layers: int | None) -> dict[str, Any]:
    n_heads = f.integer("num_attention_heads", 1, MAX_HEADS)
    n_kv_heads = f.integer("num_key_value_heads", 1, MAX_HEADS, default=n_heads)
    if n_heads and n_kv_heads and n_heads % n_kv_heads:
        f.bad("num_key_value_heads", f"a divisor of num_attention_heads ({n_heads})", n_kv_heads)
    if f.doc.get("head_dim") is not None:
        head_dim = f.integer("head_dim", 1, MAX_HEAD_DIM)
    elif hidden and n_heads and hidden % n_heads:
        head_dim = f.bad("num_attention_heads", f"a divisor of hidden_size ({hidden}) without head_dim", n_heads)
    else:
        head_dim = hidden // n_heads if hidden and n_heads else None
    if head_dim and head_dim % 2:
        f.bad("head_dim", "even (rotary embeddings rotate pairs of features)", head_dim)
    if family == "qwen2_moe":
        qkv_bias, o_bias = f.flag("qkv_bias", True), False
    else:
        qkv_bias = f.flag("attention_bias", False)
        o_bias = family in ("qwen3_moe", "olmoe") and qkv_bias
    return dict(
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(family),
        clip_qkv=f.number("clip_qkv", None) if family == "olmoe" else None,
        sliding_window=_windows(f, family, n_layers),
    )


def _windows(f: _Fields, family: str, n_layers: int | None) -> tuple[int | None, ...] | None:
    """The sliding attention window of each layer, None for full causal attention."""
    window = f.integer("sliding_window", 0, MAX_CONTEXT, default=0)  # 0 or null: none (Qwen2-MoE configs write 0)
    use = f.flag("use_sliding_window", False)
    layer_types = f.choices("layer_types", LAYER_TYPES, n_layers)
    if n_layers is None:
        return None
    if not window or (family != "mixtral" and not use):
        return (None,) * n_layers
    if family == "mixtral":
        return (window,) * n_layers
    if f.doc.get("layer_types") is None:
        f.fail("use_sliding_window without layer_types is not supported")
    if layer_types is None:
        return None
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def _experts(f: _Fields, family: str, n_layers: int | None) -> dict[str, Any]:
    if family == "mixtral":  # Mixtral always renormalises the top-k weights and has no shared expert
        n_experts = f.integer("num_local_experts", 1, MAX_EXPERTS)
        moe_intermediate = dense_intermediate = f.integer("intermediate_size", 1, MAX_INTERMEDIATE)
        norm_topk, shared = True, 0
    else:  # Hub configs say num_experts; transformers 5 saves Qwen3-MoE's as num_local_experts
        n_experts = f.integer(_first_set(f.doc, "num_experts", "num_local_experts"), 1, MAX_EXPERTS)
        moe_intermediate = f.integer(
            _first_set(f.doc, "moe_intermediate_size", "intermediate_size"), 1, MAX_INTERMEDIATE
        )
        dense_intermediate = f.integer("intermediate_size", 0, MAX_INTERMEDIATE, default=0)
        norm_topk = f.flag("norm_topk_prob", False)
        shared = f.integer("shared_expert_intermediate_size", 0, MAX_INTERMEDIATE, 0) if family == "qwen2_moe" else 0
    sparse = _sparse_layers(f, family, n_layers)
    if sparse is not None and not all(sparse) and dense_intermediate == 0:
        f.bad("intermediate_size", "a positive integer: some layers are dense MLPs (mlp_only_layers)", 0)
    return dict(
        n_experts=n_experts,
        top_k=f.integer("num_experts_per_tok", 1, n_experts or MAX_EXPERTS),
        moe_intermediate=moe_intermediate,
        norm_topk_prob=norm_topk,
        sparse_layers=sparse,
        dense_intermediate=dense_intermediate,
        shared_expert_intermediate=shared,
    )


def _sparse_layers(f: _Fields, family: str, n_layers: int | None) -> tuple[bool, ...] | None:
    """For each layer, whether it is a MoE block (Qwen-MoE: every ``decoder_sparse_step``-th, but mlp_only_layers)."""
    if family not in ("qwen2_moe", "qwen3_moe"):
        return None if n_layers is None else (True,) * n_layers
    step = f.integer("decoder_sparse_step", 1, MAX_LAYERS, default=1)
    dense = f.integers("mlp_only_layers", 0, (n_layers or MAX_LAYERS) - 1)
    if n_layers is None or step is None or dense is None:
        return None
    dense_layers = set(dense)
    sparse = tuple(layer not in dense_layers and (layer + 1) % step == 0 for layer in range(n_layers))
    if not any(sparse):
        f.fail(f"decoder_sparse_step {step} and mlp_only_layers {_show(dense)} leave no MoE layer")
    return sparse


def _rope_theta(f: _Fields) -> float | None:
    key = "rope_parameters" if f.doc.get("rope_parameters") is not None else "rope_scaling"
    rope = f.doc.get(key) or {}
    if not isinstance(rope, dict):
        return f.bad(key, "an object", rope)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        return f.fail(f"rope_type {_show(rope_type)} is not supported (only 'default')")
    inner = _Fields(rope, f"{f.file} {key}", f.problems)
    if rope.get("rope_theta") is not None:
        return inner.number("rope_theta", None)
    return f.number("rope_theta", 10000.0)
