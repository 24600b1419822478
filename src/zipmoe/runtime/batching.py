"""Continuous batching: concurrent sequences decoded together, joining and leaving between forward passes.

A `BatchScheduler` holds the sequences submitted to it: waiting ones (at most ``max_queue``) and active ones (at most
``max_batch``), each with its own KV cache, position, `Sampler` and routing trace. Every `BatchScheduler.step`

1. retires cancelled sequences (their caches are freed) and admits waiting ones, oldest first, up to ``max_batch``
   (each gets a cache of its prompt plus ``max_new_tokens``);
2. forms one forward pass (`Transformer.forward_batch`): the last token of every decoding sequence, and chunks of
   the prompts still being read, ``prefill_chunk`` prompt tokens per step over all of them (oldest first), so a
   step holds at most ``max_batch - 1 + prefill_chunk`` tokens and a long prompt never stalls the others' decoding
   for longer than one chunk;
3. runs it: dense parts over all tokens, attention per sequence, and each MoE layer's experts asked for once for
   the whole batch, so an expert several sequences chose is read and decoded once (the pipeline fetches the union
   of the batch's misses);
4. samples a token for every sequence whose prompt is done, hands it to ``on_token``, and retires the sequences
   that finished (end-of-sequence token, ``max_new_tokens``, ``on_token`` asking to stop, or cancelled).

A sequence's tokens do not depend on the others in its batch (every row of the batch is computed on its own; the
sums over a batch's rows may round differently in the last bit on some BLAS kernels, never by more).
`zipmoe.runtime.generate.generate` is a scheduler of one sequence, so a batch of one gives the tokens of
`zipmoe run` by construction.

Thread safety: `submit`, `cancel`, `active` and `waiting` may be called from any thread; `step` (and so
`run_until_idle` and `serve_forever`) from one thread at a time, which also runs every ``on_token`` and ``on_done``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from zipmoe.errors import ZipmoeError
from zipmoe.runtime.model import RoutingReplay, Segment, Transformer
from zipmoe.runtime.policies import DECODE, PREFILL
from zipmoe.runtime.request import PromptError, SamplingOptions
from zipmoe.runtime.sampling import Sampler

if TYPE_CHECKING:
    from zipmoe.runtime.attention import KVCache
    from zipmoe.runtime.attention_mla import LatentCache
    from zipmoe.runtime.pipeline import PipelineStats

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per forward pass
# Why a generation ended, in OpenAI's words: an end-of-sequence token (or ``on_token`` asking to stop), or
# max_new_tokens reached; and ours: cancelled, or failed (`Sequence.error` says why).
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"
# How long `BatchScheduler.serve_forever` waits for work before it looks at its stop event again.
IDLE_POLL_SECONDS = 0.1


class QueueFullError(ZipmoeError):
    """`BatchScheduler.submit` found ``max_queue`` sequences already waiting."""


class SchedulerError(ZipmoeError, ValueError):
    """Scheduler settings out of range."""


@dataclass
class GenerationResult:
    """Tokens and timings of one generation (seconds, wall clock)."""

    prompt_tokens: int  # the prompt tokens the model saw
    tokens: list[int] = field(default_factory=list)
    ttft: float = 0.0  # prompt in (submitted), first new token out
    step_seconds: list[float] = field(default_factory=list)  # every later token, since the one before
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


@dataclass
class BatchStats:
    """What a scheduler did: forward passes, tokens, and how full its batches were."""

    steps: int = 0  # forward passes
    tokens: int = 0  # new tokens sampled
    prompt_tokens: int = 0  # prompt tokens run through the model
    batch_sizes: int = 0  # sequences in each forward pass, summed over the passes
    finished: dict[str, int] = field(default_factory=dict)  # sequences retired, by finish reason

    @property
    def mean_batch(self) -> float:
        """Sequences per forward pass, on average."""
        return self.batch_sizes / self.steps if self.steps else 0.0


TokenCallback = Callable[[int], "bool | None"]
DoneCallback = Callable[[GenerationResult], None]


class Sequence:
    """One generation in a `BatchScheduler`: the handle `BatchScheduler.submit` returns.

    Attributes:
        id: unique within its scheduler, in submission order.
        prompt: the prompt tokens the model sees (after ``truncate``).
        options: how it samples.
        result: its tokens and timings so far; complete once ``done`` is set.
        done: set once it has finished, after ``on_done`` returned.
        cancelled: `BatchScheduler.cancel` was called for it.
        error: the exception that failed it (``result.finish_reason`` is ``error``), else None.
    """

    def __init__(
        self,
        id: int,
        prompt: list[int],
        options: SamplingOptions,
        result: GenerationResult,
        on_token: TokenCallback | None,
        on_done: DoneCallback | None,
        replay: RoutingReplay | None,
    ) -> None:
        self.id = id
        self.prompt = prompt
        self.options = options
        self.result = result
        self.done = threading.Event()
        self.cancelled = False
        self.error: BaseException | None = None
        self.replay = replay
        self._on_token = on_token
        self._on_done = on_done
        self._submitted = time.perf_counter()
        self._last = self._submitted  # when its last token was handed out
        self._sampler: Sampler | None = None
        self._cache: KVCache | LatentCache | None = None
        self._position = 0  # tokens in its cache
        self._next: int | None = None  # the token to run through the model next (decoding)

    @property
    def prefilling(self) -> bool:
        """Whether part of its prompt has still to go through the model."""
        return self._position < len(self.prompt)

    def __repr__(self) -> str:
        state = self.result.finish_reason if self.done.is_set() else "running"
        return f"Sequence(id={self.id}, prompt={len(self.prompt)} tokens, {len(self.result.tokens)} new, {state})"


class BatchScheduler:
    """Decodes concurrent sequences together with continuous batching (see the module docstring).

    Args:
        model: the model every sequence runs on.
        eos_ids: end-of-sequence tokens (a sequence stops at one when its options say ``stop_at_eos``).
        max_batch: sequences in one forward pass at most (each holds a KV cache while active).
        max_queue: sequences waiting at most; `submit` refuses more.
        max_context: tokens (prompt plus new) one sequence may hold at most, within the model's context; None: the
            model's context. Bounds each KV cache, so the caches take at most ``max_batch`` times a cache of
            ``max_context`` tokens.
        prefill_chunk: prompt tokens per forward pass, over all sequences still reading their prompts.

    Raises:
        SchedulerError: a setting below 1.
    """

    def __init__(
        self,
        model: Transformer,
        *,
        eos_ids: tuple[int, ...] = (),
        max_batch: int = 16,
        max_queue: int = 64,
        max_context: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk),
                            ("max_context", 1 if max_context is None else max_context)):  # fmt: skip
            if type(value) is not int or value < 1:
                raise SchedulerError(f"scheduler: {name} must be an integer of at least 1, got {value!r}")
        self.model = model
        self.eos_ids = frozenset(eos_ids)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.context = model.args.context if max_context is None else min(max_context, model.args.context)
        self.stats = BatchStats()
        self._lock = threading.Condition()  # guards the lists below; notified when work arrives
        self._stepping = threading.Lock()  # one step at a time
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._cancelled: list[Sequence] = []  # cancelled while waiting: finished by the next step
        self._ids = itertools.count()
        self._phase: str | None = None  # what the expert backend was last told

    # -- any thread ---------------------------------------------------------------------------------------------------

    def submit(
        self,
        prompt: list[int],
        options: SamplingOptions,
        *,
        on_token: TokenCallback | None = None,
        on_done: DoneCallback | None = None,
        replay: RoutingReplay | None = None,
    ) -> Sequence:
        """Queue a generation of up to ``options.max_new_tokens`` tokens after ``prompt``.

        Args:
            prompt: token ids.
            options: how to sample; ``truncate`` keeps the prompt's last tokens when it does not fit.
            on_token: called (from the scheduler's thread) with each new token; returning True ends the sequence
                with finish reason ``stop`` (stop strings).
            on_done: called once with the result when the sequence finishes (``length``, ``stop``, ``cancelled`` or
                ``error``), before ``done`` is set.
            replay: the routing trace this sequence follows instead of the router (None: the model's
                `Transformer.replay`, if any).

        Raises:
            PromptError: the prompt is empty, holds ids outside the vocabulary, or does not fit the context
                (`fit_context`, with ``max_context``).
            QueueFullError: ``max_queue`` sequences are already waiting.
        """
        if not prompt:
            raise PromptError("the prompt has no tokens")
        check_token_ids(prompt, self.model.args.vocab_size)
        kept = list(fit_context(prompt, options.max_new_tokens, self.context, options.truncate))
        result = GenerationResult(prompt_tokens=len(kept), dropped_tokens=len(prompt) - len(kept))
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the queue is full: {len(self._waiting)} sequences are waiting (at most "
                                     f"{self.max_queue}); try again later")  # fmt: skip
            seq = Sequence(next(self._ids), kept, options, result, on_token, on_done, replay)
            self._waiting.append(seq)
            self._lock.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """End ``seq`` at the next step (finish reason ``cancelled``, its cache freed); nothing if it has finished."""
        with self._lock:
            if seq.done.is_set() or seq.cancelled:
                return
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                self._cancelled.append(seq)
            self._lock.notify_all()

    def wake(self) -> None:
        """Wake `serve_forever` now (after its stop event was set, say)."""
        with self._lock:
            self._lock.notify_all()

    @property
    def active(self) -> int:
        """Sequences admitted and not finished."""
        with self._lock:
            return len(self._active)

    @property
    def waiting(self) -> int:
        """Sequences submitted and not admitted yet."""
        with self._lock:
            return len(self._waiting)

    # -- the scheduler's thread ---------------------------------------------------------------------------------------

    def step(self) -> int:
        """Admit waiting sequences up to ``max_batch``, run one forward pass for all active ones, sample, and retire
        those that finished. An exception in the forward pass fails the sequences of this step only (`Sequence.error`);
        one in a sequence's sampling or ``on_token`` fails that sequence.

        Returns:
            The number of active sequences after the step.
        """
        with self._stepping:
            self._admit()
            batch = self._form()
            if not batch:
                return self.active
            prefill = any(seq.prefilling for seq, _ in batch)
            try:
                self._tell_phase(PREFILL if prefill else DECODE)
                logits = self._forward(batch).cpu()  # [S, V]
            except Exception as exc:  # a storage error, say: this step's sequences fail, the others go on
                for seq, _ in batch:
                    self._retire(seq, FINISH_ERROR, exc)
                return self.active
            self.stats.steps += 1
            self.stats.batch_sizes += len(batch)
            for (seq, tokens), row in zip(batch, logits):
                if seq.prefilling:
                    self.stats.prompt_tokens += len(tokens)
                seq._position += len(tokens)
                if seq.cancelled:
                    self._retire(seq, FINISH_CANCELLED)
                elif not seq.prefilling:
                    try:
                        reason = self._emit(seq, row)
                    except Exception as exc:  # in on_token, say
                        self._retire(seq, FINISH_ERROR, exc)
                        continue
                    if reason is not None:
                        self._retire(seq, reason)
            return self.active

    def run_until_idle(self) -> None:
        """Step until no sequence is active, waiting or cancelled-but-unfinished."""
        while True:
            self.step()
            with self._lock:
                if not (self._active or self._waiting or self._cancelled):
                    return

    def serve_forever(self, stop: threading.Event) -> None:
        """Step whenever there is work, wait for it when there is none, until ``stop`` is set (`wake` makes that
        immediate); then every unfinished sequence is cancelled (``on_done`` called, ``done`` set)."""
        while not stop.is_set():
            with self._lock:
                while not (self._active or self._waiting or self._cancelled) and not stop.is_set():
                    self._lock.wait(IDLE_POLL_SECONDS)
            if stop.is_set():
                break
            try:
                self.step()
            except Exception as exc:  # a bug of the scheduler itself: fail what it holds rather than die silently
                for seq in list(self._active):
                    self._retire(seq, FINISH_ERROR, exc)
        with self._stepping:
            with self._lock:
                left = [*self._cancelled, *self._active, *self._waiting]
                self._cancelled.clear()
                self._waiting.clear()
            for seq in left:
                seq.cancelled = True
                self._retire(seq, FINISH_CANCELLED)

    # -- inside a step ------------------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Retire cancelled sequences; give waiting ones a cache and a sampler, up to ``max_batch`` active."""
        with self._lock:
            gone = [*self._cancelled, *(seq for seq in self._active if seq.cancelled)]
            self._cancelled.clear()
            room = self.max_batch - (len(self._active) - sum(seq.cancelled for seq in self._active))
            admitted = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        for seq in gone:
            self._retire(seq, FINISH_CANCELLED)
        for seq in admitted:
            try:
                seq._cache = self.model.new_cache(len(seq.prompt) + seq.options.max_new_tokens)
                seq._sampler = Sampler(seq.options, seq.prompt)
            except Exception as exc:  # no memory for its cache, say
                self._retire(seq, FINISH_ERROR, exc)
                continue
            with self._lock:
                self._active.append(seq)

    def _form(self) -> list[tuple[Sequence, list[int]]]:
        """The tokens each active sequence runs in this step: its last token, or its prompt's next chunk (within
        the step's ``prefill_chunk`` prompt tokens); a sequence left without prompt tokens sits this step out."""
        batch = []
        budget = self.prefill_chunk
        for seq in self._active:
            if not seq.prefilling:
                batch.append((seq, [seq._next]))
            elif budget > 0:
                tokens = seq.prompt[seq._position : seq._position + budget]
                budget -= len(tokens)
                batch.append((seq, tokens))
        return batch

    def _tell_phase(self, phase: str) -> None:
        """Tell the expert backend when the phase changes (a step holding any prompt tokens is ``prefill``)."""
        if phase != self._phase:
            self.model.experts.on_phase(phase)
            self._phase = phase

    def _forward(self, batch: list[tuple[Sequence, list[int]]]) -> torch.Tensor:
        device = self.model.device
        segments = [
            Segment(torch.tensor(tokens, device=device), seq._position, seq._cache, seq.replay) for seq, tokens in batch
        ]
        if len(segments) == 1:  # the one-segment case of forward_batch
            tokens, start, cache, replay = segments[0]
            return self.model.forward(tokens, start, cache, replay=replay)[None]
        return self.model.forward_batch(segments)

    def _emit(self, seq: Sequence, logits: torch.Tensor) -> str | None:
        """Sample ``seq``'s next token and hand it out; why it finished, or None when it goes on."""
        token = seq._sampler.next(logits)
        now = time.perf_counter()
        result = seq.result
        if result.tokens:
            result.step_seconds.append(now - seq._last)
        else:
            result.ttft = now - seq._submitted
        result.tokens.append(token)
        self.stats.tokens += 1
        stop = seq._on_token is not None and seq._on_token(token) is True
        seq._last = time.perf_counter()
        if stop or (seq.options.stop_at_eos and token in self.eos_ids):
            return FINISH_STOP
        if len(result.tokens) >= seq.options.max_new_tokens:
            return FINISH_LENGTH
        seq._next = token
        return None

    def _retire(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        """Finish ``seq``: out of the batch, its cache freed, ``on_done`` called, ``done`` set."""
        with self._lock:
            if seq in self._active:
                self._active.remove(seq)
        seq._cache = None
        seq._sampler = None
        seq.result.finish_reason = reason
        if error is not None:
            seq.error = error
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        try:
            if seq._on_done is not None:
                seq._on_done(seq.result)
        except Exception as exc:  # the callback's own failure: kept on the sequence, the scheduler goes on
            seq.error = seq.error or exc
        finally:
            seq.done.set()
