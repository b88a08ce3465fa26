"""Run by torchrun in tests: one small training run; each rank records the stream positions it read."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import small_cfg  # noqa: E402

from critbatch.train import Callback, Trainer  # noqa: E402


class Positions(Callback):
    name = "positions"

    def __init__(self):
        self.pos = []

    def on_train_start(self, trainer):
        orig = trainer.stream.batch

        def batch(start, n):
            self.pos.append([trainer.state["step"], start, n])
            return orig(start, n)

        trainer.stream.batch = batch


def main():
    data_dir, out, over = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    stop = int(sys.argv[4]) if len(sys.argv) > 4 else None
    gns = over.pop("_gns", False)
    cfg = small_cfg(data_dir, **over)
    cb = Positions()
    callbacks = [cb]
    if gns:
        from critbatch.gns import NoiseScaleCallback

        callbacks.append(NoiseScaleCallback(average="all"))
    t = Trainer(cfg, out, callbacks=callbacks, progress=False, stop_after_tokens=stop)
    t.run()
    rank = t.dist.rank
    (out / f"positions_rank{rank}_{len(list(out.glob(f'positions_rank{rank}_*')))}.json").write_text(json.dumps(cb.pos))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
