"""Chat templates that strangers wrote, rendered as transformers renders them, within bounds of size and time.

A chat template comes with the checkpoint (``chat_template.jinja``, ``tokenizer_config.json`` or
``chat_template.json``), so it is code from a stranger. It runs in Jinja's `ImmutableSandboxedEnvironment`, which
keeps it away from Python's internals and from changing its inputs, configured as transformers configures it:
``trim_blocks``, ``lstrip_blocks``, ``{% break %}``/``{% continue %}``, ``{% generation %}``, a ``tojson`` that keeps
key order and does not escape HTML, ``raise_exception`` and ``strftime_now``, and the same variables. On top of the
sandbox, one render is bounded:

- Size. Every value the template makes is counted in characters of its text form, a shared part each time it
  appears: results of operators, calls and filters, ``~``, list/tuple/dict literals, ``{{ }}`` output and captured
  blocks (macros, ``{% set %}``, ``{% filter %}``). A render may make `MAX_CREATED_CHARS` in all, and the prompt may
  have `MAX_RENDERED_CHARS`. Operations whose result an argument multiplies are counted before they run (``*``,
  ``**``, ``%`` and ``format`` widths, ``join``, ``replace``, ``indent``, ``expandtabs``, ``translate``); an integer
  argument above `MAX_RENDERED_CHARS` is refused (``ljust``, ``center``, ``zfill``, ``batch``, ...); integers made
  by ``*`` and ``**`` stop at `MAX_INT_DIGITS` digits; ``sum`` adds numbers only (adding lists is quadratic).
- Time. Every loop iteration, call, filter, operator, attribute and item access checks a deadline of
  `RENDER_SECONDS`, and each single step between two checks is bounded by the sizes above. Recursion stops at
  Python's recursion limit.
- ``lipsum``, ``urlize`` and ``wordwrap`` are gone: chat templates do not use them and their sizes would need an
  analysis of their own. A template longer than `MAX_TEMPLATE_CHARS` is refused before it is compiled.

Every failure (syntax, a bound, ``raise_exception``, an error inside the template) is one `TokenizerError` on one
line that names where the template came from and, when known, its line.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, ItemsView, Iterable, KeysView, ValuesView
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from zipmoe._json import load_json
from zipmoe.runtime.tokenizer import TokenizerError

MAX_RENDERED_CHARS = 1_000_000  # the prompt; ~250,000 tokens, beyond the context of the models zipmoe runs
MAX_CREATED_CHARS = 16 * MAX_RENDERED_CHARS  # all the text one render makes; real templates make a few prompts' worth
MAX_INT_DIGITS = 4_300  # Python's own limit for printing an int (sys.int_info.default_max_str_digits)
MAX_TEMPLATE_CHARS = 1_000_000  # the largest templates on the Hub have ~50,000
RENDER_SECONDS = 5.0  # real templates render in milliseconds
MAX_MESSAGE_CHARS = 300  # of an error message quoted from the template or its exception

_NOT_CALL_ARGUMENTS = frozenset({"_loop_vars", "_block_vars", "caller"})  # what Jinja adds to calls by itself
_SEQUENCES = (str, bytes, list, tuple)
_DIGITS = re.compile(r"\d+")
_NESTED_FIELD = re.compile(r"\{[^{}]*\{")  # '{:>{width}}': a width taken from the arguments
_BUDGET: ContextVar[_Budget | None] = ContextVar("zipmoe_chat_template_budget", default=None)


class _Refused(Exception):
    """A bound stopped the render. Not a ValueError or TypeError: Jinja's filters catch those."""


class _Budget:
    """What one render may still make, and until when it may run."""

    def __init__(self) -> None:
        self.left = MAX_CREATED_CHARS
        self.deadline = time.monotonic() + RENDER_SECONDS

    def spend(self, chars: int, what: str) -> None:
        if chars > self.left:
            raise _Refused(f"{what} would bring the text this render made over {MAX_CREATED_CHARS:,} characters")
        self.left -= chars
        if time.monotonic() > self.deadline:
            raise _Refused(f"rendering took longer than {RENDER_SECONDS:g} s")

    def spend_on(self, value: Any, what: str) -> Any:
        self.spend(_text_size(value, self.left), what)
        return value


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # Jinja folds constant filter calls while compiling: refusing makes them wait for the render
        raise _Refused("not rendering")
    return budget


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:  # None while compiling
        budget.spend(0, "")


