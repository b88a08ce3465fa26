"""Decision rules, adaptive search and the curve fit on planted (synthetic) data."""

import math

import numpy as np
import pytest

from critbatch.analysis import decide, decide_eps, decide_noninf
from critbatch.analysis.decision import needed_samples, paired_eval_noise
from critbatch.analysis.fit import fit_cbs_curve, saturating_power_law
from critbatch.analysis.search import AdaptiveSearch
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


def test_diverged_reference_makes_the_point_undetermined():
    """With the smallest k diverged nothing can be compared with it: no k passes, under either rule
    (before, the larger k were "no worse than inf" and all passed)."""
    for d in (decide_eps(KS, one([float("nan"), 3.0, 3.0, 3.0, 3.0, 3.0]), eps=0.01),
              decide_noninf([1, 2, 4], [[float("nan"), 3.0], [3.0, 3.0], [3.0, 3.01]], eps=0.01)):
        assert not any(d.passes) and set(d.status) == {"undetermined"}
        assert d.undetermined_reason and "diverged" in d.undetermined_reason and not d.settled
        assert not d.bounded_above and d.k_next is None


def test_eps_uses_replicate_means_and_rejects_bad_eps():
    d = decide_eps([1, 2], [[3.0, 3.1], [3.06, 3.06]], eps=0.01)  # means 3.05 vs 3.06
    assert d.passes == [True, True]
    with pytest.raises(ConfigError, match="eps=-0.1"):
        decide_eps([1, 2], one([1, 1]), eps=-0.1)
    with pytest.raises(ConfigError, match="strictly increasing"):
        decide_eps([2, 1], one([1, 1]))


def test_noninf_pairs_replicates():
    rng = np.random.default_rng(0)
    window_noise = rng.normal(0, 0.05, size=5)  # shared by every k: pairing cancels it
    base = 3.0 + window_noise
    losses = [base + rng.normal(0, 0.002, 5), base + rng.normal(0, 0.002, 5), base + 0.03 + rng.normal(0, 0.002, 5)]
    d = decide_noninf([1, 2, 4], [list(x) for x in losses], eps=0.01, confidence=0.95)
    assert d.status == ["pass", "pass", "fail"] and d.k_star == 2 and d.k_next == 4 and d.settled
    # unpaired, the same difference would drown in the window noise (means differ by 0.03 < 0.05)
    with pytest.raises(ConfigError, match="replicates"):
        decide_noninf([1, 2], one([3.0, 3.0]))
    with pytest.raises(ConfigError, match="replaced by 'noninf'"):
        decide([1, 2], [[3.0, 3.0], [3.0, 3.0]], rule="ttest")


def test_noninf_refuses_a_consistently_worse_batch():
    """The case that doubled a CBS under the old t-test: k=16 worse than k=2 in all three windows by
    0.047 nats (4.7 eps) passed because the difference was not *significant*. Now it is shown worse."""
    k2 = [3.10, 3.20, 3.15]
    k16 = [x + 0.047 + e for x, e in zip(k2, (0.01, -0.012, 0.004))]
    d = decide_noninf([2, 16], [k2, k16], eps=0.01)
    assert d.status == ["pass", "fail"] and d.k_star == 2 and d.k_next == 16
    # noisier: a mean gap of 4.7 eps that the data cannot tell from eps is undetermined, never a pass
    k16_noisy = [x + g for x, g in zip(k2, (0.11, -0.03, 0.061))]
    d2 = decide_noninf([2, 16], [k2, k16_noisy], eps=0.01)
    assert d2.status[1] == "undetermined" and not d2.passes[1] and d2.k_next is None
    assert d2.undetermined == [16] and d2.replicates_needed[1] > 3 and not d2.settled


def _pass_rate(gap, R, sd, trials, rng, eps=0.01, n_k=2):
    passes = fails = 0
    for _ in range(trials):
        win = rng.normal(0, 0.05, size=R)  # window noise, shared by every k of a replicate
        losses = [list(3.0 + win + rng.normal(0, sd, R)) for _ in range(n_k - 1)]
        losses.append(list(3.0 + win + gap + rng.normal(0, sd, R)))
        d = decide_noninf(list(range(1, n_k + 1)), losses, eps=eps, confidence=0.95)
        passes += d.status[-1] == "pass"
        fails += d.status[-1] == "fail"
    return passes / trials, fails / trials


