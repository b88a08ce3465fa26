"""The LR–batch coupling rule and the Adam hyperparameter rule: pure functions of the batch ratio
(no torch), shared by the trainer, schedules, branches and the analysis."""

from __future__ import annotations

import math

from ..config import ADAM_RULES, LR_RULES
from ..errors import ConfigError


def lr_rule_multiplier(rule: str, batch_seqs: float, ref_batch_seqs: float) -> float:
    """f(k) for k = batch / reference batch: sqrt(k) (Adam family), k (SGD) or 1.

    Merrill et al. 2025 §2 (and Malladi et al. 2022 for the square-root rule for Adam)."""
    if rule not in LR_RULES:
        raise ConfigError(f"LR rule {rule!r} is not one of {', '.join(LR_RULES)}")
    k = batch_seqs / ref_batch_seqs
    if rule == "sqrt":
        return math.sqrt(k)
    if rule == "linear":
        return k
    return 1.0


def adam_hparams(rule: str, batch_seqs: float, ref_batch_seqs: float, beta1: float, beta2: float,
                 eps: float) -> tuple[float, float, float]:
    """Adam's (beta1, beta2, eps) at batch ``batch_seqs`` when they hold at ``ref_batch_seqs``.

    ``none`` (Merrill et al. 2025 change only the LR): unchanged. ``sde`` — the SDE scaling rule of
    Malladi et al. 2022 (arXiv 2205.10287, Definition 4.x) for k = batch / reference:
    1 − β1 and 1 − β2 scale by k, ε by 1/√k (beside η·√k from the ``sqrt`` LR rule). ``sde-beta2``:
    only β2 and ε (β1 unchanged). The rule is valid while k·(1 − β) < 1."""
    if rule not in ADAM_RULES:
        raise ConfigError(f"adam rule {rule!r} is not one of {', '.join(ADAM_RULES)}")
    if rule == "none":
        return beta1, beta2, eps
    k = batch_seqs / ref_batch_seqs
    b1 = 1.0 - k * (1.0 - beta1) if rule == "sde" else beta1
    b2 = 1.0 - k * (1.0 - beta2)
    if b1 < 0 or b2 < 0:
        which = "beta1" if b1 < 0 else "beta2"
        raise ConfigError(f"adam rule {rule!r} at batch {batch_seqs:g} (k = {k:g} x the reference {ref_batch_seqs:g}) "
                          f"gives {which} < 0; the rule holds only while k·(1 - {which}) < 1")
    return b1, b2, eps / math.sqrt(k)
