"""One generation: a prompt in, up to ``max_new_tokens`` tokens out; greedy or sampled (temperature, top-p, seed).

`generate` is a `zipmoe.runtime.batching.BatchScheduler` of one sequence, so `zipmoe run` and a batch of one are the
same mechanism: the prompt goes through in chunks of `DEFAULT_PREFILL_CHUNK` tokens (attention scores take
[N, chunk, S] memory, not [N, prompt, prompt]), then one token at a time. A prompt must leave room in the model's
context (``max_position_embeddings``) for the tokens asked for: too long a prompt is an error, or with ``truncate``
loses its first tokens (`fit_context`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from zipmoe.runtime.batching import (
    DEFAULT_PREFILL_CHUNK,
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    BatchScheduler,
    GenerationResult,
    check_token_ids,
    fit_context,
)
from zipmoe.runtime.model import KVCache, Transformer
from zipmoe.runtime.request import MAX_SEED, PromptError, SamplingError, SamplingOptions
from zipmoe.runtime.sampling import sample

__all__ = [  # the options live in the torch-free `zipmoe.runtime.request`, the results in `batching`; importable here
    "DEFAULT_PREFILL_CHUNK", "FINISH_CANCELLED", "FINISH_ERROR", "FINISH_LENGTH", "FINISH_STOP", "MAX_SEED",
    "GenerationResult", "PromptError", "SamplingError", "SamplingOptions", "check_token_ids", "fit_context",
    "generate", "prefill", "sample",
]  # fmt: skip


def prefill(model: Transformer, prompt: list[int], cache: KVCache, chunk: int = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
    """Run the prompt through the model ``chunk`` tokens at a time, filling ``cache``; the last token's logits.

    What a scheduler's prefill steps do for a sequence alone, for callers that fill a cache without generating.
    """
    tokens = torch.tensor(prompt, device=model.device)
    for start in range(0, len(prompt), chunk):
        logits = model.forward(tokens[start : start + chunk], start, cache)
    return logits


def generate(
    model: Transformer,
    prompt: list[int],
    options: SamplingOptions,
    *,
    eos_ids: tuple[int, ...] = (),
    on_token: Callable[[int], bool | None] | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> GenerationResult:
    """Generate up to ``options.max_new_tokens`` tokens after ``prompt``; ``on_token`` sees each as it is made (and
    may return True to end the generation there, finish reason ``stop``).

    Raises:
        PromptError: the prompt is empty, holds ids outside the vocabulary, or does not fit the context (`fit_context`).
        Exception: whatever the model or ``on_token`` raised (a storage error, say), as it was raised.
    """
    scheduler = BatchScheduler(model, eos_ids=eos_ids, max_batch=1, max_queue=1, prefill_chunk=prefill_chunk)
    seq = scheduler.submit(prompt, options, on_token=on_token)
    scheduler.run_until_idle()
    if seq.error is not None:
        raise seq.error
    return seq.result
