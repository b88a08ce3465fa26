import json

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
