"""``critbatch compare``: does batch-size warmup keep the loss while saving optimizer steps?

Three runs from scratch with the same data order and the same LR schedule shape over tokens
(method.md §4, Table 1): the warmup schedule; a small-batch control at its first batch B0; a
large-batch control at its final batch (the LR scaled by the rule). The base LR applies at B0 in all
three. Optionally each run then anneals the LR linearly to 0 over M more tokens at its final batch.
Every run consumes exactly the same sequences in the same order (exact token totals).

Output in ``DIR``: ``compare.json`` (the spec), ``runs/{warmup,small,large}/`` (run directories),
``comparison.json``, ``comparison.md`` and ``loss_vs_tokens.png|svg``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import TrainConfig, load_config_file, merge
from .errors import ConfigError
from .io import read_json, read_jsonl, write_json_atomic, write_text_atomic
from .schedules import BatchSchedule

RUNS = ("warmup", "small", "large")


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
    avg_tokens: int | None = None
    """final_train_loss is the mean training loss over the last ``avg_tokens`` of a phase (default:
    10% of the pretraining tokens; the paper averaged over the last 10B of 608B)."""
    eval_seqs: int | None = None
    micro_batch_seqs: int | None = None
    device: str = "auto"
    jobs: int | None = None
    threads_per_job: int = 1
    launcher: str = "local"
    """Where the three runs train: ``local`` worker processes, ``inprocess``, ``slurm`` or ``submitit-local``."""
    nproc_per_job: int = 1
    """Data-parallel ranks per run (torchrun in the local pool; Slurm tasks on Slurm)."""
    slurm: dict | None = None
    """Options of the ``slurm``/``submitit-local`` launchers (keys of ``critbatch.launch.slurm.SlurmConfig``)."""
    gns: bool = False
    """Log the online noise scale in each run."""


def build_configs(cfg: CompareConfig) -> tuple[dict[str, TrainConfig], BatchSchedule, dict]:
    """The three run configs (validated against the data, nothing written) and facts about them."""
    from . import presets
    from .train import Trainer

    if cfg.preset is None and cfg.config is None:
        raise ConfigError("give --preset NAME or --config FILE")
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
    from .launch import check_launch, check_single_process

    check_single_process("a comparison")
    check_launch(cfg.launcher, cfg.nproc_per_job, cfg.slurm)
    if cfg.anneal_tokens < 0:
        raise ConfigError(f"anneal tokens {cfg.anneal_tokens} must be >= 0")
    N = cfg.total_tokens or base.total_tokens
    if N <= 0:
        raise ConfigError(f"total tokens {N} must be positive")
    T = base.model.seq_len
    if N % T or cfg.anneal_tokens % T:
        raise ConfigError(f"total ({N}) and anneal ({cfg.anneal_tokens}) tokens must be whole {T}-token sequences")
    sched = BatchSchedule.parse(cfg.schedule, T, base.optim.lr_rule)
    used = [(s, b) for s, b in sched.phases if s < N]
    B0, B1 = used[0][1], used[-1][1]
    if len(used) < 2:
        raise ConfigError(f"the schedule has no batch change before {N:,} tokens: nothing to compare "
                          f"(its phases start at {', '.join(str(s) for s, _ in sched.phases)})")
    if B1 == B0:
        raise ConfigError("the schedule ends at its starting batch: the controls would be identical")
    avg = cfg.avg_tokens or max(-(-N // 10 // T) * T, T)  # 10%, in whole sequences
    common = {
        "total_tokens": N + cfg.anneal_tokens, "exact_total_tokens": True, "lr_ref_batch_seqs": B0,
        "optim": {"lr_rule": sched.rule}, "checkpoint_tokens": [N],
        "lr_schedule": {"horizon_tokens": N, "anneal_tokens": cfg.anneal_tokens},
    }
    configs = {
        "warmup": merge(base, {**common, "batch_schedule": [list(p) for p in used]}),
        "small": merge(base, {**common, "batch_schedule": [[0, B0]]}),
        "large": merge(base, {**common, "batch_schedule": [[0, B1]]}),
    }
    for name, c in configs.items():
        try:
            Trainer(c, None, quiet=True)  # validates divisibility, data capacity, eval set; writes nothing
        except ConfigError as e:
            raise ConfigError(f"{name} run: {e}") from None
    facts = {"pretrain_tokens": N, "anneal_tokens": cfg.anneal_tokens, "avg_tokens": avg, "b0_seqs": B0,
             "final_seqs": B1, "seq_len": T, "rule": sched.rule,
             "ignored_phases": [list(p) for p in sched.phases if p[0] >= N]}
    return configs, sched, facts


def _mean_loss(recs: list[dict], lo: int, hi: int) -> float | None:
    xs = [r["train/loss"] for r in recs if lo < r["tokens"] <= hi]
    return sum(xs) / len(xs) if xs else None


def _eval_at(recs: list[dict], tokens: int) -> tuple[int, float] | None:
    ev = [r for r in recs if "eval/loss" in r and r["tokens"] >= tokens]
    return (ev[0]["tokens"], ev[0]["eval/loss"]) if ev else None


def summarize(out: Path, facts: dict, configs: dict[str, TrainConfig]) -> dict:
    N, M, avg = facts["pretrain_tokens"], facts["anneal_tokens"], facts["avg_tokens"]
    rows = {}
    for name in RUNS:
        d = out / "runs" / name
        res = read_json(d / "result.json")
        recs = read_jsonl(d / "metrics.jsonl")
        steps_recs = [r for r in recs if "train/loss" in r]
        steps_pre = sum(1 for r in steps_recs if r["tokens"] <= N)
        ev_pre = _eval_at(recs, N)
        row = {
            "batch_schedule": configs[name].batch_schedule,
            "final_train_loss": _mean_loss(steps_recs, N - avg, N),
            "final_eval_loss": ev_pre[1] if ev_pre else None,
            "final_eval_tokens": ev_pre[0] if ev_pre else None,
            "optimizer_steps": res["steps"],
            "optimizer_steps_pretrain": steps_pre,
            "wall_time_s": res["wall_time_s"],
            "diverged": res["diverged"],
        }
        if M:
            a = min(avg, M)
            row["anneal_train_loss"] = _mean_loss(steps_recs, N + M - a, N + M)
            row["anneal_eval_loss"] = res["final_eval_loss"]
        rows[name] = row
    small = rows["small"]["optimizer_steps"]
    for r in rows.values():
        r["steps_saved_pct"] = 100.0 * (1 - r["optimizer_steps"] / small)
    return {**facts, "runs": rows,
            "final_train_loss_definition": f"mean training loss over the last {avg:,} tokens before {N:,}"
            + (f"; after the anneal, over the last {min(avg, M):,} tokens" if M else "")}


def markdown_table(c: dict) -> str:
    M = c["anneal_tokens"]
    head = "| run | batch (sequences) | train loss | eval loss |" + (" train loss after anneal | eval loss after anneal |" if M else "") \
        + " optimizer steps | steps saved | wall time |"
    sep = "|" + " --- |" * (head.count("|") - 1)
    lines = [head, sep]
    f = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    for name in RUNS:
        r = c["runs"][name]
        sched = " → ".join(f"{b}" + (f" at {s:,}" if s else "") for s, b in r["batch_schedule"])
        cells = [name, sched, f(r["final_train_loss"]), f(r["final_eval_loss"])]
        if M:
            cells += [f(r.get("anneal_train_loss")), f(r.get("anneal_eval_loss"))]
        cells += [f"{r['optimizer_steps']:,}", f"{r['steps_saved_pct']:.0f}%", f"{r['wall_time_s']:.0f}s"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Train loss: {c['final_train_loss_definition']}. Tokens: {c['pretrain_tokens']:,} pretraining"
                 + (f" + {M:,} anneal" if M else "") + f"; sequences of {c['seq_len']} tokens; LR rule {c['rule']}.")
    return "\n".join(lines) + "\n"


def run_compare(cfg: CompareConfig, progress: bool | None = None) -> dict:
    from .launch import default_jobs, run_jobs, write_job
    from .report.plots import plot_comparison

    configs, sched, facts = build_configs(cfg)
    out = Path(cfg.out)
    spec = {**asdict(cfg), "facts": facts}
    if (out / "compare.json").is_file():
        old = read_json(out / "compare.json")
        how = ("jobs", "launcher", "threads_per_job", "device", "nproc_per_job", "slurm")  # not what is computed
        if {k: v for k, v in old.items() if k not in how} != {k: v for k, v in spec.items() if k not in how}:
            raise ConfigError(f"{out} holds a different comparison; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "compare.json", spec)
    dirs = []
    for name in RUNS:
        dirs.append(write_job(out / "runs" / name, configs[name], callbacks=["gns"] if cfg.gns else []))
    jobs = cfg.jobs or min(3, default_jobs(cfg.threads_per_job, cfg.device))
    t0 = time.time()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(dirs), desc="comparison runs", unit="run", disable=True if progress is False else None,
               dynamic_ncols=True)
    run_jobs(dirs, jobs, cfg.threads_per_job, cfg.launcher, on_done=lambda d: bar.update(1),
             nproc_per_job=cfg.nproc_per_job, slurm=cfg.slurm)
    bar.close()
    comp = summarize(out, facts, configs)
    comp["wall_time_s"] = time.time() - t0
    comp["schedule"] = sched.to_dict()
    write_json_atomic(out / "comparison.json", comp)
    write_text_atomic(out / "comparison.md", markdown_table(comp))
    plot_comparison({n: read_jsonl(out / "runs" / n / "metrics.jsonl") for n in RUNS}, comp, out / "loss_vs_tokens")
    return comp


__all__ = ["CompareConfig", "run_compare", "build_configs", "summarize", "markdown_table"]
