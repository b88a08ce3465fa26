"""Deciding a sweep and writing its curve: each branch's numbers (:func:`branch_outcome`), each
point decided from them (:func:`decide_point`, the rules of :mod:`critbatch.analysis.decision`),
``cbs.json`` with the points, the sweep's cost and the censored fit (:func:`build_curve`), and the
files of a sweep directory (:func:`write_curve`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..analysis.curve import curve_csv, fit_or_none, noise_scale_points, point_record
from ..analysis.decision import decide, paired_eval_noise
from ..io import write_json_atomic, write_text_atomic
from ..records import BranchOutcome, CBSCurve, CBSPoint, cbs_curve, read_run_result
from ..report.plots import plot_cbs_curve, plot_loss_vs_batch
from ..train import EVAL_LOSSES_FILE
from ..train.early_stop import stopped_reading
from .config import DECIDE_BY
from .plan import BranchPoint, SweepPlan, new_search
from .spec import BranchSpec


def branch_outcome(branch_dir: Path) -> BranchOutcome:
    """A finished branch's numbers; ``eval_per_seq``: its per-sequence held-out losses (``None`` for
    a diverged branch or one trained before they were saved). A branch stopped early
    (:mod:`critbatch.train.early_stop`) has no losses (NaN) and ``stopped``: the reading that stopped it."""
    spec = BranchSpec.read(branch_dir)
    parent_steps = spec.parent_steps
    common = {"trained": "alone", "from_parent_tokens": spec.from_parent_tokens, "stopped": None}
    if not (branch_dir / "result.json").is_file() and (st := stopped_reading(branch_dir)) is not None:
        return {**common, "eval": math.nan, "train-ema": math.nan, "eval_se": None, "eval_per_seq": None,
                "diverged": False, "tokens": st["tokens"] - st["start_tokens"], "steps": st["steps"] + parent_steps,
                "wall_time_s": st["wall_time_s"], "eval_time_s": 0.0,
                "stopped": {k: st[k] for k in ("tokens", "gap_mean", "gap_se", "spans", "gap", "z")}}
    r = read_run_result(branch_dir)
    per_seq = None
    if not r["diverged"] and (branch_dir / EVAL_LOSSES_FILE).is_file():
        per_seq = np.load(branch_dir / EVAL_LOSSES_FILE, allow_pickle=False)
    return {**common, "eval": r["final_eval_loss"] if not r["diverged"] else float("inf"),
            "train-ema": r["final_train_loss"] if not r["diverged"] else float("inf"),
            "eval_se": r["final_eval_loss_se"], "eval_per_seq": per_seq,
            "diverged": bool(r["diverged"]), "tokens": r["tokens"] - r["start_tokens"],
            "steps": r["steps"] + parent_steps,  # the window's optimizer steps, those the parent took for it included
            "trained": r["trained"], "wall_time_s": r["wall_time_s"], "eval_time_s": r["eval_time_s"]}


def decide_point(plan: SweepPlan, ks: list[float], recs: list[list[BranchOutcome]]):
    """The decision at one branch point from its branches' records (``recs[i]``: k_i's replicates).
    Decided by eval loss, the held-out set's paired sampling error enters the decision."""
    cfg = plan.cfg
    losses = [[r[cfg.decide_by] for r in reps] for reps in recs]
    se = sd = None
    if cfg.decide_by == "eval":
        se, sd = paired_eval_noise([[r["eval_per_seq"] for r in reps] for reps in recs])
    return decide(ks, losses, plan.rule, cfg.eps, cfg.confidence, diff_se=se, diff_sd=sd)



