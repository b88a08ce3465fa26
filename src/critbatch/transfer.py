"""``critbatch transfer``: the CBS of the run one cannot afford to branch — measured on cheap proxies on
the same data and tokenizer, transferred to the target with an honest band, confirmed with one probe.

1. The proxies' sweeps (``cbs.json`` of runs of one or more model sizes and token budgets) are checked
   to share data and tokenizer, and their intervals (in tokens) are fitted by the censored model of
   :mod:`critbatch.analysis.transfer` with a bootstrap.
2. The target (its model, sequence length, token budget, start batch, granularity, LR decay) gets its
   predicted CBS curve with a band, and a schedule derived from the band's *lower* side exactly as
   from a measured sweep (:mod:`critbatch.analysis.whole_run`), rescaled to the target's sequences.
   Where the target runs past every proxy's tokens the schedule holds the band's last measured value
   (nothing is extrapolated into it) and the result says how far the prediction extrapolates.
3. Before anything runs: the proxies' compute over the target run's (parameters × tokens, and FLOPs),
   and the confirming probe's cost.
4. The confirming probe (``confirm_run``: the target trained to its first doubling, with a kept
   checkpoint there): one pair of cooldown probes, B and 2B, whole steps, the non-inferiority rule
   over paired replicates, through any launcher. If it shows 2B worse than ε, the schedule moves that
   doubling to the next point; if it cannot settle it (undetermined), the doubling stays where the
   band put it; either way the schedule says so.

Assumption, stated in the output: the target's LR schedule matches the proxies' in tokens (warmup
length and shape); a target whose warmup differs by more than 2x gets a warning, since the CBS
depends on where the LR is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import presets
from .analysis.transfer import BETA_PRIOR_SD, Observation, TransferFit, fit_transfer
from .analysis.triggers import probe_verdict
from .analysis.whole_run import DECAYS, whole_run_schedule
from .branch import SweepConfig, run_sweep
from .closed_loop import default_window
from .config import TrainConfig, check_choices, from_dict, how, load_config_file, merge, option
from .errors import ConfigError, DataError
from .io import check_output, read_json, write_json_atomic
from .launch import LAUNCHERS
from .model import count_params, flops_per_token
from .records import read_curve, read_run_result
from .schedules.export import schedule_document
from .train.checkpoint import kept_checkpoints


@dataclass
class TransferConfig:
    """Transfer the CBS measured on proxies to a target run, and derive its schedule."""

    sweeps: list[str]
    """The proxies' sweep directories (each holds cbs.json; their runs' data and tokenizer must agree)."""
    out: str
    """The target's schedule.json to write."""
    total_tokens: int
    """The target run's tokens, its LR decay included."""
    preset: str | None = None
    """The target's size preset (or ``config``)."""
    config: str | None = None
    """A JSON/TOML file with (part of) the target's TrainConfig (a transformers model: ``model.hf``)."""
    start_seqs: int | None = None
    """The target's start batch in its sequences (default: the target config's batch)."""
    granularity: int | None = None
    """The target's data-parallel ranks × micro-batch: every phase's batch a multiple of it."""
    decay_tokens: int = 0
    """The target's final linear LR decay to 0, in tokens."""
    decay: str = option("anneal", choices=DECAYS)
    """The schedule during the decay (``critbatch schedule --decay``)."""
    reach: float | None = None
    """``critbatch schedule --reach``."""
    level: float = 0.9
    """The prediction band's level; the schedule follows its lower side."""
    bootstrap: int = 200
    """Bootstrap resamples of the fit."""
    confirm_run: str | None = None
    """The target run trained to the schedule's first doubling (a finished run with a kept checkpoint
    there, ``critbatch train --total-tokens T1 --checkpoint-tokens T1``): run the confirming probe and
    move the doubling to the next point when the probe shows it worse than eps."""
    confirm_replicates: int = 2
    """Paired replicates of the confirming probe (the non-inferiority rule needs 2 or more)."""
    eps: float = 0.01
    """The confirming probe's tolerance in nats."""
    jobs: int | None = how(None)
    """Probe branches at once."""
    launcher: str = how("local", choices=LAUNCHERS)
    """Where the probe's branches run (``critbatch branch --launcher``)."""
    slurm: dict | None = how(None)
    """Options of the Slurm launchers."""


@dataclass
class Proxy:
    run: Path
    curve: dict
    cfg: TrainConfig
    params: int
    flops_per_token: int
    run_tokens: int


