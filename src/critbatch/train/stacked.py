"""Several runs of one shape trained together as one stacked model (issue 15: small models fill the GPU).

A branch sweep trains many small runs of the same architecture and batch: replicates, and the same
k at several points. Trained one by one, a small model leaves an accelerator idle between kernel
launches. Here N such runs step together: their parameters live in one stacked tensor per weight,
shape (N, ...), and one ``torch.func.vmap`` of ``torch.func.functional_call`` runs all N forward and
backward passes as batched kernels. Everything else stays each run's own: its optimizer (with its own
state, LR, Adam hyperparameters and weight decay), gradient clipping, data stream, LR schedule,
evaluation, checkpoints, metrics and result.json. Each run's parameters and gradients are *views*
into the stacked tensors, so its own ``torch.optim.AdamW`` updates the stacked weights in place.

The numbers equal training each run alone up to float rounding (batched kernels add in another
order; ``tests/test_stacked.py`` holds them to 1e-5 in fp32). A run directory trained stacked is a
normal run directory: a killed stack resumes, each run from its own checkpoint, stacked again while
their steps have one shape (a run left with more steps than the others finishes alone).

Stackable: single-process runs of a stackable model family (the built-in GPT) on one device with the same
model config, precision and step structure, and no job callbacks (the online noise scale reads each
micro-batch's gradient, which lives in the stack until the step's last micro-batch).
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from pathlib import Path

import torch
from torch.func import functional_call, stack_module_state, vmap

from ..config import TrainConfig, defining_dict
from ..model import family
from ..model.losses import next_token_loss_sum
from .early_stop import STOP_RULE_FILE
from .job import JobSpec
from .loop import Trainer


def stack_key(cfg: TrainConfig) -> str | None:
    """Runs with the same key can be stacked; ``None``: this run cannot be (it trains alone)."""
    if not family(cfg.model).stackable:
        return None
    d = defining_dict(cfg)
    return repr((d["model"], cfg.precision, cfg.device, cfg.compile, cfg.micro_batch_seqs, cfg.batch_seqs,
                 d.get("batch_schedule")))


def _can_stack(trainers: list[Trainer]) -> bool:
    """Single-process, uncompiled runs on one device."""
    return all(not (t.dist.enabled or t.fsdp or t.cfg.compile) and t.device == trainers[0].device for t in trainers)


class StackedModels:
    """N models of one architecture whose parameters and buffers become views into stacked tensors."""

    def __init__(self, models: list[torch.nn.Module]):
        self.models = models
        params, buffers = stack_module_state(models)  # copies: (N, ...) per name
        self.names = list(params)
        self.params = {n: p.detach() for n, p in params.items()}
        self.buffers = {n: b.detach() for n, b in buffers.items()}
        for i, m in enumerate(models):  # each model's parameters become views into the stack
            named = dict(m.named_parameters())
            for n in self.names:
                named[n].data = self.params[n][i]
            for n, b in m.named_buffers():
                b.data = self.buffers[n][i]
        self.template = models[0]

    def _loss_sums(self, params: dict, buffers: dict, seqs: torch.Tensor) -> torch.Tensor:
        return next_token_loss_sum(functional_call(self.template, (params, buffers), (seqs[:, :-1],)), seqs)

    def backward(self, micro_batches, scales: torch.Tensor, autocast=contextlib.nullcontext) -> torch.Tensor:
        """Forward and backward of every model over its micro-batches (``micro_batches`` yields, per
        micro-batch, one (n, seq_len + 1) token tensor per model); each loss sum is scaled by
        ``scales[i]`` before the backward. Afterwards every model's ``.grad`` are views of its slice
        of the stacked gradients. Returns the N unscaled loss sums (float64)."""
        leaves = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}  # the same storage
        loss_sums = torch.zeros(len(self.models), dtype=torch.float64, device=scales.device)
        for micro in micro_batches:
            seqs = torch.stack(list(micro))
            with autocast(), _plain_attention(self.template):
                ls = vmap(self._loss_sums)(leaves, self.buffers, seqs)
            (ls * scales).sum().backward()
            loss_sums += ls.detach().double()
        for i, m in enumerate(self.models):
            named = dict(m.named_parameters())
            for n in self.names:
                named[n].grad = leaves[n].grad[i]
        return loss_sums


class Stack:
    """N built trainers whose models share stacked parameter storage."""

    def __init__(self, trainers: list[Trainer]):
        self.trainers = trainers
        self.models = StackedModels([t.raw_model for t in trainers])

    def step(self, plans: list) -> list[tuple[float, float, dict]]:
        """One optimizer step of every trainer (``plans[i]`` is trainer i's :class:`StepPlan`)."""
        ts = self.trainers
        scales = torch.tensor([t.begin_step(p) for t, p in zip(ts, plans)], dtype=torch.float32, device=ts[0].device)
        loss_sums = self.models.backward(zip(*(t.micro_batches(p) for t, p in zip(ts, plans))), scales,
                                         ts[0]._autocast)
        recs = [t.begin_optim_step(p) for t, p in zip(ts, plans)]
        norms = torch.stack([t.clip_gradients() for t in ts]).double()
        values = torch.cat([loss_sums, norms]).tolist()  # the stack's one wait on the device a step, not 2N
        out = []
        for i, (t, p) in enumerate(zip(ts, plans)):
            loss, grad_norm = values[i] / (p.batch_seqs * t.cfg.model.seq_len), values[len(ts) + i]
            t.finish_optim_step(loss, grad_norm)
            out.append((loss, grad_norm, recs[i]))
        return out


def measure_stacking(model_cfg, batch_seqs: int, n: int, device, reps: int = 5,
                     autocast=contextlib.nullcontext) -> dict:
    """Seconds per optimizer step of n models of ``model_cfg`` at ``batch_seqs`` sequences, trained
    one after another and stacked (random tokens, AdamW), after a warm-up step of each; ``faster``
    names the quicker path."""
    from ..model import build_model
    from ..optim import build_optimizer
    from ..config import OptimConfig

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, model_cfg.vocab_size, (batch_seqs, model_cfg.seq_len + 1), generator=g).to(dev)

    def models():
        ms = [build_model(model_cfg).to(dev) for _ in range(n)]
        return ms, [build_optimizer(m, OptimConfig(), dev) for m in ms]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    ms, opts = models()
    def alone_step(m, o):
        with autocast():
            loss = m.loss_sum(seqs)
        loss.backward()
        o.step()
        o.zero_grad(set_to_none=True)

    for m, o in zip(ms, opts):
        alone_step(m, o)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        for m, o in zip(ms, opts):
            alone_step(m, o)
    sync()
    alone = (time.perf_counter() - t0) / reps
    ms, opts = models()
    st = StackedModels(ms)
    scales = torch.full((n,), 1.0 / seqs[:, 1:].numel(), device=dev)

    def stacked_step():
        st.backward([[seqs] * n], scales, autocast)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)

    stacked_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        stacked_step()
    sync()
    stacked = (time.perf_counter() - t0) / reps
    return {"runs": n, "batch_seqs": batch_seqs, "alone_s_per_step": alone, "stacked_s_per_step": stacked,
            "speedup": alone / stacked, "faster": "stacked" if stacked < alone else "alone"}


