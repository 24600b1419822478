"""Continuous batching (`zipmoe.runtime.batching`): a batch of one is `generate`, every sequence of a batch gets the
tokens it gets alone, sequences join, leave and are cancelled between steps, an expert a batch shares is read once,
each sequence follows its own routing trace, and a failing step fails only its own sequences."""

import threading

import numpy as np
import pytest
import torch

from zipmoe.runtime.batching import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    BatchScheduler,
    QueueFullError,
    SchedulerError,
)
from zipmoe.runtime.engine import Engine, EngineOptions
from zipmoe.runtime.generate import PromptError, SamplingOptions, generate
from zipmoe.runtime.model import InMemoryExperts, Segment, Transformer
from zipmoe.runtime.routing import RoutingReplay, RoutingTrace, synthetic_trace
from zipmoe.runtime.weights import load_checkpoint

CPU = torch.device("cpu")
PROMPT = [5, 17, 42, 99, 3, 250, 7, 8, 120, 64]
# Four sequences of different prompt lengths and lengths of generation.
PROMPTS = [PROMPT, [1, 2, 3], list(range(10, 60)), [77]]
NEW_TOKENS = [9, 4, 12, 6]


def greedy(n: int, **kwargs) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=n, stop_at_eos=False, **kwargs)


@pytest.fixture(scope="module")
def tiny(checkpoints):
    args, dense, experts = load_checkpoint(checkpoints.demo("tiny"), CPU, torch.float32)
    return Transformer(args, dense, InMemoryExperts(experts))


@pytest.fixture(scope="module")
def tiny_deepseek(checkpoints):
    args, dense, experts = load_checkpoint(checkpoints.demo("tiny-deepseek"), CPU, torch.float32)
    assert args.mla is not None
    return Transformer(args, dense, InMemoryExperts(experts))


@pytest.fixture(scope="module")
def alone(tiny):
    """The greedy tokens of each of `PROMPTS`, generated alone."""
    return [generate(tiny, p, greedy(n)).tokens for p, n in zip(PROMPTS, NEW_TOKENS)]


def submit_all(scheduler, prompts=PROMPTS, new_tokens=NEW_TOKENS, **kwargs):
    return [scheduler.submit(p, greedy(n), **kwargs) for p, n in zip(prompts, new_tokens)]


# -- one mechanism --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "tiny_deepseek"])
def test_a_batch_of_one_gives_the_tokens_and_fields_of_generate(model, request):
    model = request.getfixturevalue(model)
    options = SamplingOptions(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3, stop_at_eos=False)
    expected = generate(model, PROMPT, options)
    scheduler = BatchScheduler(model)
    seq = scheduler.submit(PROMPT, options)
    scheduler.run_until_idle()
    got = seq.result
    assert got.tokens == expected.tokens and len(got.tokens) == 8
    assert (got.prompt_tokens, got.finish_reason, len(got.step_seconds)) == (10, FINISH_LENGTH, 7)
    assert got.ttft > 0 and seq.done.is_set() and seq.error is None
    assert scheduler.stats.steps == 8 and scheduler.stats.mean_batch == 1.0  # the prefill, then 7 decode steps


def test_forward_is_the_one_segment_case_of_forward_batch(tiny):
    tokens = torch.tensor(PROMPT)
    one = tiny.forward(tokens, 0, tiny.new_cache(16))
    batch = tiny.forward_batch([Segment(tokens, 0, tiny.new_cache(16))])
    assert batch.shape == (1, tiny.args.vocab_size) and torch.equal(batch[0], one)
    with pytest.raises(ValueError, match="at least one segment"):
        tiny.forward_batch([])
    with pytest.raises(ValueError, match="sequence of 10 tokens exceeds the cache of 4"):
        tiny.forward_batch([Segment(tokens, 0, tiny.new_cache(16)), (tokens, 0, tiny.new_cache(4))])