@pytest.mark.slow
@pytest.mark.parametrize("R", [2, 3, 5, 8])
def test_noninf_passes_a_2eps_gap_at_most_5pct(R):
    rng = np.random.default_rng(R)
    trials = 2000
    se = math.sqrt(0.05 * 0.95 / trials)
    for sd in (0.003, 0.01, 0.02):
        rate, _ = _pass_rate(0.02, R, sd, trials, rng)
        assert rate <= 0.05 + 2 * se, (sd, rate)
    # at the boundary gap = eps the test is exact: about 5% (Student t, normal differences)
    rate, _ = _pass_rate(0.01, R, 0.01, trials, rng)
    assert rate <= 0.05 + 2 * se, rate


@pytest.mark.slow
@pytest.mark.parametrize("R,n_k", [(2, 2), (3, 3), (5, 4), (8, 6)])
def test_noninf_calls_an_equally_good_batch_worse_at_most_5pct(R, n_k):
    rng = np.random.default_rng(100 + R)
    trials = 2000
    _, fail = _pass_rate(0.01, R, 0.01, trials, rng, n_k=n_k)  # true gap exactly eps: not worse than eps
    assert fail <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / trials), fail


@pytest.mark.slow
@pytest.mark.parametrize("R,sd", [(3, 0.003), (5, 0.005), (8, 0.01)])
def test_noninf_power_at_zero_gap_matches_the_noncentral_t(R, sd):
    """Power (probability of passing a batch that is truly as good) at a true gap of 0: the
    Monte-Carlo rate equals 1 − F_nct(t_0.95; R−1, ε√R/σ_d), σ_d = √2·sd (the docs quote it)."""
    from scipy.stats import nct
    from scipy.stats import t as student

    rng = np.random.default_rng(R)
    trials = 3000
    rate, _ = _pass_rate(0.0, R, sd, trials, rng)
    sigma_d = math.sqrt(2) * sd
    power = 1 - nct.cdf(student.ppf(0.95, R - 1), R - 1, 0.01 * math.sqrt(R) / sigma_d)
    assert abs(rate - power) <= 3 * math.sqrt(power * (1 - power) / trials) + 0.005, (rate, power)


def test_replicates_needed_settle_the_question():
    """Planted: true gap 0; n from the variance gives 80% power at 95% confidence."""
    rng = np.random.default_rng(7)
    d = decide_noninf([1, 2], [[3.0, 3.01, 2.99], [3.004, 3.0, 2.993]], eps=0.01)
    assert d.status[1] in ("undetermined", "pass")
    # large n: the normal approximation of docs/method.md §6, ((z_a + z_b) sd / |eps - gap|)^2
    assert needed_samples(0.1, 0.0, 0.01, 0.95) == pytest.approx(((1.6449 + 0.8416) * 10) ** 2, rel=0.02)
    for sd in (0.004, 0.008):
        n = needed_samples(math.sqrt(2) * sd, 0.0, 0.01, 0.95)
        rate, _ = _pass_rate(0.0, n, sd, 2000, rng)
        assert 0.8 - 0.03 <= rate <= 0.8 + 0.1, (n, rate)  # the smallest n with 80% power: just above 80%


def test_eps_rule_with_the_held_out_sets_sampling_error():
    """One replicate: the eval set's paired sampling error makes a reading near eps undetermined and
    says how many held-out sequences would settle it."""
    rng = np.random.default_rng(3)
    n = 512
    common = rng.normal(1.5, 0.4, n)  # per-sequence losses shared by both models
    a = common + rng.normal(0, 0.05, n)
    b = common + 0.011 + rng.normal(0, 0.05, n)  # true gap 1.1 eps, paired se ~ 0.003
    c = common + 0.05 + rng.normal(0, 0.05, n)  # 5 eps: clearly worse
    se, sd = paired_eval_noise([[a], [b], [c]])
    assert se[1][0] == pytest.approx(np.std(b - a, ddof=1) / math.sqrt(n))
    d = decide([1, 2, 4], [[a.mean()], [b.mean()], [c.mean()]], rule="eps", diff_se=se, diff_sd=sd)
    assert d.status == ["pass", "undetermined", "fail"] and d.details["eval_seqs_needed"][1] > n
    plain = decide([1, 2, 4], [[a.mean()], [b.mean()], [c.mean()]], rule="eps")
    assert plain.status[1] == ("fail" if b.mean() - a.mean() > 0.01 else "pass")  # the bare point reading
    assert "not measured with one replicate" in plain.details["uncertainty"]


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
    # the double of the reference, then a gallop over the lattice (+1, +2, +4, +8 candidates) to k_max
    assert sorted(res) == [0.25, 0.5, 0.75, 1.25, 2.25, 4.25, 8]


