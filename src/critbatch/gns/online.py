"""The noise scale during training, nearly free (McCandlish et al. 2018 §A.1 style).

* One process with gradient accumulation: B_small = the micro-batch, B_big = the global batch.
  A tensor hook on every parameter sees each micro-batch's own gradient as autograd produces it
  (before it is added to ``.grad``); after the backward one fused ``_foreach_norm`` adds their
  squared norm to a device scalar: no copy of the gradients and no host sync per micro-batch. |G_big|² is the norm of the finished gradient
  before clipping. (A first version differenced ``.grad`` snapshots: 7.9% overhead on the tiny
  preset against the 5% target; docs/LOG.md.)
* Data parallel (DDP): B_small = the per-rank batch, B_big = the global batch. A DDP communication
  hook measures each bucket's local gradient before the all-reduce; the per-rank squared norms are
  averaged across ranks (one small extra all-reduce a step).

Numerator and denominator are smoothed separately by bias-corrected EMAs and logged every step as
``gns/grad_sq``, ``gns/trace_cov``, ``gns/b_simple`` (sequences) and ``gns/b_simple_tokens``.
Steps whose micro-batches differ in size (a final partial step) are skipped.
"""

from __future__ import annotations

import torch

from ..train.callbacks import Callback
from .estimators import two_batch_estimates


class NoiseScaleCallback(Callback):
    name = "gns"
    description = "the online noise scale (gns)"
    supports_fsdp = False  # it needs every rank's whole local gradient (a DDP communication hook)

    def __init__(self, beta: float = 0.95, average: str = "ema"):
        """``average='ema'`` smooths with decay ``beta``; ``'all'`` averages every step equally (the
        offline estimator's weighting, for frozen parameters)."""
        if not 0 <= beta < 1:
            raise ValueError(f"beta={beta} must be in [0, 1)")
        if average not in ("ema", "all"):
            raise ValueError(f"average={average!r} is not one of ema, all")
        self.beta = beta
        self.average = average
        self.ema_g2 = 0.0
        self.ema_tr = 0.0
        self.n = 0
        self._n_small = 0
        self._sizes: set[int] = set()
        self._local_sq = None
        self._ddp = False

    # ---- hooks ---------------------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        self._ddp = trainer.dist.enabled
        if self._ddp:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            cb = self

            def hook(state, bucket):
                buf = bucket.buffer()
                sq = buf.detach().double().pow(2).sum()
                cb._local_sq = sq if cb._local_sq is None else cb._local_sq + sq
                return default_hooks.allreduce_hook(None, bucket)

            trainer.model.register_comm_hook(state=None, hook=hook)
            return
        self._micro_acc = torch.zeros((), dtype=torch.float64, device=trainer.device)

        self._seen: list[torch.Tensor] = []

        def grad_hook(g):
            if trainer.step_info["accum"] >= 2:  # set before the step's first backward
                self._seen.append(g.detach())  # normed in one foreach call after the backward
            return None

        self._handles = [p.register_hook(grad_hook) for p in trainer.params]

    def on_train_end(self, trainer, result: dict) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []

    def on_micro_backward(self, trainer, micro_index: int, n_micro: int) -> None:
        if self._ddp or n_micro < 2:
            return
        info = trainer.step_info
        if micro_index == 0:
            self._sizes = set()
            self._n_small = 0
            self._micro_acc.zero_()
        B, W = info["batch_seqs"], trainer.dist.world_size
        micro = info["micro_sizes"][micro_index]
        self._sizes.add(micro)
        self._acc = torch.stack(torch._foreach_norm(self._seen)).double().square().sum()
        self._seen = []
        # the hooks saw W/(B·T)·∇(token-loss sum); the micro-batch's mean-loss gradient is that
        # times B/(W·micro)
        self._micro_acc.add_(self._acc * (B / (W * micro)) ** 2)
        self._n_small += 1

    def on_before_optim_step(self, trainer, record: dict) -> None:
        info = trainer.step_info
        B = info["batch_seqs"]
        big_sq = float(torch.stack(torch._foreach_norm([p.grad for p in trainer.params])).double().square().sum())
        if self._ddp:
            if self._local_sq is None:
                return
            W = trainer.dist.world_size
            t = self._local_sq.reshape(1).clone()
            torch.distributed.all_reduce(t)
            self._local_sq = None
            small_sq, b_small = float(t.item()) / W, B // W
            if B % W or len(set(info["micro_sizes"])) > 1:
                return
        else:
            if self._n_small < 2 or len(self._sizes) != 1:
                return
            small_sq, b_small = float(self._micro_acc) / self._n_small, next(iter(self._sizes))
        if b_small >= B:
            return
        g2, tr = two_batch_estimates([small_sq], [big_sq], b_small, B)
        self.n += 1
        beta = self.beta if self.average == "ema" else (self.n - 1) / self.n
        self.ema_g2 = beta * self.ema_g2 + (1 - beta) * float(g2[0])
        self.ema_tr = beta * self.ema_tr + (1 - beta) * float(tr[0])
        corr = 1 - self.beta ** self.n if self.average == "ema" else 1.0
        g2_hat, tr_hat = self.ema_g2 / corr, self.ema_tr / corr
        b = max(tr_hat, 0.0) / g2_hat if g2_hat > 0 else float("inf")
        record.update({"gns/grad_sq": g2_hat, "gns/trace_cov": tr_hat, "gns/b_simple": b,
                       "gns/b_simple_tokens": b * trainer.cfg.model.seq_len, "gns/b_small": b_small,
                       "gns/step_grad_sq": float(g2[0]), "gns/step_trace_cov": float(tr[0])})

    # ---- checkpointed state -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"ema_g2": self.ema_g2, "ema_tr": self.ema_tr, "n": self.n, "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.ema_g2 = float(state["ema_g2"])
        self.ema_tr = float(state["ema_tr"])
        self.n = int(state["n"])
