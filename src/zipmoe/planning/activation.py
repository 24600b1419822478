"""Which k experts a token activates: the maximum-entropy model fitted to observed activation frequencies.

Per sparse layer, a token's set S of k experts is modelled by **conditional Poisson sampling** (CPS)::

    P(S) = prod_{i in S} w_i / e_k(w)          for every k-subset S of the E experts

where ``e_j(w)`` is the elementary symmetric polynomial of degree j of the weights. Among all distributions over
k-subsets with given inclusion probabilities, CPS is the one of maximum entropy (Chen, Dempster & Liu, Biometrika
1994). An expert's inclusion probability is::

    pi_i = w_i * e_{k-1}(w without i) / e_k(w)                 (the pi_i add up to k)

and the weights that give observed inclusion probabilities (an expert's activation frequency) are found by their
modified iterative proportional fitting: ``w_i <- w_i * target_i / pi_i``, until the pi match. Everything is
computed with log weights and log-sum-exp, so weights spanning many orders of magnitude (rare and hot experts) stay
exact for E up to thousands and k up to 64, and all layers of a model are fitted at once (arrays ``[L, E]``).

For the planner the model gives more than frequencies: the chance that a token's k experts split as f in one set of
experts (say, those held decoded), s in a second (held as sign-mantissa planes) and m in the rest is exactly::

    P(f, s, m) = e_f(w_A) e_s(w_B) e_m(w_C) / e_k(w)           f + s + m = k

(`split_distribution`), since every k-subset with that split contributes the product of its weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEG_INF = -np.inf
MIN_FREQUENCY = 1e-9  # of an expert never seen: a tiny weight, not zero (the model must allow every subset)
MAX_ITERATIONS = 500
TOLERANCE = 1e-10


class ActivationError(ValueError):
    """Frequencies or weights that no k-subset model can have."""


def elementary_log(log_w: np.ndarray, k: int) -> np.ndarray:
    """``log e_j(w)`` for j = 0..k of each row of ``log_w`` ([..., E]) -> [..., k+1].

    The recurrence over experts ``e_j <- e_j + w_i e_{j-1}``, in log space.
    """
    log_w = np.asarray(log_w, dtype=np.float64)
    out = np.full(log_w.shape[:-1] + (k + 1,), NEG_INF)
    out[..., 0] = 0.0
    for i in range(log_w.shape[-1]):
        shifted = out[..., :-1] + log_w[..., i, None]
        out[..., 1:] = np.logaddexp(out[..., 1:], shifted)
    return out


def _prefix_suffix(log_w: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``pre[..., i, j] = log e_j(w_0..w_{i-1})`` and ``suf[..., i, j] = log e_j(w_i..w_{E-1})``, i = 0..E."""
    n = log_w.shape[-1]
    shape = log_w.shape[:-1] + (n + 1, k + 1)
    pre = np.full(shape, NEG_INF)
    suf = np.full(shape, NEG_INF)
    pre[..., 0, 0] = 0.0
    suf[..., n, 0] = 0.0
    for i in range(n):
        pre[..., i + 1, :] = pre[..., i, :]
        pre[..., i + 1, 1:] = np.logaddexp(pre[..., i, 1:], pre[..., i, :-1] + log_w[..., i, None])
        j = n - 1 - i
        suf[..., j, :] = suf[..., j + 1, :]
        suf[..., j, 1:] = np.logaddexp(suf[..., j + 1, 1:], suf[..., j + 1, :-1] + log_w[..., j, None])
    return pre, suf


def inclusion_probabilities(log_w: np.ndarray, k: int) -> np.ndarray:
    """Each expert's probability of being among a token's k experts under CPS with log weights ``log_w``.

    ``log_w`` is [..., E] (any leading layer axes); the result has its shape and each row adds up to k.
    """
    log_w = np.asarray(log_w, dtype=np.float64)
    n = log_w.shape[-1]
    if not 1 <= k <= n:
        raise ActivationError(f"k = {k} experts per token out of {n}")
    pre, suf = _prefix_suffix(log_w, k)
    log_ek = pre[..., n, k]
    # log e_{k-1}(w without i) = logsumexp_a (pre[i, a] + suf[i+1, k-1-a])
    terms = pre[..., :n, :k] + suf[..., 1:, k - 1 :: -1]  # [..., E, k]
    top = terms.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    log_rest = np.log(np.exp(terms - top).sum(axis=-1)) + top[..., 0]
    return np.exp(log_w + log_rest - log_ek[..., None])


