"""The records that cross module boundaries, typed: what a run, a sweep and the closed loop write as
JSON and what the analysis, the report and the command line read back.

They are ``TypedDict``s, so the files are exactly the dictionaries written (a record *is* its JSON
document, read and written by key as before, now with every key named and typed here), and each
file kind has one reader (:func:`load_run_result`, :func:`load_curve`, :func:`load_decisions`, ...)
that checks the keys every version wrote and fills in, with their defaults, the keys added since:
a file written by an earlier version reads as one written today (``tests/data/format-2026-11``
holds such files and a test reads them). A file missing a key that every version wrote is damaged:
the reader says which file and which key, in one line.

Nothing here imports anything but the standard library and the ground floor (errors, files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, TypedDict

from .errors import DataError
from .io import read_json, read_jsonl

# ---- a training run ------------------------------------------------------------------------------


class RunResult(TypedDict, total=False):
    """``RUN/result.json``, written last: its presence means the run is complete."""

    tokens: int
    steps: int
    """Optimizer steps trained in this run directory (from its start, a branch's start included)."""
    global_step: int
    start_tokens: int
    """Tokens of the checkpoint the run started from (0 for a run from scratch)."""
    final_eval_loss: float | None
    final_eval_loss_se: float | None
    eval_seqs: int
    final_train_loss: float | None
    """The training loss smoothed by an EMA (alpha 0.5) over steps, at the end."""
    final_train_loss_last_step: float | None
    train_loss_smoothing: str
    diverged: bool
    diverged_at_tokens: int | None
    diverged_reason: str | None
    epochs: float
    params: int
    flops_per_token: int
    wall_time_s: float
    eval_time_s: float
    """Wall time of its held-out evaluations (the final one is outside ``wall_time_s``)."""
    tokens_per_s: float | None
    config_hash: str
    trained: str
    """``alone`` or ``stacked xN``."""


RUN_RESULT_REQUIRED = ("tokens", "steps", "diverged")
RUN_RESULT_DEFAULTS: dict[str, Any] = {"start_tokens": 0, "final_eval_loss": None, "final_eval_loss_se": None,
                                       "final_train_loss": None, "diverged_reason": None, "trained": "alone",
                                       "wall_time_s": 0.0, "eval_time_s": 0.0}


# ---- a sweep: one decided branch point and the curve ------------------------------------------------


class NoiseScaleAtPoint(TypedDict, total=False):
    """The gradient noise scale measured at a branch point's checkpoint (``critbatch gns``)."""

    b_simple_seqs: float | None
    b_simple_tokens: float | None
    ci_low_seqs: float | None
    ci_high_seqs: float | None
    ci_low_tokens: float | None
    ci_high_tokens: float | None
    grad_sq: float
    trace_cov: float
    n_batches: int


class StopReading(TypedDict):
    """Why a branch stopped early (:mod:`critbatch.train.early_stop`)."""

    tokens: int
    gap_mean: float
    gap_se: float
    spans: int
    gap: float
    z: float


CBSPoint = TypedDict("CBSPoint", {
    # where and what
    "tokens": int, "requested_tokens": int, "base_batch_seqs": int, "seq_len": int,
    "ks": list, "batch_seqs": list, "decide_by": str, "rule": str,
    # the measurements: per k, per replicate (losses by metric: "eval", "train-ema")
    "losses": dict, "mean_loss": dict, "diverged": list,
    # the decision (critbatch.analysis.decision)
    "status": list, "passes": list, "undetermined_ks": list, "settled": bool, "undetermined_reason": "str | None",
    "replicates_needed": "int | None", "eval_seqs_needed": "int | None", "max_paired_eval_se": "float | None",
    "eval_noise_ok": "bool | None", "k_star": float, "k_next": "float | None",
    # the interval in sequences and tokens (cbs_high_* None: bounded below only)
    "cbs_low_seqs": float, "cbs_high_seqs": "float | None", "cbs_low_tokens": float, "cbs_high_tokens": "float | None",
    "cbs_geomean_seqs": "float | None", "cbs_geomean_tokens": "float | None",
    "conservative_k_star": float, "conservative_low_seqs": float, "conservative_high_seqs": "float | None",
    "readings_disagree": bool, "bounded_above": bool, "below_grid": bool, "decision": dict,
    # what the sweep adds: the point's cost and how its branches ran
    "branch_tokens": int, "from_parent_tokens": list, "branch_seconds": float, "trained": list, "branches": int,
    "steps": list, "eval_se": list, "stopped_early": list, "early_stop_saved_tokens": int,
    "full_grid_branch_tokens": int, "full_grid_ks": int,
    # attached when the run has a noise scale at the same checkpoint
    "noise_scale": "NoiseScaleAtPoint | None",
}, total=False)
"""One decided branch point of ``cbs.json`` (built by :func:`critbatch.analysis.curve.point_record`)."""

POINT_REQUIRED = ("tokens", "base_batch_seqs", "cbs_low_seqs", "cbs_high_seqs")
"""What a point needs to say anything (a cbs.json written by hand from one's own measurements has these)."""
POINT_DEFAULTS: dict[str, Any] = {
    "ks": [], "losses": {}, "mean_loss": {}, "status": [], "diverged": [], "readings_disagree": False,
    "below_grid": False, "settled": True, "undetermined_ks": [], "undetermined_reason": None,
    "replicates_needed": None, "eval_seqs_needed": None, "max_paired_eval_se": None, "eval_noise_ok": None,
    "noise_scale": None, "stopped_early": None, "early_stop_saved_tokens": 0, "from_parent_tokens": None,
    "branch_tokens": 0,
}


class SweepCost(TypedDict, total=False):
    """``cbs.json``'s ``cost``: what the curve cost against the run it measures."""

    branches: int
    branch_tokens: int
    """Tokens the sweep's branches trained."""
    tokens_from_base: int
    """Tokens branches read from the parent's own continuation instead of training them."""
    branch_seconds: float
    """The branches' training time (each branch's ``wall_time_s``)."""
    branch_eval_seconds: float
    """Their held-out evaluation at the window's end (each branch's ``eval_time_s``)."""
    wall_time_s: float
    stopped_early: int
    early_stop_saved_tokens: int
    trained: dict
    full_grid_branch_tokens: int
    base_tokens: int
    branch_tokens_over_base: float | None
    stacking: dict


class CBSCurve(TypedDict, total=False):
    """``SWEEP/cbs.json``: every point decided, with the sweep's settings, cost and fit."""

    sweep_id: str
    run: str
    search: str
    decide_by: str
    rule: str
    eps: float
    confidence: float
    early_stop_gap: float | None
    lr_rule: str
    adam_rule: str
    cooldown_fraction: float
    replicates: int
    window_tokens: int
    window_tokens_requested: int
    eval_seqs: int
    seq_len: int
    notes: list
    points: list
    """:class:`CBSPoint` records, in token order."""
    cost: SweepCost
    fit: dict | None
    noise_scale_settings: dict | None


CURVE_REQUIRED = ("points", "seq_len")
CURVE_DEFAULTS: dict[str, Any] = {"notes": [], "fit": None, "lr_rule": "sqrt", "adam_rule": "none", "replicates": 1,
                                  "cost": {}, "cooldown_fraction": 0.0, "early_stop_gap": None, "decide_by": None,
                                  "rule": None, "eps": None}
"""A value that was not recorded is ``None`` (say so rather than guess), except the LR and Adam rules,
whose project defaults applied."""


# ---- one branch --------------------------------------------------------------------------------------

BranchOutcome = TypedDict("BranchOutcome", {
    "eval": float, "train-ema": float, "eval_se": "float | None", "eval_per_seq": Any, "diverged": bool,
    "tokens": int, "steps": int, "wall_time_s": float, "eval_time_s": float, "trained": str, "from_parent_tokens": int,
    "stopped": "StopReading | None",
})
"""A finished (or early-stopped) branch's numbers, as a sweep decides with them
(:func:`critbatch.branch.curve.branch_outcome`): ``eval`` / ``train-ema`` are ``inf`` for a diverged
branch and NaN for one stopped early; ``eval_per_seq`` its per-sequence held-out losses (a numpy
array, or ``None``)."""


# ---- the closed loop -----------------------------------------------------------------------------------


class Confirmations(TypedDict):
    """How many consecutive probe points at this batch said raise, of how many a raise needs."""

    seen: int
    needed: int


class ProbeEvidence(TypedDict, total=False):
    """The branch probe of a closed-loop decision: the probed batches, their losses and the decision."""

    sweep: str
    ks: list
    batch_seqs: list
    eval_losses: list
    eval_se: list | None
    diverged: list
    rule: str
    eps: float
    status: list
    passes: list
    undetermined_ks: list
    undetermined_reason: str | None
    cbs_low_seqs: float
    cbs_high_seqs: float | None
    max_paired_eval_se: float | None
    window_tokens: int
    probe_tokens: int


class ProbeDecision(TypedDict, total=False):
    """One line of a closed-loop run's ``decisions.jsonl``: the evidence at a probe point and what
    the loop did."""

    point: int
    tokens: int
    requested_tokens: int
    batch_before: int
    lr_multiplier_before: float
    segment: str
    probe: ProbeEvidence | None
    verdicts: dict
    """Trigger name (``branch``, ``gns``, ``norm``, or ``planted``) -> ``raise``, ``stay``,
    ``undetermined`` or ``None`` (no verdict yet)."""
    acted_on: str
    batch_after: int
    cost: dict
    """``probe_tokens``, ``gns_tokens``: tokens the point's measurements trained; at a raise,
    ``lead_dropped_tokens`` (the run's lead it dropped) and ``probe_kept_tokens`` (the probe's
    tokens the run continued from)."""
    noise_scale: dict | None
    confirmations: Confirmations | None
    """A raise the trigger saw, counted against the consecutive points it needs (``None``: no raise seen)."""
    eps_budget: dict | None
    eps_spent: float | None
    main_run_lead: dict | None
    continued_from_probe: dict | None
    """At a raise: the probe branch at the new batch the run continued from (``branch``), up to
    ``to_tokens`` (``tokens`` and ``steps`` of it), instead of training those steps again."""
    speculative_segment: dict | None


DECISION_REQUIRED = ("tokens", "batch_before", "batch_after", "verdicts", "acted_on", "cost")
DECISION_DEFAULTS: dict[str, Any] = {"probe": None, "noise_scale": None, "confirmations": None, "eps_budget": None,
                                     "eps_spent": None, "main_run_lead": None, "speculative_segment": None,
                                     "continued_from_probe": None}


class ClosedLoopResult(TypedDict, total=False):
    """A closed-loop run's ``result.json``."""

    diverged: bool
    diverged_reason: str | None
    final_eval_loss: float | None
    final_eval_loss_se: float | None
    final_train_loss: float | None
    tokens: int
    steps: int
    schedule: list
    start_batch_seqs: int
    final_batch_seqs: int
    probe_points: int
    skipped_probe_points: dict | None
    """The scheduled probe points left out, from the first that could lead to no raise before the
    run's end: ``from_tokens``, ``points``, ``batch_seqs``, ``reason``; ``None`` when none were."""
    raises: int
    probe_tokens: int
    gns_tokens: int
    probe_fraction: float | None
    probe_kept_tokens: int
    """Tokens of the probes the run continued from at its raises (part of the run, not measurement)."""
    measurement_tokens: int
    """Probes less what the run kept of them, noise scale, leads dropped at raises and speculative
    segments not taken."""
    measurement_fraction: float | None
    small_control_steps: int
    steps_saved_pct: float
    segments: list
    act_on: str
    speculation: dict
    main_run_leads: dict
    agreement: dict
    wall_time_s: float


CLOSED_LOOP_REQUIRED = ("tokens", "steps", "schedule", "raises", "probe_tokens", "diverged")
CLOSED_LOOP_DEFAULTS: dict[str, Any] = {"main_run_leads": {"points": 0, "kept": 0, "tokens": 0, "discarded_tokens": 0},
                                        "agreement": {}, "gns_tokens": 0, "probe_kept_tokens": 0,
                                        "skipped_probe_points": None}


# ---- readers: one per file kind ------------------------------------------------------------------------


def upgrade(record: Mapping, required: tuple[str, ...], defaults: dict[str, Any], what: str) -> dict:
    """A record read from a file, checked and brought to today's form: every key in ``required``
    must be there (else a DataError naming ``what`` and the key); keys added since fill in from
    ``defaults`` (copied, so records never share a mutable default)."""
    if not isinstance(record, Mapping):
        raise DataError(f"{what} is damaged: a record is a {type(record).__name__}, not a JSON object")
    missing = [k for k in required if k not in record]
    if missing:
        raise DataError(f"{what} is damaged or not a critbatch file: it has no {missing[0]!r}")
    out = dict(record)
    for k, v in defaults.items():
        if k not in out:
            out[k] = [*v] if isinstance(v, list) else ({**v} if isinstance(v, dict) else v)
    return out


def run_result(record: Mapping, what: str = "result.json") -> RunResult:
    return upgrade(record, RUN_RESULT_REQUIRED, RUN_RESULT_DEFAULTS, what)  # type: ignore[return-value]


def cbs_point(record: Mapping, what: str = "a CBS point", seq_len: int | None = None) -> CBSPoint:
    """A point brought to today's form; ``seq_len`` (its curve's) fills the token fields it lacks."""
    p = upgrade(record, POINT_REQUIRED, POINT_DEFAULTS, what)
    p.setdefault("seq_len", seq_len)
    p.setdefault("bounded_above", p["cbs_high_seqs"] is not None)
    T = p["seq_len"]
    if T is not None:
        p.setdefault("cbs_low_tokens", p["cbs_low_seqs"] * T)
        p.setdefault("cbs_high_tokens", None if p["cbs_high_seqs"] is None else p["cbs_high_seqs"] * T)
    return p  # type: ignore[return-value]


def cbs_curve(record: Mapping, what: str = "cbs.json") -> CBSCurve:
    c = upgrade(record, CURVE_REQUIRED, CURVE_DEFAULTS, what)
    if not isinstance(c["points"], list):
        raise DataError(f"{what} is damaged: its points are a {type(c['points']).__name__}, not a list")
    c["points"] = [cbs_point(p, f"{what} (point {i})", c["seq_len"]) for i, p in enumerate(c["points"])]
    return c  # type: ignore[return-value]


def confirmations(value: Any) -> Confirmations | None:
    """The structured form of a decision's confirmations; files written before it held the text
    ``"1 of 2"``."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        seen, _, needed = value.partition(" of ")
        if seen.isdigit() and needed.isdigit():
            return {"seen": int(seen), "needed": int(needed)}
    raise DataError(f"a decision's confirmations {value!r} is neither 'N of M' nor {{seen, needed}}")


def probe_decision(record: Mapping, what: str = "decisions.jsonl") -> ProbeDecision:
    d = upgrade(record, DECISION_REQUIRED, DECISION_DEFAULTS, what)
    d["confirmations"] = confirmations(d["confirmations"])
    return d  # type: ignore[return-value]


def unconfirmed_raise(d: ProbeDecision) -> bool:
    """A decision that saw a raise its confirmation does not yet allow (the batch stayed)."""
    c = d.get("confirmations")
    return d["batch_after"] == d["batch_before"] and c is not None and c["seen"] < c["needed"]


def decision_measurement(d: ProbeDecision) -> int:
    """The measurement one probe point cost (its ``cost`` in ``decisions.jsonl``): its probes less what
    the run continued from, its noise scale and the lead dropped at its raise."""
    c = d.get("cost") or {}
    return (c.get("probe_tokens", 0) - c.get("probe_kept_tokens", 0) + c.get("gns_tokens", 0)
            + c.get("lead_dropped_tokens", 0))


def measurement_tokens(result: Mapping) -> int:
    """Every token a closed-loop run trained that its own result does not contain: the probes (less
    what the run continued from at its raises), the noise scale, the leads dropped at raises and the
    speculative segments not taken."""
    return (result["probe_tokens"] - result.get("probe_kept_tokens", 0) + result.get("gns_tokens", 0)
            + (result.get("main_run_leads") or {}).get("discarded_tokens", 0)
            + (result.get("speculation") or {}).get("discarded_tokens", 0))


def closed_loop_result(record: Mapping, what: str = "result.json") -> ClosedLoopResult:
    out = upgrade(record, CLOSED_LOOP_REQUIRED, CLOSED_LOOP_DEFAULTS, what)
    if "measurement_tokens" not in out:  # written before the dropped leads were counted in
        out["measurement_tokens"] = measurement_tokens(out)
        out["measurement_fraction"] = out["measurement_tokens"] / out["tokens"] if out["tokens"] else None
    return out  # type: ignore[return-value]


def read_run_result(path: str | Path) -> RunResult:
    """A run's ``result.json`` (a path to the file or to the run directory)."""
    p = Path(path)
    p = p / "result.json" if p.is_dir() else p
    return run_result(read_json(p), str(p))


def read_curve(path: str | Path) -> CBSCurve:
    """A sweep's ``cbs.json`` (a path to the file or to the sweep directory)."""
    p = Path(path)
    p = p / "cbs.json" if p.is_dir() else p
    return cbs_curve(read_json(p), str(p))


def read_decisions(path: str | Path) -> list[ProbeDecision]:
    """A closed-loop run's ``decisions.jsonl`` (a path to the file or to the run's directory)."""
    p = Path(path)
    p = p / "decisions.jsonl" if p.is_dir() else p
    return [probe_decision(d, str(p)) for d in read_jsonl(p)]


def read_closed_loop_result(path: str | Path) -> ClosedLoopResult:
    """A closed-loop run's ``result.json`` (a path to the file or to the run's directory)."""
    p = Path(path)
    p = p / "result.json" if p.is_dir() else p
    return closed_loop_result(read_json(p), str(p))


__all__ = ["RunResult", "CBSPoint", "CBSCurve", "SweepCost", "NoiseScaleAtPoint", "StopReading", "BranchOutcome",
           "Confirmations", "ProbeEvidence", "ProbeDecision", "ClosedLoopResult", "run_result", "cbs_point",
           "cbs_curve", "probe_decision", "closed_loop_result", "measurement_tokens", "decision_measurement", "confirmations", "unconfirmed_raise", "upgrade", "read_run_result",
           "read_curve", "read_decisions", "read_closed_loop_result"]
