"""Adaptive search over k (ours, beyond the paper): find the largest passing k and the first k above
it that does not pass, over a fixed set of candidate k, measuring few of them.

Pure logic: ``next_probe`` looks at the losses measured so far and names the next k, or ``None``
when the search is finished. The candidates are the doubling points k_min·2^j (up to k_max) and
``candidates`` (in a sweep: every k whose batch divides the window, so every branch ends on a whole
optimizer step), or, without them, the lattice k_min + i·resolution. :meth:`full_grid` is exactly
that set.

The search goes up from the reference k_min until a k fails, then bisects:

* the first probe above the reference is its double, 2·k_min;
* above a passing k it *gallops* over the candidates (the next one, then two further, four, ...:
  an exponential search), so that a CBS just above the last pass costs one probe, not the two of
  doubling and bisecting back; a CBS far above is still reached in logarithmically many;
* above an ``undetermined`` k (the noise cannot settle it, see :mod:`critbatch.analysis.decision`)
  it doubles: such a k sits near the ε edge, the neighbouring candidate would likely be undetermined
  too, and the interval needs a k that fails for its upper end;
* once a k fails, it bisects (on a log scale) between the largest passing k and the first k above it
  that does not pass, until no candidate lies between them.

On a monotone loss curve this reaches the same k* and k_next as deciding over the whole grid (the
tests check this) while measuring far fewer k.
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
        if self.k_min not in results:
            return _r(self.k_min)
        dec = self._decision(results)
        status = dict(zip(dec.ks, dec.status))
        top = max(results)
        if status[top] != FAIL and top < self.k_max - 1e-12:  # going up: no k above the reference failed yet
            k = self._above(top, dec, status)
            if k is not None and k not in results:
                return k
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

    def _above(self, top: float, dec: Decision, status: dict[float, str]) -> float | None:
        """The upward probe after ``top``, the largest k measured: its double from the reference or
        from an undetermined k; a gallop over the candidates above a passing one."""
        grid = self._grid
        if top == _r(self.k_min) or status[top] != PASS:
            return next((k for k in grid if k >= 2 * top - 1e-12), grid[-1])
        run = 0  # passes at the top of the measured k, the reference not counted
        for k, st in zip(reversed(dec.ks), reversed(dec.status)):
            if st != PASS or k == _r(self.k_min):
                break
            run += 1
        i = grid.index(top) + 2 ** (run - 1)
        return grid[min(i, len(grid) - 1)]

    def _decision(self, results: dict[float, list[float]]) -> Decision:
        ks = sorted(results)
        return self.decide(ks, [results[k] for k in ks])

    def run(self, measure: Callable[[float], list[float]]) -> dict[float, list[float]]:
        """Drive the search with a synchronous measuring function (used by tests and in-process)."""
        results: dict[float, list[float]] = {}
        while (k := self.next_probe(results)) is not None:
            results[k] = measure(k)
        return results
