"""``zipmoe chat``."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

from zipmoe.cli._engine_options import (
    CriticalThresholdOpt,
    DecodedFractionOpt,
    DeviceOpt,
    DtypeOpt,
    FrequencyPenaltyOpt,
    IoOpt,
    MaxNewTokensOpt,
    MemoryBudgetOpt,
    MinPOpt,
    ModeOpt,
    PlanOpt,
    PolicyOpt,
    PresencePenaltyOpt,
    RepetitionPenaltyOpt,
    ScheduleOpt,
    SeedOpt,
    SimulateStorageOpt,
    StopOpt,
    TemperatureOpt,
    TiersOpt,
    TopKOpt,
    TopPOpt,
    WarmupOpt,
)
from zipmoe.cli._options import ModelArg, QuietOpt, ThreadsOpt
from zipmoe.cli._output import human_bytes, prepare_codecs, stderr, styled, table, warn
from zipmoe.errors import ZipmoeError
from zipmoe.runtime.policies import DEFAULT_THRESHOLD

NAME = "chat"
EPILOG = """Examples:

  zipmoe chat qwen-moe.zmoe --memory-budget 8GiB

  zipmoe chat qwen-moe.zmoe --system "You answer in one sentence." --temperature 0.7 --seed 1

  printf 'Hello!\\nAnd in French?\\n/stats\\n' | zipmoe chat qwen-moe.zmoe -n 64     # one turn a line, from a pipe

Each line is a user turn; the reply streams to stdout. /reset forgets the conversation (the system prompt stays),
/stats shows the expert cache and the speed so far, /help lists the commands, /exit, /quit or Ctrl-D ends. The
model, its expert cache and the conversation stay loaded between turns; when the conversation would not fit the
model's context, its oldest turns are dropped (a note on stderr says so). The container needs a chat template.
Sampling flags left unset take the container's generation_config.json values (greedy unless it sets do_sample).
"""
DEFAULT_MAX_NEW_TOKENS = 256  # a reply; --max-new-tokens changes it
CHAT_COMMANDS = {
    "/reset": "forget the conversation (the system prompt stays)",
    "/stats": "the expert cache, bytes read and tokens/s so far",
    "/help": "this list",
    "/exit": "end the chat (also /quit, Ctrl-D)",
    "/quit": "end the chat",
}


def command(
    container: ModelArg,
    system: Annotated[
        Optional[str], typer.Option("--system", help="A system prompt, kept through /reset and trimming.")
    ] = None,
    max_new_tokens: MaxNewTokensOpt = DEFAULT_MAX_NEW_TOKENS,
    memory_budget: MemoryBudgetOpt = None,
    tiers: TiersOpt = None,
    decoded_fraction: DecodedFractionOpt = None,
    policy: PolicyOpt = "lfu",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    io: IoOpt = "buffered",
    simulate_storage: SimulateStorageOpt = None,
    plan: PlanOpt = None,
    schedule: ScheduleOpt = None,
    mode: ModeOpt = "lossless",
    critical_threshold: CriticalThresholdOpt = DEFAULT_THRESHOLD,
    warmup: WarmupOpt = "pcw",
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    frequency_penalty: FrequencyPenaltyOpt = None,
    presence_penalty: PresencePenaltyOpt = None,
    stop: StopOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Chat with the model in a container: one user turn a line, the history kept within its context."""
    from zipmoe.extras import RUNTIME, require

    require("zipmoe chat", *RUNTIME)
    from zipmoe.cli._engine_options import engine_options, sampling_flags
    from zipmoe.cli.models import model_container
    from zipmoe.runtime.conversation import Conversation

    flags = sampling_flags(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        stop=stop, seed=seed,
    )  # fmt: skip
    path = model_container(container, quiet=quiet)  # a checkpoint directory or Hub repo: packed into the store once
    options = engine_options(
        device=device, dtype=dtype, memory_budget=memory_budget, tiers=tiers, decoded_fraction=decoded_fraction,
        policy=policy, threads=threads, io=io, simulate_storage=simulate_storage, mode=mode,
        critical_threshold=critical_threshold, warmup=warmup, plan=plan, schedule=schedule,
    )  # fmt: skip
    conversation = Conversation(system)
    _check_chat_template(path, conversation, container)  # before the weights load
    from zipmoe.runtime.engine import Engine

    interactive = sys.stdin is not None and sys.stdin.isatty()
    prepare_codecs(quiet=quiet)
    with Engine(path, options) as engine:
        if engine.storage.warning and not quiet:
            warn(engine.storage.warning)
        for warning in [] if quiet else engine.generation_warnings:
            warn(warning)
        sampling = engine.default_sampling(**flags)  # unset flags: the container's generation_config.json
        if interactive and not quiet:
            stderr.print(f"Chatting with {container}: /help lists the commands, /exit or Ctrl-D ends.")
        _Session(engine, conversation, sampling, quiet, interactive).run()


def _check_chat_template(path: Path, conversation, model: str) -> None:
    """Fail before the model loads when the container has no chat template, or one that cannot render a first turn
    of this conversation (a template may refuse a system prompt, for one). ``model`` is MODEL as the user gave it."""
    from zipmoe.formats.reader import Container
    from zipmoe.runtime.tokenizer import TextTokenizer, TokenizerError

    with Container(path) as opened:
        tokenizer = TextTokenizer.from_container(opened)
    if tokenizer.template_source is None:
        raise TokenizerError(
            f"{model}: no chat template embedded (chat_template.jinja, tokenizer_config.json or chat_template.json); "
            "zipmoe chat needs one (zipmoe run completes plain text)"
        )
    tokenizer.apply_chat_template(conversation.messages("Hello"), add_generation_prompt=True)