def _data_identity(cfg: TrainConfig) -> tuple:
    """What the CBS depends on in the data: the tokenizer, the vocabulary and the training shards."""
    p = Path(cfg.data.path or "")
    if not (p / "meta.json").is_file():
        raise DataError(f"the data directory {p} of a proxy run is gone (no meta.json): its identity cannot be checked")
    m = read_json(p / "meta.json")
    return (json_key(m.get("tokenizer")), m.get("vocab_size"),
            tuple(s.get("sha256") for s in (m.get("splits") or {}).get("train", {}).get("shards", [])))


def json_key(v) -> str:
    import json

    return json.dumps(v, sort_keys=True)


def read_proxies(sweeps: list[str]) -> list[Proxy]:
    """The proxies' curves and runs, checked to share data and tokenizer."""
    if not sweeps:
        raise ConfigError("give the proxies' sweep directories (--sweeps DIR,DIR,...)")
    out, ids = [], {}
    for s in sweeps:
        curve = read_curve(s)
        run = Path(curve.get("run") or Path(s).parent.parent)
        if not (run / "config.json").is_file():
            run = Path(s).resolve().parent.parent
        cfg = from_dict(TrainConfig, read_json(run / "config.json"))
        ids[s] = _data_identity(cfg)
        res = read_run_result(run)
        out.append(Proxy(run, curve, cfg, count_params(cfg.model, embeddings=False), flops_per_token(cfg.model),
                         int(res["tokens"] - res["start_tokens"])))
    first = next(iter(ids.values()))
    for s, i in ids.items():
        if i != first:
            what = "tokenizer" if i[0] != first[0] or i[1] != first[1] else "training data"
            raise DataError(f"the sweep {s} was measured on other {what} than {sweeps[0]}: a transfer needs proxies on "
                            f"the same data and tokenizer")
    return out


def target_config(cfg: TransferConfig) -> TrainConfig:
    if cfg.preset is None and cfg.config is None:
        raise ConfigError("give the target: --preset NAME or --config FILE")
    base = presets.get(cfg.preset) if cfg.preset else TrainConfig()
    if cfg.config:
        base = merge(base, load_config_file(cfg.config))
    return merge(base, {"total_tokens": cfg.total_tokens})


def _check_target(tgt: TrainConfig, proxies: list[Proxy], start: int) -> list[str]:
    """Refuse a target the proxies cannot speak for; warn where the assumption is stretched."""
    notes = []
    vocab = {p.cfg.model.vocab_size for p in proxies}
    v = tgt.model.vocab_size
    if v is not None and v not in vocab:
        raise ConfigError(f"the target's vocabulary of {v} differs from the proxies' ({', '.join(map(str, sorted(vocab)))}): "
                          f"the proxies measured other tokens; prepare the target's data with their tokenizer")
    T = tgt.model.seq_len
    longest = max(p.cfg.model.seq_len for p in proxies)
    if T > 4 * longest:
        raise ConfigError(f"the target's {T}-token sequences are more than 4x the proxies' longest ({longest}): the "
                          f"proxies cannot speak for its context; measure a proxy at {T // 4} tokens or more")
    warm = {p.cfg.lr_schedule.warmup_tokens for p in proxies}
    w = tgt.lr_schedule.warmup_tokens
    if any(not (x / 2 <= w <= 2 * x) for x in warm if x) or (w and not any(warm)):
        notes.append(f"the target's LR warmup ({w:,} tokens) differs from the proxies' ({', '.join(f'{x:,}' for x in sorted(warm))}) "
                     f"by more than 2x: the transfer assumes the LR schedule matched in tokens, and the CBS depends on "
                     f"where the LR is")
    if start < 1:
        raise ConfigError(f"start batch {start} must be >= 1")
    return notes + _stretched(tgt, proxies)


def _per_token_lr(cfg: TrainConfig) -> float:
    """The peak LR brought to one token a step by the config's own rule (sqrt: lr/√(tokens a step))."""
    b = cfg.batch_seqs * cfg.model.seq_len
    return cfg.optim.lr / {"sqrt": b ** 0.5, "linear": b}.get(cfg.optim.lr_rule, 1)


