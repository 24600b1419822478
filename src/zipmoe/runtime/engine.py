"""Everything `zipmoe run` needs, built from one container: model, expert cache, tokenizer, generation."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from zipmoe._json import load_json
from zipmoe._threads import available_cpus
from zipmoe.errors import FormatError, ZipmoeError
from zipmoe.formats.reader import Container
from zipmoe.quant.spec import DEFAULT_GROUP_SIZE, SliceSpec
from zipmoe.runtime.cache import BudgetError, ExpertCache, minimum_budget
from zipmoe.runtime.config import ModelArgs, read_token_ids
from zipmoe.runtime.generate import GenerationResult, PromptError, SamplingOptions, generate
from zipmoe.runtime.model import Transformer
from zipmoe.runtime.slice_cache import DEFAULT_THRESHOLD, WARMUPS, SliceCache, minimum_slice_budget
from zipmoe.runtime.slices import SliceStore, base_transform
from zipmoe.runtime.store import ExpertStore, StorageThrottle
from zipmoe.runtime.tokenizer import StreamDecoder, TextTokenizer
from zipmoe.runtime.weights import check_tensors, to_tensor

# The whole budget decoded by default: on the benchmark (docs/BENCHMARKS.md) a compressed tier's hits cost a decode
# that, at 1.25-3.5 GB/s storage, is worth less than the decoded capacity the tier takes (CPU and GPU alike).
DEFAULT_DECODED_FRACTION = 1.0
# Slower simulated storage would turn one expert read into hours of sleep.
MIN_STORAGE_GBPS = 1e-3
MAX_SIZE = 2**63  # bytes: the largest size `parse_size` accepts (8 EiB: beyond any memory)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}  # fmt: skip


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


def parse_size(text: str, *, percent_of: int | None = None) -> int:
    """Bytes from ``2GiB``, ``500MB``, ``1.5G``, ``123456`` or, with ``percent_of``, ``50%``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*|%)\s*", text)
    if m is None:
        raise BudgetError(f"cannot read size {text!r} (examples: 2GiB, 500MB, 50%)")
    number, unit = float(m[1]), m[2].lower()
    if unit == "%":
        if percent_of is None:
            raise BudgetError("a percentage needs something to be a percentage of")
        size = number / 100 * percent_of
    elif unit in _UNITS:
        size = number * _UNITS[unit]
    else:
        raise BudgetError(f"unknown size unit {m[2]!r} in {text!r} (use B, kB, MB, GB, KiB, MiB, GiB)")
    if not size <= MAX_SIZE:  # also inf and nan, from a number too long for a float
        raise BudgetError(f"size {_short(text)} is too large (at most 2**63 bytes)")
    return int(size)


