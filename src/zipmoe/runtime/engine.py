"""Everything `zipmoe run` needs, built from one container: model, expert cache, tokenizer, generation."""

from __future__ import annotations

import copy
import math
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from zipmoe._json import load_json
from zipmoe._threads import Workers, available_cpus
from zipmoe.errors import FormatError, ZipmoeError
from zipmoe.formats.reader import Container
from zipmoe.planning.planner import LoadedPlan, PlanError, read_plan
from zipmoe.quant.spec import DEFAULT_GROUP_SIZE, SliceSpec
from zipmoe.runtime.batching import BatchScheduler
from zipmoe.runtime.config import ModelArgs, read_token_ids
from zipmoe.runtime.fp8 import scale_block
from zipmoe.runtime.generate import GenerationResult, SamplingOptions, generate
from zipmoe.runtime.model import Transformer
from zipmoe.runtime.pipeline import SCHEDULES, BudgetError, ExpertPipeline, PipelineStats
from zipmoe.runtime.policies import DEFAULT_THRESHOLD, POLICIES, WARMUPS, PlannedLFU, SlicePolicy
from zipmoe.runtime.representations import COMPRESSED, DECODED, LSB, MSB, SM, LosslessExperts, SliceExperts
from zipmoe.runtime.request import (  # torch-free; check_prompt also importable from here as before
    check_prompt,
    generation_defaults,
    sampling_with_defaults,
)
from zipmoe.runtime.routing import RoutingRecorder, RoutingReplay, RoutingTrace
from zipmoe.runtime.stops import StopMatcher
from zipmoe.runtime.storage import IO_MODES, Storage
from zipmoe.runtime.tiers import Tiers
from zipmoe.runtime.tokenizer import TextTokenizer
from zipmoe.runtime.weights import base_transform, check_tensors, resident_weights, runs_tensor, to_tensor
from zipmoe.sizes import parse_size  # sizes are read in one place; also importable from here as before
from zipmoe.summary import manifest_sha256

# Default shares of the tier bytes (the budget less the in-flight reservation) and policy, chosen with
# `zipmoe bench run --sweep` (docs/BENCHMARKS.md, docs/RUNTIME.md): on CPUs every hit of a compact tier costs a
# decode on the cores that also compute, so decoded experts under token-weighted LFU serve fastest there.
DEFAULT_TIERS = {DECODED: 1.0, COMPRESSED: 0.0, SM: 0.0}
DEFAULT_POLICY = "lfu"
# Slower simulated storage would turn one expert read into hours of sleep.
MIN_STORAGE_GBPS = 1e-3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(ZipmoeError, ValueError):
    """The requested device or dtype cannot be used here."""


class ModeError(ZipmoeError, ValueError):
    """A run mode this container cannot serve."""


def available_modes(spec: SliceSpec | None) -> list[str]:
    """The ``--mode`` values a container offers: ``lossless``, and with MAT(8,4) slices ``q8 q4 dbsc``."""
    if spec is None:
        return ["lossless"]
    return ["lossless", f"q{spec.high_bits}", f"q{spec.low_bits}", "dbsc"]


