"""The CBS of a model one cannot afford to branch, from cheap proxies on the same data (issue 23).

The critical batch size depends mainly on the data seen, not on the model size: Zhang et al. 2024
(arXiv 2410.21676) find it scales with data and stays nearly flat in model size at fixed data;
Bergsma et al. 2025 (Power Lines) fit it as a power law in tokens independent of parameters; Merrill
et al. report the 1B and 7B curves "qualitatively similar". The model here:

    log B*(t, N) = a + α·(log t − m_t) + β·(log N − m_N) + ε,   ε ~ N(0, σ²),

with B* in tokens, t the tokens trained, N the non-embedding parameters, and m_t, m_N the centres of
the data. Every measured point is an interval [low, high] (low 0: only the smallest batch passed;
high None: none was shown to fail), so the likelihood is interval-censored on the log scale, as the
curve fit's (:mod:`critbatch.analysis.fit`). Parameters are found by maximum a-posteriori with weak
priors (α ~ N(0.5, 1²), β ~ N(0, 1²), log σ ~ N(log 0.3, 1²), σ ≥ 0.05) that keep a fit finite when
censoring leaves a direction open. Uncertainty comes from a bootstrap over the points (resampled
within each model size, so every size stays represented): the exponents' intervals are the
bootstrap's quantiles, and the prediction band at (t, N) the quantiles of a + α·… + β·… + σ·z over
the bootstrap fits and normal draws z — a band for where the next *measurement* falls, scatter
included. With one model size β cannot be measured: its point value is held at 0 (the literature's
finding), and the bootstrap fits draw it from a prior N(0, BETA_PRIOR_SD²), so that a band for a
target of another size widens with the distance in size instead of pretending the exponent is known;
the result says so.

Pure functions: numbers in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from .fit import SIGMA_FLOOR, log_interval_prob

BETA_PRIOR_SD = 0.1
"""The size exponent's spread where one proxy size cannot measure it: "nearly flat in model size"
(Zhang et al. 2024; Power Lines) as a prior; the multi-size fits of docs/LOG.md (issue 23) put β
within about ±0.2 of 0. Over a 72x size extrapolation it widens a 90% band by a factor of ~2 each way."""


@dataclass
class Observation:
    """One measured CBS interval of a proxy (tokens)."""

    size: float
    """The proxy's non-embedding parameters."""
    tokens: float
    low: float
    """Lower bound in tokens (0: only the smallest probed batch passed)."""
    high: float | None
    """Upper bound in tokens (``None``: no batch was shown to fail)."""
    label: str = ""