def _short(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def check_prompt(prompt: str) -> None:
    """Raise `PromptError` for a prompt that is empty or not valid UTF-8."""
    if not prompt.strip():
        raise PromptError("the prompt is empty")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8 arrive from argv as lone surrogates
        raise PromptError("the prompt is not valid UTF-8") from None


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


@dataclass(frozen=True)
class EngineOptions:
    """How to serve a container.

    Args:
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: compute dtype (``float32``, ``bfloat16``, ``float16``); None picks per device.
        memory_budget: bytes for the expert cache, or a string (``2GiB``, ``50%`` of the BF16 expert bytes);
            None: every expert decoded, capped at half of the available memory.
        decoded_fraction: share of the cache for decoded experts (the rest holds compressed records); None: all of
            it without a budget, else `DEFAULT_DECODED_FRACTION`.
        threads: compute and fetch threads (default: every available CPU).
        simulate_storage_gbps: simulated storage bandwidth in GB/s (see `zipmoe.runtime.store`).
        mode: ``lossless`` (BF16 experts), or from AMAT slices ``q8``/``q4`` (MAT(8,4)) or ``dbsc``; see
            `resolve_mode`.
        critical_threshold: dbsc: the top expert's share of its token's routing weight that makes it critical.
        warmup: slice modes: ``pcw``, ``none`` or ``empty`` (see `zipmoe.runtime.slice_cache`).
    """

    device: str = "auto"
    dtype: str | None = None
    memory_budget: int | str | None = None
    decoded_fraction: float | None = None
    threads: int | None = None
    simulate_storage_gbps: float | None = None
    mode: str = "lossless"
    critical_threshold: float = DEFAULT_THRESHOLD
    warmup: str = "pcw"

    def __post_init__(self) -> None:
        gbps = self.simulate_storage_gbps
        if gbps is not None and not (math.isfinite(gbps) and gbps >= MIN_STORAGE_GBPS):
            raise BudgetError(
                f"--simulate-storage must be a finite positive bandwidth of at least {MIN_STORAGE_GBPS:g} GB/s, "
                f"got {gbps!r}"
            )
        for name, value in (("--decoded-fraction", self.decoded_fraction),
                            ("--critical-threshold", self.critical_threshold)):  # fmt: skip
            if value is not None and not 0.0 <= value <= 1.0:
                raise BudgetError(f"{name} must be between 0 and 1, got {value!r}")
        if self.warmup not in WARMUPS:
            raise BudgetError(f"unknown warmup {self.warmup!r} (choose {', '.join(WARMUPS)})")


class Engine:
    """A container opened for generation. Close it (or use it as a context manager) to release its threads."""

    def __init__(self, path: str | os.PathLike[str], options: EngineOptions | None = None) -> None:
        self.options = options = options or EngineOptions()
        self.container = Container(path)
        self.args = ModelArgs.from_hf_config(self.container.manifest.config)
        check_tensors(self.args, self.container.manifest, self.container.small_tensors)
        self._eos_ids = self._read_eos_ids()
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.threads = options.threads or available_cpus()
        torch.set_num_threads(self.threads)
        gbps = options.simulate_storage_gbps
        throttle = StorageThrottle(gbps * 1e9) if gbps is not None else None
        spec = self.container.slice_spec
        self.slice_mode, base_bits = resolve_mode(options.mode, spec)
        self.mode = options.mode
        self.store: ExpertStore | SliceStore
        self.cache: ExpertCache | SliceCache
        if self.slice_mode == "lossless":
            group = spec.group_size if spec else DEFAULT_GROUP_SIZE
            transform = base_transform(self.args, base_bits, group, self.threads) if base_bits else None
            self.store = ExpertStore(
                self.container, self.args, self.device, self.dtype, throttle, self.threads, transform
            )
        else:
            self.store = SliceStore(self.container, self.args, self.device, self.dtype, throttle, self.threads)
        self.expert_bf16_bytes = self.store.source_nbytes * len(self.container.experts)
        self.budget = self._budget(options.memory_budget)
        if isinstance(self.store, SliceStore):
            self.cache = SliceCache(
                self.store,
                self.budget,
                mode=self.slice_mode,
                threshold=options.critical_threshold,
                warmup=options.warmup,
                threads=self.threads,
            )
        else:
            fraction = options.decoded_fraction
            if fraction is None:
                fraction = 1.0 if options.memory_budget is None else DEFAULT_DECODED_FRACTION
            self.cache = ExpertCache(self.store, self.budget, decoded_fraction=fraction, threads=self.threads)
        self.dense = self._load_dense()
        self.model = Transformer(self.args, self.dense, self.cache)
        self._tokenizer: TextTokenizer | None = None

    def _budget(self, requested: int | str | None) -> int:
        if isinstance(requested, int):
            return requested
        if requested is not None:
            return parse_size(requested, percent_of=self.expert_bf16_bytes)
        if isinstance(self.store, SliceStore):
            everything = sum(r.nbytes for r in self.container.manifest.slice_records)
        else:
            everything = len(self.container.experts) * (self.store.decoded_nbytes + self.store.record_nbytes)
        cap = available_memory() // 2
        reserve = self.cache_minimum()
        return max(reserve, min(everything + reserve, cap) if cap else everything + reserve)

    def cache_minimum(self) -> int:
        if isinstance(self.store, SliceStore):
            return minimum_slice_budget(self.store, self.args.top_k)
        return minimum_budget(self.store, self.args.top_k)

    def _load_dense(self) -> dict[str, torch.Tensor]:
        weights = {}
        for tensor in self.container.dense_tensors():
            data = self.container.read_tensor(tensor.name)
            t = to_tensor(data, tensor.dtype, tensor.shape)
            weights[tensor.name] = t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)
        self.container.release(0, self.container.header.file_nbytes)  # the mapped pages; the weights are copies
        return weights

    @property
    def dense_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.dense.values())

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer.from_container(self.container)
        return self._tokenizer

    def eos_ids(self) -> tuple[int, ...]:
        """The end-of-sequence tokens of config.json and generation_config.json."""
        return self._eos_ids

    def _read_eos_ids(self) -> tuple[int, ...]:
        name = "generation_config.json"
        if not any(f.name == name for f in self.container.manifest.files):
            return self.args.eos_token_ids
        where = f"{self.container.path}: embedded {name}"
        doc = load_json(self.container.read_file(name), lambda reason: FormatError(f"{where}: {reason}"))
        if not isinstance(doc, dict):
            raise FormatError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        generation = read_token_ids(doc, "eos_token_id", self.args.vocab_size, name)
        return tuple(sorted(set(self.args.eos_token_ids) | set(generation)))

    def generate_tokens(self, prompt: list[int], sampling: SamplingOptions, on_token=None) -> GenerationResult:
        """Generate from token ids (see `zipmoe.runtime.generate.generate`)."""
        return generate(self.model, prompt, sampling, eos_ids=self.eos_ids(), on_token=on_token)

    def generate_text(
        self, prompt: str, sampling: SamplingOptions, *, chat: bool = False, on_text=None
    ) -> tuple[str, GenerationResult]:
        """Generate from a text prompt; ``on_text`` receives the text as it is produced."""
        check_prompt(prompt)
        ids = self.tokenizer.encode(prompt, chat=chat)
        stream = StreamDecoder(self.tokenizer)
        pieces: list[str] = []

        def emit(token: int) -> None:
            piece = stream.push(token)
            pieces.append(piece)
            if on_text is not None and piece:
                on_text(piece)

        result = self.generate_tokens(ids, sampling, emit)
        return "".join(pieces), result

    def close(self) -> None:
        self.cache.close()
        self.container.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def expert_bytes_summary(engine: Engine) -> dict[str, Any]:
    """Sizes that explain a budget: one expert BF16/decoded/record (or MSB and LSB records), all experts BF16."""
    record = engine.store.record_nbytes
    return {
        "mode": engine.mode,
        "expert_bf16_bytes": engine.store.source_nbytes,
        "expert_decoded_bytes": engine.store.decoded_nbytes,
        "expert_record_bytes": dict(record) if isinstance(record, dict) else record,
        "all_experts_bf16_bytes": engine.expert_bf16_bytes,
        "n_experts": len(engine.container.experts),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "device": str(engine.device),
    }
