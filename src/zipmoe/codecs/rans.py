"""Interleaved rANS for the exponent plane: within 0.5% of the order-0 entropy, decoded at >1.5 GB/s of BF16/core.

One chunk of N exponent bytes is coded with a static model (a frequency table of 10-bit precision built from the
chunk's own histogram) by 8 interleaved rANS states that share one stream of 32-bit words. Value ``k`` of the chunk
belongs to lane ``k % 8``. Decoding runs in groups of 24 values: each lane decodes three symbols, then renormalises
once. One renormalisation per three symbols is exact because the lower state bound L = 2^31 is a multiple of M^3
(M = 2^10): the composite of three coding steps still maps the state interval [L, 2^32 L) onto a 2^32-unique one
(Duda 2013; Giesen, "Interleaved entropy coders", 2014), and as a symbol costs at most 10 bits, one 32-bit word
always restores the state. 10-bit frequencies cost ~0.25% of the exponent bits over 12-bit ones (0.04 points of the
total ratio) and buy a third fewer renormalisations and a 4 KiB decode table. The last ``N mod 24`` exponents are
stored verbatim.

Payload layout of one chunk (little-endian)::

    offset      size      field
    0           1         mode: 0 = stored (the N exponent bytes follow verbatim), 1 = rANS
    1           1         rANS: number of distinct symbols S minus 1; stored: 0
    --- stored ---
    2           N         the exponent bytes
    --- rANS ---
    2           S         symbols, strictly increasing
    2+S         2*S       frequencies (u16 each, >= 1, summing to 1024), in symbol order
    2+3S        T         tail: the last T = N mod 24 exponent bytes, verbatim
    ...                   zero padding to a multiple of 8 -> H
    H           64        final encoder states, u64 per lane, lane 0 first (each in [2^31, 2^63))
    H+64        4*W       renormalisation words (u32), in decoding order

A decoder that ends with any state != 2^31 or with words left over has read a corrupt payload. The encoder falls
back to the stored mode when that is not larger, so a payload never exceeds N + 2 bytes.

Kernels take arrays and ints, write into preallocated outputs and release the GIL; `zipmoe.codecs.reference`
holds the plain-Python twin used as the test oracle.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from zipmoe.codecs.bf16 import merge_bf16
from zipmoe.codecs.checksum import xxh64
from zipmoe.codecs.intrinsics import mulhi64

PRECISION_BITS = 10
LANES = 8
STEPS = 3  # symbols each lane decodes between two renormalisations
GROUP = STEPS * LANES  # values per decode iteration
STATE_LOWER = 1 << 31  # L; words are 32-bit, so states live in [L, 2^63)
MODE_STORED = 0
MODE_RANS = 1

# Decoder status codes (0 = success); `rans_status_message` spells them out.
OK = 0
BAD_MODE = 1
BAD_TABLE = 2
BAD_SIZE = 3
STREAM_OVERRUN = 4
BAD_FINAL_STATE = 5
BAD_PAYLOAD_CHECKSUM = 6
BAD_PLAIN_CHECKSUM = 7

_STATUS_MESSAGES = {
    BAD_MODE: "unknown payload mode",
    BAD_TABLE: "invalid frequency table",
    BAD_SIZE: "payload size does not match its header",
    STREAM_OVERRUN: "rANS stream ends early",
    BAD_FINAL_STATE: "rANS stream does not end in the initial state",
    BAD_PAYLOAD_CHECKSUM: "checksum mismatch",
    BAD_PLAIN_CHECKSUM: "checksum mismatch",
}

_U = np.uint64
_M = 1 << PRECISION_BITS
_SLOT_MASK = _U(_M - 1)
_PRECISION = _U(PRECISION_BITS)
_L = _U(STATE_LOWER)
# (L / M^3) * 2^32: before coding a lane's three symbols, emit a word while x >= this * f1 * f2 * f3.
_GROUP_BOUND_UNIT = _U(1 << (31 - STEPS * PRECISION_BITS + 32))
_WORD_MASK = _U(0xFFFFFFFF)
_W32 = _U(32)
# Decode-table entry: symbol (bits 0-7) | bias = slot - cum (bits 8-17) | frequency (bits 18-27).
_BIAS_SHIFT = _U(8)
_FREQ_SHIFT = _U(18)


def rans_status_message(status: int) -> str:
    """Human-readable text for a decoder status code."""
    return _STATUS_MESSAGES.get(status, f"decoder status {status}")


def max_payload_nbytes(chunk_values: int) -> int:
    """Upper bound on the payload of one chunk (the stored mode)."""
    return chunk_values + 2


@njit(nogil=True, cache=True)
def _header_nbytes(n_symbols, n_tail):  # pragma: no cover - compiled
    h = 2 + 3 * n_symbols + n_tail
    return (h + 7) & ~7


@njit(nogil=True, cache=True)
def normalize_frequencies(counts, total, freqs):  # pragma: no cover - compiled
    """Scale a 256-bin histogram to frequencies summing to 2^10, every present symbol >= 1 (deterministic).

    Rounds each scaled count to nearest, then repairs the sum one unit at a time, taking from (or giving to) the
    symbol where one unit costs (or gains) the fewest (most) coded bits, compared with integer arithmetic only so
    that every machine builds the same table.
    """
    target = _M
    s = 0
    for i in range(256):
        f = 0
        if counts[i] > 0:
            f = (counts[i] * target + total // 2) // total
            if f < 1:
                f = 1
        freqs[i] = f
        s += f
    while s > target:
        # Taking one unit from i costs about counts[i] / freqs[i] bits: take from the cheapest.
        best = -1
        for i in range(256):
            if freqs[i] > 1 and (best < 0 or counts[i] * freqs[best] < counts[best] * freqs[i]):
                best = i
        freqs[best] -= 1
        s -= 1
    while s < target:
        # Giving one unit to i saves about counts[i] / (freqs[i] + 1) bits: give to the best.
        best = -1
        for i in range(256):
            if counts[i] > 0 and (best < 0 or counts[i] * (freqs[best] + 1) > counts[best] * (freqs[i] + 1)):
                best = i
        freqs[best] += 1
        s += 1


def _reciprocal_tables() -> tuple[np.ndarray, np.ndarray]:
    """Division by multiplication for 0 <= x < 2^63 and 2 <= f <= M (Granlund & Montgomery 1994, round-up
    method): with l = ceil(log2 f), x // f == mulhi64(x, ceil(2^(63+l) / f)) >> (l - 1). f = 1 is the identity."""
    rcp = np.zeros(_M + 1, np.uint64)
    shift = np.zeros(_M + 1, np.uint64)
    for f in range(2, _M + 1):
        l = (f - 1).bit_length()
        rcp[f] = -(-(1 << (63 + l)) // f)
        shift[f] = l - 1
    return rcp, shift


_RECIPROCAL, _RECIPROCAL_SHIFT = _reciprocal_tables()


@njit(inline="always", cache=True)
def _encode_step(x, s, freqs, cum, rcp, shift):  # pragma: no cover - compiled
    # x -> (x // f) * M + cum + x % f, with the division done by a multiplication (see _reciprocal_tables).
    f = _U(freqs[s])
    q = mulhi64(x, rcp[s]) >> shift[s]
    q = x if f == _U(1) else q
    return (q << _PRECISION) + (x - q * f) + _U(cum[s])


@njit(inline="always", cache=True)
def _encode_lane(x, values, b, j, freqs, cum, rcp, shift, words, top):  # pragma: no cover - compiled
    """Code lane ``j``'s three symbols of the group at ``values[b:]`` into state ``x`` (words pushed below ``top``)."""
    s1 = (values[b + _U(j)] >> 7) & 0xFF
    s2 = (values[b + _U(LANES + j)] >> 7) & 0xFF
    s3 = (values[b + _U(2 * LANES + j)] >> 7) & 0xFF
    # Branch-free emission (about one lane in four emits, unpredictably): always store the low word one below the
    # stack top, and keep it (move the top) only when the state is too large for the group.
    emit = x >= _GROUP_BOUND_UNIT * _U(freqs[s1]) * _U(freqs[s2]) * _U(freqs[s3])
    words[top - _U(1)] = x & _WORD_MASK
    top -= _U(emit)
    x = (x >> _W32) if emit else x
    # Code in the reverse of decoding order: the lane's third symbol first.
    x = _encode_step(x, s3, freqs, cum, rcp, shift)
    x = _encode_step(x, s2, freqs, cum, rcp, shift)
    return _encode_step(x, s1, freqs, cum, rcp, shift), top


@njit(nogil=True, cache=True)
def _store(values, lo, hi, out, pos):  # pragma: no cover - compiled
    out[pos] = MODE_STORED
    out[pos + 1] = 0
    for i in range(lo, hi):
        out[pos + 2 + i - lo] = (values[i] >> 7) & 0xFF
    return hi - lo + 2


@njit(nogil=True, cache=True)
def encode_chunk(values, lo, hi, out, pos, words, counts, freqs, cum):  # pragma: no cover - compiled
    """Encode the exponents of ``values[lo:hi]`` (uint16 BF16 patterns) into ``out[pos:]``; return the size.

    ``words`` (uint32, >= (hi - lo) // 3 + 1 entries), ``counts``, ``freqs`` (int64[256]) and ``cum`` (int64[257])
    are scratch; on return ``counts`` holds the chunk's exponent histogram.
    """
    n = hi - lo
    for i in range(256):
        counts[i] = 0
    for i in range(lo, hi):
        counts[(values[i] >> 7) & 0xFF] += 1
    n_groups = n // GROUP
    n_tail = n - n_groups * GROUP
    n_symbols = 0
    for i in range(256):
        if counts[i] > 0:
            n_symbols += 1
    header = _header_nbytes(n_symbols, n_tail)
    if n_symbols == 0 or header + 8 * LANES >= n + 2:
        return _store(values, lo, hi, out, pos)

    normalize_frequencies(counts, n, freqs)
    cum[0] = 0
    for i in range(256):
        cum[i + 1] = cum[i] + freqs[i]
    rcp = np.empty(256, np.uint64)
    shift = np.empty(256, np.uint64)
    for i in range(256):
        rcp[i] = _RECIPROCAL[freqs[i]]
        shift[i] = _RECIPROCAL_SHIFT[freqs[i]]

    # Encode backwards; words are pushed onto a stack that grows down from the end of `words`.
    budget = n + 2 - header - 8 * LANES  # the stored mode wins once the words reach this many bytes
    top = _U(words.size)
    x0 = x1 = x2 = x3 = x4 = x5 = x6 = x7 = _L
    for g in range(n_groups - 1, -1, -1):
        b = _U(lo + g * GROUP)  # unsigned index: no negative-index wraparound code in the hot loop
        x7, top = _encode_lane(x7, values, b, 7, freqs, cum, rcp, shift, words, top)
        x6, top = _encode_lane(x6, values, b, 6, freqs, cum, rcp, shift, words, top)
        x5, top = _encode_lane(x5, values, b, 5, freqs, cum, rcp, shift, words, top)
        x4, top = _encode_lane(x4, values, b, 4, freqs, cum, rcp, shift, words, top)
        x3, top = _encode_lane(x3, values, b, 3, freqs, cum, rcp, shift, words, top)
        x2, top = _encode_lane(x2, values, b, 2, freqs, cum, rcp, shift, words, top)
        x1, top = _encode_lane(x1, values, b, 1, freqs, cum, rcp, shift, words, top)
        x0, top = _encode_lane(x0, values, b, 0, freqs, cum, rcp, shift, words, top)
        if 4 * (words.size - np.int64(top)) >= budget:
            return _store(values, lo, hi, out, pos)
    states = np.empty(LANES, np.uint64)
    states[0], states[1], states[2], states[3], states[4], states[5], states[6], states[7] = (
        x0,
        x1,
        x2,
        x3,
        x4,
        x5,
        x6,
        x7,
    )
    top = np.int64(top)

    # Header, table, tail, states, words.
    p = pos
    out[p] = MODE_RANS
    out[p + 1] = n_symbols - 1
    p += 2
    for i in range(256):
        if freqs[i] > 0:
            out[p] = i
            p += 1
    for i in range(256):
        if freqs[i] > 0:
            out[p] = freqs[i] & 0xFF
            out[p + 1] = freqs[i] >> 8
            p += 2
    for i in range(lo + n_groups * GROUP, hi):
        out[p] = (values[i] >> 7) & 0xFF
        p += 1
    end = pos + header
    while p < end:
        out[p] = 0
        p += 1
    for j in range(LANES):
        x = states[j]
        for b in range(8):
            out[p] = (x >> _U(8 * b)) & _U(0xFF)
            p += 1
    for t in range(top, words.size):
        w = words[t]
        out[p] = w & 0xFF
        out[p + 1] = (w >> 8) & 0xFF
        out[p + 2] = (w >> 16) & 0xFF
        out[p + 3] = (w >> 24) & 0xFF
        p += 4
    return p - pos


@njit(inline="always", cache=True)
def _step(x, table):  # pragma: no cover - compiled
    e = _U(table[x & _SLOT_MASK])
    return (e >> _FREQ_SHIFT) * (x >> _PRECISION) + ((e >> _BIAS_SHIFT) & _SLOT_MASK), e & _U(0xFF)


@njit(inline="always", cache=True)
def _renorm(x, words, p):  # pragma: no cover - compiled
    # Branch-free: always load the next word, keep it only when the state fell below L.
    w = _U(words[p])
    low = x < _L
    return ((x << _W32) | w) if low else x, p + _U(low)


@njit(nogil=True, cache=True)
def decode_chunk(payload, start, size, sign_mantissa, sm_start, out, out_start, n, table, exps):  # pragma: no cover
    """Decode one chunk's payload ``payload[start:start+size]`` and merge it with its sign+mantissa bytes.

    Writes the ``n`` rebuilt BF16 patterns to ``out[out_start:out_start+n]`` (uint16), reading the sign+mantissa
    bytes from ``sign_mantissa[sm_start:sm_start+n]``. ``table`` (uint32[1024]) and ``exps`` (uint8, >= n) are
    scratch. Returns a status code (0 = success); a corrupt payload is reported, never read out of bounds.
    """
    if size < 2:
        return BAD_SIZE
    mode = payload[start]
    if mode == MODE_STORED:
        if size != n + 2:
            return BAD_SIZE
        merge_bf16(
            payload[start + 2 : start + 2 + n], sign_mantissa[sm_start : sm_start + n], out[out_start : out_start + n]
        )
        return OK
    if mode != MODE_RANS:
        return BAD_MODE

    n_symbols = np.int64(payload[start + 1]) + 1
    n_groups = n // GROUP
    n_tail = n - n_groups * GROUP
    header = _header_nbytes(n_symbols, n_tail)
    if size < header + 8 * LANES or (size - header - 8 * LANES) % 4 != 0:
        return BAD_SIZE

    # Frequency table -> decode table.
    slot = 0
    previous = -1
    for i in range(n_symbols):
        sym = np.int64(payload[start + 2 + i])
        f = np.int64(payload[start + 2 + n_symbols + 2 * i]) | (np.int64(payload[start + 3 + n_symbols + 2 * i]) << 8)
        if sym <= previous or f < 1 or slot + f > _M or (f == _M and n_symbols > 1):
            return BAD_TABLE
        previous = sym
        for b in range(f):
            table[slot + b] = sym | (b << 8) | ((f & (_M - 1)) << 18)
        slot += f
    if slot != _M:
        return BAD_TABLE

    tail = start + 2 + 3 * n_symbols
    first_state = start + header
    states = payload[first_state : first_state + 8 * LANES].view(np.uint64)
    x0, x1, x2, x3, x4, x5, x6, x7 = (
        states[0],
        states[1],
        states[2],
        states[3],
        states[4],
        states[5],
        states[6],
        states[7],
    )
    words = payload[first_state + 8 * LANES : start + size].view(np.uint32)
    n_words = _U(words.size)
    p = _U(0)

    if n_symbols == 1:
        # A constant chunk: the single symbol has frequency M, states never move and no word is written.
        e = payload[start + 2]
        for k in range(n_groups * GROUP):
            exps[k] = e
    else:
        g = 0
        uk = _U(0)  # unsigned index: no negative-index wraparound code in the hot loop
        # Fast loop: a group reads at most LANES words, so stay LANES words clear of the end.
        while g < n_groups and p + _U(LANES) <= n_words:
            x0, e = _step(x0, table)
            exps[uk + _U(0)] = e
            x1, e = _step(x1, table)
            exps[uk + _U(1)] = e
            x2, e = _step(x2, table)
            exps[uk + _U(2)] = e
            x3, e = _step(x3, table)
            exps[uk + _U(3)] = e
            x4, e = _step(x4, table)
            exps[uk + _U(4)] = e
            x5, e = _step(x5, table)
            exps[uk + _U(5)] = e
            x6, e = _step(x6, table)
            exps[uk + _U(6)] = e
            x7, e = _step(x7, table)
            exps[uk + _U(7)] = e
            x0, e = _step(x0, table)
            exps[uk + _U(8)] = e
            x1, e = _step(x1, table)
            exps[uk + _U(9)] = e
            x2, e = _step(x2, table)
            exps[uk + _U(10)] = e
            x3, e = _step(x3, table)
            exps[uk + _U(11)] = e
            x4, e = _step(x4, table)
            exps[uk + _U(12)] = e
            x5, e = _step(x5, table)
            exps[uk + _U(13)] = e
            x6, e = _step(x6, table)
            exps[uk + _U(14)] = e
            x7, e = _step(x7, table)
            exps[uk + _U(15)] = e
            x0, e = _step(x0, table)
            exps[uk + _U(16)] = e
            x1, e = _step(x1, table)
            exps[uk + _U(17)] = e
            x2, e = _step(x2, table)
            exps[uk + _U(18)] = e
            x3, e = _step(x3, table)
            exps[uk + _U(19)] = e
            x4, e = _step(x4, table)
            exps[uk + _U(20)] = e
            x5, e = _step(x5, table)
            exps[uk + _U(21)] = e
            x6, e = _step(x6, table)
            exps[uk + _U(22)] = e
            x7, e = _step(x7, table)
            exps[uk + _U(23)] = e
            x0, p = _renorm(x0, words, p)
            x1, p = _renorm(x1, words, p)
            x2, p = _renorm(x2, words, p)
            x3, p = _renorm(x3, words, p)
            x4, p = _renorm(x4, words, p)
            x5, p = _renorm(x5, words, p)
            x6, p = _renorm(x6, words, p)
            x7, p = _renorm(x7, words, p)
            g += 1
            uk += _U(GROUP)
        # Careful loop for the last groups: states in an array, every word read bounds-checked.
        if g < n_groups:
            k = g * GROUP
            xs = np.empty(LANES, np.uint64)
            xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7] = x0, x1, x2, x3, x4, x5, x6, x7
            while g < n_groups:
                for step in range(STEPS):
                    for j in range(LANES):
                        xs[j], e = _step(xs[j], table)
                        exps[k + step * LANES + j] = e
                for j in range(LANES):
                    if xs[j] < _L:
                        if p >= n_words:
                            return STREAM_OVERRUN
                        xs[j] = (xs[j] << _W32) | _U(words[p])
                        p += _U(1)
                g += 1
                k += GROUP
            x0, x1, x2, x3, x4, x5, x6, x7 = xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7]
    if p != n_words:
        return BAD_FINAL_STATE
    if x0 != _L or x1 != _L or x2 != _L or x3 != _L or x4 != _L or x5 != _L or x6 != _L or x7 != _L:
        return BAD_FINAL_STATE
    base = n_groups * GROUP
    for i in range(n_tail):
        exps[base + i] = payload[tail + i]
    merge_bf16(exps[:n], sign_mantissa[sm_start : sm_start + n], out[out_start : out_start + n])
    return OK


