"""``critbatch plan``: before a run, what the closed loop (``train --auto-batch``) would cost and save.

From the target's size in tokens, its starting batch, the closed loop's probe settings and a time
per optimizer step per batch size (given, or measured here on the target's model), it estimates:

- the probe tokens (and noise-scale tokens) as a fraction of the run's own;
- the optimizer steps and the time of the run against the small-batch control (constant start batch),
  for the schedule it expects (``expected``: e.g. one derived offline from a proxy's sweep) and for
  the two bounds — no raise at all (the probes are pure cost) and a doubling at every probe point
  (the most the loop can save);
- whether measuring pays off: the run with its probes takes less time than the control.

Times for batches between given ones are interpolated linearly in the batch; beyond them,
extrapolated in proportion to the batch (no speed-up assumed).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from ..analysis.schedule import advise_start
from ..analysis.triggers import log_spaced_points, phase_steps, steps_for
from ..branch import last_step_before_cooldown
from ..config import TrainConfig, check_choices, option
from ..errors import ConfigError
from ..io import check_output, write_json_atomic
from ..records import read_curve
from ..schedules import BatchSchedule
from ..units import fmt_count
from .config import AutoBatchConfig, default_window, measures_noise_scale
from .policy import futile_point, lead_limit, main_run_lead, point_measurement


@dataclass
class PlanConfig:
    """Estimate the closed loop's cost and the steps it saves, before a run."""

    total_tokens: int
    """The target run's tokens."""
    start_seqs: int
    """Its starting (small-control) batch in sequences."""
    seq_len: int
    """Tokens per sequence."""
    step_seconds: dict | None = None
    """Seconds per optimizer step by batch in sequences, e.g. ``{"8": 0.05, "16": 0.09}`` (JSON or a
    file); ``None``: measure them here on ``preset``'s model."""
    preset: str | None = None
    """Measure step times on this preset's model (``critbatch presets``) on this machine."""
    expected: str | None = None
    """The schedule the run is expected to take (a schedule.json or ``START:BATCH,...``), e.g.
    derived from a smaller proxy's sweep; the two bounds are reported beside it."""
    sweep: str | None = None
    """A sweep directory (its cbs.json, measured on this data, or on a proxy at the same sequence
    length): say where the start batch sits against its CBS and which start leaves room for a warmup."""
    auto: AutoBatchConfig = field(default_factory=AutoBatchConfig)
    out: str | None = option(None)
    """Write the estimate as JSON here."""


def _time_fn(times: dict[int, float]):
    pts = sorted(times.items())

    def t(b: int) -> float:
        if b in times:
            return times[b]
        if b <= pts[0][0]:
            return pts[0][1] * b / pts[0][0]
        if b >= pts[-1][0]:
            return pts[-1][1] * b / pts[-1][0]
        for (b0, t0), (b1, t1) in zip(pts, pts[1:]):
            if b0 <= b <= b1:
                return t0 + (t1 - t0) * (b - b0) / (b1 - b0)
        raise AssertionError(b)

    return t