def _decided_point(plan: SweepPlan, p: BranchPoint, by_k: dict[float, list[BranchOutcome]]) -> CBSPoint:
    cfg = plan.cfg
    ks = sorted(by_k)
    recs = [by_k[k] for k in ks]
    losses = {m: [[r[m] for r in reps] for reps in recs] for m in DECIDE_BY}
    extra = {"branch_tokens": sum(r["tokens"] for reps in recs for r in reps),
             "from_parent_tokens": [[r["from_parent_tokens"] for r in reps] for reps in recs],
             "branch_seconds": sum(r["wall_time_s"] for reps in recs for r in reps),
             "branch_eval_seconds": sum(r["eval_time_s"] for reps in recs for r in reps),
             "trained": [[r["trained"] for r in reps] for reps in recs],
             "branches": sum(len(v) for v in recs), "steps": [[r["steps"] for r in reps] for reps in recs],
             "eval_se": [[r["eval_se"] for r in reps] for reps in recs],
             "stopped_early": [[r["stopped"] for r in reps] for reps in recs],
             "early_stop_saved_tokens": sum(plan.window_tokens - r["from_parent_tokens"] - r["tokens"]
                                            for reps in recs for r in reps if r["stopped"])}
    if cfg.search == "adaptive":
        grid = new_search(plan, None).full_grid()
        extra["full_grid_branch_tokens"] = len(grid) * cfg.replicates * plan.window_tokens
        extra["full_grid_ks"] = len(grid)
    div = [[r["diverged"] for r in reps] for reps in recs]
    return point_record(p.tokens, p.ckpt.requested_tokens, p.base_batch_seqs, plan.seq_len, ks, losses, div,
                        cfg.decide_by, decide_point(plan, ks, recs), cfg.eps, extra)


def build_curve(plan: SweepPlan, results: dict[int, dict[float, list[BranchOutcome]]], wall_time_s: float) -> CBSCurve:
    """cbs.json's content: every point decided, described in sequences and tokens, with its cost."""
    cfg = plan.cfg
    points = [_decided_point(plan, p, results[p.tokens]) for p in plan.points]
    curve = {
        "sweep_id": plan.sweep_id, "run": str(plan.run_dir), "search": cfg.search, "decide_by": cfg.decide_by,
        "rule": plan.rule, "eps": cfg.eps, "confidence": cfg.confidence, "early_stop_gap": cfg.early_stop_gap,
        "lr_rule": plan.lr_rule,
        "adam_rule": plan.adam_rule, "cooldown_fraction": cfg.cooldown_fraction, "replicates": cfg.replicates,
        "window_tokens": plan.window_tokens, "window_tokens_requested": plan.window_tokens_requested,
        "eval_seqs": cfg.eval_seqs or plan.parent.eval_seqs, "seq_len": plan.seq_len, "notes": list(plan.notes),
        "points": points,
        "cost": {"branches": sum(p["branches"] for p in points), "branch_tokens": sum(p["branch_tokens"] for p in points),
                 "tokens_from_base": sum(x for p in points for reps in p["from_parent_tokens"] for x in reps),
                 "branch_seconds": sum(p["branch_seconds"] for p in points),
                 "branch_eval_seconds": sum(p.get("branch_eval_seconds", 0.0) for p in points), "wall_time_s": wall_time_s,
                 "stopped_early": sum(1 for p in points for reps in p["stopped_early"] for x in reps if x),
                 "early_stop_saved_tokens": sum(p["early_stop_saved_tokens"] for p in points),
                 "trained": _trained_counts(points)},
    }
    if cfg.search == "adaptive":
        curve["cost"]["full_grid_branch_tokens"] = sum(p["full_grid_branch_tokens"] for p in points)
    base = read_run_result(plan.run_dir)
    base_tokens = base["tokens"] - base["start_tokens"]
    curve["cost"]["base_tokens"] = base_tokens
    curve["cost"]["branch_tokens_over_base"] = curve["cost"]["branch_tokens"] / base_tokens if base_tokens else None
    curve["fit"] = fit_or_none(points)
    return cbs_curve(curve)  # as a reader of cbs.json sees it


def _trained_counts(points: list[CBSPoint]) -> dict[str, int]:
    """How the sweep's branches were trained: ``alone`` or ``stacked xN``, with their counts."""
    out: dict[str, int] = {}
    for p in points:
        for reps in p["trained"]:
            for t in reps:
                out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items()))


def write_curve(sweep_dir: Path, curve: CBSCurve) -> None:
    """cbs.json, cbs.csv and the two figures of a sweep."""
    write_json_atomic(sweep_dir / "cbs.json", curve)
    write_text_atomic(sweep_dir / "cbs.csv", curve_csv(curve))
    plot_cbs_curve(curve, sweep_dir / "cbs", noise_scale=noise_scale_points(curve) or None)
    plot_loss_vs_batch(curve, sweep_dir / "loss_vs_batch")
