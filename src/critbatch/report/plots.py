"""Plots as pure functions of result dicts; each writes ``<base>.png`` and ``<base>.svg``."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from ..analysis.fit import saturating_power_law
from ..io import write_bytes_atomic


def _fig():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # SVG text as text (not glyph paths): smaller files and no clashing glyph ids when several
    # figures are inlined into one HTML page; a fixed hash salt keeps the SVG output reproducible.
    matplotlib.rcParams["svg.fonttype"] = "none"
    matplotlib.rcParams["svg.hashsalt"] = "critbatch"
    return plt


def save(fig, base: Path) -> None:
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=110, bbox_inches="tight")
        write_bytes_atomic(Path(f"{base}.{ext}"), buf.getvalue())
    _fig().close(fig)


def plot_cbs_curve(curve: dict, base: Path, noise_scale: list[dict] | None = None,
                   decisions: list[dict] | None = None, run_end: int | None = None) -> None:
    """CBS intervals (tokens) against training tokens, log-log, with the fitted curve and, when
    given, the gradient noise scale (Merrill et al. Figures 2-3) and a closed-loop run's decisions
    (decisions.jsonl: ▲ the larger probed batch shown within ε and taken, ▼ not shown, so the
    batch stayed; the closed loop's batch as a step line, to ``run_end`` when given)."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    pts = [p for p in curve["points"] if p["tokens"] > 0]
    drawn = 0
    for p in pts:
        t = p["tokens"]
        lo = p["cbs_low_tokens"]
        hi = p["cbs_high_tokens"]
        if hi is None and lo <= 0:
            continue  # nothing shown to pass or to fail: no interval to draw
        drawn += 1
        if hi is None:
            ax.annotate("", xy=(t, lo * 3), xytext=(t, lo), arrowprops=dict(arrowstyle="->", color="C0"))
            ax.plot([t], [lo], "o", color="C0", mfc="white")
        else:
            bottom = lo if lo > 0 else hi / 4
            ax.plot([t, t], [bottom, hi], "-", color="C0", lw=3, alpha=0.6)
            if p["cbs_geomean_tokens"]:
                ax.plot([t], [p["cbs_geomean_tokens"]], "o", color="C0")
            if lo <= 0:
                ax.annotate("", xy=(t, hi / 4), xytext=(t, hi), arrowprops=dict(arrowstyle="->", color="C0"))
    fit = curve.get("fit")
    if fit and pts:
        ts = np.geomspace(min(p["tokens"] for p in pts) / 2, max(p["tokens"] for p in pts) * 2, 200)
        ax.plot(ts, saturating_power_law(ts, fit["b_max"], fit["t_s"], fit["c"]), "--", color="C1",
                label=f"fit: plateau {fit['b_max']:.3g} tok, c={fit['c']:.2f}")
    if noise_scale:
        ns = [g for g in noise_scale if g.get("b_simple_tokens") and g["tokens"] > 0]
        if ns:
            ax.errorbar([g["tokens"] for g in ns], [g["b_simple_tokens"] for g in ns],
                        yerr=[[g["b_simple_tokens"] - g["ci_low_tokens"] for g in ns],
                              [g["ci_high_tokens"] - g["b_simple_tokens"] for g in ns]],
                        fmt="s", color="C2", label="gradient noise scale B_simple")
    ax.plot([], [], "-", color="C0", lw=3, alpha=0.6, label="local CBS interval")
    if decisions:
        T = curve["seq_len"]
        for d in decisions:
            probed = max(d["probe"]["batch_seqs"]) if d.get("probe") else 2 * d["batch_before"]
            up = d["batch_after"] > d["batch_before"]
            ax.plot([d["tokens"]], [probed * T], "^" if up else "v", color="C3", ms=7, mfc="C3" if up else "none")
        xs, ys = [decisions[0]["tokens"] / 3, decisions[0]["tokens"]], [decisions[0]["batch_before"] * T] * 2
        for i, d in enumerate(decisions):
            nxt = decisions[i + 1]["tokens"] if i + 1 < len(decisions) else (run_end or d["tokens"] * 2)
            xs += [d["tokens"], nxt]
            ys += [d["batch_after"] * T] * 2
        ax.plot(xs, ys, "-", color="C3", lw=1.2, alpha=0.8,
                label="closed loop: batch (▲ raised, ▽ probe not shown within ε)")
        drawn += len(decisions)
    if not drawn and not fit:
        ax.text(0.5, 0.5, "no branch point bounds the CBS", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("critical batch size (tokens)")
    ax.set_title(f"Local critical batch size (decided by {curve['decide_by']}, rule {curve['rule']})")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    save(fig, base)


def plot_loss_vs_batch(curve: dict, base: Path) -> None:
    """Final branch loss against batch size at each branch point, the CBS marked (Figure 1)."""
    plt = _fig()
    pts = curve["points"]
    n = len(pts)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    metric = curve["decide_by"]
    for ax, p in zip(axes.flat, pts):
        bs = p["batch_seqs"]
        means = p["mean_loss"][metric]
        finite = [(b, m) for b, m in zip(bs, means) if m is not None and math.isfinite(m)]
        for b, reps in zip(bs, p["losses"][metric]):
            ys = [y for y in reps if y is not None and math.isfinite(y)]
            ax.plot([b] * len(ys), ys, ".", color="0.6", ms=4)
        if finite:
            ax.plot([b for b, _ in finite], [m for _, m in finite], "o-", color="C0")
        status = p.get("status") or ["pass" if ok else "fail" for ok in p["passes"]]
        for b, m, st in zip(bs, means, status):
            if st != "pass" and m is not None and math.isfinite(m):
                ax.plot([b], [m], "x" if st == "fail" else "d", color="C3" if st == "fail" else "C4", ms=8,
                        mfc="none" if st != "fail" else None)
        stopped = [b for b, reps in zip(bs, p.get("stopped_early") or []) if any(reps)]
        if stopped:  # no loss at the window's end: marked at the panel's top edge
            ax.plot(stopped, [0.97] * len(stopped), "^", color="C3", ms=7, transform=ax.get_xaxis_transform(),
                    gid="stopped-early")
        if p["k_star"] is not None:
            ax.axvline(p["k_star"] * p["base_batch_seqs"], color="C1", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{p['tokens']:,} tokens", fontsize=9)
        ax.set_xlabel("batch (sequences)")
        ax.set_ylabel(f"{metric} loss")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    stops = any(any(reps) for p in pts for reps in p.get("stopped_early") or [])
    fig.suptitle("Branch loss vs batch size (x: shown worse than a smaller batch; ◇: undetermined; "
                 + ("▲: stopped early, worse; " if stops else "") + "dashed: CBS)", fontsize=10)
    fig.tight_layout()
    save(fig, base)


def _smooth(xs: list[float], n: int) -> list[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x)
        if len(acc) > n:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_comparison(metrics: dict[str, list[dict]], comp: dict, base: Path) -> None:
    """Training loss (moving average) and eval loss against tokens for warmup and both controls
    (Merrill et al. Figure 4), batch changes and the anneal start marked."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    colors = {"warmup": "C0", "small": "C1", "large": "C2", "closed-loop": "C3"}
    shown: list[float] = []
    total = comp["pretrain_tokens"] + max((comp.get("anneal_tokens_per_run") or {}).values(),
                                          default=comp.get("anneal_tokens", 0))
    for name, recs in metrics.items():
        st = [r for r in recs if r.get("train/loss") is not None]
        if not st:
            continue
        n = max(1, len(st) // 40)
        ys = _smooth([r["train/loss"] for r in st], n)
        xs = [r["tokens"] for r in st]
        ax.plot(xs, ys, color=colors.get(name), lw=1.2, label=f"{name} (train, moving avg)")
        ev = [r for r in recs if r.get("eval/loss") is not None and r["tokens"] > 0]
        ax.plot([r["tokens"] for r in ev], [r["eval/loss"] for r in ev], "o", ms=3, color=colors.get(name))
        shown += [y for x, y in zip(xs, ys) if x > 0.15 * total] + [r["eval/loss"] for r in ev if r["tokens"] > 0.15 * total]
    for name in ("warmup", "closed-loop"):
        for s, _ in (comp["runs"].get(name) or {}).get("batch_schedule", [])[1:]:
            ax.axvline(s, color=colors[name], ls="--", lw=0.6, alpha=0.6)
    if shown:
        lo, hi = min(shown), max(shown)
        pad = 0.08 * (hi - lo) + 0.02
        ax.set_ylim(lo - pad, hi + pad)
    if total > comp["pretrain_tokens"]:
        N = comp["pretrain_tokens"]
        ax.axvline(N, color="0.5", ls=":", lw=1)
        ax.text(N, ax.get_ylim()[1], " anneal", va="top", fontsize=8, color="0.4")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token); dots: held-out eval")
    ax.set_title("Batch-size warmup against small- and large-batch controls"
                 + (" (and the closed loop)" if "closed-loop" in comp["runs"] else ""))
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.2)
    save(fig, base)


def plot_schedule(curve: dict, schedule: dict, base: Path, total_tokens: int | None = None) -> None:
    """The derived batch schedule (a step function) over the CBS curve it came from, in sequences."""
    plt = _fig()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    T = curve["seq_len"]
    pts = [p for p in curve["points"] if p["tokens"] > 0]
    for p in pts:
        lo, hi = p["cbs_low_seqs"], p["cbs_high_seqs"]
        bottom = lo if lo > 0 else (hi or 1) / 4
        top = hi if hi is not None else lo * 3
        ax.plot([p["tokens"]] * 2, [bottom, top], "-", color="C0", lw=3, alpha=0.5)
    ax.plot([], [], "-", color="C0", lw=3, alpha=0.5, label="measured CBS interval")
    end = total_tokens or max(p["tokens"] for p in pts) * 2
    phases = schedule["phases"]
    xs, ys = [], []
    start = max(min(p["tokens"] for p in pts) / 4, 1)
    for i, ph in enumerate(phases):
        a = max(ph["start_tokens"], start)
        b = phases[i + 1]["start_tokens"] if i + 1 < len(phases) else end
        if b <= a:
            continue
        xs += [a, b]
        ys += [ph["batch_seqs"]] * 2
    ax.plot(xs, ys, "-", color="C3", lw=2, label="derived batch (warmup)")
    fit = curve.get("fit")
    if fit:
        ts = np.geomspace(start, end, 200)
        ax.plot(ts, saturating_power_law(ts, fit["b_max"], fit["t_s"], fit["c"]) / T, "--", color="C1", label="CBS fit")
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    lows = [ph["batch_seqs"] for ph in phases] + [p["cbs_low_seqs"] for p in pts if p["cbs_low_seqs"] > 0]
    highs = [ph["batch_seqs"] for ph in phases] + [p["cbs_high_seqs"] or p["cbs_low_seqs"] * 3 for p in pts]
    ax.set_ylim(min(lows) / 4, max(highs) * 2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("batch (sequences)")
    ax.set_title("Batch-size warmup derived from the CBS curve")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    save(fig, base)