def _text_size(value: Any, limit: int) -> int:
    """About ``len(str(value))``, counting a shared part each time it appears; stops counting past ``limit``."""
    size, stack = 0, [value]
    while stack and size <= limit:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            size += len(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            size += item.bit_length() * 3 // 10 + 2
        elif isinstance(item, dict):
            size += 4 * len(item) + 2
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
            size += 2 * len(item) + 2
            stack.extend(item)
        elif isinstance(item, Namespace):  # its text shows its attributes
            stack.append(object.__getattribute__(item, "_Namespace__attrs"))
        else:  # floats, None, functions, undefined values
            size += 24
    return size


def _text(value: Any) -> str | bytes:
    return value if isinstance(value, (str, bytes)) else str(value)


def _as_tuple(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _format_size(fmt: str | bytes, values: list[Any]) -> int:
    """At most the length of ``fmt`` formatted with ``values``, by ``%`` or by ``str.format``."""
    fmt = fmt if isinstance(fmt, str) else str(fmt)
    widths = [int(d) if len(d) <= 12 else 10**12 for d in _DIGITS.findall(fmt)]
    if "*" in fmt or _NESTED_FIELD.search(fmt):
        widths += [abs(v) for v in values if type(v) is int]
    largest = max((_text_size(v, MAX_CREATED_CHARS) for v in values), default=0)
    return len(fmt) + (fmt.count("%") + fmt.count("{")) * (max(widths, default=0) + largest)


def _multiplied_size(name: str, subject: Any, args: tuple, kwargs: dict, is_filter: bool) -> int | None:
    """A bound of the result's size for the calls and filters whose result an argument multiplies, else None."""

    def arg(i: int, key: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    if name == "join":
        items, sep = (subject, arg(0, "d", "")) if is_filter else (arg(0, "iterable", ()), subject)
        return sum(_text_size(item, MAX_CREATED_CHARS) for item in items) + len(_text(sep)) * len(items)
    if name not in ("replace", "format", "format_map", "indent", "expandtabs", "translate") or subject is None:
        return None
    text = _text(subject)
    if name == "replace":
        old, new, count = _text(arg(0, "old", "")), _text(arg(1, "new", "")), arg(2, "count")
        n = text.count(old) if old else len(text) + 1
        n = min(n, count) if type(count) is int and count >= 0 else n
        return len(text) + n * max(0, len(new) - len(old))
    if name == "format_map":
        return _format_size(text, list(args[0].values()) if args and isinstance(args[0], dict) else [])
    if name == "format":
        return _format_size(text, [*args, *kwargs.values()])
    if name == "indent":
        width = arg(0, "width", 4)
        width = len(width) if isinstance(width, str) else width if type(width) is int else 0
        return len(text) + (text.count("\n") + 1) * max(width, 0)
    if name == "expandtabs":
        tabsize = arg(0, "tabsize", 8)
        return len(text) + text.count("\t") * (tabsize if type(tabsize) is int and tabsize > 0 else 0)
    table = arg(0, "table")  # translate
    longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1) if isinstance(table, dict) else 1
    return len(text) * max(longest, 1)


def _guarded_call(
    name: str, subject: Any, args: tuple, kwargs: dict, is_filter: bool, invoke: Callable[[Any, tuple], Any]
) -> Any:
    """``invoke(subject, args)``, the call or filter ``name``, within the render's budget."""
    budget = _budget()
    for value in (*args, *(v for k, v in kwargs.items() if k not in _NOT_CALL_ARGUMENTS)):
        if type(value) is int and value > MAX_RENDERED_CHARS:
            raise _Refused(f"{name or 'a call'}() got the integer {value:,} (at most {MAX_RENDERED_CHARS:,})")
    if name == "sum" and is_filter and type(args[1] if len(args) > 1 else kwargs.get("start", 0)) not in (int, float):
        raise _Refused("sum() adds numbers only")
    if name == "join":  # one-shot iterables are counted, then joined
        if is_filter and not isinstance(subject, (str, bytes, list, tuple)):
            subject = list(subject)
        elif not is_filter and args and not isinstance(args[0], (str, bytes, list, tuple)):
            args = (list(args[0]), *args[1:])
    size = _multiplied_size(name, subject, args, kwargs, is_filter)
    if size is None:
        return budget.spend_on(invoke(subject, args), f"{name or 'a call'}()")
    budget.spend(size, f"{name}()")
    return invoke(subject, args)


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    lead = 1 if getattr(func, "jinja_pass_arg", None) else 0  # the context or environment Jinja passes first

    @functools.wraps(func)  # keeps jinja_pass_arg
    def guarded(*args: Any, **kwargs: Any) -> Any:
        head, subject, rest = args[:lead], args[lead], args[lead + 1 :]
        return _guarded_call(name, subject, rest, kwargs, True, lambda s, a: func(*head, s, *a, **kwargs))

    return guarded


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
):
    """transformers' ``tojson``: ``json.dumps`` keeping the key order, without HTML escapes; stops past the budget."""
    budget = _budget()
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    pieces = []
    for piece in encoder.iterencode(value):  # not one-shot: the pure-Python encoder, which yields as it goes
        budget.spend(len(piece), "tojson")
        pieces.append(piece)
    return "".join(pieces)


def _raise_exception(message: Any) -> None:
    raise TemplateError(str(message))


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _spend_output(value: Any) -> Any:
    budget = _BUDGET.get()
    return value if budget is None else budget.spend_on(value, "{{ }} output")


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for transformers' masks; it renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _CodeGenerator(CodeGenerator):
    """Compiles loops, ``~`` and list/tuple/dict literals into calls of `_Environment`'s budget checks."""

    def visit_For(self, node: nodes.For, frame: Any) -> None:
        node.iter = nodes.Call(nodes.EnvironmentAttribute("iterate"), [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.join_values(context, (")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("))")

    def _created(self, visit: Callable[[Any, Any], None], node: nodes.Expr, frame: Any) -> None:
        self.write("environment.created(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Any) -> None:
        self._created(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Any) -> None:
        self._created(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Any) -> None:
        if node.ctx == "load":  # not the targets of {% for a, b in ... %} or {% set a, b = ... %}
            self._created(super().visit_Tuple, node, frame)
        else:
            super().visit_Tuple(node, frame)


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox as transformers configures it, with the hooks that keep a render within its budget."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_Generation, jinja2.ext.loopcontrols],
            finalize=_spend_output,
        )
        del self.globals["lipsum"], self.filters["urlize"], self.filters["wordwrap"]
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, func) for name, func in self.filters.items()}
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        method = getattr(obj, "__wrapped__", obj) if callable(obj) else obj  # the sandbox wraps str.format
        subject = getattr(method, "__self__", None)
        return _guarded_call(
            getattr(method, "__name__", ""),
            subject if isinstance(subject, (str, bytes)) else None,
            args,
            kwargs,
            False,
            lambda _, a: ImmutableSandboxedEnvironment.call(self, context, obj, *a, **kwargs),
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if type(left) is int and type(right) is int and operator in ("*", "**"):
            if operator == "*":
                bits = left.bit_length() + right.bit_length()
            else:  # 0, 1 and -1 stay small whatever the exponent
                bits = left.bit_length() * max(right, 0) if abs(left) > 1 else 0
            if bits * 3 // 10 > MAX_INT_DIGITS:
                raise _Refused(f"the {operator} operator would make an integer of over {MAX_INT_DIGITS:,} digits")
        sequence, times = (right, left) if isinstance(right, _SEQUENCES) else (left, right)
        if operator == "*" and isinstance(sequence, _SEQUENCES) and type(times) is int:
            size = _text_size(sequence, budget.left) * max(times, 0)
        elif operator == "%" and isinstance(left, (str, bytes)):
            size = _format_size(left, list(right.values() if isinstance(right, dict) else _as_tuple(right)))
        else:
            size = _text_size(left, budget.left) + _text_size(right, budget.left)
        budget.spend(size, f"the {operator} operator")
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def call_test(self, *args: Any, **kwargs: Any) -> Any:
        _tick()
        return super().call_test(*args, **kwargs)

    def concat(self, pieces: Iterable[str]) -> str:  # type: ignore[override]  # joins macro and block output
        pieces = list(pieces)
        budget = _BUDGET.get()
        if budget is not None:
            budget.spend(sum(map(len, pieces)), "a block")
        return "".join(pieces)

    def iterate(self, iterable: Iterable[Any]) -> Iterable[Any]:
        budget = _budget()
        for item in iterable:
            budget.spend(0, "a loop")
            yield item

    def created(self, value: Any) -> Any:
        return _budget().spend_on(value, "a literal")

    def join_values(self, context: Any, parts: tuple) -> str:
        budget = _budget()
        budget.spend(sum(_text_size(part, budget.left) for part in parts), "the ~ operator")
        return (markup_join if context.eval_ctx.autoescape else str_join)(parts)


class ChatTemplate:
    """A chat template compiled in the bounded sandbox, and where it came from (for error messages)."""

    def __init__(self, origin: str, value: Any) -> None:
        """Compile a template.

        Args:
            origin: where it came from: ``chat_template.jinja``, ``tokenizer_config.json``, ``chat_template.json``.
            value: the file's bytes, or the ``chat_template`` value of ``tokenizer_config.json``: a string, or named
                templates (a list of ``{"name", "template"}`` objects, or an object) of which "default" is used.

        Raises:
            TokenizerError: the template is not text, not valid UTF-8 or JSON, too long, or has a syntax error.
        """
        self.origin = origin
        text = self._text(value)
        try:
            self.template = _Environment().from_string(text)
        except Exception as exc:  # syntax errors, and what the compiler raises on absurd nesting
            raise self._error(exc) from None

    def _text(self, value: Any) -> str:
        def fail(reason: str) -> TokenizerError:
            return TokenizerError(f"chat template from {self.origin}: {reason}")

        if isinstance(value, bytes) and self.origin.endswith(".json"):  # chat_template.json
            value = load_json(value, fail)
            if not isinstance(value, dict) or "chat_template" not in value:
                raise fail('expected a JSON object with a "chat_template"')
            value = value["chat_template"]
        elif isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise fail(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if isinstance(value, list):  # named templates, as transformers saves them
            if not all(isinstance(t, dict) for t in value):
                raise fail('expected a list of {"name": ..., "template": ...} objects')
            value = {t.get("name"): t.get("template") for t in value}
        if isinstance(value, dict):
            if "default" not in value:
                names = ", ".join(repr(name) for name in list(value)[:5])
                raise fail(f'named templates without "default" (names: {names})')
            value = value["default"]
        if not isinstance(value, str):
            raise fail(f"expected a string, got {type(value).__name__}")
        if len(value) > MAX_TEMPLATE_CHARS:
            raise fail(f"{len(value):,} characters (at most {MAX_TEMPLATE_CHARS:,})")
        return value

    def render(self, messages: list[dict[str, Any]], **variables: Any) -> str:
        """The prompt for ``messages``.

        Args:
            messages: the conversation, ``{"role": ..., "content": ...}`` dicts.
            variables: the other variables transformers passes: ``add_generation_prompt``, ``tools``, ``documents``
                and the special tokens (``bos_token``, ``eos_token``, ...).

        Raises:
            TokenizerError: the template failed, stepped over a bound, or rendered nothing but whitespace.
        """
        budget_token = _BUDGET.set(_Budget())
        pieces = self.template.generate(messages=messages, **variables)
        try:
            rendered, size = [], 0
            for piece in pieces:
                size += len(piece)
                if size > MAX_RENDERED_CHARS:
                    raise _Refused(f"the rendered prompt is longer than {MAX_RENDERED_CHARS:,} characters")
                _tick()
                rendered.append(piece)
        except Exception as exc:
            raise self._error(exc) from None
        finally:
            pieces.close()
            _BUDGET.reset(budget_token)
        prompt = "".join(rendered)
        if not prompt.strip():
            raise TokenizerError(f"chat template from {self.origin} rendered an empty prompt")
        return prompt

    def _error(self, exc: BaseException) -> TokenizerError:
        """One line: the origin, the template line, what went wrong."""
        if isinstance(exc, TemplateSyntaxError):
            line, detail = exc.lineno, exc.message or "syntax error"
        else:
            line, tb = None, exc.__traceback__
            while tb is not None:  # Jinja rewrites tracebacks to point at template lines
                if tb.tb_frame.f_code.co_filename == "<template>":
                    line = tb.tb_lineno
                tb = tb.tb_next
            known = isinstance(exc, (TemplateError, _Refused))
            detail = str(exc) if known else f"{type(exc).__name__}: {exc}".rstrip(": ")
        detail = " ".join(detail.split())
        if len(detail) > MAX_MESSAGE_CHARS:
            detail = detail[: MAX_MESSAGE_CHARS - 3] + "..."
        where = f"line {line}: " if line else ""
        return TokenizerError(f"chat template from {self.origin}: {where}{detail}")
