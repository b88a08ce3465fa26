"""The training run: one boring loop over optimizer steps, counted in tokens.

One optimizer step (design.md §1.4): the step's B sequences are stream positions
``[offset, offset + B)``; rank r takes the r-th contiguous share, in micro-batches. Each micro-batch's
summed token loss is scaled by ``world_size / (B · seq_len)`` so the accumulated (and, under DDP or
FSDP2, averaged) gradient is exactly that of the mean loss over the global batch; gradients
synchronise once, on the last micro-batch; then clip, step. Checkpoints hold the full, unsharded state
in one format whatever the parallelism, so a run resumes at any world size, under DDP or FSDP2.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

from .. import __version__
from ..config import TrainConfig, config_hash, from_dict, to_dict, validate
from ..data import SequenceStream, TokenData, open_data, prepare_embedded
from ..data.dataset import eval_sequences, step_slices
from ..dist import (DistInfo, all_reduce_max_int, all_reduce_sum, barrier, fsdp_full_state, fsdp_load_optimizer,
                    init_distributed, shard_model)
from ..errors import CheckpointError, ConfigError, DataError
from ..io import JsonlWriter, read_json, truncate_jsonl, write_json_atomic, write_npy_atomic
from ..model import GPT, count_params, flops_per_token
from ..optim import build_optimizer, lr_schedule_factor
from ..perf import peak_flops
from ..schedules import BatchSchedule
from .callbacks import Callback
from .checkpoint import (check_model_matches, copy_checkpoint_state, list_checkpoints, load_checkpoint,
                         prune_resume_checkpoints, save_checkpoint)

# Fields that do not change what a run computes: they may differ when a run is resumed.
NON_DEFINING = ("device", "compile", "parallel", "log_interval_steps", "save_interval_tokens", "data.verify")
EVAL_LOSSES_FILE = "eval_seq_losses.npy"  # per-sequence held-out losses of the final evaluation
EMA_ALPHA = 0.5  # Merrill et al. 2025: training loss smoothed by an EMA with alpha = 0.5
# Slurm's preemption and time-limit signals (SIGTERM; SIGUSR1/SIGUSR2 through --signal, submitit's USR2)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={spec!r} but CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device={spec!r} is not a device; accepted: auto, cpu, cuda, cuda:N") from None


def resolve_data(cfg: TrainConfig) -> Path:
    if cfg.data.path:
        return Path(cfg.data.path)
    return prepare_embedded(cfg.data.corpus, cfg.data.tokenizer, cfg.data.bpe_vocab_size)


def resolve_config(cfg: TrainConfig, data: TokenData) -> TrainConfig:
    """Fill in every derived value so the saved config says exactly what ran."""
    cfg = from_dict(TrainConfig, to_dict(cfg))  # a copy
    cfg.data.path = str(data.path)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = data.vocab_size
    elif cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary {data.vocab_size}")
    if cfg.batch_schedule is None:
        cfg.batch_schedule = [[0, cfg.batch_seqs]]
    sched = BatchSchedule.parse(cfg.batch_schedule, cfg.model.seq_len, cfg.optim.lr_rule, cfg.lr_ref_batch_seqs,
                                cfg.optim.adam_rule)
    cfg.batch_schedule = sched.as_pairs()
    cfg.batch_seqs = sched.phases[0][1]
    cfg.lr_ref_batch_seqs = sched.reference
    if cfg.lr_schedule.horizon_tokens is None:
        cfg.lr_schedule.horizon_tokens = cfg.total_tokens
    if cfg.lr_schedule.cooldown_tokens and cfg.lr_schedule.cooldown_end_tokens is None:
        cfg.lr_schedule.cooldown_end_tokens = cfg.total_tokens
    if cfg.save_interval_tokens is None:
        cfg.save_interval_tokens = max(cfg.total_tokens // 10, 1)
    if cfg.eval_interval_tokens is None:
        cfg.eval_interval_tokens = max(cfg.total_tokens // 20, 1)
    return cfg


def _defining(cfg_dict: dict) -> dict:
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg_dict.items()}
    for key in NON_DEFINING:
        parts = key.split(".")
        if len(parts) == 1:
            d.pop(key, None)
        else:
            d.get(parts[0], {}).pop(parts[1], None)
    return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [f"{prefix}: {a!r} vs {b!r}"]


def environment() -> dict:
    env = {
        "critbatch": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["cuda_version"] = torch.version.cuda
    try:
        import numpy
        env["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    return env


class Trainer:
    """One training run in ``out_dir``. Use :func:`train` unless you need the object.

    ``init_from`` starts from another run's checkpoint (a directory, or an already loaded
    checkpoint dict, which is deep-copied first): model and optimizer state, step and loader
    offset are taken from it, while batch, LR rule and everything else come from ``cfg``. This is
    how a branch starts. ``stop_after_tokens`` pauses the run at the first step boundary at or after
    that count (a resume checkpoint is written; running again continues). ``stop_on_signals`` (set by
    job workers) pauses it the same way at the first step boundary after SIGTERM, SIGUSR1 or SIGUSR2,
    on every rank together; ``stop_signal`` then names the signal.
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | Path | None, *, callbacks: Iterable[Callback] = (),
                 init_from: str | Path | dict | None = None, progress: bool | None = None,
                 stop_after_tokens: int | None = None, quiet: bool = False, desc: str | None = None,
                 eval_at_start: bool = True, keep_final_checkpoint: bool = True, stop_on_signals: bool = False):
        validate(cfg)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callbacks = list(callbacks)
        self.progress = progress
        self.quiet = quiet
        self.desc = desc
        self.stop_after_tokens = stop_after_tokens
        self.eval_at_start = eval_at_start
        self.keep_final_checkpoint = keep_final_checkpoint
        self.stop_on_signals = stop_on_signals
        self.stop_signal: int | None = None
        self.device = resolve_device(cfg.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.fsdp = cfg.parallel == "fsdp" and self.dist.enabled
        if self.fsdp and any(cb.name == "gns" for cb in self.callbacks):
            raise ConfigError("the online noise scale (gns) needs parallel='ddp'; it is not available with parallel='fsdp'")

        # ---- everything that can fail on bad input happens before anything is written ----
        self.data = open_data(resolve_data(cfg), verify=cfg.data.verify)
        self.cfg = resolve_config(cfg, self.data)
        c = self.cfg
        self.schedule = BatchSchedule.parse(c.batch_schedule, c.model.seq_len, c.optim.lr_rule, c.lr_ref_batch_seqs,
                                            c.optim.adam_rule)
        self.schedule.check_divisible(c.micro_batch_seqs, self.dist.world_size)
        if c.optim.name == "adamw":
            self.schedule.check_adam(c.optim.beta1, c.optim.beta2, c.optim.eps)
        self.stream = SequenceStream(self.data, c.model.seq_len, c.data.order_seed)
        self.eval_set = eval_sequences(self.data, c.model.seq_len, c.eval_seqs, c.data.eval_seed)

        self.existing_result = None
        self.resume_from = None
        if self.out_dir is not None and (self.out_dir / "config.json").is_file():
            # through the dataclass: fields added since the run was made take their defaults
            saved = to_dict(from_dict(TrainConfig, read_json(self.out_dir / "config.json")))
            diffs = _diff(_defining(saved), _defining(to_dict(c)))
            if diffs:
                raise ConfigError(f"{self.out_dir} holds a run with a different config ({'; '.join(diffs[:4])}); "
                                  f"use another --out")
            if (self.out_dir / "result.json").is_file():
                self.existing_result = read_json(self.out_dir / "result.json")
            else:
                ckpts = list_checkpoints(self.out_dir)
                if ckpts:
                    self.resume_from = ckpts[-1].path
        self.init_ckpt = None
        if self.resume_from is not None:
            self.init_ckpt = load_checkpoint(self.resume_from)
            check_model_matches(self.init_ckpt["meta"], to_dict(c.model), str(self.resume_from))
        elif init_from is not None:
            if isinstance(init_from, dict):
                self.init_ckpt = copy_checkpoint_state(init_from)
                where = "given in memory"
            else:
                self.init_ckpt = load_checkpoint(init_from)
                where = str(init_from)
            check_model_matches(self.init_ckpt["meta"], to_dict(c.model), where)
        self.start_offset = int(self.init_ckpt["meta"]["offset_seqs"]) if self.init_ckpt else 0
        if self.init_ckpt and self.start_offset * c.model.seq_len != int(self.init_ckpt["meta"]["tokens"]):
            raise CheckpointError(f"checkpoint {self.resume_from or init_from} is inconsistent: offset and tokens disagree")
        self._check_capacity()

    # ------------------------------------------------------------------------------------------
    def _check_capacity(self) -> None:
        c = self.cfg
        T = c.model.seq_len
        self.planned_steps, end_tokens = self.schedule.walk(self.start_offset * T, c.total_tokens)
        if c.exact_total_tokens:
            end_tokens = max(c.total_tokens, self.start_offset * T)
            last = (end_tokens - self.start_offset * T) % self.schedule.batch_tokens_at(max(end_tokens - 1, 0))
            if last and (last // T) % self.dist.world_size:
                raise ConfigError(f"the final partial step of {last // T} sequences cannot be split over "
                                  f"{self.dist.world_size} ranks; choose total_tokens so it divides")
        need, have = end_tokens // T + c.data.stream_shift_seqs, self.stream.n_seqs
        if need > have:
            epochs = need / have
            if not c.data.allow_repeat:
                raise DataError(f"the run needs {need:,} sequences ({end_tokens:,} tokens) but the training split of "
                                f"{self.data.path} holds {have:,} ({have * T:,} tokens); pass --allow-repeat to train "
                                f"{epochs:.2f} epochs, or lower --total-tokens")
            if self.dist.is_main and not self.quiet:
                warnings.warn(f"critbatch: this run repeats data: it reads {epochs:.2f} epochs of the training split "
                              f"({need:,} of {have:,} sequences)", stacklevel=2)

    # ------------------------------------------------------------------------------------------
    def _autocast(self):
        c = self.cfg
        use_bf16 = c.precision == "bf16" or (c.precision == "auto" and self.device.type == "cuda")
        if use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate_per_seq(self) -> torch.Tensor:
        """Per-sequence mean next-token loss on the fixed held-out set, (n,) float64 on the CPU, the
        same on every rank (each rank evaluates its share of the chunks; a sum assembles them)."""
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
        self.last_eval_per_seq = (per_seq / self.cfg.model.seq_len).cpu()
        return self.last_eval_per_seq

    def evaluate(self) -> float:
        """Mean next-token loss on the fixed held-out set; ``self.last_eval_se`` holds its standard
        error over sequences, sd / sqrt(n) (the set is a random sample of the held-out split)."""
        x = self.evaluate_per_seq()
        self.last_eval_se = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else float("nan")
        return float(x.mean())

    def _build(self) -> None:
        c = self.cfg
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals made fp32 CPU steps 10-40x slower here
        torch.manual_seed(c.seed)
        self.raw_model = GPT(c.model).to(self.device)  # built on CPU RNG, same init on every device
        if self.init_ckpt is not None:
            self.raw_model.load_state_dict(self.init_ckpt["model"])  # full weights, before any sharding
        if self.fsdp:
            shard_model(self.raw_model, self.device)  # in place: the optimizer below holds the shards
        self.optimizer = build_optimizer(self.raw_model, c.optim, self.device)
        self.state = {"step": 0, "offset_seqs": 0, "loss_ema": None, "start_step": 0, "start_tokens": 0,
                      "elapsed_s": 0.0, "last_loss": None}
        if self.init_ckpt is not None:
            ck = self.init_ckpt
            # A deep copy: load_state_dict keeps references to same-device tensors (method.md §5).
            if self.fsdp:
                fsdp_load_optimizer(self.raw_model, self.optimizer, copy_checkpoint_state(ck["optim"]))
            else:
                self.optimizer.load_state_dict(copy_checkpoint_state(ck["optim"]))
            meta = ck["meta"]
            self.state["step"] = int(meta["step"])
            self.state["offset_seqs"] = int(meta["offset_seqs"])
            if self.resume_from is not None:
                st = ck["state"]
                for key in ("loss_ema", "start_step", "start_tokens", "elapsed_s", "last_loss"):
                    if key in st:
                        self.state[key] = st[key]
                torch.set_rng_state(st["rng_cpu"])
                if self.device.type == "cuda" and st.get("rng_cuda") is not None:
                    torch.cuda.set_rng_state(st["rng_cuda"], self.device)
                for cb in self.callbacks:
                    if cb.name in st.get("callbacks", {}):
                        cb.load_state_dict(st["callbacks"][cb.name])
            else:
                self.state["start_step"] = self.state["step"]
                self.state["start_tokens"] = self.state["offset_seqs"] * c.model.seq_len
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

    @property
    def tokens(self) -> int:
        return self.state["offset_seqs"] * self.cfg.model.seq_len

    def _save(self, kept: bool, requested: int | None = None, eval_loss: float | None = None) -> Path | None:
        if self.out_dir is None:
            return None
        if self.fsdp:  # gathering the full state is a collective: every rank takes part
            model_state, optim_state = fsdp_full_state(self.raw_model, self.optimizer)
        else:
            model_state, optim_state = self.raw_model.state_dict(), self.optimizer.state_dict()
        if not self.dist.is_main:
            return None
        st = dict(self.state)
        st["rng_cpu"] = torch.get_rng_state()
        st["rng_cuda"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        st["callbacks"] = {cb.name: cb.state_dict() for cb in self.callbacks}
        meta = {"step": self.state["step"], "offset_seqs": self.state["offset_seqs"],
                "requested_tokens": requested if requested is not None else self.tokens,
                "model": to_dict(self.cfg.model), "config_hash": config_hash(_defining(to_dict(self.cfg))),
                "train_loss_ema": self.state["loss_ema"], "eval_loss": eval_loss,
                "eval_loss_se": self.last_eval_se if eval_loss is not None else None,
                # the batch and LR multiplier the run continues with from here (a branch's base B)
                "batch_seqs": self.schedule.batch_seqs_at(self.tokens),
                "lr_multiplier": self.schedule.lr_multiplier_at(self.tokens),
                "lr_ref_batch_seqs": self.schedule.reference, "seq_len": self.cfg.model.seq_len}
        path = save_checkpoint(self.out_dir / "ckpt", tokens=self.tokens, kept=kept,
                               model_state=model_state, optim_state=optim_state,
                               state=st, meta=meta,
                               arrays={EVAL_LOSSES_FILE[:-4]: self.last_eval_per_seq.numpy()} if eval_loss is not None else None)
        if not kept:
            prune_resume_checkpoints(self.out_dir, keep=path)
        return path

    def _grad_sync(self, last_micro: bool):
        """Gradients synchronise once per optimizer step, on its last micro-batch (design.md §1.4)."""
        if self.fsdp:
            self.raw_model.set_requires_gradient_sync(last_micro)
        elif self.dist.enabled and not last_micro:
            return self.model.no_sync()
        return contextlib.nullcontext()

    # ---- preemption: a signal asks the run to pause at the next step boundary -----------------
    def _install_stop_handlers(self) -> dict:
        """Record SIGTERM/SIGUSR1/SIGUSR2 instead of dying of them (``stop_on_signals``, main thread
        only). Returns the previous handlers."""
        if not self.stop_on_signals or threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, _frame):
            self.stop_signal = signum

        return {s: signal.signal(s, handler) for s in STOP_SIGNALS}

    def _stop_requested(self) -> bool:
        if not self.stop_on_signals:
            return False
        # every rank pauses at the same step boundary, whichever of them received the signal
        self.stop_signal = all_reduce_max_int(self.stop_signal or 0, self.dist, self.device) or None
        return self.stop_signal is not None

    # ------------------------------------------------------------------------------------------
    def run(self) -> dict | None:
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
        c = self.cfg
        T = c.model.seq_len
        main = self.dist.is_main
        if self.out_dir is not None and main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not (self.out_dir / "config.json").is_file():
                write_json_atomic(self.out_dir / "config.json", to_dict(c))
            write_json_atomic(self.out_dir / "env.json", environment())
        self._build()
        metrics = None
        if self.out_dir is not None and main:
            if self.resume_from is not None:
                truncate_jsonl(self.out_dir / "metrics.jsonl", self.tokens)
            elif (self.out_dir / "metrics.jsonl").exists():
                (self.out_dir / "metrics.jsonl").unlink()  # a run that died before its first checkpoint
            metrics = JsonlWriter(self.out_dir / "metrics.jsonl")
        self.metrics = metrics

        def log(rec: dict) -> None:
            if metrics is not None:
                metrics.write(rec)

        for cb in self.callbacks:
            cb.on_train_start(self)

        fresh = self.resume_from is None
        kept_todo = sorted(t for t in c.checkpoint_tokens if t > self.tokens or (fresh and t == self.tokens))
        if fresh and self.eval_at_start:
            ev = self.evaluate()
            log({"step": self.state["step"], "tokens": self.tokens, "eval/loss": ev, "eval/loss_se": self.last_eval_se})
        if fresh:
            while kept_todo and kept_todo[0] <= self.tokens:
                self._save(kept=True, requested=kept_todo.pop(0), eval_loss=ev if self.eval_at_start else None)

        from tqdm.auto import tqdm

        # tqdm's disable=None hides the bar when stderr is not a terminal
        disable = True if (not main or self.progress is False) else (None if self.progress is None else False)
        pbar = tqdm(total=c.total_tokens, initial=min(self.tokens, c.total_tokens), unit="tok", unit_scale=True,
                    dynamic_ncols=True, disable=disable, desc=self.desc or (self.out_dir.name if self.out_dir else "train"),
                    leave=False, mininterval=0.5)
        t_session = time.perf_counter()
        t_log, tok_log = time.perf_counter(), self.tokens
        diverged_at = None
        last_eval = None
        W = self.dist.world_size
        paused = False
        try:
            while self.tokens < c.total_tokens:
                if (self.stop_after_tokens is not None and self.tokens >= self.stop_after_tokens) or self._stop_requested():
                    paused = True
                    break
                tokens0 = self.tokens
                B = self.schedule.batch_seqs_at(tokens0)
                micro = self.schedule.micro_batch_at(tokens0, c.micro_batch_seqs, W)
                accum = self.schedule.accum_steps_at(tokens0, micro, W)
                if c.exact_total_tokens and tokens0 + B * T > c.total_tokens:
                    B = (c.total_tokens - tokens0) // T  # final partial step: only what remains
                    accum = -(-(B // W) // micro)
                lr = c.optim.lr * self.schedule.lr_multiplier_at(tokens0) * lr_schedule_factor(c.lr_schedule, tokens0)
                adam = (self.schedule.adam_at(tokens0, c.optim.beta1, c.optim.beta2, c.optim.eps)
                        if c.optim.adam_rule != "none" and c.optim.name == "adamw" else None)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                    if adam is not None:
                        g["betas"], g["eps"] = adam[:2], adam[2]
                scale = W / (B * T)  # per-token mean over the global batch; DDP divides by W again
                slices = step_slices(self.state["offset_seqs"] + c.data.stream_shift_seqs, B, micro, self.dist.rank, W)
                assert len(slices) == accum, (len(slices), accum)
                loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
                self.step_info = {"batch_seqs": B, "micro_batch_seqs": micro, "accum": accum, "tokens": tokens0,
                                  "micro_sizes": [n for _, n in slices]}
                for i, (pos, n) in enumerate(slices):
                    seqs = self.stream.batch(pos, n).to(self.device, non_blocking=True)
                    with self._grad_sync(last_micro=i == accum - 1):
                        with self._autocast():
                            logits = self.model(seqs[:, :-1])
                        ls = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), seqs[:, 1:].flatten(),
                                                               reduction="sum")
                        (ls * scale).backward()
                    loss_sum += ls.detach().double()
                    for cb in self.callbacks:
                        cb.on_micro_backward(self, i, accum)
                all_reduce_sum(loss_sum, self.dist)
                loss = float(loss_sum.item()) / (B * T)
                rec = {"step": self.state["step"] + 1, "tokens": tokens0 + B * T}
                for cb in self.callbacks:
                    cb.on_before_optim_step(self, rec)
                max_norm = c.optim.max_grad_norm if c.optim.max_grad_norm is not None else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    diverged_at = tokens0
                    log({"step": self.state["step"], "tokens": tokens0, "train/diverged": True,
                         "train/loss": loss, "train/grad_norm": grad_norm})
                    self.optimizer.zero_grad(set_to_none=True)
                    break
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state["step"] += 1
                self.state["offset_seqs"] += B
                ema = self.state["loss_ema"]
                self.state["loss_ema"] = loss if ema is None else EMA_ALPHA * loss + (1 - EMA_ALPHA) * ema
                self.state["last_loss"] = loss
                rec.update({"train/loss": loss, "train/loss_ema": self.state["loss_ema"], "optim/lr": lr,
                            "train/batch_seqs": B, "train/batch_tokens": B * T, "train/grad_norm": grad_norm})
                for cb in self.callbacks:
                    cb.on_step_end(self, rec)
                log(rec)
                pbar.update(min(self.tokens, c.total_tokens) - min(tokens0, c.total_tokens))
                if self.state["step"] % c.log_interval_steps == 0:
                    now = time.perf_counter()
                    tps = (self.tokens - tok_log) / max(now - t_log, 1e-9)
                    perf = {"step": self.state["step"], "tokens": self.tokens, "perf/tokens_per_s": tps}
                    if self.peak_flops:
                        perf["perf/mfu"] = tps * self.flops_per_token / (self.peak_flops * W)
                    log(perf)
                    pbar.set_postfix(loss=f"{self.state['loss_ema']:.3f}", refresh=False)
                    t_log, tok_log = now, self.tokens

                # evaluation and checkpoints at token boundaries crossed by this step
                new_kept = []
                while kept_todo and kept_todo[0] <= self.tokens:
                    new_kept.append(kept_todo.pop(0))
                eval_due = (self.tokens // c.eval_interval_tokens > tokens0 // c.eval_interval_tokens) or bool(new_kept)
                if eval_due and self.tokens < c.total_tokens:
                    last_eval = self.evaluate()
                    if not math.isfinite(last_eval):
                        diverged_at = self.tokens
                        log({"step": self.state["step"], "tokens": self.tokens, "eval/loss": last_eval,
                             "train/diverged": True})
                        break
                    log({"step": self.state["step"], "tokens": self.tokens, "eval/loss": last_eval,
                         "eval/loss_se": self.last_eval_se})
                for req in new_kept:
                    self._save(kept=True, requested=req, eval_loss=last_eval)
                if (self.tokens // c.save_interval_tokens > tokens0 // c.save_interval_tokens
                        and self.tokens < c.total_tokens and not new_kept):
                    self._save(kept=False)
        finally:
            pbar.close()
            self.state["elapsed_s"] += time.perf_counter() - t_session

        if paused:
            self._save(kept=False)
            if metrics is not None:
                metrics.close()
            barrier(self.dist)
            return None

        final_eval = None
        if diverged_at is None:
            final_eval = self.evaluate()
            if not math.isfinite(final_eval):
                diverged_at = self.tokens
            log({"step": self.state["step"], "tokens": self.tokens, "eval/loss": final_eval,
                 "eval/loss_se": self.last_eval_se})
            if self.out_dir is not None and main and math.isfinite(final_eval):
                write_npy_atomic(self.out_dir / EVAL_LOSSES_FILE, self.last_eval_per_seq.numpy())
            for req in kept_todo:  # requested exactly at the end
                if req <= self.tokens:
                    self._save(kept=True, requested=req, eval_loss=final_eval)
            if diverged_at is None and self.keep_final_checkpoint:
                self._save(kept=False)
        steps = self.state["step"] - self.state["start_step"]
        tokens_run = self.tokens - self.state["start_tokens"]
        result = {
            "tokens": self.tokens,
            "steps": steps,
            "global_step": self.state["step"],
            "start_tokens": self.state["start_tokens"],
            "final_eval_loss": final_eval if diverged_at is None else None,
            "final_eval_loss_se": self.last_eval_se if diverged_at is None else None,
            "eval_seqs": c.eval_seqs,
            "final_train_loss": self.state["loss_ema"] if diverged_at is None else None,
            "final_train_loss_last_step": self.state["last_loss"] if diverged_at is None else None,
            "train_loss_smoothing": f"EMA alpha={EMA_ALPHA} over steps",
            "diverged": diverged_at is not None,
            "diverged_at_tokens": diverged_at,
            "epochs": self.state["offset_seqs"] / self.stream.n_seqs,
            "params": self.n_params,
            "flops_per_token": self.flops_per_token,
            "wall_time_s": self.state["elapsed_s"],
            "tokens_per_s": tokens_run / self.state["elapsed_s"] if self.state["elapsed_s"] > 0 else None,
            "config_hash": config_hash(_defining(to_dict(c))),
        }
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        if metrics is not None:
            metrics.close()
        if self.out_dir is not None and main:
            write_json_atomic(self.out_dir / "result.json", result)  # written last: "complete"
            if not self.keep_final_checkpoint:
                prune_resume_checkpoints(self.out_dir, keep=None)
        barrier(self.dist)
        return result


def train(cfg: TrainConfig, out_dir: str | Path | None, **kwargs) -> dict | None:
    """Run (or resume, or return the finished result of) one training run. See :class:`Trainer`."""
    return Trainer(cfg, out_dir, **kwargs).run()
