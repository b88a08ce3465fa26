"""Run by torchrun in tests: small training runs one after another in one process group (one launch
pays the interpreters' start once); each rank records the stream positions it read."""

import gc
import json
import os
import signal
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from conftest import StreamRecorder, small_cfg  # noqa: E402

from critbatch.dist import shutdown  # noqa: E402
from critbatch.train import Callback, Trainer  # noqa: E402


class SignalRank1(Callback):
    """Rank 1 alone receives SIGUSR1 (as if preempted) at the end of step ``step``."""

    name = "signal_rank1"

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, record):
        if trainer.dist.rank == 1 and record["step"] == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


class CountSyncs(Callback):
    """Records, after each micro-batch's backward, how many gradient reductions have run so far
    (DDP: bucket all-reduces through a comm hook; FSDP2: its per-group reduce-scatters)."""

    name = "count_syncs"

    def __init__(self):
        self.n = 0
        self.seen = []  # per step: [count after micro-batch 0, 1, ...]
        self.close = lambda: None  # undoes the counting (the next run in this process counts afresh)

    def on_train_start(self, trainer):
        if trainer.fsdp:
            from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg

            orig = pg.foreach_reduce

            def counted(*args, **kwargs):
                self.n += 1
                return orig(*args, **kwargs)

            pg.foreach_reduce = counted
            self.close = lambda: setattr(pg, "foreach_reduce", orig)
        else:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(state, bucket):
                self.n += 1
                return allreduce_hook(state, bucket)

            trainer.model.register_comm_hook(trainer.model.process_group, hook)

    def on_micro_backward(self, trainer, micro_index, n_micro):
        if micro_index == 0:
            self.seen.append([])
        self.seen[-1].append(self.n)


def run(data_dir: str, out: Path, over: dict, stop: int | None = None):
    """One run (a rank's share under torchrun); tests run a one-process run in their own process."""
    over = dict(over)
    gns = over.pop("_gns", False)
    signal_at = over.pop("_sigusr1_rank1_at_step", None)
    syncs = CountSyncs() if over.pop("_count_syncs", False) else None
    cfg = small_cfg(data_dir, **over)
    cb = StreamRecorder()
    callbacks = [cb]
    if gns:
        from critbatch.gns import NoiseScaleCallback

        callbacks.append(NoiseScaleCallback(average="all"))
    if signal_at is not None:
        callbacks.append(SignalRank1(signal_at))
    if syncs is not None:
        callbacks.append(syncs)
    t = Trainer(cfg, out, callbacks=callbacks, progress=False, stop_after_tokens=stop,
                stop_on_signals=signal_at is not None)
    rank = t.dist.rank
    t.run()
    if syncs is not None:
        syncs.close()
        (out / f"syncs_rank{rank}.json").write_text(json.dumps(syncs.seen))
    if t.stop_signal is not None:
        (out / f"stopped_rank{rank}.json").write_text(json.dumps({"signal": t.stop_signal, "tokens": t.tokens}))
    (out / f"positions_rank{rank}_{len(list(out.glob(f'positions_rank{rank}_*')))}.json").write_text(json.dumps(cb.reads))
    del t, cb, callbacks, syncs  # the DDP/FSDP model goes before the group it holds (or the next run)
    gc.collect()


if __name__ == "__main__":  # DATA_DIR RUNS: a JSON list of [out, over, stop or null], run in order
    for out, over, stop in json.loads(sys.argv[2]):
        run(sys.argv[1], Path(out), over, stop)
    shutdown()
