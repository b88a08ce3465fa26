"""Plots (pure functions of result dicts) and the report."""
