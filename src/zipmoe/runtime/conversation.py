"""A multi-turn conversation kept within a model's context: the system prompt, the turns so far, the next prompt.

`zipmoe chat` keeps one `Conversation`; a server can keep one per session. Each new user message is rendered with
everything before it through the chat template (``add_generation_prompt``); when that prompt and the tokens asked for
would not fit the model's context, the oldest turns (a user message and its reply) are dropped, one at a time, until
it does. The system prompt is always kept. Rendering and tokenizing are the caller's (`Engine.encode_chat`), so this
module needs neither torch nor a tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from zipmoe.runtime.request import PromptError, check_prompt

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"


@dataclass(frozen=True)
class Turn:
    """A user message and the model's reply."""

    user: str
    assistant: str


@dataclass
class Prompt:
    """The token ids of the conversation up to the reply to come, and how many old turns were dropped to fit."""

    ids: list[int]
    dropped_turns: int = 0


@dataclass
class Conversation:
    """The system prompt (None: none) and the turns so far, oldest first."""

    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.system is not None:
            try:
                check_prompt(self.system)
            except PromptError as exc:
                raise PromptError(f"--system: {exc}") from None

    def messages(self, user: str | None = None, first_turn: int = 0) -> list[dict[str, str]]:
        """The chat-template messages: the system prompt, the turns from ``first_turn`` on, and the new message
        ``user`` if given."""
        messages = [{"role": SYSTEM, "content": self.system}] if self.system is not None else []
        for turn in self.turns[first_turn:]:
            messages += [{"role": USER, "content": turn.user}, {"role": ASSISTANT, "content": turn.assistant}]
        if user is not None:
            messages.append({"role": USER, "content": user})
        return messages

    def prompt(
        self, user: str, encode: Callable[[list[dict[str, str]]], list[int]], context: int, max_new_tokens: int
    ) -> Prompt:
        """The prompt for ``user``'s new message, dropping the oldest turns (for good) until it and
        ``max_new_tokens`` more fit ``context`` tokens.

        Args:
            user: the new message (not yet a turn: `add` it with the reply).
            encode: messages to token ids, through the chat template, ready for the assistant's reply.
            context: the model's context, in tokens.
            max_new_tokens: the most tokens the reply may have.

        Raises:
            PromptError: the message is empty or not UTF-8, or the system prompt and the message alone leave no
                room; the history is then left as it was.
        """
        check_prompt(user)
        room = context - max_new_tokens
        if room < 1:
            raise PromptError(
                f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of {context} "
                "tokens"
            )
        for dropped in range(len(self.turns) + 1):
            ids = encode(self.messages(user, dropped))
            if len(ids) <= room:
                del self.turns[:dropped]
                return Prompt(ids, dropped)
        who = "the system prompt and this message take" if self.system is not None else "this message takes"
        raise PromptError(
            f"{who} {len(ids)} tokens; with --max-new-tokens {max_new_tokens} more that exceeds the model's context "
            f"of {context} tokens"
        )

    def add(self, user: str, assistant: str) -> None:
        """Record a turn: ``user``'s message and the reply it got."""
        self.turns.append(Turn(user, assistant))

    def reset(self) -> None:
        """Forget every turn; the system prompt stays."""
        self.turns.clear()
