"""Peak memory and throughput of ``critbatch prepare`` on text of gigabytes (issue 24 item 1): text is
streamed, so the peak should not depend on the corpus size (before, 20 MB of .txt took 3.65 GB).

Writes ``--gb`` of text to ``--dir`` — the embedded corpora repeated, every copy of a document with its
own suffix — as one .txt file (one document: the hardest case, its tail is the held-out split) or as
JSON lines, runs ``critbatch prepare`` on it in a subprocess for each tokenizer, and reports the
subprocess's peak RSS (``os.wait4``'s ru_maxrss) and tokens/s. Everything it wrote is removed.

    nice python bench/prepare_memory.py [--gb 2] [--format txt|jsonl] [--tokenizers bytes,bpe]
        [--vocab-size 8192] [--dir /tmp/critbatch-prepare-memory]
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path


def corpus_docs() -> list[str]:
    docs = []
    for name in ("sotu", "shakespeare"):
        with lzma.open(str(resources.files("critbatch") / "corpora" / f"{name}.jsonl.xz"), "rt") as f:
            docs += [json.loads(line)["text"] for line in f if line.strip()]
    return docs


def write_text(path: Path, size: int, fmt: str) -> tuple[int, int]:
    """``size`` bytes (at least) of text in ``fmt``: (bytes, documents)."""
    docs = corpus_docs()
    written = n = copy = 0
    with open(path, "w", encoding="utf-8") as w:
        while written < size:
            copy += 1
            for i, d in enumerate(docs):
                doc = f"{d}\n\n[copy {copy} of document {i}, edition {copy * 7919 % 1009}]\n"
                line = doc if fmt == "txt" else json.dumps({"text": doc}) + "\n"
                w.write(line)
                written += len(line.encode("utf-8"))
                n += 1
                if written >= size:
                    break
    return written, 1 if fmt == "txt" else n


def measure(cmd: list[str]) -> tuple[float, float, int, str]:
    """(seconds, CPU seconds, peak RSS in bytes, stderr) of a subprocess, reaped with ``os.wait4`` so
    that its own peak is read (not the largest of every child so far, as RUSAGE_CHILDREN would give)."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {err[-2000:]}")
    return time.time() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, err


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--format", choices=("txt", "jsonl"), default="txt")
    ap.add_argument("--tokenizers", default="bytes,bpe")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--dir", default="/tmp/critbatch-prepare-memory")
    a = ap.parse_args()
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        src = root / f"corpus.{a.format}"
        t0 = time.time()
        size, docs = write_text(src, int(a.gb * 2**30), a.format)
        print(f"wrote {size / 2**30:.2f} GiB ({docs:,} documents) in {time.time() - t0:.0f}s", flush=True)
        rows = []
        for tok in a.tokenizers.split(","):
            out = root / f"data-{tok}"
            cmd = [sys.executable, "-m", "critbatch", "prepare", "--out", str(out), str(src), "--tokenizer", tok]
            if tok == "bpe":
                cmd += ["--vocab-size", str(a.vocab_size)]
            seconds, cpu, peak, _ = measure(cmd)
            meta = json.loads((out / "meta.json").read_text())
            tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
            row = {"tokenizer": tok, "format": a.format, "text_gib": round(size / 2**30, 3), "documents": docs,
                   "tokens": tokens, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                   "peak_rss_mib": round(peak / 2**20),
                   "tokens_per_s": round(tokens / seconds), "text_mib_per_s": round(size / 2**20 / seconds, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out)
        print(json.dumps(rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
