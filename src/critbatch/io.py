"""Atomic file writes and JSON lines: a result either exists whole or not at all."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, DataError


def _umask() -> int:
    um = os.umask(0)
    os.umask(um)
    return um


def public_mode(path: str | Path, directory: bool = False) -> None:
    """Temporary files and directories are private (0600/0700); give what is renamed into place the
    usual permissions (0644/0755 under the default umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _clean(obj: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(_clean(obj), indent=indent, allow_nan=False)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, dumps(obj) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_npy_atomic(path: str | Path, array) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    write_bytes_atomic(path, buf.getvalue())


def read_json(path: str | Path) -> Any:
    """A JSON file of a run, sweep or study; damaged content is a DataError naming the file."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        what = "empty" if p.stat().st_size == 0 else f"not valid JSON ({str(e).splitlines()[0]})"
        raise DataError(f"{p} is corrupt: {what}; remove it (it is rebuilt where it can be) or restore it") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a killed writer) is ignored, a damaged line
    followed by others is a DataError (records would silently go missing)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    bad = None
    with open(p, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if bad is not None:
                raise DataError(f"{p} is corrupt at line {bad}: not valid JSON, and records follow it")
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                bad = i
    return out


def check_output(path: str | Path, flag: str, kind: str = "dir") -> None:
    """Refuse an output path that cannot be one, before anything is written: a file where a
    directory belongs (``kind='dir'``), a directory where a file belongs (``kind='file'``), or a
    place that cannot be written (tried with a temporary entry in the nearest existing parent)."""
    p = Path(path)
    if kind == "dir" and p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {p} is a file, not a directory")
    if kind == "file" and p.is_dir():
        raise ConfigError(f"{flag} {p} is a directory, not a file")
    if kind == "dir" and p.is_dir():
        probe_in = p
    else:
        probe_in = p.parent
        while not probe_in.exists() and probe_in != probe_in.parent:
            probe_in = probe_in.parent
    verb = "created" if kind == "dir" else "written"
    if not probe_in.is_dir():
        raise ConfigError(f"{flag} {p} cannot be {verb}: {probe_in} is not a directory")
    try:
        tmp = tempfile.mkdtemp(prefix=".critbatch-probe-", dir=probe_in)
        os.rmdir(tmp)
    except OSError as e:
        raise ConfigError(f"{flag} {p} cannot be {verb}: {e.strerror or e}") from None


class JsonlWriter:
    """Appends one JSON record a line, flushed each time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.f = open(self.path, "a", buffering=1)

    def write(self, rec: dict) -> None:
        self.f.write(dumps(rec, indent=None) + "\n")

    def close(self) -> None:
        self.f.close()


def truncate_jsonl(path: str | Path, max_tokens: int) -> None:
    """Keep only records with ``tokens <= max_tokens`` (resume: drop what came after the checkpoint)."""
    p = Path(path)
    if not p.is_file():
        return
    keep = [r for r in read_jsonl(p) if r.get("tokens", 0) <= max_tokens]
    write_text_atomic(p, "".join(dumps(r, indent=None) + "\n" for r in keep))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (data shards, checkpoints, tokenizer files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
