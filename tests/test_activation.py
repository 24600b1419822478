"""The CPS activation model: against brute-force enumeration, fitting observed frequencies, split distributions."""

import itertools
import time

import numpy as np
import pytest

from zipmoe.planning.activation import (
    ActivationError,
    elementary_log,
    fit_weights,
    inclusion_probabilities,
    split_distribution,
)
from zipmoe.runtime.routing import synthetic_trace


def brute_force(w, k):
    """Every k-subset's probability, and each expert's inclusion probability, by enumeration."""
    subsets = list(itertools.combinations(range(len(w)), k))
    weights = np.array([np.prod([w[i] for i in s]) for s in subsets])
    probs = weights / weights.sum()
    pi = np.zeros(len(w))
    for s, p in zip(subsets, probs):
        pi[list(s)] += p
    return subsets, probs, pi


@pytest.mark.parametrize("n, k", [(4, 1), (5, 2), (8, 3), (10, 4), (9, 8)])
def test_inclusion_probabilities_match_enumeration(n, k):
    rng = np.random.default_rng(n * 10 + k)
    w = np.exp(rng.normal(0, 2, n))  # weights over several orders of magnitude
    _, _, expected = brute_force(w, k)
    got = inclusion_probabilities(np.log(w), k)
    assert np.abs(got - expected).max() < 1e-9 and got.sum() == pytest.approx(k)
    e = np.exp(elementary_log(np.log(w), k))
    assert e[k] == pytest.approx(sum(np.prod(w[list(s)]) for s in itertools.combinations(range(n), k)))


def test_fit_reproduces_target_frequencies_and_is_exact_on_enumeration():
    rng = np.random.default_rng(1)
    n, k = 8, 3
    true_w = np.exp(rng.normal(0, 1, n))
    _, _, target = brute_force(true_w, k)
    fit = fit_weights(target, k)
    assert fit.max_error < 1e-9
    _, _, pi = brute_force(np.exp(fit.log_w[0]), k)
    assert np.abs(pi - target).max() < 1e-8
    # weights are determined up to a common factor: the fitted ones are the true ones, rescaled
    ratio = np.exp(fit.log_w[0]) / true_w
    assert np.allclose(ratio, ratio[0], rtol=1e-6)


def test_fit_on_a_synthetic_trace_all_layers_at_once():
    trace = synthetic_trace("qwen", num_layers=4, requests=40, tokens_per_request=32)
    k, n = trace.top_k, trace.num_experts
    tokens = np.concatenate(trace.requests)  # [T, L, k]
    counts = np.zeros((trace.num_layers, n))
    for layer in range(trace.num_layers):
        np.add.at(counts[layer], tokens[:, layer].ravel(), 1)
    freq = counts / len(tokens)
    fit = fit_weights(freq, k)
    assert fit.max_error < 1e-8 and fit.log_w.shape == (4, n)
    pi = inclusion_probabilities(fit.log_w, k)
    assert np.abs(pi - fit.targets).max() < 1e-8
    assert np.abs(fit.targets - np.clip(freq, 1e-9, None)).max() < 1e-6  # unseen experts get a tiny frequency


def test_frequencies_of_one_are_capped_and_never_seen_experts_allowed():
    fit = fit_weights(np.array([1.0, 1.0, 0.0, 0.0, 0.0]), 2)
    assert fit.max_error < 1e-8 and np.all(fit.targets < 1) and fit.targets.sum() == pytest.approx(2)
    with pytest.raises(ActivationError, match="every token uses every expert"):
        fit_weights(np.ones(3), 3)
    with pytest.raises(ActivationError, match="finite, non-negative"):
        fit_weights(np.array([0.5, np.nan, 0.5]), 1)


def test_split_distribution_matches_enumeration():
    rng = np.random.default_rng(7)
    n, k = 9, 3
    w = np.exp(rng.normal(0, 1.5, n))
    groups = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    subsets, probs, _ = brute_force(w, k)
    expected = np.zeros((k + 1,) * 3)
    for s, p in zip(subsets, probs):
        counts = np.bincount(groups[list(s)], minlength=3)
        expected[tuple(counts)] += p
    got = split_distribution(np.log(w), k, groups)
    assert np.abs(got - expected).max() < 1e-12 and got.sum() == pytest.approx(1.0)
    empty_group = split_distribution(np.log(w), k, np.where(groups == 1, 2, groups))  # no expert in group 1
    assert empty_group[:, 1:, :].sum() == 0 and empty_group.sum() == pytest.approx(1.0)


def test_a_deepseek_sized_model_fits_fast():
    """26 layers of 64 experts, top-6 (DeepSeek-V2-Lite), and a 256-expert top-8 layer, in log space."""
    trace = synthetic_trace("deepseek", num_layers=26, requests=20, tokens_per_request=19)
    tokens = np.concatenate(trace.requests)
    counts = np.zeros((26, 64))
    for layer in range(26):
        np.add.at(counts[layer], tokens[:, layer].ravel(), 1)
    started = time.perf_counter()
    fit = fit_weights(counts / len(tokens), 6)
    assert time.perf_counter() - started < 5.0 and fit.max_error < 1e-8
    wide = np.random.default_rng(0).dirichlet(np.full(256, 0.3)) * 8
    assert fit_weights(wide, 8).max_error < 1e-8
