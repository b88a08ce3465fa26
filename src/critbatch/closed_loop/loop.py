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
the segment goes on past the point to the last step before that cooldown (:func:`critbatch.closed_loop.policy.main_run_lead`,
keeping a checkpoint at the point): the probe at B starts there and trains only its cooldown
(:func:`critbatch.branch.parent_continuation`), and when the batch stays the run continues
from there too. When the batch is raised the lead is discarded (its tokens and steps are counted
apart in ``result.json``), and the probe at the new batch is in turn, up to its cooldown, the run's
own continuation at that batch: each probe branch keeps a checkpoint at its last step before the
cooldown, and the next segment starts there (:meth:`ClosedLoop.probe_continuation`, where the
run's steps at the new batch are exactly the probe's), else from the point. Either way one of the
two probes' stretches before the cooldown becomes the run.

Beside the branch probe, two cheaper triggers are read at every probe point from one noise-scale
estimate (:mod:`critbatch.analysis.triggers`; the policy that turns verdicts into a batch is
:mod:`critbatch.closed_loop.policy`): the noise scale with a multiple calibrated on this
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
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from ..analysis.describe import describe_closed_loop
from ..analysis.triggers import calibrate, gns_verdict, norm_verdict, probe_verdict, steps_for
from ..branch import BranchSpec, SweepConfig, agreeing_steps, run_sweep
from ..config import TrainConfig, config_hash, defining_dict, from_dict, merge
from ..errors import ConfigError
from ..gns.checkpoints import GNSConfig, gns_at_checkpoints
from ..io import check_output, read_json, write_json_atomic, write_text_atomic
from ..launch import run_job, write_job
from ..records import (CBSPoint, ClosedLoopResult, ProbeDecision, ProbeEvidence, decision_measurement, measurement_tokens,
                       read_run_result)
from ..schedules import BatchSchedule
from ..schedules.export import schedule_document
from ..train import run_defaults
from ..train.checkpoint import CheckpointInfo, find_kept, kept_checkpoints
from .config import AUTOBATCH_FORMAT, AutoBatchConfig, check, default_window, measures_noise_scale
from .policy import (agreement, decide_raise, futile_point, lead_limit, main_run_lead, next_point, point_measurement,
                     raise_streak)

Decider = Callable[[int, int], int]
"""A planted decision source for tests: (tokens, batch) -> the batch afterwards."""


def read_spec(out: str | Path) -> dict:
    """A closed-loop run's ``autobatch.json`` (what was asked), as today's code writes it: a run
    started before the measurement budget existed had none (``measurement_budget`` null)."""
    spec = read_json(Path(out) / "autobatch.json")
    spec["auto"].setdefault("measurement_budget", None)
    return spec


def _spec(cfg: TrainConfig, a: AutoBatchConfig, decider_name: str | None) -> dict:
    return {"format": AUTOBATCH_FORMAT, "train": defining_dict(cfg), "auto": defining_dict(a), "planted": decider_name}


def segment_config(cfg: TrainConfig, sched: list[list[int]], B0: int, start: int, end: int, keep: bool,
                   also_keep: list[int] = ()) -> TrainConfig:
    """The main run's config for one segment: its schedule so far and its end, with every token-time
    setting pinned to the whole run's (:func:`critbatch.train.run_defaults`: LR horizon and
    cooldown, eval and save intervals), so the segments train as the whole run would."""
    keep_at = ([end] if keep else []) + list(also_keep) + [c for c in cfg.checkpoint_tokens if start < c <= end]
    return merge(cfg, {
        "batch_schedule": sched, "batch_seqs": sched[0][1], "lr_ref_batch_seqs": cfg.lr_ref_batch_seqs or B0,
        "total_tokens": end, "checkpoint_tokens": sorted(set(keep_at)), **run_defaults(cfg)})