def resolve_mode(mode: str, spec: SliceSpec | None) -> tuple[str, int | None]:
    """What serves ``mode``: ``("lossless", None)``, a `SliceCache` mode (``high``, ``low``, ``trunc``, ``dbsc``)
    with None, or ``("lossless", bits)`` for the Base baseline ``qN-base`` (BF16 experts quantized on their own).

    ``qN-trunc`` (naive truncation of the MSB slice) and ``qN-base`` exist for `zipmoe eval`'s comparisons.
    """
    base = re.fullmatch(r"q([1-8])-base", mode)
    if mode == "lossless" or base:
        return "lossless", int(base[1]) if base else None
    offered = available_modes(spec)
    if spec is None and re.fullmatch(r"dbsc|q[1-8](-trunc)?", mode):
        raise ModeError(f"--mode {mode}: this container holds no AMAT slices (pack it with --slices 8:4)")
    if spec is None:
        raise ModeError(
            f"unknown mode {mode!r} (choose lossless or qN-base; q8, q4 and dbsc need a container packed with "
            "--slices 8:4)"
        )
    names = {"dbsc": "dbsc", f"q{spec.high_bits}": "high", f"q{spec.low_bits}": "low",
             f"q{spec.low_bits}-trunc": "trunc"}  # fmt: skip
    if mode not in names:
        raise ModeError(f"unknown mode {mode!r} for {spec.label} slices (choose {', '.join(offered)})")
    return names[mode], None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes BF16 matmuls natively (AVX512-BF16 or AMX); without, float32 is much faster."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags.split() or "amx_bf16" in flags.split()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA GPU is available to torch here (use --device cpu)")
    if device not in ("cpu", "cuda"):
        raise DeviceError(f"unknown device {device!r} (cpu, cuda or auto)")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """The compute dtype: as asked, else bfloat16 on GPUs and on CPUs with native BF16, float32 elsewhere."""
    if dtype is None:
        native = device.type == "cuda" or cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    if dtype not in DTYPES:
        raise DeviceError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")
    return DTYPES[dtype]


