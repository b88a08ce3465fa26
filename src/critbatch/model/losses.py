"""The next-token losses every critbatch model exposes (the built-in GPT and HF causal LMs alike)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss_sum(logits: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (in fp32) of (B, T, vocab) logits for a (B, T+1) batch."""
    return F.cross_entropy(logits.float().flatten(0, 1), seqs[:, 1:].flatten(), reduction="sum")


class NextTokenLosses:
    """Mixin for an ``nn.Module`` whose forward maps (B, T) token ids to (B, T, vocab) logits."""

    def loss_sum(self, seqs: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy over a (B, T+1) batch of sequences (B·T loss tokens)."""
        return next_token_loss_sum(self(seqs[:, :-1]), seqs)

    def seq_loss_sums(self, seqs: torch.Tensor) -> torch.Tensor:
        """Per-sequence summed next-token cross-entropy of a (B, T+1) batch: shape (B,)."""
        logits = self(seqs[:, :-1])
        tok = F.cross_entropy(logits.float().flatten(0, 1), seqs[:, 1:].flatten(), reduction="none")
        return tok.view(seqs.shape[0], -1).sum(dim=1)
