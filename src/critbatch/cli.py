"""The command line: a thin layer over the library. Every command takes one config dataclass whose
fields are its flags (:mod:`critbatch.clispec` generates them with their docstrings as help), plus a
few options of the command itself.

Expected mistakes (:class:`critbatch.errors.CritbatchError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import presets
from .analysis.comparison import markdown_table
from .analysis.describe import describe_sweep_cost
from .branch import SweepConfig, continuation_checkpoints, describe_point, run_sweep
from .clispec import Flag, add_dataclass_args, overrides
from .closed_loop import AutoBatchConfig, PlanConfig, read_spec, run_auto_batch, run_plan
from .closed_loop import describe as describe_auto_batch
from .closed_loop import describe_plan
from .config import TrainConfig, from_dict, load_config_file, merge, option
from .data.prepare import PrepareConfig, prepare_config
from .demo import DemoConfig, run_demo
from .errors import ConfigError, CritbatchError
from .gns.checkpoints import GNSConfig, gns_at_checkpoints
from .gns.online import NoiseScaleCallback
from .io import read_json
from .model import count_params
from .report import build_report
from .schedules import BatchSchedule
from .train import Trainer
from .transfer import TransferConfig, run_transfer
from .transfer import describe as describe_transfer
from .version import __version__
from .warmup import CompareConfig, ScheduleConfig, run_compare, write_schedule


@dataclass
class TrainCommand:
    """Options of ``critbatch train`` beside the run's config."""

    out: str
    """The run directory (running again resumes an unfinished run; a finished one is a no-op)."""
    preset: str | None = None
    """Size preset (``critbatch presets`` lists them); the config file and flags apply over it."""
    config: str | None = None
    """JSON or TOML file with (part of) a TrainConfig, applied over the preset."""
    init_from: str | None = None
    """Start from this checkpoint directory (model, optimizer and data position)."""
    stop_after_tokens: int | None = None
    """Pause after this many tokens; run again to resume."""
    gns: bool = False
    """Log the gradient noise scale online (needs accumulation or DDP)."""
    progress: bool = True
    """Show progress: a bar when stderr is a terminal, else a plain line every --progress-interval-s seconds."""
    auto_batch: bool = False
    """The closed loop: measure the local CBS at probe points during the run and double the batch
    when the probe shows it safe (``--auto.*`` set the probes; results in OUT/decisions.jsonl)."""
    auto: AutoBatchConfig = field(default_factory=AutoBatchConfig)
    branch_window_tokens: int | None = None
    """Also keep, beside each --checkpoint-tokens point, the checkpoint from which a later
    ``critbatch branch --window-tokens N`` (with --branch-cooldown-fraction) reads its k = 1 branch:
    that branch then trains only its cooldown instead of its whole window."""
    branch_cooldown_fraction: float = 0.25
    """The cooldown fraction of that later sweep (``critbatch branch --cooldown-fraction``)."""


@dataclass
class Progress:
    progress: bool = True
    """Show progress: a bar when stderr is a terminal (``branch`` prints a plain line every
    --progress-interval-s seconds off one)."""


@dataclass
class ReportCommand:
    dir: str = option(positional=True)
    """A demo directory or a run directory."""


def _pick(ns: argparse.Namespace, flags: list[Flag], cls: type, **fixed):
    """The dataclass ``cls`` from the given flags (and ``fixed`` values)."""
    return from_dict(cls, {**overrides(ns, flags), **fixed})


# ---- train ---------------------------------------------------------------------------------------

def build_train_config(cmd: TrainCommand, over: dict) -> TrainConfig:
    """Preset, then config file, then flags. With neither preset nor config file, an existing run
    directory's saved config is used (so ``critbatch train --out RUN`` resumes)."""
    saved = Path(cmd.out) / "config.json"
    if cmd.preset is None and cmd.config is None:
        if not saved.is_file():
            raise ConfigError("give --preset NAME or --config FILE (or --out of an existing run to resume it)")
        cfg = from_dict(TrainConfig, read_json(saved))
    else:
        cfg = presets.get(cmd.preset) if cmd.preset else TrainConfig()
        if cmd.config:
            cfg = merge(cfg, load_config_file(cmd.config))
    if "batch_schedule" in over:  # a FILE.json or START:BATCH,... in the model's sequences
        seq_len = over.get("model", {}).get("seq_len", cfg.model.seq_len)
        rule = over.get("optim", {}).get("lr_rule", cfg.optim.lr_rule)
        sched = BatchSchedule.parse(over["batch_schedule"], seq_len, rule)
        over["batch_schedule"] = sched.as_pairs()
        over.setdefault("optim", {})["lr_rule"] = sched.rule
        over["optim"].setdefault("adam_rule", sched.adam_rule)
        if sched.ref_batch_seqs is not None:
            over["lr_ref_batch_seqs"] = sched.ref_batch_seqs
    cfg = merge(cfg, over) if over else cfg
    if cmd.branch_window_tokens is not None:
        cfg = merge(cfg, {"checkpoint_tokens": with_continuation_checkpoints(cfg, cmd.branch_window_tokens,
                                                                              cmd.branch_cooldown_fraction)})
    return cfg