@pytest.mark.parametrize("model", ["tiny", "tiny_deepseek"])
def test_segments_of_a_batch_get_their_own_logits_and_caches(model, request):
    """Prompts of different lengths in one pass, then one decode token each at its own position."""
    model = request.getfixturevalue(model)
    own = [model.new_cache(64) for _ in PROMPTS]
    alone = [model.forward(torch.tensor(p), 0, c) for p, c in zip(PROMPTS, own)]
    shared = [model.new_cache(64) for _ in PROMPTS]
    batch = model.forward_batch([(torch.tensor(p), 0, c) for p, c in zip(PROMPTS, shared)])
    assert batch.shape == (len(PROMPTS), model.args.vocab_size)
    for expected, got in zip(alone, batch):
        assert torch.allclose(got, expected, rtol=0, atol=1e-5)
    alone = [model.forward(torch.tensor([7]), len(p), c) for p, c in zip(PROMPTS, own)]
    batch = model.forward_batch([(torch.tensor([7]), len(p), c) for p, c in zip(PROMPTS, shared)])
    for expected, got in zip(alone, batch):
        assert torch.allclose(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)  # the same token, other sequences: other logits


# -- continuous batching ------------------------------------------------------------------------------------------


def test_sequences_decoded_together_get_the_tokens_they_get_alone(tiny, alone):
    scheduler = BatchScheduler(tiny)
    seqs = submit_all(scheduler)
    scheduler.run_until_idle()
    assert [s.result.tokens for s in seqs] == alone
    assert all(s.result.finish_reason == FINISH_LENGTH and s.done.is_set() for s in seqs)
    stats = scheduler.stats
    # the prompts (64 tokens) fit one step; then one step per token of the longest
    assert stats.steps == max(NEW_TOKENS) and stats.tokens == sum(NEW_TOKENS) and stats.prompt_tokens == 64
    assert stats.batch_sizes == sum(NEW_TOKENS) and stats.mean_batch > 2
    assert (scheduler.active, scheduler.waiting) == (0, 0)


@pytest.mark.parametrize("model", ["tiny_deepseek"])
def test_latent_attention_batches_too(model, request):
    model = request.getfixturevalue(model)
    expected = [generate(model, p, greedy(n)).tokens for p, n in zip(PROMPTS, NEW_TOKENS)]
    scheduler = BatchScheduler(model, prefill_chunk=16)
    seqs = submit_all(scheduler)
    scheduler.run_until_idle()
    assert [s.result.tokens for s in seqs] == expected


class PhaseSpy:
    """An expert backend that notes the phases it is told of and runs the model's own."""

    def __init__(self, inner) -> None:
        self.inner, self.phases = inner, []

    def on_phase(self, phase: str) -> None:
        self.phases.append(phase)

    def run(self, *args):
        return self.inner.run(*args)


def test_prompts_share_the_prefill_chunk_and_join_decoding_steps(tiny, alone):
    """A step runs at most ``prefill_chunk`` prompt tokens over all sequences, beside the others' decode tokens."""
    scheduler = BatchScheduler(tiny, prefill_chunk=8)
    experts = tiny.experts
    tiny.experts = spy = PhaseSpy(experts)
    try:
        sizes = []
        seqs = submit_all(scheduler)
        while scheduler.active or scheduler.waiting:
            scheduler.step()
            sizes.append(scheduler.stats.prompt_tokens)
    finally:
        tiny.experts = experts
    assert [s.result.tokens for s in seqs] == alone
    per_step = np.diff([0, *sizes])
    assert per_step.max() == 8 and per_step.sum() == 64 and list(per_step[:8]) == [8] * 8
    assert spy.phases == ["prefill", "decode"]  # told when the phase changes, not every step


def test_sequences_join_mid_way(tiny, alone):
    scheduler = BatchScheduler(tiny)
    first = scheduler.submit(PROMPTS[2], greedy(NEW_TOKENS[2]))
    for _ in range(3):
        scheduler.step()
    assert len(first.result.tokens) == 3
    late = scheduler.submit(PROMPTS[0], greedy(NEW_TOKENS[0]))
    scheduler.step()  # the newcomer's prompt beside the first one's decode token
    assert (len(first.result.tokens), len(late.result.tokens)) == (4, 1)
    scheduler.run_until_idle()
    assert (first.result.tokens, late.result.tokens) == (alone[2], alone[0])


def test_max_batch_holds_the_rest_waiting(tiny, alone):
    scheduler = BatchScheduler(tiny, max_batch=2)
    seqs = submit_all(scheduler)
    scheduler.step()
    assert (scheduler.active, scheduler.waiting) == (2, 2)
    scheduler.run_until_idle()
    assert [s.result.tokens for s in seqs] == alone and scheduler.stats.batch_sizes == sum(NEW_TOKENS)


