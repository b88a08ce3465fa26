"""Token files, tokenizers and text sources people already have: read as they are, as memory maps,
or refused with one line when they are not what they claim."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from critbatch.cli import main
from critbatch.data import open_data, prepare
from critbatch.data.sources import LLMC_MAGIC
from critbatch.errors import ConfigError, DataError


def stored(d: Path) -> np.ndarray:
    """Every token of a prepared directory, train then held-out."""
    data = open_data(d)
    return np.concatenate([np.asarray(a) for split in ("train", "val") for a in data.shards(split)])


def llmc(path: Path, tokens: np.ndarray, version: int) -> Path:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (LLMC_MAGIC, version, tokens.size)
    path.write_bytes(header.tobytes() + tokens.astype("<u2" if version == 1 else "<u4").tobytes())
    return path


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_nanogpt_bin_as_uint16_and_uint32(tmp_path, dtype):
    toks = np.arange(50_000, dtype=np.int64) % (60_000 if dtype == "uint16" else 70_000)
    f = tmp_path / "t.bin"
    toks.astype(dtype).tofile(f)
    d = prepare(tmp_path / "d", [f], dtype=dtype, vocab_size=70_000 if dtype == "uint32" else None, quiet=True)
    assert np.array_equal(stored(d), toks)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["dtype"] == ("uint16" if dtype == "uint16" else "uint32")
    assert meta["splits"]["val"]["tokens"] == 50_000 - int(50_000 * 0.95)  # the held-out tail


@pytest.mark.parametrize("version", [1, 2])
def test_llmc_shards_are_read_after_their_header(tmp_path, version):
    toks = (np.arange(10_000) * 7) % 50_257
    f = llmc(tmp_path / "fineweb_train_000001.bin", toks, version)
    d = prepare(tmp_path / "d", [f], quiet=True)
    assert np.array_equal(stored(d), toks)  # not the header's 256 int32 read as tokens


def test_token_files_that_are_not_what_they_claim_are_refused(tmp_path):
    toks = np.arange(1000, dtype=np.uint16)
    cut = llmc(tmp_path / "cut.bin", toks, 1)
    cut.write_bytes(cut.read_bytes()[:-10])  # truncated llm.c shard
    with pytest.raises(DataError, match="llm.c shard whose header says 1,000 tokens"):
        prepare(tmp_path / "a", [cut], quiet=True)
    npy_as_bin = tmp_path / "x.bin"
    np.save(tmp_path / "x.npy", toks)
    npy_as_bin.write_bytes((tmp_path / "x.npy").read_bytes())
    with pytest.raises(DataError, match="starts with an .npy header"):
        prepare(tmp_path / "b", [npy_as_bin], quiet=True)
    with pytest.raises(DataError, match="uint16 tokens but the vocabulary is 100,000"):
        toks.tofile(tmp_path / "u16.bin")
        prepare(tmp_path / "c", [tmp_path / "u16.bin"], vocab_size=100_000, quiet=True)
    np.save(tmp_path / "neg.npy", np.array([1, 2, -5, 3] * 10, dtype=np.int64))
    with pytest.raises(DataError, match="token id -5 is negative"):
        prepare(tmp_path / "e", [tmp_path / "neg.npy"], quiet=True)
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not a whole number of uint32 tokens"):
        prepare(tmp_path / "f", [tmp_path / "odd.bin"], dtype="uint32", quiet=True)
    assert not any((tmp_path / n).exists() for n in "abcef")


def test_npy_and_a_directory_of_shards_in_name_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    parts = [np.arange(i * 1000, (i + 1) * 1000, dtype=np.uint32) for i in range(3)]
    for i, p in reversed(list(enumerate(parts))):  # written out of order: read in name order
        np.save(shards / f"part-{i:05d}.npy", p)
    d = prepare(tmp_path / "d", [shards], quiet=True)
    assert np.array_equal(stored(d), np.concatenate(parts))


def _bpe_file(tmp_path: Path, eos: str = "</s>") -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat"] * 50, trainers.BpeTrainer(vocab_size=60,
                                                                                   special_tokens=["<unk>", eos]))
    f = tmp_path / "tokenizer.json"
    tok.save(str(f))
    return f


def test_an_existing_tokenizer_json_or_directory(tmp_path):
    from tokenizers import Tokenizer

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"the cat sat on the mat {i}"}) for i in range(40)))
    (tmp_path / "tok").mkdir()
    f = _bpe_file(tmp_path / "tok")
    d = prepare(tmp_path / "d", [docs], tokenizer=str(f), quiet=True)
    meta = json.loads((d / "meta.json").read_text())
    tok = Tokenizer.from_file(str(f))
    assert meta["vocab_size"] == tok.get_vocab_size() and meta["tokenizer"]["eot_token"] == "</s>"
    toks = stored(d)
    assert (toks == tok.token_to_id("</s>")).sum() == 40  # one end-of-text after every document
    assert (d / "tokenizer.json").is_file()
    # a directory whose tokenizer_config.json names its eos token
    (f.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}}))
    d2 = prepare(tmp_path / "d2", [docs], tokenizer=str(f.parent), quiet=True)
    assert json.loads((d2 / "meta.json").read_text())["tokenizer"]["eot_token"] == "<unk>"


def test_a_tokenizer_too_large_for_the_dtype_is_refused(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<|endoftext|>"] = 70_000
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(tmp_path / "big.json"))
    (tmp_path / "a.txt").write_text("w1 w2 w3")
    code = main(["prepare", "--out", str(tmp_path / "d"), str(tmp_path / "a.txt"), "--tokenizer",
                 str(tmp_path / "big.json"), "--dtype", "uint16"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "70,001 does not fit uint16" in err
    assert not (tmp_path / "d").exists()
    code = main(["prepare", "--out", str(tmp_path / "e"), str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "no.json")])
    assert code == 2 and "not bytes, bpe, or an existing tokenizer.json" in capsys.readouterr().err


def test_text_from_parquet_arrow_and_a_datasets_directory(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.ipc
    import pyarrow.parquet

    texts = [f"document number {i} " * 20 for i in range(30)]
    table = pa.table({"text": texts, "id": list(range(30))})
    pyarrow.parquet.write_table(table, tmp_path / "t.parquet")
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink, pyarrow.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    ds = tmp_path / "ds"  # what datasets' save_to_disk writes
    ds.mkdir()
    (ds / "data-00000-of-00001.arrow").write_bytes((tmp_path / "t.arrow").read_bytes())
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (ds / "dataset_info.json").write_text("{}")
    counts = []
    for src in (tmp_path / "t.parquet", tmp_path / "t.arrow", ds):
        d = prepare(tmp_path / f"d-{src.name}", [src], quiet=True)
        meta = json.loads((d / "meta.json").read_text())
        counts.append(meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"])
        assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == sum(len(t) + 1 for t in texts)
    assert counts == [30, 30, 30]
    with pytest.raises(DataError, match="has no 'body' column"):
        prepare(tmp_path / "x", [tmp_path / "t.parquet"], text_field="body", quiet=True)


# VmHWM is this process's own peak (ru_maxrss would include its parent's at fork)
HWM = "print([int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')][0])"
PEAK = """
import sys
from critbatch.data import prepare
prepare(sys.argv[1], [sys.argv[2]], dtype="uint32", vocab_size=1000, quiet=True)
""" + HWM

TRAIN_PEAK = """
import sys, torch
torch.set_num_threads(1)
from critbatch.config import merge
from critbatch import presets
from critbatch.train import Callback, train

