"""Results in words, one home per result kind, so that the command line and the report cannot
disagree: a decided CBS point (:func:`cbs_interval` reads it; :func:`interval_text` is the short
form of tables and sentences, :func:`describe_point` the command line's line).

Pure functions of records (:mod:`critbatch.records`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..records import CBSPoint
from ..units import fmt_count


@dataclass(frozen=True)
class Interval:
    """What a decided point says about the CBS, in sequences."""

    kind: str
    """``none`` (one batch size: no decision), ``undetermined`` (no reference to compare with),
    ``below`` (only the smallest batch passed: at most ``high``), ``above`` (no larger batch shown
    to fail: at least ``low``) or ``between`` (``low`` to ``high``)."""
    low: float
    high: float | None
    undetermined: tuple[float, ...] = ()
    """Batches (sequences) that were neither shown within eps nor worse."""
    largest_passed: bool = False
    """``above``: the largest batch probed passed (rather than being undetermined)."""
    reason: str | None = None
    """``undetermined``: why."""


def cbs_interval(p: CBSPoint) -> Interval:
    """The interval a decided point puts on the CBS."""
    lo, hi = p["cbs_low_seqs"], p["cbs_high_seqs"]
    und = tuple(k * p["base_batch_seqs"] for k in p.get("undetermined_ks") or [])
    if len(p["ks"]) < 2:
        return Interval("none", lo, hi)
    if p.get("undetermined_reason"):
        return Interval("undetermined", lo, None, und, reason=p["undetermined_reason"])
    if hi is None:
        return Interval("above", lo, None, und, largest_passed=not und)
    if p["below_grid"] or lo <= 0:
        return Interval("below", 0.0, hi, und)
    return Interval("between", lo, hi, und)


def interval_text(p: CBSPoint) -> str:
    """The short form: ``6 – 16``, ``≥ 16 (...)``, ``≤ 6 (...)``, with undetermined batches."""
    iv = cbs_interval(p)
    if iv.kind == "none":
        return "no decision (one batch size)"
    if iv.kind == "undetermined":
        return "undetermined: " + str(iv.reason)
    und = (" (undetermined: " + ", ".join(f"{b:g}" for b in iv.undetermined) + ")") if iv.undetermined else ""
    if iv.kind == "above":
        return f"≥ {iv.low:g}" + (" (even the largest batch passed)" if iv.largest_passed
                                  else " (no larger batch was shown to fail)") + und
    if iv.kind == "below":
        return f"≤ {iv.high:g} (only the smallest batch passed)" + und
    return f"{iv.low:g} – {iv.high:g}" + und


def describe_point(p: CBSPoint) -> str:
    """The command line's line for a decided point: the interval in sequences and tokens, the
    readings, what is undetermined and what would settle it, early stops, the held-out noise."""
    T = p["seq_len"]
    iv = cbs_interval(p)
    if iv.kind == "none":
        return f"one batch size only (k={p['ks'][0]:g}): no decision"
    if iv.kind == "undetermined":
        return f"CBS undetermined: {iv.reason}"
    lo, hi = iv.low, iv.high
    if iv.kind == "above":
        s = (f"CBS >= {lo:g} seqs ({fmt_count(lo * T)} tokens): "
             + ("even the largest batch passed" if iv.largest_passed else "no probed batch was shown to fail")
             + ", bounded below only")
    elif iv.kind == "below":
        s = f"CBS <= {hi:g} seqs ({fmt_count(hi * T)} tokens): only the smallest batch passed; it may lie below the grid"
    else:
        s = f"CBS in [{lo:g}, {hi:g}] seqs ({fmt_count(lo * T)}–{fmt_count(hi * T)} tokens), geo-mean {p['cbs_geomean_seqs']:.3g}"
    if p["readings_disagree"]:
        cl, ch = p["conservative_low_seqs"], p["conservative_high_seqs"]
        s += f"; conservative reading [{cl:g}, {ch if ch is not None else 'inf'}] disagrees"
    if iv.undetermined:
        s += f"; undetermined: {', '.join(f'{b:g}' for b in iv.undetermined)} seqs"
        if p.get("replicates_needed"):
            s += f" (~{p['replicates_needed']} replicates would settle it)"
        elif p.get("eval_seqs_needed"):
            s += f" (~{p['eval_seqs_needed']:,} held-out sequences would settle it)"
    stopped = [(k, x) for k, reps in zip(p["ks"], p.get("stopped_early") or []) for x in reps if x]
    if stopped:
        s += "; stopped early as failing: " + ", ".join(
            f"{k * p['base_batch_seqs']:g} seqs (gap {x['gap_mean']:+.4f} ± {x['gap_se']:.4f} over {x['spans']} "
            f"cooldown stretches > {x['gap']:g})" for k, x in stopped)
    if p.get("eval_noise_ok") is False:
        s += f"; held-out paired error {p['max_paired_eval_se']:.4f} is not well below eps: raise --eval-seqs"
    return s


def describe_sweep_cost(cost: dict) -> str:
    """What a curve cost against the run it measures (``cbs.json``'s ``cost``), one sentence without
    its full stop: the command line prints it, the report's conclusions end it."""
    s = f"{cost['branches']} branches, {cost['branch_tokens']:,} trained branch tokens"
    if cost.get("branch_tokens_over_base") is not None:
        s += f" ({cost['branch_tokens_over_base']:.2f}x the base run's {cost['base_tokens']:,})"
    if cost.get("tokens_from_base"):
        s += (f"; {cost['tokens_from_base']:,} more read from the base run's own continuation (its checkpoints "
              f"before the k = 1 branches' cooldowns) instead of trained")
    if cost.get("stopped_early"):
        n = cost["stopped_early"]
        s += (f"; {n} branch{'es' if n != 1 else ''} stopped early ({cost['early_stop_saved_tokens']:,} tokens "
              f"saved) once settled as failing")
    if cost.get("full_grid_branch_tokens"):
        s += f"; every candidate batch at every point would have cost {cost['full_grid_branch_tokens']:,}"
    return s


def measurement_parts(result: dict) -> str:
    """What a closed-loop run's measurement tokens (``result.json``'s ``measurement_tokens``) are made of."""
    kept = result.get("probe_kept_tokens", 0)
    parts = [f"probes {fmt_count(result['probe_tokens'] - kept)}"
             + (f" (of {fmt_count(result['probe_tokens'])} trained: the run continued from its raises' probes)" if kept else "")]
    dropped = (result.get("main_run_leads") or {}).get("discarded_tokens", 0)
    if dropped:
        parts.append(f"{fmt_count(dropped)} the run trained ahead of a probe and dropped at its raises")
    spec = (result.get("speculation") or {}).get("discarded_tokens", 0)
    if spec:
        parts.append(f"{fmt_count(spec)} of speculative segments not taken")
    return ", ".join(parts + [f"noise scale {fmt_count(result.get('gns_tokens', 0))}"])


def skipped_probes(result: dict) -> str | None:
    """The probe points a closed-loop run left out because none could lead to a raise (``result.json``'s
    ``skipped_probe_points``) in words, or ``None``."""
    sk = result.get("skipped_probe_points")
    if not sk:
        return None
    n = len(sk["points"])
    return (f"no probe at {', '.join(f'{p:,}' for p in sk['points'])} tokens ({n} point{'s' * (n != 1)} "
            f"left out): {sk['reason']}")


def describe_closed_loop(result: dict) -> list[str]:
    """A closed-loop run's ``result.json`` in lines: its schedule, its loss and steps, what its
    measurements cost, how the cheaper triggers agreed with the branch probe."""
    sched = " -> ".join(f"{b}" + (f" @{t:,}" if t else "") for t, b in result["schedule"])
    lines = [f"batch {sched} (sequences @ tokens); {result['raises']} raise(s) at {result['probe_points']} probe points",
             f"final eval loss {result['final_eval_loss']:.4f} ± {result['final_eval_loss_se']:.4f}, "
             f"{result['steps']:,} optimizer steps ({result['steps_saved_pct']:.0f}% fewer than "
             f"{result['small_control_steps']:,} at the starting batch)"
             if not result["diverged"] else f"diverged: {result['diverged_reason']}",
             f"measurement cost: {result['measurement_tokens']:,} tokens ({100 * (result['measurement_fraction'] or 0):.0f}% "
             f"of the run's {result['tokens']:,}): {measurement_parts(result)}"]
    if skipped_probes(result):
        lines.append(skipped_probes(result))
    for name, v in (result.get("agreement") or {}).items():
        if v["points"]:
            lines.append(f"{name} trigger agreed with the branch probe at {v['agree']} of {v['points']} points")
    return lines
