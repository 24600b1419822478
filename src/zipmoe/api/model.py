"""`zipmoe.load`: a container opened for generation, as a `Model` with one `generate` method.

A thin shell over the runtime's `Engine` (`zipmoe.runtime.engine`), which does the work: dense weights in memory,
routed experts through a byte-budgeted cache that stays warm from one `generate` to the next. The options are the
engine's (`EngineOptions`), the sampling ones the runtime's (`SamplingOptions`), so the API and ``zipmoe run`` give
the same tokens for the same settings.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from zipmoe.extras import RUNTIME, require


@dataclass(frozen=True)
class Generation:
    """One generation: its text and tokens, why it ended, and what it cost.

    ``text`` is None for a prompt given as token ids to a container that embeds no tokenizer. ``finish_reason`` is
    ``stop`` (an end-of-sequence token) or ``length`` (``max_new_tokens`` reached). ``cache`` holds what the expert
    cache did for this generation alone (the shape of ``zipmoe run --json``'s ``cache``).
    """

    text: str | None
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int  # the prompt tokens the model saw
    dropped_prompt_tokens: int  # first prompt tokens left out to fit the context (``truncate``)
    ttft_seconds: float
    tpot_seconds: float
    cache: dict[str, Any] | None = None

    def __str__(self) -> str:
        return self.text or ""


def load(
    path: str | os.PathLike[str],
    *,
    memory_budget: int | str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    threads: int | None = None,
    **options: Any,
) -> Model:
    """Open a container for generation.

    Args:
        path: the ``.zmoe`` file.
        memory_budget: bytes for the routed experts (an int, or ``"2GiB"``, ``"500MB"``, ``"50%"`` of the model's
            BF16 expert bytes); None: every expert decoded, up to half of the available memory.
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: compute dtype, ``float32``, ``bfloat16`` or ``float16``; None: bfloat16 where it is native, else
            float32.
        threads: compute, decode and read threads (default: every available CPU).
        options: any other `zipmoe.runtime.engine.EngineOptions` field: ``tiers``, ``policy``, ``io``,
            ``simulate_storage_gbps``, ``mode``, ``plan``, ...

    Returns:
        A `Model`; close it, or use it as a context manager.

    Raises:
        ZipmoeError: PyTorch (or tokenizers, Jinja2) is not installed: ``pip install 'zipmoe[run]'``.
        TypeError: an option that `EngineOptions` does not have.
        ZipmoeError: a missing or corrupt container, an unsupported architecture, a budget below the minimum, a bad
            option value (each a one-line message).
    """
    require("zipmoe.load", *RUNTIME)
    from zipmoe.runtime.engine import Engine, EngineOptions

    unknown = sorted(set(options) - {f.name for f in fields(EngineOptions)})
    if unknown:
        known = ", ".join(f.name for f in fields(EngineOptions))
        raise TypeError(f"load() got unknown option(s) {', '.join(unknown)} (the options are {known})")
    engine_options = EngineOptions(memory_budget=memory_budget, device=device, dtype=dtype, threads=threads, **options)
    return Model(Engine(path, engine_options))


class Model:
    """A container opened for generation (`load`). ``engine`` is the runtime underneath, for what the API omits."""

    def __init__(self, engine) -> None:
        self.engine = engine

    @property
    def config(self) -> dict[str, Any]:
        """The model's ``config.json``."""
        return copy.deepcopy(self.engine.container.manifest.config)

    @property
    def memory_budget(self) -> int:
        """The expert memory budget in bytes, as resolved (a percentage or the default turned into bytes)."""
        return self.engine.budget

    @property
    def device(self) -> str:
        return str(self.engine.device)

    @property
    def stats(self) -> dict[str, Any]:
        """What the expert cache did since `load`, over every generation (``zipmoe run --json``'s ``cache``)."""
        return self.engine.pipeline.stats.to_json()

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int = 64,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int = 0,
        chat: bool = False,
        stop_at_eos: bool = True,
        truncate: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Generate text after ``prompt``; greedy unless ``temperature`` > 0 (or the container's
        ``generation_config.json`` samples).

        Args:
            prompt: text (encoded with the embedded tokenizer), or token ids.
            max_new_tokens: at most this many tokens.
            temperature, top_p, top_k, min_p: sampling (``zipmoe run``'s flags); None: the container's
                ``generation_config.json`` value, else off. Temperature 0 is greedy.
            repetition_penalty, frequency_penalty, presence_penalty: penalties on repeated tokens; None: as above.
            stop: up to 4 strings; the text ends before the first one found (``finish_reason`` ``stop``).
            seed: the random seed of sampling (reproducible).
            chat: wrap a text prompt as one user message with the chat template.
            stop_at_eos: stop at an end-of-sequence token.
            truncate: keep the last prompt tokens that leave room in the context instead of refusing the prompt.
            on_text: called with each piece of text as it is produced (text prompts only).

        Raises:
            PromptError: an empty prompt, token ids outside the vocabulary, or a prompt too long for the context.
            SamplingError: a sampling option out of range.
            TokenizerError: a text prompt for a container without ``tokenizer.json`` (or ``chat`` without a template).
        """
        sampling = self.engine.default_sampling(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, stop=stop, seed=seed, stop_at_eos=stop_at_eos, truncate=truncate,
        )  # fmt: skip
        if isinstance(prompt, str):
            text, result = self.engine.generate_text(prompt, sampling, chat=chat, on_text=on_text)
        else:
            result = self.engine.generate_tokens([int(t) for t in prompt], sampling)
            has_tokenizer = any(f.name == "tokenizer.json" for f in self.engine.container.manifest.files)
            text = self.engine.tokenizer.decode(result.tokens) if has_tokenizer else None
        return Generation(
            text, list(result.tokens), result.finish_reason, result.prompt_tokens, result.dropped_tokens,
            result.ttft, result.tpot, result.cache.to_json() if result.cache is not None else None,
        )  # fmt: skip

    def close(self) -> None:
        """Stop the runtime's threads and unmap the container."""
        self.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<zipmoe.Model {str(self.engine.container.path)!r} on {self.device}>"