def test_cancel_frees_the_slot_at_the_next_step(tiny, alone):
    done = []
    scheduler = BatchScheduler(tiny, max_batch=1)
    long = scheduler.submit(PROMPT, greedy(50), on_done=done.append)
    other = scheduler.submit(PROMPTS[1], greedy(NEW_TOKENS[1]))
    for _ in range(3):
        scheduler.step()
    assert (scheduler.active, scheduler.waiting, len(long.result.tokens)) == (1, 1, 3)
    scheduler.cancel(long)
    assert long.cancelled and not long.done.is_set()
    scheduler.step()  # the cancelled sequence leaves, the waiting one takes its place
    assert long.done.is_set() and long.result.finish_reason == FINISH_CANCELLED and len(long.result.tokens) == 3
    assert long._cache is None and done == [long.result]
    assert (scheduler.active, scheduler.waiting, len(other.result.tokens)) == (1, 0, 1)
    scheduler.run_until_idle()
    assert other.result.tokens == alone[1]
    scheduler.cancel(long)  # finished: nothing happens
    assert done == [long.result]


def test_cancel_while_waiting(tiny):
    scheduler = BatchScheduler(tiny, max_batch=1, max_queue=1)
    running = scheduler.submit(PROMPT, greedy(3))
    scheduler.step()
    queued = scheduler.submit(PROMPT, greedy(3))
    scheduler.cancel(queued)
    assert scheduler.waiting == 0
    scheduler.submit(PROMPT, greedy(3))  # its place in the queue is free at once
    scheduler.run_until_idle()
    assert queued.result.finish_reason == FINISH_CANCELLED and queued.result.tokens == []
    assert running.result.finish_reason == FINISH_LENGTH


def test_queue_full_raises_until_sequences_are_admitted(tiny):
    scheduler = BatchScheduler(tiny, max_batch=4, max_queue=2)
    scheduler.submit(PROMPT, greedy(2))
    scheduler.submit(PROMPT, greedy(2))
    with pytest.raises(QueueFullError, match=r"the queue is full: 2 sequences are waiting \(at most 2\)"):
        scheduler.submit(PROMPT, greedy(2))
    scheduler.step()
    assert scheduler.waiting == 0
    scheduler.submit(PROMPT, greedy(2))
    scheduler.run_until_idle()


def test_submit_validates_the_prompt_at_once(tiny):
    scheduler = BatchScheduler(tiny, max_context=16)
    with pytest.raises(PromptError, match="the prompt has no tokens"):
        scheduler.submit([], greedy(2))
    with pytest.raises(PromptError, match="token id 259, outside the model's vocabulary of 259"):
        scheduler.submit([1, 259], greedy(2))
    with pytest.raises(PromptError, match="the prompt has 10 tokens and --max-new-tokens 8 asks for 8 more"):
        scheduler.submit(PROMPT, greedy(8))
    seq = scheduler.submit(PROMPT, greedy(8, truncate=True))
    assert (seq.result.prompt_tokens, seq.result.dropped_tokens) == (8, 2) and seq.prompt == PROMPT[2:]
    assert scheduler.waiting == 1
    for bad in ({"max_batch": 0}, {"max_queue": -1}, {"prefill_chunk": 0}, {"max_context": 0}):
        with pytest.raises(SchedulerError, match="must be an integer of at least 1"):
            BatchScheduler(tiny, **bad)


def test_on_token_stops_a_sequence_and_eos_ends_another(tiny, alone):
    eos_id = alone[0][2]
    scheduler = BatchScheduler(tiny, eos_ids=(eos_id,))
    seen = []
    stopped = scheduler.submit(PROMPTS[2], greedy(NEW_TOKENS[2]), on_token=lambda t: seen.append(t) or len(seen) == 2)
    eos = scheduler.submit(PROMPT, SamplingOptions(max_new_tokens=9))  # stop_at_eos
    scheduler.run_until_idle()
    assert stopped.result.tokens == seen == alone[2][:2] and stopped.result.finish_reason == FINISH_STOP
    assert eos.result.tokens == alone[0][: alone[0].index(eos_id) + 1] and eos.result.finish_reason == FINISH_STOP


