"""Decision rules, adaptive search and the curve fit on planted (synthetic) data."""

import math

import numpy as np
import pytest

from critbatch.analysis import decide_eps, decide_ttest
from critbatch.analysis.fit import fit_cbs_curve, saturating_power_law
from critbatch.branch.search import AdaptiveSearch
from critbatch.errors import ConfigError

KS = [0.25, 0.5, 1, 2, 4, 8]


def one(xs):
    return [[x] for x in xs]


def test_monotone_table():
    d = decide_eps(KS, one([3.00, 3.00, 3.005, 3.008, 3.05, 3.2]), eps=0.01)
    assert d.passes == [True, True, True, True, False, False]
    assert d.k_star == d.k_star_conservative == 2 and d.k_next == 4
    assert not d.readings_disagree and d.bounded_above and not d.below_grid
    assert d.interval(1024) == (2048, 4096)


def test_non_monotone_table_readings_differ():
    # k=2 fails (noise), k=4 passes again: the paper's rule says 4, the conservative reading 1
    d = decide_eps(KS, one([3.00, 2.99, 2.995, 3.02, 2.996, 3.1]), eps=0.01)
    assert d.passes == [True, True, True, False, True, False]
    assert d.k_star == 4 and d.k_star_conservative == 1 and d.readings_disagree
    assert d.interval(4) == (16, 32) and d.interval(4, conservative=True) == (4, 8)


def test_all_pass_is_bounded_below_only():
    d = decide_eps(KS, one([3.0, 2.99, 2.98, 2.985, 2.988, 2.989]), eps=0.01)
    assert all(d.passes) and d.k_star == 8 and d.k_next is None and not d.bounded_above
    assert d.interval(4) == (32, None)


def test_all_fail_is_below_grid():
    d = decide_eps(KS, one([3.0, 3.1, 3.2, 3.3, 3.4, 3.5]), eps=0.01)
    assert d.passes == [True] + [False] * 5 and d.k_star == 0.25 and d.below_grid
    assert d.interval(4) == (1.0, 2.0)


def test_diverged_branch_fails_and_does_not_block_others():
    d = decide_eps(KS, one([3.0, 3.0, 3.0, float("nan"), 3.001, 3.5]), eps=0.01)
    assert d.passes == [True, True, True, False, True, False]
    assert d.k_star == 4 and d.k_star_conservative == 1
    d2 = decide_eps(KS, one([3.0, 3.0, 3.0, 3.0, float("inf"), float("inf")]), eps=0.01)
    assert d2.k_star == 2 and d2.k_next == 4


def test_eps_uses_replicate_means_and_rejects_bad_eps():
    d = decide_eps([1, 2], [[3.0, 3.1], [3.06, 3.06]], eps=0.01)  # means 3.05 vs 3.06
    assert d.passes == [True, True]
    with pytest.raises(ConfigError, match="eps=-0.1"):
        decide_eps([1, 2], one([1, 1]), eps=-0.1)
    with pytest.raises(ConfigError, match="strictly increasing"):
        decide_eps([2, 1], one([1, 1]))


def test_ttest_pairs_replicates():
    rng = np.random.default_rng(0)
    window_noise = rng.normal(0, 0.05, size=5)  # shared by every k: pairing cancels it
    base = 3.0 + window_noise
    losses = [base + rng.normal(0, 0.002, 5), base + rng.normal(0, 0.002, 5), base + 0.02 + rng.normal(0, 0.002, 5)]
    d = decide_ttest([1, 2, 4], [list(x) for x in losses], confidence=0.95)
    assert d.passes == [True, True, False] and d.k_star == 2
    # unpaired, the same difference would drown in the window noise (means differ by 0.02 << 0.05)
    with pytest.raises(ConfigError, match="replicates"):
        decide_ttest([1, 2], one([3.0, 3.0]))


def _false_worse_rate(R, n_k, trials, rng):
    worse = 0
    for _ in range(trials):
        win = rng.normal(0, 0.05, size=R)
        losses = [list(3.0 + win + rng.normal(0, 0.01, R)) for _ in range(n_k)]  # every k equally good
        d = decide_ttest(list(range(1, n_k + 1)), losses, confidence=0.95)
        worse += not d.passes[-1]
    return worse / trials


