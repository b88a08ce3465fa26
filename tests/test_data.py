import json
import re

import numpy as np
import pytest

from critbatch.data import SequenceStream, load_tokenizer, open_data, prepare, prepare_embedded
from critbatch.data.dataset import eval_sequences, step_slices
from critbatch.errors import ConfigError, DataError


def test_embedded_corpus_bytes(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["vocab_size"] == 257 and meta["dtype"] == "uint16" and meta["tokenizer"]["kind"] == "bytes"
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    # 233 addresses, 5% held out as whole documents; ~10.8M bytes in all
    assert tr["docs"] + va["docs"] == 233 and va["docs"] == 12
    assert 10_000_000 < tr["tokens"] + va["tokens"] < 11_500_000
    for sh in tr["shards"] + va["shards"]:
        assert len(sh["sha256"]) == 64 and (data_dir / sh["file"]).stat().st_size == 2 * sh["tokens"]
    tok = load_tokenizer(data_dir)
    d = open_data(data_dir)
    first = np.asarray(d.shards("train")[0][:40], dtype=np.int64)
    text = tok.decode(first)
    assert text.startswith("Fellow-Citizens of the Senate")  # Washington, 1790
    assert np.array_equal(tok.encode(text), first)


def test_heldout_documents_never_in_train(data_dir):
    d = open_data(data_dir)
    train = bytes(np.asarray(d.shards("train")[0], dtype=np.uint8)[: 5_000_000].tobytes())
    val = np.asarray(d.shards("val")[0])
    # Take a 200-byte passage from the middle of the held-out split: it must not occur in train.
    mid = len(val) // 2
    passage = bytes(val[mid:mid + 200].astype(np.uint8).tobytes())
    assert passage not in train


def test_bpe_jsonl_and_text_inputs(tmp_path):
    docs = [{"text": f"document number {i}: " + "the quick brown fox jumps over the lazy dog. " * 20} for i in range(40)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "b.txt").write_text("a plain text file " * 100)
    out = prepare(tmp_path / "bpe", [tmp_path / "a.jsonl", tmp_path / "b.txt"], tokenizer="bpe", vocab_size=300, quiet=True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "bpe" and (out / "tokenizer.json").is_file()
    assert meta["vocab_size"] == 300
    assert meta["splits"]["train"]["docs"] == 39 and meta["splits"]["val"]["docs"] == 2
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
    # same recipe again: a no-op; a different one into the same directory: an error
    assert prepare(tmp_path / "bpe", [tmp_path / "a.jsonl", tmp_path / "b.txt"], tokenizer="bpe", vocab_size=300, quiet=True) == out
    with pytest.raises(DataError, match="already holds different data"):
        prepare(tmp_path / "bpe", [tmp_path / "a.jsonl"], tokenizer="bytes", quiet=True)


def test_token_file_imports(tmp_path):
    arr = (np.arange(10_000) * 7919 % 50_257).astype(np.uint16)
    arr.tofile(tmp_path / "train.bin")
    out = prepare(tmp_path / "from-bin", [tmp_path / "train.bin"], vocab_size=50_257, quiet=True)
    d = open_data(out)
    assert d.vocab_size == 50_257 and d.tokens("train") + d.tokens("val") == 10_000
    assert np.array_equal(np.concatenate([d.shards("train")[0], d.shards("val")[0]]), arr)
    np.save(tmp_path / "toks.npy", arr.astype(np.int32))
    out2 = prepare(tmp_path / "from-npy", [tmp_path / "toks.npy"], quiet=True)
    assert open_data(out2).vocab_size == int(arr.max()) + 1
    with pytest.raises(DataError, match="outside the vocabulary"):
        prepare(tmp_path / "x", [tmp_path / "train.bin"], vocab_size=100, quiet=True)
    with pytest.raises(ConfigError, match="mix token files"):
        prepare(tmp_path / "y", [tmp_path / "train.bin", tmp_path / "toks.npy", __file__], quiet=True)


def test_sharding_and_sequences_never_cross_shards(tmp_path):
    arr = np.arange(1000, dtype=np.uint16)
    arr.tofile(tmp_path / "t.bin")
    out = prepare(tmp_path / "sh", [tmp_path / "t.bin"], vocab_size=1000, shard_tokens=300, quiet=True,
                  holdout_fraction=0.1)
    d = open_data(out)
    assert [a.size for a in d.shards("train")] == [300, 300, 300]
    s = SequenceStream(d, seq_len=10, seed=0)
    assert s.n_seqs == 3 * 29
    b = s.batch(0, s.n_seqs).numpy()
    assert np.all(np.diff(b, axis=1) == 1)  # each sequence is contiguous: no shard crossing
    assert len({tuple(r) for r in b}) == s.n_seqs  # one epoch visits each sequence once


def test_corrupt_and_missing_data(tmp_path, data_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    raw = bytearray((bad / "val_000.bin").read_bytes())
    raw[100] ^= 1
    (bad / "val_000.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="sha256"):
        open_data(bad)
    with pytest.raises(DataError, match="does not exist"):
        open_data(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no meta.json"):
        open_data(tmp_path / "empty")


def test_stream_order_is_seeded_and_fixed(data_dir):
    d = open_data(data_dir, verify=False)
    a = SequenceStream(d, 16, seed=0)
    b = SequenceStream(d, 16, seed=0)
    c = SequenceStream(d, 16, seed=1)
    assert np.array_equal(a.seq_ids(0, 100), b.seq_ids(0, 100))
    assert not np.array_equal(a.seq_ids(0, 100), c.seq_ids(0, 100))
    # reading in different chunk sizes gives the same stream
    whole = a.batch(10, 24)
    parts = [a.batch(10 + i, n) for i, n in ((0, 8), (8, 4), (12, 12))]
    import torch

    assert torch.equal(whole, torch.cat(parts))
    # across the epoch boundary: the next epoch is another permutation of the same sequences
    n = a.n_seqs
    e1 = a.seq_ids(n, n)
    assert sorted(e1.tolist()) == list(range(n)) and not np.array_equal(e1, a.seq_ids(0, n))


@pytest.mark.parametrize("batch,micro,world", [(8, 8, 1), (8, 2, 1), (8, 2, 2), (8, 1, 4), (12, 3, 2)])
def test_step_slices_cover_the_step_in_order(batch, micro, world):
    covered = []
    for r in range(world):
        for start, n in step_slices(100, batch, micro, r, world):
            assert n == micro
            covered.extend(range(start, start + n))
    assert covered == list(range(100, 100 + batch))


def test_eval_set_is_fixed_and_checked(data_dir):
    d = open_data(data_dir, verify=False)
    import torch

    assert torch.equal(eval_sequences(d, 16, 32), eval_sequences(d, 16, 64)[:32])
    assert torch.equal(eval_sequences(d, 16, 32, seed=0), eval_sequences(d, 16, 32))
    with pytest.raises(DataError, match="eval_seqs"):
        eval_sequences(d, 16, 10**9)


def test_eval_set_is_sampled_across_the_whole_held_out_split(data_dir):
    """Not the first sequences in file order (one or two documents): a seeded sample of the split."""
    import numpy as np
    import torch

    from critbatch.data.dataset import _SplitIndex

    d = open_data(data_dir, verify=False)
    idx = _SplitIndex(d.shards("val"), 16)
    every = torch.from_numpy(idx.gather(np.arange(idx.n)))
    ev = eval_sequences(d, 16, 256)
    rows = {tuple(r.tolist()): i for i, r in enumerate(every)}
    pos = sorted(rows[tuple(r.tolist())] for r in ev)
    assert len(set(pos)) == 256  # distinct held-out sequences
    assert pos[0] < idx.n * 0.05 and pos[-1] > idx.n * 0.95  # spread over the split, not its start
    assert pos != list(range(256))
    other = eval_sequences(d, 16, 256, seed=1)
    assert not torch.equal(ev, other)  # another eval seed draws another sample


def test_embedded_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("CRITBATCH_CACHE", str(tmp_path))
    p1 = prepare_embedded("shakespeare", "bytes")
    mtime = (p1 / "meta.json").stat().st_mtime_ns
    p2 = prepare_embedded("shakespeare", "bytes")
    assert p1 == p2 and (p2 / "meta.json").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="unknown corpus"):
        prepare_embedded("wikipedia")


# ---- text is streamed: the tokens of whole documents, memory that does not grow --------------------

def _words_corpus(rng, n_docs: int, words: int) -> list[str]:
    """Documents with the whitespace a cut could get wrong: runs of spaces and newlines, CRLF, tabs,
    no-break and ideographic spaces, contractions, digits, accents, emoji."""
    vocab = ["the", "cat", "sat", "on", "mat", "it's", "we'll", "1990", "café", "naïve", "😀", "—", "!", "..."]
    seps = [" ", " ", " ", "  ", "\n", "\n\n", " \n", "\r\n", "\t", "\u00a0", "\u3000", "\u2028", ", ", ". "]
    return ["".join(str(rng.choice(vocab)) + str(rng.choice(seps)) for _ in range(words)) for _ in range(n_docs)]


def _old_split(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """The held-out choice as prepare made it before it streamed (every document in memory)."""
    if len(docs) == 1 or len(docs) * fraction < 1:
        train, val = [], []
        for d in docs:
            cut = int(len(d) * (1 - fraction))
            nl = d.rfind("\n", 0, cut)
            cut = nl + 1 if nl > cut * 0.9 else cut
            train.append(d[:cut])
            val.append(d[cut:])
        return [t for t in train if t], [v for v in val if v]
    val_idx = set(np.random.default_rng(seed).choice(len(docs), size=max(1, round(len(docs) * fraction)),
                                                     replace=False).tolist())
    return ([d for i, d in enumerate(docs) if i not in val_idx], [d for i, d in enumerate(docs) if i in val_idx])


def _write_inputs(tmp_path, layout: str) -> list:
    rng = np.random.default_rng(1)
    if layout == "one-txt":  # one document: the tail of it is held out
        (tmp_path / "one.txt").write_bytes("".join(_words_corpus(rng, 1, 3000)).encode())
        return [tmp_path / "one.txt"]
    if layout == "three-files":  # too few documents to hold out whole ones
        names = ["a.txt", "b.md", "c.rst"]
        for name, d in zip(names, _words_corpus(rng, 3, 700)):
            (tmp_path / name).write_bytes(d.encode())
        return [tmp_path / n for n in names]
    docs = _words_corpus(rng, 60, 60) + [""]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return [tmp_path / "d.jsonl"]


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe", "file-bpe", "file-whitespace"])
@pytest.mark.parametrize("layout", ["one-txt", "three-files", "jsonl"])
def test_streamed_text_gives_the_tokens_of_whole_documents(tmp_path, monkeypatch, layout, tokenizer):
    """Reading in pieces of 37 characters, cutting segments of about 50 and encoding batches of 300
    gives byte for byte the shards of encoding every document whole (held-out choice, BPE and all)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from critbatch.data import stream, text
    from critbatch.data.tokenizer import BPETokenizer, ByteTokenizer, FileTokenizer

    monkeypatch.setattr(text, "READ_CHARS", 37)
    monkeypatch.setattr(stream, "SEGMENT_CHARS", 50)
    monkeypatch.setattr(stream, "BATCH_CHARS", 300)
    paths = _write_inputs(tmp_path, layout)
    docs = [d for p in paths for d in ([json.loads(x)["text"] for x in p.read_text().splitlines()]
                                       if p.suffix == ".jsonl" else [p.read_text(encoding="utf-8")]) if d]
    train, val = _old_split(docs, 0.05, 0)
    if tokenizer == "file-whitespace":  # not byte-level: documents are encoded whole
        t = Tokenizer(models.BPE(unk_token="<unk>"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        t.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
        t.save(str(tmp_path / "ws.json"))
    elif tokenizer == "file-bpe":  # a GPT-2 style tokenizer.json someone has
        BPETokenizer.train(docs, 400).save(tmp_path / "gpt2ish.json")
    spec = {"bytes": "bytes", "bpe": "bpe", "file-bpe": str(tmp_path / "gpt2ish.json"),
            "file-whitespace": str(tmp_path / "ws.json")}[tokenizer]
    out = prepare(tmp_path / "d", paths, tokenizer=spec, vocab_size=400 if tokenizer == "bpe" else None, quiet=True)
    tok = (ByteTokenizer() if tokenizer == "bytes" else BPETokenizer.train(train, 400) if tokenizer == "bpe"
           else FileTokenizer.open(spec))
    assert tok.cut_rule == {"bytes": "any", "bpe": "space", "file-bpe": "space", "file-whitespace": None}[tokenizer]
    if tokenizer == "bpe":
        assert (out / "tokenizer.json").read_text() == tok._tok.to_str(pretty=True)
    meta = json.loads((out / "meta.json").read_text())
    dt = np.dtype(meta["dtype"])
    for split, ds in (("train", train), ("val", val)):
        expect = np.concatenate([np.append(tok.encode(d), tok.eot_id) for d in ds]).astype(dt)
        got = b"".join((out / sh["file"]).read_bytes() for sh in meta["splits"][split]["shards"])
        assert got == expect.tobytes(), split
        assert meta["splits"][split]["docs"] == len(ds) and meta["splits"][split]["max_id"] == int(expect.max())


def test_segments_of_a_byte_level_bpe_encode_as_the_whole(tmp_path):
    """Cut where the byte-level rule allows (before a space or newline after a non-space), a text's
    segments give its tokens, also around exotic whitespace; cut anywhere they would not."""
    from critbatch.data.text import segments
    from critbatch.data.tokenizer import BPETokenizer

    rng = np.random.default_rng(2)
    docs = _words_corpus(rng, 30, 300)
    tok = BPETokenizer.train(docs, 500)
    for size in (1, 5, 40):
        for d in docs:
            parts = list(segments(iter([d[i:i + 13] for i in range(0, len(d), 13)]), size, "space"))
            assert "".join(parts) == d and len(parts) > len(d) // 200
            assert np.array_equal(np.concatenate(tok.encode_batch(parts)), tok.encode(d))
    anywhere = list(segments(iter([docs[0]]), 5, "any"))
    assert not np.array_equal(np.concatenate(tok.encode_batch(anywhere)), tok.encode(docs[0]))


def test_only_tokenizers_that_keep_their_tokens_are_cut(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from critbatch.data.tokenizer import cut_rule

    def tok(pre, post=None, added=None):
        t = Tokenizer(models.BPE())
        t.pre_tokenizer = pre
        if post is not None:
            t.post_processor = post
        if added:
            t.add_special_tokens(added)
        return cut_rule(t)

    from tokenizers import AddedToken

    assert tok(pre_tokenizers.ByteLevel(add_prefix_space=False)) == "space"
    assert tok(pre_tokenizers.ByteLevel(add_prefix_space=False), processors.ByteLevel()) == "space"
    assert tok(pre_tokenizers.ByteLevel(add_prefix_space=True)) is None  # a space before every segment
    assert tok(pre_tokenizers.Whitespace()) is None
    assert tok(pre_tokenizers.ByteLevel(add_prefix_space=False),
               processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])) is None  # <s> per segment
    assert tok(pre_tokenizers.ByteLevel(add_prefix_space=False), added=[AddedToken("<x>", rstrip=True)]) is None


PREPARE_PEAK = """
import sys
from critbatch.data import prepare
prepare(sys.argv[1], [sys.argv[2]], tokenizer=sys.argv[3], vocab_size=int(sys.argv[4]) or None, quiet=True)
print([int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')][0])
"""


@pytest.mark.parametrize("tokenizer,small,large", [("bytes", 4_000_000, 40_000_000), ("bpe", 2_500_000, 6_000_000)])
def test_prepare_memory_does_not_grow_with_the_text(tmp_path, tokenizer, small, large):
    """One text file (one document) of 4 MB against 40 MB (bytes), 2.5 MB against 6 MB (BPE): the
    peak memory of prepare stays flat (whole, the larger held 8 bytes a character, ~300 MB more,
    and its BPE encoding ~1 GB more). bench/prepare_memory.py measures 2 GB."""
    import subprocess
    import sys

    base = "".join(_words_corpus(np.random.default_rng(3), 1, 200_000))
    peaks = []
    for n in (small, large):
        f = tmp_path / f"t{n}.txt"
        with open(f, "w") as w:
            for i in range(0, n, len(base)):
                w.write(base[: n - i] if i + len(base) > n else base)
        r = subprocess.run([sys.executable, "-c", PREPARE_PEAK, str(tmp_path / f"d{n}"), str(f), tokenizer,
                            "2000" if tokenizer == "bpe" else "0"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        peaks.append(int(r.stdout.split()[-1]) / 1024)  # MB
    assert peaks[1] - peaks[0] < 30, peaks


# ---- shards are verified once per file ---------------------------------------------------------------

def _small_data(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in _words_corpus(
        np.random.default_rng(4), 40, 200)))
    return prepare(tmp_path / "d", [tmp_path / "c.jsonl"], shard_tokens=4000, quiet=True)


def _count_hashes(monkeypatch) -> list:
    from critbatch.data import verify

    calls = []
    real = verify.hash_and_max

    def counted(f, dtype):
        calls.append(f.name)
        return real(f, dtype)

    monkeypatch.setattr(verify, "hash_and_max", counted)
    return calls


def test_a_second_open_hashes_nothing_and_writes_nothing_into_the_data(tmp_path, monkeypatch):
    from critbatch.data import verify

    d = _small_data(tmp_path)
    monkeypatch.setattr(verify, "SETTLE_NS", 0)  # the shards were just written: trust their times at once
    calls = _count_hashes(monkeypatch)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in d.iterdir())
    first = open_data(d)
    n = len(calls)
    assert n == len(list(d.glob("*.bin"))) > 2
    second = open_data(d)
    assert len(calls) == n  # nothing hashed again
    assert second.max_ids == first.max_ids == {"train": 256, "val": 256}
    assert sorted((p.name, p.stat().st_mtime_ns) for p in d.iterdir()) == before  # the data directory untouched
    assert verify.record_path(d).is_file()
    import shutil
    shutil.copytree(d, tmp_path / "copy")  # same times, other inodes: hashed again
    open_data(tmp_path / "copy")
    assert len(calls) == 2 * n


def test_a_byte_flipped_after_a_verified_open_is_caught(tmp_path, monkeypatch):
    import time

    from critbatch.data import verify

    d = _small_data(tmp_path)
    monkeypatch.setattr(verify, "SETTLE_NS", 0)
    open_data(d)
    time.sleep(0.05)  # past a tick of the file system's clock
    shard = d / "train_001.bin"
    with open(shard, "r+b") as f:  # in place: same inode, same size
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(DataError, match="train_001.bin sha256 .* does not match meta.json"):
        open_data(d)
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="train_001.bin has 100 bytes, meta.json says"):
        open_data(d)


def test_a_file_changed_within_the_settle_time_is_hashed_again(tmp_path, monkeypatch):
    """A shard written moments before it is hashed could still change within the same tick of its
    times: it is not recorded, so the next open hashes it again."""
    d = _small_data(tmp_path)
    calls = _count_hashes(monkeypatch)
    open_data(d)
    open_data(d)
    assert len(calls) == 2 * len(list(d.glob("*.bin")))


def test_an_unwritable_cache_only_means_hashing_every_time(tmp_path, monkeypatch):
    from critbatch.data import verify

    d = _small_data(tmp_path)
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("CRITBATCH_CACHE", str(tmp_path / "afile" / "cache"))  # cannot be created
    monkeypatch.setattr(verify, "SETTLE_NS", 0)
    calls = _count_hashes(monkeypatch)
    open_data(d)
    open_data(d)
    assert len(calls) == 2 * len(list(d.glob("*.bin")))


# ---- meta.json is checked whole; ids beyond the vocabulary never reach a model ------------------------

def _rewrite(d, mutate):
    meta = json.loads((d / "meta.json").read_text())
    mutate(meta)
    (d / "meta.json").write_text(json.dumps(meta))


def _poke(d, name: str, pos: int, value: int):
    """Write one token id into a shard and record the shard's new sha256 (as if prepared so)."""
    import hashlib

    a = np.fromfile(d / name, dtype=np.uint16)
    a[pos] = value
    a.tofile(d / name)
    digest = hashlib.sha256((d / name).read_bytes()).hexdigest()
    _rewrite(d, lambda m: [sh.update(sha256=digest) for s in m["splits"].values() for sh in s["shards"]
                           if sh["file"] == name])


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    d = _small_data(tmp_path)
    _poke(d, "train_000.bin", 5, 300)
    # meta.json from before max_id was recorded: read while hashing
    _rewrite(d, lambda m: [s.pop("max_id") for s in m["splits"].values()])
    with pytest.raises(DataError, match="its train split holds token id 300, outside its vocab_size 257"):
        open_data(d)
    # not verified: caught where the sequences are read, before a model sees them
    data = open_data(d, verify=False)
    assert data.max_ids == {"train": None, "val": None}
    stream = SequenceStream(data, 16)
    with pytest.raises(DataError, match="holds token id 300"):
        stream.batch(0, stream.n_seqs)
    # recorded: checked against the vocabulary without reading
    _rewrite(d, lambda m: m["splits"]["train"].update(max_id=300))
    with pytest.raises(DataError, match="split 'train' holds token id 300 but vocab_size is 257"):
        open_data(d, verify=False)
    # a recorded largest id that the shards contradict
    _poke(d, "train_000.bin", 5, 100)
    _rewrite(d, lambda m: m["splits"]["train"].update(max_id=200))
    with pytest.raises(DataError, match="says the largest token id of its train split is 200 but its shards hold 256"):
        open_data(d)


@pytest.mark.parametrize("mutate,needle", [
    (lambda m: m.update(vocab_size="257"), "vocab_size '257' is not a positive integer"),
    (lambda m: m.pop("splits"), "it has no 'splits'"),
    (lambda m: m["splits"].pop("val"), "splits must hold 'train' and 'val'"),
    (lambda m: m["splits"]["train"].update(tokens=2 * m["splits"]["train"]["tokens"]), "its shards hold"),
    (lambda m: m["tokenizer"].update(eot_id=999), "eot_id 999 is not a token id below the vocab_size 257"),
    (lambda m: m.update(dtype="int16"), "dtype 'int16' is not one of uint16, uint32"),
    (lambda m: m["splits"]["val"]["shards"][0].update(file="../train_000.bin"), "is not a file name"),
    (lambda m: m["splits"]["val"]["shards"].append(m["splits"]["train"]["shards"][0]), "listed twice"),
    (lambda m: m["splits"]["val"]["shards"][0].update(sha256="abc"), "is not 64 hex digits"),
    (lambda m: m["splits"]["val"]["shards"][0].update(tokens=-1), "is not a count"),
    (lambda m: m.update(vocab_size=True), "vocab_size True"),
])
def test_meta_json_is_checked_against_its_schema(tmp_path, mutate, needle):
    d = _small_data(tmp_path)
    _rewrite(d, mutate)
    with pytest.raises(DataError, match=re.escape(needle)):
        open_data(d, verify=False)
