"""Rotary position embedding parameters from a ``config.json``: plain RoPE, and YaRN (DeepSeek-V2/V3) with its
attention scaling. `zipmoe.runtime.rope` turns them into frequencies. This module does not import torch.

A config states RoPE in ``rope_parameters`` (transformers 5) or ``rope_scaling`` (Hub configs), with ``rope_theta``
inside or at the top level; the type is ``rope_type`` (or the older ``type``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zipmoe.runtime.fields import MAX_CONTEXT, Fields, show

ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class RopeArgs:
    """How positions rotate query and key features.

    ``factor`` .. ``truncate`` are YaRN's (``rope_type == "yarn"``), with transformers' defaults.
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_context: int = 0  # the pretraining context YaRN extends (original_max_position_embeddings)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # scales cos and sin; None: derived from factor and the mscales
    truncate: bool = True

    @property
    def cos_sin_scale(self) -> float:
        """The factor cos and sin are multiplied by (YaRN's attention factor; 1 for plain RoPE)."""
        if self.rope_type == "default":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return float(yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim))
        return yarn_mscale(self.factor)

    def softmax_scale(self, head_dim: int) -> float:
        """The attention logit scale: 1/sqrt(head_dim), times YaRN's ``mscale_all_dim`` correction squared (as
        DeepSeek-V2/V3 apply it)."""
        scale = head_dim**-0.5
        if self.rope_type != "default" and self.mscale_all_dim:
            mscale = yarn_mscale(self.factor, self.mscale_all_dim)
            scale = scale * mscale * mscale
        return scale


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context extended ``scale`` times."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def parse_rope(f: Fields, context: int | None, yarn: bool, family: str) -> RopeArgs | None:
    """The RoPE parameters of a config (None after recording a problem).

    Args:
        f: the config's fields.
        context: its ``max_position_embeddings`` (YaRN's default ``original_max_position_embeddings``).
        yarn: whether the family may scale RoPE with YaRN (else only plain RoPE is accepted).
        family: the family's name, for messages.
    """
    key = "rope_parameters" if f.doc.get("rope_parameters") is not None else "rope_scaling"
    rope = f.doc.get(key) or {}
    if not isinstance(rope, dict):
        return f.bad(key, "an object", rope)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    allowed = ROPE_TYPES if yarn else ROPE_TYPES[:1]
    if rope_type not in allowed:
        quoted = ", ".join(repr(t) for t in allowed)
        return f.fail(f"rope_type {show(rope_type)} is not supported for {family} (supported: {quoted})")
    inner = Fields(rope, f"{f.file} {key}", f.problems)
    theta = inner.number("rope_theta", None) if rope.get("rope_theta") is not None else f.number("rope_theta", 1e4)
    if rope_type == "default":
        return RopeArgs(theta=theta)
    factor = inner.number("factor", None)
    if factor is None and rope.get("factor") is None:
        inner.fail("'factor' is missing (YaRN's context extension, a number > 0)")
    original = inner.integer("original_max_position_embeddings", 1, MAX_CONTEXT, default=context)
    values = dict(
        theta=theta,
        factor=factor,
        original_context=original,
        beta_fast=inner.number("beta_fast", 32.0),
        beta_slow=inner.number("beta_slow", 1.0),
        mscale=inner.number("mscale", None),
        mscale_all_dim=inner.number("mscale_all_dim", None),
        attention_factor=inner.number("attention_factor", None),
        truncate=inner.flag("truncate", True),
    )
    if any(values[k] is None for k in ("theta", "factor", "original_context", "beta_fast", "beta_slow", "truncate")):
        return None
    return RopeArgs("yarn", **values)
