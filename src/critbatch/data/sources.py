"""What ``prepare`` reads: token files people already have, never loaded whole, and text from files, JSON lines, parquet / arrow files and local HF ``datasets`` directories.

Token files:

Files are read in chunks with plain reads (at most :data:`CHUNK_TOKENS` tokens in memory).

* ``.bin`` — nanoGPT's headerless little-endian token ids, ``uint16`` or ``uint32`` (``dtype``);
  an llm.c shard (a 256 x int32 header with magic 20240520, its version saying uint16 (1) or
  uint32 (2) tokens, then the token count) is recognised by its header and read after it; a file
  with any other header (e.g. an ``.npy`` renamed ``.bin``) is refused, not read as tokens;
* ``.npy`` — a 1-D integer array (OLMo's uint16 / uint32 token files);
* a directory — its token files in sorted name order (the order they are concatenated).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ConfigError, DataError

LLMC_MAGIC = 20240520
LLMC_HEADER_BYTES = 256 * 4
LLMC_VERSIONS = {1: np.uint16, 2: np.uint32}
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
CHUNK_TOKENS = 1 << 20  # 1M tokens: what is ever in memory at once
UINT32_CHECK_MIN = 64
"""A headerless file of at least this many uint16 values is checked for being uint32 (:func:`scan`)."""


class TokenFile:
    """Tokens ``[0, n)`` of ``dtype`` at byte ``offset`` of a file, read in chunks with plain file
    reads (a memory map would count every page it touched as resident)."""

    def __init__(self, path: Path, dtype, offset: int, n: int, guessed: bool = False):
        self.path, self.dtype, self.offset, self.size = path, np.dtype(dtype), offset, n
        self.guessed = guessed
        """The dtype is the default uint16 of a headerless ``.bin``, not one the user named."""

    def read(self, start: int, stop: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.dtype.itemsize)
            return np.fromfile(f, dtype=self.dtype, count=stop - start)


def token_file(p: Path, dtype: str = "auto") -> TokenFile:
    """A token file, opened (its header checked), nothing loaded."""
    if not p.is_file():
        raise DataError(f"input file {str(p)!r} does not exist")
    if p.suffix.lower() == ".npy":
        return _npy(p)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(LLMC_HEADER_BYTES)
    if head[:6] == b"\x93NUMPY":
        raise DataError(f"{p} starts with an .npy header, not tokens; name it .npy")
    if len(head) >= 12 and int(np.frombuffer(head[:4], dtype="<i4")[0]) == LLMC_MAGIC:
        return _llmc(p, head, size)
    if dtype not in ("auto", *TOKEN_DTYPES):
        raise ConfigError(f"dtype {dtype!r} is not one of auto, uint16, uint32")
    dt = np.dtype(TOKEN_DTYPES.get(dtype, np.uint16)).newbyteorder("<")
    if size == 0:
        raise DataError(f"{p} is empty")
    if size % dt.itemsize:
        raise DataError(f"{p} has {size} bytes, not a whole number of {dt.name} tokens; pass --dtype uint16 or uint32")
    return TokenFile(p, dt, 0, size // dt.itemsize, guessed=dtype == "auto")


def _npy(p: Path) -> TokenFile:
    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _fortran, dt = read_header(f)
            offset = f.tell()
    except Exception as e:  # noqa: BLE001 - any failure to read is a bad file
        raise DataError(f"{p} is not a readable .npy array: {str(e).splitlines()[0] if str(e) else e}") from None
    if len(shape) != 1 or dt.kind not in "iu" or dt.hasobject:
        raise DataError(f"{p} must hold a 1-D integer array of token ids (got {dt} with shape {shape})")
    if offset + shape[0] * dt.itemsize != p.stat().st_size:
        raise DataError(f"{p} is truncated: its header says {shape[0]:,} tokens")
    return TokenFile(p, dt, offset, shape[0])


def _llmc(p: Path, head: bytes, size: int) -> TokenFile:
    header = np.frombuffer(head, dtype="<i4")
    version, n = int(header[1]), int(header[2])
    if version not in LLMC_VERSIONS or len(head) < LLMC_HEADER_BYTES:
        raise DataError(f"{p} has an llm.c header (magic {LLMC_MAGIC}) of unknown version {version}; "
                        f"accepted: {', '.join(map(str, LLMC_VERSIONS))}")
    dt = np.dtype(LLMC_VERSIONS[version]).newbyteorder("<")
    if LLMC_HEADER_BYTES + n * dt.itemsize != size:
        raise DataError(f"{p} is an llm.c shard whose header says {n:,} tokens but it holds "
                        f"{(size - LLMC_HEADER_BYTES) / dt.itemsize:,.1f}; it is truncated or corrupt")
    return TokenFile(p, dt, LLMC_HEADER_BYTES, n)


def expand(paths: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    """Files as given; a directory stands for its files with these suffixes, in sorted name order."""
    out = []
    for p in paths:
        if p.is_dir() and not is_hf_dataset_dir(p):
            found = sorted(q for q in p.iterdir() if q.is_file() and any(q.name.lower().endswith(s) for s in suffixes))
            if not found:
                raise DataError(f"directory {str(p)!r} holds no input files ({', '.join(suffixes)})")
            out += found
        else:
            out.append(p)
    return out


def scan(files: list[TokenFile]) -> tuple[int, int, int]:
    """(total tokens, smallest id, largest id), reading chunk by chunk. A headerless file read as the
    default uint16 whose every second value is below 16 while the others are not is uint32 read
    wrongly (those are the high halves of its ids): refused."""
    total, lo, hi = 0, None, None
    for tf in files:
        if tf.size == 0:
            raise DataError(f"{tf.path} holds no tokens")
        odd = even = 0
        for i in range(0, tf.size, CHUNK_TOKENS):
            c = tf.read(i, min(i + CHUNK_TOKENS, tf.size))
            cmin, cmax = int(c.min()), int(c.max())
            lo = cmin if lo is None else min(lo, cmin)
            hi = cmax if hi is None else max(hi, cmax)
            if tf.guessed and c.size > 1:  # chunks start at even positions
                odd, even = max(odd, int(c[1::2].max())), max(even, int(c[0::2].max()))
        if tf.guessed and tf.size % 2 == 0 and tf.size >= UINT32_CHECK_MIN and odd < 16 <= even:
            raise DataError(f"{tf.path} looks like uint32 tokens read as uint16 (every second uint16 is below 16: the "
                            f"high halves of uint32 ids); pass --dtype uint32 (or --dtype uint16 if it is uint16)")
        total += tf.size
    return total, lo, hi


def chunks(files: list[TokenFile], start: int, stop: int) -> Iterator[np.ndarray]:
    """The concatenation's tokens [start, stop) in chunks of at most CHUNK_TOKENS."""
    pos = 0
    for tf in files:
        a, b = max(start - pos, 0), min(stop - pos, tf.size)
        for i in range(a, b, CHUNK_TOKENS):
            yield tf.read(i, min(i + CHUNK_TOKENS, b))
        pos += tf.size


