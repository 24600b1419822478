"""`eval ppl`: perplexity of a container's model on a text, served in each precision mode.

The text is tokenized with the container's tokenizer and cut into consecutive windows of ``context`` tokens; each
window is one forward pass (teacher forcing) and every token after the first of a window is scored. Perplexity is
``exp(mean negative log-likelihood)`` over all scored tokens. Every mode runs through the same `Engine` as `zipmoe
run`, so the numbers describe what serving would compute.

The standard error of a perplexity is computed as llama.cpp's ``llama-perplexity`` does, by the delta method: with
``x_i`` the negative log-likelihood of scored token ``i`` (N tokens, mean ``m``), the mean has standard error
``s = sqrt((mean(x_i^2) - m^2) / (N - 1))`` (the sample standard deviation over sqrt(N)), and ``ppl = exp(m)`` has
``ppl * s``. It treats tokens as independent, which they are not quite (neighbours share context), so it is a lower
bound of the real uncertainty; below `MIN_SCORED_TOKENS` tokens even that is large, and the CLI warns.

Modes (for MAT(8,4) slices): ``lossless`` (BF16), ``q8`` (AMAT high bits, both slices), ``q4`` (AMAT low bits, the
MSB slice alone), ``dbsc`` (per token: the critical expert at 8 bits, the others at 4), and two baselines that are
not stored: ``q4-base`` (the BF16 experts quantized to 4 bits on their own) and ``q4-trunc`` (the MSB slice with the
8-bit zero-point kept: naive truncation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zipmoe.errors import ZipmoeError

if TYPE_CHECKING:  # torch and the runtime load when a perplexity is computed, not when the CLI starts
    from zipmoe.quant.spec import SliceSpec
    from zipmoe.runtime.engine import Engine, EngineOptions

DEFAULT_CONTEXT = 512
MIN_SCORED_TOKENS = 512  # fewer scored tokens make a perplexity too noisy to compare modes by (the CLI warns)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of one mode."""

    mode: str
    tokens: int  # scored tokens
    nll: float  # mean negative log-likelihood, nats per token
    seconds: float
    stats: dict[str, Any]  # the cache's statistics
    nll_stderr: float = math.nan  # standard error of ``nll`` (NaN with fewer than two tokens); see the module docstring

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def perplexity_stderr(self) -> float:
        """The standard error of `perplexity`, ``perplexity * nll_stderr`` (delta method, as llama-perplexity)."""
        return self.perplexity * self.nll_stderr

    def to_json(self) -> dict[str, Any]:
        finite = math.isfinite(self.nll_stderr)
        return {
            "mode": self.mode,
            "perplexity": self.perplexity,
            "perplexity_stderr": self.perplexity_stderr if finite else None,
            "nll": self.nll,
            "nll_stderr": self.nll_stderr if finite else None,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "cache": self.stats,
        }


def table1_modes(spec: SliceSpec | None) -> list[str]:
    """Every mode a container with slices ``spec`` offers plus the low-bit baselines: SliceMoE's Table 1."""
    from zipmoe.runtime.engine import available_modes

    modes = available_modes(spec)
    if spec is not None:
        modes += [f"q{spec.low_bits}-base", f"q{spec.low_bits}-trunc"]
    return modes


def windows(token_ids: list[int], context: int, max_tokens: int | None = None) -> list[list[int]]:
    """Consecutive windows of at most ``context + 1`` ids that overlap by one (the last input is the next target)."""
    if max_tokens is not None:
        token_ids = token_ids[: max_tokens + 1]
    return [token_ids[i : i + context + 1] for i in range(0, len(token_ids) - 1, context)]


def perplexity(
    path: str | Path,
    text: str,
    modes: list[str],
    *,
    context: int = DEFAULT_CONTEXT,
    max_tokens: int | None = None,
    options: EngineOptions | None = None,
    progress_start: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[PerplexityResult]:
    """Perplexity of the container's model on ``text`` in each of ``modes``.

    Args:
        path: the container.
        text: the evaluation text.
        modes: run modes (`zipmoe.runtime.engine.resolve_mode`).
        context: tokens per forward pass.
        max_tokens: score at most this many tokens.
        options: engine options (device, budget, threshold, ...); the mode is set per run.
        progress_start: called once with the number of windows to run over all modes.
        progress: called after each window.

    Raises:
        ZipmoeError: the text has fewer than two tokens; a mode the container cannot serve (before any runs);
            ``context`` exceeds the model's context.
    """
    from zipmoe.formats.reader import Container
    from zipmoe.runtime.engine import Engine, EngineOptions, resolve_mode

    with Container(path) as c:
        for mode in modes:
            resolve_mode(mode, c.slice_spec)
    options = options or EngineOptions()
    results = []
    batches: list[list[int]] | None = None
    for mode in modes:
        with Engine(path, replace(options, mode=mode)) as engine:
            if batches is None:
                batches = _batches(engine, text, context, max_tokens)
                if progress_start:
                    progress_start(len(batches) * len(modes))
            results.append(_score(engine, mode, batches, progress))
    return results


def _batches(engine: Engine, text: str, context: int, max_tokens: int | None) -> list[list[int]]:
    """The text's windows of token ids, checked against the model's context and vocabulary."""
    from zipmoe.runtime.generate import PromptError, check_token_ids

    if context > engine.args.context:
        raise PromptError(f"--context {context} exceeds the model's context of {engine.args.context} tokens")
    ids = engine.tokenizer.encode(text)
    check_token_ids(ids, engine.args.vocab_size)
    batches = [w for w in windows(ids, context, max_tokens) if len(w) > 1]
    if not batches:
        raise ZipmoeError("the evaluation text has fewer than two tokens")
    return batches


def _score(engine: Engine, mode: str, batches: list[list[int]], progress: Callable[[int], None] | None):
    import torch
    import torch.nn.functional as F

    started = time.perf_counter()
    total, total_sq, count = 0.0, 0.0, 0  # sums of the token NLLs and of their squares, in float64
    engine.model.experts.on_phase("prefill")
    engine.model.experts.on_phase("decode")  # every scored token is a prediction, as in decoding (dbsc per token)
    for ids in batches:
        tokens = torch.tensor(ids, device=engine.device)
        cache = engine.model.new_cache(len(ids) - 1)
        logits = engine.model.forward(tokens[:-1], 0, cache, all_logits=True)  # [T, V] float32
        nll = F.cross_entropy(logits, tokens[1:], reduction="none").double()  # [T]
        total += float(nll.sum())
        total_sq += float((nll * nll).sum())
        count += len(ids) - 1
        if progress:
            progress(1)
    mean = total / count
    stats = engine.pipeline.stats.to_json()
    return PerplexityResult(mode, count, mean, time.perf_counter() - started, stats, nll_stderr(total, total_sq, count))


def nll_stderr(total: float, total_sq: float, count: int) -> float:
    """The standard error of a mean NLL from the sum and the sum of squares of ``count`` token NLLs, as
    llama-perplexity computes it: ``sqrt((E[x^2] - E[x]^2) / (count - 1))``; NaN for fewer than two tokens."""
    if count < 2:
        return math.nan
    mean = total / count
    variance = max(total_sq / count - mean * mean, 0.0)  # rounding can make an all-equal sample slightly negative
    return math.sqrt(variance / (count - 1))
