"""Peak memory of ``prepare`` and of training against the size of a token file (issue 12): a
headerless uint32 .bin of 20M and of 200M tokens (80 MB and 800 MB; vocabulary 1000). ``prepare``'s
peak is its VmHWM; training's is its peak anonymous memory (heap, sampled every step: the page cache
a memory-mapped shard touches belongs to the kernel, not to the run).

    python bench/token_memory.py [--sizes 20M,200M] [--dir /tmp/critbatch-token-memory]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_token_data import PEAK, TRAIN_PEAK  # noqa: E402  (the same measurement as the test)


def main() -> None:
    from critbatch.units import parse_count_list

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20M,200M")
    ap.add_argument("--dir", default="/tmp/critbatch-token-memory")
    a = ap.parse_args()
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out = {}
    for n in parse_count_list(a.sizes):
        f = root / f"t{n}.bin"
        with open(f, "wb") as w:
            for i in range(0, n, 1 << 22):
                (np.arange(i, min(i + (1 << 22), n), dtype=np.uint32) % 1000).tofile(w)
        row = {"file_mb": f.stat().st_size / 2**20}
        for name, code, args in (("prepare", PEAK, [str(root / f"d{n}"), str(f)]),
                                 ("train", TRAIN_PEAK, [str(root / f"d{n}"), str(root / f"r{n}")])):
            t0 = time.time()
            r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
            row[f"{name}_peak_mb"] = int(r.stdout.split()[-1]) / 1024
            row[f"{name}_seconds"] = time.time() - t0
        out[n] = row
        f.unlink()
        shutil.rmtree(root / f"d{n}")
        print(n, json.dumps(row), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