# ---- text from columnar files ---------------------------------------------------------------

def is_hf_dataset_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_info.json").is_file())


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError("reading parquet/arrow files needs the pyarrow package: pip install pyarrow") from None
    return pyarrow


def _column(batch, text_field: str, where: str) -> list[str]:
    if text_field not in batch.schema.names:
        raise DataError(f"{where} has no {text_field!r} column (columns: {', '.join(batch.schema.names)}); "
                        f"pass --text-field NAME")
    col = batch.column(batch.schema.names.index(text_field))
    return [x for x in col.to_pylist() if isinstance(x, str) and x]


def columnar_documents(p: Path, text_field: str) -> Iterator[str]:
    """The text column of a parquet file, an arrow file (IPC file or stream, as HF ``datasets``
    writes) or an HF ``datasets`` directory (``save_to_disk``: its arrow files in their order), one
    record batch in memory at a time."""
    pa = _pyarrow()
    if is_hf_dataset_dir(p):
        state = p / "state.json"
        files = ([p / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
                 if state.is_file() else sorted(p.glob("*.arrow")))
        if not files:
            raise DataError(f"datasets directory {str(p)!r} lists no arrow files")
        for f in files:
            yield from columnar_documents(f, text_field)
        return
    try:
        if p.suffix.lower() == ".parquet":
            for batch in pa.parquet.ParquetFile(str(p)).iter_batches(columns=[text_field]):
                yield from _column(batch, text_field, str(p))
            return
        with open(p, "rb") as f:
            try:
                reader = pa.ipc.open_stream(f)
                batches = iter(reader)
            except pa.ArrowInvalid:
                f.seek(0)
                rf = pa.ipc.open_file(f)
                batches = (rf.get_batch(i) for i in range(rf.num_record_batches))
            for batch in batches:
                yield from _column(batch, text_field, str(p))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{p} is not a readable {p.suffix[1:]} file: {str(e).splitlines()[0]}") from None