@dataclass
class TransferFit:
    a: float
    alpha: float
    beta: float
    sigma: float
    m_t: float
    m_n: float
    sizes: list[float]
    t_range: tuple[float, float]
    n_points: int
    beta_measured: bool
    """False with a single model size: β is held at 0 and the bootstrap draws it from its prior."""
    boot: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 4)))
    """Bootstrap fits, rows (a, α, β, σ)."""

    def mu(self, t, size) -> np.ndarray:
        """Median log B* (tokens) at tokens t and size N, by the point fit."""
        return self.a + self.alpha * (np.log(t) - self.m_t) + self.beta * (math.log(size) - self.m_n)

    def interval(self, which: str, level: float = 0.9) -> tuple[float, float]:
        """The bootstrap interval of ``alpha`` or ``beta`` at ``level``."""
        col = {"a": 0, "alpha": 1, "beta": 2, "sigma": 3}[which]
        if not len(self.boot):
            v = getattr(self, which)
            return v, v
        q = (1 - level) / 2
        return float(np.quantile(self.boot[:, col], q)), float(np.quantile(self.boot[:, col], 1 - q))

    def band(self, t, size, level: float = 0.9, draws: int = 64, seed: int = 0,
             scatter: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The ``level`` band of B* (tokens) at tokens ``t`` for a model of ``size``: the quantiles over
        the bootstrap fits of their median plus their scatter (normal draws) — where a measurement
        falls; ``scatter=False``: of their medians alone — where the curve lies."""
        t = np.atleast_1d(np.asarray(t, dtype=float))
        fits = self.boot if len(self.boot) else np.array([[self.a, self.alpha, self.beta, self.sigma]])
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((len(fits), draws)) if scatter else np.zeros((len(fits), 1))
        lt, ln = np.log(t) - self.m_t, math.log(size) - self.m_n
        mu = fits[:, 0:1] + fits[:, 1:2] * lt[None, :] + fits[:, 2:3] * ln  # (fits, t)
        samples = mu[:, None, :] + (fits[:, 3][:, None] * z)[:, :, None]  # (fits, draws, t)
        flat = samples.reshape(-1, len(t))
        q = (1 - level) / 2
        return np.exp(np.quantile(flat, q, axis=0)), np.exp(np.quantile(flat, 1 - q, axis=0))

    def size_effect(self, level: float = 0.9) -> str:
        """Whether the size dependence is distinguishable from zero, in words."""
        if not self.beta_measured:
            lo, hi = self.interval("beta", level)
            return (f"not measured (one model size): held at 0, as the literature finds, with a prior of sd "
                    f"{BETA_PRIOR_SD:g} in the band (beta in [{lo:+.3f}, {hi:+.3f}], {level:.0%})")
        lo, hi = self.interval("beta", level)
        if lo > 0 or hi < 0:
            return f"distinguishable from zero: beta in [{lo:+.3f}, {hi:+.3f}] ({level:.0%})"
        return f"not distinguishable from zero: beta in [{lo:+.3f}, {hi:+.3f}] ({level:.0%})"

    def to_dict(self, level: float = 0.9) -> dict:
        return {"model": "log B*(t, N) = a + alpha (log t - m_t) + beta (log N - m_N) + N(0, sigma^2), B* in tokens",
                "a": self.a, "alpha": self.alpha, "beta": self.beta, "sigma": self.sigma, "m_t": self.m_t,
                "m_n": self.m_n, "alpha_interval": list(self.interval("alpha", level)),
                "beta_interval": list(self.interval("beta", level)), "level": level,
                "beta_measured": self.beta_measured, "size_effect": self.size_effect(level), "sizes": self.sizes,
                "t_range": list(self.t_range), "n_points": self.n_points, "bootstrap": len(self.boot)}


def _arrays(obs: list[Observation]):
    t = np.array([o.tokens for o in obs], dtype=float)
    n = np.array([o.size for o in obs], dtype=float)
    lo = np.array([o.low for o in obs], dtype=float)
    hi = np.array([np.inf if o.high is None else o.high for o in obs], dtype=float)
    return t, n, lo, hi


def _fit_once(t, n, lo, hi, m_t, m_n, with_beta: bool, x0=None) -> np.ndarray:
    """MAP (a, α, β, σ) of the censored model on these points."""
    from scipy.optimize import minimize

    lt, ln = np.log(t) - m_t, np.log(n) - m_n
    loglo = np.where(lo > 0, np.log(np.maximum(lo, 1e-300)), -np.inf)
    loghi = np.where(np.isfinite(hi), np.log(hi), np.inf)
    scale = np.concatenate([loglo[np.isfinite(loglo)], loghi[np.isfinite(loghi)]])
    a0 = float(scale.mean()) if scale.size else 0.0

    def unpack(th):
        return th[0], th[1], (th[2] if with_beta else 0.0), SIGMA_FLOOR + math.exp(float(np.clip(th[3], -10, 3)))

    def nlp(th):
        a, al, be, s = unpack(th)
        mu = a + al * lt + be * ln
        ll = log_interval_prob((loglo - mu) / s, (loghi - mu) / s).sum()
        prior = (-0.5 * ((al - 0.5) / 1.0) ** 2 - 0.5 * (be / 1.0) ** 2 - 0.5 * (math.log(s) - math.log(0.3)) ** 2
                 - 0.5 * ((a - a0) / 10.0) ** 2)
        v = -(ll + prior)
        return v if math.isfinite(v) else 1e12

    starts = [x0] if x0 is not None else [np.array([a0, al, 0.0, math.log(0.3)]) for al in (0.2, 0.5, 1.0)]
    best = None
    for th0 in starts:
        r = minimize(nlp, th0, method="Nelder-Mead", options={"maxiter": 4000, "xatol": 1e-7, "fatol": 1e-10})
        if best is None or r.fun < best.fun:
            best = r
    a, al, be, s = unpack(best.x)
    return np.array([a, al, be, s])


def fit_transfer(obs: list[Observation], bootstrap: int = 200, seed: int = 0) -> TransferFit:
    """Fit the model to the proxies' intervals (module docstring), with ``bootstrap`` resamples."""
    obs = [o for o in obs if o.tokens > 0 and (o.low > 0 or o.high is not None)]
    if len(obs) < 2 or len({o.tokens for o in obs}) < 2:
        raise ConfigError(f"a transfer needs measured intervals at 2 or more token counts (got {len(obs)} usable "
                          f"point{'s' if len(obs) != 1 else ''}): the slope in tokens cannot be fitted from one")
    t, n, lo, hi = _arrays(obs)
    if np.any(hi <= lo):
        raise ConfigError("every interval needs high > low")
    m_t, m_n = float(np.log(t).mean()), float(np.log(n).mean())
    sizes = sorted(set(n.tolist()))
    with_beta = len(sizes) > 1
    point = _fit_once(t, n, lo, hi, m_t, m_n, with_beta)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(n == s) for s in sizes]
    boot = []
    for _ in range(bootstrap):
        idx = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        if len(set(t[idx])) < 2:
            continue
        boot.append(_fit_once(t[idx], n[idx], lo[idx], hi[idx], m_t, m_n, with_beta, x0=_packed(point)))
    boot = np.array(boot).reshape(-1, 4)
    if not with_beta:  # the exponent is not measured: its prior, not a false certainty, reaches the band
        boot[:, 2] = rng.normal(0.0, BETA_PRIOR_SD, len(boot))
    return TransferFit(float(point[0]), float(point[1]), float(point[2]), float(point[3]), m_t, m_n, sizes,
                       (float(t.min()), float(t.max())), len(obs), with_beta, boot)


