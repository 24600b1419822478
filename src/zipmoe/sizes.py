"""Sizes as people write them (``2GiB``, ``500MB``, ``50%``), read in one place and without torch.

The command line checks ``--memory-budget`` with these functions while it parses its arguments, before it loads the
runtime; the runtime reads the same strings with the same functions. A number without a unit is an error, never
bytes: ``-m 10`` almost always means 10 GiB or 10%, and 10 bytes would only fail later with a confusing message.
"""

from __future__ import annotations

import re

from zipmoe.errors import ZipmoeError

MAX_SIZE = 2**63  # bytes: the largest size `parse_size` accepts (8 EiB: beyond any memory)
# Decimal units as on the Hub (kB, MB, GB), binary ones with "i" (KiB, MiB, GiB), and single letters as binary
# (1.5G = 1.5 GiB, as `free -h` and `ulimit` mean them).
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}  # fmt: skip
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*|%)\s*")


class BudgetError(ZipmoeError, ValueError):
    """A memory budget that cannot be read or is below what the runtime needs, or tier shares that do not add up."""


def parse_size(text: str, *, percent_of: int | None = None, flag: str = "--memory-budget") -> int:
    """Bytes from ``2GiB``, ``500MB``, ``1.5G`` or, with ``percent_of``, ``50%`` (of ``percent_of`` bytes).

    Args:
        text: the size as written.
        percent_of: what a percentage is a percentage of; None: percentages are an error.
        flag: the option the size came from, named in error messages.

    Raises:
        BudgetError: not a size, a number without a unit, an unknown unit, or more than `MAX_SIZE` bytes.
    """
    m = _SIZE.fullmatch(text)
    if m is None:
        raise BudgetError(f"{flag}: cannot read size {_short(text)} (examples: 2GiB, 500MB, 50%)")
    number, unit = float(m[1]), m[2].lower()
    if not unit:
        n = m[1] if len(m[1]) <= 20 else "N"
        raise BudgetError(f"{flag} {_short(text.strip())[1:-1]}: give a unit, e.g. {n}GiB, {n}GB or {n}%")
    if unit == "%":
        if percent_of is None:
            raise BudgetError(f"{flag} {text.strip()}: a percentage needs something to be a percentage of")
        size = number / 100 * percent_of
    elif unit in UNITS:
        size = number * UNITS[unit]
    else:
        raise BudgetError(f"{flag}: unknown size unit {m[2]!r} in {_short(text)} (use kB, MB, GB, KiB, MiB, GiB or %)")
    if not size <= MAX_SIZE:  # also inf and nan, from a number too long for a float
        raise BudgetError(f"{flag}: size {_short(text)} is too large (at most 2**63 bytes)")
    return int(size)


def check_size(text: str, *, flag: str = "--memory-budget") -> str:
    """``text`` unchanged if `parse_size` can read it (a percentage counts as readable); else `BudgetError`.

    For the command line, which checks a size before the container that a percentage refers to is open.
    """
    parse_size(text, percent_of=0, flag=flag)
    return text


def parse_percentages(text: str, *, flag: str = "--memory-budget") -> tuple[float, ...]:
    """Percentages from a comma-separated list such as ``25%,50%,100%`` (benchmarks sweep shares of the experts).

    Raises:
        BudgetError: an item that is not a percentage, or a list with none.
    """
    values = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = _SIZE.fullmatch(item)
        if m is None or m[2] != "%":
            hint = f"{m[1]}%" if m is not None and not m[2] else "25%"
            raise BudgetError(
                f"{flag} {item}: benchmarks take budgets as percentages of the BF16 expert bytes, e.g. {hint}"
            )
        values.append(float(m[1]))
    if not values:
        raise BudgetError(f"{flag}: expected percentages separated by commas, e.g. 25%,50%,100%")
    return tuple(values)


def _short(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")
