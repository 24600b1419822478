"""The tokenizer and chat template embedded in a container, without transformers.

``tokenizer.json`` is loaded with the ``tokenizers`` library; the chat template comes from
``tokenizer_config.json`` (``chat_template``) or ``chat_template.jinja`` and is rendered with Jinja2, with the
same variables transformers passes (``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``).
"""

from __future__ import annotations

import json
from typing import Any

from zipmoe.errors import FormatError, ZipmoeError
from zipmoe.formats.reader import Container


class TokenizerError(ZipmoeError, ValueError):
    """The container's tokenizer cannot be used as asked."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """Encode prompts and decode generated tokens with the tokenizer embedded in a container."""

    def __init__(self, tokenizer_json: str, config: dict[str, Any] | None, chat_template: str | None) -> None:
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # tokenizers raises its own exception type for malformed files
            raise TokenizerError(f"tokenizer.json cannot be loaded ({exc})") from None
        self.config = config or {}
        self.chat_template = chat_template or self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in self.chat_template if isinstance(t, dict)}
            self.chat_template = named.get("default")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

    @classmethod
    def from_container(cls, container: Container) -> TextTokenizer:
        names = {f.name for f in container.manifest.files}
        if "tokenizer.json" not in names:
            raise TokenizerError(
                f"{container.path}: no tokenizer.json embedded (zipmoe run needs a fast tokenizer; "
                "tokenizer.model-only checkpoints are not supported)"
            )
        config = None
        if "tokenizer_config.json" in names:
            try:
                config = json.loads(container.read_file("tokenizer_config.json"))
            except ValueError as exc:
                raise FormatError(f"{container.path}: tokenizer_config.json is not valid JSON ({exc})") from None
        template = container.read_file("chat_template.jinja").decode() if "chat_template.jinja" in names else None
        return cls(container.read_file("tokenizer.json").decode(), config, template)

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt; with ``chat`` the prompt is one user message through the chat template."""
        if chat:
            if not self.chat_template:
                raise TokenizerError("the tokenizer has no chat template; run without --chat")
            text = self.apply_chat_template([{"role": "user", "content": text}])
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(text).ids

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
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
