"""The options of the commands, declared once: one spelling per concept, the same help, choices and checks everywhere.

Every command that has a concept spells it the same way (`SPELLINGS` lists them; tests/test_flags.py walks the
command tree to keep it so). Spellings of earlier releases are `ALIASES`: hidden, still accepted for one release,
each use answered with a one-line deprecation warning. `ZipmoeGroup` applies them (and tidies the help) for every
command of a group, so a new command gets them without doing anything.

Only light modules are imported here: ``zipmoe --help`` and argument errors must not load torch or numba. The choice
lists below are therefore written out rather than imported from the runtime; tests/test_flags.py checks that they
equal the runtime's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from zipmoe.sizes import check_size, parse_percentages

# -- choices ----------------------------------------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda")  # zipmoe.runtime.engine.resolve_device
DTYPES = ("float32", "bfloat16", "float16")  # zipmoe.runtime.engine.DTYPES
IO_MODES = ("buffered", "direct")  # zipmoe.runtime.storage.IO_MODES
POLICIES = ("lfu", "lru", "fifo")  # zipmoe.runtime.policies.POLICIES
SCHEDULES = ("fifo", "affinity")  # zipmoe.runtime.pipeline.SCHEDULES
WARMUPS = ("pcw", "last-layer", "random", "empty")  # zipmoe.runtime.policies.WARMUPS


class _Choice:
    """A parser that accepts one of ``choices`` and otherwise fails with a usage error that lists them."""

    def __init__(self, choices: Sequence[str]) -> None:
        self.choices = tuple(choices)
        self.__name__ = "choice"  # click's FuncParamType names itself after the parser (typer 0.12 with click 8.x)

    def __call__(self, value: Any) -> Any:
        if value is None or value in self.choices:
            return value
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(self.choices)}")


def choice(choices: Sequence[str]) -> dict[str, Any]:
    """``typer.Option`` arguments for an option that takes one of ``choices``: the check, and the choices in help.

    (A parser rather than an Enum or Literal annotation: the command gets the string, as the library wants it, and
    every typer version since the lowest supported one renders and checks it the same way.)
    """
    return {"parser": _Choice(choices), "metavar": "[" + "|".join(choices) + "]"}


# -- arguments --------------------------------------------------------------------------------------------------------

ContainerArg = Annotated[Path, typer.Argument(help="A .zmoe container.", show_default=False)]
# What run, chat, eval ppl and plan serve; zipmoe.cli.models.model_container turns it into a container path.
ModelArg = Annotated[
    str,
    typer.Argument(
        help="A .zmoe container, a checkpoint directory, or a Hub repo id org/name\\[@revision].",  # \\[: not markup
        metavar="MODEL",
        show_default=False,
    ),
]
SourceArg = Annotated[
    str, typer.Argument(help="Checkpoint directory, or Hub repo id org/name\\[@revision].", show_default=False)
]

# -- options that mean the same on every command ------------------------------------------------------------------------

MAX_THREADS = 1024  # more threads than any machine has CPUs only wastes memory (100,000 made torch abort)
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", "-t", min=1, max=MAX_THREADS, help="Worker threads (default: every available CPU)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing output.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout, for scripts.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or warnings on stderr.")]
DeviceOpt = Annotated[
    str, typer.Option("--device", **choice(DEVICES), help="Where to compute; auto: cuda when torch sees a GPU.")
]
DtypeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--dtype",
        **choice(DTYPES),
        help="Compute dtype (default: bfloat16 on GPUs and BF16-capable CPUs, float32 elsewhere).",
    ),
]
IoOpt = Annotated[
    str,
    typer.Option(
        "--io",
        **choice(IO_MODES),
        help="How experts are really read: through the page cache, or with O_DIRECT from the disk (--storage "
        "simulates a slower device on top of either).",
    ),
]


def concrete_device(device: str) -> str:
    """``cpu`` or ``cuda`` for a ``--device`` value (auto: cuda when torch sees a GPU), for code that needs a real
    device name, such as benchmark child processes. Loads torch."""
    from zipmoe.runtime.engine import resolve_device

    return resolve_device(device).type


def _check_budget(value: Optional[str]) -> Optional[str]:
    return value if value is None else check_size(value)


def _check_budgets(value: Optional[str]) -> Optional[str]:
    if value is not None:
        parse_percentages(value)
    return value


def memory_budget(help: str, *, percentages: bool = False) -> Any:
    """``-m/--memory-budget``: a size with a unit (2GiB, 500MB, 50%), checked while the arguments are parsed.

    With ``percentages`` (benchmarks) a comma-separated list of percentages of the BF16 expert bytes.
    """
    check = _check_budgets if percentages else _check_budget
    return typer.Option(
        "--memory-budget", "-m", callback=check, metavar="PCT,..." if percentages else "SIZE", help=help
    )


def max_new_tokens(help: str = "Tokens to generate.", *, min: int = 1) -> Any:
    """``-n/--max-new-tokens``."""
    return typer.Option("--max-new-tokens", "-n", min=min, help=help)


def storage(help: str | None = None) -> Any:
    """``--storage GBPS``: simulated storage bandwidth (reads still happen, then wait as that device would take).

    ``--io`` says how the real reads are made; the two combine (docs/RUNTIME.md).
    """
    return typer.Option(
        "--storage",
        metavar="GBPS",
        help=help
        or "Simulate storage of this bandwidth in GB/s (e.g. 3.5 NVMe, 1.25 phone flash); 0: none, reads go at the "
        "speed of the page cache or the disk (--io).",
    )


def eval_tokens(help: str) -> Any:
    """``--eval-tokens``: how many tokens perplexity scores."""
    return typer.Option("--eval-tokens", min=1, help=help)


StorageOpt = Annotated[Optional[float], storage()]

# Every spelling a concept has; tests/test_flags.py checks that no command spells one differently.
SPELLINGS = {
    "max new tokens": ("-n", "--max-new-tokens"),
    "memory budget": ("-m", "--memory-budget"),
    "simulated storage": ("--storage",),
    "read path": ("--io",),
    "device": ("--device",),
    "threads": ("-t", "--threads"),
    "quiet": ("-q", "--quiet"),
    "json": ("--json",),
    "tokens scored": ("--eval-tokens",),
}

# -- old spellings ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alias:
    """An old spelling of an option, accepted (hidden) by the ``commands`` that had it, with a deprecation warning.

    ``convert`` rewrites the old value into the new option's terms (``--budgets 25`` meant 25%).
    """

    old: str
    new: str
    commands: tuple[str, ...]  # command paths, as ``bench run``
    convert: Callable[[str], str] | None = None

    def warning(self) -> str:
        return f"{self.old} is deprecated and will be removed in the next release; use {self.new}"


def _bare_numbers_as_percent(value: str) -> str:
    """``10,20`` -> ``10%,20%``: what ``--budgets`` meant; anything else is left for the check to refuse."""
    items = (item.strip() for item in value.split(","))
    return ",".join(f"{item}%" if item.replace(".", "", 1).isdigit() else item for item in items)


ALIASES = (
    Alias("--new-tokens", "--max-new-tokens", ("bench run", "bench cache", "bench slices")),
    Alias("--max-tokens", "--eval-tokens", ("eval ppl",)),
    Alias("--budget", "--memory-budget", ("bench slices",)),
    Alias("--budgets", "--memory-budget", ("bench run", "bench cache"), _bare_numbers_as_percent),  # 25 meant 25%
    Alias("--simulate-storage", "--storage", ("run", "plan")),
)


def _option_strings(command: Any) -> dict[str, bool]:
    """Every option string of ``command`` -> whether it takes a value."""
    out = {}
    for param in getattr(command, "params", ()):
        takes_value = not (getattr(param, "is_flag", False) or getattr(param, "count", False))
        for opt in (*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())):
            if opt.startswith("-"):
                out[opt] = takes_value
    return out


def rewrite_aliases(
    command: Any, args: list[str], warn: Callable[[str], None] | None = None, path: str | None = None
) -> list[str]:
    """``args`` for ``command`` (at ``path``, as ``bench run``; None: any) with the old spellings in `ALIASES` that it
    had replaced by their new ones (``warn`` told once for each). Option values and everything after ``--`` are left
    as they are.
    """
    options = _option_strings(command)
    aliases = {
        a.old: a for a in ALIASES if a.new in options and a.old not in options and (path is None or path in a.commands)
    }
    if not aliases:
        return args
    out: list[str] = []
    warned: set[str] = set()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            out.extend(args[i - 1 :])
            break
        name, eq, value = arg.partition("=")
        alias = aliases.get(name) if arg.startswith("--") else None
        if alias is not None:
            if warn is not None and alias.old not in warned:
                warn(alias.warning())
                warned.add(alias.old)
            convert = alias.convert or (lambda v: v)
            if eq:
                out.append(f"{alias.new}={convert(value)}")
            elif i < len(args):
                out.extend((alias.new, convert(args[i])))
                i += 1
            else:
                out.append(alias.new)  # click reports the missing value under the new name
            continue
        out.append(arg)
        if arg.startswith("--") and not eq and options.get(arg):
            if i < len(args):
                out.append(args[i])  # this option's value, whatever it looks like
                i += 1
        elif arg.startswith("-") and not arg.startswith("--") and len(arg) > 1:
            # A cluster of short options (-qn 8): a value follows when its last letter takes one.
            for k, letter in enumerate(arg[1:], 1):
                if options.get(f"-{letter}"):
                    if k == len(arg) - 1 and i < len(args):
                        out.append(args[i])
                        i += 1
                    break
    return out


def _tidy_help(command: Any, ctx: Any = None) -> None:
    """No ``<bool>`` after flags in help: a flag takes no value, so it shows no type (typer would show one)."""
    params = list(getattr(command, "params", ()))
    if ctx is not None:  # --help itself, which click makes when it is first asked for
        params.append(command.get_help_option(ctx))
    for param in params:
        if getattr(param, "is_flag", False) and getattr(param, "metavar", None) is None:
            param.metavar = ""


def _is_group(command: Any) -> bool:
    return hasattr(command, "commands")


class ZipmoeGroup(TyperGroup):
    """A command group whose commands take the old spellings of `ALIASES` (warning once per spelling) and whose
    help shows no type after flags. Pass it as ``typer.Typer(cls=ZipmoeGroup)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _tidy_help(self)
        for command in self.commands.values():
            _tidy_help(command)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None and getattr(option, "metavar", None) is None:
            option.metavar = ""
        return option

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[Any, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not _is_group(command):
            _tidy_help(command, ctx)
            rest = rewrite_aliases(command, rest, warn=_deprecated, path=" ".join([*_path(ctx), name]))
        return name, command, rest


def _path(ctx: Any) -> list[str]:
    """The names of the groups from the root's first subcommand down to ``ctx``'s (``[]`` at the root)."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return names[::-1]


def _deprecated(message: str) -> None:
    from zipmoe.cli._output import warn

    warn(message)
