"""What a long command shows while it runs: a tqdm bar on a terminal; off one (under nohup, Slurm, a
pipe) a plain line on stderr every ``interval_s`` seconds, as training frameworks print them:

    base: 262,144/1,000,000 tokens (26%) | 41,210 tokens/s | step 1024, loss 2.412 | elapsed 6s | ETA 18s
    sweep 1c0f4e2a9b3d: 5/14 branches (36%) | elapsed 1m02s | ETA 1m52s

Rates and ETAs count only the work of this session (a resumed run's earlier tokens and a sweep's
branches finished before are not in them).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from tqdm.auto import tqdm


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_mode(enabled: bool | None, stream: TextIO) -> str:
    """``bar`` (tqdm: on a terminal, or forced with ``enabled=True``), ``lines`` (``enabled=None`` and
    ``stream`` is not a terminal) or ``off`` (``enabled=False``)."""
    if enabled is False:
        return "off"
    if enabled is None:
        isatty = getattr(stream, "isatty", None)
        return "bar" if isatty is not None and isatty() else "lines"
    return "bar"


class Progress:
    """Work done towards a total: ``update`` (done now), ``skip`` (found done: counted, not in the
    rate), ``add_total``, ``set_postfix``, ``close``. ``rate`` shows units a second in the lines;
    ``heartbeat`` prints them every ``interval_s`` even when nothing moved (work that finishes in
    large pieces, such as a sweep's branches); close it (try/finally) to stop the heartbeat.
    ``tqdm_kw`` go to the bar."""

    def __init__(self, total: int | None, *, desc: str, unit: str, enabled: bool | None, interval_s: float,
                 initial: int = 0, rate: bool = True, heartbeat: bool = False, stream: TextIO | None = None,
                 **tqdm_kw):
        self.stream = stream if stream is not None else sys.stderr
        self.mode = progress_mode(enabled, self.stream)
        self.desc, self.unit, self.interval_s, self.rate = desc, unit, float(interval_s), rate
        self.total, self.n, self.initial = total, initial, initial
        self.postfix: dict = {}
        self.t0 = self.last = time.monotonic()
        self.printed_n: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.bar = None
        if self.mode == "bar":
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream, disable=False,
                            **tqdm_kw)
        elif self.mode == "lines" and heartbeat and self.interval_s > 0:
            threading.Thread(target=self._beat, daemon=True, name="critbatch-progress").start()

    # ---- the counts ---------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "lines" and n:
            self._maybe_print()

    def skip(self, n: int) -> None:
        """``n`` units found already done: counted, but not in the rate or the ETA."""
        self.initial += n
        self.update(n)

    def add_total(self, n: int) -> None:
        self.total = (self.total or 0) + n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def set_postfix(self, **values) -> None:
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(refresh=False, **values)

    def close(self) -> None:
        self._stop.set()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "lines" and self.printed_n != self.n and self.n > self.initial:
            self._print(time.monotonic())
        with self._lock:
            self.mode = "off"

    # ---- the lines ----------------------------------------------------------------------------
    def line(self, now: float | None = None) -> str:
        """The plain progress line at ``now`` (monotonic seconds)."""
        now = time.monotonic() if now is None else now
        elapsed = now - self.t0
        done = self.n - self.initial
        parts = [f"{self.desc}: {self.n:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"
                 + (f" ({self.n / self.total:.0%})" if self.total else "")]
        per_s = done / elapsed if elapsed > 0 else 0.0
        if self.rate:
            parts.append(f"{per_s:,.0f} {self.unit}/s")
        if self.postfix:
            parts.append(", ".join(f"{k} {v}" for k, v in self.postfix.items()))
        parts.append(f"elapsed {duration(elapsed)}")
        if self.total and per_s > 0:
            parts.append(f"ETA {duration(max(self.total - self.n, 0) / per_s)}")
        return " | ".join(parts)

    def _maybe_print(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self._print(now)

    def _print(self, now: float) -> None:
        with self._lock:
            if self.mode != "lines":
                return
            self.last, self.printed_n = now, self.n
            print(self.line(now), file=self.stream, flush=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._maybe_print()