def measure_step_seconds(cfg: TrainConfig, batches: list[int], reps: int = 3) -> dict[int, float]:
    """Seconds per optimizer step (forward, backward, AdamW) of ``cfg``'s model at each batch, on
    random tokens, on this machine (after one warm-up step)."""
    import torch

    from ..dist import resolve_device
    from ..model import build_model

    dev = resolve_device(cfg.device)
    m = cfg.model
    if m.vocab_size is None:
        m = type(m)(**{**m.__dict__, "vocab_size": 257})
    model = build_model(m).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = {}
    for b in sorted(set(batches)):
        x = torch.randint(0, m.vocab_size, (b, m.seq_len + 1), device=dev)
        for i in range(reps + 1):
            if i == 1:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            (model.loss_sum(x) / (b * m.seq_len)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out[b] = (time.perf_counter() - t0) / reps
    return out


def _phases_time(phases: list[tuple[int, int]], T: int, total: int, t) -> tuple[int, float]:
    """(steps, seconds) of a run under ``phases``: each phase's steps timed at its batch."""
    n = phase_steps(phases, T, total)
    return sum(n), sum(k * t(b) for k, (_s, b) in zip(n, phases))


def _scenario(a: AutoBatchConfig, points: list[int], N: int, B0: int, T: int, t, given: list | None,
              c_steps: int, c_secs: float) -> dict:
    """One scenario of the estimate: the run's schedule ``given`` (``None``: a doubling at every point
    the loop probes), the points the loop probes and what each costs, the steps and the time."""
    noise = measures_noise_scale(a)
    doubling = given is None
    phases = [(0, B0)] if doubling else list(given)
    sched = BatchSchedule(tuple(phases), T)
    adj = probe_tok = probe_secs = gns_tok = gns_secs = lead_tok = probe_kept = spent = 0
    skipped, streak, prev_batch, by_point = None, 0, None, []
    for p in points:
        before = probe_tok - probe_kept + gns_tok + lead_tok
        start, B = phases[-1] if doubling else sched.phases[sched.phase_index_at(p - 1)]  # the batch before the decision
        # the loop probes no point that can lead to no raise (counted in the best case: the earlier points at
        # this batch saw a raise; a schedule that raises later is taken as given) nor past the measurement budget
        streak = min(streak + 1, a.confirm - 1) if B == prev_batch else 0
        prev_batch = B

        def cost(q: int, B=B, start=start) -> int:
            return point_measurement(q, B, start, T, a, lead_limit(q, points, N, a), True, noise)

        why = futile_point(p, B, streak, points, N, a, spent, cost)
        over = a.measurement_budget is not None and spent + cost(p) > a.measurement_budget * N
        fits = a.max_batch_seqs is None or 2 * B <= a.max_batch_seqs
        if why is not None and (over or not (fits if doubling else any(s >= p for s, _b in phases[1:]))):
            skipped = {"from_tokens": p, "points": [q for q in points if q >= p], "batch_seqs": B, "reason": why,
                       "over_budget": over}
            break
        if doubling and fits:
            phases.append((p, 2 * B))
        w = a.window_tokens or default_window(p, a.window_fraction, B, max(a.probe_k), T)
        got = main_run_lead(p, start, B, T, w, a.cooldown_fraction, lead_limit(p, points, N, a)) if not a.speculate else None
        lead_steps = (got[1] - got[0]) // (B * T) if got else 0  # the probe at B reads these from the run
        # a raise here: a phase that starts at the point, or at the step boundary the run takes it at
        raised_to = next((b for s, b in phases[1:] if p <= s < p + B * T), None)
        for k in a.probe_k:
            kb = int(round(k * B))
            n = -(-w // (kb * T))
            n0 = n - lead_steps if kb == B else n
            probe_tok += (n0 + (a.replicates - 1) * n) * kb * T
            probe_secs += (n0 + (a.replicates - 1) * n) * t(kb)
            if kb == raised_to and a.cooldown_fraction > 0:  # the run continues from this probe
                t0 = got[0] if got else p
                kept_steps = (last_step_before_cooldown(t0, kb * T, w, a.cooldown_fraction) - t0) // (kb * T)
                probe_kept += kept_steps * kb * T
                adj -= kept_steps * t(kb)  # the run does not train them again
        if got and raised_to is not None:  # raised here: the run's lead is dropped
            lead_tok += lead_steps * B * T
            adj += lead_steps * t(B)
        if noise:
            gns_tok += a.gns_batches * a.gns_b_big * T
            gns_secs += a.gns_batches * t(a.gns_b_big)  # a per-example backward costs about one step
        by_point.append({"tokens": p, "batch_seqs": B, "raised_to": raised_to,
                         "measurement_tokens": probe_tok - probe_kept + gns_tok + lead_tok - before})
        spent += by_point[-1]["measurement_tokens"]
    steps, secs = _phases_time(list(phases), T, N, t)
    secs += adj
    total_secs = secs + probe_secs + gns_secs
    return {
        "schedule": [list(p) for p in phases], "steps": steps, "steps_saved_pct": 100 * (1 - steps / c_steps),
        "probe_tokens": probe_tok, "probe_fraction": probe_tok / N, "gns_tokens": gns_tok, "skipped_probe_points": skipped,
        "lead_discarded_tokens": lead_tok, "probe_kept_tokens": probe_kept, "points": by_point,
        "measurement_tokens": probe_tok - probe_kept + gns_tok + lead_tok,
        "measurement_fraction": (probe_tok - probe_kept + gns_tok + lead_tok) / N,
        "run_seconds": secs, "probe_seconds": probe_secs + gns_secs, "total_seconds": total_secs,
        "time_vs_control": total_secs / c_secs if c_secs else None,
        "pays_off": total_secs < c_secs,
        "pays_off_with_parallel_probes": secs < c_secs,
    }


def estimate(cfg: PlanConfig, times: dict[int, float]) -> dict:
    """The estimate, from step times by batch (pure arithmetic)."""
    a, N, B0, T = cfg.auto, cfg.total_tokens, cfg.start_seqs, cfg.seq_len
    first = a.first_probe_tokens if a.first_probe_tokens is not None else max(N // 16, 1)
    points = sorted(a.probe_at) if a.probe_at else log_spaced_points(N, first, a.probe_factor)
    t = _time_fn(times)
    # the doubling bound is built as the loop would probe: a raise at every point it probes (None here)
    scen: dict = {"no raise": [(0, B0)], "doubling at every probe point": None}
    if cfg.expected:
        scen["expected"] = list(BatchSchedule.parse(cfg.expected, T).phases)
    c_steps = steps_for([(0, B0)], T, N)
    c_secs = c_steps * t(B0)
    out = {"total_tokens": N, "start_seqs": B0, "seq_len": T, "probe_points": points, "window_tokens": a.window_tokens,
           "window_fraction": None if a.window_tokens else a.window_fraction,
           "probe_k": sorted(a.probe_k), "replicates": a.replicates, "step_seconds": {str(k): v for k, v in sorted(times.items())},
           "measurement_budget": a.measurement_budget,
           "control": {"steps": c_steps, "seconds": c_secs}, "scenarios": {}}
    for name, given in scen.items():
        out["scenarios"][name] = _scenario(a, points, N, B0, T, t, given, c_steps, c_secs)
    if a.confirm_factor and a.confirm > 1:  # a pass not yet confirmed is probed again at F x its point
        nxt = points[1:] + [N]
        extra = [int(round(p * a.confirm_factor)) for p, q in zip(points, nxt) if p < round(p * a.confirm_factor) < q]
        tok = 0
        for p in extra:
            w = a.window_tokens or default_window(p, a.window_fraction, B0, max(a.probe_k), T)
            tok += a.replicates * sum(-(-w // (int(round(k * B0)) * T)) * int(round(k * B0)) * T for k in a.probe_k)
        out["confirmation_points_max"] = extra
        out["confirmation_probe_tokens_max"] = tok
    return out


def run_plan(cfg: PlanConfig) -> dict:
    check_choices(cfg)
    if cfg.total_tokens < 1 or cfg.start_seqs < 1 or cfg.seq_len < 1:
        raise ConfigError(f"total_tokens={cfg.total_tokens}, start_seqs={cfg.start_seqs} and seq_len={cfg.seq_len} "
                          f"must be positive")
    if cfg.out:
        check_output(cfg.out, "--out", "file")
    if cfg.step_seconds is not None:
        try:
            times = {int(k): float(v) for k, v in cfg.step_seconds.items()}
        except (TypeError, ValueError, AttributeError):
            raise ConfigError(f"step_seconds={cfg.step_seconds!r} must map batch sizes to seconds, e.g. "
                              '{"8": 0.05, "16": 0.09}') from None
        if not times or any(b < 1 or s <= 0 for b, s in times.items()):
            raise ConfigError(f"step_seconds={cfg.step_seconds!r} needs positive batches and positive seconds")
    elif cfg.preset:
        from .. import presets

        pc = presets.get(cfg.preset)
        if pc.model.seq_len != cfg.seq_len:
            raise ConfigError(f"preset {cfg.preset} has sequences of {pc.model.seq_len} tokens, not seq_len={cfg.seq_len}")
        b, need = cfg.start_seqs, {cfg.start_seqs, cfg.auto.gns_b_big}
        for _ in range(6):
            b *= 2
            need.add(b)
        times = measure_step_seconds(pc, sorted(need))
    else:
        raise ConfigError("give step_seconds (e.g. --step-seconds '{\"8\": 0.05}') or --preset NAME to measure them")
    est = estimate(cfg, times)
    if cfg.sweep:
        curve = read_curve(cfg.sweep)
        if curve["seq_len"] != cfg.seq_len:
            raise ConfigError(f"the sweep {cfg.sweep} measured {curve['seq_len']}-token sequences, the plan has "
                              f"seq_len={cfg.seq_len}: give a sweep at the same sequence length")
        adv = advise_start(curve, cfg.start_seqs, until_tokens=cfg.total_tokens)
        est["start_advice"] = {**dataclasses.asdict(adv), "message": adv.message()}
    if cfg.out:
        write_json_atomic(cfg.out, est)
    return est


def describe(est: dict) -> list[str]:
    c = est["control"]
    win = fmt_count(est["window_tokens"]) if est["window_tokens"] else f"{est['window_fraction']:g} x the point's tokens"
    budget = (f", measurement budget {est['measurement_budget']:g} of the run" if est.get("measurement_budget") is not None
              else "")
    lines = [f"target {fmt_count(est['total_tokens'])} tokens from batch {est['start_seqs']}: probes at "
             f"{', '.join(fmt_count(p) for p in est['probe_points'])} tokens, windows of {win}, "
             f"k = {', '.join(f'{k:g}' for k in est['probe_k'])}{budget}",
             f"small-batch control: {c['steps']:,} steps, {c['seconds']:,.0f} s"]
    if est.get("start_advice"):
        lines.append(f"start batch: {est['start_advice']['message']}")
    if est.get("confirmation_points_max"):
        lines.append(f"confirmation points (a pass not yet confirmed): up to {len(est['confirmation_points_max'])} more, at "
                     f"{', '.join(fmt_count(p) for p in est['confirmation_points_max'])} tokens, up to "
                     f"{fmt_count(est['confirmation_probe_tokens_max'])} more probe tokens "
                     f"({100 * est['confirmation_probe_tokens_max'] / est['total_tokens']:.0f}% of the run)")
    by = est["scenarios"].get("expected") or est["scenarios"]["no raise"]
    if by.get("points"):
        which = "expected schedule" if "expected" in est["scenarios"] else "no raise"
        lines.append(f"measurement by probe point ({which}; a point's window grows with its tokens): "
                     + ", ".join(f"{fmt_count(q['tokens'])} at batch {q['batch_seqs']}"
                                 + (f" -> {q['raised_to']}" if q["raised_to"] else "")
                                 + f": {fmt_count(q['measurement_tokens'])}" for q in by["points"]))
    for name, s in est["scenarios"].items():
        verdict = ("pays off" if s["pays_off"] else
                   "pays off only with probes on other devices" if s["pays_off_with_parallel_probes"] else "does not pay off")
        lead = (f", {fmt_count(s['lead_discarded_tokens'])} tokens the run trained ahead and dropped at its raises"
                if s.get("lead_discarded_tokens") else "")
        gns = f", noise scale {fmt_count(s['gns_tokens'])}" if s.get("gns_tokens") else ""
        kept = (f" (of {fmt_count(s['probe_tokens'])} trained: the run continues from its raises' probes)"
                if s.get("probe_kept_tokens") else "")
        sk = s.get("skipped_probe_points")
        skip = ""
        if sk:
            skip = (f"; no probe at {', '.join(fmt_count(p) for p in sk['points'])} tokens "
                    f"({'past the measurement budget' if sk['over_budget'] else 'no raise can follow'})")
            late = [b for st, b in s["schedule"][1:] if st >= sk["from_tokens"]]
            if late and name != "doubling at every probe point":
                skip += f", so the loop would not take this schedule's raise(s) to {', '.join(map(str, late))}"
        lines.append(f"{name}: {s['steps']:,} steps ({s['steps_saved_pct']:.0f}% fewer), measurement "
                     f"{fmt_count(s['measurement_tokens'])} tokens ({100 * s['measurement_fraction']:.0f}% of the run: probes "
                     f"{fmt_count(s['probe_tokens'] - s.get('probe_kept_tokens', 0))}{kept}{lead}{gns}), time {s['run_seconds']:,.0f} s "
                     f"+ probes {s['probe_seconds']:,.0f} s = {s['time_vs_control']:.2f}x the control: {verdict}{skip}")
    return lines
