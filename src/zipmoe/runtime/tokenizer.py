"""The tokenizer and chat template embedded in a container, without transformers.

``tokenizer.json`` is loaded with the ``tokenizers`` library. The chat template comes from ``chat_template.jinja``,
else ``tokenizer_config.json`` (``chat_template``), else ``chat_template.json``, and is rendered as transformers renders
it, with the same variables, in a sandbox that bounds its size and time (see `zipmoe.runtime.chat_template`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zipmoe._json import load_json
from zipmoe.errors import FormatError, ZipmoeError
from zipmoe.formats.reader import Container

if TYPE_CHECKING:
    from zipmoe.runtime.chat_template import ChatTemplate

# The special tokens transformers passes to chat templates, those the tokenizer config sets.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class TokenizerError(ZipmoeError, ValueError):
    """The container's tokenizer or chat template cannot be used as asked."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """Encode prompts and decode generated tokens with the tokenizer embedded in a container."""

    def __init__(
        self, tokenizer_json: str, config: dict[str, Any] | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        """Load a tokenizer.

        Args:
            tokenizer_json: the text of ``tokenizer.json``.
            config: ``tokenizer_config.json``, parsed.
            files: the embedded template files, by name (``chat_template.jinja``, ``chat_template.json``).

        Raises:
            TokenizerError: ``tokenizer.json`` cannot be loaded. A bad chat template fails only when it is used.
        """
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises its own exception type for malformed files
            raise TokenizerError(f"tokenizer.json cannot be loaded ({exc})") from None
        self.config = config or {}
        files = files or {}
        # (origin, value): the file's bytes or the config's value, compiled on first use
        self.template_source: tuple[str, Any] | None = None
        if "chat_template.jinja" in files:
            self.template_source = ("chat_template.jinja", files["chat_template.jinja"])
        elif self.config.get("chat_template") is not None:
            self.template_source = ("tokenizer_config.json", self.config["chat_template"])
        elif "chat_template.json" in files:
            self.template_source = ("chat_template.json", files["chat_template.json"])
        self._chat_template: ChatTemplate | None = None

    @classmethod
    def from_container(cls, container: Container) -> TextTokenizer:
        """The tokenizer embedded in ``container``.

        Raises:
            TokenizerError: no ``tokenizer.json``, or one that cannot be loaded.
            FormatError: ``tokenizer_config.json`` is not a JSON object.
        """
        names = {f.name for f in container.manifest.files}
        if "tokenizer.json" not in names:
            raise TokenizerError(
                f"{container.path}: no tokenizer.json embedded (zipmoe run needs a fast tokenizer; "
                "tokenizer.model-only checkpoints are not supported)"
            )
        config = None
        if "tokenizer_config.json" in names:
            config = load_json(
                container.read_file("tokenizer_config.json"),
                lambda reason: FormatError(f"{container.path}: tokenizer_config.json: {reason}"),
            )
            if not isinstance(config, dict):
                raise FormatError(
                    f"{container.path}: tokenizer_config.json: expected a JSON object, got {type(config).__name__}"
                )
        files = {name: container.read_file(name) for name in TEMPLATE_FILES if name in names}
        return cls(container.read_file("tokenizer.json").decode(), config, files)

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt; with ``chat`` the prompt is one user message through the chat template."""
        if chat:
            if self.template_source is None:
                raise TokenizerError("the tokenizer has no chat template; run without --chat")
            text = self.apply_chat_template([{"role": "user", "content": text}])
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(text).ids

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text for ``messages``, as transformers' ``apply_chat_template(..., tokenize=False)`` renders it.

        Raises:
            TokenizerError: no chat template, or one that cannot be compiled or rendered (one line naming it).
        """
        from zipmoe.runtime.chat_template import ChatTemplate

        if self._chat_template is None:
            if self.template_source is None:
                raise TokenizerError("the tokenizer has no chat template")
            self._chat_template = ChatTemplate(*self.template_source)
        tokens = {name: _token_text(self.config.get(name)) for name in SPECIAL_TOKENS}
        return self._chat_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            **{name: token for name, token in tokens.items() if token is not None},
        )

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)


class StreamDecoder:
    """Turns a growing list of token ids into text increments, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character still incomplete
            return ""
        new = text[len(self.emitted) :]
        self.emitted = text
        return new