def anon():  # heap and stacks: what loading data would grow (mapped file pages are page cache)
    return [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("RssAnon")][0]

class Peak(Callback):
    top = 0
    def on_step_end(self, trainer, rec):
        Peak.top = max(Peak.top, anon())
    on_train_start = on_finish = lambda self, trainer: setattr(Peak, "top", max(Peak.top, anon()))

cfg = merge(presets.get("tiny"), {"data": {"path": sys.argv[1], "verify": True}, "total_tokens": 8192,
            "eval_seqs": 8, "eval_interval_tokens": 0})
train(cfg, sys.argv[2], progress=False, callbacks=[Peak()])
print(Peak.top)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_token_files_size(tmp_path):
    """2M against 20M uint32 tokens (8 MB against 80 MB): the peak memory of prepare and the peak heap
    of a short training run stay flat (the larger file loaded whole would add 72 MB; the page cache a
    memory map touches is not the process's). bench/token_memory.py measures 20M against 200M."""
    peaks = {}
    for n in (2_000_000, 20_000_000):
        f = tmp_path / f"t{n}.bin"
        with open(f, "wb") as out:
            for i in range(0, n, 1 << 20):  # written in pieces: this process stays small too
                (np.arange(i, min(i + (1 << 20), n), dtype=np.uint32) % 1000).tofile(out)
        out = {}
        for name, code, args in (("prepare", PEAK, [str(tmp_path / f"d{n}"), str(f)]),
                                 ("train", TRAIN_PEAK, [str(tmp_path / f"d{n}"), str(tmp_path / f"r{n}")])):
            r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-2000:]
            out[name] = int(r.stdout.split()[-1]) / 1024  # MB (VmHWM is in kB)
        peaks[n] = out
    for name in ("prepare", "train"):
        assert peaks[20_000_000][name] - peaks[2_000_000][name] < 24, peaks  # MB; the file grew by 72 MB


