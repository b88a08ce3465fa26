"""Token and step arithmetic. Tokens are time: every duration is counted in tokens (docs/guide.md, "Concepts and units").

Counts given by people ("50M", "2.5e6", "100k", "2_000_000") are parsed here, once.
"""

from __future__ import annotations

import math
import re

from .errors import ConfigError

_SUFFIX = {"": 1, "k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "b": 10**9, "B": 10**9,
           "g": 10**9, "G": 10**9, "t": 10**12, "T": 10**12}
_COUNT_RE = re.compile(r"^\s*(-?[0-9][0-9_]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*$")


def parse_count(value: str | int | float, what: str = "count") -> int:
    """Parse a non-negative integer count such as ``"50M"``, ``"1.5e6"``, ``"100k"`` or ``4096``.

    Suffixes are decimal: k = 10^3, M = 10^6, B or G = 10^9, T = 10^12. The result must be a whole
    number; ``"1.5"`` is rejected rather than rounded.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what} {value!r} is not a count; give a whole number such as 4096 or 50M")
    if isinstance(value, int):
        out = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ConfigError(f"{what} {value!r} is not a whole number")
        out = int(value)
    else:
        m = _COUNT_RE.match(str(value))
        if not m:
            raise ConfigError(f"{what} {value!r} is not a count; give a whole number such as 4096, 100k, 50M or 2.5e6")
        number, suffix = m.groups()
        number = number.replace("_", "")
        try:
            if any(c in number for c in ".eE"):
                x = float(number) * _SUFFIX[suffix]
                if x != int(x):
                    raise ConfigError(f"{what} {value!r} is not a whole number")
                out = int(x)
            else:
                out = int(number) * _SUFFIX[suffix]
        except ValueError:
            raise ConfigError(f"{what} {value!r} is not a count") from None
    if out < 0:
        raise ConfigError(f"{what} {value!r} is negative; it must be >= 0")
    return out


def parse_count_list(value: str | list, what: str = "counts") -> list[int]:
    """Parse ``"100k,400k,1.6M"`` (or a list) into a sorted list of distinct counts."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [v for v in str(value).split(",") if v.strip()]
    return sorted({parse_count(v, what) for v in items})


def fmt_count(n: float | int | None) -> str:
    """Human form of a count: 12582912 -> '12.6M'; used only for display."""
    if n is None:
        return "-"
    n = float(n)
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{suf}"
    return f"{n:.4g}"


def steps_for_tokens(tokens: int, batch_tokens: int) -> int:
    """Optimizer steps needed to consume at least ``tokens`` at ``batch_tokens`` a step (rounded up)."""
    return -(-int(tokens) // int(batch_tokens))
