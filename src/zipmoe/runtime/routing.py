"""Routing traces: which experts a router chose, recorded, read back, replayed, or generated like a real router.

A cache benchmark is only as honest as its routing: a random-init model routes with far more locality than a
trained one. This module records the experts a model's router picks (`RoutingRecorder`), stores them as a trace
file, replays them into the runtime in place of the router (`RoutingReplay`), and generates synthetic traces whose
statistics match two real routers (`synthetic_trace`, checked with `routing_statistics` against
`REFERENCE_STATISTICS`). It needs only numpy, so it loads fast.

Trace file format, JSON Lines (UTF-8), one JSON value per line:

- first line, the header: ``{"format": "zipmoe-routing", "version": 1, "num_experts": E, "top_k": k,
  "num_layers": L}`` where L counts the sparse (MoE) layers only;
- then one request per line: ``{"tokens": [[[e1, ..., ek] for each sparse layer] for each token]}``.

Blank lines are skipped. Bounds, checked line by line before anything is allocated from a count: E <= 4096,
k <= min(64, E), L <= 1024, at most 1,000,000 tokens in a file, lines at most 64 MiB. Every problem is a
`RoutingError` whose one-line message names the file and line.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from zipmoe._json import load_json
from zipmoe.errors import OutputError, ZipmoeError

__all__ = [
    "FORMAT",
    "VERSION",
    "MAX_EXPERTS",
    "MAX_TOP_K",
    "MAX_LAYERS",
    "MAX_TOKENS",
    "MAX_LINE_BYTES",
    "REFERENCE_STATISTICS",
    "REFERENCE_ZIPF_RANGE",
    "SYNTHETIC_PRESETS",
    "RoutingError",
    "RoutingTrace",
    "RoutingRecorder",
    "RoutingReplay",
    "SyntheticPreset",
    "synthetic_trace",
    "parse_routing",
    "routing_statistics",
]

FORMAT = "zipmoe-routing"
VERSION = 1
MAX_EXPERTS = 4096
MAX_TOP_K = 64
MAX_LAYERS = 1024
MAX_TOKENS = 1_000_000  # tokens in one trace (file, recorder or synthetic)
MAX_LINE_BYTES = 64 << 20  # one line of a trace file, its newline included
PARTIAL_SUFFIX = ".partial"
SYNTHETIC_PREFIX = "synthetic:"

# Statistics of two real routers, from the per-prompt routing traces published with the ZipMoE reference
# implementation (19-token prompts; Qwen1.5-MoE-A2.7B: 60 experts, top-4, 24 sparse layers, 1000 prompts;
# DeepSeek-V2-Lite: 64 experts, top-6, 26 sparse layers, 953 prompts), as summarised in the project's notes
# (shared/notes/routing-statistics.md): one entry per row of the notes' table. Keys are those of
# `routing_statistics`, which defines each figure. One copy for the generator's test and for benchmarks.
REFERENCE_STATISTICS: dict[str, dict[str, float]] = {
    "qwen": {
        "distinct_experts_per_prompt": 37.4,
        "max_expert_count_per_prompt": 6.3,
        "prompt_entropy_bits": 4.96,
        "global_entropy_bits": 5.85,
        "zipf_exponent_median": 0.26,
        "top10_share": 0.157,
        "top25_share": 0.342,
        "top50_share": 0.605,
        "consecutive_prompt_jaccard": 0.48,
    },
    "deepseek": {
        "distinct_experts_per_prompt": 41.6,
        "max_expert_count_per_prompt": 9.3,
        "prompt_entropy_bits": 5.03,
        "global_entropy_bits": 5.85,
        "zipf_exponent_median": 0.46,
        "top10_share": 0.199,
        "top25_share": 0.414,
        "top50_share": 0.669,
        "consecutive_prompt_jaccard": 0.53,
    },
}

# The same source's range of the fitted Zipf exponent across layers (`zipf_exponent_min`, `zipf_exponent_max`). The
# lowest and highest of 24-26 fits on noisy counts move with the number of prompts (a flat layer's fit is lifted by
# sampling noise), so they are a looser target than the table's rows.
REFERENCE_ZIPF_RANGE: dict[str, tuple[float, float]] = {"qwen": (0.16, 0.37), "deepseek": (0.33, 0.60)}

_HEADER_KEYS = ("format", "version", "num_experts", "top_k", "num_layers")


class RoutingError(ZipmoeError, ValueError):
    """A routing trace, a routing spec or a recorder call is malformed or does not fit the model."""


def _one_line(value: Any, limit: int = 60) -> str:
    """``value`` as a short one-line repr, for echoing untrusted values in messages."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _check_shape(num_layers: Any, num_experts: Any, top_k: Any, where: str) -> None:
    for name, value, top in (
        ("num_experts", num_experts, MAX_EXPERTS),
        ("top_k", top_k, MAX_TOP_K),
        ("num_layers", num_layers, MAX_LAYERS),
    ):
        if type(value) is not int and not isinstance(value, np.integer):
            raise RoutingError(f"{where}: {name} must be an integer, not {_one_line(value)}")
        if not 1 <= value <= top:
            raise RoutingError(f"{where}: {name} {value} is out of range (1..{top})")
    if top_k > num_experts:
        raise RoutingError(f"{where}: top_k {top_k} is larger than num_experts {num_experts}")


