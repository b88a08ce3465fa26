"""``critbatch train --auto-batch``: one training run that measures its own local CBS as it goes and
raises its batch when the measurement says it is safe (the closed loop).

The run is trained in *segments* between probe points. At a probe point the segment ends with a
kept checkpoint; probe branches fork from it — the current batch B and k·B (default k = 2) for a
window of tokens on the stream ahead, each ending with the sweep's cooldown — and are decided with
the rules of ``critbatch branch`` (eval loss; ``eps`` or ``noninf`` over replicates). When the
larger batch is shown within ε the next segment continues from the same checkpoint at that batch,
its LR by the coupling rule; otherwise at B. The main run's data order never changes: a segment
resumes the stream exactly where the previous one stopped (a chain of segments with no raise is the
uninterrupted run, bit for bit), and probes only cost tokens.

The probe at B is, up to its cooldown, the main run's own continuation. So before a branch probe
the segment goes on past the point to the last step before that cooldown (:func:`main_run_lead`,
keeping a checkpoint at the point): the probe at B starts there and trains only its cooldown
(:func:`critbatch.branch.sweep.parent_continuation`), and when the batch stays the run continues
from there too. When the batch is raised the lead is discarded (its tokens and steps are counted
apart in ``result.json``) and the next segment starts from the point, as without it.

Beside the branch probe, two cheaper triggers are read at every probe point from one noise-scale
estimate (:mod:`critbatch.analysis.triggers`): the noise scale with a multiple calibrated on this
run's earlier probe points, and the norm test. ``act_on`` chooses which one moves the batch; the
others are recorded, so one run shows how they agree.

Layout of ``OUT``::

    autobatch.json      what was asked (a rerun with other settings is refused)
    main/segNN_<hash>/  the segments (each a training run; a probe point's checkpoint is kept)
    decisions.jsonl     per probe point: evidence, rule, verdicts, cost and the batch afterwards
    schedule.json       the batch schedule the run took (usable by ``compare``, ``train`` and the exports)
    result.json         the run's numbers, its measurement cost and the steps saved

Everything is content-addressed: segments by their config and starting checkpoint, probes as
sweep branches of their segment; a run killed at any moment resumes and takes the same decisions.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .analysis.triggers import (calibrate, gns_verdict, log_spaced_points, norm_verdict,
                                probe_verdict, steps_for)
from .branch import SweepConfig, plan_sweep, run_sweep
from .branch.sweep import branch_spec, ensure_branch, last_step_before_cooldown
from .config import TrainConfig, config_hash, defining_dict, how, merge, option, validate
from .errors import ConfigError
from .gns.checkpoints import GNSConfig, gns_at_checkpoints
from .io import check_output, read_json, write_json_atomic, write_text_atomic
from .launch import LAUNCHERS, check_launch, run_job, run_jobs, write_job
from .schedules import BatchSchedule
from .schedules.export import schedule_document
from .train.checkpoint import find_kept

TRIGGERS = ("branch", "gns", "norm")
AUTOBATCH_FORMAT = 1


@dataclass
class AutoBatchConfig:
    """The closed loop: probe points, probes and the rule that raises the batch."""

    probe_at: list[int] | None = None
    """Probe points in tokens; ``None``: log-spaced, ``first_probe_tokens`` × ``probe_factor``^i below
    the run's total."""
    first_probe_tokens: int | None = None
    """The first log-spaced probe point (default: total_tokens / 16)."""
    probe_factor: float = 2.0
    """Ratio of successive log-spaced probe points."""
    window_tokens: int | None = None
    """Tokens every probe branch trains (rounded up to whole steps at every probed batch); ``None``:
    ``window_fraction`` of the probe point's tokens, and at least 8 optimizer steps of the largest
    probed batch."""
    window_fraction: float = 0.25
    """Without ``window_tokens``: the window at a point of t tokens is this × t. A fixed short window
    passes larger batches too early (a short window hides a cost that grows with the tokens trained;
    docs/LOG.md, the closed loop); with log-spaced points ×2 and k = 1, 2 this costs about 2 × fraction
    × (1 + cooldown_fraction) of the run in probe tokens (the probe at the current batch trains only its
    cooldown: the run itself trains the rest first)."""
    probe_k: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """Batch multipliers probed at each point (1 = the current batch, the reference)."""
    replicates: int = 1
    """Probe branches per k on different data windows (2+: the noninf rule)."""
    rule: str | None = option(None, choices=("eps", "noninf"))
    """``eps`` or ``noninf``; ``None``: eps for one replicate, noninf for more."""
    eps: float = 0.01
    """Tolerance in nats: the larger batch is taken when its held-out loss is within this."""
    confidence: float = 0.95
    """Confidence of the noninf rule and of the held-out sampling error under eps."""
    cooldown_fraction: float = 0.25
    """Each probe ends with an LR cooldown over this fraction of its window (as ``critbatch branch``)."""
    eval_seqs: int | None = None
    """Held-out sequences at each probe's end (default: the run's)."""
    max_batch_seqs: int | None = None
    """Never raise the batch above this."""
    act_on: str = option("branch", choices=TRIGGERS)
    """Which trigger moves the batch: ``branch`` (the probe), ``gns`` (the calibrated noise scale; branch
    probes run only until ``calibration_points`` calibrate it) or ``norm`` (the norm test; no branch probes)."""
    confirm: int = 2
    """Raise only after the trigger said so at this many consecutive probe points at the same batch
    (2: a raise seen once is confirmed at the next point first). A wrong raise is never undone, a
    wrong stay is revisited at the next point; confirmation trades a later raise for fewer wrong ones
    (docs/LOG.md: with 1, every seed raised at 125k and ended 0.03 nats behind after the anneal)."""
    confirm_factor: float | None = None
    """With ``confirm`` > 1: after a point whose raise is not yet confirmed, probe next at this factor ×
    the point's tokens (when that comes before the next scheduled point) instead of waiting for the
    next scheduled point, so a confirmed raise comes sooner; the extra point costs its probes.
    ``None``: confirm only at the scheduled points."""
    eps_budget: float | None = None
    """A tolerance for the whole run instead of one per decision: every raise spends the loss gap its
    probe measured (the larger batch's held-out loss minus the current one's, at least 0), and a
    raise whose gap would take the total spent past this budget is not taken (a raise by the gns or
    norm trigger at a point without a branch probe measures no gap and spends nothing). ``None``: each
    decision has its own ``eps``, so raises add up (docs/LOG.md: two raises each within 0.007 ended
    0.02 behind on Shakespeare)."""
    calibration_points: int = 2
    """Probe points whose branch probes calibrate the noise-scale trigger when it acts."""
    norm_eta: float = 1.0
    """η of the norm test: raise when B < B_simple / η²."""
    noise_scale: bool = True
    """Estimate the noise scale at every probe point (for the gns and norm triggers)."""
    gns_b_big: int = 64
    """The noise scale's big batch in sequences."""
    gns_batches: int = 32
    """Big batches averaged by the noise-scale estimate."""
    speculate: bool = how(False)
    """While the probes train, train the next segment at the current batch beside them (in the same
    pool of ``jobs``), so the main run does not wait when the batch stays; when the batch is raised
    that segment is discarded (its tokens are counted in ``result.json``). For several devices; with
    the same thread counts it changes no number (keep ``threads_per_branch`` equal to the run's
    threads on CPU, where the thread count changes the last bits)."""
    device: str = how("auto")
    """Device of the probes."""
    threads_per_branch: int = how(1)
    """CPU threads of each probe process."""
    jobs: int | None = how(None)
    """Probes run at once (``launcher='local'``)."""
    launcher: str = how("local", choices=LAUNCHERS)
    """How probes run: ``local`` (worker processes), ``inprocess``, ``slurm`` or ``submitit-local``."""
    slurm: dict | None = how(None)
    """Options of the ``slurm`` and ``submitit-local`` launchers."""