@pytest.mark.parametrize("R,n_k", [(2, 2), (3, 2), (4, 4), (8, 6)])
def test_ttest_calibration_false_worse_rate_at_most_5pct(R, n_k):
    rng = np.random.default_rng(R * 10 + n_k)
    trials = 3000
    rate = _false_worse_rate(R, n_k, trials, rng)
    se = math.sqrt(0.05 * 0.95 / trials)
    assert rate <= 0.05 + 2 * se, rate  # the test calls an equally good k worse at most ~5% of the time


def test_ttest_has_power_against_a_real_degradation():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(300):
        win = rng.normal(0, 0.05, size=4)
        a = 3.0 + win + rng.normal(0, 0.01, 4)
        b = 3.0 + win + 0.04 + rng.normal(0, 0.01, 4)
        hits += not decide_ttest([1, 2], [list(a), list(b)]).passes[1]
    assert hits / 300 > 0.9


def _monotone_losses(k_true, noise=0.0, rng=None):
    def f(k):
        base = 3.0 + (0.05 * math.log2(k / k_true) if k > k_true else -0.001 * k)
        return [base + (rng.normal(0, noise) if rng is not None else 0.0)]
    return f


@pytest.mark.parametrize("k_true", [1.0, 1.5, 2.0, 3.0, 5.0, 6.0, 7.0, 9.0, 13.0, 16.0, 20.0])
def test_adaptive_matches_full_grid_on_monotone_cases(k_true):
    measure = _monotone_losses(k_true)
    dec = lambda ks, losses: decide_eps(ks, losses, eps=0.01)  # noqa: E731
    search = AdaptiveSearch(1, 16, 1, dec)
    results = search.run(measure)
    ks = sorted(results)
    got = dec(ks, [results[k] for k in ks])
    full_ks = [float(k) for k in range(1, 17)]
    full = dec(full_ks, [measure(k) for k in full_ks])
    assert (got.k_star, got.k_next) == (full.k_star, full.k_next)
    assert len(results) < len(full_ks)  # and it measured fewer branches


def test_adaptive_stops_at_k_max_when_everything_passes():
    s = AdaptiveSearch(0.25, 8, 0.25, lambda ks, ls: decide_eps(ks, ls))
    res = s.run(lambda k: [3.0])
    assert sorted(res) == [0.25, 0.5, 1, 2, 4, 8]


def test_fit_recovers_planted_parameters():
    rng = np.random.default_rng(0)
    b_max, t_s, c = 2.0e5, 3.0e6, 0.9
    t = np.geomspace(1e5, 3e8, 14)
    true = saturating_power_law(t, b_max, t_s, c)
    obs = true * np.exp(rng.normal(0, 0.1, t.size))
    grid = 1024 * 2.0 ** np.arange(0, 12)  # batch grid in tokens, doubling
    lo, hi = [], []
    for o in obs:
        i = np.searchsorted(grid, o) - 1
        if i < 0:
            lo.append(0.0), hi.append(grid[0])
        elif i + 1 >= len(grid):
            lo.append(grid[-1]), hi.append(None)
        else:
            lo.append(grid[i]), hi.append(grid[i + 1])
    f = fit_cbs_curve(t, lo, hi)
    assert f.b_max == pytest.approx(b_max, rel=0.3)
    assert f.t_s == pytest.approx(t_s, rel=0.6)
    assert f.c == pytest.approx(c, abs=0.3)
    assert f.plateau_in_range
    # the best fixed batch for a run is the mean of the curve (closed form check for a pure power law limit)
    assert 0 < f.best_fixed_batch(3e8) < f.b_max


def test_fit_handles_censoring_and_rejects_too_few_points():
    f = fit_cbs_curve([1e5, 1e6, 1e7], [0.0, 4096, 8192], [2048, 8192, None])
    assert f.b_max > 8192 * 0.5 and math.isfinite(f.c)
    with pytest.raises(ConfigError, match="at least 2"):
        fit_cbs_curve([0, 1e5], [0, 1], [2, 4])