def _targets(frequencies: np.ndarray, k: int) -> np.ndarray:
    """Observed inclusion probabilities made fit for a k-subset model: each in (0, 1), adding up to k.

    A frequency of 1 (an expert in every token's set) cannot be matched by finite weights: values are capped just
    below 1 and the excess moved to the others in proportion, as the reference's ``scale_to_k`` does.
    """
    p = np.clip(np.asarray(frequencies, dtype=np.float64), MIN_FREQUENCY, None)
    n = p.shape[-1]
    if k >= n:
        raise ActivationError(f"k = {k} experts per token out of {n}: every token uses every expert")
    cap = 1.0 - 1e-6
    for _ in range(n):
        p = p * (k / p.sum(axis=-1, keepdims=True))
        over = p > cap
        if not over.any():
            break
        fixed = np.where(over, cap, 0.0)
        free = np.where(over, 0.0, p)
        remaining = k - fixed.sum(axis=-1, keepdims=True)
        p = fixed + free * (remaining / free.sum(axis=-1, keepdims=True))
    return p


@dataclass(frozen=True)
class Fit:
    """Fitted CPS log weights per layer, with how well they reproduce the targets."""

    log_w: np.ndarray  # [L, E]
    targets: np.ndarray  # [L, E], the inclusion probabilities fitted
    iterations: int
    max_error: float  # largest |pi - target| at the end


def fit_weights(
    frequencies: np.ndarray, k: int, *, tolerance: float = TOLERANCE, max_iterations: int = MAX_ITERATIONS
) -> Fit:
    """CPS log weights whose inclusion probabilities match ``frequencies`` ([L, E] or [E]; each row adds up to k).

    Chen, Dempster & Liu's modified iterative proportional fitting, all layers at once: multiply each weight by
    target / current inclusion probability, renormalise to a geometric mean of 1, repeat until every probability is
    within ``tolerance`` of its target.
    """
    freq = np.atleast_2d(np.asarray(frequencies, dtype=np.float64))
    if freq.ndim != 2 or not np.all(np.isfinite(freq)) or (freq < 0).any():
        raise ActivationError("frequencies must be a finite, non-negative [layers, experts] array")
    targets = _targets(freq, k)
    log_w = np.log(targets / (1.0 - targets))  # the Poisson (independent) solution: a good start
    iterations = 0
    while True:
        pi = inclusion_probabilities(log_w, k)
        error = float(np.abs(pi - targets).max())
        iterations += 1
        if error <= tolerance or iterations >= max_iterations:
            return Fit(log_w, targets, iterations, error)
        log_w = log_w + np.log(targets) - np.log(pi)
        log_w -= log_w.mean(axis=-1, keepdims=True)


def frequencies_from_counts(counts: np.ndarray, tokens: int) -> np.ndarray:
    """Activation frequencies from counts of tokens per expert ([L, E]) over ``tokens`` tokens."""
    if tokens <= 0:
        raise ActivationError("no tokens to measure activation frequencies on")
    return np.asarray(counts, dtype=np.float64) / tokens


def split_distribution(log_w: np.ndarray, k: int, groups: np.ndarray, n_groups: int = 3) -> np.ndarray:
    """The probability of each split of a token's k experts over expert groups, under CPS.

    Args:
        log_w: one layer's log weights [E].
        k: experts per token.
        groups: the group of every expert [E] (e.g. 0 decoded, 1 sign-mantissa, 2 neither).
        n_groups: the number of groups (2 or 3).

    Returns:
        ``P[c_0, c_1, ...]`` for the counts per group (an array of shape ``(k+1,) * n_groups``; entries whose counts
        do not add up to k are 0). Exact: ``prod_g e_{c_g}(w_g) / e_k(w)``.
    """
    log_w = np.asarray(log_w, dtype=np.float64)
    groups = np.asarray(groups)
    per_group = [
        elementary_log(log_w[groups == g], k) if (groups == g).any() else _only_zero(k) for g in range(n_groups)
    ]
    log_ek = elementary_log(log_w, k)[k]
    out = np.zeros((k + 1,) * n_groups)
    for counts in np.ndindex(*out.shape):
        if sum(counts) == k:
            out[counts] = np.exp(sum(per_group[g][c] for g, c in enumerate(counts)) - log_ek)
    return out


def _only_zero(k: int) -> np.ndarray:
    """log e_j of an empty set: e_0 = 1, the rest 0."""
    out = np.full(k + 1, NEG_INF)
    out[0] = 0.0
    return out
