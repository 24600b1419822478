"""The generation loop: prefill in chunks, then one token at a time; greedy or sampled (temperature, top-p, seed).

A prompt must leave room in the model's context (``max_position_embeddings``) for the tokens asked for: too long a
prompt is an error, or with ``truncate`` loses its first tokens. The prefill runs `DEFAULT_PREFILL_CHUNK` tokens per
forward pass, so attention scores take [N, chunk, S] memory, not [N, prompt, prompt].
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from zipmoe.runtime.model import KVCache, Transformer
from zipmoe.runtime.request import MAX_SEED, PromptError, SamplingError, SamplingOptions
from zipmoe.runtime.sampling import Sampler, sample

if TYPE_CHECKING:
    from zipmoe.runtime.pipeline import PipelineStats

__all__ = [  # the options live in the torch-free `zipmoe.runtime.request`; imported from here too
    "DEFAULT_PREFILL_CHUNK", "FINISH_LENGTH", "FINISH_STOP", "MAX_SEED", "GenerationResult", "PromptError",
    "SamplingError", "SamplingOptions", "check_token_ids", "fit_context", "generate", "prefill", "sample",
]  # fmt: skip

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per forward pass
# Why a generation ended, in OpenAI's words: an end-of-sequence token, or max_new_tokens reached.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass
class GenerationResult:
    """Tokens and timings of one generation (seconds, wall clock)."""

    prompt_tokens: int  # the prompt tokens the model saw
    tokens: list[int] = field(default_factory=list)
    ttft: float = 0.0  # prompt in, first new token out
    step_seconds: list[float] = field(default_factory=list)  # every later token
    dropped_tokens: int = 0  # first prompt tokens left out to fit the context (``truncate``)
    finish_reason: str = FINISH_LENGTH  # FINISH_STOP: it ended with an end-of-sequence token
    cache: PipelineStats | None = None  # what the expert pipeline did for this generation alone (set by `Engine`)

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        return sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.step_seconds) / sum(self.step_seconds) if self.step_seconds else 0.0


def fit_context(prompt: list[int], max_new_tokens: int, context: int, truncate: bool = False) -> list[int]:
    """The prompt, or with ``truncate`` its last tokens, such that ``max_new_tokens`` more fit in ``context``.

    Raises:
        PromptError: ``max_new_tokens`` alone fills the context, or the prompt is too long and not ``truncate``.
    """
    room = context - max_new_tokens
    if room < 1:
        raise PromptError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens"
        )
    if len(prompt) <= room:
        return prompt
    if truncate:
        return prompt[-room:]
    raise PromptError(
        f"the prompt has {len(prompt)} tokens and --max-new-tokens {max_new_tokens} asks for {max_new_tokens} more: "
        f"{len(prompt) + max_new_tokens} exceeds the model's context of {context} tokens "
        f"(use --truncate to keep the last {room} prompt tokens)"
    )


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """Raise `PromptError` when a token id (from the tokenizer) is outside the model's vocabulary."""
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise PromptError(f"the tokenizer gave token id {bad}, outside the model's vocabulary of {vocab_size}")


def prefill(model: Transformer, prompt: list[int], cache: KVCache, chunk: int = DEFAULT_PREFILL_CHUNK) -> torch.Tensor:
    """Run the prompt through the model ``chunk`` tokens at a time, filling ``cache``; the last token's logits."""
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
    on_token: Callable[[int], None] | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> GenerationResult:
    """Generate up to ``options.max_new_tokens`` tokens after ``prompt``; ``on_token`` sees each as it is made.

    Raises:
        PromptError: the prompt is empty, holds ids outside the vocabulary, or does not fit the context (`fit_context`).
    """
    if not prompt:
        raise PromptError("the prompt has no tokens")
    check_token_ids(prompt, model.args.vocab_size)
    kept = fit_context(prompt, options.max_new_tokens, model.args.context, options.truncate)
    sampler = Sampler(options, kept)
    cache = model.new_cache(len(kept) + options.max_new_tokens)
    result = GenerationResult(prompt_tokens=len(kept), dropped_tokens=len(prompt) - len(kept))
    start = time.perf_counter()
    model.experts.on_phase("prefill")
    logits = prefill(model, kept, cache, prefill_chunk)
    model.experts.on_phase("decode")
    position = len(kept)
    for step in range(options.max_new_tokens):
        token = sampler.next(logits)
        now = time.perf_counter()
        if step == 0:
            result.ttft = now - start
        else:
            result.step_seconds.append(now - start)
        result.tokens.append(token)
        if on_token is not None:
            on_token(token)
        if options.stop_at_eos and token in eos_ids:
            result.finish_reason = FINISH_STOP
            break
        if step + 1 == options.max_new_tokens:
            break
        start = time.perf_counter()
        logits = model.forward(torch.tensor([token], device=model.device), position, cache)
        position += 1
    return result
