"""The README's commands, run as written (their quick forms), in a fresh directory."""

import glob
import os
import re
import shlex
from pathlib import Path

import pytest

from conftest import QUICK_DEMO_LINE

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(marker: str) -> list[str]:
    """Command lines of the fenced block that follows ``<!-- readme-test: marker -->``."""
    text = README.read_text()
    m = re.search(rf"<!-- readme-test: {marker} -->\s*```[a-z]*\n(.*?)```", text, re.S)
    assert m, f"README has no block marked {marker}"
    lines = []
    for line in m.group(1).splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head


def run_lines(lines, cwd):
    """Each line through the command line's entry point (critbatch.cli.main: what the console script
    calls; tests/test_cli.py runs the script itself), from ``cwd``, globs expanded as a shell would."""
    from critbatch.cli import main

    old_cwd, old_cache = os.getcwd(), os.environ.get("CRITBATCH_CACHE")
    os.chdir(cwd)
    os.environ["CRITBATCH_CACHE"] = str(cwd / "cache")
    try:
        for line in lines:
            args = []
            for a in shlex.split(line):  # expand globs as the shell would
                hits = sorted(glob.glob(a, root_dir=cwd)) if any(c in a for c in "*?[") else []
                args += hits or [a]
            assert args[0] == "critbatch", line
            assert main(args[1:]) == 0, line
    finally:
        os.chdir(old_cwd)
        if old_cache is None:
            os.environ.pop("CRITBATCH_CACHE", None)
        else:
            os.environ["CRITBATCH_CACHE"] = old_cache


def test_each_stage_alone_as_the_readme_shows(tmp_path):
    lines = readme_block("stages")
    assert [l.split()[1] for l in lines][:7] == ["prepare", "train", "branch", "gns", "schedule", "compare", "report"]
    # the last line, the quick demo, runs once in the session: conftest.quick_demo runs exactly it, for
    # tests/test_report.py
    assert lines[-1] == QUICK_DEMO_LINE
    run_lines(lines[:-1], tmp_path)
    assert (tmp_path / "runs" / "base" / "report.html").is_file()
    assert (tmp_path / "runs" / "compare" / "comparison.md").is_file()
    assert (tmp_path / "runs" / "auto" / "decisions.jsonl").is_file()  # the closed loop


def test_bring_your_own_text_as_the_readme_shows(tmp_path):
    (tmp_path / "my_corpus.jsonl").write_text("\n".join('{"text": "%s"}' % ("words and more words " * 400) for _ in range(30)))
    run_lines(readme_block("own-data"), tmp_path)
    assert (tmp_path / "runs" / "mine" / "result.json").is_file()


def test_measure_your_own_model_as_the_readme_shows(tmp_path):
    """A tiny OLMo-2 config and a tokenizer.json of one's own, through prepare -> train -> branch ->
    schedule (rescaled to the target's sequences, with the exports)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    pytest.importorskip("transformers")
    words = "the model people actually pretrain measures its own critical batch size".split()
    docs = [" ".join(words[(i * 7 + j * j) % len(words)] for j in range(300)) for i in range(400)]
    (tmp_path / "my_corpus.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "my_tokenizer").mkdir()
    tok.save(str(tmp_path / "my_tokenizer" / "tokenizer.json"))
    (tmp_path / "my_olmo2.json").write_text(json.dumps({
        "model_type": "olmo2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}))
    run_lines(readme_block("own-model"), tmp_path)
    doc = json.loads((tmp_path / "runs" / "own-schedule.json").read_text())
    assert doc["seq_len"] == 256 and all(p["batch_seqs"] % 2 == 0 for p in doc["phases"])
    assert "olmo_core_batch_size_scheduler" in doc["exports"]
    cfg = json.loads((tmp_path / "runs" / "own-base" / "config.json").read_text())
    assert cfg["model"]["family"] == "hf" and cfg["model"]["vocab_size"] == 300
