"""Adaptive search over k (ours, beyond the paper): probe upward by doubling until the first
failure, then bisect between the last pass and the first failure down to a resolution in k.

Pure logic: ``next_probe`` looks at the losses measured so far and names the next k, or ``None``
when the search is finished. On a monotone loss curve it reaches the same k* as the full grid of
multiples of ``resolution`` (plus the doubling points) — the tests check this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..analysis.decision import Decision
from ..errors import ConfigError


@dataclass
class AdaptiveSearch:
    k_min: float
    k_max: float
    resolution: float
    decide: Callable[[list[float], list[list[float]]], Decision]

    def __post_init__(self):
        if not (0 < self.k_min < self.k_max):
            raise ConfigError(f"adaptive search needs 0 < k_min < k_max (got {self.k_min}, {self.k_max})")
        if self.resolution <= 0:
            raise ConfigError(f"resolution={self.resolution} must be positive")

    def doubling(self) -> list[float]:
        ks, k = [], self.k_min
        while k < self.k_max:
            ks.append(k)
            k *= 2
        ks.append(self.k_max)
        return ks

    def full_grid(self) -> list[float]:
        """Every k the search could probe: the doubling points and the resolution lattice. On a
        monotone curve the full grid over these decides the same k* (the tests check it)."""
        n = round((self.k_max - self.k_min) / self.resolution) + 1
        return sorted({round(self.k_min + i * self.resolution, 9) for i in range(n)} | set(self.doubling()))

    def next_probe(self, results: dict[float, list[float]]) -> float | None:
        """The next k to measure given ``results`` (k -> replicate losses), or None when done."""
        probed = sorted(results)
        for k in self.doubling():
            if k not in results:
                # still doubling: stop early if the latest probe already failed
                if probed and not self._passes(results)[-1]:
                    break
                return k
        dec = self._decision(results)
        passes = dict(zip(dec.ks, dec.passes))
        # first failure in increasing k, and the last pass below it
        fails = [k for k in dec.ks if not passes[k]]
        if not fails:
            return None  # everything up to k_max passes: bounded below only
        hi = fails[0]
        lo = max(k for k in dec.ks if k < hi and passes[k])
        # bisect between lo and hi on the resolution lattice (multiples of resolution from lo)
        steps = round((hi - lo) / self.resolution)
        if steps <= 1:
            return None
        mid = lo + (steps // 2) * self.resolution
        if mid in results:  # cannot happen on a consistent lattice; guard against float drift
            return None
        return mid

    def _decision(self, results: dict[float, list[float]]) -> Decision:
        ks = sorted(results)
        return self.decide(ks, [results[k] for k in ks])

    def _passes(self, results: dict[float, list[float]]) -> list[bool]:
        return self._decision(results).passes

    def run(self, measure: Callable[[float], list[float]]) -> dict[float, list[float]]:
        """Drive the search with a synchronous measuring function (used by tests and in-process)."""
        results: dict[float, list[float]] = {}
        while (k := self.next_probe(results)) is not None:
            results[k] = measure(k)
        return results