def probe_evidence(curve: dict, point: CBSPoint, sweep: str, eps: float) -> ProbeEvidence:
    """What a closed-loop decision records of its branch probe (the decided point of a one-point sweep)."""
    p = point
    return {"sweep": sweep, "ks": p["ks"], "batch_seqs": p["batch_seqs"], "eval_losses": p["losses"]["eval"],
            "eval_se": p.get("eval_se"), "diverged": p["diverged"], "rule": p["rule"], "eps": eps,
            "status": p["status"], "passes": p["passes"], "undetermined_ks": p["undetermined_ks"],
            "undetermined_reason": p.get("undetermined_reason"), "cbs_low_seqs": p["cbs_low_seqs"],
            "cbs_high_seqs": p["cbs_high_seqs"], "max_paired_eval_se": p.get("max_paired_eval_se"),
            "window_tokens": curve["window_tokens"], "probe_tokens": p["branch_tokens"]}


class ClosedLoop:
    """One closed-loop run in ``out``: segments of the main run, a probe at each point, the policy's
    decision, until the run's end."""

    def __init__(self, cfg: TrainConfig, a: AutoBatchConfig, out: Path, decide: Decider | None, threads: int | None,
                 verbose: bool = False):
        self.cfg, self.a, self.out, self.decide, self.threads, self.verbose = cfg, a, out, decide, threads, verbose
        self.points, self.B0 = check(cfg, a)
        self.sched: list[list[int]] = [[0, self.B0]]
        self.decisions: list[ProbeDecision] = []
        self.history: list[tuple] = []
        """(CBS low, CBS high, B_simple) of the branch probes: what calibrates the noise-scale trigger."""
        self.segments: list[Path] = []
        self.skipped: dict | None = None
        """The probe points left out because none of them could lead to a raise (:func:`futile_point`)."""

    def futile(self, t: int) -> str | None:
        """Why the loop stops probing at ``t`` (:func:`critbatch.closed_loop.policy.futile_point`), or
        ``None``; never with a planted decision source (it may raise at any point)."""
        a, total, T = self.a, self.cfg.total_tokens, self.cfg.model.seq_len
        if self.decide is not None or t >= total:
            return None
        start, B = self.sched[-1]
        branch, noise = self._branch_probe(), measures_noise_scale(a)

        def cost(p: int) -> int:
            return point_measurement(p, B, start, T, a, lead_limit(p, self.points, total, a), branch, noise)

        spent = sum(decision_measurement(d) for d in self.decisions)
        return futile_point(t, B, raise_streak(B, self.decisions) - 1, self.points, total, a, spent, cost)

    def segment_job(self, i: int, start: int, end: int, init: Path | None, keep: bool, also_keep: list[int] = ()) -> Path:
        """The segment's job directory (written once; content-addressed by config and start)."""
        seg_cfg = segment_config(self.cfg, [list(p) for p in self.sched], self.B0, start, end, keep, also_keep)
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

    def branch_probe(self, seg: Path, t: int, beside: Path | None = None) -> tuple[ProbeEvidence, CBSPoint]:
        """The probe at t (a one-point grid sweep of the segment); ``beside``: a job (the speculative
        next segment) trained in the same pool as its branches."""
        a = self.a
        B = int(find_kept(seg, [t])[0].meta["batch_seqs"])
        window = a.window_tokens or default_window(t, a.window_fraction, B, max(a.probe_k), self.cfg.model.seq_len)
        scfg = SweepConfig(run=str(seg), at=[t], k=sorted(a.probe_k), window_tokens=window,
                           replicates=a.replicates, search="grid", cooldown_fraction=a.cooldown_fraction,
                           decide_by="eval", rule=a.rule, eps=a.eps, confidence=a.confidence,
                           eval_seqs=a.eval_seqs, device=a.device, threads_per_branch=a.threads_per_branch,
                           jobs=a.jobs, launcher=a.launcher, slurm=a.slurm, keep_before_cooldown=True,
                           early_stop_gap=2 * a.eps if a.early_stop and a.cooldown_fraction > 0 and a.eps > 0 else None)
        res = run_sweep(scfg, progress=False, beside=[beside] if beside is not None else [])
        p = res.curve["points"][0]
        return probe_evidence(res.curve, p, str(res.sweep_dir.relative_to(self.out)), a.eps), p

    def noise_scale(self, seg: Path, t: int) -> dict:
        a = self.a
        res = gns_at_checkpoints(GNSConfig(run=str(seg), at=[t], b_big=a.gns_b_big, n_batches=a.gns_batches,
                                           device=a.device), progress=False)
        p = next(x for x in res["points"] if x["requested_tokens"] == t or x["tokens"] == t)
        return {"b_simple_seqs": p["b_simple_seqs"], "ci_seqs": [p["ci_low_seqs"], p["ci_high_seqs"]],
                "tokens": a.gns_batches * a.gns_b_big * self.cfg.model.seq_len, "seconds": p["seconds"]}

    def probe(self, i: int, seg: Path, t: int, ck, beside: Path | None = None) -> ProbeDecision:
        """Decide at probe point i (the segment's kept checkpoint ``ck``, requested at t)."""
        a = self.a
        B = int(ck.meta["batch_seqs"])
        rec: ProbeDecision = {
            "point": i, "tokens": ck.tokens, "requested_tokens": t, "batch_before": B,
            "lr_multiplier_before": BatchSchedule(tuple(map(tuple, self.sched)), self.cfg.model.seq_len,
                                                  self.cfg.optim.lr_rule, self.B0).lr_multiplier_at(ck.tokens),
            "segment": str(seg.relative_to(self.out))}
        if self.decide is not None:  # a planted decision source (tests)
            after = int(self.decide(ck.tokens, B))
            rec.update(acted_on="planted", verdicts={"planted": "raise" if after > B else "stay"}, batch_after=after,
                       cost={"probe_tokens": 0, "gns_tokens": 0})
            return rec
        ns = self.noise_scale(seg, t) if measures_noise_scale(a) else None
        b_simple = ns["b_simple_seqs"] if ns else None
        m = calibrate(self.history)
        usable = self._calibrations()
        probe, branch_after, verdicts = None, None, {}
        if self._branch_probe():
            probe, point = self.branch_probe(seg, t, beside)
            verdicts["branch"], branch_after = probe_verdict(point, B, a.max_batch_seqs)
            self.history.append((probe["cbs_low_seqs"] or None, probe["cbs_high_seqs"], b_simple))
        if ns is not None:
            verdicts["gns"] = gns_verdict(b_simple, B, m)
            verdicts["norm"] = norm_verdict(b_simple, B, a.norm_eta)
            rec["noise_scale"] = ns | {"calibrated_multiple": m, "calibrated_on": usable}
        d = decide_raise(B, verdicts, branch_after, probe, self.decisions, a)
        for key in ("confirmations", "eps_budget", "eps_spent"):
            if getattr(d, key) is not None:
                rec[key] = getattr(d, key)
        rec.update(probe=probe, verdicts=verdicts, acted_on=d.acted_on, batch_after=d.batch_after,
                   cost={"probe_tokens": probe["probe_tokens"] if probe else 0, "gns_tokens": ns["tokens"] if ns else 0})
        return rec

    def probe_continuation(self, seg: Path, ck: CheckpointInfo, rec: ProbeDecision,
                           seg_cfg: TrainConfig) -> tuple[Path, CheckpointInfo] | None:
        """On a raise: the branch probe at the new batch (replicate 0) and its kept checkpoint at its
        last step before the cooldown, when the run at the new batch (``seg_cfg``, the next
        segment's config) takes exactly the probe's steps from the point up to there — the run then
        continues from that checkpoint instead of training those steps again; else ``None``."""
        t = ck.tokens
        for d, spec, kept in self.probe_checkpoints(seg, t, rec):
            if (spec.batch_seqs, spec.replicate) != (rec["batch_after"], 0):
                continue
            c = kept[-1]
            if c.tokens in agreeing_steps(seg_cfg, spec.train_config(), t, c.tokens, int(ck.meta["offset_seqs"])):
                return d, c
        return None

    @staticmethod
    def probe_checkpoints(seg: Path, t: int, rec: ProbeDecision) -> list[tuple[Path, BranchSpec, list[CheckpointInfo]]]:
        """The branch probes at ``t`` (of the point's window) that kept checkpoints past the point:
        each with its spec and those checkpoints."""
        probe = rec.get("probe")
        if not probe or not (seg / "branches").is_dir():
            return []
        out = []
        for d in sorted((seg / "branches").iterdir()):
            if not (d / "branch.json").is_file():
                continue
            spec = BranchSpec.read(d)
            kept = [c for c in kept_checkpoints(d) if t < c.tokens]
            if (spec.point_tokens, spec.window_tokens) == (t, probe["window_tokens"]) and kept:
                out.append((d, spec, kept))
        return out

    def drop_unused_probe_checkpoints(self, seg: Path, t: int, rec: ProbeDecision) -> None:
        """The probes' checkpoints before their cooldown that the run did not continue from: deleted
        (a model's weights and optimizer state each; nothing reads them again)."""
        used = (self.out / rec["continued_from_probe"]["branch"]).resolve() if rec.get("continued_from_probe") else None
        for d, _spec, kept in self.probe_checkpoints(seg, t, rec):
            if d.resolve() != used:
                for c in kept:
                    shutil.rmtree(c.path)

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
        (:func:`critbatch.closed_loop.policy.main_run_lead`), or ``None``: no branch probe at t,
        speculation (it trains the next segment itself), a planted decision source, or a lead that
        would reach the next point the loop may probe at (a confirmation point included) or the run's end."""
        a, T, total = self.a, self.cfg.model.seq_len, self.cfg.total_tokens
        if not self._branch_probe() or a.speculate or self.decide is not None or t >= total:
            return None
        start, B = self.sched[-1]
        window = a.window_tokens or default_window(t, a.window_fraction, B, max(a.probe_k), T)
        got = main_run_lead(t, start, B, T, window, a.cooldown_fraction, lead_limit(t, self.points, total, a))
        return None if got is None else got[1]

    def run(self) -> ClosedLoopResult:
        t0 = time.time()
        init, total, cur = None, self.cfg.total_tokens, 0
        res: dict = {}
        end = next_point(cur, self.points, total, None, self.a)
        while True:
            why = self.futile(end)
            if why is not None:  # no point from here on can raise the batch: the run trains to its end
                self.skipped = {"from_tokens": end, "points": [end] + [p for p in self.points if p > end],
                                "batch_seqs": self.sched[-1][1], "reason": why}
                if self.verbose:
                    print(f"[auto-batch] no probe from {end:,} tokens on: {why}", file=sys.stderr, flush=True)
                end = total
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
            end = next_point(ck.tokens, self.points, total, rec, self.a)
            if rec["batch_after"] > rec["batch_before"]:  # the probe at the new batch is the run's own continuation
                # the segment's config as it ran (resolved), with the schedule the run takes now
                cont = self.probe_continuation(seg, ck, rec, merge(from_dict(TrainConfig, read_json(seg / "config.json")), {
                    "batch_schedule": [list(p) for p in self.sched], "batch_seqs": self.sched[0][1]}))
                if cont is not None and cont[1].tokens < end:
                    d, c = cont
                    T_after = rec["batch_after"] * self.cfg.model.seq_len
                    rec["continued_from_probe"] = {"branch": str(d.relative_to(self.out)), "to_tokens": c.tokens,
                                                   "tokens": c.tokens - ck.tokens, "steps": (c.tokens - ck.tokens) // T_after}
                    rec["cost"]["probe_kept_tokens"] = c.tokens - ck.tokens  # part of the run: not measurement
                    self.write_decisions()
                    init, cur = c.path, c.tokens
            self.drop_unused_probe_checkpoints(seg, ck.tokens, rec)
            if lead:  # the run went on at B past the point: kept when the batch stays
                kept = rec["batch_after"] == rec["batch_before"]
                B_T = rec["batch_before"] * self.cfg.model.seq_len
                rec["main_run_lead"] = {"to_tokens": lead, "tokens": lead - ck.tokens, "steps": (lead - ck.tokens) // B_T,
                                        "kept": kept}
                rec["cost"]["lead_dropped_tokens"] = 0 if kept else lead - ck.tokens  # measurement too
                self.write_decisions()
                if kept:
                    init, cur = find_kept(seg, [lead])[0].path, lead
            if beside is not None and end != nxt:  # the speculative segment ran to a point no longer next
                rec["speculative_segment"]["kept"] = False
                self.write_decisions()
        self.write_decisions()
        return self.finish(res, time.time() - t0)

    def finish(self, last: dict, wall: float) -> ClosedLoopResult:
        T = self.cfg.model.seq_len
        results = [read_run_result(d) for d in self.segments if (d / "result.json").is_file()]
        sched = BatchSchedule(tuple(map(tuple, self.sched)), T, self.cfg.optim.lr_rule, self.B0, self.cfg.optim.adam_rule)
        write_json_atomic(self.out / "schedule.json", schedule_document(sched, derived_from={
            "closed_loop": str(self.out), "act_on": self.a.act_on, "decisions": len(self.decisions)},
            notes=[f"taken by the closed loop (--auto-batch) at {len(self.decisions)} probe points"]))
        leads = [d["main_run_lead"] for d in self.decisions if d.get("main_run_lead")]
        conts = [d["continued_from_probe"] for d in self.decisions if d.get("continued_from_probe")]
        steps = (sum(r["steps"] for r in results) - sum(x["steps"] for x in leads if not x["kept"])
                 + sum(x["steps"] for x in conts))
        tokens = last.get("tokens", 0)
        probe_tokens = sum(d["cost"]["probe_tokens"] for d in self.decisions)
        gns_tokens = sum(d["cost"]["gns_tokens"] for d in self.decisions)
        spec = [d["speculative_segment"] for d in self.decisions if d.get("speculative_segment")]
        discarded = 0
        for sp in spec:
            if not sp["kept"] and (self.out / sp["dir"] / "result.json").is_file():
                r = read_run_result(self.out / sp["dir"])
                discarded += r["tokens"] - r["start_tokens"]
        small_steps = steps_for([(0, self.B0)], T, self.cfg.total_tokens)
        out = {
            "diverged": bool(last.get("diverged")), "diverged_reason": last.get("diverged_reason"),
            "final_eval_loss": last.get("final_eval_loss"), "final_eval_loss_se": last.get("final_eval_loss_se"),
            "final_train_loss": last.get("final_train_loss"), "tokens": tokens, "steps": steps,
            "schedule": sched.as_pairs(), "start_batch_seqs": self.B0, "final_batch_seqs": self.sched[-1][1],
            "probe_points": len(self.decisions), "skipped_probe_points": self.skipped,
            "raises": sum(d["batch_after"] > d["batch_before"] for d in self.decisions),
            "probe_tokens": probe_tokens, "gns_tokens": gns_tokens,
            "probe_kept_tokens": sum(x["tokens"] for x in conts),
            "probe_fraction": probe_tokens / tokens if tokens else None,
            "small_control_steps": small_steps, "steps_saved_pct": 100.0 * (1 - steps / small_steps) if small_steps else 0.0,
            "segments": [str(d.relative_to(self.out)) for d in self.segments], "act_on": self.a.act_on,
            "speculation": {"segments": len(spec), "kept": sum(sp["kept"] for sp in spec),
                            "discarded_tokens": discarded},
            "main_run_leads": {"points": len(leads), "kept": sum(x["kept"] for x in leads),
                               "tokens": sum(x["tokens"] for x in leads),
                               "discarded_tokens": sum(x["tokens"] for x in leads if not x["kept"])},
            "agreement": agreement(self.decisions), "wall_time_s": wall,
        }
        out["measurement_tokens"] = measurement_tokens(out)
        out["measurement_fraction"] = out["measurement_tokens"] / tokens if tokens else None
        write_json_atomic(self.out / "result.json", out)
        return out


def run_auto_batch(cfg: TrainConfig, auto: AutoBatchConfig, out: str | Path, *, decide: Decider | None = None,
                   threads: int | None = None, verbose: bool = False) -> dict:
    """Train ``cfg`` with the closed loop into ``out``; returns (and writes) ``result.json``'s content.
    ``decide``: a planted decision source instead of probes (tests); ``verbose``: a line on stderr
    per decision."""
    out = Path(out)
    check(cfg, auto)
    check_output(out, "--out")
    spec = _spec(cfg, auto, getattr(decide, "__name__", "planted") if decide else None)
    if (out / "autobatch.json").is_file():
        if read_spec(out) != spec:
            raise ConfigError(f"{out} holds a closed-loop run of other settings; use another --out")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no closed-loop run; use an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "autobatch.json", spec)
    return ClosedLoop(cfg, auto, out, decide, threads, verbose).run()


def describe(result: ClosedLoopResult) -> list[str]:
    """Lines for the command line (:func:`critbatch.analysis.describe.describe_closed_loop`)."""
    return describe_closed_loop(result)
