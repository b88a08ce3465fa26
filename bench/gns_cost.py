"""Cost of the noise scale: per-example gradients by a loop vs torch.func (vmap of grad), the
offline estimate per checkpoint, and the online callback's overhead per training step.

    python bench/gns_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings


def main() -> None:
    import torch

    from critbatch import presets
    from critbatch.config import merge
    from critbatch.data import SequenceStream, open_data
    from critbatch.gns import NoiseScaleCallback, measure_norms
    from critbatch.model import GPT
    from critbatch.train import Trainer

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    torch.set_flush_denormal(True)

    base = presets.get("tiny")
    t = Trainer(merge(base, {"total_tokens": 4096, "eval_seqs": 8}), None, progress=False, quiet=True)
    T = base.model.seq_len
    stream = SequenceStream(open_data(t.cfg.data.path, verify=False), T)
    torch.manual_seed(0)
    model = GPT(t.cfg.model)
    loss = lambda m, b: m.loss_sum(b[0]) / (b[0].shape[0] * T)  # noqa: E731
    n = 2 if a.quick else 8
    batches = [stream.batch(i * 64, 64) for i in range(n)]
    print(f"per-example gradient norms, tiny preset ({t.cfg.model.d_model}d x {t.cfg.model.n_layer}), "
          f"b_small=1, b_big=64, {n} batches")
    times = {}
    for method in ("loop", "vmap"):
        measure_norms(model, loss, batches[:1], 1, 64, method=method)  # warm-up
        t0 = time.perf_counter()
        measure_norms(model, loss, batches, 1, 64, method=method)
        times[method] = (time.perf_counter() - t0) / n
        print(f"  {method:5s}: {times[method] * 1000:7.1f} ms per batch of 64 "
              f"({64 / times[method]:,.0f} per-example gradients/s)")
    print(f"  vmap / loop time: {times['vmap'] / times['loop']:.2f}")

    print("\nonline callback overhead (batch 32, micro-batch 8: B_small 8, B_big 32)")
    tokens = 131072 if a.quick else 655360
    cfg = merge(base, {"total_tokens": tokens, "batch_seqs": 32, "micro_batch_seqs": 8, "eval_seqs": 8,
                       "eval_interval_tokens": 10**15})
    res = {}
    for _rep in range(1 if a.quick else 3):
        for name, cbs in (("without", []), ("with", [NoiseScaleCallback()])):
            tr = Trainer(cfg, None, callbacks=cbs, progress=False, quiet=True)
            t0 = time.perf_counter()
            tr.run()
            res.setdefault(name, []).append(time.perf_counter() - t0)
    steps = tokens // (32 * T)
    w, wo = min(res["with"]), min(res["without"])
    print(f"  without: {wo / steps * 1000:.2f} ms/step   with: {w / steps * 1000:.2f} ms/step   "
          f"overhead {100 * (w - wo) / wo:+.1f}% (best of {len(res['with'])})")


if __name__ == "__main__":
    main()
