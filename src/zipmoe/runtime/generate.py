"""The generation loop: prefill, then one token at a time; greedy or sampled (temperature, top-p, seed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zipmoe.runtime.model import Transformer


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens. ``temperature`` 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True


@dataclass
class GenerationResult:
    """Tokens and timings of one generation (seconds, wall clock)."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    ttft: float = 0.0  # prompt in, first new token out
    step_seconds: list[float] = field(default_factory=list)  # every later token

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        return sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.step_seconds) / sum(self.step_seconds) if self.step_seconds else 0.0


def sample(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """The next token from last-position logits ([V], float32)."""
    if options.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < options.top_p  # always keeps the top token
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: Transformer,
    prompt: list[int],
    options: SamplingOptions,
    *,
    eos_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Generate up to ``options.max_new_tokens`` tokens after ``prompt``; ``on_token`` sees each as it is made."""
    if not prompt:
        raise ValueError("the prompt has no tokens")
    generator = torch.Generator().manual_seed(options.seed)
    cache = model.new_cache(len(prompt) + options.max_new_tokens)
    result = GenerationResult(prompt_tokens=len(prompt))
    start = time.perf_counter()
    model.experts.on_phase("prefill")
    logits = model.forward(torch.tensor(prompt, device=model.device), 0, cache)
    model.experts.on_phase("decode")
    position = len(prompt)
    for step in range(options.max_new_tokens):
        token = sample(logits.cpu(), options, generator)
        now = time.perf_counter()
        if step == 0:
            result.ttft = now - start
        else:
            result.step_seconds.append(now - start)
        result.tokens.append(token)
        if on_token is not None:
            on_token(token)
        if options.stop_at_eos and token in eos_ids or step + 1 == options.max_new_tokens:
            break
        start = time.perf_counter()
        logits = model.forward(torch.tensor([token], device=model.device), position, cache)
        position += 1
    return result
