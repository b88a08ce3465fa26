"""Adaptive search over k (ours, beyond the paper): probe upward by doubling until the first k that
fails, then bisect between the largest passing k and the first k above it that does not pass, over a
fixed set of candidate k.

Pure logic: ``next_probe`` looks at the losses measured so far and names the next k, or ``None``
when the search is finished. The candidates are the doubling points k_min·2^j (up to k_max) and
``candidates`` (in a sweep: every k whose batch divides the window, so every branch ends on a whole
optimizer step), or, without them, the lattice k_min + i·resolution. :meth:`full_grid` is exactly
that set, and on a monotone loss curve the search reaches the same k* and k_next as deciding over
the whole of it (the tests check this) while measuring far fewer k.

An ``undetermined`` k (the noise cannot settle it, see :mod:`critbatch.analysis.decision`) does not
stop the doubling: the search goes on looking for a k that fails, so the interval has an upper end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .decision import FAIL, PASS, Decision
from ..errors import ConfigError


def _r(k: float) -> float:
    return round(float(k), 9)


@dataclass
class AdaptiveSearch:
    k_min: float
    k_max: float
    resolution: float | None
    """Lattice step of the candidates when ``candidates`` is not given."""
    decide: Callable[[list[float], list[list[float]]], Decision]
    candidates: list[float] | None = None
    """The k the bisection may probe (filtered to [k_min, k_max]); ``None``: the resolution lattice."""
    _grid: list[float] = field(init=False, repr=False)

    def __post_init__(self):
        if not (0 < self.k_min < self.k_max):
            raise ConfigError(f"adaptive search needs 0 < k_min < k_max (got {self.k_min}, {self.k_max})")
        if self.candidates is None:
            if self.resolution is None or not self.resolution > 0:
                raise ConfigError(f"resolution={self.resolution} must be positive")
            n = math.floor((self.k_max - self.k_min) / self.resolution + 1e-9) + 1
            lattice = {_r(self.k_min + i * self.resolution) for i in range(n)}
        else:
            lattice = {_r(k) for k in self.candidates}
        lattice = {k for k in lattice if self.k_min - 1e-12 <= k <= self.k_max + 1e-12}
        self._grid = sorted(lattice | set(self.doubling()))

    def doubling(self) -> list[float]:
        ks, k = [], self.k_min
        while k < self.k_max - 1e-12:
            ks.append(_r(k))
            k *= 2
        ks.append(_r(self.k_max))
        return ks

    def full_grid(self) -> list[float]:
        """Every k the search could probe: the doubling points and the candidates."""
        return list(self._grid)

    def next_probe(self, results: dict[float, list[float]]) -> float | None:
        """The next k to measure given ``results`` (k -> replicate losses), or None when done."""
        dec = self._decision(results) if results else None
        for k in self.doubling():
            if k not in results:
                if dec is not None and dec.status[-1] == FAIL:
                    break  # the largest k probed so far failed: stop doubling
                return k
        status = dict(zip(dec.ks, dec.status))
        lo = dec.k_star
        above = [k for k in dec.ks if k > lo and status[k] != PASS]
        if not above:
            return None  # everything up to the largest probe passes: bounded below only
        hi = above[0]
        inside = [k for k in self._grid if lo < k < hi and k not in results]
        if not inside:
            return None
        mid = math.sqrt(lo * hi)  # batch sizes live on a log scale
        return min(inside, key=lambda k: (abs(math.log(k / mid)), k))

    def _decision(self, results: dict[float, list[float]]) -> Decision:
        ks = sorted(results)
        return self.decide(ks, [results[k] for k in ks])

    def run(self, measure: Callable[[float], list[float]]) -> dict[float, list[float]]:
        """Drive the search with a synchronous measuring function (used by tests and in-process)."""
        results: dict[float, list[float]] = {}
        while (k := self.next_probe(results)) is not None:
            results[k] = measure(k)
        return results
