"""The gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, appendix A), pure math.

With per-example gradient mean G and covariance Σ, the mean gradient of a batch of B examples has
E|G_B|² = |G|² + tr(Σ)/B. Squared norms measured at two batch sizes B_small < B_big give, per
measurement, the unbiased estimates

    |G|²   ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ)  ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

and B_simple = mean(tr(Σ) estimates) / mean(|G|² estimates): numerator and denominator are averaged
separately, since the mean of per-sample ratios is biased. Negative means are clipped to 0.

Intervals (95% by default):
* ``paper``: the tr(Σ) samples treated as exponential (a χ² interval for their mean) and the |G|²
  samples as normal; the ratio interval joins the two, each at level sqrt(confidence)
  (Merrill et al. 2025 §3 describe the two distributional assumptions).
* ``delta``: a normal interval for the ratio of means by the delta method, with the sample
  covariance of the paired estimates. It is the default because it covers close to the nominal
  rate in the known-answer tests (docs/LOG.md), while the paper's is conservative.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigError


@dataclass
class NoiseScale:
    b_simple: float
    """tr(Σ)/|G|² in examples (sequences); ``inf`` when the |G|² estimate is not positive."""
    grad_sq: float
    """The |G|² estimate (clipped at 0)."""
    trace_cov: float
    """The tr(Σ) estimate (clipped at 0)."""
    ci_low: float
    ci_high: float
    n_batches: int
    b_small: int
    b_big: int
    confidence: float
    interval: str
    ci_paper: tuple[float, float] | None = None
    ci_delta: tuple[float, float] | None = None
    method: str = ""
    """How the norms were measured (``vmap``, ``loop``, ``online``)."""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def two_batch_estimates(sq_small, sq_big, b_small: float, b_big: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-measurement unbiased estimates (|G|², tr(Σ)) from squared norms at two batch sizes."""
    if not b_big > b_small > 0:
        raise ConfigError(f"b_big={b_big} must be larger than b_small={b_small} > 0")
    s = np.asarray(sq_small, dtype=float)
    b = np.asarray(sq_big, dtype=float)
    g2 = (b_big * b - b_small * s) / (b_big - b_small)
    tr = (s - b) / (1.0 / b_small - 1.0 / b_big)
    return g2, tr


def _paper_interval(g2: np.ndarray, tr: np.ndarray, confidence: float) -> tuple[float, float]:
    from scipy import stats

    n = g2.size
    level = math.sqrt(confidence)  # two independent intervals jointly at `confidence`
    a = 1 - level
    s_mean = max(tr.mean(), 0.0)
    # exponential samples: 2·n·mean/θ ~ χ²(2n)
    s_lo = 2 * n * s_mean / stats.chi2.ppf(1 - a / 2, 2 * n)
    s_hi = 2 * n * s_mean / stats.chi2.ppf(a / 2, 2 * n)
    g_mean = g2.mean()
    g_se = g2.std(ddof=1) / math.sqrt(n) if n > 1 else float("inf")
    z = stats.norm.ppf(1 - a / 2)
    g_lo, g_hi = max(g_mean - z * g_se, 0.0), max(g_mean + z * g_se, 0.0)
    lo = s_lo / g_hi if g_hi > 0 else float("inf")
    hi = s_hi / g_lo if g_lo > 0 else float("inf")
    return float(lo), float(hi)


def _delta_interval(g2: np.ndarray, tr: np.ndarray, confidence: float) -> tuple[float, float]:
    from scipy import stats

    n = g2.size
    gm, sm = g2.mean(), tr.mean()
    if n < 2 or gm <= 0:
        return 0.0, float("inf")
    r = max(sm, 0.0) / gm
    cov = np.cov(np.vstack([tr, g2]), ddof=1)
    var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (n * gm * gm)
    z = stats.norm.ppf(1 - (1 - confidence) / 2)
    half = z * math.sqrt(max(var, 0.0))
    return float(max(r - half, 0.0)), float(r + half)


def noise_scale_from_estimates(g2, tr, b_small: int, b_big: int, confidence: float = 0.95,
                               interval: str = "delta") -> NoiseScale:
    """B_simple and its interval from paired per-measurement estimates."""
    g2 = np.asarray(g2, dtype=float)
    tr = np.asarray(tr, dtype=float)
    if g2.size == 0:
        raise ConfigError("no measurements: give at least one batch")
    if interval not in ("delta", "paper"):
        raise ConfigError(f"interval {interval!r} is not one of delta, paper")
    gm, sm = max(float(g2.mean()), 0.0), max(float(tr.mean()), 0.0)
    b = sm / gm if gm > 0 else float("inf")
    paper = _paper_interval(g2, tr, confidence) if g2.size > 1 else (0.0, float("inf"))
    delta = _delta_interval(g2, tr, confidence)
    lo, hi = delta if interval == "delta" else paper
    return NoiseScale(b, gm, sm, lo, hi, int(g2.size), b_small, b_big, confidence, interval, paper, delta)


def noise_scale_from_norms(sq_small, sq_big, b_small: int, b_big: int, confidence: float = 0.95,
                           interval: str = "delta") -> NoiseScale:
    g2, tr = two_batch_estimates(sq_small, sq_big, b_small, b_big)
    return noise_scale_from_estimates(g2, tr, b_small, b_big, confidence, interval)