def test_serve_forever_from_a_thread(tiny, alone):
    scheduler = BatchScheduler(tiny)
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.serve_forever, args=(stop,))
    thread.start()
    try:
        seqs = submit_all(scheduler)
        for seq in seqs:
            assert seq.done.wait(30)
        assert [s.result.tokens for s in seqs] == alone
        endless = scheduler.submit(PROMPT, greedy(4000))
    finally:
        stop.set()
        scheduler.wake()
        thread.join(30)
    assert not thread.is_alive()
    assert endless.done.is_set() and endless.result.finish_reason == FINISH_CANCELLED  # cancelled at shutdown


# -- failures -------------------------------------------------------------------------------------------------------


class Failing:
    """An expert backend that raises on chosen calls (1-based), else runs the model's own."""

    def __init__(self, inner, fail_on: set[int]) -> None:
        self.inner, self.fail_on, self.calls = inner, fail_on, 0

    def on_phase(self, phase: str) -> None:
        self.inner.on_phase(phase)

    def run(self, layer, x, top_index, top_weight, top_prob=None):
        self.calls += 1
        if self.calls in self.fail_on:
            raise OSError("storage went away")
        return self.inner.run(layer, x, top_index, top_weight, top_prob)


def test_an_exception_in_a_step_fails_only_that_steps_sequences(tiny, alone):
    experts = tiny.experts
    tiny.experts = Failing(experts, {1})  # the first MoE layer of the first step
    try:
        done = []
        scheduler = BatchScheduler(tiny, max_batch=2)
        seqs = submit_all(scheduler, on_done=done.append)
        scheduler.run_until_idle()
    finally:
        tiny.experts = experts
    failed, ok = seqs[:2], seqs[2:]
    for seq in failed:
        assert seq.result.finish_reason == FINISH_ERROR and isinstance(seq.error, OSError) and seq.done.is_set()
        assert seq._cache is None
    assert [s.result.tokens for s in ok] == alone[2:] and all(s.error is None for s in ok)
    assert len(done) == 4 and scheduler.stats.finished == {FINISH_ERROR: 2, FINISH_LENGTH: 2}


def test_an_exception_in_on_token_fails_that_sequence_alone(tiny, alone):
    def boom(token):
        raise RuntimeError("client went away")

    scheduler = BatchScheduler(tiny)
    bad = scheduler.submit(PROMPT, greedy(5), on_token=boom)
    good = scheduler.submit(PROMPTS[1], greedy(NEW_TOKENS[1]))
    scheduler.run_until_idle()
    assert bad.result.finish_reason == FINISH_ERROR and str(bad.error) == "client went away"
    assert good.result.tokens == alone[1]


def test_generate_raises_what_the_model_raised(tiny):
    experts = tiny.experts
    tiny.experts = Failing(experts, {3})
    try:
        with pytest.raises(OSError, match="storage went away"):
            generate(tiny, PROMPT, greedy(4))
    finally:
        tiny.experts = experts


# -- experts and routing ------------------------------------------------------------------------------------------


def fixed_trace(args, experts_of_request: list[list[int]], tokens: int) -> RoutingTrace:
    """A trace whose request r routes every token at every sparse layer to ``experts_of_request[r]``."""
    layers = sum(args.sparse_layers)
    requests = tuple(np.tile(np.array(chosen, np.int16), (tokens, layers, 1)) for chosen in experts_of_request)
    return RoutingTrace(args.n_experts, args.top_k, layers, requests)


def reads(engine) -> tuple[int, int, int]:
    stats = engine.pipeline.stats
    return sum(stats.storage_reads.values()), stats.total_bytes_read, stats.total_requests


