"""Choosing the next token from logits: one `Sampler` per sequence, holding its random generator and the tokens
it has seen (the history penalties need).

``Sampler(options, prompt).next(logits)`` returns a token id and remembers it. Greedy when ``temperature`` is 0.
"""

from __future__ import annotations

import torch

from zipmoe.runtime.request import SamplingOptions


class Sampler:
    """The next-token choice of one sequence.

    Args:
        options: how to sample (`SamplingOptions`).
        prompt: the prompt's token ids (penalties look at them as transformers' do).
    """

    def __init__(self, options: SamplingOptions, prompt: list[int]) -> None:
        self.options = options
        self.generator = torch.Generator().manual_seed(options.seed)
        self.history = list(prompt)

    def next(self, logits: torch.Tensor) -> int:
        """The next token from last-position logits ([V], float32, any device); it joins the history."""
        token = sample(logits.cpu(), self.options, self.generator)
        self.history.append(token)
        return token


def sample(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """The next token from last-position logits ([V], float32)."""
    if options.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < options.top_p
        keep[0] = True  # the top token always stays (top_p 0 keeps it alone)
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
