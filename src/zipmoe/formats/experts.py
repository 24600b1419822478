"""Which tensors of a checkpoint are routed experts, by architecture (the families of `zipmoe.families`).

Routed experts are stored one record per (layer, expert) so a cache miss is one read; everything else (attention,
embeddings, norms, routers, shared experts) is dense. Two layouts exist on disk:

* per-expert tensors, as the Hub checkpoints are: ``model.layers.3.block_sparse_moe.experts.5.w1.weight``
  (Mixtral), ``model.layers.3.mlp.experts.5.gate_proj.weight`` (Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3);
* fused 3-D tensors, as newer transformers save models they loaded fused: ``model.layers.3.mlp.experts.gate_up_proj``
  of shape ``[n_experts, ...]``, stored as one part per expert.

``shared_experts`` / ``shared_expert`` are not routed experts and stay dense (the name must contain ``experts`` as a
whole dotted segment).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from zipmoe.families import FAMILIES, family_for
from zipmoe.formats.safetensors_file import SourceTensor

_PER_EXPERT = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.+\.)?experts\.(?P<expert>\d+)\.(?P<member>.+)$")
_FUSED = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.+\.)?experts\.(?P<member>[A-Za-z_][^.]*)$")


@dataclass(frozen=True)
class ExpertTensor:
    """Where an expert tensor belongs: per-expert (``expert`` set) or fused over all experts of ``layer``."""

    layer: int
    expert: int | None


@dataclass(frozen=True)
class ModelLayout:
    """The result of classifying a checkpoint's tensors."""

    model_type: str | None
    family: str | None
    n_layers: int | None
    n_experts: int | None
    experts: dict[str, ExpertTensor]  # tensor name -> placement; every other tensor is dense
    warnings: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "family": self.family,
            "n_layers": self.n_layers,
            "n_experts": self.n_experts,
        }


def classify(config: dict[str, Any] | None, tensors: list[SourceTensor]) -> ModelLayout:
    """Find the routed-expert tensors of a checkpoint from its ``config.json`` and tensor list."""
    model_type = config.get("model_type") if config else None
    n_layers = config.get("num_hidden_layers") if config else None
    family = family_for(model_type)
    known = ", ".join(f.name for f in FAMILIES)
    if family is None:
        what = "no config.json" if config is None else f"unknown architecture {model_type!r}"
        warning = f"{what} (known: {known}); packing all {len(tensors)} tensors losslessly as dense"
        return ModelLayout(model_type, None, n_layers, None, {}, (warning,))
    key = next((k for k in family.n_experts_keys if k in config), family.n_experts_keys[0])
    n_experts = config.get(key)
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        warning = f"config.json has no valid {key!r}; packing all tensors losslessly as dense"
        return ModelLayout(model_type, family.name, n_layers, None, {}, (warning,))

    experts: dict[str, ExpertTensor] = {}
    warnings = []
    for t in tensors:
        if m := _PER_EXPERT.match(t.name):
            expert = int(m["expert"])
            if expert < n_experts:
                experts[t.name] = ExpertTensor(int(m["layer"]), expert)
            else:
                warnings.append(f"{t.name}: expert {expert} >= {key}={n_experts}; stored as dense")
        elif m := _FUSED.match(t.name):
            if t.shape and t.shape[0] == n_experts and t.nbytes % n_experts == 0:
                experts[t.name] = ExpertTensor(int(m["layer"]), None)
            else:
                warnings.append(f"{t.name}: shape {list(t.shape)} is not [{n_experts}, ...]; stored as dense")
    if not experts:
        warnings.append(f"no routed-expert tensors found for {family.name}; packing all tensors as dense")
    return ModelLayout(model_type, family.name, n_layers, n_experts, experts, tuple(warnings))


# What each member of a routed expert computes, by the projection names of every family (Mixtral's w1/w3/w2, the
# gate_proj/up_proj/down_proj of the others), and gate_up_proj, the [2I, H] gate rows then up rows of fused layouts.
EXPERT_ROLES = {name: role for f in FAMILIES for name, role in zip(f.projections, ("gate", "up", "down"))} | {
    "gate_up_proj": "gate_up"
}
_MEMBER = re.compile(r"experts\.(?:\d+\.)?(?P<proj>[A-Za-z0-9_]+?)(?:\.weight)?$")


def expert_role(name: str) -> str | None:
    """The role of an expert member tensor (``gate``, ``up``, ``down``, or ``gate_up`` when fused), or None."""
    m = _MEMBER.search(name)
    return EXPERT_ROLES.get(m["proj"]) if m else None