@njit(nogil=True, cache=True)
def encode_chunks(values, chunk_values, first, last, slots, slot_nbytes, sizes, histograms):  # pragma: no cover
    """Encode chunks ``first..last-1`` of ``values``: chunk ``c`` goes to ``slots[c * slot_nbytes:]``.

    Sets ``sizes[c]`` to the payload size and ``histograms[c]`` to the chunk's exponent histogram.
    """
    words = np.empty(chunk_values // STEPS + 1, np.uint32)
    counts = np.zeros(256, np.int64)
    freqs = np.zeros(256, np.int64)
    cum = np.zeros(257, np.int64)
    for c in range(first, last):
        lo = c * chunk_values
        hi = min(values.size, lo + chunk_values)
        sizes[c] = encode_chunk(values, lo, hi, slots, c * slot_nbytes, words, counts, freqs, cum)
        for i in range(256):
            histograms[c, i] = counts[i]


@njit(nogil=True, cache=True)
def decode_chunks(
    blob,
    planes,
    payload_starts,
    payload_sizes,
    payload_xxh64,
    plain_xxh64,
    sm_start,
    chunk_values,
    n_values,
    first,
    last,
    out,
    check,
):  # pragma: no cover - compiled
    """Decode chunks ``first..last-1`` of a part held in ``blob`` into ``out`` (uint16, ``n_values`` long).

    The payloads lie in ``blob``, the sign-mantissa plane at ``planes[sm_start:]`` (``planes`` may be ``blob``: the
    contiguous layout). With ``check``, each chunk's payload and sign-mantissa checksums are verified just before it
    is decoded (its bytes are then in cache for the decoder). Returns ``(-1, 0)`` on success, else ``(chunk, status)`` of the first
    chunk that failed.
    """
    table = np.empty(_M, np.uint32)
    exps = np.empty(chunk_values, np.uint8)
    for c in range(first, last):
        lo = c * chunk_values
        n = min(n_values, lo + chunk_values) - lo
        start = payload_starts[c]
        if check:
            if xxh64(blob, start, start + payload_sizes[c]) != payload_xxh64[c]:
                return c, BAD_PAYLOAD_CHECKSUM
            if xxh64(planes, sm_start + lo, sm_start + lo + n) != plain_xxh64[c]:
                return c, BAD_PLAIN_CHECKSUM
        status = decode_chunk(blob, start, payload_sizes[c], planes, sm_start + lo, out, lo, n, table, exps)
        if status != OK:
            return c, status
    return -1, 0