@contextlib.contextmanager
def _plain_attention(model: torch.nn.Module):
    """Attention in plain ops while vmapped: the fused kernels have no batching rule on every
    device, and vmap's fallback loops over the stack one run at a time."""
    mods = [m for m in model.modules() if hasattr(type(m), "fused")]
    for m in mods:
        m.fused = False
    try:
        yield
    finally:
        for m in mods:
            del m.fused  # back to the class default


def _stackable_plans(plans: list) -> bool:
    p0 = plans[0]
    return all((p.batch_seqs, p.micro_batch_seqs, p.accum, [n for _, n in p.slices])
               == (p0.batch_seqs, p0.micro_batch_seqs, p0.accum, [n for _, n in p0.slices]) for p in plans)


def train_stacked(trainers: list[Trainer]) -> list[dict | None]:
    """Train the trainers together, step by step, while their steps have one shape; a trainer
    whose step differs (or that is left alone) finishes on its own. Returns each one's result."""
    results: list[dict | None] = [None] * len(trainers)
    todo = [i for i, t in enumerate(trainers) if t.existing_result is None]
    for i, t in enumerate(trainers):
        if t.existing_result is not None:
            results[i] = t.existing_result
    if len(todo) < 2 or not _can_stack([trainers[i] for i in todo]):
        for i in todo:
            results[i] = trainers[i].run()
        return results
    group = [trainers[i] for i in todo]
    for t in group:
        t.begin()
        t.trained_as = f"stacked x{len(group)}"
    stack = Stack(group)
    t_session = time.perf_counter()
    try:
        while all(t.running() for t in group):
            plans = [t.plan_step() for t in group]
            if not _stackable_plans(plans):
                break
            for t, plan, (loss, gn, rec) in zip(group, plans, stack.step(plans)):
                t.after_step(plan, loss, gn, rec)
    finally:
        dt = time.perf_counter() - t_session
        for t in group:  # the stack's time, shared: each run is charged 1/N of it
            t.state.elapsed_s += dt / len(group)
    for t in group:  # a run the stack could not take to its end (it diverged, or its steps differ) goes on alone
        _unstack(t)
        t0 = time.perf_counter()
        while t.running():
            plan = t.plan_step()
            t.after_step(plan, *t.train_step(plan))
        t.state.elapsed_s += time.perf_counter() - t0
    for i, t in zip(todo, group):
        results[i] = t.end(False)
    return results