def _stretched(tgt: TrainConfig, proxies: list[Proxy]) -> list[str]:
    """Where the target lies outside what the proxies varied (docs/LOG.md, issue 23): one proxy
    predicted sizes up to 32x larger at its own sequence length and peak LR (55 of 60 intervals in the
    band), and a target at another sequence length and a lower peak LR less well (27 of 40)."""
    notes = []
    sizes = sorted({p.params for p in proxies})
    n = count_params(tgt.model, embeddings=False)
    if n > 2 * sizes[-1] or n < sizes[0] / 2:
        larger = n > sizes[-1]
        ref = sizes[-1] if larger else sizes[0]
        size = (f"the band carries a prior on it (sd {BETA_PRIOR_SD:g}), not a measurement" if len(sizes) == 1
                else "the band carries the fitted size exponent's uncertainty that far")
        notes.append(f"size extrapolation: the target ({n:,}) has {max(n / ref, ref / n):.0f}x "
                     f"{'more' if larger else 'fewer'} non-embedding parameters than the "
                     f"{'largest' if larger else 'smallest'} proxy ({ref:,})"
                     + ("; with one proxy size the size dependence is not measured: " if len(sizes) == 1 else "; ") + size)
    lens = sorted({p.cfg.model.seq_len for p in proxies})
    if tgt.model.seq_len not in lens:
        notes.append(f"the target's sequences of {tgt.model.seq_len} tokens differ from the proxies' "
                     f"({', '.join(map(str, lens))}): the CBS in tokens is assumed not to depend on them; a proxy at "
                     f"the target's sequence length would test it")
    lrs = [_per_token_lr(p.cfg) for p in proxies]
    t_lr = _per_token_lr(tgt)
    if not min(lrs) / 1.25 <= t_lr <= max(lrs) * 1.25:
        notes.append(f"the target's peak LR ({tgt.optim.lr:g} at {tgt.batch_seqs} sequences) is "
                     f"{t_lr / max(lrs) if t_lr > max(lrs) else t_lr / min(lrs):.2f}x the proxies' once brought to the "
                     f"same tokens a step by the {tgt.optim.lr_rule} rule: the CBS depends on where the LR is, and the "
                     f"transfer assumes it matched")
    return notes


def compute_ratio(proxies: list[Proxy], tgt: TrainConfig, tokens: int) -> dict:
    """The proxies' compute (their runs and their sweeps' branches) over the target run's."""
    runs = {}
    for p in proxies:  # a run measured by several sweeps is counted once
        runs[str(p.run)] = p
    branch = sum(p.curve["cost"].get("branch_tokens", 0) for p in proxies)
    pt = sum(p.params * p.run_tokens for p in runs.values()) + sum(p.params * p.curve["cost"].get("branch_tokens", 0)
                                                                  for p in proxies)
    pf = sum(p.flops_per_token * p.run_tokens for p in runs.values()) + sum(
        p.flops_per_token * p.curve["cost"].get("branch_tokens", 0) for p in proxies)
    tn, tf = count_params(tgt.model, embeddings=False), flops_per_token(tgt.model)
    return {"proxy_params_x_tokens": pt, "target_params_x_tokens": tn * tokens, "params_x_tokens_ratio": pt / (tn * tokens),
            "proxy_flops": pf, "target_flops": tf * tokens, "flops_ratio": pf / (tf * tokens),
            "proxy_run_tokens": sum(p.run_tokens for p in runs.values()), "proxy_branch_tokens": branch,
            "target_params": tn}


def observations(proxies: list[Proxy]) -> list[Observation]:
    out = []
    for p in proxies:
        T = p.curve["seq_len"]
        for q in p.curve["points"]:
            if q.get("undetermined_reason"):
                continue
            out.append(Observation(p.params, q["tokens"], float(q["cbs_low_seqs"] or 0) * T,
                                   None if q["cbs_high_seqs"] is None else q["cbs_high_seqs"] * T, str(p.run)))
    return out


def target_curve(fit: TransferFit, tgt: TrainConfig, token_points: list[int], level: float, window: int) -> dict:
    """The target's predicted curve as a cbs.json a schedule derives from: at each measured token
    count, the ``level`` band of the fitted curve (bootstrap, without the measurements' scatter) in the
    target's sequences; its lower side bounds the schedule as a measured lower bound would."""
    T = tgt.model.seq_len
    N = count_params(tgt.model, embeddings=False)
    lo, hi = fit.band(token_points, N, level, scatter=False)  # where the curve lies: the schedule's bound
    return {"seq_len": T, "lr_rule": tgt.optim.lr_rule, "adam_rule": tgt.optim.adam_rule, "window_tokens": window,
            "decide_by": "transfer", "rule": f"{level:.0%} band", "fit": None,
            "points": [{"tokens": int(t), "cbs_low_seqs": float(a) / T, "cbs_high_seqs": float(b) / T,
                        "base_batch_seqs": tgt.batch_seqs} for t, a, b in zip(token_points, lo, hi)]}