def _check_request(arr: np.ndarray, num_layers: int, num_experts: int, top_k: int, where: str) -> np.ndarray:
    """``arr`` as a read-only int16 ``[tokens, layers, k]`` array, or a RoutingError saying what is wrong."""
    if arr.dtype.kind not in "iu":
        raise RoutingError(f"{where}: expert ids must be integers, not {arr.dtype}")
    if arr.ndim != 3 or arr.shape[1:] != (num_layers, top_k):
        raise RoutingError(
            f"{where}: request has shape {tuple(arr.shape)}, expected (tokens, {num_layers} layers, {top_k} experts)"
        )
    if arr.shape[0] == 0:
        raise RoutingError(f"{where}: empty request (no tokens)")
    bad = (arr < 0) | (arr >= num_experts)
    if bad.any():
        t, layer, j = (int(i) for i in np.argwhere(bad)[0])
        raise RoutingError(
            f"{where}: token {t} layer {layer}: expert id {int(arr[t, layer, j])} is out of range 0..{num_experts - 1}"
        )
    if top_k > 1:
        s = np.sort(arr, axis=-1)
        dup = (s[..., 1:] == s[..., :-1]).any(axis=-1)
        if dup.any():
            t, layer = (int(i) for i in np.argwhere(dup)[0])
            row = s[t, layer]
            twice = int(row[1:][row[1:] == row[:-1]][0])
            raise RoutingError(f"{where}: token {t} layer {layer}: expert {twice} is listed twice")
    out = np.array(arr, dtype=np.int16, order="C", copy=True)  # never share a caller's (writable) array
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """The experts chosen for every token of some requests, per sparse layer.

    Attributes:
        num_experts: experts per sparse layer (E).
        top_k: experts per token per layer (k).
        num_layers: sparse (MoE) layers (L).
        requests: one read-only int16 array ``[tokens, L, k]`` per request (at least one request, each with at
            least one token; ids in ``0..E-1``, distinct within a token's layer).

    Raises:
        RoutingError: on construction, when any of this does not hold.
    """

    num_experts: int
    top_k: int
    num_layers: int
    requests: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        _check_shape(self.num_layers, self.num_experts, self.top_k, "routing trace")
        for name in ("num_experts", "top_k", "num_layers"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if isinstance(self.requests, np.ndarray) or not isinstance(self.requests, Sequence):
            raise RoutingError("routing trace: requests must be a sequence of [tokens, layers, k] arrays")
        if not self.requests:
            raise RoutingError("routing trace: no requests")
        total = sum(int(np.shape(r)[0]) if np.ndim(r) else 0 for r in self.requests)
        if total > MAX_TOKENS:
            raise RoutingError(f"routing trace: {total} tokens, at most {MAX_TOKENS}")
        checked = tuple(
            _check_request(np.asarray(r), self.num_layers, self.num_experts, self.top_k, f"routing trace request {i}")
            for i, r in enumerate(self.requests)
        )
        object.__setattr__(self, "requests", checked)

    @classmethod
    def _trusted(cls, num_experts: int, top_k: int, num_layers: int, requests: tuple[np.ndarray, ...]) -> RoutingTrace:
        """A trace from already checked read-only int16 arrays, without checking them again."""
        self = object.__new__(cls)
        for name, value in (
            ("num_experts", num_experts),
            ("top_k", top_k),
            ("num_layers", num_layers),
            ("requests", requests),
        ):
            object.__setattr__(self, name, value)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        return (
            (self.num_experts, self.top_k, self.num_layers, len(self.requests))
            == (other.num_experts, other.top_k, other.num_layers, len(other.requests))
        ) and all(np.array_equal(a, b) for a, b in zip(self.requests, other.requests))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"RoutingTrace(num_experts={self.num_experts}, top_k={self.top_k}, num_layers={self.num_layers}, "
            f"requests={len(self.requests)}, tokens={self.num_tokens})"
        )

    @property
    def num_tokens(self) -> int:
        """Tokens in all requests together."""
        return sum(r.shape[0] for r in self.requests)

    def counts(self, requests: slice | None = None) -> tuple[np.ndarray, int]:
        """Tokens routed to each expert of each sparse layer ([L, E], int64) over ``requests``, and the tokens."""
        chosen = self.requests[requests] if requests is not None else self.requests
        tokens = np.concatenate(chosen)  # [T, L, k]
        counts = np.zeros((self.num_layers, self.num_experts), np.int64)
        for layer in range(self.num_layers):
            counts[layer] = np.bincount(tokens[:, layer].ravel(), minlength=self.num_experts)
        return counts, len(tokens)

    def header(self) -> dict[str, Any]:
        """The first line of the trace file, as a dict in canonical key order."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "num_layers": self.num_layers,
        }

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the trace as canonical compact JSON Lines, atomically: to ``path + ".partial"``, then renamed.

        Raises:
            OutputError: the file cannot be written.
        """
        path = os.fspath(path)
        partial = path + PARTIAL_SUFFIX
        compact = {"separators": (",", ":")}
        try:
            with open(partial, "wb") as f:
                f.write(json.dumps(self.header(), **compact).encode() + b"\n")
                for r in self.requests:
                    f.write(b'{"tokens":' + json.dumps(r.tolist(), **compact).encode() + b"}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except OSError as exc:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise OutputError(f"cannot write routing trace {path}: {exc.strerror or exc}") from None

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> RoutingTrace:
        """Read a trace file line by line (never whole), checking every bound before allocating from a count.

        Raises:
            RoutingError: the file cannot be read or is malformed; the one-line message names the file and line.
        """
        name = os.fspath(path)
        try:
            if not stat.S_ISREG(os.stat(name).st_mode):  # a FIFO or a device would block or never end
                raise RoutingError(f"cannot read routing trace {name}: not a regular file")
            f = open(name, "rb")
        except OSError as exc:
            raise RoutingError(f"cannot read routing trace {name}: {exc.strerror or exc}") from None
        with f:
            lineno = 0
            header: dict[str, Any] | None = None
            requests: list[np.ndarray] = []
            total = 0
            while True:
                try:
                    line = f.readline(MAX_LINE_BYTES + 1)
                except OSError as exc:
                    raise RoutingError(f"{name}:{lineno + 1}: cannot read: {exc.strerror or exc}") from None
                if not line:
                    break
                lineno += 1
                where = f"{name}:{lineno}"
                if len(line) > MAX_LINE_BYTES:
                    size = (
                        f"{MAX_LINE_BYTES >> 20} MiB" if MAX_LINE_BYTES % (1 << 20) == 0 else f"{MAX_LINE_BYTES} bytes"
                    )
                    raise RoutingError(f"{where}: line longer than {size}")
                if not line.strip():
                    continue
                value = load_json(line, lambda reason, where=where: RoutingError(f"{where}: {reason}"))
                if header is None:
                    header = _parse_header(value, where)
                    continue
                arr = _parse_request(value, line, header, total, where)
                total += arr.shape[0]
                requests.append(arr)
        if header is None:
            raise RoutingError(f"{name}: empty file (expected a {FORMAT} header line)")
        if not requests:
            raise RoutingError(f"{name}:{lineno}: no requests after the header")
        return cls._trusted(header["num_experts"], header["top_k"], header["num_layers"], tuple(requests))

    def for_model(self, num_layers: int, num_experts: int, top_k: int) -> RoutingTrace:
        """This trace for a model with ``num_layers`` sparse layers of ``num_experts`` experts, top-``top_k``.

        A trace with more layers than the model gives its first ``num_layers`` layers; the same trace when all
        match.

        Raises:
            RoutingError: the trace has fewer layers than the model, or a different E or k (both numbers named).
        """
        if num_experts != self.num_experts:
            raise RoutingError(f"routing trace has {self.num_experts} experts per layer, the model {num_experts}")
        if top_k != self.top_k:
            raise RoutingError(f"routing trace routes each token to top-{self.top_k} experts, the model top-{top_k}")
        if num_layers > self.num_layers:
            raise RoutingError(f"routing trace has {self.num_layers} sparse layers, the model {num_layers}")
        if num_layers < 1:
            raise RoutingError(f"a model needs at least 1 sparse layer, not {num_layers}")
        if num_layers == self.num_layers:
            return self
        cut = []
        for r in self.requests:
            c = np.ascontiguousarray(r[:, :num_layers])
            c.setflags(write=False)
            cut.append(c)
        return RoutingTrace._trusted(self.num_experts, self.top_k, num_layers, tuple(cut))


def _parse_header(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RoutingError(f"{where}: expected a {FORMAT} header object, found {type(value).__name__}")
    if value.get("format") != FORMAT:
        raise RoutingError(
            f"{where}: not a routing trace (format {_one_line(value.get('format'))}, expected {FORMAT!r})"
        )
    version = value.get("version")
    if type(version) is not int or version != VERSION:
        raise RoutingError(f"{where}: unsupported {FORMAT} version {_one_line(version)} (this zipmoe reads {VERSION})")
    extra = sorted(set(value) - set(_HEADER_KEYS))
    if extra:
        raise RoutingError(f"{where}: unexpected header keys {', '.join(_one_line(k, 30) for k in extra[:5])}")
    missing = [k for k in _HEADER_KEYS if k not in value]
    if missing:
        raise RoutingError(f"{where}: header lacks {', '.join(missing)}")
    for key in ("num_experts", "top_k", "num_layers"):
        if type(value[key]) is not int:
            raise RoutingError(f"{where}: header {key} must be an integer, not {_one_line(value[key])}")
    _check_shape(value["num_layers"], value["num_experts"], value["top_k"], f"{where}: header")
    return value


def _parse_request(value: Any, line: bytes, header: dict[str, Any], total: int, where: str) -> np.ndarray:
    num_layers, num_experts, top_k = header["num_layers"], header["num_experts"], header["top_k"]
    if not isinstance(value, dict) or "tokens" not in value:
        raise RoutingError(f'{where}: expected a request {{"tokens": [...]}}')
    if len(value) != 1:
        extra = sorted(k for k in value if k != "tokens")
        raise RoutingError(f"{where}: unexpected request keys {', '.join(_one_line(k, 30) for k in extra[:5])}")
    tokens = value["tokens"]
    if not isinstance(tokens, list):
        raise RoutingError(f"{where}: tokens must be a list, not {type(tokens).__name__}")
    if not tokens:
        raise RoutingError(f"{where}: empty request (no tokens)")
    if total + len(tokens) > MAX_TOKENS:
        raise RoutingError(f"{where}: too many tokens (more than {MAX_TOKENS} in the file)")
    # true/false would pass as 1/0 in a numpy int array; the only string a valid line holds is the key "tokens"
    suspicious = b"true" in line or b"false" in line
    arr = None
    if not suspicious:
        try:
            arr = np.array(tokens)
        except (ValueError, OverflowError, TypeError):
            arr = None
    if arr is None or arr.dtype.kind not in "iu" or arr.shape != (len(tokens), num_layers, top_k):
        _diagnose(tokens, num_layers, num_experts, top_k, where)
        arr = np.array(tokens, dtype=np.int64)  # _diagnose found nothing wrong (not reached for bad input)
    return _check_request(arr, num_layers, num_experts, top_k, where)


def _diagnose(tokens: list[Any], num_layers: int, num_experts: int, top_k: int, where: str) -> None:
    """Raise a RoutingError for the first malformed token of a request (the slow path, for bad lines only)."""
    for t, token in enumerate(tokens):
        if not isinstance(token, list):
            raise RoutingError(f"{where}: token {t} is not a list of layers")
        if len(token) != num_layers:
            raise RoutingError(f"{where}: token {t} has {len(token)} layers, expected {num_layers}")
        for layer, experts in enumerate(token):
            if not isinstance(experts, list):
                raise RoutingError(f"{where}: token {t} layer {layer} is not a list of expert ids")
            if len(experts) != top_k:
                raise RoutingError(f"{where}: token {t} layer {layer} has {len(experts)} experts, expected {top_k}")
            for e in experts:
                if type(e) is not int:
                    raise RoutingError(f"{where}: token {t} layer {layer}: expert id {_one_line(e)} is not an integer")
                if not 0 <= e < num_experts:
                    raise RoutingError(
                        f"{where}: token {t} layer {layer}: expert id {_one_line(e)} is out of range "
                        f"0..{num_experts - 1}"
                    )


# ---------------------------------------------------------------------------------------------------------------
# Synthetic traces


@dataclass(frozen=True)
class SyntheticPreset:
    """The shape of a real router's statistics, as the generator's parameters.

    Attributes:
        num_experts, top_k: the real model's E and k (the defaults of `synthetic_trace`).
        zipf: Zipf exponents of the layers' expected popularity (lowest, median, highest), spread evenly over the
            layers. Calibrated (slightly off the table's) so that the fit on sampled counts, which sampling noise
            lifts for flat layers and lowers for steep ones, matches `REFERENCE_STATISTICS` for 200-1000 prompts.
        offset: Zipf-Mandelbrot offset as a fraction of E: popularity ~ (rank + offset * E) ** -s', with s' chosen
            so that a least-squares fit of log popularity vs log rank gives the layer's exponent. A pure power law
            (offset 0) with the real fitted exponent puts too much weight on the top 10% of experts.
        concentration: per-expert Dirichlet concentration: a request's distribution is Dirichlet(concentration * E *
            p). Lower is more concentrated within a request (fewer distinct experts per prompt).
        drift: how much of the previous request's distribution the next one keeps (0: independent requests).
    """

    num_experts: int
    top_k: int
    zipf: tuple[float, float, float]
    offset: float
    concentration: float
    drift: float


# Calibrated so that `routing_statistics` of 200-1000 synthetic 19-token prompts is within 10% of every figure of
# REFERENCE_STATISTICS (see tests/test_routing.py).
SYNTHETIC_PRESETS: dict[str, SyntheticPreset] = {
    "qwen": SyntheticPreset(60, 4, (0.14, 0.26, 0.38), offset=5 / 60, concentration=1.8, drift=0.0),
    "deepseek": SyntheticPreset(64, 6, (0.335, 0.47, 0.62), offset=5 / 64, concentration=1.0, drift=0.1),
}


def _check_count(name: str, value: Any, low: int = 1) -> int:
    if (type(value) is not int and not isinstance(value, np.integer)) or value < low:
        raise RoutingError(f"{name} must be an integer >= {low}, not {_one_line(value)}")
    return int(value)


def synthetic_trace(
    name: str,
    *,
    num_layers: int,
    num_experts: int | None = None,
    top_k: int | None = None,
    requests: int = 8,
    tokens_per_request: int = 64,
    seed: int = 0,
) -> RoutingTrace:
    """A routing trace whose statistics (`routing_statistics`) match a real router's (`REFERENCE_STATISTICS`).

    Per sparse layer: global popularity p over experts follows a Zipf-Mandelbrot law whose fitted Zipf exponent is
    taken from the preset's range (evenly spaced quantiles of a piecewise-linear distribution through its lowest,
    median and highest exponent, in random layer order), over a random permutation of the experts. Per request and layer: a Dirichlet draw around p (``concentration * E * p``), mixed
    with the previous request's draw by ``drift``. Per token and layer: k distinct experts drawn from the request's
    distribution without replacement (Gumbel-top-k), listed most likely first as a router would.

    With ``num_experts`` / ``top_k`` other than the preset's (another model), the generator keeps the preset's
    fitted Zipf exponent range, its Mandelbrot offset as a fraction of E, its per-expert Dirichlet concentration and
    its drift; distinct-expert counts and shares then scale with E and k rather than matching the table.
    Deterministic for a seed.

    Raises:
        RoutingError: unknown ``name`` or out-of-range sizes.
    """
    preset = SYNTHETIC_PRESETS.get(name)
    if preset is None:
        raise RoutingError(f"unknown synthetic routing {name!r}; choices: {', '.join(sorted(SYNTHETIC_PRESETS))}")
    num_experts = preset.num_experts if num_experts is None else num_experts
    top_k = preset.top_k if top_k is None else top_k
    _check_shape(num_layers, num_experts, top_k, f"synthetic:{name}")
    num_layers, num_experts, top_k = int(num_layers), int(num_experts), int(top_k)
    requests = _check_count("requests", requests)
    tokens_per_request = _check_count("tokens_per_request", tokens_per_request)
    seed = _check_count("seed", seed, 0)
    if requests * tokens_per_request > MAX_TOKENS:
        raise RoutingError(f"synthetic routing of {requests * tokens_per_request} tokens, at most {MAX_TOKENS}")
    L, E, k = num_layers, num_experts, top_k
    rng = np.random.default_rng(seed)

    # Global popularity per layer.
    lo, med, hi = preset.zipf
    u = (rng.permutation(L) + 0.5) / L  # evenly spaced quantiles of the layers' exponents, in random order
    s = np.where(u < 0.5, lo + (med - lo) * 2 * u, med + (hi - med) * (2 * u - 1))
    log_rank = np.log(np.arange(1, E + 1))
    log_shifted = np.log(np.arange(1, E + 1) + preset.offset * E)
    # LS slope of log(rank + b) on log(rank): popularity exp(-s' log(rank + b)) fits exponent s' * slope
    x = log_rank - log_rank.mean()
    slope = float(x @ (log_shifted - log_shifted.mean()) / (x @ x)) if E > 1 else 1.0
    logp = -(s / slope)[:, None] * log_shifted[None, :]
    p = np.exp(logp - logp.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    perm = np.argsort(rng.random((L, E)), axis=1)
    base = np.empty((L, E))
    np.put_along_axis(base, perm, p, axis=1)
    shape = np.maximum(preset.concentration * E * base, 1e-3)

    # Per request: Dirichlet around the popularity, drifting from the previous request (drawn for a block of
    # requests at a time); per token: Gumbel-top-k, i.e. the k largest q / Exp(1), which is sampling k experts
    # without replacement. Scratch arrays stay near 4M entries.
    out = []
    block = max(1, (1 << 22) // (L * E))  # requests (Dirichlet draws) and tokens (noise) at a time
    previous: np.ndarray | None = None
    for first in range(0, requests, block):
        gamma = rng.gamma(shape[None], size=(min(block, requests - first), L, E))
        q = gamma / np.maximum(gamma.sum(axis=2, keepdims=True), 1e-300)
        for r in range(q.shape[0]):
            if previous is not None and preset.drift > 0:
                q[r] = preset.drift * previous + (1 - preset.drift) * q[r]
            previous = q[r]
        q32 = q.astype(np.float32)
        for r in range(q.shape[0]):
            tokens = np.empty((tokens_per_request, L, k), dtype=np.int16)
            for start in range(0, tokens_per_request, block):
                n = min(block, tokens_per_request - start)
                noise = rng.standard_exponential((n, L, E), dtype=np.float32)
                keys = q32[r][None] / np.maximum(noise, np.float32(1e-30), out=noise)
                if k < E:
                    top = np.argpartition(-keys, k - 1, axis=2)[..., :k]
                else:
                    top = np.broadcast_to(np.arange(E), (n, L, E))
                order = np.argsort(-np.take_along_axis(keys, top, axis=2), axis=2, kind="stable")
                tokens[start : start + n] = np.take_along_axis(top, order, axis=2)
            tokens.setflags(write=False)
            out.append(tokens)
    return RoutingTrace._trusted(E, k, L, tuple(out))


def parse_routing(
    spec: str,
    *,
    num_layers: int,
    num_experts: int,
    top_k: int,
    requests: int,
    tokens_per_request: int,
    seed: int = 0,
) -> RoutingTrace:
    """The routing a ``--routing``-like option names, for a model of the given shape.

    ``synthetic:qwen`` or ``synthetic:deepseek``: `synthetic_trace` for the model's E and k (``requests`` of
    ``tokens_per_request`` tokens); anything else is a path to a trace file, read and cut with
    `RoutingTrace.for_model` (``requests``, ``tokens_per_request`` and ``seed`` are then unused).

    Raises:
        RoutingError: unknown ``synthetic:`` name (the message lists the choices), or the file is unreadable,
            malformed or does not fit the model.
    """
    if spec.startswith(SYNTHETIC_PREFIX):
        name = spec[len(SYNTHETIC_PREFIX) :]
        if name not in SYNTHETIC_PRESETS:
            choices = ", ".join(SYNTHETIC_PREFIX + n for n in sorted(SYNTHETIC_PRESETS))
            raise RoutingError(f"unknown routing {_one_line(spec)}; choices: {choices} or a trace file path")
        return synthetic_trace(
            name,
            num_layers=num_layers,
            num_experts=num_experts,
            top_k=top_k,
            requests=requests,
            tokens_per_request=tokens_per_request,
            seed=seed,
        )
    if not spec:
        raise RoutingError("empty routing spec; expected synthetic:qwen, synthetic:deepseek or a trace file path")
    return RoutingTrace.read(spec).for_model(num_layers, num_experts, top_k)


# ---------------------------------------------------------------------------------------------------------------
# Statistics


def routing_statistics(trace: RoutingTrace, prompt_tokens: int = 19) -> dict[str, float]:
    """The statistics of `REFERENCE_STATISTICS`, computed on ``trace``.

    "A prompt" is the first ``prompt_tokens`` tokens of each request (all of a shorter request). Every figure is
    computed per sparse layer and averaged over layers (over layers and prompts for per-prompt figures), from the
    count of each expert's activations (a token choosing it in that layer):

    - ``distinct_experts_per_prompt``: experts with at least one activation in a prompt.
    - ``max_expert_count_per_prompt``: activations of a prompt's most used expert (at most the prompt's tokens).
    - ``prompt_entropy_bits``: Shannon entropy (bits) of a prompt's activation counts, normalised to a distribution.
    - ``global_entropy_bits``: entropy of the counts of all prompts together.
    - ``zipf_exponent_median`` / ``_min`` / ``_max``: per layer, minus the least-squares slope of log count vs log
      rank over the experts with a non-zero count in all prompts together; the median, lowest and highest over
      layers (NaN for layers with fewer than two used experts, ignored; NaN if all are).
    - ``top10_share`` / ``top25_share`` / ``top50_share``: share of all prompts' activations on the layer's most
      used 10% / 25% / 50% of experts (``fraction * E`` rounded half up, at least one).
    - ``consecutive_prompt_jaccard``: |A & B| / |A | B| of the expert sets A, B of two consecutive prompts (requests
      i and i+1), averaged over pairs and layers; NaN for a trace of one request.

    Raises:
        RoutingError: ``prompt_tokens`` is not a positive integer.
    """
    prompt_tokens = _check_count("prompt_tokens", prompt_tokens)
    L, E = trace.num_layers, trace.num_experts
    prompts = [r[:prompt_tokens] for r in trace.requests]
    n_prompts = len(prompts)
    distinct = maximum = entropy = jaccard = 0.0
    global_counts = np.zeros((L, E), dtype=np.int64)
    previous: np.ndarray | None = None  # expert sets [L, E] of the last prompt of the previous chunk
    chunk = _stat_chunk(L, E)
    for start in range(0, n_prompts, chunk):
        part = prompts[start : start + chunk]
        n = len(part)
        lengths = np.array([p.shape[0] for p in part])
        rid = np.repeat(np.arange(n), lengths)
        ids = np.concatenate(part).astype(np.int64)  # [tokens, L, k]
        flat = (rid[:, None, None] * L + np.arange(L)[None, :, None]) * E + ids
        counts = np.bincount(flat.ravel(), minlength=n * L * E).reshape(n, L, E)
        global_counts += counts.sum(axis=0)
        used = counts > 0
        distinct += float(used.sum())
        maximum += float(counts.max(axis=2).sum())
        entropy += float(_entropy_bits(counts).sum())
        if previous is not None:
            jaccard += _jaccard(previous[None], used[:1]).sum()
        if n > 1:
            jaccard += _jaccard(used[:-1], used[1:]).sum()
        previous = used[-1]
    per = n_prompts * L
    stats = {
        "distinct_experts_per_prompt": distinct / per,
        "max_expert_count_per_prompt": maximum / per,
        "prompt_entropy_bits": entropy / per,
        "global_entropy_bits": float(_entropy_bits(global_counts).mean()),
    }
    zipf = np.array([_zipf_exponent(c) for c in global_counts])
    if np.isnan(zipf).all():
        stats.update(zipf_exponent_median=math.nan, zipf_exponent_min=math.nan, zipf_exponent_max=math.nan)
    else:
        stats.update(
            zipf_exponent_median=float(np.nanmedian(zipf)),
            zipf_exponent_min=float(np.nanmin(zipf)),
            zipf_exponent_max=float(np.nanmax(zipf)),
        )
    ranked = -np.sort(-global_counts, axis=1)
    totals = ranked.sum(axis=1)
    for fraction, key in ((0.10, "top10_share"), (0.25, "top25_share"), (0.50, "top50_share")):
        top = max(1, int(math.floor(fraction * E + 0.5)))
        stats[key] = float((ranked[:, :top].sum(axis=1) / totals).mean())
    stats["consecutive_prompt_jaccard"] = float(jaccard / ((n_prompts - 1) * L)) if n_prompts > 1 else math.nan
    return stats


def _stat_chunk(num_layers: int, num_experts: int) -> int:
    """Prompts counted at once: the ``[prompts, L, E]`` count array stays near 4M entries (32 MB)."""
    return max(1, (1 << 22) // (num_layers * num_experts))


def _entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of count vectors along the last axis."""
    q = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * np.log2(np.where(q > 0, q, 1.0)), 0.0)
    return -terms.sum(axis=-1)


def _jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    union = (a | b).sum(axis=-1)
    return (a & b).sum(axis=-1) / np.maximum(union, 1)


def _zipf_exponent(counts: np.ndarray) -> float:
    """Minus the least-squares slope of log count vs log rank over the non-zero counts (NaN with fewer than 2)."""
    v = np.sort(counts[counts > 0])[::-1].astype(np.float64)
    if v.size < 2:
        return math.nan
    x = np.log(np.arange(1, v.size + 1))
    y = np.log(v)
    x -= x.mean()
    return float(-(x @ (y - y.mean())) / (x @ x))


# ---------------------------------------------------------------------------------------------------------------
# Recording and replaying


class RoutingRecorder:
    """Collects the experts a model's router chose, per request, token and sparse layer, into a `RoutingTrace`.

    For every forward step the runtime calls `record` once per sparse layer, in layer order (positions 0..L-1),
    with that layer's ``[T, k]`` top-k expert ids for the step's T tokens (prefill: the prompt; decode: 1); tokens
    are appended in order. `end_request` closes a request (a request with no recorded step is dropped).
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int) -> None:
        _check_shape(num_layers, num_experts, top_k, "routing recorder")
        self.num_layers, self.num_experts, self.top_k = int(num_layers), int(num_experts), int(top_k)
        self._requests: list[np.ndarray] = []
        self._steps: list[np.ndarray] = []  # finished steps of the current request, each [T, L, k]
        self._layers: list[np.ndarray] = []  # the current step's layers so far, each [T, k]
        self._tokens = 0  # tokens recorded, all requests together

    def record(self, layer_position: int, top_index: Any) -> None:
        """Record sparse layer ``layer_position``'s ``[T, k]`` expert ids for the current step's T tokens.

        ``top_index``: anything numpy converts (a torch tensor on any device is copied to the CPU).

        Raises:
            RoutingError: a layer out of order, a shape other than the step's ``[T, k]``, an id out of range, or
                more than `MAX_TOKENS` tokens.
        """
        if hasattr(top_index, "detach") and hasattr(top_index, "cpu"):  # a torch tensor, without importing torch
            top_index = top_index.detach().cpu().numpy()
        ids = np.asarray(top_index)
        expected = len(self._layers)
        if layer_position != expected:
            raise RoutingError(f"routing recorder: got sparse layer {layer_position}, expected layer {expected}")
        if ids.dtype.kind not in "iu" or ids.ndim != 2 or ids.shape[1] != self.top_k or ids.shape[0] == 0:
            raise RoutingError(
                f"routing recorder: layer {layer_position}: expert ids of shape {tuple(ids.shape)} ({ids.dtype}), "
                f"expected integers [tokens, {self.top_k}]"
            )
        if self._layers and ids.shape[0] != self._layers[0].shape[0]:
            raise RoutingError(
                f"routing recorder: layer {layer_position} has {ids.shape[0]} tokens, "
                f"layer 0 of this step {self._layers[0].shape[0]}"
            )
        if ids.min() < 0 or ids.max() >= self.num_experts:
            raise RoutingError(
                f"routing recorder: layer {layer_position}: expert id out of range 0..{self.num_experts - 1}"
            )
        if expected == 0 and self._tokens + ids.shape[0] > MAX_TOKENS:
            raise RoutingError(f"routing recorder: more than {MAX_TOKENS} tokens")
        self._layers.append(ids.astype(np.int16))
        if len(self._layers) == self.num_layers:
            self._steps.append(np.stack(self._layers, axis=1))
            self._tokens += self._layers[0].shape[0]
            self._layers = []

    def end_request(self) -> None:
        """Close the current request.

        Raises:
            RoutingError: a forward step is incomplete (not every sparse layer recorded).
        """
        if self._layers:
            raise RoutingError(
                f"routing recorder: request ended after {len(self._layers)} of {self.num_layers} sparse layers"
            )
        if self._steps:
            self._requests.append(np.concatenate(self._steps))
            self._steps = []

    def trace(self) -> RoutingTrace:
        """The closed requests as a trace (a request in progress is left out).

        Raises:
            RoutingError: no request closed yet, or a token chose one expert twice in a layer.
        """
        if not self._requests:
            raise RoutingError("routing recorder: no request recorded")
        return RoutingTrace(self.num_experts, self.top_k, self.num_layers, tuple(self._requests))

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write `trace` to ``path`` (atomically, see `RoutingTrace.write`)."""
        self.trace().write(path)


class RoutingReplay:
    """Hands out the experts of one request of a trace, in place of the router.

    Token positions past the request's length wrap around modulo its length: a request replayed for longer than it
    was recorded starts over from its first token.
    """

    def __init__(self, trace: RoutingTrace, request: int = 0) -> None:
        if (type(request) is not int and not isinstance(request, np.integer)) or not 0 <= request < len(trace.requests):
            raise RoutingError(f"routing replay: request {request!r} out of range 0..{len(trace.requests) - 1}")
        self.trace = trace
        self.request = int(request)
        self._tokens = trace.requests[self.request]

    @property
    def num_tokens(self) -> int:
        """Tokens recorded for this request (positions wrap around modulo this)."""
        return self._tokens.shape[0]

    def choices(self, layer_position: int, start: int, count: int) -> np.ndarray:
        """The ``[count, k]`` int64 expert ids of sparse layer ``layer_position`` for tokens ``start .. start+count-1``.

        Raises:
            RoutingError: a layer out of range, a negative start or count.
        """
        if not 0 <= layer_position < self.trace.num_layers:
            raise RoutingError(
                f"routing replay: sparse layer {layer_position} out of range 0..{self.trace.num_layers - 1}"
            )
        if start < 0 or count < 0:
            raise RoutingError(f"routing replay: negative token range (start {start}, count {count})")
        positions = (start + np.arange(count)) % self.num_tokens
        return self._tokens[positions, layer_position].astype(np.int64)