def _unstack(t: Trainer) -> None:
    """Give the run's parameters their own storage again (checkpoints then hold one model, not N)."""
    for p in t.raw_model.parameters():
        p.data = p.data.clone()
    for b in t.raw_model.buffers():
        b.data = b.data.clone()


def job_stack_key(job_dir: Path) -> str | None:
    """:func:`stack_key` of a job directory (``None`` for a job that names callbacks or has an
    early-stop rule: those train alone)."""
    job = JobSpec.read(job_dir)
    if job.callbacks or (Path(job_dir) / STOP_RULE_FILE).is_file():
        return None
    return stack_key(job.train_config())


def stacks(dirs: list[Path], size: int) -> list[list[Path]]:
    """The job directories in groups that can train stacked, at most ``size`` each (order kept
    within a group); a job that cannot stack is a group of one."""
    groups: dict[str, list[Path]] = {}
    out: list[list[Path]] = []
    for d in dirs:
        key = job_stack_key(d) if size > 1 else None
        if key is None:
            out.append([d])
            continue
        g = groups.setdefault(key, [])
        g.append(d)
        if len(g) == size:
            out.append(list(g))
            g.clear()
    out.extend(g for g in groups.values() if g)
    return out


def run_jobs_stacked(job_dirs: list[str | Path], threads: int | None = None) -> list[dict | None]:
    """Train job directories (``job.json``) together where they stack (:func:`stack_key`), alone
    otherwise. Each directory is locked as :func:`critbatch.launch.run_job` locks it, so another
    process never trains the same job at the same time."""
    dirs = [Path(d) for d in job_dirs]
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    locks = []
    try:
        for d in dirs:
            f = open(d / ".lock", "w")
            fcntl.flock(f, fcntl.LOCK_EX)
            locks.append(f)
        trainers = [JobSpec.read(d).trainer(d) for d in dirs]
        groups: dict[str, list[int]] = {}
        for i, d in enumerate(dirs):
            key = job_stack_key(d)
            groups.setdefault(key if key is not None else f"alone-{i}", []).append(i)
        results: list[dict | None] = [None] * len(dirs)
        for idx in groups.values():
            for i, r in zip(idx, train_stacked([trainers[i] for i in idx])):
                results[i] = r
        return results
    finally:
        for f in locks:
            f.close()
        torch.set_num_threads(old)
