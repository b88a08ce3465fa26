"""One self-contained HTML report (inline SVG, no network), plus ``summary.json`` and ``summary.md``,
rebuilt from a study directory alone: ``critbatch report DIR``.

``DIR`` is a demo directory (``demo.json``: base run, sweep, noise scale, schedule, comparison) or a
plain run directory (its newest sweep and ``gns.json`` when present). Every number in the report is
read from the files the stages wrote; the figures are redrawn from them.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import re
import time
from pathlib import Path

from ..analysis.comparison import markdown_table, pm, run_names, table
from ..analysis.curve import noise_scale_points
from ..analysis.describe import describe_sweep_cost, interval_text, measurement_parts, skipped_probes
from ..analysis.schedule import advise_start
from ..errors import ConfigError, DataError
from ..io import check_output, read_json, read_jsonl, write_json_atomic, write_text_atomic
from ..records import read_closed_loop_result, read_curve, read_decisions, read_run_result, unconfirmed_raise
from ..units import fmt_count
from .plots import plot_cbs_curve, plot_comparison, plot_loss_vs_batch, plot_schedule

FIGURES = ("loss_vs_batch", "cbs_curve", "schedule", "comparison")
CLOSED_LOOP_CAPTION = " Red: the closed loop's batch, with its probes (▲: 2B shown within ε and taken; ▽: not shown)."


def _layout(d: Path) -> dict:
    """Where each artifact of a study lives."""
    if (d / "demo.json").is_file():
        demo = read_json(d / "demo.json")
        run = d / "base"
        sweep = d / demo["artifacts"]["sweep_dir"] if demo.get("artifacts", {}).get("sweep_dir") else None
        return {"kind": "demo", "demo": demo, "run": run, "sweep": sweep,
                "schedule": d / "schedule.json" if (d / "schedule.json").is_file() else None,
                "compare": d / "compare" if (d / "compare" / "comparison.json").is_file() else None,
                "autobatch": d / "autobatch" if (d / "autobatch" / "result.json").is_file() else None}
    if (d / "config.json").is_file():
        sweeps = sorted((d / "sweeps").glob("*/cbs.json"), key=lambda p: p.stat().st_mtime)
        return {"kind": "run", "demo": None, "run": d, "sweep": sweeps[-1].parent if sweeps else None,
                "schedule": None, "compare": None, "autobatch": None}
    raise DataError(f"{d} is neither a demo directory (demo.json) nor a run directory (config.json)")


def _doublings(points: list[dict]) -> dict:
    """CBS growth between the first and the last branch point, in doublings."""
    pts = [p for p in points if p["tokens"] > 0]
    if len(pts) < 2:
        return {"first_tokens": None, "last_tokens": None, "geomean": None, "certain": None}
    a, b = pts[0], pts[-1]

    def mid(p):
        if p["cbs_high_seqs"] is None:
            return p["cbs_low_seqs"]
        if p["cbs_low_seqs"] <= 0:
            return p["cbs_high_seqs"] / 2
        return math.sqrt(p["cbs_low_seqs"] * p["cbs_high_seqs"])

    certain = None
    if a["cbs_high_seqs"] is not None and b["cbs_low_seqs"] > 0:
        certain = math.log2(b["cbs_low_seqs"] / a["cbs_high_seqs"])  # the least growth the intervals allow
    return {"first_tokens": a["tokens"], "last_tokens": b["tokens"], "geomean": math.log2(mid(b) / mid(a)),
            "certain": certain}


def summarize(d: Path) -> dict:
    lay = _layout(d)
    run = lay["run"]
    cfg = read_json(run / "config.json")
    res = read_run_result(run) if (run / "result.json").is_file() else {}
    env = read_json(run / "env.json") if (run / "env.json").is_file() else {}
    s: dict = {"kind": lay["kind"], "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "base": {"config": cfg, "result": res}, "versions": env}
    if lay["sweep"] is not None:
        curve = read_curve(lay["sweep"])
        s["curve"] = curve
        s["points"] = [{
            "tokens": p["tokens"], "base_batch_seqs": p["base_batch_seqs"], "probed_k": p["ks"],
            "cbs_low_seqs": p["cbs_low_seqs"], "cbs_high_seqs": p["cbs_high_seqs"],
            "cbs_low_tokens": p["cbs_low_tokens"], "cbs_high_tokens": p["cbs_high_tokens"],
            "readings_disagree": p["readings_disagree"], "bounded_above": p["bounded_above"],
            "below_grid": p["below_grid"], "interval": interval_text(p),
            "settled": p.get("settled", True), "undetermined_ks": p.get("undetermined_ks", []),
            "undetermined_reason": p.get("undetermined_reason"),
            "replicates_needed": p.get("replicates_needed"), "eval_seqs_needed": p.get("eval_seqs_needed"),
            "max_paired_eval_se": p.get("max_paired_eval_se"), "eval_noise_ok": p.get("eval_noise_ok"),
            "noise_scale_seqs": (p.get("noise_scale") or {}).get("b_simple_seqs"),
            "noise_scale_ci_seqs": [(p.get("noise_scale") or {}).get("ci_low_seqs"),
                                    (p.get("noise_scale") or {}).get("ci_high_seqs")],
        } for p in curve["points"]]
        s["growth_doublings"] = _doublings(curve["points"])
        b0 = cfg["batch_schedule"][0][1] if cfg.get("batch_schedule") else cfg["batch_seqs"]
        try:
            adv = advise_start(curve, int(b0), until_tokens=int(cfg["total_tokens"]))
            s["start_advice"] = {**dataclasses.asdict(adv), "message": adv.message()}
        except ConfigError:  # a curve without a point after 0 tokens says nothing about the start
            pass
        s["fit"] = curve.get("fit")
        s["sweep_cost"] = curve["cost"]
    if lay["schedule"] is not None:
        s["schedule"] = read_json(lay["schedule"])
    if lay["compare"] is not None:
        s["comparison"] = read_json(lay["compare"] / "comparison.json")
    if lay.get("autobatch") is not None:
        s["closed_loop"] = read_closed_loop_result(lay["autobatch"])
        s["closed_loop"]["decisions"] = read_decisions(lay["autobatch"])
    if lay["demo"] is not None:
        # the report's own cost cannot be in the report it is writing
        s["stages"] = {k: v for k, v in lay["demo"]["stages"].items() if k != "report"}
        s["demo_config"] = lay["demo"]["config"]
        s["total_seconds"] = sum(v["seconds"] for v in s["stages"].values() if v.get("done"))
        s["wall_seconds"] = lay["demo"].get("wall_seconds")  # less than the total where stages overlapped
        if lay["demo"].get("artifacts", {}).get("compare_skipped"):
            s["compare_skipped"] = lay["demo"]["artifacts"]["compare_skipped"]
    s["conclusions"] = conclusions(s)
    return s


def _cbs_conclusions(s: dict, pts: list[dict]) -> list[str]:
    out = []
    g = s.get("growth_doublings") or {}
    if pts:
        T = s["curve"]["seq_len"]
        first, last = pts[0], pts[-1]
        txt = (f"The local critical batch size, decided by the {s['curve']['decide_by']} loss with the "
               f"{s['curve']['rule']} rule, went from {first['interval']} sequences at {fmt_count(first['tokens'])} tokens "
               f"to {last['interval']} sequences at {fmt_count(last['tokens'])} tokens")
        if g.get("geomean") is not None:
            txt += f": about {g['geomean']:.1f} doublings between the interval middles"
            if g.get("certain") is not None:
                txt += (f", and at least {max(g['certain'], 0):.0f} that the intervals themselves guarantee"
                        if g["certain"] >= 1 else "; the intervals alone do not guarantee a doubling")
        out.append(txt + f" (sequences of {T} tokens).")
        nonmono = [(a, b) for a, b in zip(pts, pts[1:]) if b["cbs_high_seqs"] is not None and a["cbs_low_seqs"] > 0
                   and b["cbs_high_seqs"] <= a["cbs_low_seqs"]]
        if nonmono:
            out.append(f"The curve is not monotone: at {fmt_count(nonmono[0][1]['tokens'])} tokens the interval lies below "
                       f"the previous one — at this scale branch noise can move a decision by a grid step.")
        if any(p["readings_disagree"] for p in pts):
            out.append("At some points the paper's reading and the conservative reading disagree (a larger batch "
                       "passed after a smaller one failed); the report shows the paper's.")
        if any(not p["bounded_above"] for p in pts if len(p["probed_k"]) > 1):
            out.append("Where no probed batch was shown to fail, the CBS is only bounded below.")
        for p in pts:
            if p.get("undetermined_reason"):
                out.append(f"At {fmt_count(p['tokens'])} tokens the CBS is undetermined: {p['undetermined_reason']}.")
        unsettled = [p for p in pts if p.get("settled") is False and not p.get("undetermined_reason")]
        if unsettled:
            need = [p["replicates_needed"] for p in unsettled if p.get("replicates_needed")]
            out.append(f"Not settled at {', '.join(fmt_count(p['tokens']) for p in unsettled)} tokens: some batches are "
                       f"undetermined — the data show them neither within ε of the smaller batches nor worse — so the "
                       f"interval is widened to the first batch shown to fail"
                       + (f"; about {max(need)} replicates per batch would settle them." if need else
                          "; more replicates (--replicates, rule noninf) or held-out sequences would settle them."))
        noisy = [p for p in pts if p.get("eval_noise_ok") is False]
        if noisy:
            worst = max(p["max_paired_eval_se"] for p in noisy)
            out.append(f"The held-out sample's paired sampling error of a loss difference reaches {worst:.4f} nats, not "
                       f"well below ε = {s['curve']['eps']}: raise --eval-seqs.")
        elif any(p.get("max_paired_eval_se") is not None for p in pts):
            worst = max(p["max_paired_eval_se"] for p in pts if p.get("max_paired_eval_se") is not None)
            out.append(f"The held-out sample's paired sampling error of a loss difference is at most {worst:.4f} nats "
                       f"(ε = {s['curve']['eps']}); the data-window noise of a single replicate is not measured"
                       + ("" if s["curve"].get("replicates", 1) > 1 else " (one replicate per batch)") + ".")
    return out


def _noise_scale_conclusion(s: dict, pts: list[dict]) -> list[str]:
    ns = [(p["noise_scale_seqs"], p) for p in pts if p["noise_scale_seqs"] is not None]
    if ns:
        ratios = []
        for b, p in ns:
            mid = (math.sqrt(p["cbs_low_seqs"] * p["cbs_high_seqs"]) if (p["cbs_high_seqs"] and p["cbs_low_seqs"] > 0)
                   else None)
            if mid:
                ratios.append(mid / b if b > 0 else float("inf"))
        if ratios:
            return [f"The gradient noise scale B_simple ran from {ns[0][0]:.3g} to {ns[-1][0]:.3g} sequences; "
                       f"the measured CBS (interval middle) was {min(ratios):.2g}–{max(ratios):.2g}× the noise "
                       f"scale. Merrill et al. report the noise scale missing the CBS by orders of magnitude for "
                       f"OLMo; here, for a {fmt_count(s['base']['result'].get('params', 0))}-parameter model far from "
                       f"convergence, they are within that factor."]
    return []


def conclusions(s: dict) -> list[str]:
    """Plain sentences on what the numbers do and do not show."""
    pts = s.get("points") or []
    out = _cbs_conclusions(s, pts) + _noise_scale_conclusion(s, pts)
    if s.get("start_advice"):
        m = s["start_advice"]["message"]
        out.append(m[0].upper() + m[1:])
    if s.get("fit"):
        f = s["fit"]
        out.append(f"The censored fit B(t) = B_max·u/(1+u), u = (t/t_s)^c gives c = {f['c']:.2f} and a plateau of "
                   f"{fmt_count(f['b_max'])} tokens" + ("" if f["plateau_in_range"] else
                   " — extrapolated: the measured points do not reach it") + ".")
    if (sc := s.get("sweep_cost")) and sc.get("branch_tokens_over_base") is not None:
        out.append(f"The curve cost {describe_sweep_cost(sc)}.")
    return out + _comparison_conclusions(s)


def _closed_loop_conclusions(s: dict, c: dict | None) -> list[str]:
    cl = s.get("closed_loop")
    if not cl:
        return []
    if cl.get("diverged"):
        return [f"The closed-loop run diverged: {cl.get('diverged_reason')}."]
    sched = " → ".join(f"{b}" + (f" at {fmt_count(t)} tokens" if t else "") for t, b in cl["schedule"])
    took = f"took the batch (sequences) {sched}, {cl['steps_saved_pct']:.0f}% fewer optimizer steps than the small batch"
    if not cl["raises"]:
        once = [d for d in cl.get("decisions", []) if unconfirmed_raise(d)]
        took = (f"kept the batch at {cl['start_batch_seqs']} sequences: no raise was confirmed"
                + (f" (2B passed at {', '.join(fmt_count(d['tokens']) for d in once)} tokens, never at two "
                   f"consecutive points)" if once else ""))
    txt = (f"The closed loop (one run probing its own CBS at {cl['probe_points']} points, "
           f"{cl['act_on']} trigger) {took}; its measurement cost {fmt_count(cl['measurement_tokens'])} tokens "
           f"({100 * (cl['measurement_fraction'] or 0):.0f}% of its own): {measurement_parts(cl)}"
           + (f"; {skipped_probes(cl)}" if skipped_probes(cl) else ""))
    r = (c or {}).get("runs", {}).get("closed-loop")
    if r and not r.get("diverged"):
        g = r.get("gap_to_small") or {}
        txt += (f"; replayed beside the controls it reached {r['final_eval_loss']:.4f} (gap "
                f"{pm(g.get('final_eval_loss'))})")
        if r.get("anneal_eval_loss") is not None:
            txt += f" and {r['anneal_eval_loss']:.4f} after the anneal (gap {pm(g.get('anneal_eval_loss'))})"
    out = [txt + "."]
    ag = cl.get("agreement") or {}
    said = [f"the {'noise-scale' if n == 'gns' else 'norm-test'} trigger agreed at {v['agree']} of {v['points']}"
            for n, v in ag.items() if v["points"]]
    if said:
        out.append("Against the branch probe's verdicts, " + " and ".join(said) + " probe points.")
    return out


def _warmup_sentence(w: dict, sm: dict, lg: dict, gw: dict, gl: dict, seeds: str) -> str:
    return (f"Batch-size warmup reached a held-out loss of {w['final_eval_loss']:.4f} against "
            f"{sm['final_eval_loss']:.4f} for the small-batch control (gap {pm(gw.get('final_eval_loss'))} nats, "
            f"{seeds}) with {w['steps_saved_pct']:.0f}% fewer optimizer steps; the large-batch control at the "
            f"final batch from the start reached {lg['final_eval_loss']:.4f} (gap "
            f"{pm(gl.get('final_eval_loss'))}, {lg['steps_saved_pct']:.0f}% fewer steps).")


def _no_warmup(s: dict) -> list[str]:
    """Why a derived schedule stays at the start batch, when its notes say so."""
    no_warmup = [n for n in (s.get("schedule") or {}).get("notes", []) if n.startswith("no warmup")]
    if not no_warmup:
        return []
    return [f"The derived schedule stays at the start batch ({no_warmup[0]}): a doubling the annealed probes do not "
            "show within ε is not taken. Plain probes (--cooldown-fraction 0) read the loss at full LR, where a larger "
            "batch looks no worse, and a warmup derived from them trailed the small-batch control by 0.02–0.08 nats "
            "(docs/LOG.md, the warmup study)."]


def _other_schedules(c: dict) -> list[str]:
    """A sentence for each schedule compared beside the warmup (``compare --schedules``)."""
    out = []
    for name in run_names(c):
        if name in ("warmup", "small", "large", "closed-loop"):
            continue
        r = c["runs"][name]
        if r.get("diverged"):
            out.append(f"The {name} schedule diverged (seed {', '.join(str(x) for x in r['diverged_seeds'])}).")
            continue
        g = r.get("gap_to_small") or {}
        sched = " → ".join(f"{b}" + (f" at {fmt_count(t)}" if t else "") for t, b in r["batch_schedule"])
        txt = (f"The {name} schedule ({sched}) reached {r['final_eval_loss']:.4f} (gap {pm(g.get('final_eval_loss'))})")
        if r.get("anneal_eval_loss") is not None:
            txt += f" and {r['anneal_eval_loss']:.4f} after the anneal (gap {pm(g.get('anneal_eval_loss'))})"
        out.append(txt + f", with {r['steps_saved_pct']:.0f}% fewer optimizer steps than the small batch.")
    return out


def _comparison_conclusions(s: dict) -> list[str]:
    out = []
    c = s.get("comparison")
    if c:
        w, sm, lg = c["runs"]["warmup"], c["runs"]["small"], c["runs"]["large"]
        gw, gl = w.get("gap_to_small") or {}, lg.get("gap_to_small") or {}
        S = len(c.get("seeds", [0]))
        seeds = f"mean of {S} seeds" if S > 1 else "one seed"
        gone = [n for n in run_names(c) if c["runs"][n].get("diverged")]
        if gone:
            for n in gone:
                r = c["runs"][n]
                out.append(f"The {n} run diverged (seed {', '.join(str(x) for x in r['diverged_seeds'])}: "
                           f"{r['diverged_reasons'][0]}), so its loss is not compared: a mean over the seeds that "
                           f"survived would flatter it.")
            return out
        if len(w["batch_schedule"]) < 2:  # the derived schedule never left the start batch
            out.append(f"The derived warmup has no batch change within the run, so its run is the small-batch control "
                       f"({w['final_eval_loss']:.4f}); the large-batch control at {lg['batch_schedule'][0][1]} sequences "
                       f"reached {lg['final_eval_loss']:.4f} (gap {pm(gl.get('final_eval_loss'))}).")
            out += _no_warmup(s)
        else:
            out.append(_warmup_sentence(w, sm, lg, gw, gl, seeds))
        if w.get("anneal_eval_loss") is not None:
            how = (f"{c['anneal_steps']:,}-step" if c.get("anneal_steps") else f"{fmt_count(c['anneal_tokens'])}-token")
            out.append(f"After the {how} anneal: warmup {w['anneal_eval_loss']:.4f}, small {sm['anneal_eval_loss']:.4f} "
                       f"(gap {pm(gw.get('anneal_eval_loss'))}), large {lg['anneal_eval_loss']:.4f}.")
        out += _closed_loop_conclusions(s, c) + _other_schedules(c)
        caveat = ("differences are read against the ± beside them" if S > 1 else
                  "with one seed the run-to-run noise is not measured (docs/LOG.md has multi-seed numbers)")
        out.append(f"What this does not show: a tiny model on a 10 MB corpus; {caveat}; fewer optimizer steps save "
                   "wall time only where a larger batch runs faster per token (GPUs), not on this CPU.")
    elif s.get("compare_skipped"):
        out.append(f"No comparison: {s['compare_skipped']}.")
        out += _no_warmup(s) + _closed_loop_conclusions(s, None)
    return out


# ---- figures --------------------------------------------------------------------------------------


def _svg(path: Path) -> str:
    text = path.read_text()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # matplotlib's RDF block
    # scale with the page
    text = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1', text, count=1)  # CSS sizes it
    return text


def draw_figures(d: Path, s: dict) -> dict[str, Path]:
    lay = _layout(d)
    fig_dir = d / "figures" if lay["kind"] == "demo" else d / "report-figures"
    fig_dir.mkdir(exist_ok=True)
    out = {}
    if s.get("curve"):
        plot_loss_vs_batch(s["curve"], fig_dir / "loss_vs_batch")
        plot_cbs_curve(s["curve"], fig_dir / "cbs_curve", noise_scale=noise_scale_points(s["curve"]) or None,
                       decisions=(s.get("closed_loop") or {}).get("decisions"),
                       run_end=(s.get("closed_loop") or {}).get("tokens"))
        out["loss_vs_batch"] = fig_dir / "loss_vs_batch.svg"
        out["cbs_curve"] = fig_dir / "cbs_curve.svg"
    if s.get("schedule") and s.get("curve"):
        plot_schedule(s["curve"], s["schedule"], fig_dir / "schedule",
                      total_tokens=s["comparison"]["pretrain_tokens"] if s.get("comparison") else None)
        out["schedule"] = fig_dir / "schedule.svg"
    if s.get("comparison"):
        c = s["comparison"]
        seed = str(c["seeds"][0])
        metrics = {n: read_jsonl(lay["compare"] / c["run_dirs"][seed][n] / "metrics.jsonl") for n in run_names(c)}
        plot_comparison(metrics, s["comparison"], fig_dir / "comparison")
        out["comparison"] = fig_dir / "comparison.svg"
    return out


# ---- HTML -----------------------------------------------------------------------------------------


def _mean_or_stopped(losses: list) -> str:
    """A probe's mean held-out loss; a probe stopped early as failing has none."""
    vals = [v for v in losses if v is not None and math.isfinite(v)]
    return f"{sum(vals) / len(vals):.4f}" if len(vals) == len(losses) and vals else "stopped"


