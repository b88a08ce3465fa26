"""``critbatch demo``: the paper's whole study on the embedded corpus, on a laptop-class CPU.

Stages (each skipped when already finished, so a rerun only does what is missing):

1. prepare   the State of the Union corpus as byte tokens           -> DIR/data
2. base      the base run with kept checkpoints at log-spaced tokens -> DIR/base
3. sweep     an adaptive branch search at every checkpoint           -> DIR/base/sweeps/<id>
4. gns       the gradient noise scale at every checkpoint            -> DIR/base/gns.json
5. schedule  batch-size warmup derived from the CBS curve            -> DIR/schedule.json
6. autobatch the closed loop: one run that probes its own CBS and      -> DIR/autobatch
             doubles its batch when the probe shows it safe
7. compare   warmup and the closed loop against small- and           -> DIR/compare
             large-batch controls
8. report    report.html, summary.json, summary.md                   -> DIR

With worker processes (``--launcher local``, the default) the stages overlap, each in a process of
its own on one thread: the closed loop beside the base run, the sweep and the noise scale beside
what is left of it, the comparison as soon as the schedule and the closed loop are done, the noise
scale (needed by the report alone) yielding the cores to the others (one two-thread run used 1.2
cores' worth of the 2; docs/LOG.md).
``DIR/demo.json`` records the configuration, the finished stages, the wall and CPU time of each and
the time from start to end.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import resource
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import presets
from .branch import SweepConfig, continuation_checkpoints, run_sweep
from .closed_loop import AutoBatchConfig, run_auto_batch
from .analysis.whole_run import DECAYS
from .config import check_choices, defining_dict, how, merge, option, to_dict
from .data import prepare
from .errors import ConfigError, CritbatchError
from .gns.checkpoints import GNSConfig, gns_at_checkpoints
from .io import check_output, read_json, write_json_atomic
from .records import read_closed_loop_result
from .schedules.rules import lr_rule_multiplier
from .launch import inprocess_threads
from .report import build_report
from .train import train
from .warmup import CompareConfig, ScheduleConfig, run_compare, write_schedule

STAGES = ("prepare", "base", "sweep", "gns", "schedule", "autobatch", "compare", "report")


@dataclass
class DemoConfig:
    """The whole study on the embedded corpus."""

    out: str = how("runs/demo")
    """Study directory (a rerun skips finished stages)."""
    quick: bool = False
    """A short version (tests, a first look): a smaller run, fewer points, short windows."""
    total_tokens: int = 1_000_000
    """Tokens of the base run and of each comparison run before the anneal."""
    start_seqs: int = 2
    """The start batch in sequences, below the model's CBS the way the paper's OLMo runs started below
    theirs (docs/LOG.md: the tiny model's CBS grows to 12-24 sequences; from 8, its plateau, no
    warmup can save a step). Its LR follows the sqrt rule from the preset's 3e-3 at 8 sequences."""
    points: list[int] = field(default_factory=lambda: [20_000, 60_000, 200_000, 600_000])
    """Branch points (kept checkpoints of the base run), in tokens."""
    window_tokens: int = 98_304
    """Branch window: 6 steps of the largest batch (k_max·B = 256 sequences), so the adaptive search
    bisects over the batches dividing it, 1.5 apart (4, 6, 8, 12, 16, 24, ... sequences)."""
    k_min: float = 0.5
    """The adaptive search's first multiplier of the base batch."""
    k_max: float = 32.0
    """The adaptive search's largest multiplier."""
    resolution: float | None = None
    """Bisection lattice step in k (default: every batch dividing the window)."""
    cooldown_fraction: float = 0.25
    """Branches end with an LR decay over this fraction of their window (docs/method.md §2.3)."""
    early_stop_gap: float | None = 0.02
    """A branch stops part-way through its cooldown once its paired gap to the smallest batch is
    settled above this (twice the sweep's eps; ``branch --early-stop-gap``); ``None``: full windows.
    On the demo it decides as full windows do (bench/early_stop_cost.py, docs/LOG.md)."""
    eval_seqs: int = 2048
    """Held-out sequences of every evaluation."""
    eval_interval_tokens: int = 200_000
    """Evaluations of the base, closed-loop and comparison runs between their kept checkpoints, for
    the loss curves (decisions read the evaluations at branch ends, probe points and run ends). One
    costs about a fifth of the CPU time of training 100k tokens at the start batch; every 100k tokens
    they were more than a quarter of the base run's time."""
    gns_b_big: int = 64
    """The noise scale's big batch in sequences."""
    gns_batches: int = 16
    """Big batches averaged by the noise scale. Only the report reads it, beside the CBS it misses by
    a factor: 16 give a 95% interval of about ±13% (32 gave ±9% for twice the 32 CPU-seconds)."""
    anneal_tokens: int = 102_400
    """The LR decay (linear, to 0) after the pretraining tokens: the schedule is derived for the whole
    run, decay included, and the comparison trains it."""
    decay: str = option("anneal", choices=DECAYS)
    """The derived schedule during the decay (``critbatch schedule --decay``)."""
    reach: float | None = None
    """A probe vouches for at most this many times its window of the run ahead (``schedule --reach``)."""
    closed_loop: bool = True
    """Also run the closed loop (``train --auto-batch``) and compare it."""
    auto_probe_at: list[int] | None = None
    """The closed loop's probe points (default: its own, log-spaced from total/16)."""
    auto_window_tokens: int | None = None
    """The closed loop's probe window (default: its own, 0.25 x the point's tokens)."""
    auto_measurement_budget: float | None = AutoBatchConfig.measurement_budget
    """The closed loop's measurement budget, a fraction of its run's tokens (``none``: no budget; the
    quick demo's probes, fixed windows on a short run, have none)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds (initialisation and data order) of the comparison; several give each gap a standard error."""
    jobs: int | None = how(None)
    """Branch and comparison processes at once (default: one per core or GPU)."""
    launcher: str = how("local", choices=("local", "inprocess"))
    """Branch and comparison runs: worker processes (``local``), or ``inprocess`` — the quick demo's
    choice, since its branches are so short that starting a process would cost more than training."""

    @classmethod
    def make(cls, out: str = "runs/demo", quick: bool = False, **over) -> "DemoConfig":
        """The demo's configuration; ``quick`` starts from the short version's values, and ``over``
        (e.g. the flags given on the command line) overrides either."""
        if quick:
            base = dict(total_tokens=61_440, start_seqs=8, points=[5_000, 20_000], window_tokens=8_192, k_min=0.5,
                        k_max=8.0, eval_seqs=256, gns_b_big=16, gns_batches=4, anneal_tokens=8_192,
                        launcher="inprocess", auto_probe_at=[15_000, 30_000], auto_window_tokens=8_192,
                        auto_measurement_budget=None)
            base.update(over)
            over = base
        return cls(out=out, quick=quick, **over)


