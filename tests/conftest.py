import atexit
import os
import shutil
from pathlib import Path

import pytest

# Auto-prepared corpora go to a per-session cache, never the user's home.
_CACHE = Path(os.environ.get("PYTEST_CRITBATCH_CACHE", "/tmp")) / f"critbatch-test-cache-{os.getpid()}"
os.environ["CRITBATCH_CACHE"] = str(_CACHE)
# ... and removed when this process ends (they are re-prepared in seconds; 300 sessions left 6 GB behind).
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# Two threads for a test process alone, one per worker when pytest-xdist runs a worker per core
# (make test: pytest_configure below; the worker's environment is not yet marked when this module is
# imported): more threads than free cores makes OpenMP spin against the other work.
# (the workers inherit the controller's environment: the marker tells them the 2 was this module's)
_OMP_GIVEN = "OMP_NUM_THREADS" in os.environ and "CRITBATCH_TEST_OMP_DEFAULT" not in os.environ
if not _OMP_GIVEN:
    os.environ["OMP_NUM_THREADS"] = "2"
    os.environ["CRITBATCH_TEST_OMP_DEFAULT"] = "1"

import torch  # noqa: E402

torch.set_flush_denormal(True)


def pytest_configure(config):
    if hasattr(config, "workerinput") and not _OMP_GIVEN:  # an xdist worker, one of a core's
        os.environ["OMP_NUM_THREADS"] = "1"  # for the processes the tests start
        torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def shared_parent(data_dir, tmp_path_factory) -> Path:
    """One finished parent run for every test that branches from one, trained once per session: batch 4
    sequences of 16 tokens, 8192 tokens, cosine LR with a 512-token warmup, kept checkpoints at 1024
    and 4096. Tests that write into a run (sweeps, branches) take a private copy (:func:`fresh_parent`)."""
    from critbatch.train import train

    run = tmp_path_factory.mktemp("shared-parent") / "run"
    train(small_cfg(data_dir, total_tokens=8192, batch_seqs=4, checkpoint_tokens=[1024, 4096],
                    lr_schedule={"kind": "cosine", "warmup_tokens": 512}), run, progress=False)
    return run


def fresh_parent(parent: Path, tmp_path: Path) -> Path:
    """A private copy of a finished parent run, without its branches and sweeps."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(parent, dst, ignore=shutil.ignore_patterns("branches", "sweeps"))
    return dst


QUICK_DEMO_LINE = "critbatch demo --quick --out runs/quick"
"""The README's last stage command: the session runs it once (:func:`quick_demo`) for every test of it."""


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> Path:
    """``critbatch demo --quick --out runs/quick`` (the README's line), run once per session through
    the command line's entry point, in a fresh directory (the report tests and the README test read it)."""
    from critbatch.cli import main

    cwd = tmp_path_factory.mktemp("readme-demo")
    old = Path.cwd()
    os.chdir(cwd)
    try:
        assert main(QUICK_DEMO_LINE.split()[1:]) == 0
    finally:
        os.chdir(old)
    return cwd / "runs" / "quick"


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
            self.reads.append([trainer.state.step, start, n])
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