MIN_PROBE_STEPS = 8
"""The default window gives the largest probed batch at least this many optimizer steps."""


def default_window(point_tokens: int, fraction: float, batch_seqs: int, k_max: float, seq_len: int) -> int:
    """fraction × the point's tokens, but at least MIN_PROBE_STEPS steps of the largest probed batch."""
    return max(int(fraction * point_tokens), int(MIN_PROBE_STEPS * k_max * batch_seqs) * seq_len)


def main_run_lead(point: int, phase_start: int, batch_seqs: int, seq_len: int, window: int, cooldown_fraction: float,
                  limit: int) -> tuple[int, int] | None:
    """(the probe point on the run's step boundaries, the lead): how far the main run goes on at
    ``batch_seqs`` past a probe at ``point`` before it decides — the last step boundary before the
    probe's cooldown (the step that starts at the cooldown's start still runs at the full LR), so the
    probe at the current batch reads all but its cooldown from the run. ``None`` when that would
    reach ``limit`` (the next point the loop may probe at, or the run's end)."""
    step = batch_seqs * seq_len
    t = phase_start + -(-(point - phase_start) // step) * step
    lead = last_step_before_cooldown(t, step, window, cooldown_fraction)
    return (t, lead) if t < lead < limit else None


def lead_limit(point: int, points: list[int], total: int, a: "AutoBatchConfig") -> int:
    """The next tokens the loop may probe at after ``point``: the next scheduled point (or the
    run's end), or sooner, a confirmation point at ``confirm_factor`` × the point."""
    limit = next((p for p in points + [total] if p > point), total)
    if a.confirm_factor and a.confirm > 1:
        limit = min(limit, int(round(point * a.confirm_factor)))
    return limit


Decider = Callable[[int, int], int]
"""A planted decision source for tests: (tokens, batch) -> the batch afterwards."""


def _check(cfg: TrainConfig, a: AutoBatchConfig) -> tuple[list[int], int]:
    validate(cfg)
    if cfg.batch_schedule is not None and len(cfg.batch_schedule) > 1:
        raise ConfigError("--auto-batch decides the batch schedule itself; give one starting batch (--batch-seqs), "
                          f"not batch_schedule={cfg.batch_schedule}")
    B0 = cfg.batch_schedule[0][1] if cfg.batch_schedule else cfg.batch_seqs
    if a.act_on not in TRIGGERS:
        raise ConfigError(f"act_on={a.act_on!r} is not one of {', '.join(TRIGGERS)}")
    if a.window_tokens is not None and a.window_tokens < 1:
        raise ConfigError(f"window_tokens={a.window_tokens} must be positive")
    if not 0 < a.window_fraction <= 4:
        raise ConfigError(f"window_fraction={a.window_fraction} must be in (0, 4]")
    if any(k < 1 for k in a.probe_k):
        raise ConfigError(f"probe_k={a.probe_k}: the closed loop only raises the batch; give k >= 1")
    if not a.probe_k or min(a.probe_k) != 1 or len(set(a.probe_k)) < 2:
        raise ConfigError(f"probe_k={a.probe_k} must hold 1 (the current batch) and at least one larger k")
    if a.probe_factor <= 1:
        raise ConfigError(f"probe_factor={a.probe_factor} must be > 1")
    if a.norm_eta <= 0:
        raise ConfigError(f"norm_eta={a.norm_eta} must be > 0")
    if a.confirm < 1:
        raise ConfigError(f"confirm={a.confirm} must be >= 1")
    if a.confirm_factor is not None and a.confirm_factor <= 1:
        raise ConfigError(f"confirm_factor={a.confirm_factor} must be > 1 (or unset)")
    if a.eps_budget is not None and not a.eps_budget >= 0:
        raise ConfigError(f"eps_budget={a.eps_budget} must be >= 0 (or unset)")
    if a.calibration_points < 1:
        raise ConfigError(f"calibration_points={a.calibration_points} must be >= 1")
    if a.max_batch_seqs is not None and a.max_batch_seqs < B0:
        raise ConfigError(f"max_batch_seqs={a.max_batch_seqs} is below the starting batch {B0}")
    if a.act_on in ("gns", "norm") and not a.noise_scale:
        raise ConfigError(f"act_on={a.act_on} needs the noise scale (drop --no-auto.noise-scale)")
    check_launch(a.launcher, 1, a.slurm)
    if a.probe_at is not None:
        points = sorted(set(int(t) for t in a.probe_at))
        bad = [t for t in points if not 0 < t < cfg.total_tokens]
        if bad:
            raise ConfigError(f"probe_at={bad[0]} must lie inside the run (0, total_tokens={cfg.total_tokens})")
    else:
        first = a.first_probe_tokens if a.first_probe_tokens is not None else max(cfg.total_tokens // 16, 1)
        if first < 1:
            raise ConfigError(f"first_probe_tokens={first} must be positive")
        points = log_spaced_points(cfg.total_tokens, first, a.probe_factor)
    return points, B0


def _spec(cfg: TrainConfig, a: AutoBatchConfig, decider_name: str | None) -> dict:
    return {"format": AUTOBATCH_FORMAT, "train": defining_dict(cfg), "auto": defining_dict(a), "planted": decider_name}


def _segment_config(cfg: TrainConfig, sched: list[list[int]], B0: int, start: int, end: int, keep: bool,
                    also_keep: list[int] = ()) -> TrainConfig:
    """The main run's config for one segment: its schedule so far and its end, with every token-time
    setting pinned to the whole run (LR horizon and cooldown, eval and save intervals)."""
    total = cfg.total_tokens
    lr = cfg.lr_schedule
    keep_at = ([end] if keep else []) + list(also_keep) + [c for c in cfg.checkpoint_tokens if start < c <= end]
    return merge(cfg, {
        "batch_schedule": sched, "batch_seqs": sched[0][1], "lr_ref_batch_seqs": cfg.lr_ref_batch_seqs or B0,
        "total_tokens": end, "checkpoint_tokens": sorted(set(keep_at)),
        "lr_schedule": {"horizon_tokens": lr.horizon_tokens or total,
                        "cooldown_end_tokens": lr.cooldown_end_tokens or (total if lr.cooldown_tokens else None)},
        "save_interval_tokens": cfg.save_interval_tokens or max(total // 10, 1),
        "eval_interval_tokens": cfg.eval_interval_tokens if cfg.eval_interval_tokens is not None else max(total // 20, 1),
    })


class _Loop:
    def __init__(self, cfg: TrainConfig, a: AutoBatchConfig, out: Path, decide: Decider | None, threads: int | None,
                 verbose: bool = False):
        self.cfg, self.a, self.out, self.decide, self.threads, self.verbose = cfg, a, out, decide, threads, verbose
        self.points, self.B0 = _check(cfg, a)
        self.sched: list[list[int]] = [[0, self.B0]]
        self.decisions: list[dict] = []
        self.history: list[tuple] = []  # (CBS low, CBS high, B_simple) of the branch probes
        self.segments: list[Path] = []

    def segment_job(self, i: int, start: int, end: int, init: Path | None, keep: bool, also_keep: list[int] = ()) -> Path:
        """The segment's job directory (written once; content-addressed by config and start)."""
        seg_cfg = _segment_config(self.cfg, [list(p) for p in self.sched], self.B0, start, end, keep, also_keep)
        key = config_hash({"config": defining_dict(seg_cfg), "init": None if init is None else
                           str(init.relative_to(self.out))}, 10)
        d = self.out / "main" / f"seg{i:02d}_{key}"
        write_job(d, seg_cfg, init, eval_at_start=(i == 0), keep_final_checkpoint=True)
        return d

    def segment(self, i: int, start: int, end: int, init: Path | None, keep: bool,
                also_keep: list[int] = ()) -> tuple[Path, dict]:
        d = self.segment_job(i, start, end, init, keep, also_keep)
        self.segments.append(d)
        return d, run_job(d, self.threads)

    def _sweep(self, seg: Path, t: int, beside: Path | None = None) -> dict:
        """The probe at t; ``beside``: a job (the speculative next segment) trained with its branches."""
        a = self.a
        B = int(find_kept(seg, [t])[0].meta["batch_seqs"])
        window = a.window_tokens or default_window(t, a.window_fraction, B, max(a.probe_k), self.cfg.model.seq_len)
        scfg = SweepConfig(run=str(seg), at=[t], k=sorted(a.probe_k), window_tokens=window,
                           replicates=a.replicates, search="grid", cooldown_fraction=a.cooldown_fraction,
                           decide_by="eval", rule=a.rule, eps=a.eps, confidence=a.confidence,
                           eval_seqs=a.eval_seqs, device=a.device, threads_per_branch=a.threads_per_branch,
                           jobs=a.jobs, launcher=a.launcher, slurm=a.slurm)
        if beside is not None:  # the probe branches and the next segment, in one pool
            plan = plan_sweep(scfg)
            dirs = [ensure_branch(plan.run_dir, branch_spec(plan, plan.points[0], k, r))
                    for k in plan.cfg.k for r in range(a.replicates)]
            run_jobs(dirs + [beside], plan.cfg.jobs, a.threads_per_branch, a.launcher, slurm=a.slurm)
        res = run_sweep(scfg, progress=False)
        p = res.curve["points"][0]
        return {"sweep": str(res.sweep_dir.relative_to(self.out)), "ks": p["ks"], "batch_seqs": p["batch_seqs"],
                "eval_losses": p["losses"]["eval"], "eval_se": p.get("eval_se"), "diverged": p["diverged"],
                "rule": p["rule"], "eps": a.eps, "status": p["status"], "passes": p["passes"],
                "undetermined_ks": p["undetermined_ks"], "undetermined_reason": p.get("undetermined_reason"),
                "cbs_low_seqs": p["cbs_low_seqs"], "cbs_high_seqs": p["cbs_high_seqs"],
                "max_paired_eval_se": p.get("max_paired_eval_se"), "window_tokens": res.curve["window_tokens"],
                "probe_tokens": p["branch_tokens"], "_point": p}

    def _noise_scale(self, seg: Path, t: int) -> dict:
        a = self.a
        res = gns_at_checkpoints(GNSConfig(run=str(seg), at=[t], b_big=a.gns_b_big, n_batches=a.gns_batches,
                                           device=a.device), progress=False)
        p = next(x for x in res["points"] if x["requested_tokens"] == t or x["tokens"] == t)
        return {"b_simple_seqs": p["b_simple_seqs"], "ci_seqs": [p["ci_low_seqs"], p["ci_high_seqs"]],
                "tokens": a.gns_batches * a.gns_b_big * self.cfg.model.seq_len, "seconds": p["seconds"]}

    def probe(self, i: int, seg: Path, t: int, ck, beside: Path | None = None) -> dict:
        """Decide at probe point i (the segment's kept checkpoint ``ck``, requested at t)."""
        a = self.a
        B = int(ck.meta["batch_seqs"])
        rec: dict = {"point": i, "tokens": ck.tokens, "requested_tokens": t, "batch_before": B,
                     "lr_multiplier_before": BatchSchedule(tuple(map(tuple, self.sched)), self.cfg.model.seq_len,
                                                           self.cfg.optim.lr_rule, self.B0).lr_multiplier_at(ck.tokens),
                     "segment": str(seg.relative_to(self.out))}
        cap = a.max_batch_seqs
        if self.decide is not None:  # a planted decision source (tests)
            after = int(self.decide(ck.tokens, B))
            rec.update(acted_on="planted", verdicts={"planted": "raise" if after > B else "stay"}, batch_after=after,
                       cost={"probe_tokens": 0, "gns_tokens": 0})
            return rec
        ns = self._noise_scale(seg, t) if a.noise_scale else None
        b_simple = ns["b_simple_seqs"] if ns else None
        m = calibrate(self.history)
        usable = self._calibrations()
        probe = self._sweep(seg, t, beside) if self._branch_probe() else None
        verdicts: dict = {}
        if probe is not None:
            v, b_after = probe_verdict(probe.pop("_point") | {"ks": probe["ks"]}, B, cap)
            verdicts["branch"] = v
            self.history.append((probe["cbs_low_seqs"] or None, probe["cbs_high_seqs"], b_simple))
        if ns is not None:
            verdicts["gns"] = gns_verdict(b_simple, B, m)
            verdicts["norm"] = norm_verdict(b_simple, B, a.norm_eta)
            rec["noise_scale"] = ns | {"calibrated_multiple": m, "calibrated_on": usable}
        acted = a.act_on if verdicts.get(a.act_on) is not None else "branch"
        if acted == "branch":
            after = b_after
        else:
            after = 2 * B if (verdicts[acted] == "raise" and (cap is None or 2 * B <= cap)) else B
        if after > B and a.confirm > 1:  # a raise must be seen at `confirm` consecutive points at this batch
            streak = 1
            for d in reversed(self.decisions):
                if d["batch_before"] != B or d["verdicts"].get(d["acted_on"]) != "raise":
                    break
                streak += 1
            rec["confirmations"] = f"{min(streak, a.confirm)} of {a.confirm}"
            if streak < a.confirm:
                after = B
        if after > B and a.eps_budget is not None and probe is not None:  # the run's tolerance, shared
            gap = probe_gap(probe, after / B)
            spent = sum(d.get("eps_spent", 0.0) for d in self.decisions)
            rec["eps_budget"] = {"spent_before": spent, "gap": gap, "budget": a.eps_budget}
            if gap is None or spent + gap > a.eps_budget + 1e-12:
                after = B
            else:
                rec["eps_spent"] = gap
        rec.update(probe=probe, verdicts=verdicts, acted_on=acted, batch_after=after,
                   cost={"probe_tokens": probe["probe_tokens"] if probe else 0, "gns_tokens": ns["tokens"] if ns else 0})
        return rec

    def next_point(self, cur: int, last: dict | None = None) -> int:
        """The next probe point after ``cur`` tokens (the run's end when none is left): the next
        scheduled point, or sooner, ``confirm_factor`` × ``cur``, when ``last`` saw a raise that is
        still unconfirmed."""
        total = self.cfg.total_tokens
        end = next((p for p in self.points if p > cur), total)
        a = self.a
        if (last is not None and a.confirm_factor and last["batch_after"] == last["batch_before"]
                and str(last.get("confirmations", "")).startswith(tuple(f"{n} of" for n in range(1, a.confirm)))):
            sooner = int(round(cur * a.confirm_factor))
            if cur < sooner < end:
                return sooner
        return end

    def write_decisions(self) -> None:
        write_text_atomic(self.out / "decisions.jsonl", "".join(json.dumps(d, sort_keys=True) + "\n" for d in self.decisions))

    def _calibrations(self) -> int:
        """Earlier probe points whose branch probe and noise scale can calibrate the gns trigger."""
        return len([h for h in self.history if (h[0] or h[1]) and h[2]])

    def _branch_probe(self) -> bool:
        """Whether the next probe point runs a branch probe."""
        return self.a.act_on == "branch" or (self.a.act_on == "gns" and self._calibrations() < self.a.calibration_points)

    def lead(self, t: int) -> int | None:
        """How far the segment that ends at probe point ``t`` goes on before the probe decides
        (:func:`main_run_lead`), or ``None``: no branch probe at t, speculation (it trains the next
        segment itself), a planted decision source, or a lead that would reach the next point the
        loop may probe at (a confirmation point included) or the run's end."""
        a, T, total = self.a, self.cfg.model.seq_len, self.cfg.total_tokens
        if not self._branch_probe() or a.speculate or self.decide is not None or t >= total:
            return None
        start, B = self.sched[-1]
        window = a.window_tokens or default_window(t, a.window_fraction, B, max(a.probe_k), T)
        got = main_run_lead(t, start, B, T, window, a.cooldown_fraction, lead_limit(t, self.points, total, a))
        return None if got is None else got[1]

    def run(self) -> dict:
        t0 = time.time()
        init, total, cur = None, self.cfg.total_tokens, 0
        res: dict = {}
        end = self.next_point(cur)
        while True:
            lead = self.lead(end) if end < total else None
            seg, res = self.segment(len(self.segments), cur, lead or end, init, keep=end < total,
                                    also_keep=[end] if lead else [])
            if res.get("diverged") or end == total:
                break
            ck = find_kept(seg, [end])[0]
            nxt = next((p for p in self.points + [total] if p > ck.tokens), total)
            beside = (self.segment_job(len(self.segments), ck.tokens, nxt, ck.path, keep=nxt < total)
                      if self.a.speculate and self.decide is None else None)
            rec = self.probe(len(self.decisions), seg, end, ck, beside)
            if beside is not None:
                rec["speculative_segment"] = {"dir": str(beside.relative_to(self.out)),
                                              "kept": rec["batch_after"] == rec["batch_before"]}
            self.decisions.append(rec)
            self.write_decisions()
            if self.verbose:
                v = ", ".join(f"{k} {x}" for k, x in rec["verdicts"].items() if x is not None)
                print(f"[auto-batch] at {rec['tokens']:,} tokens: batch {rec['batch_before']} -> {rec['batch_after']} "
                      f"({v}; acted on {rec['acted_on']})", file=sys.stderr, flush=True)
            if rec["batch_after"] != rec["batch_before"]:
                self.sched.append([rec["tokens"], rec["batch_after"]])
            init, cur = ck.path, ck.tokens
            if lead:  # the run went on at B past the point: kept when the batch stays
                kept = rec["batch_after"] == rec["batch_before"]
                B_T = rec["batch_before"] * self.cfg.model.seq_len
                rec["main_run_lead"] = {"to_tokens": lead, "tokens": lead - ck.tokens, "steps": (lead - ck.tokens) // B_T,
                                        "kept": kept}
                self.write_decisions()
                if kept:
                    init, cur = find_kept(seg, [lead])[0].path, lead
            end = self.next_point(ck.tokens, rec)
            if beside is not None and end != nxt:  # the speculative segment ran to a point no longer next
                rec["speculative_segment"]["kept"] = False
                self.write_decisions()
        self.write_decisions()
        return self.finish(res, time.time() - t0)

    def finish(self, last: dict, wall: float) -> dict:
        T = self.cfg.model.seq_len
        results = [read_json(d / "result.json") for d in self.segments if (d / "result.json").is_file()]
        sched = BatchSchedule(tuple(map(tuple, self.sched)), T, self.cfg.optim.lr_rule, self.B0, self.cfg.optim.adam_rule)
        write_json_atomic(self.out / "schedule.json", schedule_document(sched, derived_from={
            "closed_loop": str(self.out), "act_on": self.a.act_on, "decisions": len(self.decisions)},
            notes=[f"taken by the closed loop (--auto-batch) at {len(self.decisions)} probe points"]))
        leads = [d["main_run_lead"] for d in self.decisions if d.get("main_run_lead")]
        steps = sum(r["steps"] for r in results) - sum(x["steps"] for x in leads if not x["kept"])
        tokens = last.get("tokens", 0)
        probe_tokens = sum(d["cost"]["probe_tokens"] for d in self.decisions)
        gns_tokens = sum(d["cost"]["gns_tokens"] for d in self.decisions)
        spec = [d["speculative_segment"] for d in self.decisions if d.get("speculative_segment")]
        discarded = 0
        for sp in spec:
            if not sp["kept"] and (self.out / sp["dir"] / "result.json").is_file():
                r = read_json(self.out / sp["dir"] / "result.json")
                discarded += r["tokens"] - r["start_tokens"]
        small_steps = steps_for([(0, self.B0)], T, self.cfg.total_tokens)
        out = {
            "diverged": bool(last.get("diverged")), "diverged_reason": last.get("diverged_reason"),
            "final_eval_loss": last.get("final_eval_loss"), "final_eval_loss_se": last.get("final_eval_loss_se"),
            "final_train_loss": last.get("final_train_loss"), "tokens": tokens, "steps": steps,
            "schedule": sched.as_pairs(), "start_batch_seqs": self.B0, "final_batch_seqs": self.sched[-1][1],
            "probe_points": len(self.decisions), "raises": sum(d["batch_after"] > d["batch_before"] for d in self.decisions),
            "probe_tokens": probe_tokens, "gns_tokens": gns_tokens,
            "probe_fraction": probe_tokens / tokens if tokens else None,
            "measurement_fraction": (probe_tokens + gns_tokens) / tokens if tokens else None,
            "small_control_steps": small_steps, "steps_saved_pct": 100.0 * (1 - steps / small_steps) if small_steps else 0.0,
            "segments": [str(d.relative_to(self.out)) for d in self.segments], "act_on": self.a.act_on,
            "speculation": {"segments": len(spec), "kept": sum(sp["kept"] for sp in spec),
                            "discarded_tokens": discarded},
            "main_run_leads": {"points": len(leads), "kept": sum(x["kept"] for x in leads),
                               "tokens": sum(x["tokens"] for x in leads),
                               "discarded_tokens": sum(x["tokens"] for x in leads if not x["kept"])},
            "agreement": agreement(self.decisions), "wall_time_s": wall,
        }
        write_json_atomic(self.out / "result.json", out)
        return out


def probe_gap(probe: dict, k: float) -> float | None:
    """The probe's measured cost of batch k·B: mean held-out loss at k minus at k = 1 (at least 0)."""
    ks = [round(x, 9) for x in probe["ks"]]
    if round(k, 9) not in ks or 1.0 not in ks:
        return None
    losses = probe["eval_losses"]
    mean = [sum(v) / len(v) for v in losses]
    return max(0.0, mean[ks.index(round(k, 9))] - mean[ks.index(1.0)])


def agreement(decisions: list[dict]) -> dict:
    """For each cheaper trigger: at how many probe points it agreed with the branch probe."""
    out = {}
    for name in ("gns", "norm"):
        pairs = [(d["verdicts"].get("branch"), d["verdicts"].get(name)) for d in decisions if "verdicts" in d]
        pairs = [(b, v) for b, v in pairs if b in ("raise", "stay") and v is not None]
        out[name] = {"points": len(pairs), "agree": sum(b == v for b, v in pairs)}
    return out


def run_auto_batch(cfg: TrainConfig, auto: AutoBatchConfig, out: str | Path, *, decide: Decider | None = None,
                   threads: int | None = None, verbose: bool = False) -> dict:
    """Train ``cfg`` with the closed loop into ``out``; returns (and writes) ``result.json``'s content.
    ``decide``: a planted decision source instead of probes (tests); ``verbose``: a line on stderr
    per decision."""
    out = Path(out)
    _check(cfg, auto)
    check_output(out, "--out")
    spec = _spec(cfg, auto, getattr(decide, "__name__", "planted") if decide else None)
    if (out / "autobatch.json").is_file():
        if read_json(out / "autobatch.json") != spec:
            raise ConfigError(f"{out} holds a closed-loop run of other settings; use another --out")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no closed-loop run; use an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "autobatch.json", spec)
    return _Loop(cfg, auto, out, decide, threads, verbose).run()


def describe(result: dict) -> list[str]:
    """Lines for the command line."""
    sched = " -> ".join(f"{b}" + (f" @{t:,}" if t else "") for t, b in result["schedule"])
    lines = [f"batch {sched} (sequences @ tokens); {result['raises']} raise(s) at {result['probe_points']} probe points",
             f"final eval loss {result['final_eval_loss']:.4f} ± {result['final_eval_loss_se']:.4f}, "
             f"{result['steps']:,} optimizer steps ({result['steps_saved_pct']:.0f}% fewer than "
             f"{result['small_control_steps']:,} at the starting batch)"
             if not result["diverged"] else f"diverged: {result['diverged_reason']}",
             f"measurement cost: probe tokens {result['probe_tokens']:,} ({100 * (result['probe_fraction'] or 0):.0f}% "
             f"of the run's {result['tokens']:,}), noise-scale tokens {result['gns_tokens']:,}"
             + (f"; {result['main_run_leads']['discarded_tokens']:,} tokens the run trained ahead of a probe were "
                f"dropped at its raises" if (result.get("main_run_leads") or {}).get("discarded_tokens") else "")]
    ag = result.get("agreement") or {}
    for name, v in ag.items():
        if v["points"]:
            lines.append(f"{name} trigger agreed with the branch probe at {v['agree']} of {v['points']} points")
    return lines

