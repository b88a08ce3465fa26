"""The comparison of a warmup schedule with its controls, as numbers: the loss gap of each run to
the small-batch control over seeds, and the table (Merrill et al.'s Table 1 plus the gaps). Pure
functions of the rows that ``critbatch compare`` collects."""

from __future__ import annotations

import math

import numpy as np

RUNS = ("warmup", "small", "large")
CLOSED_LOOP = "closed-loop"
"""The optional fourth run: a closed-loop run's schedule (``train --auto-batch``) replayed."""


def run_names(c: dict) -> list[str]:
    """The runs of a comparison, in table order: the warmup and its controls, then the other schedules
    compared against the same controls (the closed loop's, and any given by name), as written."""
    return [n for n in RUNS if n in c["runs"]] + [n for n in c["runs"] if n not in RUNS]
GAPS = ("final_eval_loss", "anneal_eval_loss", "final_train_loss", "anneal_train_loss")


def gap_stats(per_seed: dict[int, dict], name: str, key: str, paired_se: dict) -> dict | None:
    gaps = [rows[name][key] - rows["small"][key] for rows in per_seed.values()
            if rows[name].get(key) is not None and rows["small"].get(key) is not None]
    if not gaps:
        return None
    n = len(gaps)
    mean = sum(gaps) / n
    se = (np.std(gaps, ddof=1) / math.sqrt(n)) if n > 1 else None
    out = {"mean": mean, "se": None if se is None else float(se), "n_seeds": n, "per_seed": gaps}
    pse = [paired_se.get((s, name, key)) for s in per_seed]
    if all(v is not None for v in pse) and pse:
        # the held-out sample's share of the uncertainty (paired, per seed; averaged over seeds)
        out["eval_sample_se"] = float(math.sqrt(sum(v * v for v in pse)) / len(pse))
    return out


def pm(g: dict | None) -> str:
    if not g:
        return "—"
    if g.get("se") is not None:
        return f"{g['mean']:+.4f} ± {g['se']:.4f}"
    if g.get("eval_sample_se") is not None:
        return f"{g['mean']:+.4f} (± {g['eval_sample_se']:.4f} held-out sample)"
    return f"{g['mean']:+.4f}"


def table(c: dict) -> tuple[list[str], list[list[str]], str]:
    """The comparison as (headers, rows, footnote): Merrill et al.'s Table 1 plus the gaps."""
    annealed = any((c.get("anneal_tokens_per_run") or {}).values()) or c.get("anneal_tokens")
    S = len(c.get("seeds", [0]))
    head = ["run", "batch (sequences)", "train loss", "eval loss", "eval gap to small"]
    if annealed:
        head += ["eval after anneal", "gap after anneal"]
    head += ["optimizer steps", "steps saved", "wall time"]
    rows = []
    for name in run_names(c):
        r = c["runs"][name]
        gaps = r.get("gap_to_small") or {}
        sched = " → ".join(f"{b}" + (f" at {s:,}" if s else "") for s, b in r["batch_schedule"])
        if r.get("diverged"):
            f = lambda v: "diverged" if v is None else f"{v:.4f}"  # noqa: E731
        else:
            f = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
        cells = [name, sched, f(r["final_train_loss"]), f(r["final_eval_loss"]),
                 pm(gaps.get("final_eval_loss")) if name != "small" else "0"]
        if annealed:
            cells += [f(r.get("anneal_eval_loss")), pm(gaps.get("anneal_eval_loss")) if name != "small" else "0"]
        cells += [f"{r['optimizer_steps']:,.0f}", f"{r['steps_saved_pct']:.0f}%", f"{r['wall_time_s']:.0f}s"]
        rows.append(cells)
    anneal = ""
    if c.get("anneal_steps"):
        anneal = f" + an anneal of {c['anneal_steps']:,} optimizer steps at each run's final batch"
    elif c.get("anneal_tokens"):
        anneal = f" + {c['anneal_tokens']:,} anneal tokens"
    note = (f"Train loss: {c['final_train_loss_definition']}. Steps saved: each run's optimizer steps, the anneal's "
            f"included, against the small-batch control's, as in Merrill et al.'s Table 1; a gap is the run's "
            f"held-out loss minus the small-batch control's on the same held-out sample. "
            f"Tokens: {c['pretrain_tokens']:,} pretraining" + anneal
            + f"; sequences of {c['seq_len']} tokens; LR rule {c['rule']}, Adam rule {c.get('adam_rule', 'none')}. "
            + (f"Mean over {S} seeds (init and data order); gaps ± their standard error over seeds."
               if S > 1 else "One seed: the ± is the held-out sample's paired sampling error only, not the run-to-run "
                             "noise (use several seeds)."))
    if c.get("forks"):  # critbatch.warmup.forks
        note += (" Runs that took another run's steps started from its checkpoint there (trained once; their "
                 "optimizer steps count those steps, their wall time does not): "
                 + "; ".join(f"{k} at {f['tokens']:,} tokens" for k, f in c["forks"].items()) + ".")
    return head, rows, note


def markdown_table(c: dict) -> str:
    head, rows, note = table(c)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + ["", note]) + "\n"