def _closed_loop_html(cl: dict) -> str:
    rows = [[fmt_count(d["tokens"]), d["batch_before"],
             " / ".join(_mean_or_stopped(v) for v in d["probe"]["eval_losses"]) if d.get("probe") else "—",
             ", ".join(f"{k}: {v}" for k, v in d["verdicts"].items() if v is not None), d["acted_on"],
             d["batch_after"], fmt_count(d["cost"]["probe_tokens"])] for d in cl["decisions"]]
    return ("<h2 id='closed-loop'>The closed loop: one run that measures its own CBS</h2>"
            + _table(["tokens", "batch", "probe eval loss (B / 2B)", "verdicts", "acted on", "batch after",
                      "probe tokens"], rows)
            + f"<p class='muted'>Measurement {fmt_count(cl['measurement_tokens'])} tokens "
              f"({100 * (cl['measurement_fraction'] or 0):.0f}% of the run's {fmt_count(cl['tokens'])}): "
              f"{measurement_parts(cl)}; {cl['steps']:,} optimizer steps against {cl['small_control_steps']:,} "
              f"at the starting batch. "
              + (html.escape(skipped_probes(cl)[0].upper() + skipped_probes(cl)[1:]) + ". " if skipped_probes(cl) else "")
              + "Evidence per point: autobatch/decisions.jsonl.</p>")

CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
figure{margin:1em 0;padding:.5em;border:1px solid #eee;border-radius:6px}figcaption{color:#555;font-size:.9em}
figure svg{display:block;margin:0 auto;max-width:760px;width:100%;height:auto}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f6f6f6}td:first-child,th:first-child{text-align:left}pre{background:#f8f8f8;padding:.8em;overflow:auto;font-size:.8em}
.muted{color:#666}ul.conclusions li{margin:.3em 0}
"""


def _table(headers: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _num(v, fmt="{:.4f}"):
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _model_text(m: dict) -> str:
    if m.get("family") == "hf":
        hf = m.get("hf")
        if isinstance(hf, dict):
            return (f"a {hf.get('model_type', 'transformers')} model from transformers ({hf.get('num_hidden_layers', '?')} "
                    f"layers, d={hf.get('hidden_size', '?')})")
        return f"a transformers model from {hf}"
    return f"a {m['n_layer']}-layer GPT (d={m['d_model']})"


def render_html(s: dict, figs: dict[str, Path]) -> str:
    e = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>critbatch report</title>"
             f"<style>{CSS}</style></head><body>"]
    base = s["base"]["config"]
    m = base["model"]
    parts.append("<h1>critbatch: local critical batch size and batch-size warmup</h1>")
    parts.append(f"<p class='muted'>Generated {e(s['generated'])} from the files of the study. Base run: "
                 f"{e(_model_text(m))} ({fmt_count(s['base']['result'].get('params'))} parameters), "
                 f"sequences of {m['seq_len']} tokens, base batch {base['batch_seqs']} sequences, "
                 f"{fmt_count(base['total_tokens'])} tokens, AdamW lr {base['optim']['lr']:g}, LR rule "
                 f"{base['optim']['lr_rule']}. Method: Merrill et al. 2025, <i>Critical Batch Size Revisited</i>.</p>")
    parts.append("<h2 id='conclusions'>What was found</h2><ul class='conclusions'>"
                 + "".join(f"<li>{e(c)}</li>" for c in s["conclusions"]) + "</ul>")

    def fig(key: str, title: str, caption: str) -> None:
        if key in figs:
            parts.append(f"<figure id='fig-{key}' class='figure'>{_svg(figs[key])}<figcaption><b>{e(title)}.</b> "
                         f"{e(caption)}</figcaption></figure>")

    if s.get("points"):
        parts.append("<h2 id='cbs'>The local critical batch size</h2>")
        fig("loss_vs_batch", "Loss against batch size at each branch point (Merrill et al. Fig. 1)",
            "Final branch loss for each probed batch k·B; crosses mark batches worse than a smaller one by more than "
            "the tolerance; the dashed line is the CBS reading.")
        fig("cbs_curve", "CBS against training tokens, with the fit and the noise scale (Figs. 2–3)",
            "Bars: measured CBS intervals [k*·B, k_next·B] (dots at their geometric mean; arrows: one-sided). "
            "Dashed: the censored saturating power-law fit. Squares: the gradient noise scale B_simple with 95% intervals."
            + CLOSED_LOOP_CAPTION * bool(s.get("closed_loop")))
        rows = [[fmt_count(p["tokens"]), p["base_batch_seqs"], " ".join(f"{k:g}" for k in p["probed_k"]), p["interval"],
                 "yes" if p["readings_disagree"] else "", _num(p["noise_scale_seqs"], "{:.3g}")] for p in s["points"]]
        parts.append(_table(["tokens", "base batch", "probed k", "CBS (sequences)", "readings disagree",
                             "noise scale (seqs)"], rows))
    if s.get("schedule"):
        sch = s["schedule"]
        parts.append("<h2 id='schedule'>Derived batch-size warmup</h2>")
        fig("schedule", "The derived schedule over the CBS curve",
            f"Doublings where the CBS ({sch.get('derived_from', {}).get('source', '?')}) reaches the next batch; "
            f"LR multiplied by the {sch['rule']} rule at each step.")
        parts.append(_table(["from tokens", "batch (sequences)", "batch (tokens)", "LR multiplier"],
                            [[f"{p['start_tokens']:,}", p["batch_seqs"], f"{p['batch_tokens']:,}",
                              f"{p['lr_multiplier']:.3f}"] for p in sch["phases"]]))
        if sch.get("notes"):
            parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in sch["notes"]) + "</ul>")
        ex = sch.get("exports", {})
        parts.append(f"<p>Megatron-LM: <code>--step-batch-size-schedule \"{e(ex.get('megatron_step_batch_size_schedule', ''))}\" "
                     f"--seq-length {sch['seq_len']}</code>. OLMo-core BatchSizeSchedulerCallback: "
                     f"<code>{e(json.dumps(ex.get('olmo_core_batch_size_scheduler')))}</code></p>")
    if s.get("closed_loop"):
        parts.append(_closed_loop_html(s["closed_loop"]))
    if s.get("comparison"):
        c = s["comparison"]
        parts.append("<h2 id='comparison'>Warmup against small- and large-batch controls</h2>")
        fig("comparison", "Loss against tokens (Merrill et al. Fig. 4)",
            "Training loss (moving average) and held-out loss (dots) of the three runs; dashed: warmup batch changes.")
        head, rows, note = table(c)
        parts.append("<p>Table 1 (as in Merrill et al.), with each run's held-out loss gap to the small-batch "
                     "control.</p>" + _table(head, rows))
        parts.append(f"<p class='muted'>{e(note)}</p>")
    if s.get("stages"):
        parts.append("<h2 id='costs'>Cost of each stage</h2>")
        parts.append(_table(["stage", "seconds"], [[k, f"{v['seconds']:.1f}"] for k, v in s["stages"].items()]
                            + [["total", f"{s['total_seconds']:.1f}"]] + _wall_row(s)))
    if s.get("sweep_cost"):
        sc = s["sweep_cost"]
        parts.append(f"<p>The curve cost {e(describe_sweep_cost(sc))}.</p>")
    parts.append("<h2 id='configs'>Configuration and versions</h2>")
    v = s.get("versions", {})
    parts.append(_table(["component", "version"], [[k, v[k]] for k in ("critbatch", "torch", "numpy", "python", "platform",
                                                                      "cpu_count", "cuda") if k in v]))
    parts.append(f"<details><summary>Base run config</summary><pre>{e(json.dumps(base, indent=2))}</pre></details>")
    if s.get("demo_config"):
        parts.append(f"<details><summary>Demo config</summary><pre>{e(json.dumps(s['demo_config'], indent=2))}</pre></details>")
    if s.get("curve"):
        cur = {k: v for k, v in s["curve"].items() if k not in ("points",)}
        parts.append(f"<details><summary>Sweep</summary><pre>{e(json.dumps(cur, indent=2, default=str))}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(s: dict) -> str:
    lines = ["# critbatch report", "", "## What was found", ""] + [f"- {c}" for c in s["conclusions"]] + [""]
    if s.get("points"):
        lines += ["## Local critical batch size", "", "| tokens | base batch | CBS (sequences) | noise scale (seqs) |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {p['tokens']:,} | {p['base_batch_seqs']} | {p['interval']} | {_num(p['noise_scale_seqs'], '{:.3g}')} |"
                  for p in s["points"]] + [""]
    if s.get("schedule"):
        lines += ["## Derived warmup", ""] + [f"- from {p['start_tokens']:,} tokens: {p['batch_seqs']} sequences, "
                                               f"LR × {p['lr_multiplier']:.3f}" for p in s["schedule"]["phases"]] + [""]
    if s.get("comparison"):
        lines += ["## Comparison", "", markdown_table(s["comparison"])]
    if s.get("closed_loop"):
        cl = s["closed_loop"]
        lines += ["## Closed loop", ""] + [f"- at {d['tokens']:,} tokens, batch {d['batch_before']}: "
                                           f"{', '.join(f'{k} {v}' for k, v in d['verdicts'].items() if v is not None)}"
                                           f" -> batch {d['batch_after']}" for d in cl["decisions"]]
        lines += [f"- measurement {cl['measurement_tokens']:,} tokens ({100 * (cl['measurement_fraction'] or 0):.0f}% of "
                  f"the run: {measurement_parts(cl)}), "
                  f"{cl['steps']:,} steps ({cl['steps_saved_pct']:.0f}% fewer than the small batch)"]
        lines += ([f"- {skipped_probes(cl)}"] if skipped_probes(cl) else []) + [""]
    if s.get("stages"):
        lines += ["## Cost", ""] + [f"- {k}: {v['seconds']:.1f} s" for k, v in s["stages"].items()] + \
                 [f"- total: {s['total_seconds']:.1f} s"] + [f"- {a}: {b} s" for a, b in _wall_row(s)] + [""]
    return "\n".join(lines) + "\n"


def _wall_row(s: dict) -> list[list[str]]:
    """The demo's time from its first stage to its last, where stages overlapped (worker processes)."""
    w = s.get("wall_seconds")
    return [["from start to end (stages overlap)", f"{w:.1f}"]] if w and w < 0.98 * s["total_seconds"] else []


def build_report(d: str | Path) -> Path:
    """Write ``report.html``, ``summary.json`` and ``summary.md`` into ``d``; returns the HTML path."""
    d = Path(d)
    s = summarize(d)
    check_output(d, "report directory")
    figs = draw_figures(d, s)
    lean = {k: v for k, v in s.items() if k != "curve"}
    lean["figures"] = {k: str(p.relative_to(d)) for k, p in figs.items()}
    write_json_atomic(d / "summary.json", lean)
    write_text_atomic(d / "summary.md", render_markdown(s))
    write_text_atomic(d / "report.html", render_html(s, figs))
    return d / "report.html"
