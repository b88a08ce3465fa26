"""A curve through interval-censored CBS measurements (ours; the paper fits none).

Each branch point gives an interval [low, high] for the CBS (``high`` may be unbounded, ``low`` may
be 0 when only the smallest batch passed). The model is a power law that saturates at a plateau,

    B(t) = B_max · u / (1 + u),   u = (t / t_s)^c,

which grows like B_max·(t/t_s)^c early and levels off at B_max — the shape Merrill et al. observe.
Measurements are treated as interval-censored on a log scale: the log of the true local CBS at t
is N(log B(t), σ²) and a point's likelihood is the probability that it falls in its interval.
Parameters are found by maximum a-posteriori with weak priors (log c ~ N(0, 1.5²), σ >= 0.05,
log σ ~ N(log 0.3, 1), log B_max ~ N(log of the largest measured bound + 0.5, 2²) and
log t_s ~ N(middle of the measured log-token range, (span + 2)²)), which keep the fit finite when
the data do not pin the plateau down (two or three points cannot); the result says whether the
plateau lies inside the measured range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigError

SIGMA_FLOOR = 0.05


@dataclass
class CurveFit:
    model: str
    b_max: float
    """Plateau (same unit as the measurements, e.g. tokens)."""
    t_s: float
    """Tokens at which B reaches half its plateau."""
    c: float
    """Early power-law exponent."""
    sigma: float
    """Scatter of log CBS around the curve."""
    n_points: int
    log_likelihood: float
    plateau_in_range: bool
    """Whether t_s lies inside the measured token range (otherwise the plateau is extrapolated)."""
    t_range: tuple[float, float]

    def __call__(self, t):
        return saturating_power_law(np.asarray(t, dtype=float), self.b_max, self.t_s, self.c)

    def best_fixed_batch(self, total_tokens: float, n: int = 4096) -> float:
        """Mean of B(t) over [0, total_tokens]: the best fixed batch for a run of that length if the
        local CBS is B(t) (Merrill et al. 2025, appendix)."""
        t = np.linspace(0, total_tokens, n + 1)[1:]
        return float(np.mean(self(t)))

    def to_dict(self) -> dict:
        return asdict(self)


def saturating_power_law(t, b_max, t_s, c):
    t = np.asarray(t, dtype=float)
    with np.errstate(divide="ignore"):
        x = c * (np.log(np.maximum(t, 1e-300)) - math.log(t_s))
    return b_max * np.exp(x - np.logaddexp(0.0, x))


def log_interval_prob(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log(Φ(b) − Φ(a)) for a < b, stable in both tails."""
    from scipy.special import log_ndtr

    out = np.empty_like(a)
    upper = a > 0  # both in the upper tail: use survival functions Φ(-a) − Φ(-b)
    for mask, lo, hi in ((~upper, a, b), (upper, -b, -a)):
        if not mask.any():
            continue
        la, lb = log_ndtr(lo[mask]), log_ndtr(hi[mask])
        diff = np.clip(la - lb, -np.inf, -1e-300)
        out[mask] = lb + np.log1p(-np.exp(diff))
    return out


def fit_cbs_curve(tokens, low, high) -> CurveFit:
    """Fit B(t) to intervals. ``low`` may be 0 (left-censored), ``high`` None/inf (right-censored).
    Points at t = 0 are left out (B(0) = 0 by the model's shape)."""
    from scipy.optimize import minimize

    t = np.asarray(tokens, dtype=float)
    lo = np.asarray([0.0 if v is None else float(v) for v in low])
    hi = np.asarray([np.inf if v is None else float(v) for v in high])
    keep = t > 0
    t, lo, hi = t[keep], lo[keep], hi[keep]
    if len(t) < 2:
        raise ConfigError(f"a curve needs at least 2 branch points after 0 tokens (got {len(t)})")
    if np.any(hi <= lo):
        raise ConfigError("every interval needs high > low")
    logt = np.log(t)
    loglo = np.where(lo > 0, np.log(np.maximum(lo, 1e-300)), -np.inf)
    loghi = np.where(np.isfinite(hi), np.log(hi), np.inf)

    finite_lo = lo[lo > 0]
    finite_hi = hi[np.isfinite(hi)]
    scale = np.log(np.concatenate([finite_lo, finite_hi])) if (finite_lo.size or finite_hi.size) else np.zeros(1)
    b_center = scale.max() + 0.5
    t_center, t_sd = 0.5 * (logt.min() + logt.max()), (logt.max() - logt.min()) + 2.0

    def unpack(th):
        return (float(np.clip(th[0], b_center - 30, b_center + 30)), float(np.clip(th[1], t_center - 30, t_center + 30)),
                math.exp(float(np.clip(th[2], -6, 4))), SIGMA_FLOOR + math.exp(float(np.clip(th[3], -10, 3))))

    def log_prior(th):
        logb, logts, c, sigma = unpack(th)
        return (-0.5 * (math.log(c) / 1.5) ** 2 - 0.5 * (math.log(sigma) - math.log(0.3)) ** 2
                - 0.5 * ((logb - b_center) / 2.0) ** 2 - 0.5 * ((logts - t_center) / t_sd) ** 2)

    def nlp(th):
        logb, logts, c, sigma = unpack(th)
        x = c * (logt - logts)
        mu = logb + x - np.logaddexp(0.0, x)
        a = (loglo - mu) / sigma
        b = (loghi - mu) / sigma
        ll = log_interval_prob(a, b).sum()
        v = -(ll + log_prior(th))
        return v if math.isfinite(v) else 1e12

    best = None
    for db in (0.0, 1.0, 2.5):
        for q in (0.25, 0.5, 0.9, 1.5):
            for c0 in (0.5, 1.0, 2.0):
                th0 = np.array([scale.max() + db, logt.min() + q * (logt.max() - logt.min()), math.log(c0),
                                math.log(0.25)])
                r = minimize(nlp, th0, method="Nelder-Mead",
                             options={"maxiter": 4000, "xatol": 1e-6, "fatol": 1e-9})
                if best is None or r.fun < best.fun:
                    best = r
    logb, logts, c, sigma = unpack(best.x)
    b_max, t_s = math.exp(logb), math.exp(logts)
    ll = -nlp(best.x) - log_prior(best.x)
    return CurveFit("saturating_power_law", b_max, t_s, c, sigma, int(len(t)), float(ll),
                    bool(t.min() <= t_s <= t.max()), (float(t.min()), float(t.max())))