def with_continuation_checkpoints(cfg: TrainConfig, window_tokens: int, cooldown_fraction: float) -> list[int]:
    """``cfg``'s kept checkpoints and, for each, the one a sweep's k = 1 branch from it starts from
    (:func:`critbatch.branch.sweep.continuation_checkpoints`, at the batch the run has there)."""
    if window_tokens <= 0:
        raise ConfigError(f"branch_window_tokens={window_tokens} must be positive")
    if not 0 <= cooldown_fraction <= 1:
        raise ConfigError(f"branch_cooldown_fraction={cooldown_fraction} must be in [0, 1]")
    if not cfg.checkpoint_tokens:
        raise ConfigError("--branch-window-tokens adds checkpoints beside the branch points: give them with "
                          "--checkpoint-tokens")
    T = cfg.model.seq_len
    sched = BatchSchedule.parse(cfg.batch_schedule or [[0, cfg.batch_seqs]], T, cfg.optim.lr_rule)
    extra = [c for p in cfg.checkpoint_tokens
             for c in continuation_checkpoints([p], window_tokens, cooldown_fraction, sched.batch_seqs_at(p) * T)]
    return sorted(set(cfg.checkpoint_tokens) | set(extra))


def cmd_auto_batch(cmd: TrainCommand, cfg: TrainConfig) -> int:
    if cmd.init_from or cmd.stop_after_tokens or cmd.gns:
        raise ConfigError("--auto-batch runs the whole closed loop; it does not take --init-from, --stop-after-tokens "
                          "or --gns")
    result = run_auto_batch(cfg, cmd.auto, cmd.out, verbose=cmd.progress)
    print(f"{cmd.out}: closed loop ({cmd.auto.act_on} trigger), decisions in {Path(cmd.out) / 'decisions.jsonl'}")
    for line in describe_auto_batch(result):
        print(f"  {line}")
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    cmd = _pick(ns, ns.flags["cmd"], TrainCommand)
    if "auto" in overrides(ns, ns.flags["cmd"]) and not cmd.auto_batch:
        raise ConfigError("--auto.* options set the closed loop: add --auto-batch")
    if cmd.auto_batch and cmd.preset is None and cmd.config is None and (Path(cmd.out) / "autobatch.json").is_file():
        saved = read_spec(cmd.out)  # resume the loop with its own settings
        cfg = merge(from_dict(TrainConfig, saved["train"]), overrides(ns, ns.flags["cfg"]))
        given = overrides(ns, ns.flags["cmd"]).get("auto", {})
        cmd.auto = from_dict(AutoBatchConfig, {**saved["auto"], **given})
    else:
        cfg = build_train_config(cmd, overrides(ns, ns.flags["cfg"]))
    if cmd.auto_batch:
        return cmd_auto_batch(cmd, cfg)
    trainer = Trainer(cfg, cmd.out, init_from=cmd.init_from, progress=None if cmd.progress else False,
                      stop_after_tokens=cmd.stop_after_tokens, callbacks=[NoiseScaleCallback()] if cmd.gns else [],
                      stop_on_signals=True)
    result = trainer.run()
    if result is None:
        if trainer.stop_signal:
            print(f"stopped by {signal.Signals(trainer.stop_signal).name} at {trainer.tokens:,} tokens; run the same "
                  f"command again to resume", file=sys.stderr)
            return 128 + trainer.stop_signal
        print(f"paused at {trainer.tokens:,} tokens; run the same command again to resume", file=sys.stderr)
        return 0
    if result.get("diverged"):
        print(f"{cmd.out}: diverged at {result['diverged_at_tokens']:,} tokens: {result.get('diverged_reason')} "
              f"(recorded in result.json)")
    else:
        print(f"{cmd.out}: tokens={result['tokens']:,} steps={result['steps']:,} "
              f"final_train_loss={result['final_train_loss']:.4f} final_eval_loss={result['final_eval_loss']:.4f} "
              f"± {result['final_eval_loss_se']:.4f} ({result['tokens_per_s'] or 0:,.0f} tokens/s)")
    return 0


