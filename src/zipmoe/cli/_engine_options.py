"""The options of the commands that serve a model (``run``, ``chat``): declared once here, and turned into the
runtime's `EngineOptions` and `SamplingOptions` by one function each, so both commands take the same flags.

Light on purpose: typer and the option aliases only; the runtime is imported when the options are built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Optional

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
# Sampling: left unset (None), a flag takes the container's generation_config.json value (docs/RUNTIME.md).
_FROM_CONFIG = "Default: the container's generation_config.json"
TemperatureOpt = Annotated[
    Optional[float],
    typer.Option(
        "--temperature",
        min=0.0,
        show_default=False,
        help=f"0 is greedy. {_FROM_CONFIG} (greedy unless it sets do_sample; then its temperature, else 1).",
    ),
]
TopPOpt = Annotated[
    Optional[float],
    typer.Option(
        "--top-p",
        min=0.0,
        max=1.0,
        show_default=False,
        help=f"Nucleus sampling: keep the most likely tokens that make up this probability. {_FROM_CONFIG}, else 1.",
    ),
]
TopKOpt = Annotated[
    Optional[int],
    typer.Option(
        "--top-k", min=0, show_default=False, help=f"Keep the K most likely tokens (0: all). {_FROM_CONFIG}, else 0."
    ),
]
MinPOpt = Annotated[
    Optional[float],
    typer.Option(
        "--min-p",
        min=0.0,
        max=1.0,
        show_default=False,
        help=f"Drop tokens less likely than this times the most likely one. {_FROM_CONFIG}, else 0.",
    ),
]
RepetitionPenaltyOpt = Annotated[
    Optional[float],
    typer.Option(
        "--repetition-penalty",
        show_default=False,
        help="Divide the positive logits (multiply the negative) of the tokens in the prompt and the output by this "
        f"(1: off). {_FROM_CONFIG}, else 1.",
    ),
]
FrequencyPenaltyOpt = Annotated[
    Optional[float],
    typer.Option(
        "--frequency-penalty",
        min=-2.0,
        max=2.0,
        show_default=False,
        help="Lower each token's logit by this times its count in the output (-2..2; default 0).",
    ),
]
PresencePenaltyOpt = Annotated[
    Optional[float],
    typer.Option(
        "--presence-penalty",
        min=-2.0,
        max=2.0,
        show_default=False,
        help="Lower the logit of each token already in the output by this (-2..2; default 0).",
    ),
]
StopOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--stop",
        metavar="TEXT",
        show_default=False,
        help="End the text before this string (not printed; finish reason stop). Repeat for up to 4.",
    ),
]
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


def sampling_flags(
    *,
    max_new_tokens: int,
    seed: int,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    stop: list[str] | None = None,
    ignore_eos: bool = False,
    truncate: bool = False,
) -> dict[str, Any]:
    """The sampling options given on the command line, as `SamplingOptions` fields; those left unset (None) are left
    out, for the container's generation_config.json to supply (`Engine.default_sampling`). ``ignore_eos``: do not
    stop at the end-of-sequence token.

    Raises:
        SamplingError: a value out of range, naming its flag (checked here, before a model is loaded).
    """
    from zipmoe.runtime.request import SamplingOptions

    given = dict(
        max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        stop=tuple(stop) if stop else None, stop_at_eos=not ignore_eos, truncate=truncate,
    )  # fmt: skip
    flags = {name: value for name, value in given.items() if value is not None}
    SamplingOptions(**flags)  # the check
    return flags


def sampling_options(**flags: Any) -> SamplingOptions:
    """`SamplingOptions` of the flags alone (`sampling_flags`'s arguments), without a container's defaults.

    Raises:
        SamplingError: a value out of range, naming its flag.
    """
    from zipmoe.runtime.request import SamplingOptions

    return SamplingOptions(**sampling_flags(**flags))