def test_an_expert_the_batch_shares_is_read_once(checkpoints):
    """At the minimum budget nothing stays cached: every use reads storage. Two sequences routed to the same
    experts read what one alone reads; run one after the other, twice as much."""
    packed = checkpoints.packed(checkpoints.demo("tiny"))
    with Engine(packed, EngineOptions(device="cpu", dtype="float32", threads=1)) as e:
        minimum = e.cache_minimum()
    options = EngineOptions(device="cpu", dtype="float32", threads=1, memory_budget=minimum)
    with Engine(packed, options) as e:
        trace = fixed_trace(e.args, [[0, 1]], 32)
        layers = sum(e.args.sparse_layers)
        scheduler = e.scheduler()
        one = scheduler.submit(PROMPT, greedy(4), replay=RoutingReplay(trace))
        scheduler.run_until_idle()
        alone = reads(e)
        # one prefill step and three decode steps, each reading experts 0 and 1 of every sparse layer once
        assert alone[0] == 4 * layers * 2 and alone[1] > 0
        e.pipeline.stats = type(e.pipeline.stats)()
        for prompt in (PROMPT, PROMPT[::-1]):
            scheduler.submit(prompt, greedy(4), replay=RoutingReplay(trace))
            scheduler.run_until_idle()
        assert reads(e) == tuple(2 * n for n in alone)
        e.pipeline.stats = type(e.pipeline.stats)()
        together = [scheduler.submit(p, greedy(4), replay=RoutingReplay(trace)) for p in (PROMPT, PROMPT[::-1])]
        scheduler.run_until_idle()
        assert reads(e) == alone
        assert together[0].result.tokens == one.result.tokens  # the batch changed what was read, not the tokens
        # the union of the batch's misses: experts {0, 1} and {1, 2} read experts 0, 1, 2 once per layer and step
        trace = fixed_trace(e.args, [[0, 1], [1, 2]], 32)
        e.pipeline.stats = type(e.pipeline.stats)()
        for request, prompt in enumerate((PROMPT, PROMPT[::-1])):
            scheduler.submit(prompt, greedy(4), replay=RoutingReplay(trace, request))
        scheduler.run_until_idle()
        assert reads(e)[0] == 4 * layers * 3


class Recorder:
    """Every MoE layer's choices, as the model hands them out: [T, K] per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, np.ndarray]] = []

    def record(self, layer_position, top_index) -> None:
        self.calls.append((layer_position, np.sort(top_index, axis=1)))


def test_each_sequence_follows_its_own_trace_request(tiny):
    args = tiny.args
    layers = sum(args.sparse_layers)
    trace = synthetic_trace("qwen", num_layers=layers, num_experts=args.n_experts, top_k=args.top_k, requests=2,
                            tokens_per_request=16)  # fmt: skip
    replays = [RoutingReplay(trace, 0), RoutingReplay(trace, 1)]
    alone = []
    for replay in replays:
        tiny.replay = replay  # the model-wide trace, as `Engine.replay_routing` sets it
        try:
            alone.append(generate(tiny, PROMPT, greedy(4)).tokens)
        finally:
            tiny.replay = None
    tiny.recorder = recorder = Recorder()
    try:
        scheduler = BatchScheduler(tiny)
        seqs = [scheduler.submit(PROMPT, greedy(4), replay=replay) for replay in replays]
        scheduler.run_until_idle()
    finally:
        tiny.recorder = None
    assert [s.result.tokens for s in seqs] == alone
    # steps: both prompts (positions 0..9 each), then three decode steps (positions 10, 11, 12), the two in order
    spans = [(0, 10), (10, 11), (11, 12), (12, 13)]
    assert len(recorder.calls) == len(spans) * layers
    for i, (layer, chosen) in enumerate(recorder.calls):
        lo, hi = spans[i // layers]
        expected = np.concatenate([np.sort(r.choices(layer, lo, hi - lo), axis=1) for r in replays])
        assert layer == i % layers and np.array_equal(chosen, expected)


def test_a_sequence_without_a_trace_follows_the_router_beside_one_with(tiny):
    args = tiny.args
    trace = fixed_trace(args, [[2, 3]], 32)
    routed = generate(tiny, PROMPT, greedy(5)).tokens
    scheduler = BatchScheduler(tiny)
    free = scheduler.submit(PROMPT, greedy(5))
    traced = scheduler.submit(PROMPT[::-1], greedy(5), replay=RoutingReplay(trace))
    tiny.recorder = recorder = Recorder()
    try:
        scheduler.run_until_idle()
    finally:
        tiny.recorder = None
    assert free.result.tokens == routed and len(traced.result.tokens) == 5
    for _, chosen in recorder.calls:
        half = chosen.shape[0] // 2
        assert (chosen[half:] == [2, 3]).all()
