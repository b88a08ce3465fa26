"""The command line: a thin layer of argparse over library functions (design.md §1.6).

Expected mistakes (:class:`critbatch.errors.CritbatchError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import CritbatchError


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="size preset (see `critbatch presets`)")
    p.add_argument("--config", help="JSON or TOML file with (part of) a TrainConfig; applied over the preset")
    p.add_argument("--data", help="prepared data directory (default: the embedded corpus, prepared and cached)")
    p.add_argument("--corpus", help="embedded corpus when --data is not given: sotu or shakespeare")
    p.add_argument("--tokenizer", choices=["bytes", "bpe"], help="tokenizer for the embedded corpus")
    p.add_argument("--total-tokens", help="tokens to train for, e.g. 2M")
    p.add_argument("--checkpoint-tokens", help="comma-separated token counts at which to keep checkpoints")
    p.add_argument("--batch-seqs", help="global batch in sequences")
    p.add_argument("--micro-batch-seqs", help="sequences per forward/backward per rank (accumulation is derived)")
    p.add_argument("--batch-schedule", help="FILE.json or inline START:BATCH,... (e.g. 0:32,50M:64)")
    p.add_argument("--lr", type=float, help="peak learning rate at the reference batch")
    p.add_argument("--lr-rule", choices=["sqrt", "linear", "none"], help="LR-batch coupling rule")
    p.add_argument("--adam-rule", choices=["none", "sde", "sde-beta2"],
                   help="how Adam's betas and eps follow the batch (Malladi et al. 2022; default none)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine", "wsd"], help="LR schedule over tokens")
    p.add_argument("--warmup-tokens", help="linear LR warmup length in tokens")
    p.add_argument("--decay-tokens", help="wsd: length of the final linear anneal")
    p.add_argument("--optimizer", choices=["adamw", "sgd"])
    p.add_argument("--eval-interval-tokens")
    p.add_argument("--save-interval-tokens")
    p.add_argument("--eval-seqs")
    p.add_argument("--seed")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--allow-repeat", action="store_true", default=None, help="allow more than one epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--gns", action="store_true", help="log the gradient noise scale online (needs accumulation or DDP)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], help="data parallelism under torchrun (default ddp)")


def _train_overrides(a: argparse.Namespace) -> dict:
    o: dict = {}

    def put(path: str, value) -> None:
        if value is None:
            return
        d = o
        *head, last = path.split(".")
        for h in head:
            d = d.setdefault(h, {})
        d[last] = value

    put("data.path", a.data)
    put("data.corpus", a.corpus)
    put("data.tokenizer", a.tokenizer)
    put("data.allow_repeat", a.allow_repeat)
    put("total_tokens", a.total_tokens)
    if a.checkpoint_tokens is not None:
        from .units import parse_count_list

        put("checkpoint_tokens", parse_count_list(a.checkpoint_tokens, "checkpoint tokens"))
    put("batch_seqs", a.batch_seqs)
    put("micro_batch_seqs", a.micro_batch_seqs)
    put("optim.lr", a.lr)
    put("optim.lr_rule", a.lr_rule)
    put("optim.adam_rule", a.adam_rule)
    put("optim.name", a.optimizer)
    put("lr_schedule.kind", a.lr_schedule)
    put("lr_schedule.warmup_tokens", a.warmup_tokens)
    put("lr_schedule.decay_tokens", a.decay_tokens)
    put("eval_interval_tokens", a.eval_interval_tokens)
    put("save_interval_tokens", a.save_interval_tokens)
    put("eval_seqs", a.eval_seqs)
    put("seed", a.seed)
    put("device", a.device)
    put("compile", a.compile)
    put("parallel", getattr(a, "parallel", None))
    return o


def build_train_config(a: argparse.Namespace):
    """Preset, then config file, then flags. With none of preset/config, an existing run directory's
    saved config is used (so `critbatch train --out RUN` resumes)."""
    from . import presets
    from .config import TrainConfig, from_dict, load_config_file, merge
    from .errors import ConfigError

    saved = Path(a.out) / "config.json" if getattr(a, "out", None) else None
    if a.preset is None and a.config is None:
        if saved is not None and saved.is_file():
            cfg = from_dict(TrainConfig, json.loads(saved.read_text()))
        else:
            raise ConfigError("give --preset NAME or --config FILE (or --out of an existing run to resume it)")
    else:
        cfg = presets.get(a.preset) if a.preset else TrainConfig()
        if a.config:
            cfg = merge(cfg, load_config_file(a.config))
    over = _train_overrides(a)
    if a.batch_schedule is not None:
        from .schedules import BatchSchedule

        seq_len = over.get("model", {}).get("seq_len", cfg.model.seq_len)
        rule = over.get("optim", {}).get("lr_rule", cfg.optim.lr_rule)
        sched = BatchSchedule.parse(a.batch_schedule, seq_len, rule)
        over["batch_schedule"] = sched.as_pairs()
        over.setdefault("optim", {})["lr_rule"] = sched.rule
        if sched.ref_batch_seqs is not None:
            over["lr_ref_batch_seqs"] = sched.ref_batch_seqs
    if over:
        cfg = merge(cfg, over)
    return cfg


def cmd_prepare(a: argparse.Namespace) -> int:
    from .data import prepare

    out = prepare(a.out, a.inputs or None, corpus=a.corpus if not a.inputs else None, tokenizer=a.tokenizer,
                  vocab_size=a.vocab_size, holdout_fraction=a.holdout_fraction, seed=a.seed,
                  text_field=a.text_field, quiet=False)
    meta = json.loads((Path(out) / "meta.json").read_text())
    print(f"{out}\ttrain_tokens={meta['splits']['train']['tokens']}\tval_tokens={meta['splits']['val']['tokens']}"
          f"\tvocab_size={meta['vocab_size']}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from .train import Trainer
    from .units import parse_count

    cfg = build_train_config(a)
    stop = parse_count(a.stop_after_tokens, "--stop-after-tokens") if a.stop_after_tokens else None
    callbacks = []
    if a.gns:
        from .gns import NoiseScaleCallback

        callbacks.append(NoiseScaleCallback())
    trainer = Trainer(cfg, a.out, init_from=a.init_from, progress=False if a.no_progress else None,
                      stop_after_tokens=stop, callbacks=callbacks, stop_on_signals=True)
    result = trainer.run()
    if result is None:
        if trainer.stop_signal:
            import signal

            name = signal.Signals(trainer.stop_signal).name
            print(f"stopped by {name} at {trainer.tokens:,} tokens; run the same command again to resume",
                  file=sys.stderr)
            return 128 + trainer.stop_signal
        print(f"paused at {trainer.tokens:,} tokens; run the same command again to resume", file=sys.stderr)
        return 0
    _print_result(a.out, result)
    return 0


def _print_result(out: str, result: dict) -> None:
    if result.get("diverged"):
        print(f"{out}: diverged at {result['diverged_at_tokens']:,} tokens (recorded in result.json)")
        return
    print(f"{out}: tokens={result['tokens']:,} steps={result['steps']:,} "
          f"final_train_loss={result['final_train_loss']:.4f} final_eval_loss={result['final_eval_loss']:.4f} "
          f"({result['tokens_per_s'] or 0:,.0f} tokens/s)")


def cmd_presets(a: argparse.Namespace) -> int:
    from . import presets
    from .model import count_params

    for name, fn in presets.PRESETS.items():
        c = fn()
        m = c.model
        n = count_params(type(m)(**{**m.__dict__, "vocab_size": m.vocab_size or 257}))
        print(f"{name:12s} d_model={m.d_model:<5d} n_layer={m.n_layer:<3d} seq_len={m.seq_len:<5d} "
              f"batch_seqs={c.batch_seqs:<5d} lr={c.optim.lr:<8g} ~{n / 1e6:.2f}M params (bytes vocab)  "
              f"{(fn.__doc__ or '').strip().splitlines()[0]}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    s = run_demo(DemoConfig.make(a.out, quick=a.quick, jobs=a.jobs))
    print(f"\n{Path(a.out) / 'report.html'}  ({s['demo_wall_time_s']:.0f}s this time; the stages took "
          f"{s['total_seconds']:.0f}s in all)")
    for c in s["conclusions"]:
        print(f"- {c}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .report import build_report

    print(build_report(a.dir))
    return 0


def _floats(text: str, what: str) -> list[float]:
    from .errors import ConfigError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a comma-separated list of numbers") from None


def _slurm(value: str | None) -> dict | None:
    """``--slurm`` takes a JSON/TOML file or an inline JSON object of SlurmConfig keys."""
    if value is None:
        return None
    from .config import load_config_file
    from .errors import ConfigError

    if Path(value).suffix in (".json", ".toml") or Path(value).is_file():
        return load_config_file(value)
    try:
        d = json.loads(value)
    except json.JSONDecodeError:
        raise ConfigError(f"--slurm {value!r} is neither a JSON/TOML file nor a JSON object") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--slurm {value!r} must be a JSON object such as '{{\"partition\": \"gpu\"}}'")
    return d


def cmd_branch(a: argparse.Namespace) -> int:
    from .branch import SweepConfig, run_sweep
    from .branch.sweep import describe_point
    from .units import parse_count, parse_count_list

    cfg = SweepConfig(
        run=a.run, at=parse_count_list(a.at, "--at"), k=_floats(a.k, "--k"),
        window_tokens=parse_count(a.window_tokens, "--window-tokens"), lr_rule=a.lr_rule,
        replicates=a.replicates, search=a.search,
        k_min=a.k_min, k_max=a.k_max, resolution=a.resolution, decide_by=a.decide_by, rule=a.rule, eps=a.eps,
        confidence=a.confidence, adam_rule=a.adam_rule,
        micro_batch_seqs=parse_count(a.micro_batch_seqs, "--micro-batch-seqs") if a.micro_batch_seqs else None,
        eval_seqs=parse_count(a.eval_seqs, "--eval-seqs") if a.eval_seqs else None, device=a.device,
        threads_per_branch=a.threads_per_branch, jobs=a.jobs, launcher=a.launcher,
        nproc_per_job=a.nproc_per_job, slurm=_slurm(a.slurm),
    )
    res = run_sweep(cfg, progress=False if a.no_progress else None)
    c = res.curve
    print(f"sweep {res.sweep_dir}  (decided by {c['decide_by']}, rule {c['rule']}"
          + (f", eps {c['eps']}" if c["rule"] == "eps" else f", confidence {c['confidence']}") + ")")
    for p in c["points"]:
        print(f"  at {p['tokens']:>12,} tokens (base batch {p['base_batch_seqs']}): {describe_point(p)}")
    cost = c["cost"]
    line = f"  branches {cost['branches']}, branch tokens {cost['branch_tokens']:,}, {cost['wall_time_s']:.1f}s"
    if "full_grid_branch_tokens" in cost:
        line += f" (full grid would spend {cost['full_grid_branch_tokens']:,})"
    print(line)
    if c.get("fit"):
        f = c["fit"]
        print(f"  fit: B(t) = {f['b_max']:.4g} * u/(1+u), u = (t/{f['t_s']:.4g})^{f['c']:.3f}"
              f"{'' if f['plateau_in_range'] else '  (plateau extrapolated beyond the measured range)'}")
    return 0


def cmd_gns(a: argparse.Namespace) -> int:
    from .gns.checkpoints import GNSConfig, gns_at_checkpoints
    from .units import parse_count_list

    cfg = GNSConfig(run=a.run, at=parse_count_list(a.at, "--at") if a.at else None, b_small=a.b_small, b_big=a.b_big,
                    n_batches=a.batches, confidence=a.confidence, interval=a.interval, method=a.method, device=a.device)
    res = gns_at_checkpoints(cfg, progress=False if a.no_progress else None)
    print(f"{Path(a.run) / 'gns.json'}  (B_small={cfg.b_small}, B_big={cfg.b_big}, {cfg.n_batches} batches, "
          f"{int(cfg.confidence * 100)}% {cfg.interval} intervals)")
    num = lambda v: "inf" if v is None else f"{v:.4g}"  # noqa: E731 (JSON null = infinite)
    for p in res["points"]:
        print(f"  at {p['tokens']:>12,} tokens: B_simple = {num(p['b_simple_seqs'])} seqs "
              f"[{num(p['ci_low_seqs'])}, {num(p['ci_high_seqs'])}]  ({p['seconds']:.1f}s, {p['method']})")
    return 0


def cmd_schedule(a: argparse.Namespace) -> int:
    from .io import read_json, write_json_atomic
    from .analysis.schedule import derive_schedule
    from .schedules.export import schedule_document
    from .units import parse_count

    cbs = Path(a.sweep) / "cbs.json"
    if not cbs.is_file():
        from .errors import DataError

        raise DataError(f"{a.sweep} is not a finished sweep directory (no cbs.json)")
    curve = read_json(cbs)
    start = parse_count(a.start_seqs, "--start-seqs") if a.start_seqs else curve["points"][0]["base_batch_seqs"]
    d = derive_schedule(curve, start, max_seqs=parse_count(a.max_seqs, "--max-seqs") if a.max_seqs else None,
                        granularity=parse_count(a.granularity, "--granularity") if a.granularity else None,
                        safety=a.safety, source=a.source, rule=a.lr_rule or curve["lr_rule"],
                        adam_rule=a.adam_rule or curve.get("adam_rule", "none"),
                        until_tokens=parse_count(a.until_tokens, "--until-tokens") if a.until_tokens else None)
    doc = schedule_document(d.schedule, notes=d.notes, derived_from={
        "sweep": str(Path(a.sweep)), "source": d.source, "safety": a.safety,
        "granularity": a.granularity, "start_seqs": start, "max_seqs": a.max_seqs,
        "decide_by": curve["decide_by"], "rule": curve["rule"], "allowed": d.allowed})
    write_json_atomic(a.out, doc)
    print(f"{a.out}: bounded by the measured lower bounds" + (" and the fit" if d.source == "fit" else ""))
    for ph in doc["phases"]:
        print(f"  from {ph['start_tokens']:>12,} tokens: {ph['batch_seqs']:>6,} seqs ({ph['batch_tokens']:,} tokens), "
              f"LR x {ph['lr_multiplier']:.3f}")
    for n in d.notes:
        print(f"  note: {n}")
    print(f"  Megatron-LM: --step-batch-size-schedule \"{doc['exports']['megatron_step_batch_size_schedule']}\" "
          f"--seq-length {d.schedule.seq_len}")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from .compare import CompareConfig, markdown_table, run_compare
    from .units import parse_count, parse_count_list

    cfg = CompareConfig(out=a.out, schedule=a.schedule, preset=a.preset, config=a.config, data=a.data,
                        total_tokens=parse_count(a.total_tokens, "--total-tokens") if a.total_tokens else None,
                        anneal_tokens=parse_count(a.anneal_tokens, "--anneal-tokens") if a.anneal_tokens else 0,
                        anneal_steps=parse_count(a.anneal_steps, "--anneal-steps") if a.anneal_steps else 0,
                        seeds=parse_count_list(a.seeds, "--seeds") if a.seeds else [0], adam_rule=a.adam_rule,
                        avg_tokens=parse_count(a.avg_tokens, "--avg-tokens") if a.avg_tokens else None,
                        eval_seqs=parse_count(a.eval_seqs, "--eval-seqs") if a.eval_seqs else None,
                        micro_batch_seqs=parse_count(a.micro_batch_seqs, "--micro-batch-seqs") if a.micro_batch_seqs else None,
                        device=a.device, jobs=a.jobs, launcher=a.launcher, gns=a.gns,
                        nproc_per_job=a.nproc_per_job, slurm=_slurm(a.slurm))
    comp = run_compare(cfg, progress=False if a.no_progress else None)
    print(markdown_table(comp), end="")
    print(f"{Path(a.out) / 'comparison.json'}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .launch import LAUNCHERS

    p = argparse.ArgumentParser(prog="critbatch", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"critbatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("prepare", help="text or token files -> token shards + meta.json")
    sp.add_argument("inputs", nargs="*", help="text (.txt/.md), JSON lines (.jsonl[.xz|.gz]) or token files (.bin uint16, .npy)")
    sp.add_argument("--out", required=True, help="data directory to create")
    sp.add_argument("--corpus", default="sotu", help="embedded corpus when no inputs are given: sotu or shakespeare")
    sp.add_argument("--tokenizer", default="bytes", choices=["bytes", "bpe"])
    sp.add_argument("--vocab-size", type=int, help="BPE vocabulary (default 8192), or the vocabulary of token files")
    sp.add_argument("--holdout-fraction", type=float, default=0.05, help="share held out for evaluation (default 0.05)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the held-out document choice")
    sp.add_argument("--text-field", default="text", help="field holding the text in JSON lines")
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("train", help="one training run (resumes when --out holds an unfinished run)")
    sp.add_argument("--out", required=True, help="run directory")
    sp.add_argument("--init-from", help="start from this checkpoint directory (model + optimizer + data position)")
    sp.add_argument("--stop-after-tokens", help="pause after this many tokens; run again to resume")
    _add_train_args(sp)
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("branch", help="branch sweep at kept checkpoints: the local critical batch size")
    sp.add_argument("--run", required=True, help="finished parent run directory")
    sp.add_argument("--at", required=True, help="branch points: comma-separated token counts of kept checkpoints")
    sp.add_argument("--k", default="0.25,0.5,1,2,4,8", help="batch multipliers (grid), e.g. 0.25,0.5,1,2,4,8")
    sp.add_argument("--window-tokens", required=True, help="tokens every branch trains")
    sp.add_argument("--lr-rule", choices=["sqrt", "linear", "none"], help="f(k) (default: the parent's rule)")
    sp.add_argument("--decide-by", choices=["eval", "train-ema"], default="eval",
                    help="held-out eval loss (default, less noisy here) or the paper's EMA training loss")
    sp.add_argument("--rule", choices=["eps", "noninf"],
                    help="eps (the paper's point reading) or noninf (non-inferiority over --replicates >= 2: k passes "
                         "only when shown within eps)")
    sp.add_argument("--eps", type=float, default=0.01, help="tolerance in nats (eps rule)")
    sp.add_argument("--replicates", type=int, default=1, help="branches per k on different data windows")
    sp.add_argument("--confidence", type=float, default=0.95, help="confidence of the noninf bounds")
    sp.add_argument("--adam-rule", choices=["none", "sde", "sde-beta2"],
                    help="how Adam's betas and eps follow k (default: the parent's)")
    sp.add_argument("--search", choices=["grid", "adaptive"], default="grid")
    sp.add_argument("--k-min", type=float, help="adaptive: first probe")
    sp.add_argument("--k-max", type=float, help="adaptive: largest probe")
    sp.add_argument("--resolution", type=float, help="adaptive: bisect until pass and fail differ by this in k")
    sp.add_argument("--micro-batch-seqs")
    sp.add_argument("--eval-seqs", help="held-out sequences per branch evaluation (default: the parent's)")
    sp.add_argument("--jobs", type=int, help="branches at once, each its own process (default: one per GPU or per core)")
    sp.add_argument("--threads-per-branch", type=int, default=1)
    sp.add_argument("--launcher", choices=LAUNCHERS, default="local",
                    help="where branches run: local worker processes, in this process, or Slurm (submitit)")
    sp.add_argument("--nproc-per-job", type=int, default=1,
                    help="data-parallel ranks per run (torchrun in the local pool, tasks of one Slurm job)")
    sp.add_argument("--slurm", help="Slurm options for --launcher slurm|submitit-local: a JSON/TOML file or inline JSON "
                                    "(partition, time_min, gpus_per_task, ...; see docs/scale-out.md)")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_branch)

    from .gns.checkpoints import DEFAULT_B_BIG, DEFAULT_B_SMALL, DEFAULT_BATCHES

    sp = sub.add_parser("gns", help="gradient noise scale at kept checkpoints (beside the CBS)")
    sp.add_argument("--run", required=True, help="run directory with kept checkpoints")
    sp.add_argument("--at", help="token counts of kept checkpoints (default: all)")
    sp.add_argument("--b-small", type=int, default=DEFAULT_B_SMALL, help=f"small batch in sequences (default {DEFAULT_B_SMALL})")
    sp.add_argument("--b-big", type=int, default=DEFAULT_B_BIG, help=f"big batch in sequences (default {DEFAULT_B_BIG})")
    sp.add_argument("--batches", type=int, default=DEFAULT_BATCHES,
                    help=f"big batches averaged (default {DEFAULT_BATCHES}; the paper used 4096 on GPUs)")
    sp.add_argument("--confidence", type=float, default=0.95)
    sp.add_argument("--interval", choices=["delta", "paper"], default="delta")
    sp.add_argument("--method", choices=["auto", "vmap", "loop"], default="auto")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_gns)

    sp = sub.add_parser("schedule", help="derive a batch-size warmup schedule from a sweep's CBS curve")
    sp.add_argument("--sweep", required=True, help="sweep directory (holds cbs.json)")
    sp.add_argument("--out", required=True, help="schedule.json to write")
    sp.add_argument("--start-seqs", help="B0 in sequences (default: the sweep's base batch)")
    sp.add_argument("--max-seqs", help="cap on the batch")
    sp.add_argument("--granularity", help="step to multiples of g (micro-batch x ranks) instead of doublings")
    sp.add_argument("--safety", type=float, default=1.0, help="step up when the CBS reaches safety x next batch")
    sp.add_argument("--source", choices=["auto", "fit", "measured"], default="measured",
                    help="measured (default): step at measured points up to their lower bounds; fit: also stay under "
                         "the fitted curve (it can only delay a step); auto: fit when there is one")
    sp.add_argument("--adam-rule", choices=["none", "sde", "sde-beta2"],
                    help="how Adam's betas and eps follow the batch (default: the sweep's)")
    sp.add_argument("--until-tokens", help="derive thresholds up to this many tokens (default 4x the last point)")
    sp.add_argument("--lr-rule", choices=["sqrt", "linear", "none"], help="default: the sweep's")
    sp.set_defaults(func=cmd_schedule)

    sp = sub.add_parser("compare", help="warmup schedule against small- and large-batch controls")
    sp.add_argument("--schedule", required=True, help="schedule.json, or inline START:BATCH,...")
    sp.add_argument("--out", required=True)
    sp.add_argument("--preset")
    sp.add_argument("--config")
    sp.add_argument("--data")
    sp.add_argument("--total-tokens")
    sp.add_argument("--anneal-tokens", help="then anneal the LR linearly to 0 over this many tokens")
    sp.add_argument("--anneal-steps", help="or over this many optimizer steps at each run's final batch")
    sp.add_argument("--seeds", help="comma-separated seeds of init and data order (default 0); gaps get ± over seeds")
    sp.add_argument("--adam-rule", choices=["none", "sde", "sde-beta2"], help="default: the schedule's")
    sp.add_argument("--avg-tokens", help="final train loss = mean over the last N tokens (default 10%%)")
    sp.add_argument("--eval-seqs")
    sp.add_argument("--micro-batch-seqs")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--jobs", type=int)
    sp.add_argument("--launcher", choices=LAUNCHERS, default="local")
    sp.add_argument("--nproc-per-job", type=int, default=1,
                    help="data-parallel ranks per run (torchrun in the local pool, tasks of one Slurm job)")
    sp.add_argument("--slurm", help="Slurm options for --launcher slurm|submitit-local: a JSON/TOML file or inline JSON "
                                    "(partition, time_min, gpus_per_task, ...; see docs/scale-out.md)")
    sp.add_argument("--gns", action="store_true", help="log the online noise scale in each run")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_compare)

    sp = sub.add_parser("presets", help="list size presets")
    sp.set_defaults(func=cmd_presets)

    sp = sub.add_parser("demo", help="the whole study on the embedded corpus, ending in report.html")
    sp.add_argument("--out", default="runs/demo", help="study directory (rerunning skips finished stages)")
    sp.add_argument("--quick", action="store_true", help="a short version (about a minute)")
    sp.add_argument("--jobs", type=int, help="branch processes at once (default: one per core or GPU)")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("report", help="rebuild report.html, summary.json and summary.md from a study directory")
    sp.add_argument("dir", help="a demo directory or a run directory")
    sp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CritbatchError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"critbatch: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("critbatch: interrupted", file=sys.stderr)
        return 130
