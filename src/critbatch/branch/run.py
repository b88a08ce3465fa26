"""Running a sweep: the branches it needs (all of a grid, or those the adaptive search asks for),
trained through a launcher (in process, worker processes, torchrun, Slurm), alone or stacked, with
the early-stop rule of each; then the curve decided and written. :func:`run_sweep` is the one entry
point for every caller (the command line, the demo, the closed loop's probes)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Iterable

from ..analysis.curve import attach_noise_scale
from ..config import to_dict
from ..io import read_json, read_jsonl, write_json_atomic
from ..launch import run_job, run_jobs
from ..progress import Progress
from ..records import BranchOutcome, CBSCurve, read_curve, read_run_result
from ..train.early_stop import STOP_RULE_FILE, step_records, stopped_reading
from ..train.trackers import log_curve
from .config import EARLY_STOP_MIN_SPANS, STACK_CUDA, SweepConfig
from .continuation import continuation_tokens, cooldown_tokens
from .curve import branch_outcome, build_curve, decide_point, write_curve
from .plan import BranchPoint, SweepPlan, new_search, plan_sweep, round_k
from .spec import branch_spec, ensure_branch


def run_branch_dir(branch_dir: str | Path, threads: int | None = None, callbacks: Iterable = ()) -> dict | None:
    """Train one branch (or return its finished result)."""
    return run_job(branch_dir, threads, callbacks)


def stop_rule(plan: SweepPlan, point: BranchPoint, ref_dir: Path) -> dict | None:
    """The early-stop rule of a branch at ``point`` against its finished reference branch ``ref_dir``
    (``None`` when the sweep does not stop early or the reference diverged)."""
    cfg = plan.cfg
    if cfg.early_stop_gap is None or not (ref_dir / "result.json").is_file():
        return None
    if read_run_result(ref_dir)["diverged"]:
        return None
    start = point.tokens + plan.window_tokens - cooldown_tokens(plan.window_tokens, cfg.cooldown_fraction)
    steps = [s for s in step_records(read_jsonl(ref_dir / "metrics.jsonl")) if s[0] >= start]
    return {"gap": float(cfg.early_stop_gap), "z": NormalDist().inv_cdf(cfg.confidence),
            "min_spans": EARLY_STOP_MIN_SPANS, "from_tokens": start, "reference_branch": ref_dir.name,
            "reference": [list(x) for x in steps]}


@dataclass
class SweepResult:
    plan: SweepPlan
    curve: CBSCurve
    """cbs.json's content."""
    sweep_dir: Path


