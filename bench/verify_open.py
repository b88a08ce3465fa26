"""Opening a large data directory: the first open hashes every shard (sha256 and the largest id, one
read), later opens find each shard's identity in the verification record and hash nothing (issue 24
item 2). Builds ``--gb`` of random uint16 tokens as 1 GiB shards (real writes), waits until the files
have settled (:data:`critbatch.data.verify.SETTLE_NS`), then times two opens with ``verify`` on.
The shards were just written, so the first open reads them from the page cache where memory allows:
its time is the hashing, not the disk. Everything it wrote is removed.

    nice python bench/verify_open.py [--gb 10] [--dir /tmp/critbatch-verify-open]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

CHUNK = 1 << 26  # tokens generated and written at a time (128 MiB)


def write_shard(path: Path, tokens: int, rng) -> dict:
    h, hi = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for i in range(0, tokens, CHUNK):
            a = rng.integers(0, 1 << 16, size=min(CHUNK, tokens - i), dtype=np.uint16)
            data = a.tobytes()
            f.write(data)
            h.update(data)
            hi = max(hi, int(a.max()))
    return {"file": path.name, "tokens": tokens, "sha256": h.hexdigest(), "max_id": hi}


def build(root: Path, gib: float) -> Path:
    d = root / "data"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_shard = 1 << 29  # 1 GiB of uint16
    total = int(gib * 2**30) // 2
    splits = {}
    for split, n in (("train", total - total // 100), ("val", total // 100)):
        shards = [write_shard(d / f"{split}_{i:03d}.bin", min(per_shard, n - s), rng)
                  for i, s in enumerate(range(0, n, per_shard))]
        splits[split] = {"tokens": n, "shards": [{k: v for k, v in sh.items() if k != "max_id"} for sh in shards],
                         "docs": None, "max_id": max(sh["max_id"] for sh in shards)}
    meta = {"format": "critbatch-tokens-v1", "dtype": "uint16", "vocab_size": 1 << 16,
            "tokenizer": {"kind": "external", "eot_id": None}, "splits": splits}
    (d / "meta.json").write_text(json.dumps(meta, indent=2))
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=10.0)
    ap.add_argument("--dir", default="/tmp/critbatch-verify-open")
    a = ap.parse_args()
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    os.environ["CRITBATCH_CACHE"] = str(root / "cache")  # a record of its own, not the user's
    from critbatch.data import open_data
    from critbatch.data.verify import SETTLE_NS, record_path

    try:
        t0 = time.time()
        d = build(root, a.gb)
        size = sum(p.stat().st_size for p in d.glob("*.bin"))
        print(f"wrote {size / 2**30:.2f} GiB in {len(list(d.glob('*.bin')))} shards in {time.time() - t0:.0f}s", flush=True)
        time.sleep(SETTLE_NS / 1e9 + 0.5)
        row = {"data_gib": round(size / 2**30, 2)}
        for name in ("first_open_s", "second_open_s"):
            t0 = time.time()
            open_data(d)
            row[name] = round(time.time() - t0, 4)
            print(name, row[name], flush=True)
        row["hash_gib_per_s"] = round(size / 2**30 / row["first_open_s"], 2)
        row["record_bytes"] = record_path(d).stat().st_size
        print(json.dumps(row))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
