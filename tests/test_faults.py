"""The fault suite: bad input to every command is one line on stderr, exit status 2, no traceback,
and the directory tree exactly as it was (checksums before and after). Plus silently-wrong-number
cases and a sweep killed at random moments that resumes to bit-identical results."""

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from critbatch.cli import main

WORDS = "the cat sat on the mat while a dog ran in the park and birds sang above the trees".split()


@pytest.fixture(scope="module")
def base_ws(tmp_path_factory):
    """A workspace: a small corpus, its data directory, a finished run with kept checkpoints and a sweep."""
    ws = tmp_path_factory.mktemp("faults") / "ws"
    ws.mkdir()
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, 400)) for _ in range(120)]
    (ws / "corpus.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    assert main(["prepare", "--out", str(ws / "data"), str(ws / "corpus.jsonl")]) == 0
    (ws / "model.json").write_text(json.dumps({"model": {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 16},
                                               "batch_seqs": 4, "eval_seqs": 32, "eval_interval_tokens": 1024}))
    assert main(["train", "--config", str(ws / "model.json"), "--data", str(ws / "data"), "--out", str(ws / "run"),
                 "--total-tokens", "4096", "--checkpoint-tokens", "1024,2048", "--no-progress"]) == 0
    assert main(["branch", "--run", str(ws / "run"), "--at", "1024", "--k", "1,2", "--window-tokens", "512",
                 "--launcher", "inprocess", "--no-progress"]) == 0
    return ws


def tree(root: Path) -> dict:
    """path -> sha256 (or 'dir') of everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
    return out


def sweep_dir(ws: Path) -> Path:
    return next((ws / "run" / "sweeps").iterdir())


def kept(ws: Path, tokens: int) -> Path:
    return next(p for p in (ws / "run" / "ckpt").iterdir() if p.name == f"tok_{tokens:012d}")


# ---- set-ups that damage a copy of the workspace ---------------------------------------------

def bad_text(ws):
    (ws / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf-8 \xc3\x28")


def bad_gz(ws):
    (ws / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "hello"}\n')[:-8] + b"garbage!")


def bad_xz(ws):
    (ws / "bad.jsonl.xz").write_bytes(b"\xfd7zXZ\x00\x00 this is not xz")


def bad_jsonl(ws):
    (ws / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')


def empty_bin(ws):
    (ws / "empty.bin").write_bytes(b"")


def npy_as_bin(ws):
    np.save(ws / "x.npy", np.arange(100, dtype=np.uint16))
    (ws / "x.bin").write_bytes((ws / "x.npy").read_bytes())


def neg_npy(ws):
    np.save(ws / "neg.npy", np.array([1, -5, 3] * 50, dtype=np.int64))


def big_ids(ws):
    np.arange(1000, dtype=np.uint16).tofile(ws / "ids.bin")


def list_config(ws):
    (ws / "list.json").write_text("[1, 2, 3]")


def bad_json_config(ws):
    (ws / "bad.json").write_text('{"batch_seqs": 4,')


def bad_toml(ws):
    (ws / "bad.toml").write_text("batch_seqs = = 4\n")


def unknown_key(ws):
    (ws / "unk.json").write_text('{"batch_size": 4}')


def binary_config(ws):
    (ws / "bin.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")


def bad_sched_file(ws):
    (ws / "sched.json").write_text("{\"phases\": [")


def corrupt_meta(ws):
    (ws / "data" / "meta.json").write_text("{ oops")


def corrupt_shard(ws):
    p = ws / "data" / "train_000.bin"
    b = bytearray(p.read_bytes())
    b[100] ^= 0xFF
    p.write_bytes(bytes(b))


def _run_reads_copied_data(ws):
    """Point the copied run at the copied data (its config names the original)."""
    cfg = json.loads((ws / "run" / "config.json").read_text())
    cfg["data"]["path"] = str(ws / "data")
    (ws / "run" / "config.json").write_text(json.dumps(cfg))


def run_on_corrupt_shard(ws):
    """The copied run reads the copied data, one of whose shards is damaged."""
    _run_reads_copied_data(ws)
    corrupt_shard(ws)


def corrupt_result(ws):
    (ws / "run" / "result.json").write_text("{ half a result")


def empty_result(ws):
    (ws / "run" / "result.json").write_text("")


def corrupt_run_config(ws):
    (ws / "run" / "config.json").write_text("not json at all")


def incomplete_run(ws):
    (ws / "run" / "result.json").unlink()


def corrupt_cbs(ws):
    (sweep_dir(ws) / "cbs.json").write_text('{"points": [')


def empty_cbs(ws):
    (sweep_dir(ws) / "cbs.json").write_text("")


def flipped_weight(ws):
    """One byte inside model.pt's tensor data: a weight changes, the file still loads."""
    p = kept(ws, 1024) / "model.pt"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x40
    p.write_bytes(bytes(b))


def out_file(ws):
    (ws / "occupied").write_text("a file where a directory belongs")


def out_dir(ws):
    (ws / "adir").mkdir()


def other_demo(ws):
    (ws / "demo-other").mkdir()
    (ws / "demo-other" / "demo.json").write_text(json.dumps({"config": {"total_tokens": 5}, "stages": {}}))


def paused_run_bad_metrics(ws):
    """A run paused with a resume checkpoint, then its metrics.jsonl damaged in the middle."""
    assert main(["train", "--config", str(ws / "model.json"), "--data", str(ws / "data"), "--out", str(ws / "paused"),
                 "--total-tokens", "4096", "--stop-after-tokens", "1024", "--no-progress"]) == 0
    m = ws / "paused" / "metrics.jsonl"
    lines = m.read_text().splitlines()
    lines[2] = "{ broken"
    m.write_text("\n".join(lines) + "\n")


def edit_meta(ws, mutate):
    meta = json.loads((ws / "data" / "meta.json").read_text())
    mutate(meta)
    (ws / "data" / "meta.json").write_text(json.dumps(meta))


def poke_id(ws, name: str, value: int, keep_max_id: bool):
    """A token id written into a shard whose sha256 meta.json then records (as a tool that wrote it would):
    only the id check can catch it. Without max_id, meta.json is from before it was recorded."""
    p = ws / "data" / name
    a = np.fromfile(p, dtype=np.uint16)
    a[50] = value
    a.tofile(p)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()

    def mutate(m):
        for split in m["splits"].values():
            split["shards"] = [{**sh, "sha256": digest} if sh["file"] == name else sh for sh in split["shards"]]
            if not keep_max_id:
                split.pop("max_id")
    edit_meta(ws, mutate)


def train_id_beyond_vocab(ws):
    poke_id(ws, "train_000.bin", 300, keep_max_id=False)


def val_id_beyond_vocab(ws):
    poke_id(ws, "val_000.bin", 1000, keep_max_id=True)


def meta_vocab_below_ids(ws):
    edit_meta(ws, lambda m: m.update(vocab_size=200))


def meta_no_splits(ws):
    edit_meta(ws, lambda m: m.pop("splits"))


def meta_no_val(ws):
    edit_meta(ws, lambda m: m["splits"].pop("val"))


def meta_vocab_string(ws):
    edit_meta(ws, lambda m: m.update(vocab_size=str(m["vocab_size"])))


def meta_doubled_count(ws):
    edit_meta(ws, lambda m: m["splits"]["train"].update(tokens=2 * m["splits"]["train"]["tokens"]))


def meta_eot_999(ws):
    edit_meta(ws, lambda m: m["tokenizer"].update(eot_id=999))


def meta_dtype(ws):
    edit_meta(ws, lambda m: m.update(dtype="float32"))


def meta_shard_path(ws):
    edit_meta(ws, lambda m: m["splits"]["val"]["shards"][0].update(file="/etc/passwd"))


def meta_val_is_train(ws):
    edit_meta(ws, lambda m: m["splits"]["val"].update(shards=m["splits"]["train"]["shards"],
                                                      tokens=m["splits"]["train"]["tokens"]))


def meta_list(ws):
    (ws / "data" / "meta.json").write_text("[1, 2]")


def truncated_shard(ws):
    p = ws / "data" / "val_000.bin"
    p.write_bytes(p.read_bytes()[:-2])


def run_on_bad_meta(ws):
    """The copied run reads the copied data, whose meta.json has vocab_size "257"."""
    _run_reads_copied_data(ws)
    meta_vocab_string(ws)


def uint32_bin(ws):
    ((np.arange(1000) * 37) % 5000).astype(np.uint32).tofile(ws / "t32.bin")


def csv_file(ws):
    (ws / "table.csv").write_text("id,text\n1,hello\n")


def nothing(ws):
    pass


# ---- the table ---------------------------------------------------------------------------------
# (id, set-up, arguments ({ws}: the workspace), text the one-line error must contain)

R = ["--config", "{ws}/model.json", "--data", "{ws}/data", "--no-progress"]
B = ["branch", "--run", "{ws}/run", "--at", "1024", "--k", "1,2", "--window-tokens", "512", "--launcher", "inprocess",
     "--no-progress"]
CMP = ["compare", "--config", "{ws}/model.json", "--data", "{ws}/data", "--out", "{ws}/cmp", "--schedule", "0:4,1024:8",
       "--total-tokens", "2048", "--launcher", "inprocess", "--no-progress"]
S = ["schedule", "--sweep", "{sweep}", "--out", "{ws}/s.json"]

CASES = [
    # prepare
    ("prepare-missing-input", nothing, ["prepare", "--out", "{ws}/d", "{ws}/nope.txt"], "does not exist"),
    ("prepare-undecodable-text", bad_text, ["prepare", "--out", "{ws}/d", "{ws}/bad.txt"], "cannot be read"),
    ("prepare-corrupt-gzip", bad_gz, ["prepare", "--out", "{ws}/d", "{ws}/bad.jsonl.gz"], "cannot be read"),
    ("prepare-corrupt-xz", bad_xz, ["prepare", "--out", "{ws}/d", "{ws}/bad.jsonl.xz"], "cannot be read"),
    ("prepare-bad-jsonl", bad_jsonl, ["prepare", "--out", "{ws}/d", "{ws}/bad.jsonl"], "is not valid JSON"),
    ("prepare-no-text-field", nothing, ["prepare", "--out", "{ws}/d", "{ws}/corpus.jsonl", "--text-field", "body"],
     "has no 'body' field"),
    ("prepare-empty-bin", empty_bin, ["prepare", "--out", "{ws}/d", "{ws}/empty.bin"], "is empty"),
    ("prepare-npy-as-bin", npy_as_bin, ["prepare", "--out", "{ws}/d", "{ws}/x.bin"], "npy header"),
    ("prepare-negative-ids", neg_npy, ["prepare", "--out", "{ws}/d", "{ws}/neg.npy"], "is negative"),
    ("prepare-ids-beyond-vocab", big_ids, ["prepare", "--out", "{ws}/d", "{ws}/ids.bin", "--vocab-size", "500"],
     "outside the vocabulary size 500"),
    ("prepare-uint16-big-vocab", big_ids, ["prepare", "--out", "{ws}/d", "{ws}/ids.bin", "--vocab-size", "70000"],
     "uint16 tokens but the vocabulary"),
    ("prepare-holdout", nothing, ["prepare", "--out", "{ws}/d", "--holdout-fraction", "0.7"], "holdout fraction 0.7"),
    ("prepare-vocab-zero", nothing, ["prepare", "--out", "{ws}/d", "{ws}/ids.bin", "--vocab-size", "0"],
     "vocab size 0"),
    ("prepare-no-tokenizer", nothing, ["prepare", "--out", "{ws}/d", "{ws}/corpus.jsonl", "--tokenizer", "{ws}/t.json"],
     "not bytes, bpe, or an existing"),
    ("prepare-dtype", nothing, ["prepare", "--out", "{ws}/d", "--dtype", "int8"], "invalid choice: 'int8'"),
    ("prepare-unknown-type", nothing, ["prepare", "--out", "{ws}/d", "{ws}/model.json"], "unknown type"),
    ("prepare-out-is-file", out_file, ["prepare", "--out", "{ws}/occupied"], "is a file"),
    ("prepare-out-not-empty", nothing, ["prepare", "--out", "{ws}/run"], "not an empty data directory"),
    ("prepare-out-unwritable", nothing, ["prepare", "--out", "/proc/critbatch/d"], "cannot be created"),
    ("prepare-unknown-corpus", nothing, ["prepare", "--out", "{ws}/d", "--corpus", "wiki"], "unknown corpus 'wiki'"),
    ("prepare-uint32-as-uint16", uint32_bin, ["prepare", "--out", "{ws}/d", "{ws}/t32.bin"], "pass --dtype uint32"),
    ("prepare-val-missing", nothing, ["prepare", "--out", "{ws}/d", "{ws}/corpus.jsonl", "--val", "{ws}/v.jsonl"],
     "does not exist"),
    ("prepare-val-other-kind", big_ids, ["prepare", "--out", "{ws}/d", "{ws}/corpus.jsonl", "--val", "{ws}/ids.bin"],
     "is token files but the inputs are text"),
    ("prepare-val-is-input", nothing, ["prepare", "--out", "{ws}/d", "{ws}/corpus.jsonl", "--val", "{ws}/corpus.jsonl"],
     "is also an input"),
    ("prepare-csv", csv_file, ["prepare", "--out", "{ws}/d", "{ws}/table.csv"], "pass --text"),
    # train
    ("train-unknown-preset", nothing, ["train", "--preset", "gigantic", "--out", "{ws}/r"], "unknown preset"),
    ("train-nothing-to-resume", nothing, ["train", "--out", "{ws}/r"], "give --preset NAME or --config FILE"),
    ("train-config-missing", nothing, ["train", "--config", "{ws}/none.json", "--out", "{ws}/r"], "does not exist"),
    ("train-config-bad-json", bad_json_config, ["train", "--config", "{ws}/bad.json", "--out", "{ws}/r"],
     "is not valid JSON"),
    ("train-config-list", list_config, ["train", "--config", "{ws}/list.json", "--out", "{ws}/r"], "must be a mapping"),
    ("train-config-bad-toml", bad_toml, ["train", "--config", "{ws}/bad.toml", "--out", "{ws}/r"], "not valid TOML"),
    ("train-config-binary", binary_config, ["train", "--config", "{ws}/bin.json", "--out", "{ws}/r"], "not valid JSON"),
    ("train-config-unknown-key", unknown_key, ["train", "--config", "{ws}/unk.json", "--out", "{ws}/r"],
     "unknown config key 'batch_size'"),
    ("train-total-negative", nothing, ["train", *R, "--out", "{ws}/r", "--total-tokens", "-5"], "is negative"),
    ("train-total-text", nothing, ["train", *R, "--out", "{ws}/r", "--total-tokens", "lots"], "is not a count"),
    ("train-batch-zero", nothing, ["train", *R, "--out", "{ws}/r", "--batch-seqs", "0"], "batch_seqs=0"),
    ("train-micro-not-dividing", nothing, ["train", *R, "--out", "{ws}/r", "--micro-batch-seqs", "3"], "not divisible"),
    ("train-lr-negative", nothing, ["train", *R, "--out", "{ws}/r", "--lr", "-1"], "learning rate -1.0"),
    ("train-lr-rule", nothing, ["train", *R, "--out", "{ws}/r", "--lr-rule", "cube"], "invalid choice: 'cube'"),
    ("train-schedule-entry", nothing, ["train", *R, "--out", "{ws}/r", "--batch-schedule", "0:4,100:x"], "is not a count"),
    ("train-schedule-file", bad_sched_file, ["train", *R, "--out", "{ws}/r", "--batch-schedule", "{ws}/sched.json"],
     "not valid JSON"),
    ("train-schedule-decreasing", nothing, ["train", *R, "--out", "{ws}/r", "--batch-schedule", "100:4,0:8"],
     "must start at 0"),
    ("train-checkpoint-beyond-end", nothing, ["train", *R, "--out", "{ws}/r", "--total-tokens", "2048",
                                               "--checkpoint-tokens", "5000"], "beyond the run's end"),
    ("train-eval-too-many", nothing, ["train", *R, "--out", "{ws}/r", "--eval-seqs", "1000000"], "eval_seqs=1000000"),
    ("train-data-missing", nothing, ["train", "--config", "{ws}/model.json", "--data", "{ws}/none", "--out", "{ws}/r"],
     "does not exist"),
    ("train-data-corrupt-meta", corrupt_meta, ["train", *R, "--out", "{ws}/r"], "meta.json is corrupt"),
    ("train-data-corrupt-shard", corrupt_shard, ["train", *R, "--out", "{ws}/r"], "does not match meta.json"),
    ("train-data-truncated-shard", truncated_shard, ["train", *R, "--out", "{ws}/r"], "meta.json says"),
    ("train-data-id-beyond-vocab", train_id_beyond_vocab, ["train", *R, "--out", "{ws}/r"],
     "train split holds token id 300, outside its vocab_size 257"),
    ("train-data-val-id-beyond-vocab", val_id_beyond_vocab, ["train", *R, "--out", "{ws}/r"],
     "val split holds token id 1000"),
    ("train-data-vocab-below-ids", meta_vocab_below_ids, ["train", *R, "--out", "{ws}/r"],
     "holds token id 256 but vocab_size is 200"),
    ("train-data-no-splits", meta_no_splits, ["train", *R, "--out", "{ws}/r"], "it has no 'splits'"),
    ("train-data-no-val", meta_no_val, ["train", *R, "--out", "{ws}/r"], "splits must hold 'train' and 'val'"),
    ("train-data-vocab-string", meta_vocab_string, ["train", *R, "--out", "{ws}/r"],
     "vocab_size '257' is not a positive integer"),
    ("train-data-doubled-count", meta_doubled_count, ["train", *R, "--out", "{ws}/r"], "tokens but its shards hold"),
    ("train-data-eot-999", meta_eot_999, ["train", *R, "--out", "{ws}/r"], "eot_id 999 is not a token id"),
    ("train-data-dtype", meta_dtype, ["train", *R, "--out", "{ws}/r"], "dtype 'float32' is not one of"),
    ("train-data-shard-path", meta_shard_path, ["train", *R, "--out", "{ws}/r"], "'/etc/passwd' of split 'val' is not"),
    ("train-data-val-is-train", meta_val_is_train, ["train", *R, "--out", "{ws}/r"], "is listed twice"),
    ("train-data-meta-list", meta_list, ["train", *R, "--out", "{ws}/r"], "holds a list, not an object"),
    ("train-out-is-file", out_file, ["train", *R, "--out", "{ws}/occupied"], "is a file"),
    ("train-out-unwritable", nothing, ["train", *R, "--out", "/proc/critbatch/r"], "cannot be created"),
    ("train-other-config", nothing, ["train", *R, "--out", "{ws}/run", "--lr", "0.5"], "different config"),
    ("train-corrupt-result", corrupt_result, ["train", "--out", "{ws}/run", "--no-progress"], "result.json is corrupt"),
    ("train-corrupt-run-config", corrupt_run_config, ["train", "--out", "{ws}/run"], "config.json is corrupt"),
    ("train-bad-metrics-resume", paused_run_bad_metrics, ["train", "--out", "{ws}/paused", "--no-progress"],
     "metrics.jsonl is corrupt"),
    ("train-init-missing", nothing, ["train", *R, "--out", "{ws}/r", "--init-from", "{ws}/nockpt"], "not a complete"),
    ("train-init-flipped", flipped_weight, ["train", *R, "--out", "{ws}/r", "--init-from", "{kept1024}"],
     "checksum"),
    ("train-device", nothing, ["train", *R, "--out", "{ws}/r", "--device", "cuda"], "CUDA is not available"),
    ("train-model-shape", nothing, ["train", *R, "--out", "{ws}/r", "--model.d-model", "big"], "is not a count"),
    ("train-hub-id", nothing, ["train", *R, "--out", "{ws}/r", "--model.family", "hf", "--model.hf", "org/model"],
     "never downloads"),
    # branch
    ("branch-no-run", nothing, ["branch", "--run", "{ws}/none", "--at", "1024", "--window-tokens", "512"], "no config.json"),
    ("branch-incomplete-run", incomplete_run, B, "incomplete"),
    ("branch-corrupt-result", corrupt_result, B, "is corrupt"),
    ("branch-unknown-point", nothing, [*B[:3], "--at", "999", *B[5:]], "no kept checkpoint at 999"),
    ("branch-k-zero", nothing, [*B[:5], "--k", "0,1", *B[7:]], "every k must be > 0"),
    ("branch-window-short", nothing, [*B[:7], "--window-tokens", "10", *B[9:]], "shorter than one step"),
    ("branch-eps", nothing, [*B, "--eps", "-1"], "eps=-1"),
    ("branch-noninf-one", nothing, [*B, "--rule", "noninf"], "--replicates 2"),
    ("branch-ttest", nothing, [*B, "--rule", "ttest"], "invalid choice: 'ttest'"),
    ("branch-replicates", nothing, [*B, "--replicates", "0"], "replicates=0"),
    ("branch-cooldown", nothing, [*B, "--cooldown-fraction", "2"], "cooldown_fraction=2"),
    ("branch-micro", nothing, [*B, "--micro-batch-seqs", "3"], "micro-batch 3"),
    ("branch-ema-too-short", nothing, [*B[:5], "--k", "1,4", *B[7:], "--decide-by", "train-ema"], "at least 8"),
    ("branch-jobs", nothing, [*B, "--jobs", "0"], "jobs=0"),
    ("branch-slurm", nothing, [*B[:-3], "--launcher", "slurm", "--no-progress"], "sbatch"),
    ("branch-corrupt-shard", run_on_corrupt_shard, [*B[:5], "--k", "1,4", *B[7:]], "does not match meta.json"),
    ("branch-bad-meta", run_on_bad_meta, [*B[:5], "--k", "1,4", *B[7:]], "vocab_size '257' is not"),
    # gns
    ("gns-confidence", nothing, ["gns", "--run", "{ws}/run", "--confidence", "2"], "confidence=2"),
    ("gns-b-big", nothing, ["gns", "--run", "{ws}/run", "--b-big", "1"], "b_big"),
    ("gns-batches", nothing, ["gns", "--run", "{ws}/run", "--batches", "0"], "n_batches=0"),
    ("gns-unknown-point", nothing, ["gns", "--run", "{ws}/run", "--at", "7"], "no kept checkpoint at 7"),
    ("gns-no-run", nothing, ["gns", "--run", "{ws}/none"], "no config.json"),
    ("gns-bad-meta", run_on_bad_meta, ["gns", "--run", "{ws}/run", "--batches", "2"], "vocab_size '257' is not"),
    # schedule
    ("schedule-no-sweep", nothing, ["schedule", "--sweep", "{ws}", "--out", "{ws}/s.json"], "no cbs.json"),
    ("schedule-corrupt-cbs", corrupt_cbs, S, "cbs.json is corrupt"),
    ("schedule-empty-cbs", empty_cbs, S, "cbs.json is corrupt"),
    ("schedule-out-dir", out_dir, [*S[:3], "--out", "{ws}/adir"], "is a directory"),
    ("schedule-out-unwritable", nothing, [*S[:3], "--out", "/proc/critbatch/s.json"], "cannot be written"),
    ("schedule-safety", nothing, [*S, "--safety", "0"], "safety 0"),
    ("schedule-start", nothing, [*S, "--start-seqs", "0"], "start batch 0"),
    ("schedule-granularity", nothing, [*S, "--granularity", "3"], "granularity 3"),
    ("schedule-target", nothing, [*S, "--target-seq-len", "1000"], "1000-token sequences"),
    # compare
    ("compare-zero-tokens", nothing, [*CMP, "--total-tokens", "0"], "total tokens 0"),
    ("compare-jobs", nothing, [*CMP, "--jobs", "0"], "jobs=0"),
    ("compare-decreasing", nothing, [*CMP[:8], "0:8,1024:4", *CMP[9:]], "is not a warmup"),
    ("compare-one-phase", nothing, [*CMP[:8], "0:4", *CMP[9:]], "no batch change"),
    ("compare-schedule-file", nothing, [*CMP[:8], "{ws}/none.json", *CMP[9:]], "does not exist"),
    ("compare-anneal", nothing, [*CMP, "--anneal-tokens", "-64"], "is negative"),
    ("compare-out-file", out_file, [*CMP[:5], "--out", "{ws}/occupied", *CMP[7:]], "is a file"),
    ("compare-needs-config", nothing, ["compare", "--out", "{ws}/c", "--schedule", "0:4,1024:8"], "give --preset"),
    # report
    ("report-nothing", nothing, ["report", "{ws}/none"], "neither a demo directory"),
    ("report-corrupt-config", corrupt_run_config, ["report", "{ws}/run"], "config.json is corrupt"),
    ("report-corrupt-cbs", corrupt_cbs, ["report", "{ws}/run"], "cbs.json is corrupt"),
    ("report-corrupt-result", corrupt_result, ["report", "{ws}/run"], "result.json is corrupt"),
    # demo
    ("demo-jobs", nothing, ["demo", "--out", "{ws}/demo", "--jobs", "0"], "jobs=0"),
    ("demo-window", nothing, ["demo", "--out", "{ws}/demo", "--window-tokens", "100"], "window_tokens=100"),
    ("demo-points", nothing, ["demo", "--out", "{ws}/demo", "--points", "2M"], "must lie inside the run"),
    ("demo-out-file", out_file, ["demo", "--out", "{ws}/occupied"], "is a file"),
    ("demo-other-config", other_demo, ["demo", "--out", "{ws}/demo-other"], "different configuration"),
    ("demo-seeds", nothing, ["demo", "--out", "{ws}/demo", "--cooldown-fraction", "-1"], "cooldown_fraction=-1"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(base_ws, tmp_path, capsys, case):
    name, setup, args, needle = case
    ws = tmp_path / "ws"
    shutil.copytree(base_ws, ws, symlinks=True)
    setup(ws)
    before = tree(ws)
    fill = {"ws": str(ws), "sweep": str(sweep_dir(ws)) if (ws / "run" / "sweeps").is_dir() else "",
            "kept1024": str(kept(ws, 1024)) if (ws / "run" / "ckpt").is_dir() else ""}
    capsys.readouterr()
    code = main([a.format(**fill) for a in args])
    out, err = capsys.readouterr()
    assert code == 2, (name, code, err)
    assert err.count("\n") == 1 and err.startswith("critbatch: error: ") and "Traceback" not in err, err
    assert needle in err, (needle, err)
    assert tree(ws) == before, name  # nothing written, nothing removed


def test_the_suite_is_large_enough():
    assert len(CASES) >= 60 and len({c[0].split("-")[0] for c in CASES}) == 8  # every command


@pytest.mark.slow
def test_sweep_killed_at_random_moments_resumes_bit_identical(base_ws, tmp_path):
    """SIGKILL a sweep (and its branch worker) at four random moments while it trains, run it again each
    time, and finish: every branch's per-sequence held-out losses and the decided curve are bit-identical
    to an uninterrupted sweep's (trained in process: launchers never change a number)."""
    import random
    import signal
    import subprocess
    import sys
    import time

    exe = str(Path(sys.executable).parent / "critbatch")
    runs = {}
    for name in ("ref", "killed"):
        runs[name] = tmp_path / name
        shutil.copytree(base_ws / "run", runs[name] / "run", symlinks=True)
        shutil.rmtree(runs[name] / "run" / "sweeps")
        shutil.rmtree(runs[name] / "run" / "branches")
    args = ["branch", "--at", "1024,2048", "--k", "0.5,1,2", "--window-tokens", "1024", "--no-progress", "--jobs", "1"]
    assert main([*args, "--run", str(runs["ref"] / "run"), "--launcher", "inprocess"]) == 0
    branches = runs["killed"] / "run" / "branches"

    def steps_trained() -> int:
        return sum(f.read_text().count('"train/loss"') for f in branches.glob("*/metrics.jsonl"))

    rng = random.Random(13)
    done = []
    for _ in range(4):
        before = steps_trained()
        p = subprocess.Popen([exe, *args, "--run", str(runs["killed"] / "run")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        t0 = time.time()
        # a random number of this attempt's steps, not a random delay: the sweep's 112 steps take under
        # a second, so a delay after the first step could let the whole sweep finish before the kill
        at = before + rng.randint(3, 25)
        while p.poll() is None and steps_trained() < at and time.time() - t0 < 120:
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        p.wait()
        time.sleep(0.3)  # the worker dies with its parent (PR_SET_PDEATHSIG)
        done.append(len(list(branches.glob("*/result.json"))))
    assert sum(n < 6 for n in done) >= 3, f"fewer than three kills landed inside the sweep (branches done: {done})"
    r = subprocess.run([exe, *args, "--run", str(runs["killed"] / "run")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    def outputs(run: Path) -> tuple[dict, dict]:
        curve = json.loads(next((run / "sweeps").iterdir()).joinpath("cbs.json").read_text())
        losses = {str(f.relative_to(run)): hashlib.sha256(f.read_bytes()).hexdigest()
                  for f in sorted((run / "branches").glob("*/eval_seq_losses.npy"))}
        return {(p["tokens"]): (p["losses"], p["status"]) for p in curve["points"]}, losses

    a, b = outputs(runs["ref"] / "run"), outputs(runs["killed"] / "run")
    assert len(a[1]) == 6 and a == b


def test_disk_full_mid_checkpoint_is_one_line_and_resumes(base_ws, tmp_path, capsys, monkeypatch):
    """ENOSPC while a checkpoint is written: one line saying the run can be resumed, no torn
    checkpoint, and the same command later finishes exactly like an uninterrupted run."""
    import errno

    import torch

    from critbatch.train import checkpoint

    args = ["train", "--config", str(base_ws / "model.json"), "--data", str(base_ws / "data"), "--total-tokens", "4096",
            "--checkpoint-tokens", "1024,2048", "--save-interval-tokens", "1024", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 5:  # inside the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "cut")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk is full" in err and "run the same command again to resume" in err, err
    assert not list((tmp_path / "cut" / "ckpt").glob(".*")), "a torn temporary checkpoint was left behind"
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert main([*args, "--out", str(tmp_path / "cut")]) == 0
    a, b = (json.loads((tmp_path / r / "result.json").read_text()) for r in ("ref", "cut"))
    assert a["final_eval_loss"] == b["final_eval_loss"] and a["final_train_loss"] == b["final_train_loss"]


def test_counts_parse_alike_everywhere(base_ws, tmp_path):
    """``64k`` is a count for gns as for every other command (it was refused there)."""
    from critbatch.cli import make_parser

    ns = make_parser().parse_args(["gns", "--run", str(base_ws / "run"), "--b-big", "64k", "--b-small", "1k"])
    assert (ns.cfg__b_big, ns.cfg__b_small) == (64_000, 1_000)