class _Branches:
    """The sweep's branches: their directories by point and k, their results once finished, and
    whether this session trained any of them."""

    def __init__(self, plan: SweepPlan, bar, stack: int = 1):
        self.plan, self.bar, self.stack = plan, bar, stack
        self.dirs: dict[int, dict[float, list[Path]]] = {p.tokens: {} for p in plan.points}
        self.results: dict[int, dict[float, list[BranchOutcome]]] = {p.tokens: {} for p in plan.points}
        self.trained = False
        self.reference_k = round_k(plan.k_min if plan.cfg.search == "adaptive" else plan.cfg.k[0])
        """The point's reference branch: what an early stop compares a branch with."""
        self.could_continue: dict[int, int] = {}
        """point -> tokens: a branch trained whole that a kept parent checkpoint there would have shortened."""

    def make(self, point: BranchPoint, k: float) -> list[Path]:
        specs = [branch_spec(self.plan, point, k, r) for r in range(self.plan.cfg.replicates)]
        dirs = [ensure_branch(self.plan.run_dir, s) for s in specs]
        self.dirs[point.tokens][round_k(k)] = dirs
        self._stop_rules(point, round_k(k), dirs)
        if not specs[0].from_parent_tokens and not (dirs[0] / "result.json").is_file():
            t = continuation_tokens(self.plan, point, specs[0].train_config())
            if t is not None:
                self.could_continue[point.tokens] = t
        return dirs

    def _stop_rules(self, point: BranchPoint, k: float, dirs: list[Path]) -> None:
        """Each unfinished branch above the point's reference gets its early-stop rule (once the
        reference has finished); without early stopping, none (a rule left by another sweep goes)."""
        ref = self.dirs[point.tokens].get(self.reference_k)
        for r, d in enumerate(dirs):
            if (d / "result.json").is_file():
                continue
            rule = stop_rule(self.plan, point, ref[r]) if (ref and k != self.reference_k) else None
            if rule is None:
                (d / STOP_RULE_FILE).unlink(missing_ok=True)
            elif not (d / STOP_RULE_FILE).is_file() or read_json(d / STOP_RULE_FILE) != rule:
                write_json_atomic(d / STOP_RULE_FILE, rule)

    def _settled(self, d: Path) -> bool:
        """Finished, or stopped early by this sweep's rule."""
        if (d / "result.json").is_file():
            return True
        rule = d / STOP_RULE_FILE
        return self.plan.cfg.early_stop_gap is not None and rule.is_file() and \
            stopped_reading(d, read_json(rule)) is not None

    def continuation_note(self) -> str | None:
        """What kept checkpoints of the parent would have saved, when branches trained whole could
        have started from it."""
        if not self.could_continue:
            return None
        W = self.plan.window_tokens
        saved = sum(t - p for p, t in self.could_continue.items())
        at = ", ".join(f"{t:,}" for _p, t in sorted(self.could_continue.items()))
        return (f"branches that take the parent's own steps for part of their window (k = 1, up to its cooldown) "
                f"trained their whole {W:,}-token window: kept checkpoints of the parent at {at} tokens "
                f"(train --checkpoint-tokens) would have let them start there and saved {saved:,} branch tokens")

    def run(self, dirs: list[Path], beside: list[Path] = ()) -> None:
        """Train the unsettled ``dirs`` (and the jobs ``beside`` them in the same pool, unstacked)."""
        c = self.plan.cfg
        todo = [d for d in dirs if not self._settled(d)]
        self.trained |= bool(todo)
        self.bar.add_total(len(dirs))
        self.bar.skip(len(dirs) - len(todo))
        run_jobs(todo + list(beside), c.jobs, c.threads_per_branch, c.launcher,
                 lambda d: self.bar.update(1) if d in todo else None,
                 nproc_per_job=c.nproc_per_job, slurm=c.slurm, stack=1 if beside else self.stack)
        for t, by_k in self.dirs.items():
            for k, ds in by_k.items():
                if k not in self.results[t]:
                    self.results[t][k] = [branch_outcome(d) for d in ds]


def choose_stack(plan: SweepPlan, measure: bool | None = None) -> tuple[int, dict]:
    """How many branches of one shape train stacked, and why: the given ``stack``; else, when
    ``measure`` (default: the sweep runs on CUDA), the faster of STACK_CUDA models stacked and alone
    at the sweep's smallest batch (:func:`critbatch.train.stacked.measure_stacking`); else 1."""
    cfg = plan.cfg
    if cfg.stack is not None:
        return cfg.stack, {"stack": cfg.stack, "chosen_by": "--stack"}
    from ..dist import resolve_device
    from ..train.loop import autocast
    from ..train.stacked import measure_stacking

    dev = resolve_device(cfg.device)
    if measure is None:
        measure = dev.type == "cuda"
    if not measure or cfg.launcher not in ("inprocess", "local") or cfg.nproc_per_job > 1:
        why = ("CPU: stacking measured no faster (docs/LOG.md)" if dev.type == "cpu" else
               f"launcher {cfg.launcher} with {cfg.nproc_per_job} rank(s) per branch trains branches alone")
        return 1, {"stack": 1, "chosen_by": why}
    k0 = plan.k_min if plan.k_min is not None else cfg.k[0]
    batch = max(1, int(round(k0 * min(p.base_batch_seqs for p in plan.points))))
    m = measure_stacking(plan.parent.model, batch, STACK_CUDA, dev,
                         autocast=lambda: autocast(plan.parent.precision, dev))
    stack = STACK_CUDA if m["faster"] == "stacked" else 1
    return stack, {"stack": stack, "chosen_by": f"measured: {m['speedup']:.2f}x stacked vs alone", **m}


