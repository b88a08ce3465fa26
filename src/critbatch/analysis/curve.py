"""The CBS curve of a sweep: per branch point the losses, both readings, the interval; over points
a censored fit; the ``cbs.csv`` table. Pure functions of loss tables (the sweep writes the files)."""

from __future__ import annotations

import csv
import io
import math

from ..errors import ConfigError
from .decision import Decision
from .fit import fit_cbs_curve


EVAL_SE_FRACTION = 4
"""The held-out set's paired sampling error counts as "well below eps" at eps / 4 or less."""


def _geomean(a: float, b: float | None) -> float | None:
    return math.sqrt(a * b) if (b is not None and a > 0) else None


def point_record(tokens: int, requested: int, base_batch_seqs: int, seq_len: int, ks: list[float],
                 losses: dict[str, list[list[float]]], diverged: list[list[bool]], decide_by: str, dec: Decision,
                 eps: float, extra: dict | None = None) -> dict:
    """One decided branch point, described in sequences and tokens."""
    B, T = base_batch_seqs, seq_len
    lo, hi = dec.interval(B)
    clo, chi = dec.interval(B, conservative=True)
    lo_eff = 0.0 if (dec.below_grid or dec.undetermined_reason) else lo  # only the reference k passed, vacuously: the CBS may lie below it
    needed = [n for n in dec.replicates_needed if n]
    se_tab = dec.details.get("diff_se")
    max_pair_se = max((max(r) for r in se_tab), default=0.0) if se_tab else None
    if dec.undetermined_reason:
        hi = None
    rec = {
        "tokens": tokens, "requested_tokens": requested, "base_batch_seqs": B, "seq_len": T,
        "ks": ks, "batch_seqs": [k * B for k in ks], "decide_by": decide_by, "rule": dec.rule,
        "losses": losses, "mean_loss": {m: [sum(v) / len(v) for v in vals] for m, vals in losses.items()},
        "diverged": diverged, "status": dec.status, "passes": dec.passes,
        "undetermined_ks": dec.undetermined, "settled": dec.settled, "undetermined_reason": dec.undetermined_reason,
        "replicates_needed": max(needed) if needed else None,
        "eval_seqs_needed": max((n for n in dec.details.get("eval_seqs_needed", []) if n), default=None),
        "max_paired_eval_se": max_pair_se,
        "eval_noise_ok": None if max_pair_se is None else max_pair_se <= eps / EVAL_SE_FRACTION,
        "k_star": dec.k_star, "k_next": dec.k_next,
        "cbs_low_seqs": lo_eff, "cbs_high_seqs": hi,
        "cbs_low_tokens": lo_eff * T, "cbs_high_tokens": hi * T if hi is not None else None,
        "cbs_geomean_seqs": _geomean(lo, hi) if not dec.below_grid else None,
        "cbs_geomean_tokens": (_geomean(lo, hi) * T) if (hi is not None and not dec.below_grid) else None,
        "conservative_k_star": dec.k_star_conservative,
        "conservative_low_seqs": clo if dec.k_star_conservative != ks[0] else 0.0, "conservative_high_seqs": chi,
        "readings_disagree": dec.readings_disagree, "bounded_above": dec.bounded_above, "below_grid": dec.below_grid,
        "decision": dec.to_dict(),
    }
    if extra:
        rec.update(extra)
    return rec


def fit_or_none(points: list[dict]) -> dict | None:
    # points after 0 tokens whose interval says something (not [0, inf))
    usable = [p for p in points if p["tokens"] > 0 and (p["cbs_low_tokens"] > 0 or p["cbs_high_tokens"] is not None)]
    if len(usable) < 2:
        return None
    try:
        f = fit_cbs_curve([p["tokens"] for p in usable], [p["cbs_low_tokens"] for p in usable],
                          [p["cbs_high_tokens"] for p in usable])
    except ConfigError:
        return None
    d = f.to_dict()
    d["unit"] = "tokens"
    d["formula"] = "B(t) = b_max * u / (1 + u), u = (t / t_s)^c"
    return d


CSV_FIELDS = ["tokens", "requested_tokens", "base_batch_seqs", "cbs_low_seqs", "cbs_high_seqs", "cbs_low_tokens",
              "cbs_high_tokens", "cbs_geomean_seqs", "cbs_geomean_tokens", "conservative_low_seqs",
              "conservative_high_seqs", "readings_disagree", "bounded_above", "below_grid", "decide_by", "rule",
              "b_simple_seqs", "b_simple_ci_low_seqs", "b_simple_ci_high_seqs"]


def curve_csv(curve: dict) -> str:
    ks = sorted({k for p in curve["points"] for k in p["ks"]})
    metric = curve["decide_by"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS + [f"loss_k{k:g}" for k in ks])
    for p in curve["points"]:
        means = dict(zip(p["ks"], p["mean_loss"][metric]))
        ns = p.get("noise_scale") or {}
        row = {**p, "b_simple_seqs": ns.get("b_simple_seqs"), "b_simple_ci_low_seqs": ns.get("ci_low_seqs"),
               "b_simple_ci_high_seqs": ns.get("ci_high_seqs")}
        w.writerow([("" if row.get(f) is None else row[f]) for f in CSV_FIELDS] +
                   [("" if k not in means else means[k]) for k in ks])
    return buf.getvalue()


def attach_noise_scale(curve: dict, gns: dict) -> dict:
    """Put the noise scale measured at the same checkpoints beside each point's CBS."""
    by_tokens = {g["tokens"]: g for g in gns.get("points", [])}
    for p in curve["points"]:
        g = by_tokens.get(p["tokens"])
        p["noise_scale"] = None if g is None else {
            k: g[k] for k in ("b_simple_seqs", "b_simple_tokens", "ci_low_seqs", "ci_high_seqs", "ci_low_tokens",
                              "ci_high_tokens", "grad_sq", "trace_cov", "n_batches")}
    curve["noise_scale_settings"] = gns.get("settings")
    return curve


def noise_scale_points(curve: dict) -> list[dict]:
    return [{"tokens": p["tokens"], **p["noise_scale"]} for p in curve["points"] if p.get("noise_scale")]
