"""Choosing the next token from logits: one `Sampler` per sequence, holding its random generator and the tokens
it has seen (the history penalties need).

``Sampler(options, prompt).next(logits)`` returns a token id and remembers it. The logits pass through, in order:

1. ``repetition_penalty`` over the prompt and generated tokens: a positive logit divided by it, a negative one
   multiplied (transformers' ``RepetitionPenaltyLogitsProcessor``; vLLM's too);
2. ``frequency_penalty`` and ``presence_penalty`` over the generated tokens only: ``logit -= frequency * count +
   presence * (count > 0)`` (the OpenAI API's definition, as vLLM applies it);
3. greedy (``temperature`` 0): the most likely token, after the penalties as with transformers' ``do_sample=False``;
   else ``temperature``, ``top_k``, ``top_p``, ``min_p``, in transformers' order (``_get_logits_processor``: the
   penalties, then the warpers temperature, top-k, top-p, min-p), each as its ``LogitsWarper`` does it: top-k keeps
   ties with the k-th logit, top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p``, min-p
   drops tokens less likely than ``min_p`` times the most likely one; each keeps at least one token;
4. one draw from the softmax of what is left, with the sequence's generator (seeded: reproducible).

(vLLM applies min-p before top-k and top-p; transformers' order is kept here, so a checkpoint's
generation_config.json means what it means under transformers.)
"""

from __future__ import annotations

import torch

from zipmoe.runtime.request import SamplingOptions


class Sampler:
    """The next-token choice of one sequence.

    Args:
        options: how to sample (`SamplingOptions`).
        prompt: the prompt's token ids (the repetition penalty counts them as transformers does).
    """

    def __init__(self, options: SamplingOptions, prompt: list[int]) -> None:
        self.options = options
        self.generator = torch.Generator().manual_seed(options.seed)
        self.history = list(prompt)
        self.prompt_tokens = len(self.history)
        # Built on first use, when the vocabulary size is known: [V] bool, in the prompt or generated (repetition);
        # [V] float32, times generated (frequency, presence).
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    @property
    def penalised(self) -> bool:
        """Whether any history penalty is on."""
        o = self.options
        return o.repetition_penalty != 1.0 or o.frequency_penalty != 0.0 or o.presence_penalty != 0.0

    def next(self, logits: torch.Tensor) -> int:
        """The next token from last-position logits ([V], any float dtype, any device); it joins the history."""
        logits = logits.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        if self.penalised:
            seen, counts = self._history_state(logits.numel())
            logits = apply_repetition_penalty(logits, seen, self.options.repetition_penalty)
            logits = apply_frequency_presence(
                logits, counts, self.options.frequency_penalty, self.options.presence_penalty
            )
        token = sample(logits, self.options, self.generator)
        self.history.append(token)
        if self._seen is not None and self._counts is not None:
            self._seen[token] = True
            self._counts[token] += 1
        return token

    def _history_state(self, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._seen is None or self._counts is None or self._seen.numel() != vocab_size:
            ids = torch.tensor([t for t in self.history if 0 <= t < vocab_size], dtype=torch.long)
            self._seen = torch.zeros(vocab_size, dtype=torch.bool)
            self._seen[ids] = True
            generated = torch.tensor([t for t in self.history[self.prompt_tokens :] if 0 <= t < vocab_size])
            self._counts = torch.bincount(generated.long(), minlength=vocab_size).float()
        return self._seen, self._counts


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits`` ([V]) with those of ``seen`` tokens ([V] bool) divided by ``penalty`` when positive, multiplied
    when negative (transformers' ``RepetitionPenaltyLogitsProcessor``)."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def apply_frequency_presence(
    logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """``logits - frequency * counts - presence * (counts > 0)``, ``counts`` ([V]) the times each token was generated
    (the OpenAI API's frequency and presence penalties)."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    return logits - frequency * counts - presence * (counts > 0).float()


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``logits`` with every token below the ``k``-th largest logit set to -inf (ties kept; 0: unchanged)."""
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, -float("inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """``logits`` keeping the most likely tokens whose probabilities add up to ``p`` (and the most likely one), the
    others set to -inf (transformers' ``TopPLogitsWarper``: the least likely tokens whose mass is at most ``1 - p``
    go)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= 1 - p
    remove_sorted[-1] = False  # the most likely token stays (top_p 0 keeps it alone)
    remove = remove_sorted.scatter(0, order, remove_sorted)
    return logits.masked_fill(remove, -float("inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """``logits`` with tokens less likely than ``min_p`` times the most likely token's probability set to -inf."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    remove = probs < min_p * probs.max()
    remove[torch.argmax(probs)] = False  # the most likely token stays
    return logits.masked_fill(remove, -float("inf"))


def warp(logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """The logits a sampled token is drawn from: ``temperature``, then ``top_k``, ``top_p``, ``min_p`` (transformers'
    order). Needs ``temperature`` > 0."""
    scaled = logits / options.temperature
    if not torch.isfinite(scaled[torch.isfinite(logits)]).all():  # a temperature so small (< ~1e-38) that the scale
        # overflows float32: its limit, the most likely token(s), which every filter below keeps
        scaled = torch.full_like(logits, -float("inf")).masked_fill(logits == logits.max(), 0.0)
    logits = top_k_filter(scaled, options.top_k)
    logits = top_p_filter(logits, options.top_p)
    return min_p_filter(logits, options.min_p)


def sample(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> int:
    """The next token from last-position logits ([V], float32, penalties already applied): the most likely one when
    ``temperature`` is 0, else a draw from the `warp`-ed distribution."""
    if options.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(warp(logits, options), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