DEMO_GRID = [0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32]  # the demo's: every batch dividing its window


def _planted(gaps, se=0.0):
    """A search over the demo's grid whose k have the planted loss gaps to the reference, with the
    held-out set's paired sampling error ``se`` on every comparison."""
    dec = lambda ks, ls: decide(ks, ls, "eps", 0.01, diff_se=[[se if i != j else 0.0 for j in ks] for i in ks])  # noqa: E731
    return AdaptiveSearch(0.5, 32, None, dec, candidates=DEMO_GRID), lambda k: [3.0 + gaps[k]]


def test_adaptive_gallops_above_a_pass_and_doubles_above_an_undetermined_k():
    """The demo's points (docs/LOG.md, issue 15): a CBS just above the first pass costs one probe above
    it, not the double and the bisection back; an undetermined k is followed by its double."""
    # 200k tokens: k = 1 passes, 1.5 fails: the gallop's first step settles it, k = 2 is never trained
    gaps = {0.5: 0, 0.75: 0.0018, 1: 0.0075, 1.5: 0.0209, 2: 0.0257, 3: 0.0455, 4: 0.0552}
    search, measure = _planted(gaps)
    res = search.run(measure)
    assert list(res) == [0.5, 1, 1.5]
    d = decide_eps(sorted(res), [res[k] for k in sorted(res)])
    assert (d.k_star, d.k_next) == (1, 1.5)
    # 600k tokens: k = 1 and 1.5 are within the held-out noise of eps: from 1 the search doubles to 2,
    # which fails, and bisects below; 1.5 is never trained (the full grid gives the same interval)
    gaps = {0.5: 0, 0.75: 0.0041, 1: 0.0094, 1.5: 0.0104, 2: 0.0131, 3: 0.0133, 4: 0.0199}
    search, measure = _planted(gaps, se=0.001)
    res = search.run(measure)
    assert list(res) == [0.5, 1, 2, 0.75]
    d = search._decision(res)
    full = search._decision({k: measure(k) for k in gaps})
    assert d.status == ["pass", "pass", "undetermined", "fail"]
    assert (d.k_star, d.k_next) == (full.k_star, full.k_next) == (0.75, 2)
    # a CBS far above: the gallop (+1, +2, +4 candidates) brackets it, then the bisection closes in
    gaps = {k: (0.0 if k <= 12 else 0.05) for k in DEMO_GRID}
    search, measure = _planted(gaps)
    res = search.run(measure)
    assert list(res) == [0.5, 1, 1.5, 3, 12, 32, 16]
    d = search._decision(res)
    assert (d.k_star, d.k_next) == (12, 16)


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


@pytest.mark.parametrize("k_true", [0.7, 1.3, 2.6, 4.4, 7.0, 11.0, 13.5, 20.0, 27.0])
def test_adaptive_full_grid_is_what_it_can_probe_when_the_step_does_not_divide_k_min(k_true):
    """k_min 0.5 with resolution 2 (the old demo's settings): the lattice is 0.5, 2.5, 4.5, ... plus
    the doubling points; every probe is on it, and the search decides as the whole of it does."""
    measure = _monotone_losses(k_true)
    dec = lambda ks, losses: decide_eps(ks, losses, eps=0.01)  # noqa: E731
    search = AdaptiveSearch(0.5, 32, 2, dec)
    grid = search.full_grid()
    assert {0.5, 1, 2, 4, 8, 16, 32, 2.5, 30.5} <= set(grid) and 3 not in grid
    results = search.run(measure)
    assert set(results) <= set(grid)
    got = dec(sorted(results), [results[k] for k in sorted(results)])
    full = dec(grid, [measure(k) for k in grid])
    assert (got.k_star, got.k_next) == (full.k_star, full.k_next)