def test_prepare_cli_takes_dtype_and_a_tokenizer_path(tmp_path, capsys):
    f = tmp_path / "t.bin"
    (np.arange(5000, dtype=np.uint32) % 3000).tofile(f)
    assert main(["prepare", "--out", str(tmp_path / "d"), str(f), "--dtype", "uint32"]) == 0
    assert "vocab_size=3000" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        prepare(tmp_path / "x", [f], dtype="int8", quiet=True)


def test_uint32_tokens_read_as_uint16_are_refused(tmp_path, capsys):
    """Without --dtype a headerless .bin is uint16: a uint32 file would be read with a 0 between every
    two ids and prepared without a word. Its zero high halves give it away."""
    toks = (np.arange(5000) * 7919) % 50_257
    toks.astype(np.uint32).tofile(tmp_path / "t32.bin")
    code = main(["prepare", "--out", str(tmp_path / "d"), str(tmp_path / "t32.bin")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "looks like uint32 tokens read as uint16" in err
    assert "pass --dtype uint32" in err and not (tmp_path / "d").exists()
    d = prepare(tmp_path / "ok", [tmp_path / "t32.bin"], dtype="uint32", quiet=True)
    assert np.array_equal(stored(d), toks)
    # a uint16 file whose every second id happens to be small is the user's to vouch for
    odd = np.where(np.arange(5000) % 2, 3, toks).astype(np.uint16)
    odd.tofile(tmp_path / "t16.bin")
    with pytest.raises(DataError, match="looks like uint32"):
        prepare(tmp_path / "x", [tmp_path / "t16.bin"], quiet=True)
    assert np.array_equal(stored(prepare(tmp_path / "y", [tmp_path / "t16.bin"], dtype="uint16", quiet=True)), odd)


@pytest.mark.parametrize("how", ["--val", "by-name", "llm.c-names", "directory"])
def test_a_held_out_token_file_is_never_trained_on(tmp_path, how):
    """nanoGPT's train.bin + val.bin (or --val FILE): the held-out split is exactly val.bin, the
    training split exactly train.bin (before, both were concatenated and val.bin trained on)."""
    train, val = np.arange(0, 20_000) % 30_000, np.arange(20_000, 22_000)
    names = {"llm.c-names": ("fineweb_train_000001.bin", "fineweb_val_000000.bin")}.get(how, ("train.bin", "val.bin"))
    src = tmp_path / "src"
    src.mkdir()
    train.astype(np.uint16).tofile(src / names[0])
    val.astype(np.uint16).tofile(src / names[1])
    inputs = [src] if how == "directory" else [src / names[0]] + ([] if how == "--val" else [src / names[1]])
    d = prepare(tmp_path / "d", inputs, val=[src / names[1]] if how == "--val" else None, quiet=True)
    data = open_data(d)
    assert np.array_equal(np.concatenate(data.shards("train")), train)
    assert np.array_equal(np.concatenate(data.shards("val")), val)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["vocab_size"] == 22_000 and meta["recipe"]["val"][0]["file"] == names[1]


def test_a_held_out_text_file(tmp_path, capsys):
    docs = [f"document {i} " + "words " * 30 for i in range(10)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    (tmp_path / "heldout.txt").write_text("the held-out text " * 20)
    code = main(["prepare", "--out", str(tmp_path / "d"), str(tmp_path / "train.jsonl"), "--val",
                 str(tmp_path / "heldout.txt"), "--tokenizer", "bpe", "--vocab-size", "300"])
    assert code == 0 and "(held out: heldout.txt)" in capsys.readouterr().err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["splits"]["train"]["docs"] == 10 and meta["splits"]["val"]["docs"] == 1
    from critbatch.data import load_tokenizer

    tok = load_tokenizer(tmp_path / "d")
    assert tok.decode(stored(tmp_path / "d")[meta["splits"]["train"]["tokens"]:][:-1]) == "the held-out text " * 20
    assert "held" not in tok._tok.get_vocab()  # the BPE never saw the held-out file
    for args, needle in (([str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "nope.txt")], "does not exist"),
                         ([str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "train.jsonl")], "is also an input")):
        assert main(["prepare", "--out", str(tmp_path / "e"), *args]) == 2
        assert needle in capsys.readouterr().err
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "v.bin")
    with pytest.raises(ConfigError, match="is token files but the inputs are text"):
        prepare(tmp_path / "f", [tmp_path / "train.jsonl"], val=[tmp_path / "v.bin"], quiet=True)


