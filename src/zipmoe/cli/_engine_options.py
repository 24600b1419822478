"""The options of the commands that serve a model (``run``, ``chat``): declared once here, and turned into the
runtime's `EngineOptions` and `SamplingOptions` by one function each, so both commands take the same flags.

Light on purpose: typer and the option aliases only; the runtime is imported when the options are built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from zipmoe.cli._options import POLICIES, SCHEDULES, WARMUPS, StorageOpt, choice, max_new_tokens, memory_budget
from zipmoe.cli._options import DeviceOpt as DeviceOpt  # re-exported: the same --device, --dtype, --io everywhere
from zipmoe.cli._options import DtypeOpt as DtypeOpt
from zipmoe.cli._options import IoOpt as IoOpt

if TYPE_CHECKING:
    from zipmoe.runtime.engine import EngineOptions
    from zipmoe.runtime.request import SamplingOptions

MaxNewTokensOpt = Annotated[int, max_new_tokens()]
MemoryBudgetOpt = Annotated[
    Optional[str],
    memory_budget(
        "Memory for experts: 2GiB, 500MB, or a percentage of the model's BF16 expert bytes (50%). "
        "Default: every expert decoded, up to half of the available memory."
    ),
]
TiersOpt = Annotated[
    Optional[str],
    typer.Option(
        "--tiers",
        help="Shares of the expert memory per tier: decoded (compute-ready), compressed (whole records), sm "
        "(sign+mantissa planes; a hit reads only the coded exponents), e.g. decoded=0.5,sm=0.5 "
        "(default: decoded=1; see docs/RUNTIME.md).",
    ),
]
DecodedFractionOpt = Annotated[  # the old spelling of --tiers decoded=F,compressed=1-F
    Optional[float], typer.Option("--decoded-fraction", min=0.0, max=1.0, hidden=True)
]
PolicyOpt = Annotated[
    str,
    typer.Option(
        "--policy", **choice(POLICIES), help="What the tiers keep: lfu (token-weighted, ZipMoE's), lru, or fifo."
    ),
]
SimulateStorageOpt = StorageOpt  # --storage GBPS (--simulate-storage until this release: an alias in _options)
PlanOpt = Annotated[
    Optional[str],
    typer.Option(
        "--plan",
        help="A plan from zipmoe plan for this container (sets the tiers, pins and prefetches the planned experts), "
        "or auto (plan now from the architecture's synthetic routing).",
    ),
]
ScheduleOpt = Annotated[
    Optional[str],
    typer.Option(
        "--schedule",
        **choice(SCHEDULES),
        help="Order of a layer's fetches: affinity (reads and decodes interleaved, ZipMoE's; the default with --plan) "
        "or fifo (expert order; the default otherwise).",
    ),
]
ModeOpt = Annotated[
    str,
    typer.Option(
        "--mode",
        metavar="[lossless|qH|qL|dbsc]",
        help="lossless (BF16 experts), or from AMAT slices (pack --slices 8:4): q8, q4, or dbsc (the top expert of a "
        "confident token at 8 bits, the others at 4).",
    ),
]
CriticalThresholdOpt = Annotated[
    float,
    typer.Option(
        "--critical-threshold",
        min=0.0,
        max=1.0,
        help="dbsc: a selected expert runs at high precision when its router probability is at least this (at most "
        "two per token).",
    ),
]
WarmupOpt = Annotated[
    str,
    typer.Option(
        "--warmup",
        **choice(WARMUPS),
        help="Slice modes, what the cache holds when decoding starts: pcw (the slices the prompt used most), "
        "last-layer (what LRU left), random, or empty.",
    ),
]
TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed for sampling.")]


def engine_options(
    *,
    device: str,
    dtype: str | None,
    memory_budget: str | None,
    tiers: str | None,
    decoded_fraction: float | None,
    policy: str,
    threads: int | None,
    io: str,
    simulate_storage: float | None,
    mode: str,
    critical_threshold: float,
    warmup: str,
    plan: str | None,
    schedule: str | None,
) -> EngineOptions:
    """The `EngineOptions` of the options above (``--decoded-fraction F`` is ``--tiers decoded=F,compressed=1-F``).

    Raises:
        BudgetError: a value `EngineOptions` refuses (an unknown policy, tier or schedule, a bad bandwidth).
    """
    from zipmoe.runtime.engine import EngineOptions

    if decoded_fraction is not None and tiers is None:
        tiers = f"decoded={decoded_fraction},compressed={1 - decoded_fraction}"
    return EngineOptions(
        device=device, dtype=dtype, memory_budget=memory_budget, tiers=tiers, policy=policy, threads=threads, io=io,
        simulate_storage_gbps=simulate_storage or None, mode=mode, critical_threshold=critical_threshold, warmup=warmup,
        plan=plan, schedule=schedule,
    )  # fmt: skip


def sampling_options(
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    ignore_eos: bool = False,
    truncate: bool = False,
) -> SamplingOptions:
    """The `SamplingOptions` of the options above (``ignore_eos``: do not stop at the end-of-sequence token).

    Raises:
        SamplingError: a value out of range, naming its flag.
    """
    from zipmoe.runtime.request import SamplingOptions

    return SamplingOptions(max_new_tokens, temperature, top_p, seed, stop_at_eos=not ignore_eos, truncate=truncate)
