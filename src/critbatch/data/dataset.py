"""Memmap reader and the fixed-order sequence stream (docs/guide.md, "Concepts and units").

A split is cut into sequences of ``seq_len + 1`` tokens with stride ``seq_len`` (inputs and
next-token targets); sequences never cross a shard boundary. The training stream visits them in one
seeded global order, epoch after epoch (each epoch its own seeded permutation). The loader's whole
state is ``offset``, the number of sequences consumed: a step of batch B reads stream positions
``[offset, offset + B)``, however those B are split into micro-batches and ranks.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .meta import SPLITS, check_meta
from .verify import verify_shards


def _random_access(arr: np.memmap) -> np.memmap:
    """Sequences are read at random positions: no kernel readahead (it would map megabytes around
    every 130-byte sequence into the process)."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return arr


class TokenData:
    """A prepared data directory, opened read-only: its meta.json checked against the schema
    (:mod:`critbatch.data.meta`), every shard present with the size meta.json gives, and with
    ``verify`` its sha256 and largest token id (once per file, :mod:`critbatch.data.verify`)."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        meta_p = self.path / "meta.json"
        if not self.path.is_dir():
            raise DataError(f"data directory {str(self.path)!r} does not exist; create it with `critbatch prepare --out {self.path}`")
        if not meta_p.is_file():
            raise DataError(f"{self.path} is not a prepared data directory (no meta.json); create it with `critbatch prepare`")
        try:
            self.meta = json.loads(meta_p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{meta_p} is corrupt ({str(e).splitlines()[0]}); prepare the data again") from None
        check_meta(self.meta, self.path)
        self.vocab_size = int(self.meta["vocab_size"])
        self.dtype = np.dtype(self.meta["dtype"])
        splits = {s: self.meta["splits"][s] for s in SPLITS}
        for info in splits.values():
            for sh in info["shards"]:
                f = self.path / sh["file"]
                if not f.is_file():
                    raise DataError(f"data directory {self.path} is corrupt: shard {sh['file']} is missing")
                expect = sh["tokens"] * self.dtype.itemsize
                if f.stat().st_size != expect:
                    raise DataError(f"data directory {self.path} is corrupt: {sh['file']} has {f.stat().st_size} bytes, "
                                    f"meta.json says {expect}")
        self.max_ids: dict[str, int | None] = {s: info.get("max_id") for s, info in splits.items()}
        """Each split's largest token id: as read when verifying, else as meta.json records it (None:
        not recorded, written before issue 24, and not verified)."""
        if verify:
            self._check_ids(verify_shards(self.path, {"splits": splits}, self.dtype))
        self._shards: dict[str, list[np.ndarray]] = {
            s: [_random_access(np.memmap(self.path / sh["file"], dtype=self.dtype, mode="r")) for sh in info["shards"]]
            for s, info in splits.items()}

    def _check_ids(self, read: dict[str, int | None]) -> None:
        for split, hi in read.items():
            if hi is not None and hi >= self.vocab_size:
                raise DataError(f"data directory {self.path} is corrupt: its {split} split holds token id {hi}, outside "
                                f"its vocab_size {self.vocab_size}; prepare it again")
            recorded = self.max_ids[split]
            if recorded is not None and hi != recorded:
                raise DataError(f"data directory {self.path} is corrupt: meta.json says the largest token id of its "
                                f"{split} split is {recorded} but its shards hold {hi}; prepare it again")
            self.max_ids[split] = hi

    def tokens(self, split: str = "train") -> int:
        return int(self.meta["splits"][split]["tokens"])

    def shards(self, split: str) -> list[np.ndarray]:
        if split not in self._shards:
            raise DataError(f"data directory {self.path} has no {split!r} split")
        return self._shards[split]

    def n_seqs(self, split: str, seq_len: int) -> int:
        return sum(max(0, (a.size - 1) // seq_len) for a in self.shards(split))


def open_data(path: str | Path, verify: bool = True) -> TokenData:
    return TokenData(path, verify=verify)


class _SplitIndex:
    """Maps a split-wide sequence id to (shard, start token)."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, data: "TokenData | None" = None, split: str = ""):
        self.shards = shards
        self.seq_len = seq_len
        self.data, self.split = data, split
        self.check_ids = data is not None and data.max_ids.get(split) is None
        """Check the ids read (only where the split's largest id is not known from meta.json or verifying)."""
        counts = np.array([max(0, (a.size - 1) // seq_len) for a in shards], dtype=np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(counts)])
        self.n = int(self.bounds[-1])

    def gather(self, seq_ids: np.ndarray) -> np.ndarray:
        """Tokens of the given sequences, shape (n, seq_len + 1), int64."""
        T = self.seq_len
        out = np.empty((len(seq_ids), T + 1), dtype=np.int64)
        shard_of = np.searchsorted(self.bounds, seq_ids, side="right") - 1
        cols = np.arange(T + 1)
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            starts = (seq_ids[rows] - self.bounds[s]) * T
            out[rows] = self.shards[s][starts[:, None] + cols]
        if self.check_ids and out.size and int(out.max()) >= self.data.vocab_size:
            # a directory opened without verify and without a recorded largest id: caught where read
            raise DataError(f"data directory {self.data.path} is corrupt: its {self.split} split holds token id "
                            f"{int(out.max())}, outside its vocab_size {self.data.vocab_size}; prepare it again")
        return out


class SequenceStream:
    """The one global order of training sequences; position ``p`` is the p-th sequence consumed."""

    def __init__(self, data: TokenData, seq_len: int, seed: int = 0, split: str = "train"):
        if seq_len <= 0:
            raise DataError(f"seq_len={seq_len} must be positive")
        self.data = data
        self.seq_len = seq_len
        self.seed = seed
        self.index = _SplitIndex(data.shards(split), seq_len, data, split)
        self.n_seqs = self.index.n
        self._perms: dict[int, np.ndarray] = {}
        if self.n_seqs == 0:
            raise DataError(f"the {split!r} split of {data.path} holds no sequence of {seq_len + 1} tokens")

    def _perm(self, epoch: int) -> np.ndarray:
        """The permutation of one epoch (the two most recent are cached): 4 bytes a sequence, the
        only memory that grows with the split (Generator.shuffle of an int32 range is the same
        permutation as Generator.permutation(n))."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(next(iter(self._perms)))
            perm = np.arange(self.n_seqs, dtype=np.int32 if self.n_seqs < 2**31 else np.int64)
            np.random.default_rng([self.seed, epoch]).shuffle(perm)
            self._perms[epoch] = perm
        return self._perms[epoch]

    def seq_ids(self, start: int, n: int) -> np.ndarray:
        """Split-wide ids of stream positions ``[start, start + n)``."""
        pos = np.arange(start, start + n, dtype=np.int64)
        epochs = pos // self.n_seqs
        out = np.empty(n, dtype=np.int64)
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self._perm(int(e))[pos[m] - e * self.n_seqs]
        return out

    def batch(self, start: int, n: int) -> torch.Tensor:
        """Sequences at stream positions ``[start, start + n)`` as a (n, seq_len + 1) int64 tensor."""
        return torch.from_numpy(self.index.gather(self.seq_ids(start, n)))

    def epochs(self, n_consumed: int) -> float:
        return n_consumed / self.n_seqs


def check_capacity(stream: SequenceStream, need_seqs: int, allow_repeat: bool, what: str, hint: str) -> float:
    """The one check that a reader fits the training split: ``what`` needs stream positions up to
    ``need_seqs``; beyond the split it is refused (naming ``hint``) unless repeating data is
    allowed. Returns the epochs read."""
    have = stream.n_seqs
    if need_seqs > have and not allow_repeat:
        T = stream.seq_len
        raise DataError(f"{what} needs {need_seqs:,} sequences ({need_seqs * T:,} tokens) but the training split of "
                        f"{stream.data.path} holds {have:,} ({have * T:,} tokens); {hint}")
    return need_seqs / have


def step_slices(offset: int, batch_seqs: int, micro_batch_seqs: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
    """Stream slices ``(start, n)`` one rank reads in one step, in micro-batch order.

    The step reads positions ``[offset, offset + batch_seqs)``; rank r takes the r-th contiguous
    share, cut into micro-batches of ``micro_batch_seqs`` (the last one smaller when the share is
    not a multiple, which only a final partial step can cause). Concatenated over ranks these are
    exactly the step's positions, whatever the micro-batch and world size."""
    per_rank, rem = divmod(batch_seqs, world_size)
    if rem:
        raise DataError(f"batch {batch_seqs} is not divisible by world size {world_size}")
    start = offset + rank * per_rank
    return [(start + i, min(micro_batch_seqs, per_rank - i)) for i in range(0, per_rank, micro_batch_seqs)]


def eval_sequences(data: TokenData, seq_len: int, n_seqs: int, seed: int = 0) -> torch.Tensor:
    """The fixed held-out set: ``n_seqs`` sequences drawn without replacement, seeded, from the whole
    held-out split (not its first documents: documents differ in loss by far more than a CBS
    tolerance, so a set read off the split's start measures one or two documents). The draw is a
    prefix of one seeded permutation, so a smaller set is the start of a larger one."""
    idx = _SplitIndex(data.shards("val"), seq_len, data, "val")
    if idx.n < n_seqs:
        raise DataError(f"eval_seqs={n_seqs} but the held-out split of {data.path} holds only {idx.n} sequences "
                        f"of {seq_len + 1} tokens; lower --eval-seqs or prepare with a larger holdout")
    ids = np.random.default_rng([seed, 0x5EED]).permutation(idx.n)[:n_seqs]
    return torch.from_numpy(idx.gather(ids.astype(np.int64)))