def _confirm_plan(sched, tgt: TrainConfig, replicates: int) -> dict | None:
    """Where and at what cost the first doubling is confirmed (``None``: the schedule has none)."""
    if len(sched.phases) < 2:
        return None
    (_, B), (t1, B2) = sched.phases[0], sched.phases[1]
    T = tgt.model.seq_len
    W = default_window(t1, 0.25, B, B2 / B, T)
    return {"tokens": t1, "batch_seqs": B, "next_batch_seqs": B2, "window_tokens": W, "replicates": replicates,
            "probe_tokens": replicates * 2 * W,
            "train_to_it": f"critbatch train ... --total-tokens {t1} --checkpoint-tokens {t1} (the target's own config, "
                           f"batch {B} until then)"}


def confirm(cfg: TransferConfig, plan: dict) -> dict:
    """The confirming probe on the target run trained to the first doubling: B and 2B over paired
    replicates, cooldown probes, the non-inferiority rule."""
    run = Path(cfg.confirm_run)
    kept = [c for c in kept_checkpoints(run) if c.tokens <= plan["tokens"]]
    if not kept:
        raise DataError(f"the confirm run {run} has no kept checkpoint at or before {plan['tokens']:,} tokens; train it "
                        f"with --total-tokens {plan['tokens']} --checkpoint-tokens {plan['tokens']}")
    at = kept[-1].tokens
    k2 = plan["next_batch_seqs"] / plan["batch_seqs"]
    res = run_sweep(SweepConfig(run=str(run), at=[at], k=[1.0, k2], window_tokens=plan["window_tokens"],
                                replicates=cfg.confirm_replicates, search="grid", eps=cfg.eps, decide_by="eval",
                                jobs=cfg.jobs, launcher=cfg.launcher, slurm=cfg.slurm), progress=False)
    p = res.curve["points"][0]
    verdict, _ = probe_verdict(p, int(p["base_batch_seqs"]))
    return {"tokens": at, "verdict": verdict, "sweep": str(res.sweep_dir), "rule": p["rule"],
            "mean_eval_loss": p["mean_loss"]["eval"], "status": p["status"],
            "replicates_needed": p.get("replicates_needed"), "branch_tokens": res.curve["cost"]["branch_tokens"]}


def _after_confirming(w, confirmed: dict, plan: dict, points: list[int], curve: dict, start: int, cfg: TransferConfig,
                      opts: dict):
    """The schedule after the confirming probe: a doubling the probe shows worse than eps (``stay``)
    moves to the next point; one it cannot settle (``undetermined``: neither within eps nor worse) is
    kept, as the band put it, and said so."""
    v, t, b2 = confirmed["verdict"], confirmed["tokens"], plan["next_batch_seqs"]
    if v == "stay":
        later = [x for x in points if x > plan["tokens"]]
        nxt = later[0] if later else cfg.total_tokens
        w = whole_run_schedule(curve, start, cfg.total_tokens, not_before=nxt, **opts)
        w.notes.append(f"the confirming probe at {t:,} tokens showed {b2} sequences worse than eps: the first doubling "
                       f"moves to the next point, {nxt:,} tokens")
    elif v == "undetermined":
        w.notes.append(f"the confirming probe at {t:,} tokens could not settle {b2} sequences (neither shown within eps "
                       f"nor worse; {confirmed.get('replicates_needed') or 'more'} replicates would settle it): the "
                       f"doubling stays where the band put it")
    else:
        w.notes.append(f"the confirming probe at {t:,} tokens showed {b2} sequences within eps: the doubling is confirmed")
    return w