@dataclass
class _Totals:
    """What the turns of this session generated, and how fast."""

    turns: int = 0
    new_tokens: int = 0
    decode_tokens: int = 0  # tokens after each reply's first
    decode_seconds: float = 0.0
    ttft_seconds: list[float] = field(default_factory=list)
    last_prompt_tokens: int = 0


class _Session:
    """Reads turns and commands, streams replies; one engine and one conversation for the whole session."""

    def __init__(self, engine, conversation, sampling, quiet: bool, interactive: bool) -> None:
        self.engine = engine
        self.conversation = conversation
        self.sampling = sampling
        self.quiet = quiet
        self.interactive = interactive
        self.totals = _Totals()

    def run(self) -> None:
        """Until end of input or /exit. At a terminal an error ends the turn, not the chat; from a pipe it ends the
        chat (exit status 1), so scripts see it."""
        for number, line in enumerate(self._lines(), start=1):
            text = line.strip()  # a turn's surrounding blanks are not the message's
            if not text:
                continue
            try:
                if text.split()[0] in ("/exit", "/quit"):
                    return
                if text.startswith("/"):
                    self._command(text)
                else:
                    self._turn(text)
            except ZipmoeError as exc:
                if not self.interactive:
                    raise ZipmoeError(f"standard input, line {number}: {exc}") from None
                stderr.print(styled("Error:", "red", " " + " ".join(str(exc).split())))

    def _lines(self):
        """The lines of standard input: read with line editing at a terminal, within `MAX_PROMPT_BYTES` from a pipe."""
        from zipmoe.runtime.request import MAX_PROMPT_BYTES, PromptError

        if sys.stdin is None:
            raise PromptError("zipmoe chat reads its turns from standard input, and there is none")
        if self.interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:  # pragma: no cover - not on every platform
                pass
            while True:
                try:
                    yield input(">>> " if sys.stdout.isatty() else "")
                except EOFError:
                    stderr.print()
                    return
        number = 0
        while line := sys.stdin.buffer.readline(MAX_PROMPT_BYTES + 1):
            number += 1
            if len(line) > MAX_PROMPT_BYTES:
                raise PromptError(f"standard input, line {number}: longer than {MAX_PROMPT_BYTES >> 20} MiB")
            try:
                yield line.decode("utf-8").removesuffix("\n").removesuffix("\r")
            except UnicodeDecodeError as exc:
                raise PromptError(f"standard input, line {number}: not valid UTF-8 ({exc.reason})") from None

    def _turn(self, text: str) -> None:
        """One user message: fit the conversation to the context, stream the reply, keep the turn."""
        engine = self.engine
        prompt = self.conversation.prompt(text, engine.encode_chat, engine.args.context, self.sampling.max_new_tokens)
        if prompt.dropped_turns and not self.quiet:
            turns = "turn was" if prompt.dropped_turns == 1 else "turns were"
            kept = " (the system prompt is kept)" if self.conversation.system is not None else ""
            warn(
                f"the conversation's oldest {prompt.dropped_turns} {turns} dropped to fit the model's context of "
                f"{engine.args.context} tokens{kept}"
            )

        def write(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        reply, result = engine.generate_text_from(prompt.ids, self.sampling, on_text=write)
        write("\n")
        self.conversation.add(text, reply)
        totals = self.totals
        totals.turns += 1
        totals.new_tokens += len(result.tokens)
        totals.decode_tokens += len(result.step_seconds)
        totals.decode_seconds += sum(result.step_seconds)
        totals.ttft_seconds.append(result.ttft)
        totals.last_prompt_tokens = len(prompt.ids)

    def _command(self, text: str) -> None:
        name = text.split()[0]
        if name == "/reset":
            self.conversation.reset()
            stderr.print(
                "The conversation is forgotten" + (" (the system prompt stays)." if self.conversation.system else ".")
            )
        elif name == "/stats":
            stderr.print(self._stats_table())
        elif name == "/help":
            for command_name, meaning in CHAT_COMMANDS.items():
                stderr.print(f"{command_name:8} {meaning}")
        else:
            raise ZipmoeError(f"unknown command {name} (commands: {', '.join(CHAT_COMMANDS)})")

    def _stats_table(self):
        from zipmoe.cli.run import cache_rows

        engine, totals = self.engine, self.totals
        t = table("", "value", title="zipmoe chat")
        t.add_row("turns (kept in the conversation / in all)", f"{len(self.conversation.turns)} / {totals.turns}")
        t.add_row("last prompt (tokens / context)", f"{totals.last_prompt_tokens} / {engine.args.context}")
        t.add_row("tokens generated", str(totals.new_tokens))
        ttft = totals.ttft_seconds
        t.add_row("time to first token (mean)", f"{sum(ttft) / len(ttft) * 1000:.0f} ms" if ttft else "-")
        speed = totals.decode_tokens / totals.decode_seconds if totals.decode_seconds > 0 else None
        t.add_row("tokens/s", f"{speed:.2f}" if speed is not None else "-")
        for row in cache_rows(engine.pipeline.stats, engine.mode):
            t.add_row(*row)
        budget = human_bytes(engine.budget)
        t.add_row("expert memory (peak / budget)", f"{human_bytes(engine.pipeline.stats.peak_bytes)} / {budget}")
        return t
