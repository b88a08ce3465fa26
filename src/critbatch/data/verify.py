"""Shard verification, once per file: the sha256 of every shard is checked against ``meta.json``
(and its largest token id read in the same pass) the first time a file is opened; then the file's
identity — size, mtime_ns, ctime_ns and inode — is recorded beside the hash, and later opens re-hash
only a shard whose identity changed. Any write to a file changes its mtime and ctime (ctime cannot be
set back), and a copy has another inode, so a damaged or replaced shard is hashed again.

The record lives in the user's cache (``$CRITBATCH_CACHE/verified/``, one small JSON file per data
directory, written atomically), not in the data directory: opening data never writes into it, and
read-only or shared data works alike. An unwritable cache only means shards are hashed every time.
A file changed less than :data:`SETTLE_NS` before it was hashed is not recorded (a change in the same
tick of the file system's clock would not show in its times).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import DataError
from .prepare import cache_dir

SETTLE_NS = 2_000_000_000
IDENTITY = ("size", "mtime_ns", "ctime_ns", "ino")
READ_BYTES = 1 << 22


def identity(f: Path) -> dict:
    st = f.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def record_path(data_dir: Path) -> Path:
    """Where the verification record of ``data_dir`` lives."""
    key = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "verified" / f"{key}.json"


def _load(p: Path, data_dir: Path) -> dict:
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(rec, dict) and rec.get("dir") == str(data_dir.resolve()) and isinstance(rec.get("shards"), dict)
    return rec["shards"] if ok else {}


def _store(p: Path, data_dir: Path, shards: dict) -> None:
    """Write the record atomically; a cache that cannot be written is skipped."""
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verified-", dir=p.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"dir": str(data_dir.resolve()), "shards": shards}, f)
            os.replace(tmp, p)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def hash_and_max(f: Path, dtype) -> tuple[str, int | None]:
    """(sha256, largest token id) of a shard, in one read."""
    h, hi = hashlib.sha256(), None
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(READ_BYTES), b""):
            h.update(chunk)
            a = np.frombuffer(chunk, dtype=dtype)
            if a.size:
                hi = int(a.max()) if hi is None else max(hi, int(a.max()))
    return h.hexdigest(), hi


def _known(entry, sh: dict, ident: dict) -> bool:
    return (isinstance(entry, dict) and entry.get("sha256") == sh["sha256"] and all(entry.get(k) == ident[k] for k in IDENTITY)
            and (entry.get("max_id") is None or isinstance(entry.get("max_id"), int)))


def verify_shards(data_dir: Path, meta: dict, dtype) -> dict[str, int | None]:
    """Check every shard's sha256 against ``meta`` (skipping files recorded as verified with the same
    identity); returns each split's largest token id as read (``None`` for an empty split)."""
    rec_p = record_path(data_dir)
    known = _load(rec_p, data_dir)
    kept: dict[str, dict] = {}
    out: dict[str, int | None] = {}
    for split, info in meta["splits"].items():
        out[split] = None
        for sh in info["shards"]:
            f = data_dir / sh["file"]
            ident = identity(f)
            entry = known.get(sh["file"])
            if _known(entry, sh, ident):
                hi = entry["max_id"]
                kept[sh["file"]] = entry
            else:
                started = time.time_ns()
                got, hi = hash_and_max(f, dtype)
                if got != sh["sha256"]:
                    raise DataError(f"data directory {data_dir} is corrupt: {sh['file']} sha256 {got[:12]}… does not "
                                    f"match meta.json {sh['sha256'][:12]}…; prepare it again")
                if started - max(ident["mtime_ns"], ident["ctime_ns"]) >= SETTLE_NS:  # else too fresh to trust
                    kept[sh["file"]] = {**ident, "sha256": got, "max_id": hi}
            if hi is not None:
                out[split] = hi if out[split] is None else max(out[split], hi)
    if kept != known:
        _store(rec_p, data_dir, kept)
    return out
