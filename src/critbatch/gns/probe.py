"""Where the squared gradient norms come from: any model, given a loss function.

``estimate_noise_scale(model, loss_fn, batches, b_small, b_big)`` takes batches of ``b_big``
examples (a tensor or a tuple of tensors whose first dimension counts examples), splits each into
``b_big / b_small`` small batches, and measures |G_small|² (averaged over the small batches) and
|G_big|² (the norm of their mean, which is the big batch's gradient). Each big batch is one paired
measurement. Small-batch gradients come from ``torch.func`` (vmap of grad, in chunks) or from a
plain loop of ``torch.autograd.grad`` calls; ``method='auto'`` uses vmap and falls back to the loop
for models vmap cannot handle. Neither touches the model's ``.grad``.
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Iterable

import torch

from ..errors import ConfigError
from .estimators import NoiseScale, noise_scale_from_norms


class _LossModule(torch.nn.Module):
    """Lets ``torch.func.functional_call`` swap the parameters seen by an arbitrary loss_fn."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *batch):
        return self.loss_fn(self.model, batch)


def _as_tuple(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _check(model: torch.nn.Module, b_small: int, b_big: int) -> list[tuple[str, torch.nn.Parameter]]:
    if not isinstance(b_small, int) or not isinstance(b_big, int) or b_small < 1:
        raise ConfigError(f"b_small={b_small!r} and b_big={b_big!r} must be positive integers")
    if b_big <= b_small:
        raise ConfigError(f"b_big={b_big} must be larger than b_small={b_small}")
    if b_big % b_small:
        raise ConfigError(f"b_big={b_big} must be a multiple of b_small={b_small}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no trainable parameters: there is no gradient to measure")
    return named


def _norms_loop(model, loss_fn, batch, params, b_small, m):
    sq_small = 0.0
    total = None
    for j in range(m):
        group = tuple(t[j * b_small:(j + 1) * b_small] for t in batch)
        loss = loss_fn(model, group)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
        sq_small += float(sum(g.double().pow(2).sum() for g in grads))
        total = [g.double() for g in grads] if total is None else [a + g for a, g in zip(total, grads)]
    sq_big = float(sum((t / m).pow(2).sum() for t in total))
    return sq_small / m, sq_big


def _norms_vmap(wrapper, names, params, buffers, batch, b_small, m, chunk):
    from torch.func import functional_call, grad, vmap

    def loss_of(p, *group):
        return functional_call(wrapper, {**p, **buffers}, group)

    g_fn = vmap(grad(loss_of), in_dims=(None,) + (0,) * len(batch))
    grouped = tuple(t.reshape(m, b_small, *t.shape[1:]) for t in batch)
    pdict = {f"model.{n}": p.detach() for n, p in zip(names, params)}
    sq_small = 0.0
    total = None
    for s in range(0, m, chunk):
        g = g_fn(pdict, *(t[s:s + chunk] for t in grouped))
        sq_small += float(sum(v.double().pow(2).flatten(1).sum(1).sum() for v in g.values()))
        part = [v.double().sum(0) for v in g.values()]
        total = part if total is None else [a + b for a, b in zip(total, part)]
    sq_big = float(sum((t / m).pow(2).sum() for t in total))
    return sq_small / m, sq_big


def measure_norms(model: torch.nn.Module, loss_fn: Callable, batches: Iterable, b_small: int, b_big: int,
                  method: str = "auto", chunk: int = 64) -> tuple[list[float], list[float], str]:
    """Paired (mean |G_small|², |G_big|²) per big batch, and the method used."""
    named = _check(model, b_small, b_big)
    if method not in ("auto", "vmap", "loop"):
        raise ConfigError(f"method {method!r} is not one of auto, vmap, loop")
    names = [n for n, _ in named]
    params = [p for _, p in named]
    m = b_big // b_small
    wrapper = _LossModule(model, loss_fn)
    buffers = {f"model.{n}": b for n, b in model.named_buffers()}
    small, big = [], []
    use = method
    for i, batch in enumerate(batches):
        batch = _as_tuple(batch)
        if any(t.shape[0] != b_big for t in batch):
            raise ConfigError(f"batch {i} has {batch[0].shape[0]} examples; every batch must hold b_big={b_big}")
        if use in ("auto", "vmap"):
            try:
                with warnings.catch_warnings():
                    # vmap over CPU flash attention falls back to a loop inside ATen and says so;
                    # it is still faster than the Python loop (bench/gns_cost.py)
                    warnings.filterwarnings("ignore", message=".*batching rule.*")
                    s, b = _norms_vmap(wrapper, names, params, buffers, batch, b_small, m, chunk)
                use = "vmap"
            except Exception:
                if use == "vmap":
                    raise
                use = "loop"
                s, b = _norms_loop(model, loss_fn, batch, params, b_small, m)
        else:
            s, b = _norms_loop(model, loss_fn, batch, params, b_small, m)
        small.append(s)
        big.append(b)
    if not small:
        raise ConfigError("no batches were given: the noise scale needs at least one batch of b_big examples")
    return small, big, use


def estimate_noise_scale(model: torch.nn.Module, loss_fn: Callable, batches: Iterable, b_small: int, b_big: int,
                         *, confidence: float = 0.95, interval: str = "delta", method: str = "auto",
                         chunk: int = 64) -> NoiseScale:
    """The gradient noise scale of ``model`` under ``loss_fn`` (mean loss over a batch's examples).

    Works for any ``torch.nn.Module``; see the module docstring. Returns a :class:`NoiseScale`
    with ``b_simple`` (in examples), ``grad_sq``, ``trace_cov``, ``ci_low``, ``ci_high``,
    ``n_batches``."""
    t0 = time.perf_counter()
    small, big, used = measure_norms(model, loss_fn, batches, b_small, b_big, method, chunk)
    ns = noise_scale_from_norms(small, big, b_small, b_big, confidence, interval)
    ns.method = used
    ns.seconds = time.perf_counter() - t0
    return ns