def _train(plan: SweepPlan, br: _Branches, beside: list[Path]) -> list[Path]:
    """Train the sweep's branches (every k of the grid, or the probes the adaptive search asks for);
    returns the jobs ``beside`` that did not train with them."""
    cfg = plan.cfg
    if cfg.search == "grid" and cfg.early_stop_gap is not None:  # the references first: the others read them
        br.run([d for p in plan.points for d in br.make(p, cfg.k[0])], beside)
        br.run([d for p in plan.points for k in cfg.k[1:] for d in br.make(p, k)])
        beside = []
    elif cfg.search == "grid":
        br.run([d for p in plan.points for k in cfg.k for d in br.make(p, k)], beside)
        beside = []
    else:
        searches = {p.tokens: new_search(plan, lambda ks, recs: decide_point(plan, ks, recs)) for p in plan.points}
        while True:
            todo = [d for p in plan.points if (k := searches[p.tokens].next_probe(br.results[p.tokens])) is not None
                    for d in br.make(p, k)]
            if not todo:
                break
            br.run(todo, beside)
            beside = []
    return beside


def run_sweep(cfg: SweepConfig, progress: bool | None = None, beside: Iterable[Path] = ()) -> SweepResult:
    """Plan, run the missing branches, decide, and write cbs.json / cbs.csv / plots. A sweep whose
    branches were all finished before, with its cbs.json written, is returned as it is. ``beside``:
    job directories trained in the same pool as the sweep's first branches (the closed loop trains
    its next segment beside its probes), finished before this returns."""
    plan = plan_sweep(cfg)
    cfg = plan.cfg
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    spec = {**to_dict(plan.cfg), "run": str(plan.run_dir), "sweep_id": plan.sweep_id,
            "window_tokens_effective": plan.window_tokens, "rule": plan.rule, "lr_rule": plan.lr_rule,
            "adam_rule": plan.adam_rule, "k_min": plan.k_min, "k_max": plan.k_max, "resolution": plan.resolution,
            "candidates": plan.candidates, "points": [p.tokens for p in plan.points]}
    if not (plan.sweep_dir / "sweep.json").is_file():
        write_json_atomic(plan.sweep_dir / "sweep.json", spec)
    t0 = time.time()
    bar = Progress(None, desc=f"sweep {plan.sweep_id}", unit="branches", enabled=progress, rate=False,
                   heartbeat=True, interval_s=cfg.progress_interval_s, dynamic_ncols=True)
    try:
        stack, stacking = choose_stack(plan)
        br = _Branches(plan, bar, stack)
        beside = _train(plan, br, list(beside))
    finally:
        bar.close()
    if beside:  # nothing of the sweep left to train: the jobs beside it alone
        run_jobs(beside, cfg.jobs, cfg.threads_per_branch, cfg.launcher, nproc_per_job=cfg.nproc_per_job,
                 slurm=cfg.slurm)
    if not br.trained and (plan.sweep_dir / "cbs.json").is_file():
        old = read_curve(plan.sweep_dir)
        if not old["cost"].get("stopped_early"):  # else another sweep may have finished a stopped branch since
            log_curve(old, plan.sweep_dir, cfg.log_to, name=f"sweep {plan.sweep_id}")  # --log-to added on a rerun
            return SweepResult(plan, old, plan.sweep_dir)  # nothing new: unchanged
    if (note := br.continuation_note()) is not None:
        plan.notes.append(note)
    curve = build_curve(plan, br.results, wall_time_s=time.time() - t0)
    curve["cost"]["stacking"] = stacking
    if (plan.run_dir / "gns.json").is_file():
        attach_noise_scale(curve, read_json(plan.run_dir / "gns.json"))
    write_curve(plan.sweep_dir, curve)
    log_curve(curve, plan.sweep_dir, cfg.log_to, name=f"sweep {plan.sweep_id}")
    return SweepResult(plan, curve, plan.sweep_dir)