def test_plain_text_whatever_its_name(tmp_path, capsys):
    """.rst/.tex/... are text; anything else is refused with a hint, and --text reads every input as
    plain text, one document a file."""
    body = "Title\n=====\n\nSome text, with words.\n" * 50
    for name in ("a.rst", "b.tex", "c.markdown", "notes.log", "README"):
        (tmp_path / name).write_text(body)
    d = prepare(tmp_path / "d", [tmp_path / "a.rst", tmp_path / "b.tex", tmp_path / "c.markdown"], quiet=True)
    assert (stored(d) != 256).sum() == 3 * len(body)  # every byte; the end-of-text ids aside
    code = main(["prepare", "--out", str(tmp_path / "e"), str(tmp_path / "notes.log")])
    err = capsys.readouterr().err
    assert code == 2 and "has an unknown type" in err and "pass --text" in err
    assert main(["prepare", "--out", str(tmp_path / "e"), str(tmp_path / "notes.log"), str(tmp_path / "README"),
                 "--text"]) == 0
    meta = json.loads((tmp_path / "e" / "meta.json").read_text())
    assert meta["recipe"]["text"] is True and (stored(tmp_path / "e") != 256).sum() == 2 * len(body)
    (np.arange(100, dtype=np.uint16) + 0xFF00).tofile(tmp_path / "t.bin")
    with pytest.raises(DataError, match="cannot be read as .bin text"):  # --text: a .bin is text too
        prepare(tmp_path / "f", [tmp_path / "t.bin", tmp_path / "README"], as_text=True, quiet=True)
