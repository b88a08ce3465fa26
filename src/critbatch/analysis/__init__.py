"""Decisions, curves and fits over sweep results (pure functions plus the sweep-directory readers)."""

from .decision import Decision, decide, decide_eps, decide_noninf

__all__ = ["Decision", "decide", "decide_eps", "decide_noninf"]