def run_transfer(cfg: TransferConfig) -> dict:
    """Fit, predict, derive, state the cost, and (with ``confirm_run``) confirm; writes ``cfg.out``."""
    check_choices(cfg)
    check_output(cfg.out, "--out", "file")
    if not 0.5 <= cfg.level < 1 or cfg.bootstrap < 20 or cfg.confirm_replicates < 2:
        raise ConfigError(f"level={cfg.level} must be in [0.5, 1), bootstrap={cfg.bootstrap} >= 20 and "
                          f"confirm_replicates={cfg.confirm_replicates} >= 2")
    proxies = read_proxies(cfg.sweeps)
    tgt = target_config(cfg)
    if tgt.model.vocab_size is None:
        tgt = merge(tgt, {"model": {"vocab_size": proxies[0].cfg.model.vocab_size}})
    start = cfg.start_seqs if cfg.start_seqs is not None else tgt.batch_seqs
    notes = _check_target(tgt, proxies, start)
    fit = fit_transfer(observations(proxies), bootstrap=cfg.bootstrap)
    points = sorted({int(q["tokens"]) for p in proxies for q in p.curve["points"] if 0 < q["tokens"] <= cfg.total_tokens})
    if not points:
        raise ConfigError(f"the target's {cfg.total_tokens:,} tokens end before any proxy's first measured point")
    window = max(int(p.curve.get("window_tokens") or 0) for p in proxies)
    curve = target_curve(fit, tgt, points, cfg.level, window)
    opts = dict(decay_tokens=cfg.decay_tokens, decay=cfg.decay, reach=cfg.reach, granularity=cfg.granularity,
                rule=tgt.optim.lr_rule, adam_rule=tgt.optim.adam_rule)
    w = whole_run_schedule(curve, start, cfg.total_tokens, **opts)
    plan = _confirm_plan(w.schedule, tgt, cfg.confirm_replicates)
    confirmed = None
    if cfg.confirm_run and plan:
        confirmed = confirm(cfg, plan)
        w = _after_confirming(w, confirmed, plan, points, curve, start, cfg, opts)
    notes += w.notes
    top = fit.t_range[1]
    if cfg.total_tokens > top:
        lo, hi = fit.band([cfg.total_tokens], count_params(tgt.model, embeddings=False), cfg.level)
        notes.append(f"extrapolation: the target runs to {cfg.total_tokens:,} tokens, {cfg.total_tokens / top:.1f}x the "
                     f"last token count any proxy measured ({top:,.0f}); the schedule holds the band's value there to the "
                     f"end, while the fit predicts {lo[0]:,.0f}-{hi[0]:,.0f} tokens at the end")
    doc = schedule_document(w.schedule, notes=notes, derived_from={
        "transfer": [str(s) for s in cfg.sweeps], "level": cfg.level, "decay": cfg.decay,
        "decay_tokens": cfg.decay_tokens, "reach": cfg.reach, "granularity": cfg.granularity, "start_seqs": start,
        "total_tokens": cfg.total_tokens,
        "assumption": "the target's LR schedule matches the proxies' in tokens (warmup and shape)"})
    doc["transfer"] = {"fit": fit.to_dict(cfg.level), "band": curve["points"], "compute": compute_ratio(proxies, tgt, cfg.total_tokens),
                       "confirm_plan": plan, "confirmed": confirmed, "target_params": count_params(tgt.model, embeddings=False)}
    write_json_atomic(cfg.out, doc)
    return doc


def describe(doc: dict) -> list[str]:
    """Lines for the command line: cost first, then the fit, the band, the schedule and the notes."""
    tr, c = doc["transfer"], doc["transfer"]["compute"]
    f = tr["fit"]
    lines = [f"proxy compute: {c['params_x_tokens_ratio']:.1%} of the target run's (parameters x tokens; "
             f"{c['flops_ratio']:.1%} in FLOPs): {c['proxy_run_tokens']:,} run and {c['proxy_branch_tokens']:,} branch "
             f"tokens on the proxies",
             f"fit: CBS in tokens ~ t^{f['alpha']:.3f} [{f['alpha_interval'][0]:.3f}, {f['alpha_interval'][1]:.3f}] x "
             f"N^{f['beta']:+.3f}; size dependence {f['size_effect']}; scatter sigma {f['sigma']:.2f} "
             f"({f['n_points']} intervals, sizes {', '.join(f'{s:,.0f}' for s in f['sizes'])})"]
    T = doc["seq_len"]
    for p in tr["band"]:
        lines.append(f"  at {p['tokens']:>12,} tokens: CBS {p['cbs_low_seqs'] * T:,.0f}-{p['cbs_high_seqs'] * T:,.0f} "
                     f"tokens ({f['level']:.0%} band) = {p['cbs_low_seqs']:.3g}-{p['cbs_high_seqs']:.3g} target sequences")
    for ph in doc["phases"]:
        lines.append(f"  from {ph['start_tokens']:>12,} tokens: {ph['batch_seqs']:,} sequences, LR x {ph['lr_multiplier']:.3f}")
    if tr["confirm_plan"]:
        cp = tr["confirm_plan"]
        lines.append(f"confirming probe: at {cp['tokens']:,} tokens, {cp['batch_seqs']} against {cp['next_batch_seqs']} "
                     f"sequences, {cp['replicates']} replicates of {cp['window_tokens']:,} tokens: {cp['probe_tokens']:,} "
                     f"probe tokens; train to it with {cp['train_to_it']}")
    if tr["confirmed"]:
        lines.append(f"confirmed: {tr['confirmed']['verdict']} (mean eval {tr['confirmed']['mean_eval_loss']})")
    return lines + [f"  note: {n}" for n in doc["notes"]]