def available_memory() -> int:
    """Physical memory available to new allocations (Linux), or 0 when unknown."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def parse_tiers(text: str | Mapping[str, float]) -> dict[str, float]:
    """Tier shares from ``decoded=0.25,compressed=0.75`` (or a mapping): each in [0, 1], together at most 1.

    Tiers left out get 0; the shares need not add up to 1 (what is left unused is simply not used).
    """
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        items = []
        for field_ in filter(None, (f.strip() for f in text.split(","))):
            name, sep, value = field_.partition("=")
            if not sep:
                raise BudgetError(
                    f"--tiers: expected NAME=SHARE, got {field_!r} (example: decoded=0.25,compressed=0.75)"
                )
            try:
                items.append((name.strip(), float(value)))
            except ValueError:
                raise BudgetError(f"--tiers: {name.strip()}={value!r} is not a number") from None
    shares = {DECODED: 0.0, COMPRESSED: 0.0, SM: 0.0}
    for name, value in items:
        if name not in shares:
            raise BudgetError(f"--tiers: unknown tier {name!r} (choose {', '.join(shares)})")
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
            raise BudgetError(f"--tiers: {name} must be a share between 0 and 1, got {value!r}")
        shares[name] = float(value)
    if sum(shares.values()) > 1.0 + 1e-9:
        raise BudgetError(f"--tiers: the shares add up to {sum(shares.values()):g}, more than the whole budget")
    return shares


@dataclass(frozen=True)
class EngineOptions:
    """How to serve a container.

    Args:
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: compute dtype (``float32``, ``bfloat16``, ``float16``); None picks per device.
        memory_budget: bytes for the expert tiers and the fetches in flight, or a string (``2GiB``, ``50%`` of the
            BF16 expert bytes); None: every expert decoded, capped at half of the available memory.
        tiers: lossless mode: shares of the tier bytes for ``decoded``, ``compressed`` and ``sm`` experts
            (`parse_tiers`); None: `DEFAULT_TIERS`, or everything decoded without a budget.
        policy: lossless mode: ``lru`` or ``lfu`` (token-weighted, the ZipMoE reference's); `zipmoe.runtime.policies`.
        threads: compute, decode and read threads (default: every available CPU).
        io: ``buffered`` (through the page cache) or ``direct`` (O_DIRECT); see `zipmoe.runtime.storage`.
        simulate_storage_gbps: simulated storage bandwidth in GB/s (see `zipmoe.runtime.storage`).
        mode: ``lossless`` (BF16 experts), or from AMAT slices ``q8``/``q4`` (MAT(8,4)) or ``dbsc``; see
            `resolve_mode`.
        critical_threshold: dbsc: the raw router probability that makes a selected expert critical.
        warmup: slice modes: ``pcw``, ``last-layer``, ``random`` or ``empty`` (`zipmoe.runtime.policies.SlicePolicy`).
        plan: lossless mode: a plan file from ``zipmoe plan`` for this container, or ``auto`` (plan now from the
            architecture's synthetic routing and this machine's measured costs); sets the tiers, pins and prefetches
            the planned experts, and manages the rest with LFU (`zipmoe.planning`).
        schedule: the order a layer's fetches are issued in, ``fifo`` or ``affinity`` (`zipmoe.runtime.pipeline`);
            None: ``affinity`` with a plan, else ``fifo``.
    """

    device: str = "auto"
    dtype: str | None = None
    memory_budget: int | str | None = None
    tiers: str | Mapping[str, float] | None = None
    policy: str = DEFAULT_POLICY
    threads: int | None = None
    io: str = "buffered"
    simulate_storage_gbps: float | None = None
    mode: str = "lossless"
    critical_threshold: float = DEFAULT_THRESHOLD
    warmup: str = "pcw"
    plan: str | os.PathLike[str] | None = None
    schedule: str | None = None

    def __post_init__(self) -> None:
        gbps = self.simulate_storage_gbps
        if gbps is not None and not (math.isfinite(gbps) and gbps >= MIN_STORAGE_GBPS):
            raise BudgetError(
                f"--storage must be a finite positive bandwidth of at least {MIN_STORAGE_GBPS:g} GB/s, got {gbps!r}"
            )
        if not 0.0 <= self.critical_threshold <= 1.0:  # also NaN
            raise BudgetError(f"--critical-threshold must be between 0 and 1, got {self.critical_threshold!r}")
        if self.warmup not in WARMUPS:
            raise BudgetError(f"unknown warmup {self.warmup!r} (choose {', '.join(WARMUPS)})")
        if self.policy not in POLICIES:
            raise BudgetError(f"unknown policy {self.policy!r} (choose {', '.join(POLICIES)})")
        if self.io not in IO_MODES:
            raise BudgetError(f"unknown --io {self.io!r} (choose {', '.join(IO_MODES)})")
        if self.tiers is not None:
            parse_tiers(self.tiers)
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise BudgetError(f"unknown schedule {self.schedule!r} (choose {', '.join(SCHEDULES)})")


def _lossless_tiers(capacity: int, shares: Mapping[str, float], policy) -> Tiers:
    """One pool per lossless form, each ``shares[form]`` of ``capacity`` bytes (a form left out gets none)."""
    pools = {kind: (int(capacity * shares.get(kind, 0.0)), (kind,)) for kind in (DECODED, COMPRESSED, SM)}
    return Tiers(pools, policy)


class Engine:
    """A container opened for generation. Close it (or use it as a context manager) to release its threads."""

    def __init__(self, path: str | os.PathLike[str], options: EngineOptions | None = None) -> None:
        self.options = options = options or EngineOptions()
        self.container = Container(path)
        self.args = ModelArgs.from_hf_config(self.container.manifest.config)
        check_tensors(self.args, self.container.manifest, self.container.small_tensors)
        self._generation_config = self._read_generation_config()
        self._eos_ids = self._read_eos_ids()
        # the sampling defaults of generation_config.json, and a warning for each value of it ignored (for the CLI)
        self.generation_defaults, self.generation_warnings = generation_defaults(self._generation_config or {})
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.threads = options.threads or available_cpus()
        torch.set_num_threads(self.threads)
        spec = self.container.slice_spec
        self.slice_mode, base_bits = resolve_mode(options.mode, spec)
        self.mode = options.mode
        self.storage = Storage(
            self.container.path, io=options.io, gbps=options.simulate_storage_gbps, pinned=self.device.type == "cuda"
        )
        self.workers = Workers(self.threads)
        self.source: LosslessExperts | SliceExperts
        if self.slice_mode == "lossless":
            group = spec.group_size if spec else DEFAULT_GROUP_SIZE
            transform = base_transform(self.args, base_bits, group, self.workers) if base_bits else None
            self.source = LosslessExperts(
                self.container, self.args, self.device, self.dtype, self.storage, self.workers, transform
            )
        else:
            self.source = SliceExperts(
                self.container, self.args, self.device, self.dtype, self.storage, self.workers, self.slice_mode
            )
        # the routed experts the model runs (not those of a multi-token-prediction layer after the last one)
        self.n_experts = sum(1 for layer, _ in self.container.experts if layer < self.args.n_layers)
        self.expert_bf16_bytes = self.source.source_nbytes * self.n_experts
        self.reservation = self.source.reservation(self.args.top_k)
        if options.plan is not None and self.slice_mode != "lossless":
            raise ModeError("--plan applies to lossless mode (the slice modes have their own cache policy)")
        loaded = None
        if options.plan is not None and str(options.plan) != "auto":
            loaded = read_plan(options.plan, manifest_sha256(self.container))
        self.budget = self._budget(options.memory_budget if loaded is None else self._plan_budget(loaded))
        if self.budget < self.reservation:
            raise BudgetError(
                f"memory budget {self.budget / 1e6:.1f} MB is below the minimum of {self.reservation / 1e6:.1f} MB "
                f"for this model ({self.args.top_k} experts being fetched at once)"
            )
        self.tiers = self._tiers(self.budget - self.reservation)
        if isinstance(self.source, LosslessExperts):
            self.source.pool.limit = self.reservation  # free buffers stay within what fetches in flight may hold
        self.pipeline = ExpertPipeline(
            self.source, self.tiers, self.storage, self.reservation, critical_threshold=options.critical_threshold,
            schedule=options.schedule or ("affinity" if options.plan is not None else "fifo"),
        )  # fmt: skip
        self.dense = self._load_dense()
        self.model = Transformer(self.args, self.dense, self.pipeline)
        self._tokenizer: TextTokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        self.plan: LoadedPlan | None = None
        if options.plan is not None:
            self.use_plan(loaded if loaded is not None else self._auto_plan())

    # -- plans --------------------------------------------------------------------------------------------------------

    def _plan_budget(self, plan: LoadedPlan) -> int:
        requested = self.options.memory_budget
        if requested is not None:
            budget = self._budget(requested)
            if budget != plan.budget_bytes:
                raise PlanError(
                    f"{self.options.plan}: planned for a budget of {plan.budget_bytes} bytes, not {budget}; "
                    "leave out --memory-budget or plan again"
                )
        return plan.budget_bytes

    def _auto_plan(self) -> LoadedPlan:
        """Plan now (`--plan auto`): the architecture's synthetic routing, this machine's measured costs."""
        from zipmoe.planning.build import plan_engine

        return plan_engine(self).loaded()

    def use_plan(self, plan: LoadedPlan) -> None:
        """Serve with ``plan``: its tier shares, its pinned experts read now and never evicted, LFU for the rest."""
        capacity = self.budget - self.reservation
        if plan.tiers.get(SM) and not self.source.split:
            raise PlanError("the plan holds sign-mantissa planes; this container stores its experts whole")
        self.tiers = _lossless_tiers(capacity, plan.tiers, PlannedLFU(plan.pinned))
        self.pipeline.tiers = self.tiers
        if plan.decodes_per_read:
            self.pipeline.decodes_per_read = plan.decodes_per_read
        self.pipeline.prefetch(plan.pinned)
        self.plan = plan

    def record_routing(self) -> RoutingRecorder:
        """Record every MoE layer's choices from now on (`zipmoe run --record-routing`)."""
        self.model.recorder = RoutingRecorder(sum(self.args.sparse_layers), self.args.n_experts, self.args.top_k)
        return self.model.recorder

    def replay_routing(self, trace: RoutingTrace | None, request: int = 0) -> None:
        """Route by request ``request`` of ``trace`` instead of the router (None: the router again)."""
        if trace is None:
            self.model.replay = None
            return
        trace = trace.for_model(sum(self.args.sparse_layers), self.args.n_experts, self.args.top_k)
        self.model.replay = RoutingReplay(trace, request)

    def _tiers(self, capacity: int) -> Tiers:
        """The tiers and their policy: per-representation pools (lossless), or one pool of slices."""
        options = self.options
        if isinstance(self.source, SliceExperts):
            experts = [(layer, e) for layer, e, kind in self.source.layouts if kind == MSB]
            policy = SlicePolicy(lsb_first=self.slice_mode == "dbsc", warmup=options.warmup, experts=sorted(experts))
            return Tiers({"slices": (capacity, (MSB, LSB))}, policy, depends={LSB: MSB})
        if options.tiers is not None:
            shares = parse_tiers(options.tiers)
            if shares[SM] and not self.source.split:
                raise BudgetError(
                    f"--tiers sm={shares[SM]:g}: {self.container.path} stores its experts whole (format version "
                    f"{self.container.manifest.format_version}); repack it with this zipmoe for the sign-mantissa tier"
                )
        elif options.memory_budget is None:
            shares = {DECODED: 1.0, COMPRESSED: 0.0, SM: 0.0}
        else:
            shares = dict(DEFAULT_TIERS)
            if not self.source.split:  # no planes apart: their share goes to whole records
                shares[COMPRESSED] += shares.pop(SM)
                shares[SM] = 0.0
        return _lossless_tiers(capacity, shares, POLICIES[options.policy]())

    def _budget(self, requested: int | str | None) -> int:
        if isinstance(requested, int):
            return requested
        if requested is not None:
            return parse_size(requested, percent_of=self.expert_bf16_bytes)
        if isinstance(self.source, SliceExperts):
            everything = sum(r.nbytes for r in self.container.manifest.slice_records)
        else:
            everything = self.n_experts * self.source.decoded_nbytes
        cap = available_memory() // 2
        reserve = self.reservation
        return max(reserve, min(everything + reserve, cap) if cap else everything + reserve)

    def cache_minimum(self) -> int:
        return self.reservation

    def _load_dense(self) -> dict[str, torch.Tensor]:
        def read():
            for tensor in self.container.dense_tensors():
                if runs_tensor(self.args, tensor.name):  # not DeepSeek-V3's multi-token-prediction layer
                    yield tensor.name, to_tensor(self.container.read_tensor(tensor.name), tensor.dtype, tensor.shape)

        block = scale_block(self.container.manifest.config)
        weights = resident_weights(self.args, read(), self.device, self.dtype, block)
        self.container.release(0, self.container.header.file_nbytes)  # the mapped pages; the weights are copies
        return weights

    @property
    def dense_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.dense.values())

    @property
    def tokenizer(self) -> TextTokenizer:
        with self._tokenizer_lock:  # a server's threads may ask first at the same time
            if self._tokenizer is None:
                self._tokenizer = TextTokenizer.from_container(self.container)
        return self._tokenizer

    def eos_ids(self) -> tuple[int, ...]:
        """The end-of-sequence tokens of config.json and generation_config.json."""
        return self._eos_ids

    def default_sampling(self, **overrides: Any) -> SamplingOptions:
        """`SamplingOptions` with this container's generation_config.json defaults (`generation_defaults`: greedy
        unless it sets ``do_sample``), and the ``overrides`` (field values; None: the default) on top.

        Raises:
            SamplingError: a value out of range, naming its flag.
        """
        return sampling_with_defaults(self.generation_defaults, **overrides)

    def _read_generation_config(self) -> dict[str, Any] | None:
        name = "generation_config.json"
        if not any(f.name == name for f in self.container.manifest.files):
            return None
        where = f"{self.container.path}: embedded {name}"
        doc = load_json(self.container.read_file(name), lambda reason: FormatError(f"{where}: {reason}"))
        if not isinstance(doc, dict):
            raise FormatError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        return doc

    def _read_eos_ids(self) -> tuple[int, ...]:
        if self._generation_config is None:
            return self.args.eos_token_ids
        doc = self._generation_config
        generation = read_token_ids(doc, "eos_token_id", self.args.vocab_size, "generation_config.json")
        return tuple(sorted(set(self.args.eos_token_ids) | set(generation)))

    def generate_tokens(self, prompt: list[int], sampling: SamplingOptions, on_token=None) -> GenerationResult:
        """Generate from token ids (see `zipmoe.runtime.generate.generate`).

        The expert cache stays as it is between calls (what one prompt brought in serves the next); the result's
        ``cache`` holds what the pipeline did for this call alone, ``self.pipeline.stats`` the totals.
        """
        before = copy.deepcopy(self.pipeline.stats)
        result = generate(self.model, prompt, sampling, eos_ids=self.eos_ids(), on_token=on_token)
        result.cache = stats_since(before, self.pipeline.stats)
        return result

    def scheduler(self, **kwargs: Any) -> BatchScheduler:
        """A continuous-batching scheduler over this engine's model and end-of-sequence tokens; ``kwargs`` are
        `zipmoe.runtime.batching.BatchScheduler`'s (``max_batch``, ``max_queue``, ``max_context``, ``prefill_chunk``).
        The expert cache is shared with `generate_tokens`; ``self.pipeline.stats`` counts every sequence's work.
        """
        return BatchScheduler(self.model, eos_ids=self.eos_ids(), **kwargs)

    def generate_text(
        self, prompt: str, sampling: SamplingOptions, *, chat: bool = False, on_text=None
    ) -> tuple[str, GenerationResult]:
        """Generate from a text prompt (with ``chat``, one user message through the chat template); ``on_text``
        receives the text as it is produced."""
        check_prompt(prompt)
        return self.generate_text_from(self.tokenizer.encode(prompt, chat=chat), sampling, on_text=on_text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation (``{"role", "content"}`` messages) rendered by the embedded chat template, up
        to where the assistant's reply starts.

        Raises:
            TokenizerError: the container has no chat template, or it fails on these messages.
        """
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids  # the template wrote them

    def generate_text_from(
        self, ids: list[int], sampling: SamplingOptions, *, on_text=None
    ) -> tuple[str, GenerationResult]:
        """Generate after prompt token ids; the new text, and ``on_text`` receives it as it is produced.

        The text ends before the first of ``sampling.stop`` to appear, with ``finish_reason`` ``"stop"``
        (`zipmoe.runtime.stops`): the token callback returns True there, which ends the token loop.
        """
        matcher = StopMatcher(self.tokenizer, sampling.stop)
        pieces: list[str] = []

        def emit(token: int) -> bool:
            piece, stopped = matcher.push(token)
            pieces.append(piece)
            if on_text is not None and piece:
                on_text(piece)
            return stopped

        result = self.generate_tokens(ids, sampling, emit)  # ends at the stop, finish_reason "stop"
        if not matcher.stopped:
            tail = matcher.flush()
            pieces.append(tail)
            if on_text is not None and tail:
                on_text(tail)
        return "".join(pieces), result

    def close(self) -> None:
        self.pipeline.close()
        self.workers.close()
        self.container.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def expert_bytes_summary(engine: Engine) -> dict[str, Any]:
    """Sizes that explain a budget: one expert BF16/decoded/record (or MSB and LSB records), all experts BF16."""
    record = engine.source.record_nbytes
    return {
        "mode": engine.mode,
        "expert_bf16_bytes": engine.source.source_nbytes,
        "expert_decoded_bytes": engine.source.decoded_nbytes,
        "expert_record_bytes": dict(record) if isinstance(record, dict) else record,
        "all_experts_bf16_bytes": engine.expert_bf16_bytes,
        "n_experts": engine.n_experts,
        "kv_cache_bytes_per_token": engine.model.cache_bytes_per_token,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": str(engine.device),
    }


def stats_since(before: PipelineStats, after: PipelineStats) -> PipelineStats:
    """What the pipeline did between two snapshots of its statistics: counts, bytes and seconds subtracted, the
    per-step lists cut; ``peak_bytes`` is a high-water mark and stays the total's."""
    delta: dict[str, Any] = {}
    for f in fields(after):
        old, new = getattr(before, f.name), getattr(after, f.name)
        if f.name == "peak_bytes":
            delta[f.name] = new
        elif isinstance(new, dict):
            delta[f.name] = {key: value - old.get(key, 0) for key, value in new.items()}
        elif isinstance(new, list):
            delta[f.name] = new[len(old) :]
        else:
            delta[f.name] = new - old
    return PipelineStats(**delta)
