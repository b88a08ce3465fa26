"""The training run: one boring loop over optimizer steps, counted in tokens.

One optimizer step (docs/method.md §5): the step's B sequences are stream positions
``[offset, offset + B)``; rank r takes the r-th contiguous share, in micro-batches. Each micro-batch's
summed token loss is scaled by ``world_size / (B · seq_len)`` so the accumulated (and, under DDP or
FSDP2, averaged) gradient is exactly that of the mean loss over the global batch; gradients
synchronise once, on the last micro-batch; then clip, step. Checkpoints hold the full, unsharded state
in one format whatever the parallelism, so a run resumes at any world size, under DDP or FSDP2.

The pieces: :func:`critbatch.train.resolve.step_plan` (what the next step is: batch, micro-batches,
LR — pure schedule arithmetic), :meth:`Trainer.train_step` (the step itself, no I/O),
:meth:`Trainer.run` (the loop and its stop conditions), :class:`critbatch.train.state.TrainerState`
(where the run is between steps) and the callbacks of :mod:`critbatch.train.callbacks` (evaluation,
checkpoints, metrics, throughput, progress), which the loop does not know by name.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..config import TrainConfig, defining_dict, defining_hash, from_dict, to_dict, validate
from ..data import SequenceStream, open_data
from ..data.dataset import check_capacity, eval_sequences
from ..dist import (DistInfo, all_reduce_max_int, all_reduce_sum, barrier, fsdp_full_state, fsdp_load_optimizer,
                    init_distributed, resolve_device, shard_model)
from ..errors import CheckpointError, ConfigError
from ..io import check_output, read_json, read_jsonl, write_json_atomic
from ..model import build_model, count_params, flops_per_token
from ..model.losses import next_token_loss_sum
from ..optim import build_optimizer
from ..perf import peak_flops
from ..records import RunResult, read_run_result
from ..schedules import schedule_of
from .callbacks import Callback, make_callbacks, run_callbacks
from .checkpoint import (EVAL_LOSSES_FILE, check_model_matches, copy_checkpoint_state, load_checkpoint,
                         prune_resume_checkpoints, save_checkpoint, scan_checkpoints, training_meta)
from .resolve import StepPlan, autocast, config_diff, environment, resolve_config, resolve_data, step_plan
from .state import EMA_ALPHA, TrainerState

# Slurm's preemption and time-limit signals (SIGTERM; SIGUSR1/SIGUSR2 through --signal, submitit's USR2)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@dataclass
class Display:
    """What a run shows (never what it computes)."""

    progress: bool | None = None
    """A progress bar: ``None``: when stderr is a terminal."""
    quiet: bool = False
    """No warnings (a repeated epoch) on the console."""
    desc: str | None = None
    """The progress bar's label (default: the run directory's name)."""


@dataclass
class RunOptions:
    """How a session of the run goes: where it starts, when it pauses, what it keeps."""

    eval_at_start: bool = True
    """Evaluate before the first step of a fresh run (branches skip it: their parent evaluated there)."""
    keep_final_checkpoint: bool = True
    """Keep a checkpoint at the end (branches do not: they prune theirs once complete)."""
    stop_after_tokens: int | None = None
    """Pause at the first step boundary at or after this many tokens (a resume checkpoint is written)."""
    stop_on_signals: bool = False
    """Pause on SIGTERM, SIGUSR1 or SIGUSR2 at the next step boundary, every rank together (job workers)."""
    init_loss_ema: float | None = None
    """The smoothed training loss a run from ``init_from`` starts with (a branch starting inside its
    window carries what it would have reached by then); ``None``: it starts afresh."""


class Trainer:
    """One training run in ``out_dir``. Use :func:`train` unless you need the object.

    ``init_from`` starts from another run's checkpoint (a directory, or an already loaded
    checkpoint dict, which is deep-copied first): model and optimizer state, step and loader
    offset are taken from it, while batch, LR rule and everything else come from ``cfg``. This is
    how a branch starts; its smoothed training loss starts afresh, or from ``init_loss_ema`` (a
    branch that starts from the parent's checkpoint inside its window carries the EMA it would have
    reached by then). ``stop_after_tokens`` pauses the run at the first step boundary at or after
    that count (a resume checkpoint is written; running again continues). ``stop_on_signals`` (set by
    job workers) pauses it the same way at the first step boundary after SIGTERM, SIGUSR1 or SIGUSR2,
    on every rank together; ``stop_signal`` then names the signal.
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | Path | None, *, callbacks: Iterable[Callback] = (),
                 init_from: str | Path | dict | None = None, progress: bool | None = None,
                 stop_after_tokens: int | None = None, quiet: bool = False, desc: str | None = None,
                 eval_at_start: bool = True, keep_final_checkpoint: bool = True, stop_on_signals: bool = False,
                 init_loss_ema: float | None = None):
        validate(cfg)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            check_output(self.out_dir, "--out")
        self.display = Display(progress, quiet, desc)
        self.options = RunOptions(eval_at_start, keep_final_checkpoint, stop_after_tokens, stop_on_signals,
                                  init_loss_ema)
        # ---- where it runs ----
        self.device = resolve_device(cfg.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.fsdp = cfg.parallel == "fsdp" and self.dist.enabled
        self.callbacks = run_callbacks(self._checked(callbacks, cfg.log_to), progress=progress, desc=desc,
                                       eval_at_start=eval_at_start, keep_final_checkpoint=keep_final_checkpoint)
        # ---- the session's state, set as the run goes ----
        self.state = TrainerState()
        self.stop_signal: int | None = None
        """The stop signal the run paused on (``RunOptions.stop_on_signals``)."""
        self.pause_reason: str | None = None
        """Set by :meth:`request_pause` (a callback's verdict, e.g. an early stop)."""
        self.trained_as = "alone"
        """``alone``, or ``stacked xN`` when :mod:`critbatch.train.stacked` trained it with others."""
        self.diverged_at: int | None = None
        self.diverged_reason: str | None = None
        self.last_eval: tuple[int, float] | None = None
        """(tokens, loss) of the latest evaluation."""
        self.last_eval_se: float | None = None
        self.last_eval_per_seq: torch.Tensor | None = None
        self.last_boundary = 0
        """Tokens at the start of the latest step (where its boundary callbacks looked back to)."""
        self.step_info: dict = {}
        """The current step's shape (batch, micro-batches, accumulation) for callbacks."""
        # ---- built by begin(): model, optimizer and their derived numbers ----
        self.raw_model: torch.nn.Module | None = None
        self.model: torch.nn.Module | None = None
        """``raw_model`` as trained: compiled and/or wrapped by DDP."""
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.Tensor] = []
        self.n_params = self.flops_per_token = 0
        self.peak_flops: float | None = None
        # ---- where it starts: checked before anything is written ----
        self.existing_result: RunResult | None = None
        """A finished run's result.json (the run is then a no-op)."""
        self.resume_from: Path | None = None
        self.start_offset = 0
        self._init: dict | None = None
        """The checkpoint to start from, until the model and optimizer hold it."""
        self.data = open_data(resolve_data(cfg), verify=cfg.data.verify)
        self.cfg = resolve_config(cfg, self.data)
        c = self.cfg
        self.schedule = schedule_of(c)
        self.schedule.check_divisible(c.micro_batch_seqs, self.dist.world_size)
        if c.optim.name == "adamw":
            self.schedule.check_adam(c.optim.beta1, c.optim.beta2, c.optim.eps)
        self.stream = SequenceStream(self.data, c.model.seq_len, c.data.order_seed)
        self.eval_set = eval_sequences(self.data, c.model.seq_len, c.eval_seqs, c.data.eval_seed)
        self._find_start(init_from)
        self.planned_steps, self.end_tokens = self._check_capacity()

    def _checked(self, callbacks: Iterable[Callback], log_to: list[str]) -> list[Callback]:
        """The caller's callbacks after those ``log_to`` names (but not one the caller gave by name)."""
        user = list(callbacks)
        given = {cb.name for cb in user}
        user = [*make_callbacks(n for n in log_to if n not in given), *user]
        for cb in user:
            if self.fsdp and not cb.supports_fsdp:
                raise ConfigError(f"{cb.description or 'the ' + cb.name + ' callback'} needs parallel='ddp'; it is not "
                                  f"available with parallel='fsdp'")
        return user

    # ---- where the run starts -----------------------------------------------------------------
    def _find_start(self, init_from) -> None:
        """A finished run, a run to resume from its newest checkpoint, a start from ``init_from``,
        or a fresh start. Only the checkpoint's meta is kept until the model is built."""
        c = self.cfg
        if self.out_dir is not None and (self.out_dir / "config.json").is_file():
            # through the dataclass: fields added since the run was made take their defaults
            saved = from_dict(TrainConfig, read_json(self.out_dir / "config.json"))
            if saved.data.path:  # runs made before paths were recorded resolved: compare them resolved
                saved.data.path = str(Path(saved.data.path).resolve())
            diffs = config_diff(defining_dict(saved), defining_dict(c))
            if diffs:
                raise ConfigError(f"{self.out_dir} holds a run with a different config ({'; '.join(diffs[:4])}); "
                                  f"use another --out")
            if (self.out_dir / "result.json").is_file():
                self.existing_result = read_run_result(self.out_dir)
            else:
                ckpts, damaged = scan_checkpoints(self.out_dir)
                newest = ckpts[-1].tokens if ckpts else -1
                for d, why in damaged:  # never skipped in silence: the run resumes from an older one, or restarts
                    digits = d.name[-12:]
                    if digits.isdigit() and int(digits) < newest:
                        continue  # older than the checkpoint it resumes from: it would not have been used
                    warnings.warn(f"critbatch: the checkpoint {d} is damaged ({why}) and is skipped; the run "
                                  + (f"resumes from {ckpts[-1].path.name}" if ckpts else "starts again from the beginning"),
                                  stacklevel=2)
                if ckpts:
                    self.resume_from = ckpts[-1].path
                    read_jsonl(self.out_dir / "metrics.jsonl")  # damaged records fail here, before anything is written
        if self.resume_from is not None:
            self._init, where = load_checkpoint(self.resume_from), str(self.resume_from)
        elif isinstance(init_from, dict):
            self._init, where = copy_checkpoint_state(init_from), "given in memory"
        elif init_from is not None:
            self._init, where = load_checkpoint(init_from), str(init_from)
        if self._init is not None:
            check_model_matches(self._init["meta"], to_dict(c.model), where)
            self.start_offset = int(self._init["meta"]["offset_seqs"])
            if self.start_offset * c.model.seq_len != int(self._init["meta"]["tokens"]):
                raise CheckpointError(f"checkpoint {where} is inconsistent: offset and tokens disagree")

    def _check_capacity(self) -> tuple[int, int]:
        """(the steps planned, the tokens at the end), once the run is checked to fit the data."""
        c = self.cfg
        T = c.model.seq_len
        planned_steps, end_tokens = self.schedule.walk(self.start_offset * T, c.total_tokens)
        if c.exact_total_tokens:
            end_tokens = max(c.total_tokens, self.start_offset * T)
            last = (end_tokens - self.start_offset * T) % self.schedule.batch_tokens_at(max(end_tokens - 1, 0))
            if last and (last // T) % self.dist.world_size:
                raise ConfigError(f"the final partial step of {last // T} sequences cannot be split over "
                                  f"{self.dist.world_size} ranks; choose total_tokens so it divides")
        need = end_tokens // T + c.data.stream_shift_seqs
        epochs = check_capacity(self.stream, need, c.data.allow_repeat, "the run",
                                f"pass --allow-repeat to train {need / self.stream.n_seqs:.2f} epochs, or lower --total-tokens")
        if epochs > 1 and self.dist.is_main and not self.display.quiet:
            warnings.warn(f"critbatch: this run repeats data: it reads {epochs:.2f} epochs of the training split "
                          f"({need:,} of {self.stream.n_seqs:,} sequences)", stacklevel=2)
        return planned_steps, end_tokens

    # ---- the model --------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.cfg.precision, self.device)

    def _build(self) -> None:
        c = self.cfg
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals made fp32 CPU steps 10-40x slower here
        torch.manual_seed(c.seed)
        self.raw_model = build_model(c.model).to(self.device)  # built on CPU RNG, same init on every device
        if self._init is not None:
            self.raw_model.load_state_dict(self._init["model"])  # full weights, before any sharding
        if self.fsdp:
            shard_model(self.raw_model, self.device)  # in place: the optimizer below holds the shards
        self.optimizer = build_optimizer(self.raw_model, c.optim, self.device)
        self.state = TrainerState()
        if self._init is not None:
            self._restore(self._init)
        self._init = None  # the model and optimizer hold it now; do not keep a second copy for the run
        self.model = self.raw_model
        if c.compile:
            self.model = torch.compile(self.model)
        if self.dist.enabled and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.n_params = count_params(c.model)
        self.flops_per_token = flops_per_token(c.model)
        self.peak_flops = peak_flops(self.device)

    def _restore(self, ck: dict) -> None:
        """Optimizer, position and (when resuming) the session state, RNG and callback state."""
        # A deep copy: load_state_dict keeps references to same-device tensors (docs/method.md §5).
        if self.fsdp:
            fsdp_load_optimizer(self.raw_model, self.optimizer, copy_checkpoint_state(ck["optim"]))
        else:
            self.optimizer.load_state_dict(copy_checkpoint_state(ck["optim"]))
        self.state.step = int(ck["meta"]["step"])
        self.state.offset_seqs = int(ck["meta"]["offset_seqs"])
        if self.resume_from is None:  # a start from another run's checkpoint (a branch)
            self.state.start_step = self.state.step
            self.state.start_tokens = self.state.offset_seqs * self.cfg.model.seq_len
            self.state.loss_ema = self.options.init_loss_ema
            saved = (ck.get("state") or {}).get("callbacks", {})
            for cb in self.callbacks:
                if cb.inherit and cb.name in saved:
                    cb.load_state_dict(saved[cb.name])
            return
        st = ck["state"]
        self.state.load_session(st)
        torch.set_rng_state(st["rng_cpu"])
        if self.device.type == "cuda" and st.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(st["rng_cuda"], self.device)
        for cb in self.callbacks:
            if cb.name in st.get("callbacks", {}):
                cb.load_state_dict(st["callbacks"][cb.name])

    @property
    def tokens(self) -> int:
        return self.state.offset_seqs * self.cfg.model.seq_len

    # ---- services for callbacks -----------------------------------------------------------------
    def log(self, record: dict) -> None:
        for cb in self.callbacks:
            cb.on_log(self, record)

    def diverge(self, tokens: int, reason: str) -> None:
        """Record a divergence at ``tokens`` and why; the loop stops at this boundary."""
        if self.diverged_at is None:
            self.diverged_at, self.diverged_reason = tokens, reason

    def kept_due(self, tokens_before: int | None) -> list[int]:
        """Requested kept checkpoints due at this boundary: those in (tokens_before, tokens], or, for
        ``None`` (the start), those requested exactly at the current count."""
        t = self.tokens
        return [r for r in sorted(set(self.cfg.checkpoint_tokens))
                if (r == t if tokens_before is None else tokens_before < r <= t)]

    @torch.no_grad()
    def evaluate_per_seq(self) -> torch.Tensor:
        """Per-sequence mean next-token loss on the fixed held-out set, (n,) float64 on the CPU, the
        same on every rank (each rank evaluates its share of the chunks; a sum assembles them)."""
        t0 = time.perf_counter()
        model = self.raw_model
        was_training = model.training
        model.eval()
        n = self.eval_set.shape[0]
        mb = max(1, min(n, 64))
        per_seq = torch.zeros(n, dtype=torch.float64, device=self.device)
        chunks = list(range(0, n, mb))
        mine = chunks[self.dist.rank::self.dist.world_size]
        rounds = -(-len(chunks) // self.dist.world_size)
        for r in range(rounds if self.fsdp else len(mine)):
            # under FSDP every forward is a collective: a rank without a chunk left repeats one, unused
            i = mine[r] if r < len(mine) else 0
            seqs = self.eval_set[i:i + mb].to(self.device, non_blocking=True)
            with self._autocast():
                ls = model.seq_loss_sums(seqs).double()
            if r < len(mine):
                per_seq[i:i + mb] = ls
        all_reduce_sum(per_seq, self.dist)
        model.train(was_training)
        self.last_eval_per_seq = (per_seq / self.cfg.model.seq_len).cpu()  # waits for the device
        self.state.eval_s += time.perf_counter() - t0
        return self.last_eval_per_seq

    def evaluate(self) -> float:
        """Mean next-token loss on the fixed held-out set; ``self.last_eval_se`` holds its standard
        error over sequences, sd / sqrt(n) (the set is a random sample of the held-out split)."""
        x = self.evaluate_per_seq()
        self.last_eval_se = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")
        self.last_eval = (self.tokens, float(x.mean()))
        return self.last_eval[1]

    def save_checkpoint(self, kept: bool, requested: int | None = None) -> Path | None:
        """A checkpoint at the current step boundary (a collective under FSDP: every rank calls it).
        A kept one carries the eval loss measured at this boundary, if any, and its per-sequence losses."""
        if self.out_dir is None:
            return None
        if self.fsdp:  # gathering the full state is a collective: every rank takes part
            model_state, optim_state = fsdp_full_state(self.raw_model, self.optimizer)
        else:
            model_state, optim_state = self.raw_model.state_dict(), self.optimizer.state_dict()
            # a tensor viewing a larger storage (a stacked run's weights) is saved as its own copy
            model_state = {k: v.clone() if v.untyped_storage().nbytes() > v.numel() * v.element_size() else v
                           for k, v in model_state.items()}
        if not self.dist.is_main:
            return None
        ev = self.last_eval[1] if (kept and self.last_eval and self.last_eval[0] == self.tokens) else None
        st = {**self.state.to_dict(), "rng_cpu": torch.get_rng_state(),
              "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
              "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks}}
        meta = training_meta(self.state, self.cfg, self.schedule, tokens=self.tokens, requested=requested,
                             config_hash=defining_hash(self.cfg), eval_loss=ev, eval_loss_se=self.last_eval_se)
        arrays = {EVAL_LOSSES_FILE[:-4]: self.last_eval_per_seq.numpy()} if ev is not None else None
        path = save_checkpoint(self.out_dir / "ckpt", tokens=self.tokens, kept=kept, model_state=model_state,
                               optim_state=optim_state, state=st, meta=meta, arrays=arrays)
        if not kept:
            prune_resume_checkpoints(self.out_dir, keep=path)
        return path

    # ---- one step -----------------------------------------------------------------------------
    def plan_step(self) -> StepPlan:
        """The next step's batch, micro-batches, LR (and Adam hyperparameters) from the schedules."""
        return step_plan(self.cfg, self.schedule, self.tokens, self.state.offset_seqs, self.dist.rank,
                         self.dist.world_size)

    def _grad_sync(self, last_micro: bool):
        """Gradients synchronise once per optimizer step, on its last micro-batch."""
        if self.fsdp:
            self.raw_model.set_requires_gradient_sync(last_micro)
        elif self.dist.enabled and not last_micro:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def train_step(self, plan: StepPlan) -> tuple[float, float, dict]:
        """One optimizer step: accumulate the micro-batches, synchronise once, clip, step. Returns
        (mean loss, gradient norm, the step's record); a non-finite loss or norm skips the update."""
        scale = self.begin_step(plan)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, seqs in enumerate(self.micro_batches(plan)):
            with self._grad_sync(last_micro=i == plan.accum - 1):
                with self._autocast():
                    logits = self.model(seqs[:, :-1])
                ls = next_token_loss_sum(logits, seqs)
                (ls * scale).backward()
            loss_sum += ls.detach().double()
            for cb in self.callbacks:
                cb.on_micro_backward(self, i, plan.accum)
        return self.complete_step(plan, loss_sum)

    def begin_step(self, plan: StepPlan) -> float:
        """Set the step's LR (and Adam hyperparameters); returns the loss scale of a micro-batch's
        summed token losses (the per-token mean over the global batch; DDP divides by W again)."""
        for g in self.optimizer.param_groups:
            g["lr"] = plan.lr
            if plan.adam is not None:
                g["betas"], g["eps"] = plan.adam[:2], plan.adam[2]
        B, T = plan.batch_seqs, self.cfg.model.seq_len
        self.step_info = {"batch_seqs": B, "micro_batch_seqs": plan.micro_batch_seqs, "accum": plan.accum,
                          "tokens": plan.tokens, "micro_sizes": [n for _, n in plan.slices]}
        return self.dist.world_size / (B * T)

    def micro_batches(self, plan: StepPlan):
        """The step's micro-batches of this rank, (n, seq_len + 1) token ids on the device."""
        pin = self.device.type == "cuda"  # page-locked: the copy to the GPU runs asynchronously
        for pos, n in plan.slices:
            seqs = self.stream.batch(pos, n)
            yield (seqs.pin_memory() if pin else seqs).to(self.device, non_blocking=True)

    def complete_step(self, plan: StepPlan, loss_sum: torch.Tensor) -> tuple[float, float, dict]:
        """After the micro-batches' backward passes (gradients in ``.grad``): reduce the loss, clip,
        step the optimizer (skipped for a non-finite loss or norm) and clear the gradients. The
        host waits on the device once a step, for the loss and the norm together."""
        all_reduce_sum(loss_sum, self.dist)
        rec = self.begin_optim_step(plan)
        total, grad_norm = torch.stack([loss_sum.double(), self.clip_gradients().double()]).tolist()
        loss = total / (plan.batch_seqs * self.cfg.model.seq_len)
        self.finish_optim_step(loss, grad_norm)
        return loss, grad_norm, rec

    def begin_optim_step(self, plan: StepPlan) -> dict:
        """The step's record, and the callbacks' hook before clipping and the optimizer step."""
        rec = {"step": self.state.step + 1, "tokens": plan.tokens + plan.batch_seqs * self.cfg.model.seq_len}
        for cb in self.callbacks:
            cb.on_before_optim_step(self, rec)
        return rec

    def clip_gradients(self) -> torch.Tensor:
        """Clip the gradients to ``optim.max_grad_norm`` (when set); returns their norm before
        clipping as a tensor on the device (reading it would make the host wait)."""
        max_norm = self.cfg.optim.max_grad_norm if self.cfg.optim.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor

    def finish_optim_step(self, loss: float, grad_norm: float) -> None:
        """The optimizer step (skipped for a non-finite loss or norm); the gradients cleared."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _advance(self, plan: StepPlan, loss: float, grad_norm: float, rec: dict) -> dict:
        """The state after a finished step, and its metrics record."""
        B, T = plan.batch_seqs, self.cfg.model.seq_len
        self.state.advance(B, loss)
        rec.update({"train/loss": loss, "train/loss_ema": self.state.loss_ema, "optim/lr": plan.lr,
                    "train/batch_seqs": B, "train/batch_tokens": B * T, "train/grad_norm": grad_norm})
        return rec

    # ---- preemption: a signal asks the run to pause at the next step boundary -----------------
    def _install_stop_handlers(self) -> dict:
        """Record SIGTERM/SIGUSR1/SIGUSR2 instead of dying of them (``stop_on_signals``, main thread
        only). Returns the previous handlers."""
        if not self.options.stop_on_signals or threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, _frame):
            self.stop_signal = signum

        return {s: signal.signal(s, handler) for s in STOP_SIGNALS}

    def request_pause(self, reason: str) -> None:
        """Pause at the next step boundary, as ``stop_after_tokens`` does (a resume checkpoint is
        written). Callbacks call it with the same inputs on every rank, so every rank pauses together."""
        self.pause_reason = reason

    def _pause_requested(self) -> bool:
        if self.pause_reason is not None:
            return True
        stop_after = self.options.stop_after_tokens
        if stop_after is not None and self.tokens >= stop_after:
            return True
        if not self.options.stop_on_signals:
            return False
        # every rank pauses at the same step boundary, whichever of them received the signal
        self.stop_signal = all_reduce_max_int(self.stop_signal or 0, self.dist, self.device) or None
        return self.stop_signal is not None

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> RunResult | None:
        """Train to ``total_tokens`` (or pause at ``stop_after_tokens`` or on a stop signal). Returns
        the result dict, or ``None`` when paused. A finished run directory is returned as it is."""
        if self.existing_result is not None:
            return self.existing_result
        previous = self._install_stop_handlers()
        try:
            return self._run()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _run(self) -> dict | None:
        self.begin()
        paused = False
        t_session = time.perf_counter()
        try:
            while self.running():
                if self._pause_requested():
                    paused = True
                    break
                plan = self.plan_step()
                loss, grad_norm, rec = self.train_step(plan)
                self.after_step(plan, loss, grad_norm, rec)
        finally:
            self.state.elapsed_s += time.perf_counter() - t_session
        return self.end(paused)

    # ---- the session in parts (the loop above; :mod:`critbatch.train.stacked` drives several at once) --
    def begin(self) -> None:
        """Write the run's config, build model and optimizer, start the callbacks."""
        if self.out_dir is not None and self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not (self.out_dir / "config.json").is_file():
                write_json_atomic(self.out_dir / "config.json", to_dict(self.cfg))
            write_json_atomic(self.out_dir / "env.json", environment())
        self._build()
        self.diverged_at, self.diverged_reason = None, None
        self.last_eval, self.last_eval_se, self.last_boundary = None, None, self.tokens
        for cb in self.callbacks:
            cb.on_train_start(self)

    def running(self) -> bool:
        """Steps remain and the run has not diverged."""
        return self.tokens < self.cfg.total_tokens and self.diverged_at is None

    def after_step(self, plan: StepPlan, loss: float, grad_norm: float, rec: dict) -> None:
        """Record a trained step: a non-finite loss or norm is a divergence; otherwise advance the
        state, log the step and run the boundary callbacks."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.log({"step": self.state.step, "tokens": plan.tokens, "train/diverged": True,
                      "train/loss": loss, "train/grad_norm": grad_norm})
            self.diverge(plan.tokens, f"the training loss ({loss}) or gradient norm ({grad_norm}) is not finite")
            return
        rec = self._advance(plan, loss, grad_norm, rec)
        for cb in self.callbacks:
            cb.on_step_end(self, rec)
        self.log(rec)
        self.last_boundary = plan.tokens
        for cb in self.callbacks:
            cb.on_boundary(self, plan.tokens)

    def end(self, paused: bool) -> dict | None:
        """Pause (callbacks write the resume checkpoint; returns None) or finish (returns the result)."""
        if paused:
            for cb in self.callbacks:
                cb.on_pause(self)
            barrier(self.dist)
            return None
        return self._finish()

    def _finish(self) -> dict:
        for cb in self.callbacks:
            cb.on_finish(self)
        result = self.result()
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        if self.out_dir is not None and self.dist.is_main:
            write_json_atomic(self.out_dir / "result.json", result)  # written last: "complete"
        for cb in self.callbacks:
            cb.on_complete(self)
        barrier(self.dist)
        return result

    def result(self) -> RunResult:
        ok = self.diverged_at is None
        s = self.state
        return {
            "tokens": self.tokens, "steps": s.step - s.start_step, "global_step": s.step,
            "start_tokens": s.start_tokens,
            "final_eval_loss": self.last_eval[1] if ok and self.last_eval else None,
            "final_eval_loss_se": self.last_eval_se if ok else None, "eval_seqs": self.cfg.eval_seqs,
            "final_train_loss": s.loss_ema if ok else None,
            "final_train_loss_last_step": s.last_loss if ok else None,
            "train_loss_smoothing": f"EMA alpha={EMA_ALPHA} over steps",
            "diverged": not ok, "diverged_at_tokens": self.diverged_at, "diverged_reason": self.diverged_reason,
            "epochs": s.offset_seqs / self.stream.n_seqs, "params": self.n_params,
            "flops_per_token": self.flops_per_token, "wall_time_s": s.elapsed_s, "eval_time_s": s.eval_s,
            "tokens_per_s": (self.tokens - s.start_tokens) / s.elapsed_s if s.elapsed_s > 0 else None,
            "config_hash": defining_hash(self.cfg), "trained": self.trained_as,
        }


def train(cfg: TrainConfig, out_dir: str | Path | None, **kwargs) -> RunResult | None:
    """Run (or resume, or return the finished result of) one training run. See :class:`Trainer`."""
    return Trainer(cfg, out_dir, **kwargs).run()
