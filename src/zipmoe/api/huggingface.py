"""`zipmoe.to_transformers`: a transformers model built straight from a container, with no file written.

The tensors are decoded into memory and handed to transformers' own loader (``from_pretrained`` with ``config=`` and
``state_dict=``): it builds the model on the meta device, assigns the decoded tensors as its parameters, applies the
renaming and expert fusing its conversion mapping does for checkpoints on disk (per-expert Hub tensors stacked into
the ``[n_experts, ...]`` parameters newer transformers use), and ties the embeddings. The model is therefore the one
``from_pretrained`` gives for the unpacked checkpoint directory, bit for bit.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from zipmoe._json import load_json
from zipmoe.api.checkpoint import PackedCheckpoint
from zipmoe.api.checkpoint import open as open_checkpoint
from zipmoe.errors import FormatError
from zipmoe.extras import require


def to_transformers(path: str | os.PathLike[str], *, dtype: Any = None, **kwargs: Any) -> Any:
    """Build the transformers model ``AutoModelForCausalLM`` picks for the container's config.json, from its tensors.

    Args:
        path: the ``.zmoe`` file.
        dtype: the model's dtype (``torch.float32``, ``"bfloat16"``, ...); None keeps the checkpoint's: weights are
            then bit-identical to the packed safetensors files.
        kwargs: passed to ``from_pretrained`` (``attn_implementation="eager"``, ``device_map="cuda"``, ...).

    Returns:
        The model, in evaluation mode, as ``from_pretrained`` returns it.

    Raises:
        ZipmoeError: torch or transformers is not installed (the message says what to install).
        FormatError: the container is corrupt, has no config.json, or one that this transformers cannot build.
    """
    require("zipmoe.to_transformers", "torch", "transformers")
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    with open_checkpoint(path, framework="pt") as checkpoint:
        config_doc = checkpoint.config
        if config_doc is None:
            raise FormatError(f"{path}: the packed checkpoint had no config.json; transformers needs one")
        model_type = config_doc.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise FormatError(
                f"{path}: config.json has model_type {model_type!r}, which transformers {transformers.__version__} "
                "does not know"
            )
        try:
            config = CONFIG_MAPPING[model_type].from_dict(config_doc)
        except Exception as exc:  # transformers validates fields with exception types of its own, on several lines
            reason = " ".join(str(exc).split())
            raise FormatError(
                f"{path}: transformers cannot build a {model_type} config from config.json: {reason}"
            ) from None
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise FormatError(f"{path}: transformers has no causal language model for model_type {model_type!r}")
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # what AutoModelForCausalLM would pick
        if "generation_config" not in kwargs:
            kwargs["generation_config"] = _generation_config(transformers, checkpoint, config_doc, path)
        state_dict = dict(checkpoint.tensors())
    return model_class.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=dtype or _stored_dtype(state_dict), **kwargs
    )


def _generation_config(transformers, checkpoint: PackedCheckpoint, config_doc: dict[str, Any], path) -> Any:
    """What from_pretrained reads from a directory: generation_config.json, else a generation config made from
    config.json (here both come from the container)."""
    if "generation_config.json" not in checkpoint.files:
        return transformers.GenerationConfig.from_model_config(config_doc)
    where = f"{path}: embedded generation_config.json"
    doc = load_json(checkpoint.read_file("generation_config.json"), lambda reason: FormatError(f"{where}: {reason}"))
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    return transformers.GenerationConfig.from_dict(doc)


def _stored_dtype(state_dict: dict[str, Any]) -> Any:
    """The floating-point dtype that holds most of the checkpoint's bytes (the model is built in it, so those
    weights keep their bits; from_pretrained would otherwise convert them to its default dtype)."""
    nbytes: Counter = Counter()
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            nbytes[tensor.dtype] += tensor.numel() * tensor.element_size()
    return nbytes.most_common(1)[0][0] if nbytes else "auto"