# ---- the other commands --------------------------------------------------------------------------

def cmd_prepare(ns: argparse.Namespace) -> int:
    out = prepare_config(_pick(ns, ns.flags["cfg"], PrepareConfig))
    meta = json.loads((Path(out) / "meta.json").read_text())
    print(f"{out}\ttrain_tokens={meta['splits']['train']['tokens']}\tval_tokens={meta['splits']['val']['tokens']}"
          f"\tvocab_size={meta['vocab_size']}")
    return 0


def _progress(ns: argparse.Namespace) -> bool | None:
    return None if _pick(ns, ns.flags["cmd"], Progress).progress else False


def cmd_branch(ns: argparse.Namespace) -> int:
    res = run_sweep(_pick(ns, ns.flags["cfg"], SweepConfig), progress=_progress(ns))
    c = res.curve
    print(f"sweep {res.sweep_dir}  (decided by {c['decide_by']}, rule {c['rule']}"
          + (f", eps {c['eps']}" if c["rule"] == "eps" else f", confidence {c['confidence']}") + ")")
    for n in c.get("notes", []):
        print(f"  note: {n}")
    for p in c["points"]:
        print(f"  at {p['tokens']:>12,} tokens (base batch {p['base_batch_seqs']}): {describe_point(p)}")
    cost = c["cost"]
    line = f"  {describe_sweep_cost(cost)}, {cost['wall_time_s']:.1f}s"
    if cost.get("trained"):
        line += " (" + ", ".join(f"{v} {k}" for k, v in cost["trained"].items()) + ")"
    print(line)
    if c.get("fit"):
        f = c["fit"]
        print(f"  fit: B(t) = {f['b_max']:.4g} * u/(1+u), u = (t/{f['t_s']:.4g})^{f['c']:.3f}"
              f"{'' if f['plateau_in_range'] else '  (plateau extrapolated beyond the measured range)'}")
    return 0


def cmd_gns(ns: argparse.Namespace) -> int:
    cfg = _pick(ns, ns.flags["cfg"], GNSConfig)
    res = gns_at_checkpoints(cfg, progress=_progress(ns))
    print(f"{Path(cfg.run) / 'gns.json'}  (B_small={cfg.b_small}, B_big={cfg.b_big}, {cfg.n_batches} batches, "
          f"{int(cfg.confidence * 100)}% {cfg.interval} intervals)")
    num = lambda v: "inf" if v is None else f"{v:.4g}"  # noqa: E731 (JSON null = infinite)
    for p in res["points"]:
        print(f"  at {p['tokens']:>12,} tokens: B_simple = {num(p['b_simple_seqs'])} seqs "
              f"[{num(p['ci_low_seqs'])}, {num(p['ci_high_seqs'])}]  ({p['seconds']:.1f}s, {p['method']})")
    return 0


def cmd_schedule(ns: argparse.Namespace) -> int:
    cfg = _pick(ns, ns.flags["cfg"], ScheduleConfig)
    doc, d = write_schedule(cfg)
    print(f"{cfg.out}: bounded by the measured lower bounds" + (" and the fit" if d.source == "fit" else ""))
    for ph in doc["phases"]:
        print(f"  from {ph['start_tokens']:>12,} tokens: {ph['batch_seqs']:>6,} seqs ({ph['batch_tokens']:,} tokens), "
              f"LR x {ph['lr_multiplier']:.3f}")
    for n in doc["notes"]:
        print(f"  note: {n}")
    print(f"  start batch: {doc['start_advice']['message']}")
    ex = doc["exports"]
    print(f"  Megatron-LM: --step-batch-size-schedule \"{ex['megatron_step_batch_size_schedule']}\" "
          f"--seq-length {doc['seq_len']} (no --global-batch-size)")
    print(f"  Megatron-LM ramp-up: {ex['megatron_rampup_batch_size'] or 'not expressible: ' + ex['megatron_rampup_note']}")
    return 0