def _packed(p: np.ndarray) -> np.ndarray:
    """A fit's (a, α, β, σ) as the optimizer's start (σ as its log above the floor)."""
    return np.array([p[0], p[1], p[2], math.log(max(p[3] - SIGMA_FLOOR, 1e-6))])


def overlaps(band_lo: float, band_hi: float, low: float, high: float | None) -> bool:
    """Whether a predicted band and a measured interval share a value."""
    return band_lo <= (math.inf if high is None else high) and band_hi >= low


def leave_one_size_out(obs: list[Observation], level: float = 0.9, bootstrap: int = 200) -> list[dict]:
    """For each model size: fit the others, predict its points, and say which measured intervals the
    ``level`` prediction band overlaps, and the curve's band (the validation of docs/LOG.md)."""
    sizes = sorted({o.size for o in obs})
    if len(sizes) < 2:
        raise ConfigError("leaving a size out needs two or more model sizes")
    out = []
    for s in sizes:
        train = [o for o in obs if o.size != s]
        test = [o for o in obs if o.size == s and o.tokens > 0]
        f = fit_transfer(train, bootstrap=bootstrap)
        ts = [o.tokens for o in test]
        lo, hi = f.band(ts, s, level)
        clo, chi = f.band(ts, s, level, scatter=False)
        rows = [{"tokens": o.tokens, "low": o.low, "high": o.high, "band": [float(a), float(b)],
                 "curve_band": [float(c), float(d)], "overlap": overlaps(a, b, o.low, o.high),
                 "curve_overlap": overlaps(c, d, o.low, o.high),
                 "extrapolated": not f.t_range[0] <= o.tokens <= f.t_range[1]}
                for o, a, b, c, d in zip(test, lo, hi, clo, chi)]
        out.append({"size": s, "fit": f.to_dict(level), "points": rows,
                    "overlap_fraction": sum(r["overlap"] for r in rows) / len(rows) if rows else None,
                    "curve_overlap_fraction": sum(r["curve_overlap"] for r in rows) / len(rows) if rows else None})
    return out