def _train_config(cfg: DemoConfig, data_dir: Path):
    base = presets.get("demo")
    # beside the branch points, the last step before each k = 1 branch's cooldown: those branches then
    # read everything before their cooldown from the base run instead of training it (issue 15)
    keep = continuation_checkpoints(cfg.points, cfg.window_tokens, cfg.cooldown_fraction, cfg.start_seqs * base.model.seq_len)
    lr = base.optim.lr * lr_rule_multiplier(base.optim.lr_rule, cfg.start_seqs, base.batch_seqs)
    over = {"data": {"path": str(data_dir)}, "total_tokens": cfg.total_tokens, "checkpoint_tokens": cfg.points + keep,
            "eval_seqs": cfg.eval_seqs, "eval_interval_tokens": cfg.eval_interval_tokens, "batch_seqs": cfg.start_seqs,
            "optim": {"lr": lr},
            # only branches start from its kept checkpoints and each evaluates itself: an evaluation
            # there (6 of the run's 12, 1.6 s each) would be read by nothing but the loss curve
            "eval_at_checkpoints": False}
    if cfg.quick:
        over["lr_schedule"] = {"kind": "constant", "warmup_tokens": 2_000}
    return merge(base, over)


def _threads(cfg: DemoConfig) -> int:
    """One thread per worker process; for the one in-process run at a time, OMP_NUM_THREADS when
    set, else the usable cores (:func:`critbatch.launch.jobs.inprocess_threads`)."""
    return inprocess_threads() if cfg.launcher == "inprocess" else 1


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (worker processes), user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class _Stages:
    """Runs stages once, records their cost in demo.json."""

    def __init__(self, out: Path, cfg: DemoConfig):
        self.out = out
        self.path = out / "demo.json"
        state = read_json(self.path) if self.path.is_file() else {}
        mine = defining_dict(cfg)
        if state and {k: v for k, v in state.get("config", {}).items() if k in mine} != mine:
            raise ConfigError(f"{out} holds a demo with a different configuration; use another --out")
        # where the study lives is not part of it: a moved or copied directory is the same study
        config = {k: v for k, v in asdict(cfg).items() if k != "out"}
        self.state = {"config": config, "stages": state.get("stages", {}), "artifacts": state.get("artifacts", {})}
        if "wall_seconds" in state:
            self.state["wall_seconds"] = state["wall_seconds"]
        self.ran = False
        """Whether this invocation ran a stage other than the report."""

    def done(self, name: str) -> bool:
        return bool(self.state["stages"].get(name, {}).get("done"))

    def start(self, name: str, always: bool = False) -> bool:
        """Announce a stage; ``False`` (and say so) when it finished earlier."""
        i = STAGES.index(name) + 1
        if self.done(name) and not always:
            print(f"[{i}/{len(STAGES)}] {name}: done earlier ({self.state['stages'][name]['seconds']:.1f}s)", file=sys.stderr, flush=True)
            return False
        print(f"[{i}/{len(STAGES)}] {name} ...", file=sys.stderr, flush=True)
        return True

    def record(self, name: str, secs: float, cpu: float, artifacts: dict | None = None) -> None:
        """A stage finished after ``secs`` of wall time and ``cpu`` CPU-seconds (its worker processes
        included), handing ``artifacts`` on to the stages after it."""
        self.state["artifacts"].update(artifacts or {})
        prev = self.state["stages"].get(name, {})
        # a rerun of an already finished stage (the report) keeps its first cost beside the latest
        first = not prev.get("done")
        self.state["stages"][name] = {"done": True, "seconds": secs if first else prev["seconds"],
                                      "cpu_seconds": cpu if first else prev.get("cpu_seconds"), "last_seconds": secs}
        self.ran = self.ran or name != "report"
        write_json_atomic(self.path, self.state)
        print(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {secs:.1f}s", file=sys.stderr, flush=True)

    def run(self, name: str, fn, *, always: bool = False, hands_on: bool = False):
        """Run ``fn`` as the stage ``name`` unless it finished earlier; ``hands_on``: ``fn`` returns
        the artifacts it hands on."""
        if not self.start(name, always):
            return None
        t0, c0 = time.perf_counter(), _cpu_seconds()
        out = fn()
        self.record(name, time.perf_counter() - t0, _cpu_seconds() - c0, out if hands_on else None)
        return out


def _base_stage(cfg: DemoConfig, threads: int | None, art: dict) -> dict:
    train(_train_config(cfg, Path(cfg.out) / "data"), Path(cfg.out) / "base", progress=None)
    return {}


def _sweep_stage(cfg: DemoConfig, threads: int | None, art: dict) -> dict:
    out = Path(cfg.out)
    res = run_sweep(SweepConfig(run=str(out / "base"), at=cfg.points, window_tokens=cfg.window_tokens,
                                search="adaptive", k_min=cfg.k_min, k_max=cfg.k_max, resolution=cfg.resolution,
                                cooldown_fraction=cfg.cooldown_fraction, early_stop_gap=cfg.early_stop_gap,
                                eval_seqs=cfg.eval_seqs, jobs=cfg.jobs, launcher=cfg.launcher,
                                threads_per_branch=_threads(cfg)), progress=None)
    return {"sweep_dir": str(res.sweep_dir.relative_to(out))}


def _gns_stage(cfg: DemoConfig, threads: int | None, art: dict) -> dict:
    gns_at_checkpoints(GNSConfig(run=str(Path(cfg.out) / "base"), at=cfg.points, b_small=1, b_big=cfg.gns_b_big,
                                 n_batches=cfg.gns_batches))
    return {}


def _loop_config(cfg: DemoConfig):
    """The closed loop's and the comparison's run: the base run's settings without its kept checkpoints."""
    return merge(_train_config(cfg, Path(cfg.out) / "data"), {"checkpoint_tokens": [], "eval_at_checkpoints": True})


def _autobatch_stage(cfg: DemoConfig, threads: int | None, art: dict) -> dict:
    if cfg.closed_loop:
        run_auto_batch(_loop_config(cfg), AutoBatchConfig(
            probe_at=cfg.auto_probe_at, window_tokens=cfg.auto_window_tokens,
            measurement_budget=cfg.auto_measurement_budget, gns_b_big=cfg.gns_b_big,
            gns_batches=cfg.gns_batches, eval_seqs=cfg.eval_seqs, cooldown_fraction=cfg.cooldown_fraction,
            jobs=cfg.jobs, launcher=cfg.launcher, threads_per_branch=_threads(cfg)), Path(cfg.out) / "autobatch",
            threads=threads)
    return {}


def _schedule_stage(cfg: DemoConfig, threads: int | None, art: dict) -> dict:
    """The whole run's schedule: the pretraining tokens and the decay the comparison trains after them."""
    out = Path(cfg.out)
    write_schedule(ScheduleConfig(sweep=str(out / art["sweep_dir"]), out=str(out / "schedule.json"),
                                  start_seqs=cfg.start_seqs, total_tokens=cfg.total_tokens + cfg.anneal_tokens,
                                  decay_tokens=cfg.anneal_tokens, decay=cfg.decay, reach=cfg.reach))
    return {}


def _compare_stage(cfg: DemoConfig, threads: int | None, art: dict) -> dict:
    out = Path(cfg.out)
    changes = len(read_json(out / "schedule.json")["phases"]) > 1
    loop = read_closed_loop_result(out / "autobatch") if cfg.closed_loop else None
    if not changes and not (loop and loop["raises"]):
        return {"compare_skipped": "neither the derived schedule nor the closed loop changed the batch within the run: "
                                   "nothing to compare"}
    cfg_file = out / "compare-config.json"
    write_json_atomic(cfg_file, to_dict(_loop_config(cfg)))
    run_compare(CompareConfig(out=str(out / "compare"), schedule=str(out / "schedule.json"), config=str(cfg_file),
                              total_tokens=cfg.total_tokens, anneal_tokens=cfg.anneal_tokens, seeds=cfg.seeds,
                              jobs=cfg.jobs, launcher=cfg.launcher, threads_per_job=_threads(cfg),
                              closed_loop=str(out / "autobatch") if loop and loop["raises"] else None,
                              prefix_runs=[str(out / "base")]))  # the small control is the base run, annealed
    return {}


HEAVY = {"base": _base_stage, "autobatch": _autobatch_stage, "sweep": _sweep_stage, "gns": _gns_stage,
         "schedule": _schedule_stage, "compare": _compare_stage}
"""The stages between preparing the data and the report, in the order they start."""
NEEDS = {"base": (), "autobatch": (), "sweep": ("base",), "gns": ("base",), "schedule": ("sweep",),
         "compare": ("schedule", "autobatch")}
"""What each of them waits for: the closed loop trains its own run from the start and needs nothing
of the base run, so it trains beside it; the noise scale is needed by the report alone, so the
comparison does not wait for it."""
INLINE = ("schedule",)
"""Stages that take no time: run in the demo's own process."""
NICE = {"gns": 10}
"""Niceness of a stage's process: the noise scale, on no other stage's path, yields the cores to
those that are (the sweep before the comparison) and takes what the comparison's last run leaves."""


def _stage_process(name: str, config: dict, artifacts: dict, conn) -> None:
    """One stage in a process of its own, on one thread, for the demo of ``config`` (:class:`DemoConfig`'s
    fields) and the ``artifacts`` of the stages before it; sends ("ok", wall, cpu, artifacts) or
    ("error", exception) through ``conn``."""
    import torch

    cfg = DemoConfig(**config)
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    try:
        art = HEAVY[name](cfg, 1, artifacts)
        conn.send(("ok", time.perf_counter() - t0, _cpu_seconds() - c0, art))
    except BaseException as e:  # the caller raises it; a traceback here where it is no CritbatchError
        if not isinstance(e, CritbatchError):
            traceback.print_exc()
        try:
            conn.send(("error", e))
        except Exception:  # an exception that does not pickle
            conn.send(("error", CritbatchError(f"demo stage {name} failed: {e!r}")))


def _overlap(st: _Stages, cfg: DemoConfig, work=_stage_process, inline: dict = HEAVY) -> None:
    """The stages between preparing the data and the report, each in a process of its own with one
    thread (:data:`INLINE` ones in this one), each started as soon as what it needs (:data:`NEEDS`)
    has finished: the closed loop beside the base run, the sweep and the noise scale beside what is
    left of it, the comparison once the schedule and the closed loop are done. A stage that fails
    stops the others (a rerun resumes them) and raises its error here. ``work``: the process's target,
    ``work(name, config, artifacts, conn)`` with ``config`` the fields of ``cfg``, and ``inline`` the
    functions of the inline stages (tests plant both)."""
    ctx = multiprocessing.get_context("spawn")
    running: dict = {}  # sentinel -> (name, process, receiving end)
    queued = [n for n in HEAVY if not st.done(n) or st.start(n)]  # start() says "done earlier"
    try:
        while queued or running:
            ready = [n for n in queued if all(st.done(x) for x in NEEDS[n])]
            for name in ready:
                queued.remove(name)
                if name in INLINE:
                    st.run(name, lambda: inline[name](cfg, None, dict(st.state["artifacts"])), hands_on=True)
                    continue
                st.start(name)
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=work, args=(name, asdict(cfg), dict(st.state["artifacts"]), send),
                                name=f"critbatch-demo-{name}")
                p.start()
                if NICE.get(name):  # its workers inherit it
                    os.setpriority(os.PRIO_PROCESS, p.pid, os.getpriority(os.PRIO_PROCESS, 0) + NICE[name])
                send.close()
                running[p.sentinel] = (name, p, recv)
            if any(n in INLINE for n in ready):
                continue  # what they finished may let others start
            if not running:
                raise CritbatchError(f"demo stages {', '.join(queued)} wait for stages that cannot finish")
            for s in multiprocessing.connection.wait(list(running)):
                name, p, recv = running.pop(s)
                try:
                    msg = recv.recv() if recv.poll() else None
                except EOFError:  # it died before sending anything
                    msg = None
                p.join()
                if msg is None:
                    raise CritbatchError(f"demo stage {name} ended with exit code {p.exitcode} and no result; "
                                         f"run the demo again to resume it")
                if msg[0] == "error":
                    raise msg[1]
                st.record(name, *msg[1:])
    finally:
        for name, p, _ in running.values():
            p.terminate()
            p.join()