def cmd_transfer(ns: argparse.Namespace) -> int:
    cfg = _pick(ns, ns.flags["cfg"], TransferConfig)
    doc = run_transfer(cfg)
    print(f"{cfg.out}: the target's schedule from the lower side of the band")
    for line in describe_transfer(doc):
        print(line)
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    cfg = _pick(ns, ns.flags["cfg"], CompareConfig)
    comp = run_compare(cfg, progress=_progress(ns))
    print(markdown_table(comp), end="")
    print(f"{Path(cfg.out) / 'comparison.json'}")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    over = overrides(ns, ns.flags["cfg"])
    s = run_demo(DemoConfig.make(**over))
    out = over.get("out", DemoConfig.out)
    print(f"\n{Path(out) / 'report.html'}  ({s['demo_wall_time_s']:.0f}s this time; the stages took "
          f"{s['total_seconds']:.0f}s in all" + (f", {s['wall_seconds']:.0f}s from start to end as they overlapped)"
                                                if s.get("wall_seconds") and s["wall_seconds"] < s["total_seconds"] else ")"))
    for c in s["conclusions"]:
        print(f"- {c}")
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    est = run_plan(_pick(ns, ns.flags["cfg"], PlanConfig))
    for line in describe_plan(est):
        print(line)
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    print(build_report(_pick(ns, ns.flags["cfg"], ReportCommand).dir))
    return 0


def cmd_presets(ns: argparse.Namespace) -> int:
    for name, fn in presets.PRESETS.items():
        c = fn()
        m = dataclasses.replace(c.model, vocab_size=c.model.vocab_size or 257)
        try:
            n = f"~{count_params(m) / 1e6:.2f}M params"
        except ConfigError:  # an HF preset without transformers installed
            n = "(needs transformers)"
        family = "gpt" if m.family == "gpt" else m.hf.get("model_type", "hf") if isinstance(m.hf, dict) else "hf"
        print(f"{name:12s} {family:6s} seq_len={m.seq_len:<5d} batch_seqs={c.batch_seqs:<5d} lr={c.optim.lr:<8g} "
              f"{n} (vocab {m.vocab_size})  {(fn.__doc__ or '').strip().splitlines()[0]}")
    return 0


# ---- the parser ------------------------------------------------------------------------------------

@dataclass
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    config: type | None = None
    """The dataclass whose fields are the command's flags."""
    options: type | None = None
    """The command's own options (a dataclass too)."""
    required: tuple[str, ...] = field(default_factory=tuple)


COMMANDS = [
    Command("prepare", "text or token files -> token shards + meta.json", cmd_prepare, PrepareConfig),
    Command("train", "one training run (resumes when --out holds an unfinished run)", cmd_train, TrainConfig, TrainCommand),
    Command("branch", "branch sweep at kept checkpoints: the local critical batch size", cmd_branch, SweepConfig,
            Progress, required=("window_tokens",)),
    Command("gns", "gradient noise scale at kept checkpoints (beside the CBS)", cmd_gns, GNSConfig, Progress),
    Command("schedule", "derive a batch-size warmup schedule from a sweep's CBS curve", cmd_schedule, ScheduleConfig),
    Command("compare", "warmup schedule against small- and large-batch controls", cmd_compare, CompareConfig, Progress),
    Command("transfer", "the CBS of a target run from proxies' sweeps on the same data, with a band, and its "
                        "schedule (and a confirming probe)", cmd_transfer, TransferConfig),
    Command("plan", "before a run: what the closed loop (train --auto-batch) would cost and save", cmd_plan,
            PlanConfig),
    Command("demo", "the whole study on the embedded corpus, ending in report.html", cmd_demo, DemoConfig),
    Command("report", "rebuild report.html, summary.json and summary.md from a study directory", cmd_report,
            ReportCommand),
    Command("presets", "list the size presets", cmd_presets),
]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and status 2 like every other expected mistake."""

    def error(self, message: str):
        cmd = self.prog.split()[-1]
        raise ConfigError(message if cmd == "critbatch" else f"{cmd}: {message} (see critbatch {cmd} --help)")


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="critbatch", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"critbatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for c in COMMANDS:
        sp = sub.add_parser(c.name, help=c.help, description=c.help, allow_abbrev=False)
        flags = {"cfg": [], "cmd": []}
        if c.options is not None:
            flags["cmd"] = add_dataclass_args(sp, c.options)
        if c.config is not None:
            flags["cfg"] = add_dataclass_args(sp, c.config, required=c.required)
        sp.set_defaults(func=c.run, flags=flags)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = make_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except CritbatchError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"critbatch: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine said no (disk full, permissions, a vanished file): one line too
        where = f" ({e.filename})" if e.filename else ""
        hint = "; free space and run the same command again to resume" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        print(f"critbatch: error: {e.strerror or e}{where}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("critbatch: interrupted", file=sys.stderr)
        return 130
