"""``critbatch compare``: does batch-size warmup keep the loss while saving optimizer steps?

Three runs from scratch with the same data order and the same LR schedule shape over tokens
(docs/method.md §4, Table 1): the warmup schedule; a small-batch control at its first batch B0; a
large-batch control at its final batch (the LR scaled by the rule). The base LR applies at B0 in all
three. Optionally each run then anneals the LR linearly to 0 at its final batch, over M more tokens
(``anneal_tokens``: the same tokens for all three) or over S more optimizer steps (``anneal_steps``:
the same steps, so a run at a larger batch anneals on more tokens). Every run of one seed consumes
the same sequences in the same order.

With several ``seeds`` (each sets the initialisation and the data order) the three runs are repeated
per seed, and the loss gap of each run to the small-batch control is reported as mean ± standard
error over seeds. Every eval loss is on one held-out sample shared by all runs, so within a seed a
gap also has a paired standard error from the per-sequence losses.

With ``closed_loop`` a fourth run replays the batch schedule a closed-loop run took.

A run that takes the small control's steps up to its first batch change starts from the small
control's checkpoint there, and any run may start from a finished ``prefix_runs`` run whose steps it
takes (:mod:`critbatch.warmup.forks`): the shared part is trained once, the numbers are unchanged.

Output in ``DIR``: ``compare.json`` (the spec), ``runs/s<seed>/{warmup,small,large,closed-loop}/`` (run
directories), ``comparison.json``, ``comparison.md`` and ``loss_vs_tokens.png|svg``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tqdm.auto import tqdm

from .. import presets
from ..analysis.comparison import CLOSED_LOOP, GAPS, RUNS, gap_stats, markdown_table
from ..config import ADAM_RULES, TrainConfig, check_choices, defining_dict, how, load_config_file, merge, option
from ..errors import ConfigError
from ..io import check_output, read_json, write_json_atomic, write_text_atomic
from ..records import read_closed_loop_result, read_run_result
from ..launch import LAUNCHERS, check_launch, check_single_process, default_jobs, run_jobs, write_job
from ..report.plots import plot_comparison
from ..schedules import BatchSchedule
from ..train import Trainer
from ..train.checkpoint import kept_checkpoints
from ..train import EVAL_LOSSES_FILE
from .forks import losses_at, plan_forks, run_records


@dataclass
class CompareConfig:
    out: str
    """Output directory."""
    schedule: str
    """A ``schedule.json`` (``critbatch schedule``) or an inline ``START:BATCH,...`` schedule."""
    preset: str | None = None
    """Size preset of the three runs (or ``config``)."""
    config: str | None = None
    """JSON/TOML file with (part of) a TrainConfig, applied over the preset."""
    data: str | None = None
    """Prepared data directory (default: the embedded corpus)."""
    total_tokens: int | None = None
    """Pretraining tokens of each run (default: the preset's)."""
    anneal_tokens: int = 0
    """Then anneal the LR linearly to 0 over this many tokens at each run's final batch."""
    anneal_steps: int = 0
    """Or: anneal over this many optimizer steps at each run's final batch (tokens then differ)."""
    avg_tokens: int | None = None
    """final_train_loss is the token-weighted mean training loss over the last ``avg_tokens`` of a
    phase (default: 10% of the pretraining tokens; the paper averaged over the last 10B of 608B)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of the initialisation and the data order; the three runs are repeated for each."""
    adam_rule: str | None = option(None, choices=ADAM_RULES)
    """How Adam's betas and epsilon follow the batch in all three runs (default: the schedule's)."""
    eval_seqs: int | None = None
    """Held-out sequences of every run's evaluation (default: the preset's)."""
    micro_batch_seqs: int | None = None
    """Micro-batch of every run (changes memory, not the result)."""
    device: str = how("auto")
    """Device of the runs: ``auto``, ``cpu``, ``cuda``."""
    jobs: int | None = how(None)
    """Runs at once (default: as many as cores or GPUs allow, at most the number of runs)."""
    threads_per_job: int = how(1)
    """CPU threads of each run."""
    launcher: str = how("local", choices=LAUNCHERS)
    """Where the runs train: ``local`` worker processes, ``inprocess``, ``slurm`` or ``submitit-local``."""
    nproc_per_job: int = how(1)
    """Data-parallel ranks per run (torchrun in the local pool; Slurm tasks on Slurm)."""
    slurm: dict | None = how(None)
    """Options of the ``slurm``/``submitit-local`` launchers (keys of ``critbatch.launch.slurm.SlurmConfig``)."""
    gns: bool = False
    """Log the online noise scale in each run."""
    schedules: dict | None = None
    """More schedules to train against the same controls, by name: ``{"seesaw": "schedule.json", ...}``
    (each a file or ``START:BATCH,...``, starting at the warmup's first batch); each is a run of its
    own in every seed, reported beside the warmup (the names ``warmup``, ``small``, ``large`` and
    ``closed-loop`` are taken)."""
    closed_loop: str | None = None
    """A closed-loop run directory (``train --auto-batch``): the batch schedule it took is replayed as
    a fourth run, ``closed-loop``, with the same seeds and anneal (with its own seed and config the
    replay's pretraining is the closed-loop run itself). The warmup schedule may then have no batch
    change (when the offline derivation found none)."""
    prefix_runs: list[str] = field(default_factory=list)
    """Finished runs (e.g. the base run a sweep branched from) whose checkpoints may start comparison
    runs that take exactly their steps up to there (same seed, data, model, optimizer, batch and LR
    at every step, same held-out sample): those runs train only the rest."""
    share_prefix: bool = True
    """Runs start from the small control's checkpoint at their first batch change instead of training
    its steps again (False: every run trains from scratch)."""


def _closed_loop_phases(d: str, T: int, N: int, B0: int) -> list[list[int]]:
    p = Path(d) / "schedule.json"
    if not p.is_file():
        raise ConfigError(f"closed_loop={d} is not a finished closed-loop run (no schedule.json); run "
                          f"`critbatch train --auto-batch --out {d}` to the end")
    sched = BatchSchedule.parse(str(p), T)
    used = [list(x) for x in sched.phases if x[0] < N]
    if used[0][1] != B0:
        raise ConfigError(f"the closed-loop run {d} started at batch {used[0][1]}, the warmup at {B0}: compare runs "
                          f"that start from the same batch")
    return used


def _whole_seqs(tokens: int, seq_len: int, what: str, notes: list[str]) -> int:
    """``tokens`` rounded up to whole sequences (every run of a comparison must stop at the same
    token count, so a partial sequence is not an option), with a note when it changed."""
    up = -(-tokens // seq_len) * seq_len
    if up != tokens:
        notes.append(f"{what} {tokens:,} rounded up to {up:,}: whole {seq_len}-token sequences")
    return up


def build_configs(cfg: CompareConfig) -> tuple[dict[int, dict[str, TrainConfig]], BatchSchedule, dict]:
    """The run configs per seed (validated against the data, nothing written) and facts about them."""
    check_choices(cfg)
    if cfg.preset is None and cfg.config is None:
        raise ConfigError("give --preset NAME or --config FILE")
    check_output(cfg.out, "--out")
    if cfg.jobs is not None and cfg.jobs < 1:
        raise ConfigError(f"jobs={cfg.jobs} must be >= 1")
    if cfg.total_tokens is not None and cfg.total_tokens <= 0:
        raise ConfigError(f"total tokens {cfg.total_tokens} must be positive")
    base = presets.get(cfg.preset) if cfg.preset else TrainConfig()
    if cfg.config:
        base = merge(base, load_config_file(cfg.config))
    over: dict = {"device": cfg.device}
    if cfg.data:
        over["data"] = {"path": cfg.data}
    if cfg.eval_seqs:
        over["eval_seqs"] = cfg.eval_seqs
    if cfg.micro_batch_seqs:
        over["micro_batch_seqs"] = cfg.micro_batch_seqs
    base = merge(base, over)
    check_single_process("a comparison")
    check_launch(cfg.launcher, cfg.nproc_per_job, cfg.slurm)
    if cfg.anneal_tokens < 0 or cfg.anneal_steps < 0:
        raise ConfigError(f"anneal tokens {cfg.anneal_tokens} and anneal steps {cfg.anneal_steps} must be >= 0")
    if cfg.anneal_tokens and cfg.anneal_steps:
        raise ConfigError("give anneal tokens or anneal steps, not both")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds) or any(s < 0 for s in cfg.seeds):
        raise ConfigError(f"seeds {cfg.seeds} must be distinct whole numbers >= 0")
    N = cfg.total_tokens if cfg.total_tokens is not None else base.total_tokens
    if N <= 0:
        raise ConfigError(f"total tokens {N} must be positive")
    T = base.model.seq_len
    notes = []
    N = _whole_seqs(N, T, "total tokens", notes)
    anneal_tokens = _whole_seqs(cfg.anneal_tokens, T, "anneal tokens", notes)
    sched = BatchSchedule.parse(cfg.schedule, T, base.optim.lr_rule, adam_rule=cfg.adam_rule)
    used, B0, B1 = _warmup_phases(cfg, sched, N, anneal_tokens)
    loop = _closed_loop_phases(cfg.closed_loop, T, N, B0) if cfg.closed_loop else None
    if loop:
        B1 = max(B1, loop[-1][1])
    if len(used) < 2 and B1 == B0:
        raise ConfigError(f"the schedule has no batch change before {N + anneal_tokens:,} tokens: nothing to compare "
                          f"(its phases start at {', '.join(str(s) for s, _ in sched.phases)})")
    avg = cfg.avg_tokens or max(-(-N // 10 // T) * T, T)  # 10%, in whole sequences
    runs = [("warmup", [list(p) for p in used]), ("small", [[0, B0]]), ("large", [[0, B1]])]
    if loop:
        runs.append((CLOSED_LOOP, loop))
    runs += _named_schedules(cfg, T, N, anneal_tokens, B0, base.optim.lr_rule)
    anneal = {n: (cfg.anneal_steps * phases[-1][1] * T if cfg.anneal_steps else anneal_tokens) for n, phases in runs}
    configs: dict[int, dict[str, TrainConfig]] = {}
    for seed in cfg.seeds:
        per = {}
        for name, phases in runs:
            per[name] = merge(base, {
                "total_tokens": N + anneal[name], "exact_total_tokens": True, "lr_ref_batch_seqs": B0,
                "optim": {"lr_rule": sched.rule, "adam_rule": sched.adam_rule}, "checkpoint_tokens": [N],
                "lr_schedule": {"horizon_tokens": N, "anneal_tokens": anneal[name]},
                "batch_schedule": phases, "seed": seed, "data": {"order_seed": seed},
            })
        configs[seed] = per
    forks = _forks(cfg, configs, notes)
    facts = {"pretrain_tokens": N, "anneal_tokens": anneal_tokens, "notes": notes, "anneal_steps": cfg.anneal_steps,
             "anneal_tokens_per_run": anneal, "avg_tokens": avg, "b0_seqs": B0, "final_seqs": B1, "seq_len": T,
             "rule": sched.rule, "adam_rule": sched.adam_rule, "seeds": list(cfg.seeds),
             "eval_seqs": base.eval_seqs, "decay_phases": [list(p) for p in used if p[0] >= N],
             "ignored_phases": [list(p) for p in sched.phases if p[0] >= N + anneal_tokens],
             "runs": [n for n, _ in runs], "closed_loop": cfg.closed_loop,
             "forks": {f"s{s}/{n}": f.to_dict() for (s, n), f in sorted(forks.items())}}
    return configs, sched, facts


def _forks(cfg: CompareConfig, configs: dict[int, dict[str, TrainConfig]], notes: list[str]) -> dict:
    """Each run's configuration checked (resolved as its Trainer would, nothing written), and where
    runs start from another run's checkpoint (:func:`critbatch.warmup.forks.plan_forks`): the small
    control keeps a checkpoint where each run it starts parts from it, and the notes say so."""
    resolved: dict[int, dict[str, TrainConfig]] = {}
    for seed, per in configs.items():
        resolved[seed] = {}
        for name, c in per.items():
            try:  # validates divisibility, data capacity, eval set; writes nothing
                resolved[seed][name] = Trainer(c, None, quiet=True).cfg
            except ConfigError as e:
                raise ConfigError(f"{name} run: {e}") from None
    # the closed loop's own run is its replay's pretraining (the same config, seed and stream): its
    # last segment, which began from the one before it, starts the replay at its end
    sources = list(cfg.prefix_runs)
    if cfg.closed_loop and cfg.share_prefix:
        segs = read_closed_loop_result(cfg.closed_loop).get("segments") or []
        if segs and (Path(cfg.closed_loop) / segs[-1] / "result.json").is_file():
            sources.append(str(Path(cfg.closed_loop) / segs[-1]))
    forks = plan_forks(resolved, {s: run_dir(Path(cfg.out), s, "small") for s in configs}, sources, cfg.share_prefix)
    for seed in configs:
        at = sorted({f.tokens for (s, _), f in forks.items() if s == seed and f.checkpoint is None})
        if at:
            small = configs[seed]["small"]
            configs[seed]["small"] = merge(small, {"checkpoint_tokens": sorted(set(small.checkpoint_tokens) | set(at))})
    for (seed, name), f in sorted(forks.items()):
        src = "the small control" if f.checkpoint is None else f.source
        notes.append(f"{name} (seed {seed}) starts at {f.tokens:,} tokens from {src}, whose steps it takes up to there "
                     f"(trained once; its optimizer steps count them, its wall time does not)")
    return forks


def _warmup_phases(cfg: CompareConfig, sched: BatchSchedule, N: int, anneal_tokens: int
                   ) -> tuple[list[tuple[int, int]], int, int]:
    """(the warmup run's phases, B0, the large control's batch). Phases inside the anneal (a batch that
    grows while the LR decays, ``critbatch schedule --decay seesaw``) are part of the run; the large
    control trains the batch the schedule reaches by the end of the pretraining tokens (or, for a
    schedule that changes the batch only inside the anneal, the batch it switches to)."""
    span = anneal_tokens
    if cfg.anneal_steps:  # the anneal's tokens at the batch the pretraining ends with
        span = cfg.anneal_steps * [b for s, b in sched.phases if s < N][-1] * sched.seq_len
    used = [(s, b) for s, b in sched.phases if s < N + span]
    if cfg.anneal_steps and any(s >= N for s, _ in used):
        raise ConfigError("the schedule changes the batch inside the anneal: give --anneal-tokens (the same tokens for "
                          "every run), not --anneal-steps")
    if any(b <= a for (_, a), (_, b) in zip(used, used[1:])):
        raise ConfigError(f"the schedule {' -> '.join(str(b) for _, b in used)} is not a warmup: every phase must "
                          f"have a larger batch than the one before")
    B0, before = used[0][1], [b for s, b in used if s < N][-1]
    return used, B0, before if before > B0 else used[-1][1]  # a late switch: its batch from the start


def _named_schedules(cfg: CompareConfig, T: int, N: int, anneal_tokens: int, B0: int, rule: str
                     ) -> list[tuple[str, list[list[int]]]]:
    """The ``schedules`` to train beside the warmup, each checked as the warmup is."""
    out = []
    for name, spec in (cfg.schedules or {}).items():
        if name in (*RUNS, CLOSED_LOOP) or not isinstance(name, str) or not name.replace("-", "").isalnum():
            raise ConfigError(f"schedules: {name!r} is not a usable run name (letters, digits and '-'; not warmup, "
                              f"small, large or closed-loop)")
        sched = BatchSchedule.parse(spec, T, rule, adam_rule=cfg.adam_rule)
        phases, b0, _ = _warmup_phases(cfg, sched, N, anneal_tokens)
        if b0 != B0:
            raise ConfigError(f"schedules: {name} starts at batch {b0}, the warmup at {B0}: compare schedules that "
                              f"start from the same batch")
        out.append((name, [list(p) for p in phases]))
    return out


def run_dir(out: Path, seed: int, name: str) -> Path:
    return Path(out) / "runs" / f"s{seed}" / name


def mean_train_loss(recs: list[dict], lo: int, hi: int) -> float | None:
    """Token-weighted mean training loss of the steps that end in (lo, hi]: a step of a larger batch
    counts for its tokens, so the average does not drift when a batch change falls in the window."""
    xs = [(r["train/loss"], r.get("train/batch_tokens", 1)) for r in recs if lo < r["tokens"] <= hi]
    w = sum(b for _, b in xs)
    return sum(x * b for x, b in xs) / w if w else None


def _eval_at(recs: list[dict], tokens: int) -> tuple[int, float] | None:
    ev = [r for r in recs if "eval/loss" in r and r["tokens"] >= tokens]
    return (ev[0]["tokens"], ev[0]["eval/loss"]) if ev else None


def _forks_by_dir(out: Path, facts: dict) -> dict[str, dict]:
    """The comparison's forks (facts["forks"]) by resolved run directory (:func:`forks.run_records`)."""
    found = {}
    for key, f in (facts.get("forks") or {}).items():
        seed, name = key.split("/", 1)
        found[str(run_dir(out, int(seed[1:]), name).resolve())] = f
    return found


def _per_seq(d: Path, pretrain_tokens: int, forks: dict[str, dict]) -> dict[str, np.ndarray | None]:
    """Per-sequence held-out losses before the anneal (the kept checkpoint at N) and at the end."""
    out: dict[str, np.ndarray | None] = {"pre": losses_at(d, pretrain_tokens, forks), "end": None}
    if (d / EVAL_LOSSES_FILE).is_file():
        out["end"] = np.load(d / EVAL_LOSSES_FILE, allow_pickle=False)
    return out


def _row(d: Path, facts: dict, cfg: TrainConfig, forks: dict[str, dict]) -> dict:
    N, avg = facts["pretrain_tokens"], facts["avg_tokens"]
    res = read_run_result(d)
    recs = run_records(d, forks)
    steps_recs = [r for r in recs if "train/loss" in r]
    ev_pre = _eval_at(recs, N)
    end = res["tokens"]
    row = {
        "batch_schedule": cfg.batch_schedule,
        "final_train_loss": mean_train_loss(steps_recs, N - avg, N),
        "final_eval_loss": ev_pre[1] if ev_pre else None,
        "final_eval_tokens": ev_pre[0] if ev_pre else None,
        "optimizer_steps": res.get("global_step", res["steps"]),  # a run started from another's steps counts them
        "optimizer_steps_pretrain": sum(1 for r in steps_recs if r["tokens"] <= N),
        "tokens": end,
        "wall_time_s": res["wall_time_s"],
        "diverged": res["diverged"],
        "diverged_reason": res.get("diverged_reason"),
    }
    if end > N:
        a = min(avg, end - N)
        row["anneal_train_loss"] = mean_train_loss(steps_recs, end - a, end)
        row["anneal_eval_loss"] = res["final_eval_loss"]
    return row


def summarize(out: Path, facts: dict, configs: dict[int, dict[str, TrainConfig]]) -> dict:
    per_seed: dict[int, dict] = {}
    paired: dict = {}
    names = list(next(iter(configs.values())))
    forks = _forks_by_dir(out, facts)
    for seed, cfgs in configs.items():
        rows = {name: _row(run_dir(out, seed, name), facts, cfgs[name], forks) for name in names}
        small = rows["small"]["optimizer_steps"]
        for r in rows.values():
            r["steps_saved_pct"] = 100.0 * (1 - r["optimizer_steps"] / small)
        per_seed[seed] = rows
        seqs = {name: _per_seq(run_dir(out, seed, name), facts["pretrain_tokens"], forks) for name in names}
        for name in [n for n in names if n != "small"]:
            for key, when in (("final_eval_loss", "pre"), ("anneal_eval_loss", "end")):
                a, b = seqs[name][when], seqs["small"][when]
                if a is not None and b is not None and a.shape == b.shape and a.size > 1:
                    paired[(seed, name, key)] = float(np.std(a - b, ddof=1) / math.sqrt(a.size))
    runs = {}
    for name in names:
        rows = [per_seed[s][name] for s in configs]
        bad = [(s, per_seed[s][name]["diverged_reason"]) for s in configs if per_seed[s][name]["diverged"]]
        agg = {"batch_schedule": rows[0]["batch_schedule"], "diverged": bool(bad),
               "diverged_seeds": [s for s, _ in bad], "diverged_reasons": [w for _, w in bad]}
        for key in (*GAPS, "optimizer_steps", "optimizer_steps_pretrain", "wall_time_s", "steps_saved_pct", "tokens"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            # a loss averaged over the seeds that did not diverge would be silently better than the run
            agg[key] = (sum(vals) / len(vals)) if vals and not (bad and key in GAPS) else None
        if name != "small":
            gone = bad or any(per_seed[s]["small"]["diverged"] for s in configs)
            agg["gap_to_small"] = {key: None if gone else gap_stats(per_seed, name, key, paired) for key in GAPS}
        runs[name] = agg
    N, avg = facts["pretrain_tokens"], facts["avg_tokens"]
    return {**facts, "runs": runs, "per_seed": {str(s): rows for s, rows in per_seed.items()},
            "run_dirs": {str(s): {n: str(run_dir(Path("."), s, n)) for n in names} for s in configs},
            "final_train_loss_definition": f"token-weighted mean training loss over the last {avg:,} tokens before "
                                           f"{N:,}" + ("; after the anneal, over its last tokens (at most as many)"
                                                       if any(facts["anneal_tokens_per_run"].values()) else "")}


def run_compare(cfg: CompareConfig, progress: bool | None = None) -> dict:
    configs, sched, facts = build_configs(cfg)
    for note in facts["notes"]:
        print(f"note: {note}")
    out = Path(cfg.out)
    spec = {**asdict(cfg), "facts": facts}
    if (out / "compare.json").is_file():
        old = read_json(out / "compare.json")
        mine = {**defining_dict(cfg), "facts": facts}
        if {k: v for k, v in old.items() if k in mine} != mine:
            raise ConfigError(f"{out} holds a different comparison; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "compare.json", spec)
    callbacks = ["gns"] if cfg.gns else []
    first, then = [], []  # then: the runs that start from the small control's checkpoints
    for seed in cfg.seeds:
        for name in configs[seed]:
            f = facts["forks"].get(f"s{seed}/{name}")
            todo = configs[seed][name].total_tokens - (f["tokens"] if f else 0)  # tokens it trains itself
            if f is None:
                first.append((todo, write_job(run_dir(out, seed, name), configs[seed][name], callbacks=callbacks)))
            elif f["checkpoint"] is not None:
                first.append((todo, write_job(run_dir(out, seed, name), configs[seed][name], f["checkpoint"],
                                              callbacks=callbacks, init_loss_ema=f["loss_ema"], eval_at_start=False)))
            else:
                then.append((seed, name, f["tokens"]))
    # the longest first: a run that trains from scratch does not wait behind forks that only anneal
    # (each run starts from its own seed or checkpoint, so the order changes no number)
    first = [d for _, d in sorted(first, key=lambda x: -x[0])]
    jobs = cfg.jobs or min(len(first) + len(then), default_jobs(cfg.threads_per_job, cfg.device))
    t0 = time.time()
    bar = tqdm(total=len(first) + len(then), desc="comparison runs", unit="run",
               disable=True if progress is False else None, dynamic_ncols=True)
    how = dict(on_done=lambda d: bar.update(1), nproc_per_job=cfg.nproc_per_job, slurm=cfg.slurm)
    run_jobs(first, min(jobs, len(first)), cfg.threads_per_job, cfg.launcher, **how)
    if then:
        dirs = []
        for seed, name, tokens in then:
            ck = next(c for c in kept_checkpoints(run_dir(out, seed, "small")) if c.tokens == tokens)
            dirs.append(write_job(run_dir(out, seed, name), configs[seed][name], ck.path, callbacks=callbacks,
                                  init_loss_ema=ck.meta.get("train_loss_ema"), eval_at_start=False))
        run_jobs(dirs, min(jobs, len(dirs)), cfg.threads_per_job, cfg.launcher, **how)
    bar.close()
    comp = summarize(out, facts, configs)
    comp["wall_time_s"] = time.time() - t0
    comp["schedule"] = sched.to_dict()
    write_json_atomic(out / "comparison.json", comp)
    write_text_atomic(out / "comparison.md", markdown_table(comp))
    s0 = cfg.seeds[0]
    by_dir = _forks_by_dir(out, facts)
    plot_comparison({n: run_records(run_dir(out, s0, n), by_dir) for n in configs[s0]}, comp, out / "loss_vs_tokens")
    return comp


__all__ = ["CompareConfig", "run_compare", "build_configs", "summarize", "run_dir"]