def _validate(cfg: DemoConfig, seq_len: int) -> None:
    check_choices(cfg)
    if cfg.eval_interval_tokens < 0:
        raise ConfigError(f"demo eval_interval_tokens={cfg.eval_interval_tokens} must be >= 0 (0: evaluate only at kept "
                          f"checkpoints and run ends)")
    for name in ("total_tokens", "anneal_tokens", "window_tokens"):
        v = getattr(cfg, name)
        if v < 0 or v % seq_len:
            raise ConfigError(f"demo {name}={v} must be a whole number of {seq_len}-token sequences")
    if not cfg.points or max(cfg.points) >= cfg.total_tokens:
        raise ConfigError(f"demo branch points {cfg.points} must lie inside the run of {cfg.total_tokens} tokens")
    if cfg.jobs is not None and cfg.jobs < 1:
        raise ConfigError(f"jobs={cfg.jobs} must be >= 1")
    if cfg.start_seqs < 1:
        raise ConfigError(f"start_seqs={cfg.start_seqs} must be >= 1")
    if not 0 <= cfg.cooldown_fraction <= 1:
        raise ConfigError(f"cooldown_fraction={cfg.cooldown_fraction:g} must be in [0, 1]")
    if not 0 < cfg.k_min < cfg.k_max:
        raise ConfigError(f"demo needs 0 < k_min < k_max (got {cfg.k_min:g}, {cfg.k_max:g})")
    if cfg.eval_seqs < 1 or cfg.gns_b_big < 2 or cfg.gns_batches < 1 or not cfg.seeds:
        raise ConfigError(f"demo eval_seqs={cfg.eval_seqs}, gns_b_big={cfg.gns_b_big}, gns_batches={cfg.gns_batches} "
                          f"and seeds={cfg.seeds} must be positive (gns_b_big at least 2)")
    check_output(cfg.out, "--out")


def run_demo(cfg: DemoConfig) -> dict:
    """The whole study (module docstring); with worker processes (``launcher="local"``) the training
    stages overlap (:func:`_overlap`), in process they run one after another."""
    _validate(cfg, presets.get("demo").model.seq_len)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    st = _Stages(out, cfg)
    t_all = time.perf_counter()
    st.run("prepare", lambda: prepare(out / "data", corpus="sotu", tokenizer="bytes", quiet=True))
    if cfg.launcher == "local":
        _overlap(st, cfg)
    else:
        for name, stage in HEAVY.items():
            st.run(name, lambda: stage(cfg, _threads(cfg), dict(st.state["artifacts"])), hands_on=True)
    if st.ran:  # from the first stage this invocation ran to the last, stages overlapping
        st.state["wall_seconds"] = time.perf_counter() - t_all
        write_json_atomic(st.path, st.state)  # before the report reads it
    st.run("report", lambda: build_report(out), always=True)
    summary = read_json(out / "summary.json")
    summary["demo_wall_time_s"] = time.perf_counter() - t_all
    return summary
